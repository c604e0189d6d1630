//! The Volume's view: which backend connections no attachment claims (case 5, orphans), what to
//! do about them, and the Volume's status. Pure, like the rest of the core.

use super::{ProbeAnswer, VolumeProblem, elapsed_since, status::next_probe_record};
use crate::api::reasons;
use crate::api::{
    AttachmentPhase, ConditionStatus, Orphan, OrphanPolicy, ProbeResult, VolumePhase, VolumeStatus,
    find_condition, set_condition,
    types::{MULTI_ATTACHED, ORPHANED, READY},
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeSet;
use std::time::Duration;

/// Everything the Volume's decision rests on.
#[derive(Clone, Debug)]
pub struct VolumeInput<'a> {
    pub generation: Option<i64>,
    /// Why the Volume cannot reach its backend, if it cannot.
    pub problem: Option<&'a VolumeProblem>,
    pub backend: Option<&'a ProbeAnswer>,
    /// Nodes for which a VolumeAttachment of this volume exists: those connections are claimed,
    /// and their own controller resolves them.
    pub claimed: &'a BTreeSet<String>,
    /// Nodes of the VolumeAttachments that name this Volume itself, not another Volume of its
    /// backend volume: while one exists, a deleted Volume stays. An alias's attachments were
    /// never attached through this Volume (an alias attaches nothing) and do not hold it.
    pub held_by: &'a BTreeSet<String>,
    /// The phases of this volume's attachments.
    pub attachment_phases: &'a [AttachmentPhase],
    pub orphan_policy: OrphanPolicy,
    pub multi_attach: bool,
    /// How long a connection must stay unclaimed before `Detach` acts on it, so that an attach
    /// racing with the attachment's creation is never cut off.
    pub grace: Duration,
    /// The Volume is being deleted: its finalizer goes once no attachment names it.
    pub deleting: bool,
    pub now: Timestamp,
}

/// The Volume's next status, and the orphaned connections to force-detach now.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeDecision {
    pub status: VolumeStatus,
    pub force_detach: Vec<String>,
    /// When to look again: the end of the shortest remaining grace period.
    pub recheck_after: Option<Duration>,
    /// The Volume is being deleted and no attachment names it: its finalizer may go. While one
    /// does, the Volume stays, so that the attachment's detach can still reach the backend.
    pub release: bool,
}

pub fn decide_volume(current: &VolumeStatus, input: &VolumeInput) -> VolumeDecision {
    let mut decision = observe_backend(current, input);
    if input.deleting {
        decision.release = input.held_by.is_empty();
        if !decision.release {
            let nodes: Vec<&str> = input.held_by.iter().map(String::as_str).collect();
            let message = format!(
                "being deleted; waits until no VolumeAttachment names it (still attached or detaching on {})",
                nodes.join(", ")
            );
            set_condition(
                &mut decision.status.conditions,
                READY,
                ConditionStatus::False,
                reasons::WAITING_FOR_ATTACHMENTS,
                message,
                input.generation,
                Time(input.now),
            );
        }
    }
    decision
}

