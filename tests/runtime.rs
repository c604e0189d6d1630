//! The operator as it runs in a cluster, on the real control plane and a real
//! `qemu-storage-daemon`: leader election between two replicas, the HTTP endpoints the
//! Deployment probes and Prometheus scrapes, a missing permission reported rather than a silent
//! stall, and deploy/ itself accepted by the apiserver.
//!
//! Run with `--nocapture` to see the `FIGURE:` lines.

mod support;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::{Client, ResourceExt};
use safe_detach::api::{
    ATTACHMENT_FINALIZER, AttachmentPhase, FORCE_DETACH_ANNOTATION, ForceDetachState, Volume,
    VolumeAttachment,
};
use safe_detach::config::{Config, ConfigError, ConfigFile, DriverEntry};
use safe_detach::runtime::metrics::Metrics;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::cluster::{
    TestObjects, admin_client, admin_kubeconfig, eventually, kubectl, unique_name,
};
use support::operator::{Operator, Options, SHARD_LABEL, http_get};
use support::qsd::Qsd;
use tokio::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const MANAGER: &str = "safe-detach-runtime-test";
const LEASE_NAMESPACE: &str = "safe-detach";
/// Long enough for an operator to start, sync its caches and attach, or for a lease to expire.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// A shard of objects on a daemon of its own, and the operator configuration for it.
struct Backend {
    shard: String,
    driver: String,
    client: Client,
    attachments: Api<VolumeAttachment>,
    objects: TestObjects,
    qsd: Qsd,
}

impl Backend {
    async fn start() -> Self {
        let client = admin_client().await;
        let shard = unique_name("shard");
        Self {
            // A driver name of its own: an operator of another shard cannot reach this daemon.
            driver: format!("nbd-{shard}"),
            shard,
            attachments: Api::all(client.clone()),
            client,
            objects: TestObjects::default(),
            qsd: Qsd::start(),
        }
    }

    fn config(&self) -> String {
        ConfigFile {
            default_stuck_after: Some("30s".into()),
            resync_interval: Some("5s".into()),
            concurrency: None,
            drivers: vec![DriverEntry::nbd(&self.driver, self.qsd.config()).with_deadline("5s")],
        }
        .to_text()
        .expect("the daemon's paths are UTF-8")
    }

    /// A Volume on a new image, and an attachment of it to `node`; returns the attachment's name.
    async fn attachment(&mut self, node: &str) -> String {
        let volume = self.objects.volume("rt-volume");
        let attachment = self.objects.attachment("rt-attachment");
        self.qsd.create_image(&volume);
        let labels = json!({ SHARD_LABEL: self.shard });
        let params = PatchParams::apply(MANAGER);
        let object = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "Volume",
            "metadata": { "name": volume, "labels": labels },
            "spec": { "driver": self.driver, "volumeHandle": volume },
        });
        Api::<Volume>::all(self.client.clone())
            .patch(&volume, &params, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("create Volume {volume}: {e}"));
        let object = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "VolumeAttachment",
            "metadata": { "name": attachment, "labels": labels },
            "spec": { "volumeName": volume, "nodeName": node },
        });
        self.attachments
            .patch(&attachment, &params, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("create VolumeAttachment {attachment}: {e}"));
        attachment
    }

    async fn get(&self, name: &str) -> VolumeAttachment {
        self.attachments
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"))
    }

    /// Waits until the backend-confirmed `Attached` is recorded.
    async fn wait_attached(&self, name: &str) -> VolumeAttachment {
        eventually(
            &format!("{name} Attached and confirmed"),
            WAIT,
            POLL,
            || async {
                let attachment = self.attachments.get(name).await.ok()?;
                attached(&attachment).then_some(attachment)
            },
        )
        .await
    }
}

fn attached(attachment: &VolumeAttachment) -> bool {
    attachment
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Some(AttachmentPhase::Attached) && s.attached)
}

/// Objects outside the CRDs that a test creates, deleted with kubectl when it ends.
#[derive(Default)]
struct Cleanup(Vec<Vec<String>>);

impl Cleanup {
    fn delete(&mut self, args: &[&str]) {
        let mut command = vec!["delete".to_owned(), "--ignore-not-found".to_owned()];
        command.extend(args.iter().map(|a| (*a).to_owned()));
        self.0.push(command);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let commands = std::mem::take(&mut self.0);
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up")
                .block_on(async {
                    for command in &commands {
                        let args: Vec<&str> = command.iter().map(String::as_str).collect();
                        kubectl(&args).await;
                    }
                })
        })
        .join();
        if done.is_err() && !std::thread::panicking() {
            panic!("clean-up failed");
        }
    }
}

