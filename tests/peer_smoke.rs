//! The Kubernetes CSI external-attacher as a benchmark peer, smoke-tested end to end: the real
//! control plane, the Kubernetes mock CSI plugin, and `csi-attacher` (built by
//! `hack/build-peers.sh`) serving storage.k8s.io VolumeAttachments for it. Ten volumes are
//! attached and detached, at the attacher's defaults and with the benchmarks' tuned flags; the
//! figures are printed as FIGURE lines. Ignored by default (it builds a Go program on first use):
//!
//! `cargo test --test peer_smoke -- --ignored --nocapture`
//!
//! Both tests use the mock's one driver name, so they take turns: two attachers for one driver
//! would both act on every attachment of it.

// The part of the shared support this test uses, the peer included.
mod support {
    #![allow(dead_code)]
    pub mod cluster;
    pub mod csi;
    pub mod peer;
    pub mod process;
}

use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use support::cluster::admin_kubeconfig;
use support::csi::{CsiPlugin, DRIVER_NAME};
use support::peer::{ExternalAttacher, PeerObjects, TUNED, create_plugin_volumes};
use support::process::Process;
use tokio::time::Instant;

const VOLUMES: usize = 10;
const CONCURRENCY: usize = 8;
/// Far more than either phase takes at the defaults (about 3 writes per attachment at 5 QPS).
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);
/// The attacher's finalizer for the mock's driver name.
const ATTACHMENT_FINALIZER: &str = "external-attacher/mock-csi-safedetach-io";

static ONE_ATTACHER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark peer: builds csi-attacher on first use; run with --ignored"]
async fn external_attacher_defaults_attach_and_detach() {
    smoke("defaults", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark peer: builds csi-attacher on first use; run with --ignored"]
async fn external_attacher_tuned_attach_and_detach() {
    smoke("tuned", TUNED).await;
}

async fn smoke(setting: &str, flags: &[&str]) {
    let _turn = ONE_ATTACHER.lock().await;
    let kubeconfig = admin_kubeconfig().await;
    let plugin = CsiPlugin::start().await;
    let node = plugin.node().to_owned();
    let handles = create_plugin_volumes(&plugin, "peer-smoke", VOLUMES, CONCURRENCY).await;
    // Declared before the attacher, so the attacher is killed before the objects are cleaned up.
    let mut objects = PeerObjects::create(DRIVER_NAME, &node).await;

    let starting = Instant::now();
    let attacher = ExternalAttacher::start(plugin.socket(), kubeconfig, flags).await;
    let startup = starting.elapsed();
    let process = Process {
        name: "csi-attacher",
        pid: attacher.pid(),
    };
    let cpu_before = process.cpu_seconds();

    // Attach: create the PVs and attachments, then follow them until all report attached.
    let creating = Instant::now();
    let names = objects.create_volumes(&handles, CONCURRENCY).await;
    let created = creating.elapsed();
    let mut attached_at = BTreeMap::new();
    while attached_at.len() < VOLUMES {
        for va in objects.list_attachments().await {
            if va.status.as_ref().is_some_and(|status| status.attached) {
                attached_at
                    .entry(va.metadata.name.clone().unwrap_or_default())
                    .or_insert_with(|| creating.elapsed());
            }
        }
        if attached_at.len() < VOLUMES {
            assert!(
                creating.elapsed() < WAIT,
                "{}/{VOLUMES} attached after {WAIT:?}; attach errors {:?}\nattacher log:\n{}",
                attached_at.len(),
                objects.attach_errors().await,
                attacher.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }
    let all_attached = creating.elapsed();
    assert_eq!(objects.count_attached().await, VOLUMES);
    for handle in &handles {
        assert_eq!(
            plugin.controller_published_nodes(handle).await,
            BTreeSet::from([node.clone()]),
            "the plugin's own record of volume {handle}"
        );
    }
    for va in objects.list_attachments().await {
        assert!(
            va.finalizers().iter().any(|f| f == ATTACHMENT_FINALIZER),
            "{va:?}"
        );
    }
    for pv in objects.list_pvs().await {
        assert!(
            pv.finalizers().iter().any(|f| f == ATTACHMENT_FINALIZER),
            "{pv:?}"
        );
    }

    // Detach: delete the attachments; the attacher unpublishes and then releases its finalizer.
    let deleting = Instant::now();
    objects.delete_attachments(&names, CONCURRENCY).await;
    let mut gone = 0;
    while gone < VOLUMES {
        gone = objects.count_gone().await;
        if gone < VOLUMES {
            assert!(
                deleting.elapsed() < WAIT,
                "{gone}/{VOLUMES} gone after {WAIT:?}\nattacher log:\n{}",
                attacher.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }
    let all_gone = deleting.elapsed();
    for handle in &handles {
        assert_eq!(
            plugin.controller_published_nodes(handle).await,
            BTreeSet::new(),
            "the plugin's own record of volume {handle} after the detach"
        );
    }

    let cpu = process.cpu_seconds() - cpu_before;
    let (rss, peak) = process.memory_mib();
    let mut latencies: Vec<Duration> = attached_at.into_values().collect();
    latencies.sort();
    println!("attacher: {}", attacher.args().join(" "));
    println!(
        "FIGURE: external-attacher ({setting}), {VOLUMES} volumes: started in {startup:.2?}; \
         {VOLUMES} PVs + VolumeAttachments created in {created:.2?}; created -> attached: \
         first {:.2?}, median {:.2?}, all {all_attached:.2?}; deleted -> all gone {all_gone:.2?}",
        latencies[0],
        latencies[VOLUMES / 2],
    );
    println!(
        "FIGURE: external-attacher ({setting}): CPU {:.0} ms over attach and detach; \
         RSS {rss:.1} MiB, peak {peak:.1} MiB",
        cpu * 1000.0
    );

    drop(attacher);
    objects.cleanup().await;
}
