//! `Volume`: a backend volume that safe-detach manages.

use super::condition::conditions_schema;
use super::probe::ProbeRecord;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where and how to reach the volume on its backend, and how safe-detach treats its attachments.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "safedetach.io",
    version = "v1alpha1",
    kind = "Volume",
    doc = "A block volume on a storage backend that safe-detach manages through one of its drivers. Connect it to a node with a VolumeAttachment (volumeattachments.safedetach.io).",
    status = "VolumeStatus",
    shortname = "sdvol",
    category = "safedetach",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Driver","type":"string","jsonPath":".spec.driver"}"#,
    printcolumn = r#"{"name":"Handle","type":"string","jsonPath":".spec.volumeHandle"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","jsonPath":".status.connectedNodes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.volumeHandle"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Name of a driver configured in the operator (for example `nbd` or `csi`). Immutable.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("driver is immutable"))]
    pub driver: String,

    /// The backend's own identifier of the volume (an image name, a CSI volume id). Immutable.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("volumeHandle is immutable"))]
    pub volume_handle: String,

    /// Whether more than one node may be connected at once. When false (the default), an attach to
    /// a node is refused while the backend still shows the volume connected to another node.
    #[serde(default)]
    pub multi_attach: bool,

    /// How long an attachment may stay Attaching or Detaching before it counts as stuck and is
    /// probed and resolved, as a duration such as `90s`, `5m` or `1h30m` (between 5s and 168h).
    /// Unset: the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('5s') && duration(self) <= duration('168h')")
        .message("stuckAfter must be between 5s and 168h"))]
    pub stuck_after: Option<String>,

    /// Whether stuck attachments of this volume are resolved without a person: probed, then cleaned
    /// up with a backend-confirmed force-detach. Default true. When false, a stuck attachment is only
    /// reported (condition Stuck, an Event) until someone sets the force-detach annotation.
    #[serde(default = "default_true")]
    pub auto_force_detach: bool,

    /// What to do with a backend connection that no VolumeAttachment claims: `Report` (a condition,
    /// an Event and a metric; the default) or `Detach` (a backend-confirmed force-detach). Under
    /// `Detach` a deleted Volume stays until its unclaimed connections are forced off.
    #[serde(default)]
    pub orphan_policy: OrphanPolicy,
}

fn default_true() -> bool {
    true
}

/// What to do with a backend connection that no VolumeAttachment claims.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OrphanPolicy {
    #[default]
    Report,
    Detach,
}

/// The observed state of a Volume, from the backend's point of view.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// Available (connected nowhere), Attaching, InUse (connected to at least one node),
    /// Detaching, or Error (the volume or its driver is misconfigured; see conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VolumePhase>,

    /// The nodes the backend reported as connected at the last probe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connected_nodes: Vec<String>,

    /// The last answer of the backend about this volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeRecord>,

    /// Backend connections that no VolumeAttachment claims.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<Orphan>,

    /// Conditions: `Ready` (the driver is known and the backend answers) and `Orphaned`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The phase of a Volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    Available,
    Attaching,
    InUse,
    Detaching,
    Error,
}

/// A backend connection that no VolumeAttachment claims.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Orphan {
    /// The node the backend connects the volume to.
    pub node: String,
    /// When the operator first saw this connection unclaimed.
    pub since: Time,
}
