//! The operator under test: the real binary in its own process, under the operator's RBAC-bound
//! identity (deploy/rbac.yaml), managing only the objects labelled with its test's shard, so that
//! tests run side by side on one control plane without acting on each other's objects.

use super::cluster::{POLL, WAIT, eventually, kubectl, operator_kubeconfig};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

/// The label that assigns an object to one test's operator.
pub const SHARD_LABEL: &str = "safedetach.io/test-shard";

const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub struct Operator {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    shard: String,
    kubeconfig: PathBuf,
    args: Vec<String>,
    every_object: bool,
    http_address: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

/// How to start an operator beyond its shard and configuration, for [`Operator::start_with`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// More arguments for `safe-detach run`, e.g. `--leader-elect`.
    pub args: Vec<String>,
    /// Run under this kubeconfig instead of the operator's own identity.
    pub kubeconfig: Option<PathBuf>,
    /// Manage every object, as a replica without `--selector` does, not only the shard's: only
    /// where the cluster holds no other test's objects.
    pub every_object: bool,
}

impl Operator {
    /// Starts the operator with the given configuration file contents, for objects labelled
    /// `SHARD_LABEL=shard`.
    pub async fn start(shard: &str, config: &str) -> Self {
        Self::launch(shard, config, Options::default(), None).await
    }

    /// Starts the operator as [`start`](Self::start) does, with `options`, serving its endpoints
    /// on a fixed free port of the loopback: [`http_address`](Self::http_address) tells which.
    pub async fn start_with(shard: &str, config: &str, options: Options) -> Self {
        Self::launch(shard, config, options, Some(free_local_address())).await
    }

    async fn launch(
        shard: &str,
        config: &str,
        options: Options,
        http_address: Option<SocketAddr>,
    ) -> Self {
        install_rbac().await;
        let dir = tempfile::tempdir().expect("create the operator's directory");
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config).expect("write the operator's configuration");
        let kubeconfig = match options.kubeconfig {
            Some(kubeconfig) => kubeconfig,
            None => operator_kubeconfig().await,
        };
        let mut operator = Self {
            child: None,
            config: config_path,
            log: dir.path().join("operator.log"),
            shard: shard.to_owned(),
            kubeconfig,
            args: options.args,
            every_object: options.every_object,
            http_address,
            _dir: dir,
        };
        operator.spawn();
        operator
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the operator's log");
        let child = Command::new(operator_binary())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            // Tests run side by side: each operator serves its endpoints on a port of its own.
            .arg("--http-address")
            .arg(
                self.http_address
                    .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string()),
            )
            .args(
                (!self.every_object)
                    .then(|| {
                        [
                            "--selector".to_owned(),
                            format!("{SHARD_LABEL}={}", self.shard),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            // SAFE_DETACH_TEST_LOG widens the operator's log when a test is looked into.
            .env(
                "RUST_LOG",
                std::env::var("SAFE_DETACH_TEST_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share the log"))
            .stderr(log)
            .spawn()
            .expect("start the operator");
        self.child = Some(child);
    }

    /// Kills the operator with SIGKILL, as a crash would: nothing is finished or cleaned up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the operator with SIGTERM, as Kubernetes does, and waits until it has exited.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.send_sigterm()?;
        let mut child = self.child.take()?;
        Some(child.wait().expect("the operator's exit status"))
    }

    /// Sends SIGTERM without waiting for the exit; `None` if the operator is not running.
    pub fn send_sigterm(&self) -> Option<()> {
        let pid = self.id()?;
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        Some(())
    }

    /// Starts the operator again after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The process id, while it runs: to signal it without waiting for it.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs (it was started and has not exited, e.g. after losing its lease).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// How the process ended, if it has (it is not waited for).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// What the operator logged so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until `path` of the operator's endpoints answers 200, and returns the body.
    pub async fn wait_ok(&self, path: &str) -> String {
        let address = self.http_address();
        let what = format!("GET {path} answers 200");
        eventually(&what, WAIT, POLL, || async {
            match http_get(address, path).await {
                Some((200, body)) => Some(body),
                _ => None,
            }
        })
        .await
    }

    /// A scrape of `/metrics`, once it answers.
    pub async fn scrape(&self) -> Scrape {
        Scrape(self.wait_ok("/metrics").await)
    }

    /// Where the operator serves /metrics, /healthz and /readyz. Only for an operator started
    /// with [`start_with`](Self::start_with); [`start`](Self::start) lets it pick any port.
    pub fn http_address(&self) -> SocketAddr {
        self.http_address
            .expect("an operator started with `start_with` has a known HTTP address")
    }
}

/// The operator binary under test: the copy [`pin_binary`] made, else this crate's, or the build
/// `SAFE_DETACH_OPERATOR_BIN` names (a release build, or another version to compare against).
fn operator_binary() -> PathBuf {
    if let Some(pinned) = PINNED.get() {
        return pinned.clone();
    }
    std::env::var_os("SAFE_DETACH_OPERATOR_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_safe-detach")),
        PathBuf::from,
    )
}

