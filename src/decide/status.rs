//! The next status of an attachment: what a step and the backend's answer make of the current one.
//!
//! Pure and idempotent: applying the same step to the same inputs twice gives the same status,
//! and times (`phaseSince`, a condition's `lastTransitionTime`, `lastProbe.time`) move only when
//! what they date changes. That is what lets the reconciler write only when something changed.

use super::{
    Confirmed, MAX_HANDLED_TOKENS, ProbeAnswer, Request, Step, VolumePolicy, VolumeProblem,
    phase_of, stuck_in,
};
use crate::api::{
    AttachmentPhase, Binding, ConditionStatus, ForceDetachState, ForceDetachStatus, ProbeRecord,
    ProbeResult, VolumeAttachmentStatus, is_true, set_condition,
    types::{ATTACH_BLOCKED, BACKEND_IN_SYNC, READY, REQUEST_REJECTED, STUCK},
};
use crate::driver::{ConnectionInfo, DriverError};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// What the status is computed against, besides the step.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub node: &'a str,
    /// What the attachment reaches (see [`super::Input::target`]).
    pub target: Option<&'a Binding>,
    pub generation: Option<i64>,
    pub policy: Option<&'a VolumePolicy>,
    pub backend: Option<&'a ProbeAnswer>,
    pub request: &'a Request,
    pub now: Timestamp,
}

impl Observed<'_> {
    fn time(&self) -> Time {
        Time(self.now)
    }
}

/// The status after `step`, before any driver call it implies.
pub fn after_step(
    current: &VolumeAttachmentStatus,
    step: &Step,
    observed: &Observed,
) -> VolumeAttachmentStatus {
    // An answer asked of what the Volume names now says nothing of another backend volume the
    // attachment recorded: the record keeps what was last confirmed of that one.
    let unrelated;
    let observed = if let Step::Fail(problem) = step
        && !problem.answers_for_recorded()
        && observed.backend.is_some()
    {
        unrelated = Observed {
            backend: None,
            ..observed.clone()
        };
        &unrelated
    } else {
        observed
    };
    let mut status = current.clone();
    let now = observed.time();
    match step {
        Step::BeginAttach => {
            set_phase(&mut status, AttachmentPhase::Attaching, observed.now);
            status.connection_info.clear();
            bind(&mut status, observed);
        }
        // A record from before bindings were kept learns it on its next attach.
        Step::Attach => bind(&mut status, observed),
        Step::MarkAttached { rolled_forward } => {
            set_phase(&mut status, AttachmentPhase::Attached, observed.now);
            bind(&mut status, observed);
            let (reason, message) = if *rolled_forward {
                (
                    "RolledForward",
                    "the attach was stuck, but the backend shows it completed; confirmed",
                )
            } else {
                (
                    "Attached",
                    "the backend confirms the volume is connected to the node",
                )
            };
            ready(
                &mut status,
                observed,
                ConditionStatus::True,
                reason,
                message,
            );
        }
        Step::BlockAttach { holders } => {
            set_phase(&mut status, AttachmentPhase::Pending, observed.now);
            let message = format!(
                "the backend shows the volume connected to {}; it is not multiAttach, so it is not attached here until that node is detached",
                holders.join(", ")
            );
            let generation = observed.generation;
            set_condition(
                &mut status.conditions,
                ATTACH_BLOCKED,
                ConditionStatus::True,
                "HeldByAnotherNode",
                message,
                generation,
                now,
            );
        }
        Step::ConnectionLost => {
            set_phase(&mut status, AttachmentPhase::Pending, observed.now);
            status.connection_info.clear();
            status.bound_to = None;
            let message =
                "the backend no longer shows the volume connected to the node; attaching again";
            ready(
                &mut status,
                observed,
                ConditionStatus::False,
                "ConnectionLost",
                message,
            );
        }
        Step::BeginDetach | Step::Detach => {
            set_phase(&mut status, AttachmentPhase::Detaching, observed.now);
        }
        Step::ForceDetach { reason, token } => {
            set_phase(&mut status, AttachmentPhase::Detaching, observed.now);
            let attempts = match &status.force_detach {
                Some(f)
                    if f.state == ForceDetachState::InProgress
                        && f.reason == *reason
                        && f.token == *token =>
                {
                    f.attempts
                }
                _ => 0,
            };
            if let Some(token) = token {
                remember_token(&mut status, token);
            }
            status.force_detach = Some(ForceDetachStatus {
                token: token.clone(),
                reason: *reason,
                state: ForceDetachState::InProgress,
                attempts: attempts + 1,
                started_at: match &status.force_detach {
                    Some(f) if attempts > 0 => f.started_at.clone(),
                    _ => now.clone(),
                },
                finished_at: None,
                message: None,
            });
        }
        Step::MarkDetached => {
            set_phase(&mut status, AttachmentPhase::Detached, observed.now);
            status.connection_info.clear();
            status.bound_to = None;
            if let Some(force) = status
                .force_detach
                .as_mut()
                .filter(|f| f.state == ForceDetachState::InProgress)
            {
                force.state = ForceDetachState::Succeeded;
                force.finished_at = Some(now.clone());
                force.message =
                    Some("the backend confirmed the volume is disconnected from the node".into());
            }
        }
        Step::Fail(problem) => {
            // Only an attachment that is not connected becomes Failed: one that never connected,
            // or one the backend answered for on this turn without a connection to its node.
            // Otherwise the backend's state is unknown, so the phase that says what was last
            // confirmed stays.
            let gone = matches!(observed.backend, Some(ProbeAnswer::Answered(c))
                if !c.includes(observed.node) && c.unattributed.is_empty());
            if gone || phase_of(&status) == AttachmentPhase::Pending {
                set_phase(&mut status, AttachmentPhase::Failed, observed.now);
                status.connection_info.clear();
            }
            fail(&mut status, observed, problem);
        }
        Step::AddFinalizer
        | Step::ReleaseFinalizer
        | Step::HandOver { .. }
        | Step::Refresh
        | Step::Probe
        | Step::Wait { .. } => {}
    }
    observe(&mut status, current, step, observed);
    status
}

