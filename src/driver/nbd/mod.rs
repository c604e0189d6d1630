//! The `nbd` driver: volumes served by QEMU's storage daemon, one NBD export per (volume, node).
//!
//! It owns everything the operator asks of `qemu-storage-daemon`, spoken over the daemon's QMP
//! socket: its configuration ([`NbdConfig`]), the QMP client, and the names it gives things in
//! the daemon.
//!
//! - A volume handle is the file name of a raw image directly in `imageDir` (handle `vol1` is
//!   `imageDir/vol1`, no extension added). Handles match `[A-Za-z0-9][A-Za-z0-9.-]*` (at most 128
//!   characters); node names are DNS subdomains. Anything else is [`DriverError::Invalid`].
//! - Each volume has one block node in the daemon (`sd-<handle>`, or a hash for long handles),
//!   opened read-write on first attach and shared by all of the volume's exports.
//! - Attaching to a node adds an NBD export with id and export name `sd_<handle>__<node>`, so
//!   `query-block-exports` alone says which nodes a volume is connected to. Several nodes can hold
//!   writable exports of one volume at once: QEMU allows several exports of one block node, and
//!   whether that is allowed is the operator's decision (`multiAttach`), which an exclusive
//!   attach enforces at the daemon (see below).
//!   Read-only attachments get a read-only export; an export that already exists is returned as it
//!   is, whatever its mode.
//! - The NBD server is started on `nbdSocket` by the first attach. A server the daemon already
//!   runs is taken to listen there: QEMU 7.2 has no query that says where it listens.
//! - Removing an export is asynchronous in QEMU: `block-export-del` only drops the user's
//!   reference and asks clients to leave; the export leaves the list (and `BLOCK_EXPORT_DELETED`
//!   is sent) once the last reference is gone, listed meanwhile with `shutting-down: true`. With
//!   QEMU 7.2 that is quick (with no client the event precedes the reply; after a hard delete with
//!   a client connected it follows it), but not promised, so detach paths return only once
//!   `query-block-exports` no longer lists the export, and the probe counts exports that are
//!   still shutting down.
//! - The QMP monitor serves one client at a time and turns further connection attempts away, so
//!   the driver's calls take turns. While calls wait, the connection passes from one to the next
//!   with the exports listed on it (see `Monitor`); when none waits, it lingers for a moment
//!   (`LINGER`) for the next call, and is closed after that.
//! - An exclusive attach (a single-attach volume) lists the exports and adds its own in one QMP
//!   session, and refuses while any export of the volume's block node is listed, whoever made it.
//! - The probe names the node of each export this driver made; an export of the volume's block
//!   node under another id (added by hand) names no node, and is reported as unattributed: it may
//!   serve any node, so nothing is confirmed detached, or attached elsewhere, while it exists.

mod config;
mod exports;
mod names;
mod qmp;

pub use config::{NbdConfig, NbdConfigError};
pub use names::{
    MAX_HANDLE_LEN, block_node_name, export_id, parse_export_id, validate_handle, validate_node,
};

use crate::driver::{AttachRequest, ConnectionInfo, Connections, Driver, DriverError};
use async_trait::async_trait;
use exports::{ExportInfo, Exports};
use qmp::{Qmp, QmpError};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

/// How long a detach path waits for a deleted export to leave the daemon's list. QEMU drops it as
/// soon as its clients are gone, which a hard delete forces at once: seconds mean something is
/// wrong, and the caller must probe.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE_POLL: Duration = Duration::from_millis(20);
/// Attempts at an attach whose block node or NBD server vanished under it (a concurrent detach
/// released the node between our add and our export).
const ATTACH_ATTEMPTS: usize = 3;

/// The connection info key of the NBD URI.
pub const INFO_URI: &str = "uri";
/// The connection info key of the NBD export name.
pub const INFO_EXPORT_NAME: &str = "exportName";
/// The connection info key of the NBD server's socket path.
pub const INFO_SOCKET: &str = "socket";

/// How long to wait for the monitor to take us in before calling the daemon unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A driver for volumes served by one `qemu-storage-daemon`.
#[derive(Debug)]
pub struct NbdDriver {
    config: NbdConfig,
    monitor: Arc<Monitor>,
}

/// How long a connection stays open after a call when no other call waits, for the next one. In
/// a storm the calls come milliseconds apart, each after an API write, and a new connection must
/// list every export again; another client of the daemon waits no longer than this for its turn.
const LINGER: Duration = Duration::from_millis(25);