fn observe_backend(current: &VolumeStatus, input: &VolumeInput) -> VolumeDecision {
    let mut status = current.clone();
    let now = Time(input.now);
    let generation = input.generation;
    status.observed_generation = generation;
    let mut force_detach = Vec::new();
    let mut recheck_after = None;

    if let Some(problem) = input.problem {
        status.phase = Some(VolumePhase::Error);
        set_condition(
            &mut status.conditions,
            READY,
            ConditionStatus::False,
            problem.reason(),
            problem.message(),
            generation,
            now,
        );
        return VolumeDecision {
            status,
            force_detach,
            recheck_after,
            release: false,
        };
    }

    match input.backend {
        Some(ProbeAnswer::Answered(connections)) => {
            let nodes: Vec<String> = connections.nodes.iter().cloned().collect();
            // A connection that names no node still connects the volume.
            let unattributed = (!connections.unattributed.is_empty()).then(|| {
                let ids: Vec<&str> = connections
                    .unattributed
                    .iter()
                    .map(String::as_str)
                    .collect();
                format!("also served as {}, which names no node", ids.join(", "))
            });
            let result = if nodes.is_empty() && unattributed.is_none() {
                ProbeResult::NotConnected
            } else {
                ProbeResult::Connected
            };
            status.last_probe = Some(next_probe_record(
                status.last_probe.take(),
                result,
                nodes.clone(),
                unattributed.clone(),
                input.now,
            ));
            status.connected_nodes = nodes;

            let previous = std::mem::take(&mut status.orphans);
            for node in connections
                .nodes
                .iter()
                .filter(|n| !input.claimed.contains(*n))
            {
                let since = previous
                    .iter()
                    .find(|o| &o.node == node)
                    .map_or(now.clone(), |o| o.since.clone());
                let unclaimed_for = elapsed_since(since.0, input.now);
                let remaining = input.grace.saturating_sub(unclaimed_for);
                if input.orphan_policy == OrphanPolicy::Detach {
                    if remaining.is_zero() {
                        force_detach.push(node.clone());
                    } else {
                        recheck_after =
                            Some(recheck_after.map_or(remaining, |r: Duration| r.min(remaining)));
                    }
                }
                status.orphans.push(Orphan {
                    node: node.clone(),
                    since,
                });
            }
            let (value, reason, message) = if status.orphans.is_empty() {
                (
                    ConditionStatus::False,
                    reasons::NO_ORPHANS,
                    "every backend connection is claimed by a VolumeAttachment".to_owned(),
                )
            } else {
                let nodes: Vec<&str> = status.orphans.iter().map(|o| o.node.as_str()).collect();
                let action = match input.orphan_policy {
                    OrphanPolicy::Report => {
                        "orphanPolicy is Report: detach it with a VolumeAttachment and delete that, or set orphanPolicy: Detach"
                    }
                    OrphanPolicy::Detach => {
                        "orphanPolicy is Detach: it is force-detached once unclaimed for stuckAfter"
                    }
                };
                (
                    ConditionStatus::True,
                    reasons::UNCLAIMED_CONNECTION,
                    format!(
                        "connected to {} with no VolumeAttachment; {action}",
                        nodes.join(", ")
                    ),
                )
            };
            if !status.orphans.is_empty() || find_condition(&status.conditions, ORPHANED).is_some()
            {
                set_condition(
                    &mut status.conditions,
                    ORPHANED,
                    value,
                    reason,
                    message,
                    generation,
                    now.clone(),
                );
            }
            let several = !input.multi_attach && connections.nodes.len() > 1;
            if several || find_condition(&status.conditions, MULTI_ATTACHED).is_some() {
                let (value, reason, message) = if several {
                    (
                        ConditionStatus::True,
                        reasons::CONNECTED_TO_SEVERAL_NODES,
                        format!(
                            "the backend connects this single-attach volume to {}: two writers can corrupt it; detach all but one",
                            status.connected_nodes.join(", ")
                        ),
                    )
                } else {
                    (
                        ConditionStatus::False,
                        reasons::AT_MOST_ONE_NODE,
                        "connected to at most one node".to_owned(),
                    )
                };
                set_condition(
                    &mut status.conditions,
                    MULTI_ATTACHED,
                    value,
                    reason,
                    message,
                    generation,
                    now.clone(),
                );
            }
            set_condition(
                &mut status.conditions,
                READY,
                ConditionStatus::True,
                reasons::BACKEND_ANSWERS,
                "the backend answers for this volume",
                generation,
                now,
            );
            status.phase = Some(phase(
                !status.connected_nodes.is_empty() || unattributed.is_some(),
                input.attachment_phases,
            ));
        }
        Some(ProbeAnswer::Unreachable(message)) => {
            status.last_probe = Some(next_probe_record(
                status.last_probe.take(),
                ProbeResult::Unreachable,
                Vec::new(),
                Some(message.clone()),
                input.now,
            ));
            set_condition(
                &mut status.conditions,
                READY,
                ConditionStatus::Unknown,
                reasons::BACKEND_UNREACHABLE,
                message.clone(),
                generation,
                now,
            );
        }
        Some(ProbeAnswer::Unprobeable(_)) => {
            status.last_probe = Some(next_probe_record(
                status.last_probe.take(),
                ProbeResult::NotProbeable,
                Vec::new(),
                None,
                input.now,
            ));
            set_condition(
                &mut status.conditions,
                READY,
                ConditionStatus::True,
                reasons::NOT_PROBEABLE,
                "the backend cannot be probed: connections are known only from the attachments' confirmed calls, and orphans cannot be found",
                generation,
                now,
            );
            // The attachments' confirmed phases are the only record of where the volume is.
            let attached = input.attachment_phases.contains(&AttachmentPhase::Attached);
            status.connected_nodes.clear();
            status.phase = Some(phase(attached, input.attachment_phases));
        }
        None => {}
    }
    VolumeDecision {
        status,
        force_detach,
        recheck_after,
        release: false,
    }
}

/// A transition under way shows first; otherwise the backend's connections say in use or not.
fn phase(connected: bool, attachments: &[AttachmentPhase]) -> VolumePhase {
    if attachments.contains(&AttachmentPhase::Detaching) {
        VolumePhase::Detaching
    } else if attachments.contains(&AttachmentPhase::Attaching) {
        VolumePhase::Attaching
    } else if connected {
        VolumePhase::InUse
    } else {
        VolumePhase::Available
    }
}
