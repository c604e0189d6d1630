//! Conditions as the Kubernetes API conventions define them, and the one way this project
//! changes them: a condition's `lastTransitionTime` moves only when its status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator};

/// The status of a condition, as the API conventions spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// The condition types this project sets: public API (`kubectl describe`, alerts, dashboards),
/// named once here.
pub mod types {
    /// VolumeAttachment and Volume: whether the object is what it asks for.
    pub const READY: &str = "Ready";
    /// VolumeAttachment: in Attaching or Detaching past `stuckAfter`.
    pub const STUCK: &str = "Stuck";
    /// VolumeAttachment: whether the record agrees with the backend's last answer.
    pub const BACKEND_IN_SYNC: &str = "BackendInSync";
    /// VolumeAttachment: a single-attach volume is held by another node.
    pub const ATTACH_BLOCKED: &str = "AttachBlocked";
    /// VolumeAttachment: a force-detach request was not taken.
    pub const REQUEST_REJECTED: &str = "RequestRejected";
    /// Volume: a connection no attachment claims.
    pub const ORPHANED: &str = "Orphaned";
    /// Volume: a single-attach volume connected to more than one node (two writers).
    pub const MULTI_ATTACHED: &str = "MultiAttached";
}

/// The reasons of the conditions and Events this project sets: public API as much as the types
/// (`kubectl describe`, `kubectl get events --field-selector reason=...`, alerts), named once
/// here. A Ready condition that follows the phase has the phase's name as its reason
/// ([`PHASES`](reasons::PHASES)).
pub mod reasons {
    pub const AT_MOST_ONE_NODE: &str = "AtMostOneNode";
    pub const ATTACH_FAILED: &str = "AttachFailed";
    pub const ATTACHED: &str = "Attached";
    pub const ATTACHING: &str = "Attaching";
    pub const BACKEND_ANSWERS: &str = "BackendAnswers";
    pub const BACKEND_UNREACHABLE: &str = "BackendUnreachable";
    pub const CONNECTED_TO_SEVERAL_NODES: &str = "ConnectedToSeveralNodes";
    pub const CONNECTED_UNEXPECTEDLY: &str = "ConnectedUnexpectedly";
    pub const CONNECTION_KEPT: &str = "ConnectionKept";
    pub const CONNECTION_LOST: &str = "ConnectionLost";
    pub const DETACH_FAILED: &str = "DetachFailed";
    pub const DETACHED: &str = "Detached";
    pub const DETACHING: &str = "Detaching";
    pub const DUPLICATE_VOLUME_HANDLE: &str = "DuplicateVolumeHandle";
    pub const FAILED: &str = "Failed";
    pub const FORCE_DETACH_FAILED: &str = "ForceDetachFailed";
    pub const FORCE_DETACH_UNCONFIRMED: &str = "ForceDetachUnconfirmed";
    pub const FORCE_DETACHED: &str = "ForceDetached";
    pub const FORCE_DETACHING: &str = "ForceDetaching";
    pub const HANDED_OVER: &str = "HandedOver";
    pub const HELD_BY_ANOTHER_NODE: &str = "HeldByAnotherNode";
    /// A backend that cannot be probed, and another node's attachment records the volume
    /// attached there: a single-attach volume waits for that attachment's confirmed detach.
    pub const CLAIMED_BY_ANOTHER_NODE: &str = "ClaimedByAnotherNode";
    pub const IN_SYNC: &str = "InSync";
    pub const INVALID_TOKEN: &str = "InvalidToken";
    pub const INVALID_VOLUME: &str = "InvalidVolume";
    pub const MULTI_ATTACHED: &str = "MultiAttached";
    pub const NO_INVALID_REQUEST: &str = "NoInvalidRequest";
    pub const NO_ORPHANS: &str = "NoOrphans";
    pub const NOT_CONNECTED: &str = "NotConnected";
    pub const NOT_HELD: &str = "NotHeld";
    pub const NOT_PROBEABLE: &str = "NotProbeable";
    pub const NOT_STUCK: &str = "NotStuck";
    pub const PENDING: &str = "Pending";
    pub const ROLLED_FORWARD: &str = "RolledForward";
    pub const STUCK_ATTACHING: &str = "StuckAttaching";
    pub const STUCK_DETACHING: &str = "StuckDetaching";
    pub const TOKEN_PRESENT_AT_CREATION: &str = "TokenPresentAtCreation";
    pub const UNATTRIBUTED_CONNECTION: &str = "UnattributedConnection";
    pub const UNCLAIMED_CONNECTION: &str = "UnclaimedConnection";
    pub const UNKNOWN_DRIVER: &str = "UnknownDriver";
    pub const VOLUME_DELETING: &str = "VolumeDeleting";
    pub const VOLUME_NOT_FOUND: &str = "VolumeNotFound";
    pub const VOLUME_REPLACED: &str = "VolumeReplaced";
    pub const WAITING_FOR_ATTACHMENTS: &str = "WaitingForAttachments";
    /// A deleted Volume under `orphanPolicy: Detach` whose backend does not answer.
    pub const WAITING_FOR_BACKEND: &str = "WaitingForBackend";
    /// A deleted Volume under `orphanPolicy: Detach` with connections no attachment claims.
    pub const WAITING_FOR_ORPHANS: &str = "WaitingForOrphans";

