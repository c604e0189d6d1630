//! The control plane the end-to-end tests run against: one per test process, shared by all its
//! tests, with this tree's CRDs installed.
//!
//! By default it is the local control plane of `hack/cluster.sh` (started when not running).
//! Set `SAFE_DETACH_KUBECONFIG` to an admin kubeconfig to use an existing cluster instead; nothing
//! is started then. Either way the CRDs come from `safe_detach::api::crds()`, so the tests exercise
//! the types in this tree rather than whatever the cluster held before.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, GetParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, Resource, ResourceExt};
use safe_detach::api::{Volume, VolumeAttachment};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::fmt::Debug;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::OnceCell;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const FIELD_MANAGER: &str = "safe-detach-tests";
const CRD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a wait may take before the test fails: generous, since a reconcile can wait for a
/// driver deadline, a stuck clock and a backoff in a row.
pub const WAIT: Duration = Duration::from_secs(40);
/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(50);

/// The admin kubeconfig, set once the cluster is up and the CRDs are served. Only the path is
/// shared: each `#[tokio::test]` has its own runtime, and a client must not outlive the runtime
/// it was made in.
static ADMIN_KUBECONFIG: OnceCell<PathBuf> = OnceCell::const_new();

/// The verbs of `apiserver_request_total` that write.
pub const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// The admin kubeconfig of the test cluster. The first call in a process brings the cluster up
/// and installs the CRDs.
pub async fn admin_kubeconfig() -> &'static Path {
    ADMIN_KUBECONFIG
        .get_or_init(|| async {
            let kubeconfig = match std::env::var_os("SAFE_DETACH_KUBECONFIG") {
                Some(path) => PathBuf::from(path),
                None => {
                    start_local_cluster().await;
                    Path::new(REPO).join(".local/kubeconfig")
                }
            };
            install_crds(client_from(&kubeconfig).await).await;
            kubeconfig
        })
        .await
}

/// The kubeconfig of the operator's identity, `system:serviceaccount:safe-detach:safe-detach`.
/// `hack/cluster.sh` writes it, so it exists only for the local control plane, not for a cluster
/// named by `SAFE_DETACH_KUBECONFIG`.
pub async fn operator_kubeconfig() -> PathBuf {
    admin_kubeconfig().await;
    Path::new(REPO).join(".local/cluster/operator.kubeconfig")
}

/// A client with the cluster's admin rights.
pub async fn admin_client() -> Client {
    client_from(admin_kubeconfig().await).await
}

/// A client with the operator's identity, which has only the rights RBAC bindings give it.
/// Local control plane only; see [`operator_kubeconfig`].
pub async fn operator_client() -> Client {
    client_from(&operator_kubeconfig().await).await
}

/// A client of the admin impersonating `user`, which has only the rights bindings give it.
pub async fn client_as(user: &str) -> Client {
    let kubeconfig = admin_kubeconfig().await;
    let mut config = config_from(kubeconfig).await;
    config.auth_info.impersonate = Some(user.to_owned());
    Client::try_from(config).expect("build a Kubernetes client")
}

/// A name no other test of this run or of an earlier run uses, so tests run in parallel on one
/// cluster and a rerun does not trip over objects a crashed run left behind.
pub fn unique_name(prefix: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // The standard library seeds its hasher keys from the OS: a random run id without a crate.
    let run =
        RUN.get_or_init(|| format!("{:08x}", RandomState::new().build_hasher().finish() as u32));
    format!("{prefix}-{run}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs kubectl as the cluster's admin and returns its standard output; panics with its standard
/// error when it fails. Uses `.local/bin/kubectl`, built at the apiserver's version, when present,
/// else `kubectl` on PATH.
pub async fn kubectl(args: &[&str]) -> String {
    let kubeconfig = admin_kubeconfig().await;
    let local = Path::new(REPO).join(".local/bin/kubectl");
    let program = if local.exists() {
        local
    } else {
        PathBuf::from("kubectl")
    };
    // A discovery cache from before the CRDs were installed or changed would hide them.
    let cache = tempfile::tempdir().expect("create a kubectl cache directory");
    let output = Command::new(&program)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache.path())
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "kubectl {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
}

/// The objects a test creates, named uniquely and deleted when the test ends, passed or failed.
///
/// Finalizers are stripped before the delete: in tests without an operator nothing would ever
/// release them. A test whose operator must release them deletes its objects itself first.
#[derive(Default)]
pub struct TestObjects {
    volumes: Vec<String>,
    attachments: Vec<String>,
}

impl TestObjects {
    /// A unique name for a Volume, deleted with this guard.
    pub fn volume(&mut self, prefix: &str) -> String {
        let name = unique_name(prefix);
        self.volumes.push(name.clone());
        name
    }

    /// A unique name for a VolumeAttachment, deleted with this guard.
    pub fn attachment(&mut self, prefix: &str) -> String {
        let name = unique_name(prefix);
        self.attachments.push(name.clone());
        name
    }
}

impl Drop for TestObjects {
    fn drop(&mut self) {
        let attachments = std::mem::take(&mut self.attachments);
        let volumes = std::mem::take(&mut self.volumes);
        let Some(kubeconfig) = ADMIN_KUBECONFIG.get() else {
            return; // the test never reached the cluster, so it created nothing
        };
        // `drop` cannot await, and the test's runtime may be single-threaded or unwinding:
        // delete from a thread with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a runtime for clean-up");
            runtime.block_on(async {
                let client = client_from(kubeconfig).await;
                let attachment_api = Api::<VolumeAttachment>::all(client.clone());
                for name in &attachments {
                    delete(&attachment_api, name).await;
                }
                let volume_api = Api::<Volume>::all(client);
                for name in &volumes {
                    delete(&volume_api, name).await;
                }
            })
        })
        .join();
        // A second panic while the test unwinds would abort and hide the test's own failure.
        if cleanup.is_err() && !std::thread::panicking() {
            panic!("clean-up of the test's objects failed");
        }
    }
}

