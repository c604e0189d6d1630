//! Driver conformance: the checks of `support::conformance`, each run against every driver and
//! its real backend — `nbd` against `qemu-storage-daemon`, `csi` against the Kubernetes mock CSI
//! plugin — so that the test names say driver and check (`csi::deadlines_are_honoured`).
//!
//! Each driver reaches its backend through that backend's fault-injecting proxy (QMP or gRPC),
//! which the deadline check uses to stall a reply. The CSI driver is configured as the operator
//! must run it with the mock plugin, `trustPublishedNodes: false`, since the mock lists its node
//! as published for every volume; its own publish record stands in for the probe.

mod support;

use async_trait::async_trait;
use safe_detach::config::DriverEntry;
use safe_detach::driver::csi::CsiConfig;
use safe_detach::driver::nbd::parse_export_id;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;
use support::conformance::{self as checks, Call, Fixture};
use support::csi::CsiPlugin;
use support::grpc_proxy::{self, GrpcProxy};
use support::qmp_proxy::{self, QmpProxy};
use support::qsd::Qsd;

/// `qemu-storage-daemon` with its QMP monitor behind the QMP proxy.
struct NbdFixture {
    proxy: QmpProxy,
    qsd: Qsd,
    fired: Mutex<usize>,
}

impl NbdFixture {
    async fn start() -> Self {
        let qsd = Qsd::start();
        let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
        Self {
            proxy,
            qsd,
            fired: Mutex::new(0),
        }
    }
}

#[async_trait]
impl Fixture for NbdFixture {
    fn driver_entry(&self, name: &str) -> DriverEntry {
        DriverEntry::nbd(name, self.qsd.config_via(self.proxy.socket()))
    }

    fn probeable_by_config(&self) -> bool {
        true
    }

    async fn create_volume(&self, name: &str) -> String {
        self.qsd.create_image(name);
        name.to_owned()
    }

    fn node(&self) -> String {
        "node-a".into()
    }

    fn second_node(&self) -> Option<String> {
        Some("node-b".into())
    }

    fn unknown_volume(&self) -> String {
        "no-such-image".into()
    }

    async fn stall(&self, call: Call, delay: Duration) {
        *self.fired.lock().expect("lock") = self.proxy.fired();
        let command = match call {
            Call::Attach => "block-export-add",
            Call::ForceDetach => "block-export-del",
        };
        self.proxy.arm(command, qmp_proxy::Fault::DelayReply(delay));
    }

    async fn unstall(&self, call: Call) {
        // The proxy's faults are spent by the first command of their name.
        let before = *self.fired.lock().expect("lock");
        assert_eq!(
            self.proxy.fired(),
            before + 1,
            "the stall of {call:?} was not used"
        );
    }

    async fn connected(&self, volume: &str) -> BTreeSet<String> {
        self.qsd
            .export_ids()
            .await
            .iter()
            .filter_map(|id| parse_export_id(id))
            .filter(|(handle, _)| *handle == volume)
            .map(|(_, node)| node.to_owned())
            .collect()
    }

    async fn state(&self) -> String {
        let exports = self.qsd.export_ids().await;
        let nodes = self.qsd.block_nodes().await;
        format!("exports {exports:?}, block nodes {nodes:?}")
    }
}

const PUBLISH: &str = "/csi.v1.Controller/ControllerPublishVolume";
const UNPUBLISH: &str = "/csi.v1.Controller/ControllerUnpublishVolume";

/// The mock CSI plugin behind the gRPC proxy, configured with `trustPublishedNodes`.
struct CsiFixture {
    proxy: GrpcProxy,
    plugin: CsiPlugin,
    trust_published_nodes: bool,
    volumes: Mutex<Vec<String>>,
}

impl CsiFixture {
    async fn start(trust_published_nodes: bool) -> Self {
        let plugin = CsiPlugin::start().await;
        let proxy = GrpcProxy::start(plugin.socket(), &plugin.dir().join("proxy.sock"));
        Self {
            proxy,
            plugin,
            trust_published_nodes,
            volumes: Mutex::new(Vec::new()),
        }
    }

    fn method(call: Call) -> &'static str {
        match call {
            Call::Attach => PUBLISH,
            Call::ForceDetach => UNPUBLISH,
        }
    }
}

#[async_trait]
impl Fixture for CsiFixture {
    fn driver_entry(&self, name: &str) -> DriverEntry {
        DriverEntry::csi(
            name,
            CsiConfig {
                endpoint: format!("unix://{}", self.proxy.socket().display()).into(),
                trust_published_nodes: self.trust_published_nodes,
            },
        )
    }

    /// The mock advertises LIST_VOLUMES_PUBLISHED_NODES, so only the flag decides.
    fn probeable_by_config(&self) -> bool {
        self.trust_published_nodes
    }

    async fn create_volume(&self, name: &str) -> String {
        let id = self.plugin.create_volume(name).await;
        self.volumes.lock().expect("lock").push(id.clone());
        id
    }

    fn node(&self) -> String {
        self.plugin.node().to_owned()
    }

    /// The mock has one node: its driver name.
    fn second_node(&self) -> Option<String> {
        None
    }

    fn unknown_volume(&self) -> String {
        "no-such-volume".into()
    }

    async fn stall(&self, call: Call, delay: Duration) {
        self.proxy
            .arm(Self::method(call), grpc_proxy::Fault::Delay(delay));
    }

    async fn unstall(&self, call: Call) {
        self.proxy.disarm(Self::method(call));
    }

    async fn connected(&self, volume: &str) -> BTreeSet<String> {
        self.plugin.controller_published_nodes(volume).await
    }

    async fn state(&self) -> String {
        let volumes = self.volumes.lock().expect("lock").clone();
        let mut published = BTreeMap::new();
        for volume in volumes {
            let nodes = self.plugin.controller_published_nodes(&volume).await;
            published.insert(volume, nodes);
        }
        format!("published {published:?}")
    }
}

/// One `#[tokio::test]` per driver and check: `nbd::<check>` and `csi::<check>`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod nbd {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    let fixture = NbdFixture::start().await;
                    checks::$check(&fixture).await;
                }
            )*
        }

        mod csi {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    let fixture = CsiFixture::start(false).await;
                    checks::$check(&fixture).await;
                }
            )*
        }
    };
}

conformance!(
    attach_is_idempotent,
    force_detach_of_a_detached_volume_changes_nothing,
    no_connection_after_detach,
    unknown_volume_is_a_clear_error,
    deadlines_are_honoured,
);

/// The flag, not the plugin, is what makes the mock unprobeable: with the default
/// (`trustPublishedNodes: true`) the same plugin is probed, and its probe is the superset it
/// reports — its node for every volume, so it can never show a detach.
#[tokio::test(flavor = "multi_thread")]
async fn csi_trust_published_nodes_decides_can_probe() {
    let fixture = CsiFixture::start(true).await;
    let (driver, _) = checks::driver_from_config(&fixture, "20s").await;
    assert!(driver.can_probe());
    let volume = fixture.create_volume("trusted").await;
    assert!(fixture.connected(&volume).await.is_empty());
    assert_eq!(
        driver.probe(&volume).await.expect("probe").nodes,
        BTreeSet::from([fixture.node()]),
        "the mock lists its node for a volume it never published"
    );

    let untrusted = CsiFixture::start(false).await;
    let (driver, _) = checks::driver_from_config(&untrusted, "20s").await;
    assert!(!driver.can_probe());
}
