//! Storage drivers: how safe-detach talks to a backend. Nothing here knows Kubernetes.
//!
//! A driver answers one question truthfully — where is this volume connected ([`Driver::probe`]) —
//! and performs idempotent connection changes. Every error says whether the call certainly failed
//! ([`ErrorClass::Final`], [`ErrorClass::Retryable`]) or may have happened
//! ([`ErrorClass::UnknownOutcome`]), in which case the caller must probe before deciding.

pub mod csi;
pub mod deadline;
pub mod nbd;

use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use deadline::{CallObserver, Deadlined};

/// What a driver returns when it connects a volume (an NBD URI, a CSI publish context).
pub type ConnectionInfo = BTreeMap<String, String>;

/// A request to connect a volume to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    /// The backend's id of the volume.
    pub volume_handle: String,
    /// The node, as the backend knows it.
    pub node: String,
    /// Initiator details, passed through from the attachment (Cinder's connector).
    pub connector: BTreeMap<String, String>,
    pub read_only: bool,
    /// Refuse with [`DriverError::HeldElsewhere`] if the backend connects the volume to any
    /// other node. The check and the connect are one step at the backend, so that two attaches
    /// racing from anywhere (two reconciles, two replicas) cannot both pass it.
    pub exclusive: bool,
}

/// The backend's answer to "where is this volume connected?".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    /// The nodes the backend connects the volume to.
    pub nodes: BTreeSet<String>,
    /// Connections of the volume that name no node (an export made by hand, under a name this
    /// driver does not give): they may serve any node, this one included.
    pub unattributed: BTreeSet<String>,
}

impl Connections {
    pub fn to(nodes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            nodes: nodes.into_iter().map(Into::into).collect(),
            unattributed: BTreeSet::new(),
        }
    }

    pub fn includes(&self, node: &str) -> bool {
        self.nodes.contains(node)
    }
}

/// How sure we are of what a failed call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The call failed and will fail again until something changes (bad handle, bad config).
    Final,
    /// The call failed without effect; trying again later may succeed.
    Retryable,
    /// The call may or may not have taken effect (timeout, lost reply): probe before deciding.
    UnknownOutcome,
}

/// A driver call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The volume is not connected to the node. Detach paths treat this as success.
    #[error("volume {volume} is not connected to node {node}")]
    NotConnected { volume: String, node: String },
    /// The backend does not know the volume.
    #[error("the backend has no volume {0:?}")]
    UnknownVolume(String),
    /// The volume is in use and a safe (non-forced) call refused to cut it off.
    #[error("volume {volume} is in use on node {node}: {message}")]
    InUse {
        volume: String,
        node: String,
        message: String,
    },
    /// The call exceeded its deadline; it may still complete on the backend.
    #[error("{operation} did not answer within {deadline:?}")]
    Timeout {
        operation: &'static str,
        deadline: Duration,
    },
    /// The connection to the backend broke after the request was sent.
    #[error("lost the backend's reply to {operation}: {message}")]
    LostReply {
        operation: &'static str,
        message: String,
    },
    /// An exclusive attach was refused: the backend connects the volume elsewhere. Nothing was
    /// connected. `holders` names the other nodes where the backend says which.
    #[error(
        "volume {volume} is connected to another node ({}); not attached",
        describe_holders(holders)
    )]
    HeldElsewhere {
        volume: String,
        holders: Vec<String>,
    },
    /// The backend could not be reached; nothing was sent.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The backend refused the request.
    #[error("backend refused: {0}")]
    Refused(String),
    /// The request is invalid for this driver (bad handle, bad node name).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl DriverError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotConnected { .. } | Self::UnknownVolume(_) | Self::Invalid(_) => {
                ErrorClass::Final
            }
            Self::InUse { .. }
            | Self::HeldElsewhere { .. }
            | Self::Unreachable(_)
            | Self::Refused(_) => ErrorClass::Retryable,
            Self::Timeout { .. } | Self::LostReply { .. } => ErrorClass::UnknownOutcome,
        }
    }

    /// A short, stable label for events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotConnected { .. } => "NotConnected",
            Self::UnknownVolume(_) => "UnknownVolume",
            Self::InUse { .. } => "InUse",
            Self::HeldElsewhere { .. } => "HeldElsewhere",
            Self::Timeout { .. } => "Timeout",
            Self::LostReply { .. } => "LostReply",
            Self::Unreachable(_) => "Unreachable",
            Self::Refused(_) => "Refused",
            Self::Invalid(_) => "Invalid",
        }
    }
}

