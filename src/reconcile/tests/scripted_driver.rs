//! A driver whose backend is a set of (volume, node) connections in memory, with failures
//! scripted call by call; every call is written to the shared [`Log`].

use super::Log;
use crate::driver::{AttachRequest, ConnectionInfo, Connections, Driver, DriverError};
use async_trait::async_trait;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct ScriptedDriver {
    log: Log,
    connections: Mutex<BTreeSet<(String, String)>>,
    /// The next calls that fail, by operation, in order.
    failures: Mutex<VecDeque<(&'static str, DriverError)>>,
    /// What happens elsewhere while the next call of an operation is under way, in order.
    meanwhile: Mutex<VecDeque<(&'static str, Meanwhile)>>,
    /// Whether the backend cannot be asked where a volume is connected (a CSI plugin that does
    /// not report published nodes), and attaches to any node it is asked to.
    unprobeable: AtomicBool,
    /// How long the backend may carry out a call after its caller gave up on it.
    settles_within: Mutex<std::time::Duration>,
    /// How long the next call of an operation takes, by operation, in order.
    slow: Mutex<VecDeque<(&'static str, std::time::Duration)>>,
}

type Meanwhile = Box<dyn FnOnce() + Send>;

impl ScriptedDriver {
    pub fn new(log: Log) -> Self {
        Self {
            log,
            connections: Mutex::new(BTreeSet::new()),
            failures: Mutex::new(VecDeque::new()),
            meanwhile: Mutex::new(VecDeque::new()),
            unprobeable: AtomicBool::new(false),
            settles_within: Mutex::new(std::time::Duration::ZERO),
            slow: Mutex::new(VecDeque::new()),
        }
    }

    /// The next call of `operation` takes `duration` before it answers.
    pub fn takes(&self, operation: &'static str, duration: std::time::Duration) {
        self.slow
            .lock()
            .expect("the script")
            .push_back((operation, duration));
    }

    /// Waits as long as the script says the call of `operation` takes.
    async fn take_time(&self, operation: &'static str) {
        let duration = {
            let mut slow = self.slow.lock().expect("the script");
            if slow.front().is_some_and(|(op, _)| *op == operation) {
                slow.pop_front().map(|(_, duration)| duration)
            } else {
                None
            }
        };
        if let Some(duration) = duration {
            tokio::time::sleep(duration).await;
        }
    }

    /// From now on a call whose caller gave up may still be carried out for up to `within`.
    pub fn lands_late_within(&self, within: std::time::Duration) {
        *self.settles_within.lock().expect("the script") = within;
    }

    /// From now on the backend cannot be probed, and refuses no attach.
    pub fn cannot_probe(&self) {
        self.unprobeable.store(true, Ordering::SeqCst);
    }

    /// The next call of `operation` fails with `error` (and changes nothing).
    pub fn fail_next(&self, operation: &'static str, error: DriverError) {
        self.failures
            .lock()
            .expect("the script")
            .push_back((operation, error));
    }

    /// Runs `change` while the next call of `operation` is under way (another client's write
    /// that lands during the call).
    pub fn meanwhile(&self, operation: &'static str, change: impl FnOnce() + Send + 'static) {
        self.meanwhile
            .lock()
            .expect("the script")
            .push_back((operation, Box::new(change)));
    }

    /// Whether the backend connects `volume` to `node`.
    pub fn connects(&self, volume: &str, node: &str) -> bool {
        self.connections
            .lock()
            .expect("the backend")
            .contains(&(volume.to_owned(), node.to_owned()))
    }

    /// Connects `volume` to `node` behind the operator's back.
    pub fn connect(&self, volume: &str, node: &str) {
        self.connections
            .lock()
            .expect("the backend")
            .insert((volume.to_owned(), node.to_owned()));
    }

    /// Logs the call, and answers the scripted failure if one is due.
    fn call(
        &self,
        operation: &'static str,
        volume: &str,
        node: Option<&str>,
    ) -> Result<(), DriverError> {
        let entry = match node {
            Some(node) => format!("driver {operation} {volume} {node}"),
            None => format!("driver {operation} {volume}"),
        };
        self.log.lock().expect("the log").push(entry);
        let change = {
            let mut meanwhile = self.meanwhile.lock().expect("the script");
            if meanwhile.front().is_some_and(|(op, _)| *op == operation) {
                meanwhile.pop_front().map(|(_, change)| change)
            } else {
                None
            }
        };
        if let Some(change) = change {
            change();
        }
        let mut failures = self.failures.lock().expect("the script");
        if failures.front().is_some_and(|(op, _)| *op == operation)
            && let Some((_, error)) = failures.pop_front()
        {
            return Err(error);
        }
        Ok(())
    }

    /// Ends the connection of `volume` to `node`.
    pub fn disconnect(&self, volume: &str, node: &str) {
        self.connections
            .lock()
            .expect("the backend")
            .remove(&(volume.to_owned(), node.to_owned()));
    }
}

#[async_trait]
impl Driver for ScriptedDriver {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn can_probe(&self) -> bool {
        !self.unprobeable.load(Ordering::SeqCst)
    }

    fn settles_within(&self) -> std::time::Duration {
        *self.settles_within.lock().expect("the script")
    }

    async fn probe(&self, volume_handle: &str) -> Result<Connections, DriverError> {
        self.call("probe", volume_handle, None)?;
        let connections = self.connections.lock().expect("the backend");
        Ok(Connections::to(
            connections
                .iter()
                .filter(|(volume, _)| volume == volume_handle)
                .map(|(_, node)| node.clone()),
        ))
    }

    async fn attach(&self, request: &AttachRequest) -> Result<ConnectionInfo, DriverError> {
        self.call("attach", &request.volume_handle, Some(&request.node))?;
        self.connections
            .lock()
            .expect("the backend")
            .insert((request.volume_handle.clone(), request.node.clone()));
        Ok(ConnectionInfo::from([(
            "uri".to_owned(),
            format!("scripted://{}", request.volume_handle),
        )]))
    }

    async fn terminate_connection(
        &self,
        volume_handle: &str,
        node: &str,
    ) -> Result<(), DriverError> {
        self.take_time("terminate_connection").await;
        self.call("terminate_connection", volume_handle, Some(node))
    }

    async fn detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        self.call("detach", volume_handle, Some(node))?;
        self.disconnect(volume_handle, node);
        Ok(())
    }

    async fn force_detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        self.call("force_detach", volume_handle, Some(node))?;
        self.disconnect(volume_handle, node);
        Ok(())
    }
}
