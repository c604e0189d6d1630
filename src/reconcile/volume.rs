//! The Volume controller: the Volume's view of its backend — which nodes it is connected to,
//! which of those no attachment claims (orphans, case 5), and, under `orphanPolicy: Detach`, the
//! backend-confirmed force-detach of those.

use super::status_patch::status_patch;
use super::{
    Context, Error, Outcome, TURN_WAIT, aliases_as_of, aliases_of, attachments_naming_as_of,
    cached_attachments_naming, finalizer, hold_volume, owner_of_handle, probe, synced,
    volumes_version_now,
};
use crate::MANAGER;
use crate::api::{VOLUME_FINALIZER, Volume, VolumeAttachment, VolumeStatus};
use crate::decide::events::{orphan_forced, released_leaving, volume_between};
use crate::decide::recheck::{Recheck, VolumeOutcome, volume_ending};
use crate::decide::volume::{VolumeInput, decide_volume};
use crate::decide::{BUSY_RECHECK, FENCED_RECHECK, ProbeAnswer, VolumeProblem, stuck_after};
use crate::driver::{Driver, DriverError, ErrorClass, ok_if_not_connected};
use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, info_span, warn};

pub async fn reconcile(volume: Arc<Volume>, context: Arc<Context>) -> Result<Action, Error> {
    let name = volume.name_any();
    let span = info_span!("reconcile", kind = "Volume", object = %name);
    // Until the attachment cache is filled, every connection would look unclaimed and a deleted
    // Volume free to go: a restarted operator can list its Volumes before its attachments.
    synced(&context.attachments).await;
    let started = std::time::Instant::now();
    let volume = context.own_volume_writes.newest(volume.as_ref().clone());
    let outcome = reconcile_fresh_on_conflict(volume, &context)
        .instrument(span)
        .await;
    context.metrics.reconcile_took("Volume", started.elapsed());
    match outcome? {
        Outcome::Settled(action) => {
            context.backoff.succeeded(&backoff_key(&name));
            Ok(action)
        }
        // A failed force keeps its backoff growing.
        Outcome::Retry(action) => Ok(action),
    }
}

pub fn error_policy(volume: Arc<Volume>, _error: &Error, context: Arc<Context>) -> Action {
    Action::requeue(
        context
            .backoff
            .failed(&backoff_key(&volume.name_any()), None),
    )
}

/// Volumes and attachments may share names; their backoffs must not.
fn backoff_key(name: &str) -> String {
    format!("volume/{name}")
}

/// How a pass over one Volume ended.
enum Pass {
    Done(Outcome),
    /// It would force an orphan off, or release a deleted Volume, on what the cache says; or, on
    /// the apiserver's Volume, that Volume changed before a force: read the Volume (and its
    /// attachments) from the apiserver, and decide again on those.
    ReadAgain,
}

/// Reconciles the Volume as the cache has it. If a write finds it changed since, reads the
/// Volume from the apiserver and reconciles that; if an orphan would be forced off or the
/// deleted Volume released, reads the Volume and its attachments from the apiserver, and decides
/// again on those, and again if the Volume changes before a force. Nothing is forced or
/// released on a Volume whose write was refused, and nothing on the cache's word that no
/// attachment claims it: the attachment cache may not have
/// seen one created a moment ago. The attachments are listed only then: a refused write alone
/// (most often the cache still behind this operator's own last write) needs only the Volume again.
async fn reconcile_fresh_on_conflict(volume: Volume, context: &Context) -> Result<Outcome, Error> {
    let api = Api::<Volume>::all(context.client.clone());
    let mut volume = volume;
    let mut fresh = false;
    for _ in 0..PASSES {
        match reconcile_volume(&volume, context, fresh).await {
            Ok(Pass::Done(outcome)) => return Ok(outcome),
            // A pass on the cache proposes; a fresh pass decides, on a Volume that has not
            // changed since it was read.
            Ok(Pass::ReadAgain) => fresh = true,
            Err(Error::Conflict(_)) => context.metrics.write_conflict("Volume"),
            // Deleted since the cache had it (a bulk delete outruns the watch): nothing is left
            // to record or release, and the deletion's own event ends its reconciles.
            Err(error) if error.is_not_found() => {
                return Ok(Outcome::Settled(Action::await_change()));
            }
            Err(error) => return Err(error),
        }
        match api
            .get_opt(&volume.name_any())
            .await?
            .filter(|fresh| fresh.uid() == volume.uid())
        {
            Some(fresh) => volume = fresh,
            None => return Ok(Outcome::Settled(Action::await_change())),
        }
    }
    // Changed under every pass: look again soon, not at once.
    Ok(Outcome::Settled(Action::requeue(Duration::from_secs(1))))
}

