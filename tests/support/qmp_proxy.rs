//! A fault-injecting proxy in front of a QMP socket: the faults a real daemon cannot make on
//! demand. It forwards each client connection to the daemon line by line and, when armed, spoils
//! the next command of a given name:
//!
//! - [`Fault::DropReply`]: the command reaches the daemon and runs; the proxy waits for the
//!   daemon's reply, swallows it and closes the client's connection. The client sees a broken
//!   connection, the daemon a completed command: a lost reply.
//! - [`Fault::DelayReply`]: the reply is held back for a while.
//!
//! And [`QmpProxy::set_refusing`] makes connection attempts fail, as a daemon that is down;
//! [`QmpProxy::set_in_use`] answers every safe `block-export-del` itself with QEMU's "still in
//! use" error, as if a client held every export (more clients than a test can connect).
//!
//! The proxy's tasks run on the runtime that started it and stop when it is dropped.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What to do to the reply of an armed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    DropReply,
    DelayReply(Duration),
}

#[derive(Default)]
struct Shared {
    /// The armed faults, each spent by the first command of its name.
    armed: Mutex<Vec<(String, Fault)>>,
    /// How many armed faults have been applied.
    fired: AtomicUsize,
    /// Every command forwarded, in order: what a test checks the backend was told.
    calls: Mutex<Vec<Call>>,
    /// Whether safe export deletes are refused as in use.
    in_use: std::sync::atomic::AtomicBool,
}

/// A command the proxy forwarded to the daemon.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: std::time::Instant,
    /// The command's `execute`.
    pub command: String,
    pub arguments: Value,
}

/// A running proxy; see the module doc.
pub struct QmpProxy {
    socket: PathBuf,
    shared: Arc<Shared>,
    refusing: watch::Sender<bool>,
    acceptor: JoinHandle<()>,
}

impl QmpProxy {
    /// Listens on `socket` and forwards to the QMP socket `upstream`.
    pub async fn start(socket: &Path, upstream: &Path) -> Self {
        let shared = Arc::new(Shared::default());
        let (refusing, refusing_rx) = watch::channel(false);
        let listener = UnixListener::bind(socket).expect("proxy socket");
        let acceptor = tokio::spawn(accept_loop(
            listener,
            socket.to_owned(),
            upstream.to_owned(),
            shared.clone(),
            refusing_rx,
        ));
        Self {
            socket: socket.to_owned(),
            shared,
            refusing,
            acceptor,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Spoils the next command named `command` (its `execute`) with `fault`.
    pub fn arm(&self, command: &str, fault: Fault) {
        self.shared
            .armed
            .lock()
            .expect("proxy state")
            .push((command.to_owned(), fault));
    }

    /// Forgets the armed faults that have not fired yet.
    pub fn disarm(&self) {
        self.shared.armed.lock().expect("proxy state").clear();
    }

    /// The commands forwarded so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().expect("proxy state").clone()
    }

    /// The arguments of every command named `command` forwarded so far, oldest first.
    pub fn calls_of(&self, command: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|call| call.command == command)
            .map(|call| call.arguments)
            .collect()
    }