/// How many calls one QMP connection serves before it is closed, so that another client of the
/// daemon (another replica, a person with `qmp-shell`) gets its turn during a long storm.
const CALLS_PER_CONNECTION: u32 = 256;

/// QEMU's monitor serves one client at a time and turns further connection attempts away, so this
/// driver's calls take turns rather than race for it. While calls are waiting, the connection is
/// handed from one to the next instead of closed, and when none is waiting it lingers a moment
/// for the next: no other client of the daemon can change its exports meanwhile, so the listing
/// read on the connection stays true, changed only by this driver's own commands and the
/// deletions the daemon announces on it.
#[derive(Debug, Default)]
struct Monitor {
    kept: Mutex<Option<Kept>>,
    waiting: AtomicUsize,
    /// How many times a connection was left for the next call: which leaving a lingering
    /// connection's closer is for.
    left: AtomicU64,
}

/// A connection kept for the next call, and what it knows of the daemon's exports.
struct Kept {
    qmp: Qmp,
    /// The daemon's exports as listed on this connection and kept up to date since: `None` until
    /// the first listing. Exports shutting down stay until the daemon says they are gone.
    exports: Option<Exports>,
    calls: u32,
    /// Whether this connection has seen the NBD server running (no one can stop it meanwhile).
    server_running: bool,
    /// The count of [`Monitor::left`] when it was last left for the next call.
    left_as: u64,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("exports", &self.exports.as_ref().map(Exports::len))
            .field("calls", &self.calls)
            .finish()
    }
}

/// A QMP session, holding this driver's turn at the monitor.
struct Session<'a> {
    kept: Option<Kept>,
    slot: MutexGuard<'a, Option<Kept>>,
    monitor: &'a Arc<Monitor>,
}

impl Session<'_> {
    fn qmp(&mut self) -> &mut Qmp {
        &mut self
            .kept
            .as_mut()
            .expect("a session holds its connection")
            .qmp
    }

    fn kept(&mut self) -> &mut Kept {
        self.kept.as_mut().expect("a session holds its connection")
    }

    async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.qmp().execute(command, arguments).await
    }

    /// The daemon's exports: listed once per connection, then kept up to date.
    async fn exports(&mut self, operation: &'static str) -> Result<&Exports, DriverError> {
        let kept = self.kept();
        let deleted = kept.qmp.take_deleted_exports();
        if let Some(exports) = kept.exports.as_mut() {
            for id in &deleted {
                exports.remove(id);
            }
        } else {
            let listed = list_exports(&mut kept.qmp, operation).await?;
            // A deletion announced before the listing's reply is in the listing already; applied
            // later, it would take away an export of the same id added after it.
            kept.qmp.take_deleted_exports();
            kept.exports = Some(Exports::listed(listed));
        }
        Ok(kept.exports.get_or_insert_default())
    }

    /// Lists the exports again, whatever is known.
    async fn relist(&mut self, operation: &'static str) -> Result<&Exports, DriverError> {
        self.forget_exports();
        self.exports(operation).await
    }

    /// Records what a command of this session did to the exports.
    fn exports_changed(&mut self, change: impl FnOnce(&mut Exports)) {
        if let Some(exports) = self.kept().exports.as_mut() {
            change(exports);
        }
    }

    /// Forgets the listing: the daemon said something this session did not expect.
    fn forget_exports(&mut self) {
        self.kept().exports = None;
    }
}

/// One call waiting for its turn at the monitor, for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::SeqCst);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Session<'_> {
    /// Leaves the connection for the next call, unless it is spent or has served its share. With
    /// no call waiting it lingers, and is closed after [`LINGER`] unless a call took it meanwhile.
    fn drop(&mut self) {
        let Some(mut kept) = self.kept.take() else {
            return;
        };
        if kept.qmp.is_spent() || kept.calls >= CALLS_PER_CONNECTION {
            return;
        }
        let left_as = self.monitor.left.fetch_add(1, Ordering::SeqCst) + 1;
        kept.left_as = left_as;
        if self.monitor.waiting.load(Ordering::SeqCst) == 0 {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let monitor = self.monitor.clone();
            runtime.spawn(async move {
                tokio::time::sleep(LINGER).await;
                let mut slot = monitor.kept.lock().await;
                if slot.as_ref().is_some_and(|kept| kept.left_as == left_as) {
                    *slot = None;
                }
            });
        }
        *self.slot = Some(kept);
    }
}

