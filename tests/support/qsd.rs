//! A real `qemu-storage-daemon` for the `nbd` driver's tests, and a real NBD client (`qemu-io`)
//! that holds an export open.
//!
//! Each [`Qsd`] runs in its own temporary folder (sockets and images), so tests run in parallel
//! without sharing state. Both processes are killed on drop.

use super::qmp::{self, QmpError};
use safe_detach::driver::nbd::NbdConfig;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection to the monitor waits for its greeting before the daemon counts as up
/// with another client on its monitor.
const GREETING_WAIT: Duration = Duration::from_secs(2);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// An export made behind the operator's back.
pub struct OutOfBand {
    /// Its NBD URI.
    pub uri: String,
    /// When its command was sent, on a connection that held the daemon's monitor: it did not
    /// exist before.
    pub asked: Instant,
}

/// Exports the image `handle` of the daemon `daemon` for `node` behind the operator's back, exactly
/// as the driver would have (same block node and export names), on one connection to its own QMP
/// socket (`daemon.qmp_socket`, not a proxy's), within [`qmp::TIMEOUT`]. The block node and the
/// NBD server may be there already (the driver made them); the export must be new.
pub async fn export_out_of_band(
    daemon: &NbdConfig,
    handle: &str,
    node: &str,
    read_only: bool,
) -> Result<OutOfBand, QmpError> {
    tokio::time::timeout(
        qmp::TIMEOUT,
        export_on_one_connection(daemon, handle, node, read_only),
    )
    .await
    .unwrap_or_else(|_| {
        Err(QmpError::Unreachable(format!(
            "no reply within {:?}",
            qmp::TIMEOUT
        )))
    })
}

async fn export_on_one_connection(
    daemon: &NbdConfig,
    handle: &str,
    node: &str,
    read_only: bool,
) -> Result<OutOfBand, QmpError> {
    let id = safe_detach::driver::nbd::export_id(handle, node);
    let mut session = qmp::Session::connect(&daemon.qmp_socket).await?;
    let added = session
        .execute(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": safe_detach::driver::nbd::block_node_name(handle),
                "read-only": read_only,
                "file": { "driver": "file", "filename": daemon.image_dir.join(handle) },
            }),
        )
        .await;
    match added {
        Err(QmpError::Refused(error))
            if error.to_string().to_lowercase().contains("duplicate node") => {}
        other => {
            other?;
        }
    }
    let started = session
        .execute(
            "nbd-server-start",
            json!({ "addr": { "type": "unix", "data": { "path": daemon.nbd_socket } } }),
        )
        .await;
    match started {
        Err(QmpError::Refused(error)) if error.to_string().contains("already running") => {}
        other => {
            other?;
        }
    }
    let asked = Instant::now();
    session
        .execute(
            "block-export-add",
            json!({
                "type": "nbd",
                "id": id,
                "node-name": safe_detach::driver::nbd::block_node_name(handle),
                "name": id,
                "writable": !read_only,
            }),
        )
        .await?;
    Ok(OutOfBand {
        uri: format!("nbd+unix:///{id}?socket={}", daemon.nbd_socket.display()),
        asked,
    })
}

/// A running `qemu-storage-daemon` with a QMP socket and an empty image folder.
pub struct Qsd {
    child: Child,
    dir: TempDir,
}