/// Records what the driver's attach returned.
pub fn attached_with(status: &mut VolumeAttachmentStatus, info: ConnectionInfo) {
    status.connection_info = info;
}

/// Records a driver call that did not succeed, so the status says why the attachment is not
/// moving. The phase is left alone: a failed call proves nothing about the backend.
pub fn driver_failed(
    status: &mut VolumeAttachmentStatus,
    step: &Step,
    error: &DriverError,
    observed: &Observed,
) {
    let (reason, what) = match step {
        Step::Attach => ("AttachFailed", "attach"),
        Step::Detach => ("DetachFailed", "detach"),
        _ => ("ForceDetachFailed", "force_detach"),
    };
    let message = format!("{what} failed ({}): {error}", error.reason());
    if let Some(force) = status
        .force_detach
        .as_mut()
        .filter(|f| f.state == ForceDetachState::InProgress)
    {
        force.message = Some(message.clone());
    }
    ready(status, observed, ConditionStatus::False, reason, message);
}

/// The parts of the status that follow from the observation alone, whatever the step.
fn observe(
    status: &mut VolumeAttachmentStatus,
    before: &VolumeAttachmentStatus,
    step: &Step,
    observed: &Observed,
) {
    let now = observed.time();
    let generation = observed.generation;
    status.observed_generation = generation;

    if let Some(backend) = observed.backend {
        record_probe(status, backend, observed);
        // `attached` is the backend's word, never our own: it follows the probe, or for a backend
        // that cannot be probed, the call that just succeeded.
        match backend {
            ProbeAnswer::Answered(connections) => {
                status.attached = connections.includes(observed.node)
            }
            ProbeAnswer::Unprobeable(Some(confirmed)) => {
                status.attached = *confirmed == Confirmed::Connected;
            }
            ProbeAnswer::Unprobeable(None) | ProbeAnswer::Unreachable(_) => {}
        }
    }
    let phase = phase_of(status);

    if status.phase.is_none() {
        set_phase(status, AttachmentPhase::Pending, observed.now);
    }

    let in_sync = match observed.backend {
        None => None,
        Some(ProbeAnswer::Unreachable(message)) => Some((
            ConditionStatus::Unknown,
            "BackendUnreachable",
            message.clone(),
        )),
        Some(ProbeAnswer::Unprobeable(_)) => Some((
            ConditionStatus::Unknown,
            "NotProbeable",
            "the backend cannot be probed; the record rests on its calls returning OK".into(),
        )),
        Some(ProbeAnswer::Answered(connections)) => Some(match (phase, status.attached) {
            _ if !connections.unattributed.is_empty() => {
                let ids: Vec<&str> = connections
                    .unattributed
                    .iter()
                    .map(String::as_str)
                    .collect();
                (
                    ConditionStatus::False,
                    "UnattributedConnection",
                    format!(
                        "the backend also serves this volume as {}, which names no node: it may be connected here, so no detach is confirmed and no other node attaches it until that is removed",
                        ids.join(", ")
                    ),
                )
            }
            // The one state the invariant exists to prevent: say so wherever it shows.
            (_, true)
                if observed.policy.is_some_and(|p| !p.multi_attach)
                    && connections.nodes.len() > 1 =>
            {
                let others: Vec<&str> = connections
                    .nodes
                    .iter()
                    .map(String::as_str)
                    .filter(|n| *n != observed.node)
                    .collect();
                (
                    ConditionStatus::False,
                    "MultiAttached",
                    format!(
                        "the backend connects this single-attach volume to {} as well",
                        others.join(", ")
                    ),
                )
            }
            (AttachmentPhase::Attached, false) => (
                ConditionStatus::False,
                "NotConnected",
                "recorded as attached, but the backend shows no connection".into(),
            ),
            (
                AttachmentPhase::Pending | AttachmentPhase::Detached | AttachmentPhase::Failed,
                true,
            ) => (
                ConditionStatus::False,
                "ConnectedUnexpectedly",
                "recorded as not attached, but the backend shows the volume connected to the node"
                    .into(),
            ),
            _ => (
                ConditionStatus::True,
                "InSync",
                "the backend agrees with this record".into(),
            ),
        }),
    };
    if let Some((condition_status, reason, message)) = in_sync {
        set_condition(
            &mut status.conditions,
            BACKEND_IN_SYNC,
            condition_status,
            reason,
            message,
            generation,
            now.clone(),
        );
    }

    // Stuck describes the phase the step was decided in: a step that resolves a stuck phase
    // (a force-detach of a stuck attach) still reports it, once, before the new phase clears it.
    if let Some(policy) = observed.policy {
        let stuck_phase = phase_of(before);
        let stuck = match stuck_in(before, policy, observed.now) {
            Some(Duration::ZERO) => {
                let phase = stuck_phase;
                let action = if policy.auto_force_detach {
                    "resolving it with a backend-confirmed force-detach"
                } else {
                    "autoForceDetach is off: annotate with safedetach.io/force-detach=<new token> to force it"
                };
                let reason = if phase == AttachmentPhase::Attaching {
                    "StuckAttaching"
                } else {
                    "StuckDetaching"
                };
                let message = format!(
                    "{phase:?} for longer than stuckAfter ({:?}); {action}",
                    policy.stuck_after
                );
                Some((ConditionStatus::True, reason, message))
            }
            _ if is_true(&status.conditions, STUCK) => Some((
                ConditionStatus::False,
                "NotStuck",
                format!("{stuck_phase:?} within its deadline"),
            )),
            _ => None,
        };
        if let Some((condition_status, reason, message)) = stuck {
            set_condition(
                &mut status.conditions,
                STUCK,
                condition_status,
                reason,
                message,
                generation,
                now.clone(),
            );
        }
    }

    if !matches!(step, Step::BlockAttach { .. } | Step::Wait { .. })
        && is_true(&status.conditions, ATTACH_BLOCKED)
    {
        let message = "no other node holds the volume";
        set_condition(
            &mut status.conditions,
            ATTACH_BLOCKED,
            ConditionStatus::False,
            "NotHeld",
            message,
            generation,
            now.clone(),
        );
    }

    if let Request::AtCreation(token) = observed.request {
        remember_token(status, token);
    }
    match observed.request {
        Request::Invalid { token, why } => {
            let message =
                format!("force-detach annotation value {token:?} ignored: {why}; set a new token");
            set_condition(
                &mut status.conditions,
                REQUEST_REJECTED,
                ConditionStatus::True,
                "InvalidToken",
                message,
                generation,
                now,
            );
        }
        _ if is_true(&status.conditions, REQUEST_REJECTED) => {
            let message = "no invalid force-detach request pending";
            set_condition(
                &mut status.conditions,
                REQUEST_REJECTED,
                ConditionStatus::False,
                "NoInvalidRequest",
                message,
                generation,
                now,
            );
        }
        _ => {}
    }

    // Ready follows the phase unless the step said something more specific. A driver failure
    // recorded after this, in the same reconcile, overrides it again.
    // A confirmed Attached keeps the reason it was confirmed with (Attached or RolledForward).
    let confirmed_attached =
        phase_of(status) == AttachmentPhase::Attached && is_true(&status.conditions, READY);
    if !confirmed_attached
        && !matches!(
            step,
            Step::MarkAttached { .. } | Step::ConnectionLost | Step::Fail(_)
        )
    {
        let (value, reason, message) = match phase_of(status) {
            AttachmentPhase::Attached => (
                ConditionStatus::True,
                "Attached",
                "the backend confirms the volume is connected to the node",
            ),
            AttachmentPhase::Pending => (ConditionStatus::False, "Pending", "not attached yet"),
            AttachmentPhase::Attaching => (ConditionStatus::False, "Attaching", "attaching"),
            AttachmentPhase::Detaching => (ConditionStatus::False, "Detaching", "detaching"),
            AttachmentPhase::Detached => (
                ConditionStatus::False,
                "Detached",
                "the backend confirmed the volume is disconnected",
            ),
            AttachmentPhase::Failed => (
                ConditionStatus::False,
                "Failed",
                "cannot attach; see the other conditions",
            ),
        };
        ready(status, observed, value, reason, message);
    }
}

