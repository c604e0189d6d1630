//! The decision core: what to do next with one attachment. Pure — no client, no driver, no clock.
//!
//! [`decide`] takes what the record says, what the Volume asks for, what the backend answered and
//! the time, and returns one [`Step`]. [`status`] turns a step into the next status, and [`events`]
//! says which status transitions a person should hear about. The reconciler only executes.
//!
//! The safety invariant lives here: the only step that marks an attachment detached is
//! [`Step::MarkDetached`], and `decide` returns it only when the backend answered "not connected
//! to this node". The only step that connects is [`Step::Attach`], and `decide` returns it only
//! when the backend showed no other node holding a single-attach volume.

pub mod events;
pub mod recheck;
pub mod status;
pub mod sweep;
pub mod volume;

#[cfg(test)]
mod tests;

use crate::api::reasons;
use crate::api::{
    AttachmentPhase, Binding, ForceDetachReason, ForceDetachState, VolumeAttachmentStatus,
};
use crate::driver::Connections;
use jiff::Timestamp;
use std::time::Duration;

/// The longest accepted force-detach token; annotation values may be far longer than a status
/// field should carry.
pub const MAX_TOKEN_LEN: usize = 128;

/// How soon an attachment whose volume another reconcile is working on looks again.
pub const BUSY_RECHECK: Duration = Duration::from_millis(200);

/// How soon a replica that cannot be sure of its lease looks again (it stops once it knows).
pub const FENCED_RECHECK: Duration = Duration::from_secs(1);

/// Whether the record a decision rests on is known to be the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// Read from the apiserver, or returned by its answer to a write, in this reconcile.
    Fresh,
    /// From the watch cache, which may lag the operator's own last write.
    Cached,
    /// The last write was refused as based on an old version: nothing may be decided on it.
    Conflicted,
}

/// Whether this reconcile may act on the volume's backend now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// This reconcile holds the volume's lock, and the replica its lease.
    Ours,
    /// Another reconcile of the same backend volume is between its probe and its confirmation.
    VolumeBusy,
    /// The replica cannot be sure it still holds the lease: another replica may be acting.
    Fenced,
    /// A call of unknown outcome on this backend volume may still be carried out by the backend
    /// for up to this long: what a probe or another call says now may be undone by it.
    CallMayStillLand(Duration),
}

/// What the Volume asks of its attachments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePolicy {
    pub multi_attach: bool,
    pub stuck_after: Duration,
    pub auto_force_detach: bool,
}

/// A Volume's `stuckAfter`: its own when it sets one, else the operator's default. A text the
/// schema should have refused makes the Volume unusable, never a guess.
pub fn stuck_after(spec: Option<&str>, default: Duration) -> Result<Duration, VolumeProblem> {
    match spec {
        Some(text) => crate::api::parse_duration(text)
            .map_err(|e| VolumeProblem::InvalidVolume(format!("spec.stuckAfter: {e}"))),
        None => Ok(default),
    }
}

/// Why the attachment cannot act through its Volume now: the Volume is missing, unusable, being
/// deleted, an alias of another, or no longer the one the attachment connected through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeProblem {
    /// The Volume named by `spec.volumeName` does not exist.
    VolumeNotFound(String),
    /// The Volume names a driver the operator does not have.
    UnknownDriver(String),
    /// The Volume's spec cannot be used (for example a stuckAfter the schema should have refused).
    InvalidVolume(String),
    /// The Volume is being deleted: nothing is attached to it anew.
    VolumeDeleting(String),
    /// Another, older Volume names the same backend volume (driver and handle): two Volumes may
    /// not alias one handle, since policy is per Volume and the backend's truth per handle.
    DuplicateHandle { owner: String },
    /// The attachment connected another backend volume, or through another Volume, than its
    /// Volume names now (the Volume was replaced under it).
    BindingChanged {
        recorded: Box<Binding>,
        now: Box<Binding>,
    },
}