/// A storage backend. Calls are idempotent: attaching an attached volume returns its connection
/// info, detaching a detached one succeeds (or says [`DriverError::NotConnected`]).
#[async_trait]
pub trait Driver: Send + Sync {
    /// The driver's kind, for logs and metrics (`nbd`, `csi`).
    fn kind(&self) -> &'static str;

    /// Whether [`probe`](Self::probe) can say where a volume is connected. A backend that cannot
    /// (a CSI plugin that does not report published nodes) is confirmed only by its own calls:
    /// an idempotent attach or detach that returned OK, as the CSI spec guarantees.
    fn can_probe(&self) -> bool {
        true
    }

    /// How long after its deadline a call may still be carried out by the backend (an operation
    /// the backend started may outlive the cancelled call). Zero for a backend that carries out
    /// or drops a command before it serves anyone else.
    fn settles_within(&self) -> Duration {
        Duration::ZERO
    }

    /// How long after it was sent a call may still be carried out: until then, once its outcome
    /// is unknown (a timeout, a lost reply, however early), no other call or probe on the volume
    /// may be taken as the backend's last word, since an opposite call answered OK meanwhile
    /// could be undone by the late one. A process that starts acting on this backend waits as
    /// long first: the process before it (it died, or another replica led) may have sent a call
    /// just before it was gone. Zero where [`settles_within`](Self::settles_within) is; the
    /// deadline wrapper adds the deadline.
    fn lands_within(&self) -> Duration {
        self.settles_within()
    }

    /// Whether the backend answers at all, for the operator's readiness. Not a probe: it says
    /// nothing of where any volume is connected (the csi driver calls CSI's `Probe` here).
    async fn health_check(&self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Where the backend connects the volume. The truth every decision rests on.
    async fn probe(&self, volume_handle: &str) -> Result<Connections, DriverError>;

    /// Whether [`probe_many`](Self::probe_many) answers for many volumes from one look at the
    /// backend, so that one call can tell which of thousands of converged records still match it.
    fn can_probe_many(&self) -> bool {
        false
    }

    /// What [`probe`](Self::probe) would answer for each of `volume_handles`, by handle; a handle
    /// the driver cannot take (an invalid one) is left out. The default probes one after another.
    async fn probe_many(
        &self,
        volume_handles: &[String],
    ) -> Result<BTreeMap<String, Connections>, DriverError> {
        let mut answers = BTreeMap::new();
        for handle in volume_handles {
            match self.probe(handle).await {
                Ok(connections) => {
                    answers.insert(handle.clone(), connections);
                }
                Err(DriverError::Invalid(_) | DriverError::UnknownVolume(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(answers)
    }

    /// Connects the volume to the node (Cinder's `initialize_connection` and `attach` in one).
    async fn attach(&self, request: &AttachRequest) -> Result<ConnectionInfo, DriverError>;

    /// Tears down the backend's connection to the node, refusing if that would cut off a user.
    async fn terminate_connection(
        &self,
        volume_handle: &str,
        node: &str,
    ) -> Result<(), DriverError>;

    /// Releases whatever the attach reserved besides the connection.
    async fn detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError>;

    /// Disconnects the volume from the node even if in use. "Not connected" is success. The default
    /// is `terminate_connection` then `detach`; a backend that can cut users off overrides it.
    async fn force_detach(&self, volume_handle: &str, node: &str) -> Result<(), DriverError> {
        ok_if_not_connected(self.terminate_connection(volume_handle, node).await)?;
        ok_if_not_connected(self.detach(volume_handle, node).await)
    }
}

fn describe_holders(holders: &[String]) -> String {
    if holders.is_empty() {
        "the backend does not say which".to_owned()
    } else {
        holders.join(", ")
    }
}

/// Maps [`DriverError::NotConnected`] to success, as every detach path wants.
pub fn ok_if_not_connected(result: Result<(), DriverError>) -> Result<(), DriverError> {
    match result {
        Err(DriverError::NotConnected { .. }) => Ok(()),
        other => other,
    }
}