impl Qsd {
    /// Starts the daemon and waits until its QMP socket greets.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("qsd")
            .tempdir()
            .expect("temporary folder");
        std::fs::create_dir(dir.path().join("images")).expect("image folder");
        let child = spawn_daemon(dir.path());
        let mut qsd = Self { child, dir };
        if let Err(status) = qsd.greeted() {
            panic!("qemu-storage-daemon exited with {status}: {}", qsd.log());
        }
        qsd
    }

    /// Waits until the daemon's monitor greets, or says how the daemon ended.
    fn greeted(&mut self) -> Result<(), std::process::ExitStatus> {
        let give_up = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("daemon status") {
                return Err(status);
            }
            // The monitor serves one client at a time; this one leaves at once. A driver's
            // session may have taken the monitor first (a restart under a storm of probes): the
            // connection is then accepted and the greeting waits for that session to end, which
            // shows the daemon up all the same. Never a read without a bound.
            if let Ok(stream) = UnixStream::connect(self.qmp_socket()) {
                stream
                    .set_read_timeout(Some(GREETING_WAIT))
                    .expect("a read timeout");
                let mut greeting = String::new();
                match BufReader::new(stream).read_line(&mut greeting) {
                    Ok(_) if greeting.contains("\"QMP\"") => return Ok(()),
                    Err(error)
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Ok(());
                    }
                    _ => {}
                }
            }
            assert!(
                Instant::now() < give_up,
                "qemu-storage-daemon did not greet on QMP: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the daemon ended, if it is no longer running (a crash, when no one stopped it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    /// Stops the daemon, as a backend outage would.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the daemon again in the same folder, after [`stop`](Self::stop) or a crash: the
    /// same sockets and images, and none of the block nodes or exports, as a restarted backend.
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.qmp_socket());
        let _ = std::fs::remove_file(self.nbd_socket());
        // The daemon itself may crash while it starts with clients knocking at its monitor
        // (seen: SIGSEGV once in about a hundred restarts under a storm of probes). Started
        // again, as its supervisor would; a daemon that keeps crashing fails the test.
        for attempt in 1..=3 {
            self.child = spawn_daemon(self.dir.path());
            match self.greeted() {
                Ok(()) => return,
                Err(status) if attempt < 3 => {
                    eprintln!("qemu-storage-daemon exited with {status} as it started; again");
                    let _ = std::fs::remove_file(self.qmp_socket());
                    let _ = std::fs::remove_file(self.nbd_socket());
                }
                Err(status) => {
                    panic!("qemu-storage-daemon exited with {status}: {}", self.log())
                }
            }
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    pub fn image_dir(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// The driver configuration for this daemon.
    pub fn config(&self) -> NbdConfig {
        NbdConfig {
            qmp_socket: self.qmp_socket(),
            nbd_socket: self.nbd_socket(),
            image_dir: self.image_dir(),
        }
    }

    /// The driver configuration with QMP going through `qmp_socket` (a fault-injecting proxy).
    pub fn config_via(&self, qmp_socket: &Path) -> NbdConfig {
        NbdConfig {
            qmp_socket: qmp_socket.to_owned(),
            ..self.config()
        }
    }

    /// Creates a raw image of 1 MiB in the image folder, the volume `handle`.
    pub fn create_image(&self, handle: &str) -> PathBuf {
        let path = self.image_dir().join(handle);
        let output = Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&path)
            .arg("1M")
            .output()
            .expect("qemu-img must be installed");
        assert!(
            output.status.success(),
            "qemu-img create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        path
    }

    /// The daemon's output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }

    /// Runs one QMP command directly on the daemon (not through the driver or a proxy) and
    /// returns its `return` value, or the `error` object as `Err`: the tests' own view of the
    /// daemon's state. A daemon that cannot be asked fails the test.
    pub async fn qmp(&self, command: &str, arguments: Value) -> Result<Value, Value> {
        match qmp::execute(&self.qmp_socket(), command, arguments).await {
            Ok(answer) => Ok(answer),
            Err(QmpError::Refused(error)) => Err(error),
            Err(unreachable) => panic!(
                "QMP {command}: {unreachable}
{}",
                self.log()
            ),
        }
    }

    /// The sorted ids of the daemon's block exports.
    pub async fn export_ids(&self) -> Vec<String> {
        let answer = self.qmp("query-block-exports", json!({})).await;
        qmp::export_ids(&answer.expect("query-block-exports"))
    }

    /// The sorted names of the daemon's named block nodes (QEMU's automatic `#block…` names left
    /// out).
    pub async fn block_nodes(&self) -> Vec<String> {
        let answer = self
            .qmp("query-named-block-nodes", json!({"flat": true}))
            .await;
        qmp::named_block_nodes(&answer.expect("query-named-block-nodes"))
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Starts a daemon with its QMP socket and log in `dir` (the log is appended to).
fn spawn_daemon(dir: &Path) -> Child {
    let qmp = dir.join("qmp.sock");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("qsd.log"))
        .expect("daemon log");
    Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            qmp.display()
        ))
        .args(["--monitor", "chardev=m0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("daemon log"))
        .stderr(log)
        .spawn()
        .expect(
            "qemu-storage-daemon (Debian: apt-get install qemu-system-common) must be installed",
        )
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a read through [`NbdClient`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    Ok,
    /// The read failed with an I/O error: the export was taken away.
    IoError,
    /// Anything else qemu-io said (or that it exited).
    Other(String),
}

/// A `qemu-io` process connected to an NBD export, kept connected by an open stdin.
///
/// qemu-io reads its commands with stdio from a pipe, so a second line written before the first
/// is done can sit in its buffer unread: commands go one at a time, each awaited.
pub struct NbdClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl NbdClient {
    /// Connects to the export `name` on `socket` and proves it with a first read.
    pub async fn connect(socket: &Path, name: &str) -> Result<Self, String> {
        let uri = format!("nbd+unix:///{name}?socket={}", socket.display());
        Self::connect_uri(&uri).await
    }

    /// Connects to an NBD URI, as the driver's connection info gives it, for reading and writing.
    pub async fn connect_uri(uri: &str) -> Result<Self, String> {
        Self::open(uri, false).await
    }

    /// Connects to an NBD URI for reading only. (Opening a read-only export for writing fails.)
    pub async fn connect_uri_read_only(uri: &str) -> Result<Self, String> {
        Self::open(uri, true).await
    }

    async fn open(uri: &str, read_only: bool) -> Result<Self, String> {
        let mut command = tokio::process::Command::new("qemu-io");
        if read_only {
            command.arg("-r");
        }
        let mut child = command
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // qemu-io reports a failed open on stderr; merged into the test output.
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start qemu-io: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut client = Self {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout).lines(),
        };
        match client.read().await {
            ReadOutcome::Ok => Ok(client),
            other => Err(format!("qemu-io could not read {uri}: {other:?}")),
        }
    }

    /// Reads the first 512 bytes of the export.
    pub async fn read(&mut self) -> ReadOutcome {
        if let Err(e) = self.stdin.write_all(b"read 0 512\n").await {
            return ReadOutcome::Other(format!("qemu-io took no command: {e}"));
        }
        if let Err(e) = self.stdin.flush().await {
            return ReadOutcome::Other(format!("qemu-io took no command: {e}"));
        }
        let outcome = tokio::time::timeout(CLIENT_TIMEOUT, async {
            let mut seen = Vec::new();
            loop {
                // Results follow the prompt of the command on the same line: "qemu-io> read ...".
                match self.stdout.next_line().await {
                    Ok(Some(line)) if line.contains("read 512/512 bytes at offset 0") => {
                        return ReadOutcome::Ok;
                    }
                    Ok(Some(line)) if line.contains("read failed: Input/output error") => {
                        return ReadOutcome::IoError;
                    }
                    Ok(Some(line)) if line.contains("failed") || line.contains("no file open") => {
                        return ReadOutcome::Other(line);
                    }
                    Ok(Some(line)) => seen.push(line),
                    Ok(None) => {
                        return ReadOutcome::Other(format!("qemu-io exited after {seen:?}"));
                    }
                    Err(e) => {
                        return ReadOutcome::Other(format!("cannot read qemu-io's output: {e}"));
                    }
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            ReadOutcome::Other(format!("qemu-io did not answer within {CLIENT_TIMEOUT:?}"))
        })
    }

    /// Disconnects cleanly and waits for qemu-io to exit.
    pub async fn close(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = tokio::time::timeout(CLIENT_TIMEOUT, self.child.wait()).await;
    }
}
