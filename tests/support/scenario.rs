//! One end-to-end scenario of the operator on the nbd driver: a real `qemu-storage-daemon`
//! (optionally behind the fault-injecting QMP proxy) and, through [`Harness`] (which it
//! dereferences to), the real operator binary managing one shard, the objects the test creates in
//! that shard and the ways a test waits for them; besides, the daemon's own lists read over QMP.
//!
//! The operator's API traffic can go through an [`ApiProxy`], which records its writes and cuts
//! or delays its view of the apiserver on demand; a second replica of the operator can join it,
//! behind a proxy of its own, for leader-election scenarios.
//!
//! On drop the operator is killed before the objects are deleted (so it cannot put a finalizer
//! back), and the daemon goes last.

use super::api_proxy::ApiProxy;
use super::cluster::{WRITE_VERBS, unique_name};
use super::operator::{Operator, Options, SHARD_LABEL};
use super::qmp_proxy::QmpProxy;
use super::qsd::{NbdClient, Qsd};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use safe_detach::api::{Volume, VolumeAttachment, find_condition};
use safe_detach::config::{ConfigFile, DriverEntry};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::time::Instant;

// Re-exported for the tests of every backend, which use parts of them.
use super::harness::apply;
#[allow(unused_imports)]
pub use super::harness::{
    Harness, LEASE_NAMESPACE, POLL, RESYNC, STUCK_AFTER, SeenEvent, WAIT, attached,
    describe_events, events_in, phase, show,
};

/// The election identity of the scenario's operator, when it runs in one
/// (`Setup::leader_election`).
pub const FIRST_REPLICA: &str = "replica-1";

/// Scenarios normally run side by side; one that must observe the whole control plane quiet
/// (no other test's operator writing) takes this for writing, which waits for the others to end
/// and keeps new ones from starting.
static SIDE_BY_SIDE: RwLock<()> = RwLock::const_new(());

/// How a scenario is set up.
pub struct Setup {
    /// Each driver call's deadline, as the operator's configuration writes it.
    pub deadline: &'static str,
    /// Put the fault-injecting QMP proxy between the operator and the daemon.
    pub via_proxy: bool,
    /// Do not run side by side with the other scenarios: the test will call
    /// [`Scenario::exclusive`] and must not hold a shared turn meanwhile.
    pub exclusive: bool,
    /// Route the operator's API requests through an [`ApiProxy`], to count its writes
    /// ([`Scenario::api`]).
    pub count_writes: bool,
    /// Route the operator's API requests through an [`ApiProxy`], to lag or cut its view of the
    /// apiserver ([`Scenario::api`]).
    pub api_proxy: bool,
    /// With `api_proxy`: the operator starts cut off from the apiserver (the proxy frozen before
    /// the operator's first request), until [`ApiProxy::thaw`].
    pub api_frozen: bool,
    /// Run the operator as one replica of a leader election (`--leader-elect`), identity
    /// [`FIRST_REPLICA`], for a Lease of the scenario's own that lasts this long (e.g. "4s");
    /// [`Scenario::second_operator`] starts another replica of the same election.
    pub leader_election: Option<&'static str>,
    /// Run the operator under this kubeconfig instead of its own identity (another user's
    /// rights, for instance); not with an [`ApiProxy`].
    pub kubeconfig: Option<PathBuf>,
    /// The operator's `kubeApiQps` and `kubeApiBurst`; unset, its defaults.
    pub api_rate: Option<(u32, u32)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            deadline: "2s",
            via_proxy: false,
            exclusive: false,
            count_writes: false,
            api_proxy: false,
            api_frozen: false,
            leader_election: None,
            kubeconfig: None,
            api_rate: None,
        }
    }
}

pub struct Scenario {
    /// The operator, the shard's objects and the ways to wait for them; dropped first, so that
    /// the operator is gone before the daemon.
    harness: Harness,
    /// The front of the operator's API requests (`Setup::api_proxy` or `Setup::count_writes`).
    pub api: Option<ApiProxy>,
    /// The operator's configuration file, as every replica of it gets it.
    config: String,
    /// The election's Lease (`Setup::leader_election`), and how long it lasts.
    election: Option<(String, &'static str)>,
    pub proxy: Option<QmpProxy>,
    pub qsd: Qsd,
    _turn: Option<RwLockReadGuard<'static, ()>>,
}

impl std::ops::Deref for Scenario {
    type Target = Harness;