fn record_probe(status: &mut VolumeAttachmentStatus, backend: &ProbeAnswer, observed: &Observed) {
    let (result, nodes, message) = match backend {
        ProbeAnswer::Unprobeable(_) => (ProbeResult::NotProbeable, Vec::new(), None),
        ProbeAnswer::Unreachable(message) => {
            (ProbeResult::Unreachable, Vec::new(), Some(message.clone()))
        }
        ProbeAnswer::Answered(connections) => {
            let result = if connections.includes(observed.node) {
                ProbeResult::Connected
            } else if connections.nodes.is_empty() {
                ProbeResult::NotConnected
            } else {
                ProbeResult::ConnectedElsewhere
            };
            (result, connections.nodes.iter().cloned().collect(), None)
        }
    };
    status.last_probe = Some(next_probe_record(
        status.last_probe.take(),
        result,
        nodes,
        message,
        observed.now,
    ));
}

/// A probe record whose time moves only when the answer changes: a steady backend writes nothing.
pub fn next_probe_record(
    previous: Option<ProbeRecord>,
    result: ProbeResult,
    nodes: Vec<String>,
    message: Option<String>,
    now: Timestamp,
) -> ProbeRecord {
    match previous {
        Some(p) if p.result == result && p.nodes == nodes && p.message == message => p,
        _ => ProbeRecord {
            time: Time(now),
            result,
            nodes,
            message,
        },
    }
}

