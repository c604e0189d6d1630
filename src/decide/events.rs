//! The Events a person should notice, read off a status transition: each fires once, when what it
//! reports flips, so a stuck or failing attachment does not flood the event stream.

use super::ProbeAnswer;
use crate::api::reasons;
use crate::api::types::{ATTACH_BLOCKED, MULTI_ATTACHED, ORPHANED, READY, REQUEST_REJECTED, STUCK};
use crate::api::{
    AttachmentPhase, ConditionStatus, ForceDetachState, ForceDetachStatus, OrphanPolicy,
    VolumeAttachmentStatus, VolumePhase, VolumeStatus, condition_with, find_condition, is_true,
};
use crate::driver::DriverError;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Whether an Event reports the normal course of things or something to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// An Event to publish on the attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub severity: Severity,
    /// Stable CamelCase reason, for filtering.
    pub reason: String,
    pub message: String,
}

impl Notice {
    fn new(severity: Severity, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The failure the status reports (its Ready condition False, by reason). It was told when it was
/// first recorded: a reconcile that meets it again at a retry does not tell it again.
pub fn reported_failure(status: &VolumeAttachmentStatus) -> Option<String> {
    condition_with(&status.conditions, READY, ConditionStatus::False).map(|c| c.reason.clone())
}

/// Whether `notice` tells something other than the failure already `reported` (see
/// [`reported_failure`]).
pub fn is_news(notice: &Notice, reported: Option<&str>) -> bool {
    Some(notice.reason.as_str()) != reported
}

/// The events that the transition from `old` to `new` deserves.
pub fn between(
    old: &VolumeAttachmentStatus,
    new: &VolumeAttachmentStatus,
    volume: &str,
    node: &str,
) -> Vec<Notice> {
    let mut notices = Vec::new();
    // An automatic force that resolves a phase stuck just now says so itself: the Stuck
    // condition's own Warning would tell the same in a second Event.
    let stuck_now = flipped_true(old, new, STUCK);
    let mut stuck_told = false;

    if let Some(force) = &new.force_detach
        && old.force_detach.as_ref().is_none_or(|o| {
            o.state != force.state || o.token != force.token || o.reason != force.reason
        })
    {
        match force.state {
            ForceDetachState::InProgress => {
                let why = match stuck_now.filter(|_| force.token.is_none()) {
                    Some(stuck) => {
                        stuck_told = true;
                        format!("{}; {}", stuck.message, describe(force))
                    }
                    None => describe(force),
                };
                notices.push(Notice::new(
                    Severity::Warning,
                    reasons::FORCE_DETACHING,
                    format!("forcing volume {volume} off node {node}: {why}"),
                ));
            }
            ForceDetachState::Succeeded => notices.push(Notice::new(
                Severity::Warning,
                reasons::FORCE_DETACHED,
                format!("volume {volume} was force-detached from node {node}, confirmed by the backend: {}", describe(force)),
            )),
        }
    }

    for token in new
        .handled_tokens
        .iter()
        .filter(|t| !old.handled_tokens.contains(t))
        .filter(|t| new.force_detach.as_ref().and_then(|f| f.token.as_ref()) != Some(*t))
    {
        notices.push(Notice::new(
            Severity::Normal,
            reasons::TOKEN_PRESENT_AT_CREATION,
            format!(
                "the force-detach token {token:?} was on the attachment when it was created: recorded as handled, not acted on; set a new token to force a detach"
            ),
        ));
    }

    if old.phase != new.phase {
        match new.phase {
            Some(AttachmentPhase::Attached) => {
                let reason = find_condition(&new.conditions, READY)
                    .map_or(reasons::ATTACHED, |c| c.reason.as_str());
                notices.push(Notice::new(
                    Severity::Normal,
                    reason,
                    format!("the backend confirms volume {volume} is connected to node {node}"),
                ));
            }
            Some(AttachmentPhase::Detached)
                if !notices.iter().any(|n| n.reason == reasons::FORCE_DETACHED) =>
            {
                notices.push(Notice::new(
                    Severity::Normal,
                    reasons::DETACHED,
                    format!(
                        "the backend confirms volume {volume} is disconnected from node {node}"
                    ),
                ));
            }
            _ => {}
        }
    }

    for (type_, severity) in [
        (STUCK, Severity::Warning),
        (ATTACH_BLOCKED, Severity::Warning),
        (REQUEST_REJECTED, Severity::Warning),
    ] {
        if type_ == STUCK && stuck_told {
            continue;
        }
        if let Some(condition) = flipped_true(old, new, type_) {
            notices.push(Notice::new(
                severity,
                condition.reason.clone(),
                condition.message.clone(),
            ));
        }
    }

    // A new reason for not being ready, other than the plain phase names, is a problem to notice.
    if let Some(ready) = condition_with(&new.conditions, READY, ConditionStatus::False)
        && !reasons::PHASES.contains(&ready.reason.as_str())
        && find_condition(&old.conditions, READY).is_none_or(|o| o.reason != ready.reason)
    {
        notices.push(Notice::new(
            Severity::Warning,
            ready.reason.clone(),
            ready.message.clone(),
        ));
    }

    notices
}

fn flipped_true<'a>(
    old: &VolumeAttachmentStatus,
    new: &'a VolumeAttachmentStatus,
    type_: &str,
) -> Option<&'a Condition> {
    let now = condition_with(&new.conditions, type_, ConditionStatus::True)?;
    (!is_true(&old.conditions, type_)).then_some(now)
}

fn describe(force: &ForceDetachStatus) -> String {
    let token = force
        .token
        .as_deref()
        .map(|t| format!(", token {t:?}"))
        .unwrap_or_default();
    format!(
        "reason {:?}{token}, attempt {}",
        force.reason, force.attempts
    )
}