impl NbdDriver {
    /// A driver for the daemon and images `config` names. Fails if the configuration is invalid;
    /// the daemon need not be running yet.
    pub fn new(config: NbdConfig) -> Result<Self, NbdConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            monitor: Arc::default(),
        })
    }

    pub fn config(&self) -> &NbdConfig {
        &self.config
    }

    fn image_path(&self, handle: &str) -> PathBuf {
        self.config.image_dir.join(handle)
    }

    /// What a node needs to reach an export. Depends only on the export and the configuration, so
    /// an idempotent attach returns the same info every time.
    fn connection_info(&self, export: &str) -> ConnectionInfo {
        let socket = self.config.nbd_socket.to_string_lossy().into_owned();
        ConnectionInfo::from([
            (
                INFO_URI.to_owned(),
                format!("nbd+unix:///{export}?socket={}", names::uri_encode(&socket)),
            ),
            (INFO_EXPORT_NAME.to_owned(), export.to_owned()),
            (INFO_SOCKET.to_owned(), socket),
        ])
    }

    /// This driver's turn at the monitor, on the connection the last call left, or a new one.
    async fn connect(&self) -> Result<Session<'_>, DriverError> {
        // Counted until the turn comes, or until the caller gives up waiting (a deadline drops
        // this future): a count left behind would keep the connection, and the daemon's only
        // monitor, from every other client for good.
        let waiting = Waiting::count(&self.monitor.waiting);
        let mut slot = self.monitor.kept.lock().await;
        drop(waiting);
        // A kept connection may lead to a daemon that has died since (and another one may run in
        // its place): one round trip proves it still answers, and reads the events queued since.
        let alive = match slot.take() {
            Some(mut kept) => match kept.qmp.execute("query-version", None).await {
                Ok(_) => Some(kept),
                Err(_) => None,
            },
            None => None,
        };
        let mut kept = match alive {
            Some(kept) => kept,
            None => Kept {
                qmp: Qmp::connect(&self.config.qmp_socket, CONNECT_TIMEOUT)
                    .await
                    .map_err(|e| DriverError::Unreachable(e.to_string()))?,
                exports: None,
                calls: 0,
                server_running: false,
                left_as: 0,
            },
        };
        kept.calls += 1;
        Ok(Session {
            kept: Some(kept),
            slot,
            monitor: &self.monitor,
        })
    }

    /// Fails with [`DriverError::UnknownVolume`] unless the volume's image is a file.
    async fn check_image(&self, handle: &str) -> Result<PathBuf, DriverError> {
        let path = self.image_path(handle);
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(path),
            Ok(_) => Err(DriverError::UnknownVolume(format!(
                "{handle} ({} is not a file)",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(DriverError::UnknownVolume(handle.to_owned()))
            }
            Err(e) => Err(DriverError::Refused(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    async fn ensure_server(
        &self,
        qmp: &mut Qmp,
        operation: &'static str,
    ) -> Result<(), DriverError> {
        let socket = self.config.nbd_socket.to_string_lossy();
        let arguments = json!({ "addr": { "type": "unix", "data": { "path": socket } } });
        match qmp.execute("nbd-server-start", Some(arguments)).await {
            Ok(_) => Ok(()),
            Err(e) if e.says("already running") => Ok(()),
            Err(e) => Err(driver_error(e, operation)),
        }
    }

    /// Adds the volume's block node, or checks that the node already there serves its image.
    /// `Ok(false)`: a node was there but vanished before it could be checked; try again.
    async fn ensure_block_node(
        &self,
        qmp: &mut Qmp,
        handle: &str,
        image: &Path,
    ) -> Result<bool, DriverError> {
        let node_name = block_node_name(handle);
        let filename = image.to_string_lossy();
        let arguments = json!({
            "driver": "raw",
            "node-name": node_name,
            "file": { "driver": "file", "filename": filename },
        });
        match qmp.execute("blockdev-add", Some(arguments)).await {
            Ok(_) => Ok(true),
            Err(e) if e.says("duplicate node") => {
                verify_block_node(qmp, &node_name, &filename).await
            }
            Err(e) if e.says("no such file") => Err(DriverError::UnknownVolume(handle.to_owned())),
            Err(e) => Err(driver_error(e, "attach")),
        }
    }

    /// Removes the volume's block node unless an export still uses it.
    async fn release_block_node(
        &self,
        session: &mut Session<'_>,
        handle: &str,
        operation: &'static str,
    ) -> Result<(), DriverError> {
        let node_name = block_node_name(handle);
        if session.exports(operation).await?.serve(&node_name) {
            return Ok(());
        }
        match session
            .execute("blockdev-del", Some(json!({ "node-name": node_name })))
            .await
        {
            Ok(_) => Ok(()),
            // An attach got in between: the node is needed again.
            Err(e) if e.says("is in use") => Ok(()),
            Err(e) if e.says("failed to find node") => Ok(()),
            Err(e) => Err(driver_error(e, operation)),
        }
    }

    /// Waits until the daemon no longer lists the export: it says so with an event, which
    /// arrives before the reply to the delete or soon after; a listing now and then settles it
    /// when the event is not seen.
    async fn await_export_gone(
        &self,
        session: &mut Session<'_>,
        id: &str,
        operation: &'static str,
    ) -> Result<(), DriverError> {
        session.exports_changed(|exports| exports.mark_shutting_down(id));
        let give_up = Instant::now() + SETTLE_TIMEOUT;
        let mut round = 0;
        loop {
            round += 1;
            let exports = if round % 4 == 0 {
                session.relist(operation).await?
            } else {
                session.exports(operation).await?
            };
            if !exports.contains(id) {
                return Ok(());
            }
            if Instant::now() >= give_up {
                tracing::warn!(export = id, "export still listed after its deletion");
                return Err(DriverError::Timeout {
                    operation,
                    deadline: SETTLE_TIMEOUT,
                });
            }
            tokio::time::sleep(SETTLE_POLL).await;
            // Reads the events that arrived meanwhile.
            session
                .execute("query-version", None)
                .await
                .map_err(|e| driver_error(e, operation))?;
        }
    }
}

async fn list_exports(
    qmp: &mut Qmp,
    operation: &'static str,
) -> Result<Vec<ExportInfo>, DriverError> {
    let value = qmp
        .execute("query-block-exports", None)
        .await
        .map_err(|e| driver_error(e, operation))?;
    serde_json::from_value(value)
        .map_err(|e| DriverError::Refused(format!("unexpected reply to query-block-exports: {e}")))
}

async fn verify_block_node(
    qmp: &mut Qmp,
    node_name: &str,
    filename: &str,
) -> Result<bool, DriverError> {
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .map_err(|e| driver_error(e, "attach"))?;
    let serves = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|node| node.get("node-name").and_then(Value::as_str) == Some(node_name))
        .and_then(|node| node.get("file").and_then(Value::as_str));
    match serves {
        Some(file) if file == filename => Ok(true),
        // Released by a concurrent detach between our add and our query.
        None => Ok(false),
        // Never export a node that serves another file: that would hand out the wrong disk.
        Some(file) => Err(DriverError::Refused(format!(
            "block node {node_name} serves {file}, not {filename}"
        ))),
    }
}

/// The default meaning of a QMP failure; call sites first pick out the errors they expect.
fn driver_error(error: QmpError, operation: &'static str) -> DriverError {
    match error {
        QmpError::Unreachable(message) => DriverError::Unreachable(message),
        QmpError::LostReply(message) => DriverError::LostReply { operation, message },
        command @ QmpError::Command { .. } => {
            DriverError::Refused(format!("{operation}: {command}"))
        }
    }
}

#[async_trait]
impl Driver for NbdDriver {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    async fn health_check(&self) -> Result<(), DriverError> {
        let mut session = self.connect().await?;
        session
            .execute("query-version", None)
            .await
            .map(drop)
            .map_err(|e| driver_error(e, "health_check"))
    }

    async fn probe(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        validate_handle(volume_handle)?;
        let mut session = self.connect().await?;
        // Exports still shutting down keep their clients until they are gone, so they count.
        let exports = session.exports("probe").await?;
        let connections = exports.connections_of(volume_handle);
        if connections.nodes.is_empty() && connections.unattributed.is_empty() {
            drop(session);
            // Connected nowhere, but say so only for a volume that exists.
            self.check_image(volume_handle).await?;
        }
        Ok(connections)
    }

    fn can_probe_many(&self) -> bool {
        true
    }

    /// One listing for all of them. A volume connected nowhere is answered as such without
    /// looking for its image: the answer is compared with records, not acted on.
    async fn probe_many(
        &self,
        volume_handles: &[String],
    ) -> Result<BTreeMap<String, Connections>, DriverError> {
        let valid: Vec<String> = volume_handles
            .iter()
            .filter(|handle| validate_handle(handle).is_ok())
            .cloned()
            .collect();
        let mut session = self.connect().await?;
        let exports = session.exports("probe_many").await?;
        Ok(exports.connections_of_each(&valid))
    }

    async fn attach(&self, request: &AttachRequest) -> Result<ConnectionInfo, DriverError> {
        let handle = request.volume_handle.as_str();
        validate_handle(handle)?;
        validate_node(&request.node)?;
        let image = self.check_image(handle).await?;
        let id = export_id(handle, &request.node);
        // One session from the listing to the export: the monitor serves no other client in
        // between, this process's or another's, so the exclusivity check cannot go stale.
        let mut session = self.connect().await?;
        let exports = session.exports("attach").await?;
        if let Some(existing) = exports.get(&id) {
            if existing.shutting_down {
                return Err(DriverError::Refused(format!(
                    "export {id} is being deleted; attach again once it is gone"
                )));
            }
            return Ok(self.connection_info(&id));
        }
        if request.exclusive {
            let holders = exports.holders_of(handle);
            if !holders.is_empty() {
                return Err(DriverError::HeldElsewhere {
                    volume: handle.to_owned(),
                    holders,
                });
            }
        }
        let arguments = json!({
            "type": "nbd",
            "id": id,
            "node-name": block_node_name(handle),
            "name": id,
            "writable": !request.read_only,
        });
        let block_node = block_node_name(handle);
        for attempt in 1..=ATTACH_ATTEMPTS {
            if !session.kept().server_running {
                self.ensure_server(session.qmp(), "attach").await?;
                session.kept().server_running = true;
            }
            if !self
                .ensure_block_node(session.qmp(), handle, &image)
                .await?
            {
                continue;
            }
            match session
                .execute("block-export-add", Some(arguments.clone()))
                .await
            {
                Ok(_) => {
                    session.exports_changed(|exports| {
                        exports.insert(ExportInfo {
                            id: id.clone(),
                            node_name: block_node.clone(),
                            shutting_down: false,
                        })
                    });
                    return Ok(self.connection_info(&id));
                }
                // The export exists after all (made by another client before this session):
                // same export, same info.
                Err(e) if e.says("already in use") || e.says("already has export named") => {
                    session.forget_exports();
                    return Ok(self.connection_info(&id));
                }
                Err(e)
                    if (e.says("cannot find device") || e.says("server not running"))
                        && attempt < ATTACH_ATTEMPTS =>
                {
                    session.kept().server_running = false;
                }
                Err(e) => return Err(driver_error(e, "attach")),
            }
        }
        Err(DriverError::Refused(format!(
            "the block node of {handle} kept vanishing while attaching"
        )))
    }

    async fn terminate_connection(
        &self,
        volume_handle: &str,
        node: &str,
    ) -> Result<(), DriverError> {
        validate_handle(volume_handle)?;
        validate_node(node)?;
        let id = export_id(volume_handle, node);
        let mut session = self.connect().await?;
        match session
            .execute(
                "block-export-del",
                Some(json!({ "id": id, "mode": "safe" })),
            )
            .await
        {
            Ok(_) => {}
            // Someone forced it already; it goes away on its own.
            Err(e) if e.says("already shutting down") => {}
            Err(e) if e.says("still in use") => {
                return Err(DriverError::InUse {
                    volume: volume_handle.to_owned(),
                    node: node.to_owned(),
                    message: e.to_string(),
                });
            }
            Err(e) if e.says("not found") => {
                session.exports_changed(|exports| exports.remove(&id));
                return Err(DriverError::NotConnected {
                    volume: volume_handle.to_owned(),
                    node: node.to_owned(),
                });
            }
            Err(e) => return Err(driver_error(e, "terminate_connection")),
        }
        self.await_export_gone(&mut session, &id, "terminate_connection")
            .await
    }

    async fn detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        validate_handle(volume_handle)?;
        validate_node(node)?;
        let mut session = self.connect().await?;
        self.release_block_node(&mut session, volume_handle, "detach")
            .await
    }

    async fn force_detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        validate_handle(volume_handle)?;
        validate_node(node)?;
        let id = export_id(volume_handle, node);
        let mut session = self.connect().await?;
        match session
            .execute(
                "block-export-del",
                Some(json!({ "id": id, "mode": "hard" })),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.says("not found") => {
                session.exports_changed(|exports| exports.remove(&id));
            }
            Err(e) if e.says("already shutting down") => {}
            Err(e) => return Err(driver_error(e, "force_detach")),
        }
        self.await_export_gone(&mut session, &id, "force_detach")
            .await?;
        self.release_block_node(&mut session, volume_handle, "force_detach")
            .await
    }
}
