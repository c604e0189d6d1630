//! A benchmark peer: the Kubernetes CSI external-attacher (`csi-attacher`, the sidecar that serves
//! storage.k8s.io VolumeAttachments for a CSI driver), built by `hack/build-peers.sh` from the Go
//! module in `peers/` as `.local/bin/csi-attacher`, and the objects it works on.
//!
//! [`ExternalAttacher`] is the process, run outside a cluster against a CSI socket (the mock
//! plugin's, [`CsiPlugin::socket`]) and a kubeconfig. [`PeerObjects`] makes what it needs for N
//! volumes, all labelled with one run's [`RUN_LABEL`] value:
//! - a CSINode for the run's node, mapping the driver to the plugin's node id (the attacher reads
//!   the node id from there; there is no Node object and no kubelet);
//! - PersistentVolumes with `spec.csi {driver, volumeHandle}` (ReadWriteOnce, Filesystem, Retain);
//! - storage.k8s.io/v1 VolumeAttachments (`attacher` = the driver, `source.persistentVolumeName`,
//!   `nodeName` = the run's node).
//!
//! The mock plugin publishes only volumes it knows: make them first with
//! [`create_plugin_volumes`] and use the ids it returns as volume handles.
//!
//! What the attacher does with them: on a VolumeAttachment, it adds its finalizer
//! `external-attacher/<driver with . and / as ->` to the PV and to the attachment, annotates the
//! attachment with the node id (`csi.alpha.kubernetes.io/node-id`), calls
//! `ControllerPublishVolume` and writes `status.attached: true`. On the attachment's deletion it
//! calls `ControllerUnpublishVolume` and then removes its finalizer, so the attachment is gone;
//! a deleted PV loses the attacher's finalizer once no attachment names it.
//!
//! No kube-controller-manager runs on the local control plane, so nothing but the attacher and
//! [`PeerObjects::cleanup`] ever removes a finalizer: the PVs' `kubernetes.io/pv-protection`
//! (which the apiserver's admission adds) stays until the clean-up strips it.
//!
//! Every attacher for one driver name acts on every VolumeAttachment of that driver in the
//! cluster, whatever its labels: two attachers for the same driver must not run at once (nor
//! beside a kube-controller-manager's view of the same objects). The run label keeps the objects
//! of runs apart for counting and clean-up, not for the attachers.