    /// How many armed faults have been applied so far.
    pub fn fired(&self) -> usize {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// While on, a safe `block-export-del` is answered "still in use" without reaching the daemon.
    pub fn set_in_use(&self, on: bool) {
        self.shared.in_use.store(on, Ordering::SeqCst);
    }

    /// While refusing, nothing listens on the socket: connecting fails with "connection refused".
    pub async fn set_refusing(&self, refusing: bool) {
        self.refusing.send_replace(refusing);
        // Let the acceptor close or reopen the listener before the caller connects.
        for _ in 0..200 {
            let refused = UnixStream::connect(&self.socket).await.is_err();
            if refused == refusing {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the proxy did not switch to refusing={refusing}");
    }
}

impl Drop for QmpProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    listener: UnixListener,
    socket: PathBuf,
    upstream: PathBuf,
    shared: Arc<Shared>,
    mut refusing: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        match &listener {
            Some(open) => {
                tokio::select! {
                    accepted = open.accept() => {
                        if let Ok((client, _)) = accepted {
                            connections.spawn(forward(client, upstream.clone(), shared.clone()));
                        }
                    }
                    changed = refusing.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if *refusing.borrow_and_update() {
                            // The socket file stays: connecting to it is then refused, not "not found".
                            listener = None;
                        }
                    }
                }
            }
            None => {
                if refusing.changed().await.is_err() {
                    return;
                }
                if !*refusing.borrow_and_update() {
                    let _ = std::fs::remove_file(&socket);
                    listener = Some(UnixListener::bind(&socket).expect("proxy socket"));
                }
            }
        }
    }
}

/// The fault waiting for the reply to a command this connection sent.
struct Pending {
    id: Option<Value>,
    fault: Fault,
}

async fn forward(client: UnixStream, upstream: PathBuf, shared: Arc<Shared>) {
    let Ok(daemon) = UnixStream::connect(&upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    let (daemon_read, mut daemon_write) = daemon.into_split();
    let pending: Arc<Mutex<Option<Pending>>> = Arc::default();

    let to_daemon = {
        let pending = pending.clone();
        let shared = shared.clone();
        let client_write = client_write.clone();
        async move {
            let mut lines = BufReader::new(client_read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(command) = serde_json::from_str::<Value>(&line) {
                    let name = command
                        .get("execute")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    shared.calls.lock().expect("proxy state").push(Call {
                        at: std::time::Instant::now(),
                        command: name.to_owned(),
                        arguments: command.get("arguments").cloned().unwrap_or(Value::Null),
                    });
                    if name == "block-export-del"
                        && shared.in_use.load(Ordering::SeqCst)
                        && command.pointer("/arguments/mode").and_then(Value::as_str)
                            == Some("safe")
                    {
                        let export = command
                            .pointer("/arguments/id")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        let refusal = serde_json::json!({
                            "error": {
                                "class": "GenericError",
                                "desc": format!("Export '{export}' still in use"),
                            },
                            "id": command.get("id").cloned().unwrap_or(Value::Null),
                        });
                        let mut client = client_write.lock().await;
                        if client
                            .write_all(format!("{refusal}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    let mut armed = shared.armed.lock().expect("proxy state");
                    if let Some(index) = armed.iter().position(|(armed_name, _)| armed_name == name)
                    {
                        let (_, fault) = armed.remove(index);
                        *pending.lock().expect("proxy state") = Some(Pending {
                            id: command.get("id").cloned(),
                            fault,
                        });
                    }
                }
                if daemon_write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    };

    let to_client = async move {
        let mut lines = BufReader::new(daemon_read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let reply = serde_json::from_str::<Value>(&line).unwrap_or(Value::Null);
            let is_reply = reply.get("return").is_some() || reply.get("error").is_some();
            let fault = {
                let mut pending = pending.lock().expect("proxy state");
                match pending.as_ref() {
                    Some(armed)
                        if is_reply
                            && (armed.id.is_none() || armed.id.as_ref() == reply.get("id")) =>
                    {
                        pending.take().map(|armed| armed.fault)
                    }
                    _ => None,
                }
            };
            match fault {
                Some(Fault::DropReply) => {
                    shared.fired.fetch_add(1, Ordering::SeqCst);
                    // The daemon has answered, so the command ran; the client never hears of it.
                    return;
                }
                Some(Fault::DelayReply(delay)) => {
                    shared.fired.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                }
                None => {}
            }
            if client_write
                .lock()
                .await
                .write_all(format!("{line}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    };

    // Either side ending ends the session: dropping both halves closes both connections.
    tokio::select! {
        () = to_daemon => {}
        () = to_client => {}
    }
}