impl VolumeProblem {
    /// Whether the backend volume the attachment recorded is the one its Volume names now, so
    /// that a probe asked on this turn answers for what the record claims: only a Volume
    /// re-created over the same driver and handle.
    pub fn answers_for_recorded(&self) -> bool {
        match self {
            Self::BindingChanged { recorded, now } => {
                recorded.driver == now.driver && recorded.volume_handle == now.volume_handle
            }
            _ => false,
        }
    }

    /// A stable CamelCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::VolumeNotFound(_) => reasons::VOLUME_NOT_FOUND,
            Self::UnknownDriver(_) => reasons::UNKNOWN_DRIVER,
            Self::InvalidVolume(_) => reasons::INVALID_VOLUME,
            Self::VolumeDeleting(_) => reasons::VOLUME_DELETING,
            Self::BindingChanged { .. } => reasons::VOLUME_REPLACED,
            Self::DuplicateHandle { .. } => reasons::DUPLICATE_VOLUME_HANDLE,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::VolumeNotFound(name) => format!("Volume {name:?} does not exist"),
            Self::UnknownDriver(name) => {
                format!(
                    "the operator has no driver named {name:?}; see the operator's driver configuration"
                )
            }
            Self::InvalidVolume(why) => why.clone(),
            Self::DuplicateHandle { owner } => format!(
                "Volume {owner:?} already names the same driver and volumeHandle: two Volumes may not alias one backend volume; nothing is attached through this one (delete it, or its attachments to detach them)"
            ),
            Self::BindingChanged { recorded, now } => format!(
                "attached volume {:?} of driver {:?} through Volume UID {}, but its Volume now names volume {:?} of driver {:?} (UID {}): nothing is attached anew; delete this attachment to detach what it attached",
                recorded.volume_handle,
                recorded.driver,
                recorded.volume_uid,
                now.volume_handle,
                now.driver,
                now.volume_uid
            ),
            Self::VolumeDeleting(name) => format!(
                "Volume {name:?} is being deleted: it is not attached anywhere new; delete this attachment to let it go"
            ),
        }
    }
}

/// What the backend said when probed just now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAnswer {
    Answered(Connections),
    /// No answer: nothing may be concluded, in either direction.
    Unreachable(String),
    /// The backend cannot be probed (see [`crate::driver::Driver::can_probe`]). Its only word is
    /// an idempotent call that just returned OK in this reconcile, if one did.
    Unprobeable(Option<Confirmed>),
}

/// What an idempotent driver call that returned OK confirms, for a backend that cannot be probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmed {
    /// An attach returned OK: the volume is connected to the node.
    Connected,
    /// A detach or force-detach returned OK: the volume is disconnected from the node.
    Disconnected,
}

/// How many handled tokens an attachment remembers. A token older than that could act again;
/// tokens are meant to be new each time (a timestamp), so a person never reaches back that far.
pub const MAX_HANDLED_TOKENS: usize = 16;

/// The force-detach annotation, as read against the tokens already handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// No annotation, or its token was already handled.
    None,
    /// A new token: force-detach once.
    New(String),
    /// A token already on the attachment when the operator first saw it: a past request that a
    /// re-created or restored manifest carries. Recorded as handled, never acted on.
    AtCreation(String),
    /// The annotation's value cannot be a token; it is reported and otherwise ignored.
    Invalid { token: String, why: &'static str },
}

impl Request {
    /// Reads the annotation value against the tokens the status records as handled, so that
    /// each token acts at most once over the object's life, whatever came between (another
    /// token, an automatic force), and a manifest that keeps carrying the annotation does not
    /// force-detach over and over.
    pub fn read(annotation: Option<&str>, status: &VolumeAttachmentStatus) -> Self {
        match annotation {
            None => Self::None,
            Some(token) if is_handled(status, token) => Self::None,
            Some("") => Self::Invalid {
                token: String::new(),
                why: "the token is empty",
            },
            Some(token) if token.len() > MAX_TOKEN_LEN => Self::Invalid {
                token: token.chars().take(16).collect::<String>() + "…",
                why: "the token is longer than 128 characters",
            },
            Some(token) if token.chars().any(char::is_control) => Self::Invalid {
                token: token.escape_default().to_string(),
                why: "the token contains control characters",
            },
            // Never reconciled yet: the object arrived with the token.
            Some(token) if status.phase.is_none() => Self::AtCreation(token.to_owned()),
            Some(token) => Self::New(token.to_owned()),
        }
    }
}

