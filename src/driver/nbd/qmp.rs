//! A minimal QMP client: line-delimited JSON over a unix socket.
//!
//! Every command carries an id and only the reply with that id answers it. A connection on which
//! a reply was lost, or a command left unanswered (its caller gave up), is [`Qmp::is_spent`]: it
//! is never used again, so a late reply can never be mistaken for the reply to a later command.
//! What a failure means depends on when it happened,
//! and [`QmpError`] keeps that apart: before a command was written nothing can have happened on
//! the daemon; after, the command may have run.

use serde_json::{Map, Value, json};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Why a QMP command did not return a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpError {
    /// No command was sent: the socket refused, or the greeting or capabilities negotiation failed.
    Unreachable(String),
    /// The command was (perhaps partly) written, then the connection broke before its reply: it
    /// may or may not have run.
    LostReply(String),
    /// The daemon answered with an error.
    Command { class: String, desc: String },
}

impl QmpError {
    /// Whether the daemon answered with an error whose description contains `text`
    /// (case-insensitive, since QEMU's own capitalisation varies: "Export 'x' is not found").
    pub fn says(&self, text: &str) -> bool {
        match self {
            Self::Command { desc, .. } => desc.to_lowercase().contains(&text.to_lowercase()),
            _ => false,
        }
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(message) | Self::LostReply(message) => f.write_str(message),
            Self::Command { class, desc } => write!(f, "{desc} ({class})"),
        }
    }
}

/// One QMP session in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    /// A command was sent and its reply not read (lost, or its caller gave up): the stream may
    /// hold a half-written line or a late reply.
    spent: bool,
    /// The ids of the exports the daemon said it deleted (`BLOCK_EXPORT_DELETED`), as the events
    /// arrived between replies, not yet taken.
    deleted_exports: Vec<String>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode, giving up after
    /// `timeout`. The monitor serves one client at a time and its listen backlog is short, so a
    /// connection attempt can be turned away (`EAGAIN`) or wait unanswered while another client
    /// holds the monitor: both are retried or waited out until `timeout`, then reported as
    /// unreachable, since nothing was sent.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let unreachable = |message: String| {
            QmpError::Unreachable(format!("QMP at {}: {message}", path.display()))
        };
        tokio::time::timeout(timeout, Self::handshake(path))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the monitor did not let us in within {timeout:?} (busy with another client?)"
                ))
            })
            .map_err(unreachable)
    }

    async fn handshake(path: &Path) -> Result<Self, String> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(CONNECT_RETRY).await
                }
                Err(e) => return Err(format!("cannot connect: {e}")),
            }
        };
        let (reader, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(reader),
            writer,
            next_id: 1,
            spent: false,
            deleted_exports: Vec::new(),
        };
        let greeting = qmp
            .read_message()
            .await
            .map_err(|e| format!("no greeting: {e}"))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        // Negotiation changes nothing on the daemon, so however it fails, nothing was done.
        qmp.execute("qmp_capabilities", None)
            .await
            .map_err(|e| format!("capabilities negotiation failed: {e}"))?;
        Ok(qmp)
    }

    /// Whether the connection must not be used again (see the module doc).
    pub fn is_spent(&self) -> bool {
        self.spent
    }

    /// The ids of the exports deleted since the last call, as the daemon's events said.
    pub fn take_deleted_exports(&mut self) -> Vec<String> {
        std::mem::take(&mut self.deleted_exports)
    }

    /// Runs a command and returns its `return` value. Of the asynchronous events that arrive
    /// meanwhile, only `BLOCK_EXPORT_DELETED` is kept (see [`take_deleted_exports`]); the others
    /// are skipped.
    ///
    /// [`take_deleted_exports`]: Self::take_deleted_exports
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        if self.spent {
            return Err(QmpError::Unreachable(
                "this QMP connection was given up after an unanswered command".to_owned(),
            ));
        }
        // Cleared only once the reply is read: a caller that stops waiting leaves it set.
        self.spent = true;
        let result = self.exchange(command, arguments).await;
        self.spent = matches!(result, Err(QmpError::LostReply(_)));
        result
    }

    async fn exchange(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = format!("sd-{}", self.next_id);
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        tracing::debug!(%request, "QMP command");
        let mut line = request.to_string();
        line.push('\n');
        let lost = |message: String| QmpError::LostReply(format!("{command}: {message}"));
        // A failed write may still have delivered the whole line, so it is already a lost reply.
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| lost(format!("sending failed: {e}")))?;
        loop {
            let message = self.read_message().await.map_err(lost)?;
            let Value::Object(mut reply) = message else {
                return Err(lost(format!("not a JSON object: {message}")));
            };
            if reply.contains_key("event") {
                let event = Value::Object(reply);
                if event["event"] == "BLOCK_EXPORT_DELETED"
                    && let Some(id) = event.pointer("/data/id").and_then(Value::as_str)
                {
                    self.deleted_exports.push(id.to_owned());
                } else {
                    tracing::debug!(%event, "QMP event skipped");
                }
                continue;
            }
            match reply.get("id") {
                Some(Value::String(reply_id)) if *reply_id == id => {}
                // A command QEMU could not parse is answered without an id; ours is the only one
                // outstanding, so such an error is ours.
                None if reply.contains_key("error") => {}
                _ => {
                    let reply = Value::Object(reply);
                    tracing::debug!(%reply, "QMP reply to another command skipped");
                    continue;
                }
            }
            if let Some(value) = reply.remove("return") {
                return Ok(value);
            }
            if let Some(error) = reply.remove("error") {
                return Err(command_error(error));
            }
            return Err(lost(format!(
                "reply has neither return nor error: {}",
                Value::Object(reply)
            )));
        }
    }

    async fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await {
            Ok(0) => Err("connection closed".to_owned()),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| format!("unreadable message {:?}: {e}", line.trim_end())),
            Err(e) => Err(format!("connection broken: {e}")),
        }
    }
}

fn command_error(error: Value) -> QmpError {
    let field = |map: &Map<String, Value>, key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match &error {
        Value::Object(map) => QmpError::Command {
            class: field(map, "class"),
            desc: field(map, "desc"),
        },
        other => QmpError::Command {
            class: String::new(),
            desc: other.to_string(),
        },
    }
}
