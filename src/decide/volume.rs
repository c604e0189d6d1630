//! The Volume's view: which backend connections no attachment claims (case 5, orphans), what to
//! do about them, and the Volume's status. Pure, like the rest of the core.

use super::{ProbeAnswer, VolumeProblem, elapsed_since, status::next_probe_record};
use crate::api::reasons;
use crate::api::{
    AttachmentPhase, ConditionStatus, Orphan, OrphanPolicy, ProbeResult, VolumePhase, VolumeStatus,
    find_condition, keep_transition_time, set_condition,
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
    /// The probe failed because the backend says it has no such volume: nothing is connected
    /// under it that this Volume could detach.
    pub no_such_volume: bool,
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
    /// On a release, what the probe of this pass still showed connected that no attachment
    /// claims, and that no one will look after once the Volume is gone.
    pub leaves: Option<String>,
}

pub fn decide_volume(current: &VolumeStatus, input: &VolumeInput) -> VolumeDecision {
    let mut decision = observe_backend(current, input);
    if input.deleting {
        let waiting = waiting_to_go(input, &decision.status);
        decision.release = waiting.is_none();
        match waiting {
            Some((reason, message)) => {
                set_condition(
                    &mut decision.status.conditions,
                    READY,
                    ConditionStatus::False,
                    reason,
                    message,
                    input.generation,
                    Time(input.now),
                );
                // The backend's answer set Ready first: a wait that goes on keeps the time it
                // began, so that a pass that finds nothing new writes nothing.
                keep_transition_time(&current.conditions, &mut decision.status.conditions, READY);
            }
            None => decision.leaves = left_connected(input, &decision.status),
        }
    }
    decision
}

/// What a deleted Volume leaves connected as it goes, as its probe on this pass showed it: the
/// nodes no attachment claims (under `Report`), and exports that name no node, which no force
/// can name either. One that goes unprobed (an unknown driver, a handle another Volume owns, a
/// backend that cannot be probed) names the orphans its last answered probe recorded, said as
/// such; one whose backend has no such volume has nothing connected.
fn left_connected(input: &VolumeInput, next: &VolumeStatus) -> Option<String> {
    let Some(ProbeAnswer::Answered(connections)) = input.backend else {
        if next.orphans.is_empty() || input.no_such_volume {
            return None;
        }
        let nodes: Vec<&str> = next.orphans.iter().map(|o| o.node.as_str()).collect();
        return Some(format!(
            "to {} with no VolumeAttachment, as last probed (not probed again as it went)",
            nodes.join(", ")
        ));
    };
    let mut parts = Vec::new();
    if !next.orphans.is_empty() {
        let nodes: Vec<&str> = next.orphans.iter().map(|o| o.node.as_str()).collect();
        parts.push(format!("to {} with no VolumeAttachment", nodes.join(", ")));
    }
    if !connections.unattributed.is_empty() {
        let ids: Vec<&str> = connections
            .unattributed
            .iter()
            .map(String::as_str)
            .collect();
        parts.push(format!("as {}, which names no node", ids.join(", ")));
    }
    (!parts.is_empty()).then(|| parts.join(", and "))
}

/// What a deleted Volume still waits for before its finalizer goes, as the reason and message
/// of its Ready condition; `None` once it may go. An attachment that names it holds it, so that
/// the attachment's detach can still reach the backend. Under `orphanPolicy: Detach` so does a
/// connection no attachment claims (it is forced off once unclaimed for the grace, and the
/// Volume goes when the backend shows it gone), and a backend that does not answer, which may
/// have one: the Volume is the last record of that connection. Under `Report` the connection is
/// left in place, as it would be for a Volume that stays; the release tells so in an Event. A
/// Volume that cannot reach its backend at all (an unknown driver, an invalid spec, a handle
/// another Volume owns), one whose backend says it has no such volume, or one whose backend
/// cannot be probed has nothing to wait for; nor does an export that names no node, which no
/// force can name either.
fn waiting_to_go(input: &VolumeInput, next: &VolumeStatus) -> Option<(&'static str, String)> {
    if !input.held_by.is_empty() {
        let nodes: Vec<&str> = input.held_by.iter().map(String::as_str).collect();
        return Some((
            reasons::WAITING_FOR_ATTACHMENTS,
            format!(
                "being deleted; waits until no VolumeAttachment names it (still attached or detaching on {})",
                nodes.join(", ")
            ),
        ));
    }
    if input.orphan_policy != OrphanPolicy::Detach || input.problem.is_some() {
        return None;
    }
    match input.backend? {
        ProbeAnswer::Answered(_) if next.orphans.is_empty() => None,
        ProbeAnswer::Answered(_) => {
            let nodes: Vec<&str> = next.orphans.iter().map(|o| o.node.as_str()).collect();
            Some((
                reasons::WAITING_FOR_ORPHANS,
                format!(
                    "being deleted; orphanPolicy is Detach: first force-detaches the connections no VolumeAttachment claims, once unclaimed for stuckAfter ({}); set orphanPolicy: Report to let it go and leave them",
                    nodes.join(", ")
                ),
            ))
        }
        ProbeAnswer::Unreachable(_) if input.no_such_volume => None,
        ProbeAnswer::Unreachable(message) => Some((
            reasons::WAITING_FOR_BACKEND,
            format!(
                "being deleted; orphanPolicy is Detach: waits for the backend to answer, to force-detach any connection no VolumeAttachment claims (set orphanPolicy: Report to let it go without): {message}"
            ),
        )),
        ProbeAnswer::Unprobeable(_) => None,
    }
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
            leaves: None,
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
        leaves: None,
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