/// The events of a connection handed over from a deleted attachment to another one of the same
/// Volume and node: one on each, naming the other.
pub fn handed_over(from: &str, to: &str, volume: &str, node: &str) -> (Notice, Notice) {
    (
        Notice::new(
            Severity::Normal,
            reasons::HANDED_OVER,
            format!(
                "released without a detach: attachment {to} claims the same connection of volume {volume} to node {node}, which stays"
            ),
        ),
        Notice::new(
            Severity::Normal,
            reasons::CONNECTION_KEPT,
            format!(
                "attachment {from} was deleted; the connection of volume {volume} to node {node} it shared with this one stays"
            ),
        ),
    )
}

/// The event of an attachment whose connection another attachment's confirmed detach cut (the
/// same volume on the same node, claimed by both).
pub fn cut_by_another(by: &str, volume: &str, node: &str) -> Notice {
    Notice::new(
        Severity::Warning,
        reasons::CONNECTION_LOST,
        format!(
            "the connection of volume {volume} to node {node} was cut by the detach of attachment {by}, which claimed it too; attaching again"
        ),
    )
}

/// The events the Volume's status change from `old` to `new` deserves: a connection to more
/// nodes than a single-attach volume allows, each new orphan, a Volume that became unusable (or
/// unusable for another reason), and a deletion that waits for its attachments. Each once, when
/// it appears.
pub fn volume_between(
    old: &VolumeStatus,
    new: &VolumeStatus,
    volume: &str,
    orphan_policy: OrphanPolicy,
) -> Vec<Notice> {
    fn multi_attached(status: &VolumeStatus) -> Option<&Condition> {
        condition_with(&status.conditions, MULTI_ATTACHED, ConditionStatus::True)
    }
    fn unusable(status: &VolumeStatus) -> Option<&Condition> {
        condition_with(&status.conditions, READY, ConditionStatus::False)
            .filter(|_| status.phase == Some(VolumePhase::Error))
    }
    fn waiting(status: &VolumeStatus) -> Option<&Condition> {
        find_condition(&status.conditions, READY).filter(|c| {
            [
                reasons::WAITING_FOR_ATTACHMENTS,
                reasons::WAITING_FOR_ORPHANS,
                reasons::WAITING_FOR_BACKEND,
            ]
            .contains(&c.reason.as_str())
        })
    }
    let mut notices = Vec::new();
    if let Some(condition) = multi_attached(new)
        && multi_attached(old).is_none()
    {
        notices.push(Notice::new(
            Severity::Warning,
            MULTI_ATTACHED,
            condition.message.clone(),
        ));
    }
    for orphan in new
        .orphans
        .iter()
        .filter(|o| !old.orphans.iter().any(|c| c.node == o.node))
    {
        notices.push(Notice::new(
            Severity::Warning,
            ORPHANED,
            format!(
                "the backend connects volume {volume} to node {} but no VolumeAttachment claims it (orphanPolicy {orphan_policy:?})",
                orphan.node
            ),
        ));
    }
    if let Some(condition) = unusable(new)
        && unusable(old).is_none_or(|c| c.reason != condition.reason)
    {
        notices.push(Notice::new(
            Severity::Warning,
            condition.reason.clone(),
            condition.message.clone(),
        ));
    }
    if let Some(condition) = waiting(new)
        && waiting(old).is_none_or(|c| c.reason != condition.reason)
    {
        notices.push(Notice::new(
            Severity::Normal,
            condition.reason.clone(),
            condition.message.clone(),
        ));
    }
    notices
}

/// The Event of a deleted Volume released while its backend still connects it (`leaves`, see
/// [`crate::decide::volume::VolumeDecision::leaves`]): the last word on those connections.
pub fn released_leaving(volume: &str, leaves: Option<&str>) -> Option<Notice> {
    leaves.map(|leaves| {
        Notice::new(
            Severity::Warning,
            ORPHANED,
            format!(
                "volume {volume} was deleted and released; the backend still connects it {leaves}: left in place"
            ),
        )
    })
}

/// How a forced detach of an orphaned connection ended: succeeded only once the probe after the
/// call shows the node gone; an OK call the backend does not confirm yet is retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrphanForced {
    /// The backend confirmed the connection gone: one forced detach done.
    pub confirmed: bool,
    pub notice: Notice,
}

/// The outcome of force-detaching volume `volume` from `node` (an orphan): the call's `result`,
/// and what the probe after an OK call answered.
pub fn orphan_forced(
    volume: &str,
    node: &str,
    result: Result<(), &DriverError>,
    answer_after: Option<&ProbeAnswer>,
) -> OrphanForced {
    let confirmed = matches!(answer_after, Some(ProbeAnswer::Answered(c)) if !c.includes(node));
    match (result, confirmed) {
        (Ok(()), true) => OrphanForced {
            confirmed: true,
            notice: Notice::new(
                Severity::Warning,
                reasons::FORCE_DETACHED,
                format!(
                    "volume {volume} was force-detached from node {node}, confirmed by the backend: reason Orphan (connected with no VolumeAttachment; orphanPolicy Detach)"
                ),
            ),
        },
        (Ok(()), false) => OrphanForced {
            confirmed: false,
            notice: Notice::new(
                Severity::Warning,
                reasons::FORCE_DETACH_UNCONFIRMED,
                format!(
                    "force-detach of orphaned volume {volume} from node {node} returned, but the backend does not confirm it yet; will retry"
                ),
            ),
        },
        (Err(error), _) => OrphanForced {
            confirmed: false,
            notice: Notice::new(
                Severity::Warning,
                reasons::FORCE_DETACH_FAILED,
                format!(
                    "force-detach of orphaned volume {volume} from node {node} failed: {error}"
                ),
            ),
        },
    }
}