/// Waits until `path` answers 200 and returns the body.
async fn wait_ok(operator: &Operator, path: &str) -> String {
    let address = operator.http_address();
    eventually(&format!("GET {path} answers 200"), WAIT, POLL, || async {
        match http_get(address, path).await {
            Some((200, body)) => Some(body),
            _ => None,
        }
    })
    .await
}

/// A scrape of /metrics in the Prometheus text format.
struct Scrape(String);

impl Scrape {
    async fn of(operator: &Operator) -> Self {
        Self(wait_ok(operator, "/metrics").await)
    }

    /// Samples of the series `name` (a full sample name, e.g. with `_total` or `_count`).
    fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (series_name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                (series_name == name).then(|| {
                    let labels = labels
                        .split(',')
                        .filter_map(|pair| pair.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                        .collect();
                    (labels, value.parse().expect("a sample value"))
                })
            })
            .collect()
    }

    /// The sum of the samples of `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .into_iter()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(k, v)| have.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Whether the family `name` is described (`# TYPE name ...`), samples or not.
    fn has_family(&self, name: &str) -> bool {
        self.0
            .lines()
            .any(|line| line.starts_with(&format!("# TYPE {name} ")))
    }
}

/// Who holds the Lease `name`, if it exists and is held.
async fn holder(client: &Client, name: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE)
        .get_opt(name)
        .await
        .expect("read the lease")?;
    lease.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_acts_and_another_takes_over_when_it_dies() {
    let mut backend = Backend::start().await;
    let lease = unique_name("lease");
    let mut cleanup = Cleanup::default();
    cleanup.delete(&["lease", "-n", LEASE_NAMESPACE, &lease]);
    let lease_duration = Duration::from_secs(5);
    let (first, second) = (format!("first-{lease}"), format!("second-{lease}"));

    let mut leader = Operator::start_with(
        &backend.shard,
        &backend.config(),
        replica(&lease, "5s", &first),
    )
    .await;
    let held = eventually("the first replica takes the lease", WAIT, POLL, || async {
        holder(&backend.client, &lease)
            .await
            .filter(|h| *h == first)
    })
    .await;
    assert_eq!(held, first);
    let follower = Operator::start_with(
        &backend.shard,
        &backend.config(),
        replica(&lease, "5s", &second),
    )
    .await;
    // A follower is ready while it stands by: it has joined the election.
    assert_eq!(wait_ok(&follower, "/readyz").await, "ready");

    let one = backend.attachment("node-a").await;
    backend.wait_attached(&one).await;

    // Only the leader acted: the follower started no controller and reconciled nothing.
    assert_eq!(
        holder(&backend.client, &lease).await.as_deref(),
        Some(first.as_str())
    );
    let leader_log = leader.log();
    for expected in ["acquired the lease: acting", "controllers started"] {
        assert!(
            leader_log.contains(expected),
            "leader log lacks {expected:?}:\n{leader_log}"
        );
    }
    let follower_log = follower.log();
    for unexpected in ["acquired the lease", "controllers started", "reconcile"] {
        assert!(
            !follower_log.contains(unexpected),
            "follower log has {unexpected:?}:\n{follower_log}"
        );
    }
    let standing_by = Scrape::of(&follower).await;
    assert_eq!(
        standing_by.samples("safedetach_reconciles_total"),
        [],
        "the follower reconciled"
    );
    let acting = Scrape::of(&leader).await;
    assert!(
        acting.sum(
            "safedetach_reconciles_total",
            &[("kind", "VolumeAttachment")]
        ) >= 1.0
    );

    // The leader dies without a word: its lease runs out, and the follower takes over.
    leader.kill();
    let killed = Instant::now();
    eventually("the second replica takes the lease", WAIT, POLL, || async {
        holder(&backend.client, &lease)
            .await
            .filter(|h| *h == second)
    })
    .await;
    let takeover = killed.elapsed();
    println!(
        "FIGURE: takeover {takeover:?} after SIGKILL of the leader (lease {lease_duration:?})"
    );
    assert!(
        takeover <= lease_duration + Duration::from_secs(5),
        "takeover took {takeover:?} with a lease of {lease_duration:?}"
    );

    // The new leader resumes: a new attachment is attached, the old one stays attached.
    let two = backend.attachment("node-b").await;
    backend.wait_attached(&two).await;
    let resumed = Instant::now();
    assert!(attached(&backend.get(&one).await));
    println!(
        "FIGURE: new attachment Attached {:?} after SIGKILL of the leader",
        resumed.duration_since(killed)
    );
    let follower_log = follower.log();
    assert!(
        follower_log.contains("acquired the lease: acting"),
        "{follower_log}"
    );
    let exports = backend.qsd.export_ids().await;
    assert_eq!(exports.len(), 2, "{exports:?}");
    drop(follower);
}

