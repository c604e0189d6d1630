//! The operator under test: the real binary in its own process, under the operator's RBAC-bound
//! identity (deploy/rbac.yaml), managing only the objects labelled with its test's shard, so that
//! tests run side by side on one control plane without acting on each other's objects.

use super::cluster::{kubectl, operator_kubeconfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts the operator with the given configuration file contents, for objects labelled
    /// `SHARD_LABEL=shard`.
    pub async fn start(shard: &str, config: &str) -> Self {
        install_rbac().await;
        let dir = tempfile::tempdir().expect("create the operator's directory");
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config).expect("write the operator's configuration");
        let mut operator = Self {
            child: None,
            config: config_path,
            log: dir.path().join("operator.log"),
            shard: shard.to_owned(),
            kubeconfig: operator_kubeconfig().await,
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
        let child = Command::new(env!("CARGO_BIN_EXE_safe-detach"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            // Tests run side by side: each operator serves its endpoints on a port of its own.
            .arg("--http-address")
            .arg("127.0.0.1:0")
            .arg("--selector")
            .arg(format!("{SHARD_LABEL}={}", self.shard))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
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

    /// Starts the operator again after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// What the operator logged so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
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