/// Whether `token` was already handled on this attachment. The last force-detach's token counts
/// too, for records written before the list was kept.
pub fn is_handled(status: &VolumeAttachmentStatus, token: &str) -> bool {
    status.handled_tokens.iter().any(|t| t == token)
        || status
            .force_detach
            .as_ref()
            .is_some_and(|f| f.token.as_deref() == Some(token))
}

/// Everything a decision rests on.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The attachment is being deleted: the desired state is "detached".
    pub deleting: bool,
    pub has_finalizer: bool,
    pub node: &'a str,
    pub status: &'a VolumeAttachmentStatus,
    pub request: &'a Request,
    /// The Volume's policy, or why the attachment cannot reach its backend.
    pub volume: Result<&'a VolumePolicy, &'a VolumeProblem>,
    /// What the attachment reaches now: the Volume's driver, handle and UID, or, for a deleted
    /// attachment, what it recorded when it attached. Absent with a misconfiguration.
    pub target: Option<&'a Binding>,
    /// Another attachment of the same backend volume to the same node, not being deleted and
    /// Attached as the backend confirmed: it holds the same connection (a GitOps rename creates
    /// one before it prunes the other). Asked for a deleted attachment, and for a live one that
    /// attaches on the records alone (from the attachments listed on the turn).
    pub sibling: Option<&'a str>,
    /// For a live attachment of a single-attach volume on a backend that cannot be probed: the
    /// attachments on other nodes whose records claim a connection to the same backend volume
    /// that no confirmed detach has ended (`status.boundTo` set), as the apiserver listed them on
    /// this turn; `None` when they were not listed. The backend cannot say where the volume is
    /// connected, so these records are the operator's own guard against a second node.
    pub claimed_elsewhere: Option<&'a [String]>,
    /// The backend's answer on this turn, since the last driver call; absent when it was not
    /// asked yet (the decision then asks for it with [`Step::Probe`] when it needs it).
    pub backend: Option<&'a ProbeAnswer>,
    /// Whether `status` (and the rest of the record) is known to be current.
    pub basis: Basis,
    pub turn: Turn,
    /// The attachment's `metadata.generation`, which the conditions written on it observe.
    pub generation: Option<i64>,
    /// How often a converged attachment is looked at again (the operator's `resyncInterval`), to
    /// notice a connection lost out of band.
    pub resync: Duration,
    pub now: Timestamp,
}

impl Input<'_> {
    /// The Volume's policy, when the attachment can reach its backend.
    pub fn policy(&self) -> Option<&VolumePolicy> {
        self.volume.ok()
    }
}

/// Where the holders of a blocked attach were seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldersSeenIn {
    /// The backend's answer: the volume is connected there.
    Backend,
    /// Other attachments' records, for a backend that cannot be asked: they claim a connection
    /// that no confirmed detach has ended.
    Records,
}