/// Options for a replica in the election for `lease`, named `identity`.
fn replica(lease: &str, duration: &str, identity: &str) -> Options {
    Options {
        args: [
            "--leader-elect",
            "--lease-name",
            lease,
            "--lease-duration",
            duration,
            "--identity",
            identity,
        ]
        .map(str::to_owned)
        .to_vec(),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_with_sigterm_hands_over_at_once() {
    let backend = Backend::start().await;
    let lease = unique_name("lease");
    let mut cleanup = Cleanup::default();
    cleanup.delete(&["lease", "-n", LEASE_NAMESPACE, &lease]);
    // A long lease, so that a handover by expiry cannot pass for a release.
    let lease_duration = Duration::from_secs(30);
    let (first, second) = (format!("first-{lease}"), format!("second-{lease}"));
    let mut leader = Operator::start_with(
        &backend.shard,
        &backend.config(),
        replica(&lease, "30s", &first),
    )
    .await;
    eventually("the first replica takes the lease", WAIT, POLL, || async {
        holder(&backend.client, &lease)
            .await
            .filter(|h| *h == first)
    })
    .await;
    let follower = Operator::start_with(
        &backend.shard,
        &backend.config(),
        replica(&lease, "30s", &second),
    )
    .await;
    assert_eq!(wait_ok(&follower, "/readyz").await, "ready");

    let status = leader.terminate().expect("the leader was running");
    assert!(status.success(), "the leader exited with {status}");
    let stopped = Instant::now();
    assert!(
        leader.log().contains("released the lease"),
        "{}",
        leader.log()
    );
    let released = holder(&backend.client, &lease).await;
    assert_ne!(
        released.as_deref(),
        Some(first.as_str()),
        "the leader exited still holding the lease; its log:\n{}",
        leader.log()
    );
    eventually("the second replica takes the lease", WAIT, POLL, || async {
        holder(&backend.client, &lease)
            .await
            .filter(|h| *h == second)
    })
    .await;
    let handover = stopped.elapsed();
    println!(
        "FIGURE: handover {handover:?} after SIGTERM of the leader (lease {lease_duration:?})"
    );
    assert!(handover < lease_duration / 3, "handover took {handover:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_report_health_readiness_and_metrics() {
    let mut backend = Backend::start().await;
    let operator =
        Operator::start_with(&backend.shard, &backend.config(), Options::default()).await;
    let address = operator.http_address();

    assert_eq!(wait_ok(&operator, "/healthz").await, "ok");
    assert_eq!(wait_ok(&operator, "/readyz").await, "ready");
    assert_eq!(
        http_get(address, "/nothing-here")
            .await
            .map(|(code, _)| code),
        Some(404)
    );

    let name = backend.attachment("node-a").await;
    backend.wait_attached(&name).await;
    // The gauges are computed from the caches at each scrape: wait until the cache has caught up.
    let scrape = eventually(
        "the metrics show one Attached attachment",
        WAIT,
        POLL,
        || async {
            let scrape = Scrape::of(&operator).await;
            // A reconcile is counted when it returns, a moment after its write reached the cache;
            // the Volume's waits for its turn while an attachment of it is being attached.
            (scrape.sum("safedetach_attachments", &[("phase", "Attached")]) == 1.0
                && scrape.sum(
                    "safedetach_reconciles_total",
                    &[("kind", "VolumeAttachment")],
                ) >= 1.0
                && scrape.sum("safedetach_reconciles_total", &[("kind", "Volume")]) >= 1.0)
                .then_some(scrape)
        },
    )
    .await;
    // Forced-detach series exist from the start, at zero, so that alerts see the first one;
    // reconcile errors appear with their first sample. None forced and none failed yet.
    assert!(
        scrape.has_family("safedetach_force_detaches"),
        "{}",
        scrape.0
    );
    assert_eq!(
        scrape.sum("safedetach_force_detaches_total", &[]),
        0.0,
        "{}",
        scrape.0
    );
    assert!(
        !scrape.has_family("safedetach_reconcile_errors"),
        "{}",
        scrape.0
    );
    for family in [
        "safedetach_driver_call_duration_seconds",
        "safedetach_reconciles",
        "safedetach_attachments",
        "safedetach_stuck_attachments",
        "safedetach_oldest_stuck_attachment_seconds",
        "safedetach_orphans",
    ] {
        assert!(scrape.has_family(family), "no {family} in:\n{}", scrape.0);
    }
    assert_eq!(
        scrape.samples("safedetach_attachments").len(),
        1,
        "{}",
        scrape.0
    );
    assert_eq!(scrape.sum("safedetach_stuck_attachments", &[]), 0.0);
    assert_eq!(
        scrape.sum("safedetach_oldest_stuck_attachment_seconds", &[]),
        0.0
    );
    assert_eq!(scrape.sum("safedetach_orphans", &[]), 0.0);
    let call = |operation| {
        [
            ("driver", "nbd"),
            ("operation", operation),
            ("result", "ok"),
        ]
    };
    assert!(
        scrape.sum(
            "safedetach_driver_call_duration_seconds_count",
            &call("attach")
        ) >= 1.0
    );
    assert!(
        scrape.sum(
            "safedetach_driver_call_duration_seconds_count",
            &call("probe")
        ) >= 1.0
    );
    let attach_seconds = scrape.sum(
        "safedetach_driver_call_duration_seconds_sum",
        &call("attach"),
    );
    assert!(
        attach_seconds > 0.0 && attach_seconds < 5.0,
        "{attach_seconds}"
    );
    assert!(
        scrape.sum(
            "safedetach_reconciles_total",
            &[("kind", "VolumeAttachment")]
        ) >= 1.0
    );
    assert!(scrape.sum("safedetach_reconciles_total", &[("kind", "Volume")]) >= 1.0);
    println!(
        "FIGURE: attach call {:.1} ms on qemu-storage-daemon",
        attach_seconds * 1000.0
    );

    // A requested force-detach is counted by reason and result.
    let token = "metrics-1";
    backend
        .attachments
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { FORCE_DETACH_ANNOTATION: token } } }),
            ),
        )
        .await
        .expect("annotate");
    eventually(
        "the force-detach is confirmed and the volume re-attached",
        WAIT,
        POLL,
        || async {
            let attachment = backend.attachments.get(&name).await.ok()?;
            let force = attachment.status.as_ref()?.force_detach.as_ref()?;
            (force.token.as_deref() == Some(token)
                && force.state == ForceDetachState::Succeeded
                && attached(&attachment))
            .then_some(())
        },
    )
    .await;
    let scrape = Scrape::of(&operator).await;
    assert_eq!(
        scrape.sum(
            "safedetach_force_detaches_total",
            &[("reason", "Requested"), ("result", "Succeeded")]
        ),
        1.0,
        "{}",
        scrape.0
    );
    assert!(
        scrape.sum(
            "safedetach_driver_call_duration_seconds_count",
            &call("force_detach")
        ) >= 1.0
    );
    assert_eq!(
        scrape.sum(
            "safedetach_reconcile_errors_total",
            &[("reason", "KubeApi")]
        ),
        0.0
    );

    // The backend goes away: the acting replica is no longer ready, and says which driver.
    backend.qsd.stop();
    let why = eventually(
        "/readyz reports the unreachable driver",
        WAIT,
        POLL,
        || async {
            http_get(address, "/readyz")
                .await
                .filter(|(code, _)| *code == 503)
                .map(|(_, body)| body)
        },
    )
    .await;
    assert!(
        why.contains("drivers unreachable") && why.contains(&backend.driver),
        "{why}"
    );
    assert_eq!(
        wait_ok(&operator, "/healthz").await,
        "ok",
        "alive all the same"
    );
}

