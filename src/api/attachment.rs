//! `VolumeAttachment`: one volume on one node. Its existence is the desired state "attached";
//! its deletion, held by a finalizer until the backend confirms, is "detached".

use super::condition::conditions_schema;
use super::probe::ProbeRecord;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which volume to connect to which node, and how.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "safedetach.io",
    version = "v1alpha1",
    kind = "VolumeAttachment",
    doc = "The wish that a Volume be connected to a node. Delete it to detach: its finalizer is released only once the backend confirms the volume is disconnected. To force a stuck one loose, annotate it with safedetach.io/force-detach=<new token>.",
    status = "VolumeAttachmentStatus",
    shortname = "sdva",
    category = "safedetach",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeName"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Attached","type":"boolean","jsonPath":".status.attached"}"#,
    printcolumn = r#"{"name":"In Phase","type":"date","jsonPath":".status.phaseSince","description":"How long the attachment has been in its phase: for Attaching or Detaching, the stuck clock."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.volumeName"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentSpec {
    /// Name of the Volume to connect. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("volumeName is immutable"))]
    pub volume_name: String,

    /// Name of the node to connect the volume to, as the backend knows it (for CSI: the node id).
    /// Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,

    /// Initiator details handed to the driver when connecting, as Cinder's connector
    /// (for example `initiator`, `host`, `ip`). Drivers document the keys they read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<BTreeMap<String, String>>,

    /// Connect the volume read-only. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// The observed state of an attachment. Everything here that says where the volume is connected
/// was confirmed by the backend.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentStatus {
    /// Pending, Attaching, Attached, Detaching, Detached or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AttachmentPhase>,

    /// True only when the backend confirmed the volume connected to this node.
    #[serde(default)]
    pub attached: bool,

    /// When the current phase began. Changes only on a phase change: the clock for stuck detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Time>,

    /// What the driver returned when it connected the volume (for nbd: the NBD URI; for CSI: the
    /// publish context). Kept so that a detach needs nothing else.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connection_info: BTreeMap<String, String>,

    /// The last answer of the backend about this volume and node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeRecord>,

    /// The last force-detach: the request it served, and how it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_detach: Option<ForceDetachStatus>,

    /// What the attachment connected, recorded with its intent to attach and cleared once the
    /// backend confirms it detached: the detach goes there, whatever its Volume names by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<Binding>,

    /// The `safedetach.io/force-detach` tokens already handled, oldest first, at most 16: each
    /// acted on once, or was present when the operator first saw the attachment (a past request
    /// carried by a re-created or restored manifest, recorded without acting). A token listed
    /// here never acts again; set a new one to ask again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handled_tokens: Vec<String>,

    /// Conditions: `Ready` (attached and confirmed), `Stuck` (in Attaching or Detaching past the
    /// volume's stuckAfter), `BackendInSync` (the backend agrees with this record) and
    /// `AttachBlocked` (another node holds the volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The backend volume an attachment connected, and the Volume it connected it through.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// The driver's name in the operator's configuration.
    pub driver: String,
    /// The backend's id of the volume.
    pub volume_handle: String,
    /// The UID of the Volume: a Volume of the same name created later is another Volume.
    pub volume_uid: String,
}

/// The phase of an attachment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AttachmentPhase {
    Pending,
    Attaching,
    Attached,
    Detaching,
    Detached,
    Failed,
}

/// A force-detach: asked for by a person through the annotation, or started by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForceDetachStatus {
    /// The value of the `safedetach.io/force-detach` annotation this force-detach served. A request
    /// with the same token is not acted on again; set a new token to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Why it ran: Requested, StuckAttaching, StuckDetaching or Orphan.
    pub reason: ForceDetachReason,
    /// InProgress (retried until the backend confirms; `message` says what it answered last) or
    /// Succeeded (the backend confirmed the volume disconnected).
    pub state: ForceDetachState,
    /// How many times the driver's force_detach was called for it.
    #[serde(default)]
    pub attempts: u32,
    /// When it started.
    pub started_at: Time,
    /// When it ended, confirmed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// What the backend said last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why a force-detach ran.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ForceDetachReason {
    Requested,
    StuckAttaching,
    StuckDetaching,
    Orphan,
}

/// How a force-detach is going.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ForceDetachState {
    InProgress,
    Succeeded,
}