    /// The reasons of a Ready condition that only names the phase: nothing to tell beyond it.
    pub const PHASES: [&str; 6] = [PENDING, ATTACHING, ATTACHED, DETACHING, DETACHED, FAILED];
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Finds a condition by type, if it has `status`.
pub fn condition_with<'a>(
    conditions: &'a [Condition],
    type_: &str,
    status: ConditionStatus,
) -> Option<&'a Condition> {
    find_condition(conditions, type_).filter(|c| c.status == status.as_str())
}

/// Whether the condition of `type_` is there and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    condition_with(conditions, type_, ConditionStatus::True).is_some()
}

/// Sets a condition in place. `lastTransitionTime` keeps its old value unless the status
/// flips, so recomputing an unchanged condition never produces a write.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) {
    let message = message.into();
    let status = status.as_str().to_owned();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now;
                existing.status = status;
            }
            existing.reason = reason.to_owned();
            existing.message = message;
            existing.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            observed_generation,
            last_transition_time: now,
        }),
    }
}

/// Gives the condition of `type_` in `conditions` the `lastTransitionTime` it has in `before`,
/// if its status is the same there: for a condition set twice in one decision, the second
/// setting flipping it back.
pub fn keep_transition_time(before: &[Condition], conditions: &mut [Condition], type_: &str) {
    if let Some(before) = find_condition(before, type_)
        && let Some(now) = conditions.iter_mut().find(|c| c.type_ == type_)
        && now.status == before.status
    {
        now.last_transition_time = before.last_transition_time.clone();
    }
}

/// Schema of a condition list: a list-map keyed by `type`, so server-side apply merges
/// conditions by type instead of replacing the list.
pub(crate) fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema.insert(
        "description".into(),
        "The latest observations of this object's state, one per condition type.".into(),
    );
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "Attaching",
            "a",
            Some(1),
            at(10),
        );
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "Attaching",
            "b",
            Some(2),
            at(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert_eq!(conditions[0].message, "b");
        assert_eq!(conditions[0].observed_generation, Some(2));

        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::True,
            "Attached",
            "c",
            Some(2),
            at(30),
        );
        assert_eq!(conditions[0].last_transition_time, at(30));
        assert_eq!(conditions[0].status, "True");
        assert_eq!(
            find_condition(&conditions, "Ready").unwrap().reason,
            "Attached"
        );
        assert!(find_condition(&conditions, "Stuck").is_none());
    }
}