/// The operator's ClusterRole from deploy/rbac.yaml, renamed, without `patch` on
/// volumeattachments/status.
async fn cluster_role_without_attachment_status(name: &str) -> Value {
    let file = Path::new(REPO).join("deploy/rbac.yaml");
    let rendered = kubectl(&[
        "create",
        "--dry-run=client",
        "-o",
        "json",
        "-f",
        file.to_str().expect("a UTF-8 path"),
    ])
    .await;
    // One JSON document per object.
    let mut role = serde_json::Deserializer::from_str(&rendered)
        .into_iter::<Value>()
        .map(|item| item.expect("kubectl prints JSON"))
        .find(|item| item["kind"] == "ClusterRole")
        .expect("deploy/rbac.yaml has a ClusterRole");
    role["metadata"] = json!({ "name": name });
    let mut removed = false;
    for rule in role["rules"].as_array_mut().expect("rules") {
        let resources = rule["resources"].as_array_mut().expect("resources");
        let before = resources.len();
        resources.retain(|r| r != "volumeattachments/status");
        removed |= resources.len() < before;
    }
    assert!(
        removed,
        "deploy/rbac.yaml grants patch on volumeattachments/status"
    );
    role
}

/// The admin's kubeconfig, impersonating `user` (kubeconfig `as:`), written to `dir`.
async fn kubeconfig_as(user: &str, dir: &Path) -> PathBuf {
    let mut kubeconfig =
        Kubeconfig::read_from(admin_kubeconfig().await).expect("read the admin kubeconfig");
    for named in &mut kubeconfig.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.impersonate = Some(user.to_owned());
        }
    }
    let path = dir.join("kubeconfig");
    // JSON is YAML: kubeconfig readers take it as it is.
    std::fs::write(
        &path,
        serde_json::to_string(&kubeconfig).expect("encode the kubeconfig"),
    )
    .expect("write the kubeconfig");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_permission_is_reported_not_a_silent_stall() {
    let mut backend = Backend::start().await;
    let user = unique_name("safe-detach-without-status");
    let mut cleanup = Cleanup::default();
    cleanup.delete(&["clusterrolebinding", &user]);
    cleanup.delete(&["clusterrole", &user]);

    let roles = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(backend.client.clone());
    let role = cluster_role_without_attachment_status(&user).await;
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(role).expect("a ClusterRole"),
        )
        .await
        .expect("create the ClusterRole");
    let bindings =
        Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(backend.client.clone());
    let binding = json!({
        "metadata": { "name": user },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    });
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(binding).expect("a ClusterRoleBinding"),
        )
        .await
        .expect("create the ClusterRoleBinding");

    let dir = tempfile::tempdir().expect("a folder for the kubeconfig");
    let options = Options {
        kubeconfig: Some(kubeconfig_as(&user, dir.path()).await),
        ..Options::default()
    };
    let operator = Operator::start_with(&backend.shard, &backend.config(), options).await;
    assert_eq!(wait_ok(&operator, "/readyz").await, "ready");

    let name = backend.attachment("node-a").await;
    let expected = format!(
        "User \"{user}\" cannot patch resource \"volumeattachments/status\" in API group \
         \"safedetach.io\""
    );
    let line = eventually(
        "the log names the forbidden verb and resource",
        WAIT,
        POLL,
        || async {
            operator
                .log()
                .lines()
                .find(|line| line.contains("reconcile failed") && line.contains(&expected))
                .map(str::to_owned)
        },
    )
    .await;
    println!("FIGURE: the operator logs: {line}");
    let scrape = eventually("the error is counted", WAIT, POLL, || async {
        let scrape = Scrape::of(&operator).await;
        let errors = scrape.sum(
            "safedetach_reconcile_errors_total",
            &[("kind", "VolumeAttachment"), ("reason", "KubeApi")],
        );
        (errors > 0.0).then_some(scrape)
    })
    .await;
    // Retried with backoff, not given up on: the count keeps growing.
    let first = scrape.sum(
        "safedetach_reconcile_errors_total",
        &[("reason", "KubeApi")],
    );
    eventually("the failing reconcile is retried", WAIT, POLL, || async {
        let scrape = Scrape::of(&operator).await;
        (scrape.sum(
            "safedetach_reconcile_errors_total",
            &[("reason", "KubeApi")],
        ) > first)
            .then_some(())
    })
    .await;

    // The intent could not be recorded, so the backend was never asked to attach.
    let attachment = backend.get(&name).await;
    assert!(
        attachment
            .finalizers()
            .iter()
            .any(|f| f == ATTACHMENT_FINALIZER),
        "the finalizer (a patch it may make) is in place"
    );
    assert_eq!(
        attachment.status.as_ref().and_then(|s| s.phase),
        None,
        "nothing was recorded"
    );
    assert_eq!(backend.qsd.export_ids().await, Vec::<String>::new());
    drop(operator);
}

