//! The next status of an attachment: what a step and the backend's answer make of the current one.
//!
//! Pure and idempotent: applying the same step to the same inputs twice gives the same status,
//! and times (`phaseSince`, a condition's `lastTransitionTime`, `lastProbe.time`) move only when
//! what they date changes. That is what lets the reconciler write only when something changed.

use super::recheck::Recheck;
use super::{
    Confirmed, HoldersSeenIn, Input, MAX_HANDLED_TOKENS, ProbeAnswer, Request, Step, VolumeProblem,
    phase_of, stuck_in,
};
use crate::api::reasons;
use crate::api::{
    AttachmentPhase, ConditionStatus, ForceDetachReason, ForceDetachState, ForceDetachStatus,
    ProbeRecord, ProbeResult, VolumeAttachmentStatus, is_true, set_condition,
    types::{ATTACH_BLOCKED, BACKEND_IN_SYNC, READY, REQUEST_REJECTED, STUCK},
};
use crate::driver::{ConnectionInfo, DriverError};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

fn time(input: &Input) -> Time {
    Time(input.now)
}

/// The status of another attachment that claimed the same connection (the same backend volume
/// on the same node) as `by`, once `by`'s detach or forced detach of it was confirmed by the
/// backend: the connection is gone, so this one is attached again, as after a lost connection.
pub fn cut_by_another(
    current: &VolumeAttachmentStatus,
    by: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> VolumeAttachmentStatus {
    let mut status = current.clone();
    status.attached = false;
    lose_connection(
        &mut status,
        format!(
            "attachment {by} claimed the same connection, and the backend confirmed its detach; attaching again"
        ),
        generation,
        now,
    );
    status
}

/// The record of a connection the attachment no longer has: `Pending`, nothing it was attached
/// with kept, `Ready=False` (`ConnectionLost`) saying why, so that it attaches again.
fn lose_connection(
    status: &mut VolumeAttachmentStatus,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    set_phase(status, AttachmentPhase::Pending, now);
    status.connection_info.clear();
    status.bound_to = None;
    set_condition(
        &mut status.conditions,
        READY,
        ConditionStatus::False,
        reasons::CONNECTION_LOST,
        message,
        generation,
        Time(now),
    );
}

/// The status after `step` was decided on `input`, before any driver call it implies.
pub fn after_step(input: &Input, step: &Step) -> VolumeAttachmentStatus {
    let current = input.status;
    // An answer asked of what the Volume names now says nothing of another backend volume the
    // attachment recorded: the record keeps what was last confirmed of that one.
    let unrelated;
    let input = if let Step::Fail(problem) = step
        && !problem.answers_for_recorded()
        && input.backend.is_some()
    {
        unrelated = Input {
            backend: None,
            ..input.clone()
        };
        &unrelated
    } else {
        input
    };
    let mut status = current.clone();
    let now = time(input);
    match step {
        Step::BeginAttach => {
            set_phase(&mut status, AttachmentPhase::Attaching, input.now);
            status.connection_info.clear();
            bind(&mut status, input);
        }
        // A record from before bindings were kept learns it on its next attach.
        Step::Attach => bind(&mut status, input),
        Step::MarkAttached { rolled_forward } => {
            set_phase(&mut status, AttachmentPhase::Attached, input.now);
            bind(&mut status, input);
            let (reason, message) = if *rolled_forward {
                (
                    reasons::ROLLED_FORWARD,
                    "the attach was stuck, but the backend shows it completed; confirmed",
                )
            } else {
                (
                    reasons::ATTACHED,
                    "the backend confirms the volume is connected to the node",
                )
            };
            ready(&mut status, input, ConditionStatus::True, reason, message);
        }
        Step::BlockAttach { holders, seen_in } => {
            // An intent blocked by another node's record keeps its phase: where nothing can be
            // probed its own call may have landed, and its stuck clock runs on.
            if !(*seen_in == HoldersSeenIn::Records
                && phase_of(&status) == AttachmentPhase::Attaching)
            {
                set_phase(&mut status, AttachmentPhase::Pending, input.now);
            }
            let holders = holders.join(", ");
            let (reason, message) = match seen_in {
                HoldersSeenIn::Backend => (
                    reasons::HELD_BY_ANOTHER_NODE,
                    format!(
                        "the backend shows the volume connected to {holders}; it is not multiAttach, so it is not attached here until that node is detached"
                    ),
                ),
                HoldersSeenIn::Records => (
                    reasons::CLAIMED_BY_ANOTHER_NODE,
                    format!(
                        "{holders} records the volume attached, and the backend cannot be asked where it is connected; it is not multiAttach, so it is not attached here until that attachment's detach is confirmed"
                    ),
                ),
            };
            let generation = input.generation;
            set_condition(
                &mut status.conditions,
                ATTACH_BLOCKED,
                ConditionStatus::True,
                reason,
                message,
                generation,
                now,
            );
        }
        Step::ConnectionLost => lose_connection(
            &mut status,
            "the backend no longer shows the volume connected to the node; attaching again".into(),
            input.generation,
            input.now,
        ),
        Step::BeginDetach | Step::Detach => {
            set_phase(&mut status, AttachmentPhase::Detaching, input.now);
        }
        Step::ForceDetach { reason, token } => {
            set_phase(&mut status, AttachmentPhase::Detaching, input.now);
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
            set_phase(&mut status, AttachmentPhase::Detached, input.now);
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
            let gone = matches!(input.backend, Some(ProbeAnswer::Answered(c))
                if !c.includes(input.node) && c.unattributed.is_empty());
            if gone || phase_of(&status) == AttachmentPhase::Pending {
                set_phase(&mut status, AttachmentPhase::Failed, input.now);
                status.connection_info.clear();
            }
            fail(&mut status, input, problem);
        }
        Step::AddFinalizer
        | Step::ReleaseFinalizer
        | Step::HandOver { .. }
        | Step::Refresh
        | Step::Probe
        | Step::Wait { .. } => {}
    }
    // A phase under way with no recorded start (a status set by hand) starts its clock at the
    // first observation, recorded, so that it can become stuck.
    if matches!(
        status.phase,
        Some(AttachmentPhase::Attaching | AttachmentPhase::Detaching)
    ) && status.phase_since.is_none()
    {
        status.phase_since = Some(Time(input.now));
    }
    observe(&mut status, current, step, input);
    status
}

/// What a driver call answered.
#[derive(Clone, Copy, Debug)]
pub enum CallResult<'a> {
    /// OK; an attach gives the connection info the driver returned.
    Done(Option<&'a ConnectionInfo>),
    Failed(&'a DriverError),
}

/// What a driver call makes of the attachment: its status, what the call confirms, and whether
/// the reconcile goes on.
#[derive(Clone, Debug, PartialEq)]
pub struct AfterCall {
    /// The status after the step and its call.
    pub status: VolumeAttachmentStatus,
    /// For a backend that cannot be probed, the only word on where the volume is connected: an
    /// idempotent call that returned OK.
    pub confirmed: Option<Confirmed>,
    /// `None`: decide again, on a new probe. Otherwise write the status and end the reconcile.
    pub ends: Option<Recheck>,
}

/// The status and the next move after `step`, decided on `input`, made its driver call and got
/// `result` back at `now`. A failed call proves nothing about the backend: the phase stays, the
/// status says why the attachment is not moving, and the call is tried again with backoff (no
/// later than the stuck deadline). A refused exclusive attach is the backend's answer that
/// another node holds the volume.
pub fn after_call(input: &Input, step: &Step, result: CallResult, now: Timestamp) -> AfterCall {
    let mut status = after_step(input, step);
    match result {
        CallResult::Done(info) => {
            if let Some(info) = info {
                status.connection_info = info.clone();
            }
            let confirmed = match step {
                Step::Attach => Some(Confirmed::Connected),
                Step::Detach | Step::ForceDetach { .. } => Some(Confirmed::Disconnected),
                _ => None,
            };
            AfterCall {
                status,
                confirmed,
                ends: None,
            }
        }
        CallResult::Failed(DriverError::HeldElsewhere { holders, .. }) => {
            let holders = if holders.is_empty() {
                vec!["another node".to_owned()]
            } else {
                holders.clone()
            };
            let blocked = Step::BlockAttach {
                holders,
                seen_in: HoldersSeenIn::Backend,
            };
            let status = after_step(
                &Input {
                    status: &status,
                    ..input.clone()
                },
                &blocked,
            );
            AfterCall {
                ends: super::recheck::ending(&blocked, input, false),
                status,
                confirmed: None,
            }
        }
        CallResult::Failed(error) => {
            let (reason, what) = match step {
                Step::Attach => (reasons::ATTACH_FAILED, "attach"),
                Step::Detach => (reasons::DETACH_FAILED, "detach"),
                _ => (reasons::FORCE_DETACH_FAILED, "force_detach"),
            };
            let message = format!("{what} failed ({}): {error}", error.reason());
            if let Some(force) = status
                .force_detach
                .as_mut()
                .filter(|f| f.state == ForceDetachState::InProgress)
            {
                force.message = Some(message.clone());
            }
            ready(&mut status, input, ConditionStatus::False, reason, message);
            let deadline = input
                .policy()
                .and_then(|policy| stuck_in(&status, policy, now));
            AfterCall {
                status,
                confirmed: None,
                ends: Some(Recheck::Backoff { deadline }),
            }
        }
    }
}

/// The reason of a forced detach that `written` records as confirmed and `stored` as under
/// way: the moment a forced detach counts as succeeded, once its status write was accepted.
pub fn force_confirmed(
    stored: &VolumeAttachmentStatus,
    written: &VolumeAttachmentStatus,
) -> Option<ForceDetachReason> {
    let before = stored.force_detach.as_ref()?;
    let after = written.force_detach.as_ref()?;
    (before.state == ForceDetachState::InProgress
        && after.state == ForceDetachState::Succeeded
        && before.token == after.token)
        .then_some(after.reason)
}

/// The parts of the status that follow from the observation alone, whatever the step.
fn observe(
    status: &mut VolumeAttachmentStatus,
    before: &VolumeAttachmentStatus,
    step: &Step,
    input: &Input,
) {
    let now = time(input);
    let generation = input.generation;
    status.observed_generation = generation;

    if let Some(backend) = input.backend {
        record_probe(status, backend, input);
        // `attached` is the backend's word, never our own: it follows the probe, or for a backend
        // that cannot be probed, the call that just succeeded.
        match backend {
            ProbeAnswer::Answered(connections) => {
                status.attached = connections.includes(input.node)
            }
            ProbeAnswer::Unprobeable(Some(confirmed)) => {
                status.attached = *confirmed == Confirmed::Connected;
            }
            ProbeAnswer::Unprobeable(None) | ProbeAnswer::Unreachable(_) => {}
        }
    }
    let phase = phase_of(status);

    if status.phase.is_none() {
        set_phase(status, AttachmentPhase::Pending, input.now);
    }

    let in_sync = match input.backend {
        None => None,
        Some(ProbeAnswer::Unreachable(message)) => Some((
            ConditionStatus::Unknown,
            reasons::BACKEND_UNREACHABLE,
            message.clone(),
        )),
        Some(ProbeAnswer::Unprobeable(_)) => Some((
            ConditionStatus::Unknown,
            reasons::NOT_PROBEABLE,
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
                    reasons::UNATTRIBUTED_CONNECTION,
                    format!(
                        "the backend also serves this volume as {}, which names no node: it may be connected here, so no detach is confirmed and no other node attaches it until that is removed",
                        ids.join(", ")
                    ),
                )
            }
            // The one state the invariant exists to prevent: say so wherever it shows.
            (_, true)
                if input.policy().is_some_and(|p| !p.multi_attach)
                    && connections.nodes.len() > 1 =>
            {
                let others: Vec<&str> = connections
                    .nodes
                    .iter()
                    .map(String::as_str)
                    .filter(|n| *n != input.node)
                    .collect();
                (
                    ConditionStatus::False,
                    reasons::MULTI_ATTACHED,
                    format!(
                        "the backend connects this single-attach volume to {} as well",
                        others.join(", ")
                    ),
                )
            }
            (AttachmentPhase::Attached, false) => (
                ConditionStatus::False,
                reasons::NOT_CONNECTED,
                "recorded as attached, but the backend shows no connection".into(),
            ),
            (
                AttachmentPhase::Pending | AttachmentPhase::Detached | AttachmentPhase::Failed,
                true,
            ) => (
                ConditionStatus::False,
                reasons::CONNECTED_UNEXPECTEDLY,
                "recorded as not attached, but the backend shows the volume connected to the node"
                    .into(),
            ),
            _ => (
                ConditionStatus::True,
                reasons::IN_SYNC,
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
    if let Some(policy) = input.policy() {
        let stuck_phase = phase_of(before);
        let stuck = match stuck_in(before, policy, input.now) {
            Some(Duration::ZERO) => {
                let phase = stuck_phase;
                let action = if policy.auto_force_detach {
                    "resolving it with a backend-confirmed force-detach"
                } else {
                    "autoForceDetach is off: annotate with safedetach.io/force-detach=<new token> to force it"
                };
                let reason = if phase == AttachmentPhase::Attaching {
                    reasons::STUCK_ATTACHING
                } else {
                    reasons::STUCK_DETACHING
                };
                let message = format!(
                    "{phase:?} for longer than stuckAfter ({:?}); {action}",
                    policy.stuck_after
                );
                Some((ConditionStatus::True, reason, message))
            }
            _ if is_true(&status.conditions, STUCK) => Some((
                ConditionStatus::False,
                reasons::NOT_STUCK,
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
            reasons::NOT_HELD,
            message,
            generation,
            now.clone(),
        );
    }

    if let Request::AtCreation(token) = input.request {
        remember_token(status, token);
    }
    match input.request {
        Request::Invalid { token, why } => {
            let message =
                format!("force-detach annotation value {token:?} ignored: {why}; set a new token");
            set_condition(
                &mut status.conditions,
                REQUEST_REJECTED,
                ConditionStatus::True,
                reasons::INVALID_TOKEN,
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
                reasons::NO_INVALID_REQUEST,
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
                reasons::ATTACHED,
                "the backend confirms the volume is connected to the node",
            ),
            AttachmentPhase::Pending => {
                (ConditionStatus::False, reasons::PENDING, "not attached yet")
            }
            AttachmentPhase::Attaching => (ConditionStatus::False, reasons::ATTACHING, "attaching"),
            AttachmentPhase::Detaching => (ConditionStatus::False, reasons::DETACHING, "detaching"),
            AttachmentPhase::Detached => (
                ConditionStatus::False,
                reasons::DETACHED,
                "the backend confirmed the volume is disconnected",
            ),
            AttachmentPhase::Failed => (
                ConditionStatus::False,
                reasons::FAILED,
                "cannot attach; see the other conditions",
            ),
        };
        ready(status, input, value, reason, message);
    }
}

fn record_probe(status: &mut VolumeAttachmentStatus, backend: &ProbeAnswer, input: &Input) {
    let (result, nodes, message) = match backend {
        ProbeAnswer::Unprobeable(_) => (ProbeResult::NotProbeable, Vec::new(), None),
        ProbeAnswer::Unreachable(message) => {
            (ProbeResult::Unreachable, Vec::new(), Some(message.clone()))
        }
        ProbeAnswer::Answered(connections) => {
            let result = if connections.includes(input.node) {
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
        input.now,
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
fn bind(status: &mut VolumeAttachmentStatus, input: &Input) {
    if status.bound_to.is_none() {
        status.bound_to = input.target.cloned();
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
    input: &Input,
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
        input.generation,
        time(input),
    );
}

fn fail(status: &mut VolumeAttachmentStatus, input: &Input, problem: &VolumeProblem) {
    let message = problem.message()
        + match (phase_of(status), input.backend) {
            (AttachmentPhase::Failed, _) => "",
            (_, Some(ProbeAnswer::Answered(_))) => {
                "; the backend confirms the connection, which stays until this attachment is deleted"
            }
            _ => "; the backend cannot be asked, so the attachment stays as last confirmed",
        };
    ready(
        status,
        input,
        ConditionStatus::False,
        problem.reason(),
        message,
    );
}