/// Deletes an object and strips its finalizers; an object already gone is fine.
async fn delete<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    // Delete first: once an object is being deleted, no finalizer can be added back, so the
    // strip that follows is the last word even if an operator still watches it.
    let strip = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
    // A connection cut off on a busy machine is tried again: a long campaign must not end on
    // one lost request of its clean-up.
    for attempt in 1.. {
        let result = async {
            api.delete(name, &DeleteParams::default()).await?;
            api.patch(name, &PatchParams::default(), &strip).await?;
            Ok::<_, kube::Error>(())
        };
        match result.await {
            Ok(()) => return,
            Err(kube::Error::Api(status)) if status.is_not_found() => return,
            Err(e @ kube::Error::Api(_)) => panic!("delete {name}: {e}"),
            Err(e) if attempt >= CLEANUP_ATTEMPTS => {
                panic!("delete {name}: {e} (after {attempt} attempts)")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500 * attempt)).await,
        }
    }
}

/// How many times the clean-up sends a request that did not get through.
const CLEANUP_ATTEMPTS: u64 = 6;

/// Runs `hack/cluster.sh up`, which returns at once when the control plane is already running
/// and otherwise builds what is missing and starts it.
async fn start_local_cluster() {
    let script = Path::new(REPO).join("hack/cluster.sh");
    let output = Command::new(&script)
        .arg("up")
        .current_dir(REPO)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "hack/cluster.sh up failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Applies the CRDs server-side, then waits until the apiserver serves them and publishes their
/// schemas (which `kubectl explain` reads, and which lag Established by about half a second).
async fn install_crds(client: Client) {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    for crd in safe_detach::api::crds() {
        let name = crd.name_any();
        api.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
    }
    for crd in safe_detach::api::crds() {
        let name = crd.name_any();
        let ready = async {
            await_condition(api.clone(), &name, conditions::is_crd_established())
                .await
                .unwrap_or_else(|e| panic!("watch CRD {name}: {e}"));
            await_schema_published(&client, &crd).await;
        };
        tokio::time::timeout(CRD_READY_TIMEOUT, ready)
            .await
            .unwrap_or_else(|_| {
                panic!("CRD {name} not Established and published after {CRD_READY_TIMEOUT:?}")
            });
    }
}

/// Polls the group-version's OpenAPI document until it carries the CRD's kind.
async fn await_schema_published(client: &Client, crd: &CustomResourceDefinition) {
    let group = &crd.spec.group;
    for version in &crd.spec.versions {
        let gvk = json!({ "group": group, "version": version.name, "kind": crd.spec.names.kind });
        let documents = kube::core::Request::new(format!("/openapi/v3/apis/{group}"));
        loop {
            let request = documents
                .get(&version.name, &GetParams::default())
                .expect("an OpenAPI request");
            // Until the first CRD of a group is published, its document does not exist (404).
            if let Ok(document) = client.request::<Value>(request).await
                && publishes(&document, &gvk)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn publishes(document: &Value, gvk: &Value) -> bool {
    let schemas = document["components"]["schemas"].as_object();
    schemas
        .into_iter()
        .flat_map(|schemas| schemas.values())
        .any(|schema| {
            let gvks = schema["x-kubernetes-group-version-kind"].as_array();
            gvks.is_some_and(|gvks| gvks.contains(gvk))
        })
}

async fn client_from(kubeconfig: &Path) -> Client {
    Client::try_from(config_from(kubeconfig).await).expect("build a Kubernetes client")
}

async fn config_from(kubeconfig: &Path) -> Config {
    let read = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", kubeconfig.display()));
    Config::from_custom_kubeconfig(read, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("load kubeconfig {}: {e}", kubeconfig.display()))
}

/// Polls `check` every `poll` until it returns `Some`, failing with `what` after `wait`.
pub async fn eventually<T, F, Fut>(what: &str, wait: Duration, poll: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + wait;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out after {wait:?}: {what}"
        );
        tokio::time::sleep(poll).await;
    }
}