    fn deref(&self) -> &Harness {
        &self.harness
    }
}

impl std::ops::DerefMut for Scenario {
    fn deref_mut(&mut self) -> &mut Harness {
        &mut self.harness
    }
}

impl Scenario {
    pub async fn start() -> Self {
        Self::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> Self {
        let turn = if setup.exclusive {
            None
        } else {
            Some(SIDE_BY_SIDE.read().await)
        };
        let qsd = Qsd::start();
        let proxy = if setup.via_proxy {
            Some(QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await)
        } else {
            None
        };
        let qmp_socket = proxy
            .as_ref()
            .map_or_else(|| qsd.qmp_socket(), |p| p.socket().to_owned());
        let shard = unique_name("shard");
        let config = operator_config(&qsd, &qmp_socket, setup.deadline, setup.api_rate);
        let election = setup
            .leader_election
            .map(|duration| (unique_name("lease"), duration));
        let args = election
            .as_ref()
            .map(|(lease, duration)| replica_args(lease, duration, FIRST_REPLICA))
            .unwrap_or_default();
        let api = if setup.count_writes || setup.api_proxy {
            let api = ApiProxy::start().await;
            if setup.api_frozen {
                api.freeze();
            }
            Some(api)
        } else {
            assert!(
                !setup.api_frozen,
                "only a proxy can be frozen: set api_proxy"
            );
            None
        };
        assert!(
            api.is_none() || setup.kubeconfig.is_none(),
            "an operator behind an ApiProxy runs under the proxy's kubeconfig"
        );
        let options = Options {
            args,
            kubeconfig: api
                .as_ref()
                .map(|api| api.kubeconfig.clone())
                .or(setup.kubeconfig),
            ..Options::default()
        };
        let operator = Operator::start_with(&shard, &config, options).await;
        let mut harness = Harness::new(operator, shard).await;
        if let Some((lease, _)) = &election {
            harness.clean_up("Lease", lease.clone());
        }
        Self {
            harness,
            api,
            config,
            election,
            proxy,
            qsd,
            _turn: turn,
        }
    }

    /// Waits until no other scenario runs, and keeps new ones from starting until the guard drops.
    pub async fn exclusive(&self) -> RwLockWriteGuard<'static, ()> {
        assert!(
            self._turn.is_none(),
            "a scenario that holds a shared turn cannot become exclusive"
        );
        SIDE_BY_SIDE.write().await
    }

    /// The front of the operator's API requests (`Setup::api_proxy` or `Setup::count_writes`).
    pub fn api(&self) -> &ApiProxy {
        self.api
            .as_ref()
            .expect("the scenario routes the operator's API requests through a proxy")
    }

    /// Starts another operator for this scenario's shard, daemon and configuration, behind an
    /// [`ApiProxy`] of its own. In a leader election (`Setup::leader_election`) it joins the same
    /// election as `identity`. The caller owns both; dropping the operator kills it.
    pub async fn second_operator(&self, identity: &str) -> (Operator, ApiProxy) {
        let api = ApiProxy::start().await;
        let args = self
            .election
            .as_ref()
            .map(|(lease, duration)| replica_args(lease, duration, identity))
            .unwrap_or_default();
        let options = Options {
            args,
            kubeconfig: Some(api.kubeconfig.clone()),
            ..Options::default()
        };
        let operator = Operator::start_with(&self.shard, &self.config, options).await;
        (operator, api)
    }

    /// Who holds the election's Lease now (`None`: nobody, or no Lease yet).
    pub async fn lease_holder(&self) -> Option<String> {
        self.lease()
            .await?
            .holder_identity
            .filter(|h| !h.is_empty())
    }

    /// When the election's Lease was last renewed (or acquired), by whoever holds it.
    pub async fn lease_renewed(&self) -> Option<jiff::Timestamp> {
        let spec = self.lease().await?;
        spec.renew_time.or(spec.acquire_time).map(|t| t.0)
    }

