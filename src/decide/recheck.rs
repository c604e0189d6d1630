//! When a reconcile that ends looks at its attachment again.
//!
//! The controller's requeue is a decision like any other: a converged attachment is looked at
//! again after the resync interval (or only when its driver's sweep finds it out of step), a
//! failed or unanswered try after a backoff that grows, a reconcile that did not get its turn
//! soon, without backoff.

use super::{BUSY_RECHECK, HoldersSeenIn, Input, ProbeAnswer, Step, Wait};
use std::time::Duration;

/// How a reconcile ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recheck {
    /// Settled (its backoff is forgotten): looked at again when something changes, and no later
    /// than after the given time.
    Settled(Option<Duration>),
    /// Not its turn (the volume busy, the lease uncertain): again after the given time, its
    /// backoff kept as it was.
    Soon(Duration),
    /// A failed or unanswered try: again after the backoff's next delay, and no later than
    /// `deadline` (the moment the attachment would count as stuck) when there is one.
    Backoff { deadline: Option<Duration> },
}

/// How the reconcile ends with `step`, decided on `input`; `None` when the step does not end it.
/// `swept`: the driver's sweep lists every connection now and then and wakes the attachments
/// the backend no longer matches, so a converged one needs no timer of its own.
pub fn ending(step: &Step, input: &Input, swept: bool) -> Option<Recheck> {
    Some(match step {
        Step::Wait {
            why: Wait::Fenced | Wait::VolumeBusy | Wait::CallMayStillLand,
            recheck_after,
        } => Recheck::Soon(recheck_after.unwrap_or(BUSY_RECHECK)),
        Step::Wait {
            why: Wait::BackendUnreachable,
            recheck_after,
        } => Recheck::Backoff {
            deadline: *recheck_after,
        },
        Step::Wait {
            why: Wait::Converged,
            ..
        } if swept => Recheck::Settled(None),
        Step::Wait { recheck_after, .. } => Recheck::Settled(Some(
            recheck_after.unwrap_or(input.resync).min(input.resync),
        )),
        // The probe of a Volume re-created over the same disk went unanswered: asked again with
        // backoff, as any unanswered probe.
        Step::Fail(_) if matches!(input.backend, Some(ProbeAnswer::Unreachable(_))) => {
            Recheck::Backoff { deadline: None }
        }
        // A missing Volume or driver is fixed by a change that wakes the attachment, and a
        // holder's detach changes the Volume's status, which wakes a blocked one: the timer is
        // only a safety net, slow enough never to spin.
        Step::Fail(_)
        | Step::BlockAttach {
            seen_in: HoldersSeenIn::Backend,
            ..
        } => Recheck::Settled(Some(input.resync)),
        // Nothing wakes an attachment blocked by another's record when that one's detach is
        // confirmed (a backend that cannot be probed changes no Volume status): looked at again
        // soon, then less often, and at least every `CLAIMED_RECHECK`.
        Step::BlockAttach {
            seen_in: HoldersSeenIn::Records,
            ..
        } => Recheck::Backoff {
            deadline: Some(CLAIMED_RECHECK.min(input.resync)),
        },
        // The object goes away, or another takes over the connection.
        Step::ReleaseFinalizer | Step::HandOver { .. } => Recheck::Settled(None),
        Step::AddFinalizer
        | Step::BeginAttach
        | Step::Attach
        | Step::MarkAttached { .. }
        | Step::ConnectionLost
        | Step::BeginDetach
        | Step::Detach
        | Step::ForceDetach { .. }
        | Step::MarkDetached
        | Step::Refresh
        | Step::Probe => return None,
    })
}

/// The longest an attachment blocked by another node's record waits before it looks again.
pub const CLAIMED_RECHECK: Duration = Duration::from_secs(10);

/// How soon a Volume whose orphans were just forced loose is looked at again, to see them gone.
pub const ORPHANS_FORCED_RECHECK: Duration = Duration::from_secs(1);

/// What a Volume's reconcile did, as far as its next look depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeOutcome {
    /// The Volume cannot reach its backend (see [`super::VolumeProblem`]).
    pub unusable: bool,
    /// Orphaned connections were forced loose in this reconcile.
    pub forced: bool,
    /// One of those forced detaches failed.
    pub force_failed: bool,
    /// The end of the shortest grace period still running ([`super::volume::VolumeDecision`]).
    pub recheck_after: Option<Duration>,
}

/// How a Volume's reconcile ends. An unusable Volume waits for the fix that wakes it (the
/// resync only as a net); forced orphans are looked at again soon to see them gone, or with
/// backoff when a force failed; otherwise at the end of a grace period, after the resync, or,
/// when the driver's sweep watches the backend (`swept`), only when something changes.
pub fn volume_ending(outcome: VolumeOutcome, resync: Duration, swept: bool) -> Recheck {
    match outcome {
        VolumeOutcome { unusable: true, .. } => Recheck::Settled(Some(resync)),
        VolumeOutcome {
            forced: true,
            force_failed: true,
            ..
        } => Recheck::Backoff { deadline: None },
        VolumeOutcome { forced: true, .. } => Recheck::Settled(Some(ORPHANS_FORCED_RECHECK)),
        VolumeOutcome {
            recheck_after: Some(after),
            ..
        } => Recheck::Settled(Some(after.min(resync))),
        _ if swept => Recheck::Settled(None),
        _ => Recheck::Settled(Some(resync)),
    }
}
