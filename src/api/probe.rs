//! The record of one backend probe, shared by both kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the backend said when it was last asked where this volume is connected.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRecord {
    /// When the backend was asked.
    pub time: Time,
    /// The answer, as seen from this object: NotConnected, Connected (to this object's node, or
    /// for a Volume to any node), ConnectedElsewhere (to other nodes only), Unreachable (no answer;
    /// nothing may be concluded from it) or NotProbeable (the backend cannot say where a volume is
    /// connected; confirmations rest on its idempotent calls returning OK).
    pub result: ProbeResult,
    /// The nodes the backend reports the volume connected to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Why the backend could not answer, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The outcome of a backend probe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProbeResult {
    NotConnected,
    Connected,
    ConnectedElsewhere,
    Unreachable,
    NotProbeable,
}