/// Passes over one Volume in one reconcile: on the cache, and at most twice more on what the
/// apiserver returns.
const PASSES: usize = 3;

/// The attachments whose connections count as claimed. On the cache alone, the cache's. On a
/// pass that may force an orphan off or release the Volume, those the apiserver listed on this
/// pass's turn, and also those the cache holds: either may lack one the other has (the cache
/// lags; a list misses what a lagging watch delivered before a re-list). A copy the apiserver
/// listed is preferred to the cache's of the same object; one in either counts.
pub(super) fn claiming(
    fresh: Option<&[VolumeAttachment]>,
    cached: Vec<Arc<VolumeAttachment>>,
    names: &BTreeSet<String>,
) -> Vec<Arc<VolumeAttachment>> {
    let Some(fresh) = fresh else {
        return cached;
    };
    let mut claiming: Vec<Arc<VolumeAttachment>> = fresh
        .iter()
        .filter(|a| names.contains(&a.spec.volume_name))
        .cloned()
        .map(Arc::new)
        .collect();
    let listed: BTreeSet<String> = claiming
        .iter()
        .map(|a| a.uid().unwrap_or_default())
        .collect();
    claiming.extend(
        cached
            .into_iter()
            .filter(|a| !listed.contains(&a.uid().unwrap_or_default())),
    );
    claiming
}