/// deploy/ as an administrator installs it: it renders, the apiserver accepts every object (a
/// server-side dry run), the CSI component and the examples render, and both driver
/// configurations are read by the operator's own parser.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_renders_and_the_apiserver_accepts_it() {
    let deploy = Path::new(REPO).join("deploy");
    let base = kubectl(&["kustomize", deploy.to_str().expect("a UTF-8 path")]).await;
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "CustomResourceDefinition",
    ] {
        assert!(
            base.contains(&format!("\nkind: {kind}\n")),
            "no {kind} in deploy/"
        );
    }
    assert!(
        !base.contains("\nkind: Volume\n"),
        "example Volumes are not in the base"
    );
    let applied = kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-k",
        deploy.to_str().expect("a UTF-8 path"),
    ])
    .await;
    // One line per object, each accepted.
    let objects = base.split("\n---\n").count();
    assert_eq!(applied.lines().count(), objects, "{applied}");
    assert!(
        applied
            .lines()
            .all(|line| line.ends_with("(server dry run)")),
        "{applied}"
    );

    // The CSI component, through an overlay as a user would write it (inside the repository:
    // kustomize refuses absolute paths).
    let inside = Path::new(REPO).join("target");
    std::fs::create_dir_all(&inside).expect("a folder inside the repository");
    let overlay = tempfile::tempdir_in(&inside).expect("an overlay folder");
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        "resources: [../../deploy]\ncomponents: [../../deploy/csi-sidecar]\n",
    )
    .expect("write the overlay");
    let csi = kubectl(&["kustomize", overlay.path().to_str().expect("a UTF-8 path")]).await;
    for expected in [
        "name: csi-plugin",
        "endpoint: unix:///csi/csi.sock",
        "mountPath: /csi",
    ] {
        assert!(csi.contains(expected), "no {expected:?} in the CSI layout");
    }
    for gone in ["/run/qsd", "nbd-backend", "hostPath"] {
        assert!(!csi.contains(gone), "{gone:?} left in the CSI layout");
    }
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-k",
        overlay.path().to_str().expect("a UTF-8 path"),
    ])
    .await;
    let examples = kubectl(&[
        "kustomize",
        deploy.join("examples").to_str().expect("UTF-8"),
    ])
    .await;
    assert_eq!(examples.matches("kind: VolumeAttachment").count(), 2);

    // The driver configurations, read by the operator's parser. The nbd image folder must exist
    // and the CSI plugin must answer for a driver to load: a failure there means the file parsed.
    let observer = Arc::new(Metrics::default());
    let images = tempfile::tempdir().expect("an image folder");
    let nbd = std::fs::read_to_string(deploy.join("operator.yaml"))
        .expect("deploy/operator.yaml")
        .replace(
            "/var/lib/safe-detach/images",
            images.path().to_str().expect("UTF-8"),
        );
    let config = Config::parse(&nbd, observer.clone())
        .await
        .unwrap_or_else(|e| panic!("deploy/operator.yaml: {e}"));
    assert_eq!(config.drivers.keys().collect::<Vec<_>>(), ["nbd"]);
    assert_eq!(config.default_stuck_after, Duration::from_secs(120));
    assert_eq!(config.concurrency, 16);
    let none_at_once = nbd.replace("concurrency: 16", "concurrency: 0");
    match Config::parse(&none_at_once, observer.clone()).await {
        Err(error @ ConfigError::Concurrency(0)) => {
            assert_eq!(
                error.to_string(),
                "concurrency: 0 is not between 1 and 1024"
            );
        }
        Err(other) => panic!("concurrency: 0 refused for another reason: {other}"),
        Ok(_) => panic!("concurrency: 0 accepted"),
    }
    let csi = std::fs::read_to_string(deploy.join("csi-sidecar/operator.yaml"))
        .expect("deploy/csi-sidecar/operator.yaml");
    match Config::parse(&csi, observer).await {
        Err(ConfigError::Driver { name, .. }) => assert_eq!(name, "csi"),
        Err(other) => panic!("deploy/csi-sidecar/operator.yaml: {other}"),
        Ok(_) => panic!("a CSI plugin answered on /csi/csi.sock on this machine"),
    }
}