/// The one next thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add the finalizer, before any backend call.
    AddFinalizer,
    /// Record the intent to attach (phase Attaching, its clock restarted), before calling the driver.
    BeginAttach,
    /// Call the driver's idempotent attach.
    Attach,
    /// The backend shows the volume connected to this node: record it. `rolled_forward` when the
    /// attach was stuck and the backend shows it had in fact completed (case 2).
    MarkAttached { rolled_forward: bool },
    /// Another node holds a single-attach volume: do not attach.
    BlockAttach {
        holders: Vec<String>,
        seen_in: HoldersSeenIn,
    },
    /// The record says attached, the backend shows no connection: record the truth, then attach again.
    ConnectionLost,
    /// Record the intent to detach (phase Detaching, its clock restarted), before calling the driver.
    BeginDetach,
    /// Call the driver's safe detach (terminate_connection, then detach), in phase Detaching
    /// (entered now, as the call's intent, if the attachment was not there yet).
    Detach,
    /// Record the intent, then call the driver's force_detach.
    ForceDetach {
        reason: ForceDetachReason,
        token: Option<String>,
    },
    /// The backend confirmed no connection to this node: record `Detached`.
    MarkDetached,
    /// Detached and confirmed, and the attachment is being deleted: release the finalizer.
    ReleaseFinalizer,
    /// The attachment is being deleted, and another live attachment of the same Volume and node
    /// claims the same connection: release the finalizer and leave the connection to it.
    HandOver { to: String },
    /// Nothing to do until something changes or `recheck_after` passes.
    Wait {
        why: Wait,
        recheck_after: Option<Duration>,
    },
    /// The attachment cannot reach its backend; record why and wait for a fix.
    Fail(VolumeProblem),
    /// Read the attachment from the apiserver and decide again: the next step would act on a
    /// record that may be out of date.
    Refresh,
    /// Ask the backend where the volume is connected, and decide again on its answer: what
    /// comes next depends on it. Asked only then, so that the steps that rest on the record
    /// alone (the finalizer, a refresh, a misconfiguration) cost the backend nothing.
    Probe,
}

/// Why a reconcile ends without acting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The record and the backend agree.
    Converged,
    /// The backend did not answer; nothing may be decided.
    BackendUnreachable,
    /// Another reconcile holds the volume's lock.
    VolumeBusy,
    /// The replica cannot be sure it holds the lease: it neither calls a driver nor writes.
    Fenced,
    /// An earlier call of unknown outcome may still land: nothing is asked or called until it
    /// cannot.
    CallMayStillLand,
    /// The backend has a connection of the volume that names no node: it may be this node's, so
    /// the detach is not confirmed until it is gone.
    UnattributedConnection,
}

impl Step {
    fn wait(why: Wait, recheck_after: Option<Duration>) -> Self {
        Self::Wait { why, recheck_after }
    }

    /// Whether the step calls the driver (the calls that the intent written before them
    /// announces).
    pub fn calls_driver(&self) -> bool {
        matches!(self, Self::Attach | Self::Detach | Self::ForceDetach { .. })
    }

    /// Whether the step is a driver call or the intent written before one: what it records
    /// (the binding, the policy it attaches by) rests on the Volume as read.
    pub fn begins_a_call(&self) -> bool {
        self.calls_driver() || matches!(self, Self::BeginAttach | Self::BeginDetach)
    }

    /// Whether the step acts outside the status write (which the apiserver refuses when its
    /// version is old): those steps are taken only on a fresh record.
    pub fn needs_fresh_record(&self) -> bool {
        matches!(
            self,
            Self::Attach
                | Self::Detach
                | Self::ForceDetach { .. }
                | Self::ReleaseFinalizer
                | Self::HandOver { .. }
        )
    }
}

/// The phase as recorded; an attachment never reconciled is `Pending`.
pub fn phase_of(status: &VolumeAttachmentStatus) -> AttachmentPhase {
    status.phase.unwrap_or(AttachmentPhase::Pending)
}

/// How long the current phase may still last before it counts as stuck; `None` when the phase
/// cannot be stuck. Zero means stuck now.
pub fn stuck_in(
    status: &VolumeAttachmentStatus,
    policy: &VolumePolicy,
    now: Timestamp,
) -> Option<Duration> {
    let phase = phase_of(status);
    if !matches!(
        phase,
        AttachmentPhase::Attaching | AttachmentPhase::Detaching
    ) {
        return None;
    }
    // A phase with no recorded start began now: the clock starts at the first observation.
    let since = status.phase_since.as_ref().map_or(now, |t| t.0);
    // A stored time is cut to whole seconds: count from the latest instant it can stand for, so
    // that an attachment is never called stuck before its stuckAfter has passed.
    let elapsed = elapsed_since(since, now).saturating_sub(Duration::from_secs(1));
    Some(policy.stuck_after.saturating_sub(elapsed))
}

