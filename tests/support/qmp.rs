//! The tests' own QMP client: how a test, a fixture or the campaign's observer asks a
//! `qemu-storage-daemon` directly what it has, past the driver and any proxy. [`execute`] sends one
//! command per connection, so that the daemon's monitor, which serves one client at a time, is
//! held for as short as possible; a [`Session`] keeps one connection for many.

use serde_json::{Value, json};
use std::fmt;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How long one command may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Why a command has no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpError {
    /// The daemon could not be asked: no socket, a closed connection, no reply within
    /// [`TIMEOUT`].
    Unreachable(String),
    /// The daemon answered with an `error` object.
    Refused(Value),
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(why) => write!(f, "QMP unreachable: {why}"),
            Self::Refused(error) => write!(f, "{error}"),
        }
    }
}

/// Runs `command` on the daemon's QMP socket, on a connection of its own, and returns its
/// `return` value.
pub async fn execute(socket: &Path, command: &str, arguments: Value) -> Result<Value, QmpError> {
    let one = async {
        let mut session = Session::connect(socket).await?;
        session.execute(command, arguments).await
    };
    tokio::time::timeout(TIMEOUT, one)
        .await
        .unwrap_or_else(|_| {
            Err(QmpError::Unreachable(format!(
                "no reply within {TIMEOUT:?}"
            )))
        })
}

/// One connection to the monitor, capabilities negotiated, for a client that sends many commands
/// one after another (the benchmark's plain client). It holds the monitor while it lives.
pub struct Session {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Session {
    pub async fn connect(socket: &Path) -> Result<Self, QmpError> {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                // The monitor's backlog is full while it serves another client: try again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(unreachable(e)),
            }
        };
        let (reader, writer) = stream.into_split();
        let mut session = Self {
            lines: BufReader::new(reader).lines(),
            writer,
        };
        let greeting = session.next_reply().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Unreachable(format!("no greeting: {greeting}")));
        }
        session.execute("qmp_capabilities", json!({})).await?;
        Ok(session)
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = json!({ "execute": command, "arguments": arguments });
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(unreachable)?;
        let mut reply = self.next_reply().await?;
        match reply.get_mut("error") {
            Some(error) => Err(QmpError::Refused(error.take())),
            None => Ok(reply["return"].take()),
        }
    }

    /// The next message that is not an asynchronous event.
    async fn next_reply(&mut self) -> Result<Value, QmpError> {
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .map_err(unreachable)?
                .ok_or_else(|| QmpError::Unreachable("connection closed".into()))?;
            let message: Value = serde_json::from_str(&line)
                .map_err(|e| QmpError::Unreachable(format!("not QMP: {e}: {line}")))?;
            if message.get("event").is_none() {
                return Ok(message);
            }
        }
    }
}

fn unreachable(e: std::io::Error) -> QmpError {
    QmpError::Unreachable(e.to_string())
}

/// The sorted ids in a `query-block-exports` answer.
pub fn export_ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// The sorted names in a `query-named-block-nodes` answer, QEMU's automatic `#block…` names left
/// out.
pub fn named_block_nodes(answer: &Value) -> Vec<String> {
    let mut names: Vec<String> = answer
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|name| !name.starts_with('#'))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}