/// One pass over `volume`. `fresh`: the pass is on a Volume read from the apiserver, and lists
/// the attachments from the apiserver too, on the volume's turn, right before it decides; else
/// the pass is on the cache.
async fn reconcile_volume(volume: &Volume, context: &Context, fresh: bool) -> Result<Pass, Error> {
    // A replica unsure of its lease writes nothing and calls nothing.
    if !context.fence.permits() {
        return Ok(Pass::Done(Outcome::Retry(Action::requeue(FENCED_RECHECK))));
    }
    let api = Api::<Volume>::all(context.client.clone());
    let deleting = volume.metadata.deletion_timestamp.is_some();
    let mut volume = volume.clone();
    if !deleting && let Some(written) = hold_volume(context, &api, &volume).await? {
        context
            .own_volume_writes
            .wrote(volume.resource_version(), &written);
        volume = written;
    }
    let driver = context.driver(&volume.spec.driver);
    let grace = stuck_after(
        volume.spec.stuck_after.as_deref(),
        context.config.default_stuck_after,
    );
    // On the fresh pass, whether another Volume owns the backend volume is decided on the aliases
    // read on the turn below: one the cache still has may be gone, and this Volume then owns
    // the backend volume and what is connected to it.
    let owner = if fresh {
        None
    } else {
        owner_of_handle(&aliases_of(context, &volume), &volume)
    };
    let problem = match (&driver, &grace, owner) {
        (Err(problem), _, _) | (_, Err(problem), _) => Some(problem.clone()),
        (_, _, Some(owner)) => Some(VolumeProblem::DuplicateHandle { owner }),
        _ => None,
    };
    let driver = driver.ok();
    // The probe and any forced detach of an orphan are taken on the volume's turn, so that an
    // attachment between its attach and its confirmation is not mistaken for an orphan.
    let _turn = match &driver {
        Some(_) if problem.is_none() => {
            let turn = context
                .locks
                .turn(&volume.spec.driver, &volume.spec.volume_handle, TURN_WAIT)
                .await;
            if turn.is_none() {
                return Ok(Pass::Done(Outcome::Retry(Action::requeue(BUSY_RECHECK))));
            }
            // A call of unknown outcome may still land: no probe now, which it could belie.
            if let Some(left) = context
                .locks
                .may_still_land(&volume.spec.driver, &volume.spec.volume_handle)
            {
                return Ok(Pass::Done(Outcome::Retry(Action::requeue(left))));
            }
            turn
        }
        _ => None,
    };
    // The other Volumes of its backend volume: on the fresh pass, as the apiserver had them on
    // the volume's turn (the cache's once it has taken in every change up to a read taken on the
    // turn, else listed). One the cache has not seen yet may own the handle, or claim a
    // connection through its own attachments: nothing is forced off on the cache's word alone.
    let (aliases, as_of) = if fresh {
        let as_of = volumes_version_now(context, &volume.name_any()).await?;
        (
            aliases_as_of(context, &volume, as_of.as_deref()).await?,
            as_of,
        )
    } else {
        (aliases_of(context, &volume), None)
    };
    let problem = problem.or_else(|| {
        owner_of_handle(&aliases, &volume).map(|owner| VolumeProblem::DuplicateHandle { owner })
    });
    let mut no_such_volume = false;
    let backend = match &driver {
        Some(driver) if problem.is_none() && !driver.can_probe() => {
            Some(ProbeAnswer::Unprobeable(None))
        }
        Some(driver) if problem.is_none() => {
            Some(match driver.probe(&volume.spec.volume_handle).await {
                Ok(connections) => ProbeAnswer::Answered(connections),
                Err(error) => {
                    no_such_volume = matches!(error, DriverError::UnknownVolume(_));
                    ProbeAnswer::Unreachable(error.to_string())
                }
            })
        }
        _ => None,
    };

    let name = volume.name_any();
    // A connection is claimed by an attachment of this Volume, or of another Volume naming the
    // same backend volume: an alias never takes another's connection for an orphan.
    let mut names: BTreeSet<String> = aliases.iter().map(|alias| alias.name_any()).collect();
    names.insert(name.clone());
    // As the apiserver had them on the turn (from the cache once it has caught up with the read
    // above): no attachment of this backend volume attaches between that read and what is decided
    // on it.
    let listed = if fresh {
        Some(attachments_naming_as_of(&names, context, as_of.as_deref()).await?)
    } else {
        None
    };
    let attachments = claiming(
        listed.as_deref(),
        cached_attachments_naming(context, &names),
        &names,
    );
    let claimed: BTreeSet<String> = attachments
        .iter()
        .map(|a| a.spec.node_name.clone())
        .collect();
    let held_by: BTreeSet<String> = attachments
        .iter()
        .filter(|a| a.spec.volume_name == name)
        .map(|a| a.spec.node_name.clone())
        .collect();
    let phases: Vec<_> = attachments
        .iter()
        .filter_map(|a| a.status.as_ref()?.phase)
        .collect();

    let current = volume.status.clone().unwrap_or_default();
    let decision = decide_volume(
        &current,
        &VolumeInput {
            generation: volume.metadata.generation,
            problem: problem.as_ref(),
            backend: backend.as_ref(),
            claimed: &claimed,
            held_by: &held_by,
            attachment_phases: &phases,
            orphan_policy: volume.spec.orphan_policy,
            multi_attach: volume.spec.multi_attach,
            grace: grace.unwrap_or(context.config.default_stuck_after),
            no_such_volume,
            deleting,
            now: Timestamp::now(),
        },
    );
    // A force that failed holds the next one back until its backoff is due, whatever woke the
    // Volume (most often its own status write); the status is still recorded.
    let held = if decision.force_detach.is_empty() {
        None
    } else {
        context.backoff.holding(&backoff_key(&name))
    };
    if !fresh && (decision.release || (!decision.force_detach.is_empty() && held.is_none())) {
        return Ok(Pass::ReadAgain);
    }
    if decision.release {
        // No status for a Volume about to go: its write would only change the version the
        // release is conditioned on, and send the release round once more.
        finalizer::remove(&api, &volume, VOLUME_FINALIZER).await?;
        // Told once: a Volume another finalizer keeps comes back here with ours gone.
        if volume.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
            && let Some(notice) = released_leaving(&name, decision.leaves.as_deref())
        {
            context.events.publish(&volume, &notice).await;
        }
        info!(
            uid = volume.uid().unwrap_or_default(),
            version = volume.resource_version().unwrap_or_default(),
            listed = listed.as_ref().map_or(0, Vec::len),
            "released: no attachment names it"
        );
        context.own_volume_writes.forget(&volume);
        return Ok(Pass::Done(Outcome::Settled(Action::await_change())));
    }
    let wrote = persist(&volume, context, &current, &decision.status).await?;
    if let Some(left) = held {
        return Ok(Pass::Done(Outcome::Retry(Action::requeue(left))));
    }

    let mut failed = false;
    if let Some(driver) = &driver {
        for (index, node) in decision.force_detach.iter().enumerate() {
            // A force rests on the Volume as this pass read it, before the turn (its
            // orphanPolicy, its grace). A status write conditioned on that version proved it
            // unchanged just now; otherwise, and before each later force, the Volume is read
            // again, and one changed since is decided again (after a failed force of this
            // pass, once its backoff is due).
            if (index > 0 || !wrote) && changed_since(&api, &volume).await? {
                if failed {
                    break;
                }
                return Ok(Pass::ReadAgain);
            }
            // A replica unsure of its lease calls nothing, however far the pass has come: checked
            // after the read above, which a slow apiserver may draw out past the lease.
            if !context.fence.permits() {
                break;
            }
            let Err(class) = force_detach_orphan(&volume, context, driver.as_ref(), node).await
            else {
                continue;
            };
            failed = true;
            // The call may still land: nothing more acts on the volume until it can no longer.
            if class == ErrorClass::UnknownOutcome {
                break;
            }
        }
    }

    if let Some(problem) = &problem {
        warn!(reason = problem.reason(), "{}", problem.message());
    }
    let ending = volume_ending(
        VolumeOutcome {
            unusable: problem.is_some(),
            forced: !decision.force_detach.is_empty(),
            force_failed: failed,
            recheck_after: decision.recheck_after,
        },
        context.config.resync_interval,
        driver.as_ref().is_some_and(|d| d.can_probe_many()),
    );
    Ok(Pass::Done(match ending {
        Recheck::Settled(None) => Outcome::Settled(Action::await_change()),
        Recheck::Settled(Some(after)) | Recheck::Soon(after) => {
            Outcome::Settled(Action::requeue(after))
        }
        Recheck::Backoff { deadline } => Outcome::Retry(Action::requeue(
            context.backoff.failed(&backoff_key(&name), deadline),
        )),
    }))
}