/// Records what the attachment reaches as what it attached, unless it recorded that already.
fn bind(status: &mut VolumeAttachmentStatus, observed: &Observed) {
    if status.bound_to.is_none() {
        status.bound_to = observed.target.cloned();
    }
}

/// Records `token` as handled, forgetting the oldest beyond [`MAX_HANDLED_TOKENS`].
fn remember_token(status: &mut VolumeAttachmentStatus, token: &str) {
    if status.handled_tokens.iter().any(|t| t == token) {
        return;
    }
    status.handled_tokens.push(token.to_owned());
    let excess = status
        .handled_tokens
        .len()
        .saturating_sub(MAX_HANDLED_TOKENS);
    status.handled_tokens.drain(..excess);
}

fn set_phase(status: &mut VolumeAttachmentStatus, phase: AttachmentPhase, now: Timestamp) {
    if status.phase != Some(phase) {
        status.phase = Some(phase);
        status.phase_since = Some(Time(now));
    }
}

fn ready(
    status: &mut VolumeAttachmentStatus,
    observed: &Observed,
    value: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
) {
    set_condition(
        &mut status.conditions,
        READY,
        value,
        reason,
        message,
        observed.generation,
        observed.time(),
    );
}

fn fail(status: &mut VolumeAttachmentStatus, observed: &Observed, problem: &VolumeProblem) {
    let message = problem.message()
        + match (phase_of(status), observed.backend) {
            (AttachmentPhase::Failed, _) => "",
            (_, Some(ProbeAnswer::Answered(_))) => {
                "; the backend confirms the connection, which stays until this attachment is deleted"
            }
            _ => "; the backend cannot be asked, so the attachment stays as last confirmed",
        };
    ready(
        status,
        observed,
        ConditionStatus::False,
        problem.reason(),
        message,
    );
}
