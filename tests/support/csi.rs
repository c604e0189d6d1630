//! A real CSI plugin process for the `csi` driver's tests: the Kubernetes project's mock CSI
//! plugin (`k8s.io/kubernetes/test/e2e/storage/drivers/csi-test/mock`, the plugin behind the e2e
//! suite's `csi-mock` driver), built by `hack/build-controlplane.sh` as `.local/bin/csi-mock-plugin`.
//! Each [`CsiPlugin`] is its own process with its own socket in a temporary directory, killed on
//! drop.
//!
//! What the plugin is like, as far as the driver can tell:
//! - Its only node id is its driver name ([`CsiPlugin::node`]); a publish to any other node is
//!   `NOT_FOUND`, an unpublish from another node is `NOT_FOUND` too.
//! - It advertises `PUBLISH_UNPUBLISH_VOLUME`, `PUBLISH_READONLY`, `GET_VOLUME`, `LIST_VOLUMES` and
//!   `LIST_VOLUMES_PUBLISHED_NODES`, but its `ControllerGetVolume` and `ListVolumes` list its node as
//!   published for *every* volume, published or not: a superset, which the spec allows. Its real
//!   record of `ControllerPublishVolume` is the volume context key `<node>/dev`, which
//!   [`CsiPlugin::controller_published_nodes`] reads.
//! - It starts with volumes "1", "2" and "3"; [`CsiPlugin::create_volume`] makes more.

use hyper_util::rt::TokioIo;
use safe_detach::driver::csi::CsiConfig;
use safe_detach::driver::csi::proto;
use safe_detach::driver::csi::proto::controller_client::ControllerClient;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint, Uri};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The plugin's name, and so its node id.
pub const DRIVER_NAME: &str = "mock.csi.safedetach.io";
const START_TIMEOUT: Duration = Duration::from_secs(20);

static BUILT: OnceCell<()> = OnceCell::const_new();

/// Runs `hack/build-controlplane.sh --with-test-programs` once per test process; it returns at
/// once when the binaries are up to date, and takes minutes on a cold Go cache.
pub async fn ensure_built() {
    BUILT
        .get_or_init(|| async {
            let status = Command::new(Path::new(REPO).join("hack/build-controlplane.sh"))
                .arg("--with-test-programs")
                .status()
                .await
                .expect("run hack/build-controlplane.sh");
            assert!(
                status.success(),
                "hack/build-controlplane.sh failed: {status}"
            );
        })
        .await;
}

/// A program built into `.local/bin`.
pub fn local_bin(name: &str) -> PathBuf {
    Path::new(REPO).join(".local/bin").join(name)
}

/// A running plugin; killed on drop.
pub struct CsiPlugin {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl CsiPlugin {
    /// Starts a plugin with no volumes published and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`CsiPlugin::start`] with more flags, e.g. `--attach-limit=2` (volumes per node, which its
    /// `NodeGetInfo` reports and its publish enforces with `RESOURCE_EXHAUSTED`).
    pub async fn start_with(flags: &[&str]) -> Self {
        ensure_built().await;
        let dir = tempfile::Builder::new()
            .prefix("csi-plugin-")
            .tempdir()
            .expect("temporary directory");
        let socket = dir.path().join("csi.sock");
        let log = std::fs::File::create(dir.path().join("plugin.log")).expect("plugin log");
        let child = Command::new(local_bin("csi-mock-plugin"))
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--drivername={DRIVER_NAME}"))
            .arg("--v=5")
            .args(flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("plugin log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start csi-mock-plugin");
        let mut plugin = Self { child, dir, socket };
        plugin.wait_ready().await;
        plugin
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("plugin status") {
                panic!("csi-mock-plugin exited ({status}): {}", self.log());
            }
            if let Ok(channel) = channel(&self.socket).await {
                let probe = proto::identity_client::IdentityClient::new(channel)
                    .probe(proto::ProbeRequest {})
                    .await;
                if probe.is_ok() {
                    return;
                }
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "csi-mock-plugin did not answer within {START_TIMEOUT:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The plugin's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The only node id the plugin publishes to.
    pub fn node(&self) -> &'static str {
        DRIVER_NAME
    }

    /// A directory that lives as long as the plugin.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The driver configuration that reaches this plugin directly.
    pub fn config(&self) -> CsiConfig {
        CsiConfig {
            endpoint: PathBuf::from(format!("unix://{}", self.socket.display())),
            trust_published_nodes: true,
        }
    }

    /// What the plugin logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// Creates a volume and returns its id.
    pub async fn create_volume(&self, name: &str) -> String {
        let request = proto::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 1 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability()],
            ..Default::default()
        };
        let reply = self
            .controller()
            .await
            .create_volume(request)
            .await
            .expect("CreateVolume")
            .into_inner();
        reply
            .volume
            .expect("CreateVolume returns the volume")
            .volume_id
    }

    /// The nodes the plugin's own record says the volume is controller-published to (see
    /// [`published_nodes`]).
    pub async fn controller_published_nodes(&self, volume_id: &str) -> BTreeSet<String> {
        published_nodes(&self.socket, volume_id)
            .await
            .expect("ControllerGetVolume")
    }

    /// How the plugin exited, if it did.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(channel(&self.socket).await.expect("connect to the plugin"))
    }

    /// Stops the plugin now (the socket stays, dead).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The nodes the plugin's own record says the volume is controller-published to, asked on the
/// plugin's `socket`: the volume context keys `<node>/dev` that its `ControllerPublishVolume` sets
/// and its `ControllerUnpublishVolume` removes. (Its `published_node_ids` cannot tell.)
pub async fn published_nodes(socket: &Path, volume_id: &str) -> Result<BTreeSet<String>, String> {
    let channel = channel(socket)
        .await
        .map_err(|e| format!("connect to the plugin: {e}"))?;
    let reply = ControllerClient::new(channel)
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: volume_id.to_owned(),
        })
        .await
        .map_err(|e| format!("ControllerGetVolume {volume_id}: {e}"))?
        .into_inner();
    let volume = reply
        .volume
        .ok_or_else(|| format!("ControllerGetVolume {volume_id} returned no volume"))?;
    Ok(volume
        .volume_context
        .iter()
        .filter(|(_, device)| !device.is_empty())
        .filter_map(|(key, _)| key.strip_suffix("/dev").map(str::to_owned))
        .collect())
}

/// The capability the tests create volumes with: mount, single node writer.
pub fn mount_capability() -> proto::VolumeCapability {
    use proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    proto::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// A gRPC channel over a unix socket.
pub async fn channel(socket: &Path) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    let stream = UnixStream::connect(socket).await?;
    let stream = Arc::new(Mutex::new(Some(stream)));
    let channel = Endpoint::from_static("http://csi.plugin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = stream.lock().expect("stream slot").take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("connection already used"))
            }
        }))
        .await?;
    Ok(channel)
}