/// How long ago `since` was. A time ahead of `now` (another replica's clock, or this one stepped
/// back) has not passed at all: counting it as elapsed would make a deadline fire early.
pub fn elapsed_since(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// Decides the next step. See the module docs for the invariant it keeps.
pub fn decide(input: &Input) -> Step {
    if input.turn == Turn::Fenced {
        return Step::wait(Wait::Fenced, Some(FENCED_RECHECK));
    }
    if input.basis == Basis::Conflicted {
        return Step::Refresh;
    }
    let step = decide_on_record(input);
    if input.basis == Basis::Cached && step.needs_fresh_record() {
        Step::Refresh
    } else {
        step
    }
}

fn decide_on_record(input: &Input) -> Step {
    let phase = phase_of(input.status);

    if !input.has_finalizer {
        // Deleting without our finalizer: nothing of ours is held; the object is going away.
        return if input.deleting {
            Step::wait(Wait::Converged, None)
        } else {
            Step::AddFinalizer
        };
    }

    let policy = match input.volume {
        Ok(policy) => policy,
        Err(problem) => return Step::Fail(problem.clone()),
    };
    // Bound to what it attached: a live attachment whose Volume was replaced under it is not
    // attached to the new one (a deleted one is detached from what it recorded).
    if let (Some(recorded), Some(now)) = (&input.status.bound_to, input.target)
        && recorded != now
    {
        let problem = VolumeProblem::BindingChanged {
            recorded: Box::new(recorded.clone()),
            now: Box::new(now.clone()),
        };
        // The Volume was re-created over the same backend volume: this turn is that volume's,
        // so the backend can still say whether the connection the record claims is there.
        if problem.answers_for_recorded()
            && input.status.attached
            && input.backend.is_none()
            && input.turn == Turn::Ours
        {
            return Step::Probe;
        }
        return Step::Fail(problem);
    }
    match input.turn {
        Turn::VolumeBusy => return Step::wait(Wait::VolumeBusy, Some(BUSY_RECHECK)),
        Turn::CallMayStillLand(left) => return Step::wait(Wait::CallMayStillLand, Some(left)),
        Turn::Ours | Turn::Fenced => {}
    }

    // The probe's answer, or for a backend that cannot be probed, what a call just confirmed.
    let (connections, confirmed) = match input.backend {
        Some(ProbeAnswer::Answered(connections)) => (Some(connections), None),
        Some(ProbeAnswer::Unprobeable(confirmed)) => (None, *confirmed),
        // Not asked yet on this turn, or asked before the last driver call changed what it
        // would say.
        None => return Step::Probe,
        // Unreachable: neither "connected" nor "not connected" may be concluded. Wake at the
        // stuck deadline so the Stuck condition appears on time, else retry with backoff.
        Some(ProbeAnswer::Unreachable(_)) => {
            return Step::wait(
                Wait::BackendUnreachable,
                stuck_in(input.status, policy, input.now),
            );
        }
    };

    // Deleting one of two claims on one connection detaches nothing: the other keeps it. This
    // comes before a person's request: a token on the claim being deleted asks for that claim to
    // be released, which the hand-over does without cutting off the client of the one that stays
    // (a token on the live claim is what cuts the connection). A forced detach under way goes on
    // (it was decided before the other claim was seen).
    if input.deleting
        && let Some(sibling) = input.sibling
        && !input
            .status
            .force_detach
            .as_ref()
            .is_some_and(|f| f.state == ForceDetachState::InProgress)
    {
        return Step::HandOver {
            to: sibling.to_owned(),
        };
    }
    // A person's request comes next, whatever the phase.
    if let Request::New(token) = input.request {
        return Step::ForceDetach {
            reason: ForceDetachReason::Requested,
            token: Some(token.clone()),
        };
    }

    let stuck = stuck_in(input.status, policy, input.now) == Some(Duration::ZERO);
    let forcing = input
        .status
        .force_detach
        .as_ref()
        .is_some_and(|f| f.state == ForceDetachState::InProgress);
    let Some(connections) = connections else {
        return decide_unprobed(input, policy, confirmed, stuck, forcing);
    };
    let here = connections.includes(input.node);
    // A connection that names no node may be this node's: while one exists, nothing is
    // confirmed detached from here, and it holds the volume against attaches elsewhere.
    let unattributed = !connections.unattributed.is_empty();
    let others: Vec<String> = connections
        .nodes
        .iter()
        .filter(|n| *n != input.node)
        .cloned()
        .chain(
            connections
                .unattributed
                .iter()
                .map(|id| format!("export {id}")),
        )
        .collect();

    match phase {
        AttachmentPhase::Detaching if !here && unattributed => {
            Step::wait(Wait::UnattributedConnection, None)
        }
        // Detaching is finished the same way whether the attachment is live or being deleted:
        // a live one is attached again afterwards, from scratch.
        AttachmentPhase::Detaching if !here => Step::MarkDetached,
        AttachmentPhase::Detaching if forcing => continue_force(input.status),
        // Case 4 when stuck; before that, the safe detach, which a connected user refuses.
        AttachmentPhase::Detaching if stuck => {
            stuck_step(policy, ForceDetachReason::StuckDetaching, Step::Detach)
        }
        AttachmentPhase::Detaching => Step::Detach,

        _ if input.deleting => match phase {
            AttachmentPhase::Detached if !here && unattributed => {
                Step::wait(Wait::UnattributedConnection, None)
            }
            AttachmentPhase::Detached if !here => Step::ReleaseFinalizer,
            AttachmentPhase::Attached => Step::BeginDetach,
            // Attaching, Failed, Pending (which may follow an attach of unknown outcome and a
            // block), or connected despite the record: the idempotent detach is called before
            // anything says detached, even when the probe shows nothing, so that an attach
            // still in flight cannot survive the release.
            _ => Step::Detach,
        },

        AttachmentPhase::Attaching if here => {
            if input.status.connection_info.is_empty() && !stuck {
                // Connected, but without the driver's connection info: the idempotent attach
                // returns it without connecting anything new.
                Step::Attach
            } else {
                Step::MarkAttached {
                    rolled_forward: stuck,
                }
            }
        }
        AttachmentPhase::Attaching if !others.is_empty() && !policy.multi_attach => {
            Step::BlockAttach {
                holders: others,
                seen_in: HoldersSeenIn::Backend,
            }
        }
        // Case 1: stuck attaching and not connected: clean up, then attach from scratch.
        AttachmentPhase::Attaching if stuck => {
            stuck_step(policy, ForceDetachReason::StuckAttaching, Step::Attach)
        }
        AttachmentPhase::Attaching => Step::Attach,

        // Confirmed, but without the driver's connection info (a stuck attach rolled forward):
        // the idempotent attach returns it without connecting anything new.
        AttachmentPhase::Attached if here && input.status.connection_info.is_empty() => {
            Step::Attach
        }
        AttachmentPhase::Attached if here => Step::wait(Wait::Converged, Some(input.resync)),
        AttachmentPhase::Attached => Step::ConnectionLost,

        // Pending, Detached (after a forced detach of a live attachment) or Failed: attach anew.
        _ if here => Step::BeginAttach,
        _ if !others.is_empty() && !policy.multi_attach => Step::BlockAttach {
            holders: others,
            seen_in: HoldersSeenIn::Backend,
        },
        _ => Step::BeginAttach,
    }
}

/// The same decisions for a backend that cannot be probed, with the word of a call that just
/// succeeded in place of the probe. Without that word nothing is marked attached or detached.
/// The multi-attach guard rests on the records of the other attachments of the backend volume,
/// listed on the turn, and on the backend's own refusal (a CSI plugin refuses to publish a
/// single-writer volume to a second node), since the backend cannot be asked beforehand.
fn decide_unprobed(
    input: &Input,
    policy: &VolumePolicy,
    confirmed: Option<Confirmed>,
    stuck: bool,
    forcing: bool,
) -> Step {
    let phase = phase_of(input.status);
    match phase {
        AttachmentPhase::Detaching if confirmed == Some(Confirmed::Disconnected) => {
            Step::MarkDetached
        }
        AttachmentPhase::Detaching if forcing => continue_force(input.status),
        AttachmentPhase::Detaching if stuck => {
            stuck_step(policy, ForceDetachReason::StuckDetaching, Step::Detach)
        }
        AttachmentPhase::Detaching => Step::Detach,
        _ if input.deleting => match phase {
            AttachmentPhase::Detached => Step::ReleaseFinalizer,
            AttachmentPhase::Attached => Step::BeginDetach,
            _ => Step::Detach,
        },
        AttachmentPhase::Attaching if confirmed == Some(Confirmed::Connected) => {
            Step::MarkAttached {
                rolled_forward: false,
            }
        }
        AttachmentPhase::Attaching if policy.multi_attach => {
            if stuck {
                stuck_step(policy, ForceDetachReason::StuckAttaching, Step::Attach)
            } else {
                Step::Attach
            }
        }
        // Single-attach, an attach already intended: called again only while no other node's
        // record claims the volume. An intent decided on such a list finds none; one that was
        // not (written while the Volume was multi-attach) may. Its own call may have landed, so
        // it stays Attaching rather than Pending, and once stuck it is forced off its own node
        // (case 1) or waits for a person's token: two such intents cannot wait on each other
        // for good. Not forced while another attachment of its node holds that connection:
        // the force would cut that one's client, for a claim that never attached.
        AttachmentPhase::Attaching => {
            let go_on = match input.claimed_elsewhere {
                None => return Step::Refresh,
                Some([]) => Step::Attach,
                Some(claims) => Step::BlockAttach {
                    holders: claims.to_vec(),
                    seen_in: HoldersSeenIn::Records,
                },
            };
            if stuck && input.sibling.is_none() {
                stuck_step(policy, ForceDetachReason::StuckAttaching, go_on)
            } else {
                go_on
            }
        }
        AttachmentPhase::Attached => Step::wait(Wait::Converged, Some(input.resync)),
        _ if policy.multi_attach => Step::BeginAttach,
        // Pending, Detached or Failed, single-attach: a new attach only when no other node's
        // record claims the volume. The backend's refusal of a second single-writer attach is
        // a second guard, not the only one.
        _ => match input.claimed_elsewhere {
            None => Step::Refresh,
            Some([]) => Step::BeginAttach,
            Some(claims) => Step::BlockAttach {
                holders: claims.to_vec(),
                seen_in: HoldersSeenIn::Records,
            },
        },
    }
}

/// A force-detach already under way goes on: a forced operation never falls back to a safe one.
fn continue_force(status: &VolumeAttachmentStatus) -> Step {
    let last = status.force_detach.as_ref();
    Step::ForceDetach {
        reason: last.map_or(ForceDetachReason::StuckDetaching, |f| f.reason),
        token: last.and_then(|f| f.token.clone()),
    }
}

/// A stuck attachment is forced loose when the Volume allows it; otherwise the normal step goes on
/// (it may still succeed) and the Stuck condition asks a person to decide.
fn stuck_step(policy: &VolumePolicy, reason: ForceDetachReason, otherwise: Step) -> Step {
    if policy.auto_force_detach {
        Step::ForceDetach {
            reason,
            token: None,
        }
    } else {
        otherwise
    }
}
