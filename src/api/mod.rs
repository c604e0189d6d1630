//! The public API: the `safedetach.io/v1alpha1` custom resources.
//!
//! These types are the contract with users (`kubectl explain` reads their doc comments) and
//! know nothing of drivers or of the controller. `crds/` is generated from them.

mod attachment;
mod condition;
mod duration;
mod probe;
mod volume;

pub use attachment::{
    AttachmentPhase, Binding, ForceDetachReason, ForceDetachState, ForceDetachStatus,
    VolumeAttachment, VolumeAttachmentSpec, VolumeAttachmentStatus,
};
pub use condition::{
    ConditionStatus, condition_with, find_condition, is_true, keep_transition_time, reasons,
    set_condition, types,
};
pub use duration::{DurationError, parse_duration};
pub use probe::{ProbeRecord, ProbeResult};
pub use volume::{Orphan, OrphanPolicy, Volume, VolumePhase, VolumeSpec, VolumeStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every safe-detach resource.
pub const GROUP: &str = "safedetach.io";

/// The annotation a person sets to request a force-detach; its value is the request token.
pub const FORCE_DETACH_ANNOTATION: &str = "safedetach.io/force-detach";

/// The finalizer that holds a `VolumeAttachment` until the backend confirms the detach.
pub const ATTACHMENT_FINALIZER: &str = "safedetach.io/detach";

/// The finalizer that holds a `Volume` while a `VolumeAttachment` names it, so that the
/// attachment's detach can still reach the backend.
pub const VOLUME_FINALIZER: &str = "safedetach.io/attachments";

/// The field selector path of a `VolumeAttachment`'s Volume (a selectable field of its CRD):
/// `kubectl get sdva --field-selector spec.volumeName=<volume>`.
pub const VOLUME_NAME_FIELD: &str = "spec.volumeName";

/// The field selector path of a `Volume`'s backend volume (a selectable field of its CRD):
/// `kubectl get sdvol --field-selector spec.volumeHandle=<handle>` lists a volume's aliases.
pub const VOLUME_HANDLE_FIELD: &str = "spec.volumeHandle";

/// Both CRDs, in the order they are installed.
pub fn crds() -> [CustomResourceDefinition; 2] {
    [Volume::crd(), VolumeAttachment::crd()]
}

/// Both CRDs as one multi-document YAML stream, as kept in `crds/`.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