static PINNED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Copies the operator binary under test and starts every later operator from the copy, so that
/// a long run tests one build to its end even if the crate is built again meanwhile.
pub fn pin_binary() -> PathBuf {
    PINNED
        .get_or_init(|| {
            let source = operator_binary();
            let copy =
                std::env::temp_dir().join(format!("safe-detach-pinned-{}", std::process::id()));
            std::fs::copy(&source, &copy)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", source.display(), copy.display()));
            copy
        })
        .clone()
}

/// A loopback address with a port that is free now: the operator binds it a moment later.
fn free_local_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on the loopback")
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- operator log ({}) ---\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Applies deploy/'s namespace, ServiceAccount and RBAC, once per test process: the operator
/// runs with exactly the rights it has in a real installation.
async fn install_rbac() {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let namespace = format!("{REPO}/deploy/namespace.yaml");
            let rbac = format!("{REPO}/deploy/rbac.yaml");
            kubectl(&[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                &namespace,
                "-f",
                &rbac,
            ])
            .await;
        })
        .await;
}

/// A scrape of the operator's `/metrics`, in the Prometheus text format.
pub struct Scrape(pub String);

impl Scrape {
    /// One GET of `/metrics`; `None` unless it answers 200.
    pub async fn of(address: SocketAddr) -> Option<Self> {
        match http_get(address, "/metrics").await {
            Some((200, text)) => Some(Self(text)),
            _ => None,
        }
    }

    /// Every sample: the series (name and labels as written) and its value.
    fn series(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series, value.parse().ok()?))
            })
    }

    /// Samples of the series `name` (a full sample name, e.g. with `_total` or `_count`), with
    /// their labels.
    pub fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.series()
            .filter_map(|(series, value)| {
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
                    (labels, value)
                })
            })
            .collect()
    }

    /// The sum of the samples of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
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
    pub fn has_family(&self, name: &str) -> bool {
        self.0
            .lines()
            .any(|line| line.starts_with(&format!("# TYPE {name} ")))
    }

    /// Every `safedetach_*` series of a counter (`_total`) or of a histogram's count (`_count`),
    /// by series as written.
    pub fn counters(&self) -> BTreeMap<String, f64> {
        self.series()
            .filter(|(series, _)| series.starts_with("safedetach_"))
            .filter(|(series, _)| {
                let name = series.split('{').next().unwrap_or_default();
                name.ends_with("_total") || name.ends_with("_count")
            })
            .map(|(series, value)| (series.to_owned(), value))
            .collect()
    }

    /// The driver calls counted so far, by operation (`probe`, `probe_many`, `attach`, …), from
    /// `safedetach_driver_call_duration_seconds`, whatever the driver and result.
    pub fn driver_calls(&self) -> BTreeMap<String, f64> {
        let mut calls = BTreeMap::new();
        for (labels, n) in self.samples("safedetach_driver_call_duration_seconds_count") {
            if let Some(operation) = labels.get("operation") {
                *calls.entry(operation.clone()).or_insert(0.0) += n;
            }
        }
        calls
    }
}

/// The operator's counters now (see [`Scrape::counters`]); none while it does not answer.
pub async fn counters(address: SocketAddr) -> BTreeMap<String, f64> {
    Scrape::of(address)
        .await
        .map(|scrape| scrape.counters())
        .unwrap_or_default()
}

/// A plain HTTP/1.0 GET on the loopback (no chunked answer): the status code and the body.
pub async fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Some((code, body))
}

/// The driver calls the operator made so far (see [`Scrape::driver_calls`]).
pub async fn driver_calls(address: SocketAddr) -> BTreeMap<String, f64> {
    Scrape::of(address)
        .await
        .map(|scrape| scrape.driver_calls())
        .unwrap_or_default()
}