use super::cluster::{admin_client, unique_name};
use super::csi::CsiPlugin;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::{
    CSINode, CSINodeDriver, CSINodeSpec, VolumeAttachment, VolumeAttachmentSource,
    VolumeAttachmentSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The label every object of a [`PeerObjects`] run carries; its value is the run's id.
pub const RUN_LABEL: &str = "safedetach.io/peer-run";
/// How long [`ExternalAttacher::start`] waits for the attacher to reach the plugin and start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The line the attacher logs (at the default verbosity) once it has probed the plugin, read its
/// name and capabilities, and starts its controller; its informers sync right after.
const STARTED_LINE: &str = "Starting CSI attacher";

/// The flags [`ExternalAttacher::start`] always passes, besides `--kubeconfig` and
/// `--csi-address`: no leader election (one attacher, outside a cluster, no Lease), and each
/// `ControllerPublishVolume` / `ControllerUnpublishVolume` given 15 s (the attacher's own default,
/// written out so that a later release cannot change it under the figures).
///
/// Everything else stays at the attacher's defaults (v4.13.0): `--worker-threads=10`,
/// `--kube-api-qps=5`, `--kube-api-burst=10`, `--resync=10m`, `--reconcile-sync=1m` (it lists the
/// plugin's published volumes then, as the mock advertises `LIST_VOLUMES_PUBLISHED_NODES`),
/// `--retry-interval-start=1s`, `--retry-interval-max=5m`, log verbosity 0, no metrics endpoint.
/// Flags given later, in `extra_flags`, override these.
pub const DEFAULT_FLAGS: &[&str] = &["--leader-election=false", "--timeout=15s"];

/// The "tuned" attacher of the benchmarks: more workers and a client-side rate limit that no
/// longer binds (the defaults allow 5 requests a second, bursts of 10, and each attach costs the
/// attacher three writes).
pub const TUNED: &[&str] = &[
    "--worker-threads=64",
    "--kube-api-qps=500",
    "--kube-api-burst=1000",
];

static BUILT: OnceCell<()> = OnceCell::const_new();

/// Runs `hack/build-peers.sh` once per test process; it returns at once when `csi-attacher` is up
/// to date, and takes minutes on a cold Go cache.
pub async fn ensure_built() {
    BUILT
        .get_or_init(|| async {
            let script = Path::new(REPO).join("hack/build-peers.sh");
            let status = Command::new(&script)
                .status()
                .await
                .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
            assert!(status.success(), "hack/build-peers.sh failed: {status}");
        })
        .await;
}

/// A running `csi-attacher`; killed on drop. Its log (standard output and error) is in a
/// temporary directory that lives as long as it does.
pub struct ExternalAttacher {
    child: Child,
    pid: u32,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl ExternalAttacher {
    /// Starts `.local/bin/csi-attacher` (building it first if needed) for the plugin at
    /// `csi_socket`, under `kubeconfig`'s identity, with [`DEFAULT_FLAGS`] and then `extra_flags`
    /// (e.g. [`TUNED`], `--v=5`), and waits until it has reached the plugin and started its
    /// controller. The identity needs what the attacher's own RBAC grants (upstream
    /// `deploy/kubernetes/rbac.yaml`): get/list/watch/patch on persistentvolumes and
    /// volumeattachments, patch on volumeattachments/status, get/list/watch on csinodes; the admin
    /// kubeconfig has all of it.
    pub async fn start(csi_socket: &Path, kubeconfig: &Path, extra_flags: &[&str]) -> Self {
        ensure_built().await;
        let dir = tempfile::Builder::new()
            .prefix("csi-attacher-")
            .tempdir()
            .expect("temporary directory");
        let log = std::fs::File::create(dir.path().join("attacher.log")).expect("attacher log");
        let mut args = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--csi-address={}", csi_socket.display()),
        ];
        args.extend(DEFAULT_FLAGS.iter().map(|flag| flag.to_string()));
        args.extend(extra_flags.iter().map(|flag| flag.to_string()));
        let child = Command::new(binary())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("attacher log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary().display()));
        let pid = child.id().expect("a running child has an id");
        let mut attacher = Self {
            child,
            pid,
            args,
            dir,
        };
        attacher.wait_started().await;
        attacher
    }

    async fn wait_started(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("attacher status") {
                panic!("csi-attacher exited ({status}):\n{}", self.log());
            }
            if self.log().contains(STARTED_LINE) {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "csi-attacher did not start within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, for CPU and memory readings from `/proc`.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The arguments it was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file it logs to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("attacher.log")
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it now.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// `.local/bin/csi-attacher`.
pub fn binary() -> PathBuf {
    Path::new(REPO).join(".local/bin/csi-attacher")
}

/// Creates `count` volumes on the plugin, named `<prefix>-<i>`, at most `concurrency` at a time,
/// and returns their ids (the PVs' volume handles) in order.
pub async fn create_plugin_volumes(
    plugin: &CsiPlugin,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Vec<String> {
    stream::iter(0..count)
        .map(|i| async move { plugin.create_volume(&format!("{prefix}-{i}")).await })
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// One run's storage.k8s.io objects for one driver: a CSINode, PVs and VolumeAttachments, all
/// labelled `RUN_LABEL=<run>`. Dropping it cleans up as [`cleanup`](Self::cleanup) does; drop the
/// attacher first (declare it after this), or it may act on the objects while they go.
pub struct PeerObjects {
    client: Client,
    run: String,
    driver: String,
    node: String,
    /// Every VolumeAttachment this run created.
    created: Mutex<BTreeSet<String>>,
    cleaned: bool,
}

impl PeerObjects {
    /// Starts a run for `driver` (the attacher's name, which it reads from the plugin) whose
    /// plugin knows the node as `node_id` ([`CsiPlugin::node`] for the mock), and creates its
    /// CSINode: a node named after the run, with the driver registered under that id.
    pub async fn create(driver: &str, node_id: &str) -> Self {
        let client = admin_client().await;
        let run = unique_name("peer");
        let node = format!("{run}-node");
        let csinode = CSINode {
            metadata: meta(&node, &run),
            spec: CSINodeSpec {
                drivers: vec![CSINodeDriver {
                    name: driver.to_owned(),
                    node_id: node_id.to_owned(),
                    ..Default::default()
                }],
            },
        };
        Api::<CSINode>::all(client.clone())
            .create(&PostParams::default(), &csinode)
            .await
            .unwrap_or_else(|e| panic!("create CSINode {node}: {e}"));
        Self {
            client,
            run,
            driver: driver.to_owned(),
            node,
            created: Mutex::default(),
            cleaned: false,
        }
    }

    /// The run's id, the value of [`RUN_LABEL`] on all its objects.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The label selector of the run's objects.
    pub fn selector(&self) -> String {
        format!("{RUN_LABEL}={}", self.run)
    }

    /// The node name the attachments name (and the CSINode's name).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The driver, the attachments' `spec.attacher`.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The PV for volume `i`: `<run>-pv-<i>`.
    pub fn pv_name(&self, i: usize) -> String {
        format!("{}-pv-{i}", self.run)
    }

    /// The VolumeAttachment for volume `i`: `<run>-va-<i>`.
    pub fn attachment_name(&self, i: usize) -> String {
        format!("{}-va-{i}", self.run)
    }

    /// Creates a PV for each volume handle (volume `i` is `handles[i]`), at most `concurrency` at
    /// a time, and returns their names.
    pub async fn create_pvs(&self, handles: &[String], concurrency: usize) -> Vec<String> {
        let api = Api::<PersistentVolume>::all(self.client.clone());
        let api = &api;
        stream::iter(handles.iter().enumerate())
            .map(|(i, handle)| async move {
                let name = self.pv_name(i);
                let pv = self.pv(&name, handle);
                api.create(&PostParams::default(), &pv)
                    .await
                    .unwrap_or_else(|e| panic!("create PersistentVolume {name}: {e}"));
                name
            })
            .buffered(concurrency.max(1))
            .collect()
            .await
    }

    /// Creates a VolumeAttachment of each PV to the run's node (attachment `i` for `pvs[i]`), at
    /// most `concurrency` at a time, and returns their names.
    pub async fn create_attachments(&self, pvs: &[String], concurrency: usize) -> Vec<String> {
        let api = Api::<VolumeAttachment>::all(self.client.clone());
        let api = &api;
        stream::iter(pvs.iter().enumerate())
            .map(|(i, pv)| async move {
                let name = self.attachment_name(i);
                let attachment = self.attachment(&name, pv);
                self.created.lock().unwrap().insert(name.clone());
                api.create(&PostParams::default(), &attachment)
                    .await
                    .unwrap_or_else(|e| panic!("create VolumeAttachment {name}: {e}"));
                name
            })
            .buffered(concurrency.max(1))
            .collect()
            .await
    }

    /// [`create_pvs`](Self::create_pvs), then [`create_attachments`](Self::create_attachments) for
    /// them: returns the attachments' names.
    pub async fn create_volumes(&self, handles: &[String], concurrency: usize) -> Vec<String> {
        let pvs = self.create_pvs(handles, concurrency).await;
        self.create_attachments(&pvs, concurrency).await
    }

    /// The run's VolumeAttachments as the apiserver has them now.
    pub async fn list_attachments(&self) -> Vec<VolumeAttachment> {
        let api = Api::<VolumeAttachment>::all(self.client.clone());
        api.list(&ListParams::default().labels(&self.selector()))
            .await
            .expect("list VolumeAttachments")
            .items
    }

    /// The run's PersistentVolumes as the apiserver has them now.
    pub async fn list_pvs(&self) -> Vec<PersistentVolume> {
        let api = Api::<PersistentVolume>::all(self.client.clone());
        api.list(&ListParams::default().labels(&self.selector()))
            .await
            .expect("list PersistentVolumes")
            .items
    }

    /// How many of the run's VolumeAttachments have `status.attached == true`.
    pub async fn count_attached(&self) -> usize {
        self.list_attachments()
            .await
            .iter()
            .filter(|va| va.status.as_ref().is_some_and(|status| status.attached))
            .count()
    }

    /// How many of the VolumeAttachments this run created no longer exist.
    pub async fn count_gone(&self) -> usize {
        let present: BTreeSet<String> = self
            .list_attachments()
            .await
            .iter()
            .map(|va| va.name_any())
            .collect();
        let created = self.created.lock().unwrap();
        created.difference(&present).count()
    }

    /// Attach errors the attacher wrote into the run's attachments, by attachment name.
    pub async fn attach_errors(&self) -> BTreeMap<String, String> {
        self.list_attachments()
            .await
            .into_iter()
            .filter_map(|va| {
                let error = va.status.as_ref()?.attach_error.as_ref()?.message.clone();
                Some((va.name_any(), error.unwrap_or_default()))
            })
            .collect()
    }

    /// Deletes the given VolumeAttachments, at most `concurrency` at a time (already gone is
    /// fine). The attacher removes its finalizer after `ControllerUnpublishVolume`; then they are
    /// gone ([`count_gone`](Self::count_gone)).
    pub async fn delete_attachments(&self, names: &[String], concurrency: usize) {
        let api = Api::<VolumeAttachment>::all(self.client.clone());
        let api = &api;
        stream::iter(names)
            .map(|name| async move {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.is_not_found() => {}
                    Err(e) => panic!("delete VolumeAttachment {name}: {e}"),
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect::<()>()
            .await;
    }

    /// Deletes everything the run made (its label's VolumeAttachments, PVs and CSINode) and strips
    /// the finalizers nothing else would remove here. Idempotent. Stop the attacher first.
    pub async fn cleanup(&mut self) {
        cleanup(&self.client, &self.selector()).await;
        self.cleaned = true;
    }

    fn pv(&self, name: &str, handle: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: meta(name, &self.run),
            spec: Some(PersistentVolumeSpec {
                capacity: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("1Mi".to_owned()),
                )])),
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                persistent_volume_reclaim_policy: Some("Retain".to_owned()),
                volume_mode: Some("Filesystem".to_owned()),
                csi: Some(CSIPersistentVolumeSource {
                    driver: self.driver.clone(),
                    volume_handle: handle.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn attachment(&self, name: &str, pv: &str) -> VolumeAttachment {
        VolumeAttachment {
            metadata: meta(name, &self.run),
            spec: VolumeAttachmentSpec {
                attacher: self.driver.clone(),
                node_name: self.node.clone(),
                source: VolumeAttachmentSource {
                    persistent_volume_name: Some(pv.to_owned()),
                    ..Default::default()
                },
            },
            status: None,
        }
    }
}

impl Drop for PeerObjects {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let selector = self.selector();
        // `drop` cannot await, and a client must not outlive the runtime it was made in: clean up
        // from a thread with a runtime and a client of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a runtime for clean-up");
            runtime.block_on(async { cleanup(&admin_client().await, &selector).await })
        })
        .join();
        if cleanup.is_err() && !std::thread::panicking() {
            panic!("clean-up of the peer run's objects failed");
        }
    }
}

fn meta(name: &str, run: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(BTreeMap::from([(RUN_LABEL.to_owned(), run.to_owned())])),
        ..Default::default()
    }
}

/// Deletes the objects `selector` names, attachments first, and strips their finalizers.
async fn cleanup(client: &Client, selector: &str) {
    delete_all(&Api::<VolumeAttachment>::all(client.clone()), selector).await;
    delete_all(&Api::<PersistentVolume>::all(client.clone()), selector).await;
    delete_all(&Api::<CSINode>::all(client.clone()), selector).await;
}

async fn delete_all<K>(api: &Api<K>, selector: &str)
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let list = ListParams::default().labels(selector);
    match api.delete_collection(&DeleteParams::default(), &list).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => panic!("delete {selector}: {e}"),
    }
    // Once deleted, nothing can add a finalizer back: this strip is the last word.
    let strip = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
    let remaining = api.list_metadata(&list).await.expect("list what remains");
    stream::iter(remaining.items)
        .map(|object| {
            let strip = &strip;
            async move {
                let name = object.name_any();
                match api.patch(&name, &PatchParams::default(), strip).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                    Err(e) => Err(format!("strip the finalizers of {name}: {e}")),
                }
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