    /// The election's Lease as the apiserver has it now (`None`: no Lease yet).
    async fn lease(&self) -> Option<k8s_openapi::api::coordination::v1::LeaseSpec> {
        let (lease, _) = self
            .election
            .as_ref()
            .expect("the scenario runs a leader election");
        let leases = Api::<Lease>::namespaced(self.client.clone(), LEASE_NAMESPACE);
        leases
            .get_opt(lease)
            .await
            .unwrap_or_else(|e| panic!("read the Lease {lease}: {e}"))?
            .spec
    }

    /// Waits until `identity` holds the election's Lease.
    pub async fn wait_leader(&self, identity: &str, timeout: Duration) {
        let give_up = Instant::now() + timeout;
        loop {
            let holder = self.lease_holder().await;
            if holder.as_deref() == Some(identity) {
                return;
            }
            assert!(
                Instant::now() < give_up,
                "{identity} did not take the lease within {timeout:?} (holder: {holder:?})\n--- operator log (end) ---\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn proxy(&self) -> &QmpProxy {
        self.proxy.as_ref().expect("the scenario runs with a proxy")
    }

    /// Creates a raw image `handle` (unless it exists) and a Volume of the `nbd` driver for it in
    /// this scenario's shard. `spec` is merged over `{driver: nbd, volumeHandle: handle}`.
    pub async fn volume(&mut self, prefix: &str, handle: &str, spec: Value) -> String {
        let name = self.volume_name(prefix);
        self.create_volume(&name, handle, spec).await;
        name
    }

    /// Creates the Volume `name` as [`volume`](Self::volume) does.
    pub async fn create_volume(&self, name: &str, handle: &str, spec: Value) {
        if !self.qsd.image_dir().join(handle).exists() {
            self.qsd.create_image(handle);
        }
        let mut full = json!({ "driver": "nbd", "volumeHandle": handle });
        merge(&mut full, spec);
        self.apply_volume(name, full).await;
    }

    /// Exports the image `handle` for `node` behind the operator's back, exactly as the driver
    /// would have (same block node and export names), and returns the export's NBD URI.
    pub async fn export_out_of_band(&self, handle: &str, node: &str, read_only: bool) -> String {
        crate::support::qsd::export_out_of_band(&self.qsd.config(), handle, node, read_only)
            .await
            .unwrap_or_else(|e| panic!("export {handle} to {node} out of band: {e}"))
            .uri
    }

    /// Exports `handle` to `node` behind the operator's back, holds it open with an NBD client,
    /// and waits until Volume `volume` lists the connection as an orphan; returns the client and
    /// the Volume as it first listed it.
    pub async fn orphan_held_open(
        &self,
        volume: &str,
        handle: &str,
        node: &str,
    ) -> (NbdClient, Volume) {
        let uri = self.export_out_of_band(handle, node, false).await;
        let client = NbdClient::connect_uri(&uri)
            .await
            .expect("a client on the orphan");
        let listed = self
            .wait_volume(volume, &format!("listing {node} as an orphan"), |v| {
                v.status
                    .as_ref()
                    .is_some_and(|st| st.orphans.iter().any(|o| o.node == node))
            })
            .await;
        (client, listed)
    }

    /// Deletes an export behind the operator's back (mode `hard`: connected clients are cut off)
    /// and waits until the daemon no longer lists it.
    pub async fn delete_export_out_of_band(&self, handle: &str, node: &str) {
        let id = export_id(handle, node);
        self.qsd
            .qmp("block-export-del", json!({ "id": id, "mode": "hard" }))
            .await
            .unwrap_or_else(|e| panic!("block-export-del {id}: {e}"));
        let give_up = Instant::now() + WAIT;
        while self.qsd.export_ids().await.contains(&id) {
            assert!(Instant::now() < give_up, "export {id} stayed listed");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Checks that no operator manages objects outside the test shards — one started without a
    /// selector, such as the demo operator of `make run`. Such an operator acts on every test's
    /// objects too (it probes its own backend for them and writes its view into their status,
    /// fighting the test's operator), so counts of writes would mean nothing. Probed with a
    /// canary attachment in a shard no test serves: a finalizer on it is someone else's doing.
    pub async fn assert_no_foreign_operator(&mut self) {
        let name = self.unserved_attachment_name("canary");
        let object = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "VolumeAttachment",
            "metadata": { "name": name, "labels": { SHARD_LABEL: unique_name("unserved") } },
            "spec": { "volumeName": "canary-volume", "nodeName": "canary-node" },
        });
        self.attachments
            .patch(&name, &apply(), &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("create the canary {name}: {e}"));
        let give_up = Instant::now() + 2 * RESYNC;
        let mut finalizers = Vec::new();
        while Instant::now() < give_up && finalizers.is_empty() {
            tokio::time::sleep(POLL).await;
            let canary = self.get_attachment(&name).await.expect("the canary");
            finalizers = canary.metadata.finalizers.unwrap_or_default();
        }
        // Delete first, then strip: no finalizer can be added to an object being deleted.
        let _ = self
            .attachments
            .delete(&name, &DeleteParams::default())
            .await;
        let strip = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
        let _ = self
            .attachments
            .patch(&name, &PatchParams::default(), &strip)
            .await;
        assert!(
            finalizers.is_empty(),
            "another operator manages VolumeAttachments outside the test shards (it put {finalizers:?} on the canary {name}); it writes to every test's objects, so this measurement cannot be made. Stop it (e.g. `make stop` for the demo of `make run`) and run again."
        );
    }

    /// The admin's view of the apiserver's own metrics: the sum of `apiserver_request_total`
    /// over write verbs for `safedetach.io` Volumes and VolumeAttachments, by resource, subresource
    /// and verb.
    pub async fn apiserver_writes(&self) -> BTreeMap<String, f64> {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("a request");
        let text = self
            .client
            .request_text(request)
            .await
            .expect("GET /metrics");
        write_requests(&text)
    }
}

/// Sums `apiserver_request_total` for write verbs on this project's resources, keyed by
/// `resource/subresource verb`.
pub fn write_requests(metrics: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = labels
            .split("\",")
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        let verb = labels.get("verb").copied().unwrap_or_default();
        if labels.get("group") != Some(&"safedetach.io") || !WRITE_VERBS.contains(&verb) {
            continue;
        }
        let key = format!(
            "{}/{} {verb}",
            labels.get("resource").copied().unwrap_or_default(),
            labels.get("subresource").copied().unwrap_or_default()
        );
        *sums.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    sums
}

/// The operator's configuration file for a daemon reached at `qmp_socket`, with the short clocks
/// the tests run on.
fn operator_config(
    qsd: &Qsd,
    qmp_socket: &Path,
    deadline: &str,
    api_rate: Option<(u32, u32)>,
) -> String {
    ConfigFile {
        default_stuck_after: Some(format!("{}s", STUCK_AFTER.as_secs())),
        resync_interval: Some(format!("{}s", RESYNC.as_secs())),
        kube_api_qps: api_rate.map(|(qps, _)| qps),
        kube_api_burst: api_rate.map(|(_, burst)| burst),
        drivers: vec![DriverEntry::nbd("nbd", qsd.config_via(qmp_socket)).with_deadline(deadline)],
        ..ConfigFile::default()
    }
    .to_text()
    .expect("the daemon's paths are UTF-8")
}

/// The arguments of one replica in the election for `lease`.
fn replica_args(lease: &str, duration: &str, identity: &str) -> Vec<String> {
    [
        "--leader-elect",
        "--lease-name",
        lease,
        "--lease-duration",
        duration,
        "--identity",
        identity,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, over) => *base = over,
    }
}

/// The driver's id (and NBD name) of the export of `handle` for `node`.
pub fn export_id(handle: &str, node: &str) -> String {
    safe_detach::driver::nbd::export_id(handle, node)
}

/// The attachment's condition of `type_`, if it has one.
pub fn condition<'a>(attachment: &'a VolumeAttachment, type_: &str) -> Option<&'a Condition> {
    find_condition(&attachment.status.as_ref()?.conditions, type_)
}

/// The Volume's condition of `type_`, if it has one.
pub fn volume_condition<'a>(volume: &'a Volume, type_: &str) -> Option<&'a Condition> {
    find_condition(&volume.status.as_ref()?.conditions, type_)
}

/// Whether the condition `type_` has `status` (and, if given, `reason`).
pub fn has(condition: Option<&Condition>, status: &str, reason: Option<&str>) -> bool {
    condition.is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
}