/// Whether the Volume at the apiserver no longer stands on the grounds `volume` gave the
/// decision: deleted or re-created, its spec changed, or its deletion begun. A label, an
/// annotation or another controller's finalizer changes nothing the decision rests on.
async fn changed_since(api: &Api<Volume>, volume: &Volume) -> Result<bool, Error> {
    let now = api.get_opt(&volume.name_any()).await?;
    Ok(now.is_none_or(|now| {
        now.uid() != volume.uid()
            || now.spec != volume.spec
            || now.metadata.deletion_timestamp != volume.metadata.deletion_timestamp
    }))
}

/// Force-detaches the orphaned connection of `volume` to `node`, and tells how it ended: the
/// class of the call's error, if it failed, and `Retryable` for an OK the backend does not
/// confirm.
async fn force_detach_orphan(
    volume: &Volume,
    context: &Context,
    driver: &dyn Driver,
    node: &str,
) -> Result<(), ErrorClass> {
    let handle = &volume.spec.volume_handle;
    let sent = tokio::time::Instant::now();
    let result = ok_if_not_connected(driver.force_detach(handle, node).await);
    if let Err(error) = &result
        && error.class() == ErrorClass::UnknownOutcome
    {
        context
            .locks
            .call_may_land(&volume.spec.driver, handle, sent, driver.lands_within());
    }
    // An OK call counts once the backend shows the connection gone.
    let answer = match &result {
        Ok(()) => Some(probe(driver, handle).await),
        Err(_) => None,
    };
    let forced = orphan_forced(
        &volume.name_any(),
        node,
        result.as_ref().copied(),
        answer.as_ref(),
    );
    context
        .metrics
        .force_detach_called("Orphan", result.is_ok());
    if forced.confirmed {
        context.metrics.force_detached("Orphan");
    }
    context.events.publish(volume, &forced.notice).await;
    match result {
        // Returned OK, yet still connected: looked at again with backoff, as a failure is.
        Ok(()) if !forced.confirmed => Err(ErrorClass::Retryable),
        Ok(()) => Ok(()),
        Err(error) => Err(error.class()),
    }
}

/// Writes the Volume's status if it changed; tells whether it wrote.
async fn persist(
    volume: &Volume,
    context: &Context,
    current: &VolumeStatus,
    next: &VolumeStatus,
) -> Result<bool, Error> {
    if current == next {
        return Ok(false);
    }
    let api = Api::<Volume>::all(context.client.clone());
    // Conditioned on the version the status was computed from: the apiserver refuses the write
    // if the Volume changed since.
    let patch = status_patch(volume.resource_version(), current, next)?;
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let written = api
        .patch_status(&volume.name_any(), &params, &Patch::Merge(&patch))
        .await
        .map_err(Error::from_write)?;
    context
        .own_volume_writes
        .wrote(volume.resource_version(), &written);
    for notice in volume_between(current, next, &volume.name_any(), volume.spec.orphan_policy) {
        context.events.publish(volume, &notice).await;
    }
    Ok(true)
}
