//! The VolumeAttachment controller: probe, decide, execute, until the decision is to wait.
//!
//! Writes follow the crash rule of the design: an intent (phase Attaching or Detaching, a
//! force-detach in progress) is written before the driver call it announces, and anything that
//! says "detached" is written only after the probe that confirmed it. Everything else is written
//! once, at the end, and only if it changed.
//!
//! And the rules of a running system: each status write carries the `resourceVersion` it was
//! decided on, and the reconcile continues from the object the apiserver returns; a refused
//! write, or a driver call about to be made on a record from the watch cache, means reading the
//! attachment again first. The steps of one reconcile are taken on the volume's turn (one
//! reconcile per backend volume), and no driver is called once the replica cannot be sure it
//! still holds its lease.

use super::lanes::{Lane, QUEUED_RECHECK};
use super::status_patch::status_patch;
use super::{
    Context, Error, Outcome, TURN_WAIT, aliases_as_of, aliases_of, attachments_naming_as_of,
    backend_key, finalizer, hold_volume, owner_of_handle, probe, synced, volume_read_fresh,
    volumes_naming_as_of, volumes_version_now,
};
use crate::MANAGER;
use crate::api::{
    ATTACHMENT_FINALIZER, AttachmentPhase, Binding, FORCE_DETACH_ANNOTATION, VOLUME_FINALIZER,
    Volume, VolumeAttachment, VolumeAttachmentStatus,
};
use crate::decide::events::{Notice, between, handed_over, is_news, reported_failure};
use crate::decide::recheck::{self, Recheck};
use crate::decide::status::{CallResult, after_call, after_step, cut_by_another, force_confirmed};
use crate::decide::{
    BUSY_RECHECK, Basis, FENCED_RECHECK, Input, ProbeAnswer, Request, Step, Turn, VolumePolicy,
    VolumeProblem, decide, phase_of, stuck_after,
};
use crate::driver::{
    AttachRequest, ConnectionInfo, Driver, DriverError, ErrorClass, ok_if_not_connected,
};
use jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// More steps than any path needs (a probe, a re-read, force, a probe, confirm, attach, a probe,
/// confirm, and a re-read and a probe after a refused write): a bound, not a budget.
const MAX_STEPS: usize = 16;

/// The backend, as one attachment reaches it.
struct Target {
    driver: Arc<dyn Driver>,
    /// The driver's name in the configuration: with the handle, what the volume's lock is keyed by.
    driver_name: String,
    handle: String,
    policy: VolumePolicy,
    /// The driver, handle and Volume UID together: what an attach records.
    binding: Binding,
}

pub async fn reconcile(
    attachment: Arc<VolumeAttachment>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    let name = attachment.name_any();
    let token = attachment
        .annotations()
        .get(FORCE_DETACH_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let span = info_span!("reconcile", kind = "VolumeAttachment", object = %name, token = %token);
    // Until the Volume cache is filled, every Volume would look missing.
    synced(&context.volumes).await;
    // A failed try holds the object until its next try is due, whatever woke it (most often its
    // own status write); only a person's new force-detach request goes ahead at once.
    if let Some(left) = context.backoff.holding(&name)
        && !has_new_request(&attachment)
    {
        return Ok(Action::requeue(left));
    }
    // Detaches of deleted attachments take turns in a lane of their own, so that a storm of them
    // (a drained rack) does not hold up a person's attach queued behind it.
    let lane = if attachment.metadata.deletion_timestamp.is_some() {
        Lane::Releasing
    } else {
        Lane::Others
    };
    let Some(_turn) = context
        .lanes
        .enter(lane, &ObjectRef::from_obj(attachment.as_ref()))
    else {
        // Queued: woken when its turn comes; looked at again after a while in any case.
        return Ok(Action::requeue(QUEUED_RECHECK));
    };
    // Start from the cache's latest copy.
    let attachment = match context
        .attachments
        .get(&ObjectRef::from_obj(attachment.as_ref()))
    {
        Some(latest) if latest.uid() == attachment.uid() => latest,
        Some(_) | None => return Ok(Action::await_change()),
    };
    let started = std::time::Instant::now();
    // Boxed: the controller spawns a task for every woken object, and most of a storm's only
    // find their lane full; each holds just this function's own state, not a whole reconcile's.
    let result = Box::pin(Reconcile::new(attachment.as_ref().clone(), &context).run())
        .instrument(span)
        .await;
    context
        .metrics
        .reconcile_took("VolumeAttachment", started.elapsed());
    match result {
        Ok(Outcome::Settled(action)) => {
            context.backoff.succeeded(&name);
            Ok(action)
        }
        Ok(Outcome::Retry(action)) => Ok(action),
        Err(error) => {
            warn!(name, %error, "reconcile failed");
            Err(error)
        }
    }
}

/// Whether the annotation carries a token the status has not recorded yet.
fn has_new_request(attachment: &VolumeAttachment) -> bool {
    let annotation = attachment.annotations().get(FORCE_DETACH_ANNOTATION);
    let status = attachment.status.clone().unwrap_or_default();
    matches!(
        Request::read(annotation.map(String::as_str), &status),
        Request::New(_)
    )
}

pub fn error_policy(
    attachment: Arc<VolumeAttachment>,
    _error: &Error,
    context: Arc<Context>,
) -> Action {
    Action::requeue(context.backoff.failed(&attachment.name_any(), None))
}

/// One reconcile of one attachment: the state it carries between steps.
struct Reconcile<'a> {
    /// The attachment as last read or written, with the `resourceVersion` every write is
    /// conditioned on.
    attachment: VolumeAttachment,
    /// Whether `attachment` is known to be current.
    basis: Basis,
    context: &'a Context,
    api: Api<VolumeAttachment>,
    name: String,
    /// The status as the server has it.
    stored: VolumeAttachmentStatus,
    /// The status as computed so far.
    status: VolumeAttachmentStatus,
    /// The events the steps so far deserve, published with the next write. Collected step by
    /// step, so that a reason that is replaced within the reconcile (RolledForward, ConnectionLost)
    /// is still told.
    notices: Vec<Notice>,
    /// The status the notices were last computed against.
    noticed: VolumeAttachmentStatus,
    /// The failure the stored status already reports: told once, not again at every retry.
    reported_failure: Option<String>,
    /// Attachments the cache showed claiming the same connection that the apiserver says no
    /// longer do: not handed over to.
    gone_siblings: Vec<String>,
    /// For a deleted attachment, the attachments that may claim the same connection, as the
    /// apiserver listed them at the last refresh on this turn, before any driver call: one
    /// attached a moment ago (its turn just ended) may not be in the cache yet, and its
    /// connection is not to be cut. `None` until listed.
    listed_siblings: Option<Vec<VolumeAttachment>>,
}

impl<'a> Reconcile<'a> {
    fn new(attachment: VolumeAttachment, context: &'a Context) -> Self {
        let mut reconcile = Self {
            name: attachment.name_any(),
            attachment,
            basis: Basis::Cached,
            context,
            api: Api::all(context.client.clone()),
            stored: VolumeAttachmentStatus::default(),
            status: VolumeAttachmentStatus::default(),
            notices: Vec::new(),
            noticed: VolumeAttachmentStatus::default(),
            reported_failure: None,
            gone_siblings: Vec::new(),
            listed_siblings: None,
        };
        reconcile.start_from_stored();
        reconcile
    }

    /// Continues from `attachment` as the server has it.
    fn adopt(&mut self, attachment: VolumeAttachment, basis: Basis) {
        self.attachment = attachment;
        self.basis = basis;
        self.start_from_stored();
    }

    /// Computes on from the status stored in `attachment`: what was computed but not written is
    /// dropped, since it was decided on an older version.
    fn start_from_stored(&mut self) {
        let status = self.attachment.status.clone().unwrap_or_default();
        self.reported_failure = reported_failure(&status);
        self.stored = status.clone();
        self.noticed = status.clone();
        self.status = status;
        self.notices.clear();
    }

    fn has_finalizer(&self) -> bool {
        self.attachment
            .finalizers()
            .iter()
            .any(|f| f == ATTACHMENT_FINALIZER)
    }

    async fn run(mut self) -> Result<Outcome, Error> {
        let cached = self
            .context
            .volumes
            .get(&ObjectRef::<Volume>::new(&self.attachment.spec.volume_name));
        // An attach waits until a hold of its Volume by this process has settled
        // (`fresh_target`): until then, a live attachment not attached yet is looked at again
        // later, with no turn taken and no probe (in a storm of new Volumes, the watch wakes it
        // several times meanwhile).
        if self.waits_for_a_settling_hold(cached.as_deref()) {
            return Ok(self.outcome(Recheck::Soon(BUSY_RECHECK)));
        }
        let mut target = self.target(cached, None);
        // One turn for the whole reconcile: from the probe that authorizes a step to the probe
        // that confirms it, no other reconcile of the same backend volume acts.
        let held = match &target {
            Ok(target) => {
                self.context
                    .locks
                    .turn(&target.driver_name, &target.handle, TURN_WAIT)
                    .await
            }
            Err(_) => None,
        };
        let locked = target
            .as_ref()
            .ok()
            .map(|t| (t.driver_name.clone(), t.handle.clone()));
        // Whether the Volume the target rests on was read from the apiserver in this reconcile:
        // a driver call is made only on a fresh attachment *and* a fresh Volume (its policy, its
        // deletion).
        let mut volume_fresh = false;
        // Whether a driver call was made since the Volume was last read. The call may have taken
        // long, and the Volume (its policy, its aliases) changed meanwhile: another call after it
        // is decided on the Volume read again. What the call's answer recorded rests on the
        // backend, not on the Volume, and stays; steps that make no call need no new read.
        let mut called_since_volume_read = false;

        // For a backend that cannot be probed: what the last successful call confirmed.
        let mut confirmed = None;
        // The probe's answer on this turn. It holds until a driver call: no other reconcile of
        // this backend volume acts meanwhile, so only a call of this one makes it out of date.
        let mut answer: Option<ProbeAnswer> = None;
        for _ in 0..MAX_STEPS {
            // What this step is decided on, taken apart from the reconcile's own state, which
            // the step's writes replace.
            let decided_on = self.status.clone();
            let node = self.attachment.spec.node_name.clone();
            let annotation = self
                .attachment
                .annotations()
                .get(FORCE_DETACH_ANNOTATION)
                .cloned();
            // Read against the tokens the status records, so that once a step has taken one,
            // the request is spent: each token acts once.
            let request = Request::read(annotation.as_deref(), &decided_on);
            let sibling = self.sibling(target.as_ref().ok().map(|t| &t.binding));
            let claimed_elsewhere = target
                .as_ref()
                .ok()
                .and_then(|t| self.claimed_elsewhere(&t.binding));
            let backend = match &target {
                Ok(target) if target.driver.can_probe() => answer.clone(),
                Ok(_) => Some(ProbeAnswer::Unprobeable(confirmed)),
                Err(_) => None,
            };
            let swept = target.as_ref().is_ok_and(|t| t.driver.can_probe_many());
            let input = Input {
                deleting: self.attachment.metadata.deletion_timestamp.is_some(),
                has_finalizer: self.has_finalizer(),
                node: &node,
                status: &decided_on,
                request: &request,
                volume: target.as_ref().map(|t| &t.policy),
                target: target.as_ref().ok().map(|t| &t.binding),
                sibling: sibling.as_deref(),
                claimed_elsewhere: claimed_elsewhere.as_deref(),
                backend: backend.as_ref(),
                basis: match self.basis {
                    Basis::Fresh if !volume_fresh => Basis::Cached,
                    basis => basis,
                },
                turn: if !self.context.fence.permits() {
                    Turn::Fenced
                } else if held.is_some() || target.is_err() {
                    match locked.as_ref().and_then(|(driver, handle)| {
                        self.context.locks.may_still_land(driver, handle)
                    }) {
                        Some(left) => Turn::CallMayStillLand(left),
                        None => Turn::Ours,
                    }
                } else {
                    Turn::VolumeBusy
                },
                generation: self.attachment.metadata.generation,
                resync: self.context.config.resync_interval,
                now: Timestamp::now(),
            };
            let step = match decide(&input) {
                step if step.begins_a_call() && called_since_volume_read => Step::Refresh,
                step => step,
            };
            debug!(?step, "step");
            let ending = recheck::ending(&step, &input, swept);
            match &step {
                Step::Probe => {
                    if let Ok(target) = &target {
                        answer = Some(probe(target.driver.as_ref(), &target.handle).await);
                    }
                    continue;
                }
                Step::Refresh => {
                    // A deleted attachment lists the other claims of its connection on this
                    // turn, and so does a live one about to attach a single-attach volume anew
                    // where the backend cannot be probed (the claims on other nodes hold it),
                    // before the reads when it can: the reads stay right before the
                    // write they condition, which another writer's changes may otherwise
                    // outrun. Not before a call's answer is stored (below).
                    let after_call = called_since_volume_read;
                    self.listed_siblings = None;
                    if !after_call
                        && let Some((driver, handle)) = &locked
                        && (self.attachment.metadata.deletion_timestamp.is_some()
                            || self.guards_by_records(&target))
                    {
                        self.listed_siblings = Some(self.siblings_listed(driver, handle).await?);
                    }
                    // A write of someone else's came between: what was probed is asked again.
                    if self.basis == Basis::Conflicted {
                        answer = None;
                    }
                    if self.basis != Basis::Fresh {
                        if !self.refresh().await? {
                            return Ok(Outcome::Settled(Action::await_change()));
                        }
                    } else if !called_since_volume_read {
                        // The record is fresh, but what was computed on it since (an intent and
                        // the binding it records) rests on the cached Volume: dropped, to be
                        // decided again on the Volume read now. No call was made on it: a call
                        // needs the fresh Volume this step is about to read.
                        self.start_from_stored();
                    }
                    let fresh = self.fresh_target(locked.as_ref()).await;
                    // What a call's answer recorded is stored before the reconcile ends without
                    // acting on it.
                    if called_since_volume_read && !matches!(fresh, Ok(FreshVolume::Read(_))) {
                        self.persist().await?;
                    }
                    match fresh? {
                        FreshVolume::Read(fresh) => {
                            target = fresh;
                            volume_fresh = true;
                            called_since_volume_read = false;
                            // A deletion these reads found (the cached copy was live), or one
                            // after a call, and an attach anew after a call (the forced detach
                            // of a live attachment): listed now, still on the turn. A failed
                            // list ends the reconcile, a call's answer stored first.
                            if self.listed_siblings.is_none()
                                && (self.attachment.metadata.deletion_timestamp.is_some()
                                    || self.guards_by_records(&target))
                                && let Some((driver, handle)) = &locked
                            {
                                match self.siblings_listed(driver, handle).await {
                                    Ok(listed) => self.listed_siblings = Some(listed),
                                    Err(error) => {
                                        if after_call {
                                            self.persist().await?;
                                        }
                                        return Err(error);
                                    }
                                }
                            }
                        }
                        // A Volume replaced since the turn was taken names another backend
                        // volume: start over on its turn.
                        FreshVolume::Replaced => {
                            return Ok(self.outcome(Recheck::Soon(BUSY_RECHECK)));
                        }
                        FreshVolume::Fenced => {
                            return Ok(self.outcome(Recheck::Soon(FENCED_RECHECK)));
                        }
                        FreshVolume::JustHeld => {
                            return Ok(self.outcome(Recheck::Soon(BUSY_RECHECK)));
                        }
                        FreshVolume::Changing => {
                            return Ok(self.outcome(Recheck::Backoff { deadline: None }));
                        }
                    }
                    continue;
                }
                _ => {}
            }
            // Not this reconcile's turn: it neither writes nor calls.
            if let Some(soon @ Recheck::Soon(_)) = ending {
                return Ok(self.outcome(soon));
            }
            self.status = after_step(&input, &step);
            self.notice();

            // The steps that end the reconcile, and the finalizer's: each done, or refused
            // (`false`: decide again on what the apiserver has now).
            let done = match &step {
                Step::AddFinalizer => {
                    // Before any backend call, so that a deletion always waits for a confirmed
                    // detach.
                    match finalizer::add(&self.api, &self.attachment, ATTACHMENT_FINALIZER).await {
                        Ok(Some(written)) => self.adopt(written, Basis::Fresh),
                        Ok(None) => {}
                        Err(Error::Conflict(_)) => self.basis = Basis::Conflicted,
                        Err(error) => return Err(error),
                    }
                    continue;
                }
                // The release is the object's last write when no other finalizer keeps it and
                // it confirms no forced detach: the `Detached` it would store goes with it, and
                // its Events tell it. A forced detach's confirmation is stored first (the record
                // `kubectl safe-detach force --wait` and the force metric rest on), and so is
                // `Detached` on an object another finalizer keeps a while.
                Step::ReleaseFinalizer
                    if self.attachment.finalizers() == [ATTACHMENT_FINALIZER]
                        && self.status.force_detach == self.stored.force_detach =>
                {
                    self.release_as_last_write().await?
                }
                Step::ReleaseFinalizer => self.persist().await? && self.release().await?,
                Step::HandOver { to } => {
                    self.hand_over(to, target.as_ref().ok().map(|t| &t.binding))
                        .await?
                }
                Step::Fail(problem) => {
                    let written = self.persist().await?;
                    if written {
                        warn!(
                            reason = problem.reason(),
                            "cannot reach the backend: {}",
                            problem.message()
                        );
                    }
                    written
                }
                // The other steps that end the reconcile write what they decided first.
                _ if ending.is_some() => self.persist().await?,
                _ => true,
            };
            if !done {
                continue;
            }
            if let Some(ending) = ending {
                return Ok(self.outcome(ending));
            }
            // `decide` answers Fail for an attachment without a backend, before any backend step.
            let Ok(target) = &target else {
                self.persist().await?;
                return Ok(self.outcome(Recheck::Settled(Some(input.resync))));
            };
            // Record-only steps: the next decision follows at once, on the same answer (the
            // word of a call holds for the decision right after it only).
            if !step.calls_driver() {
                confirmed = None;
                continue;
            }
            if !self.persist_intent().await? {
                continue;
            }
            // The intent write may have taken long (a slow or cut-off apiserver): the lease is
            // checked again right before the call it allows.
            if !self.context.fence.permits() {
                return Ok(self.outcome(Recheck::Soon(FENCED_RECHECK)));
            }
            let mut sent = tokio::time::Instant::now();
            let result = match &step {
                Step::Attach => self.attach(target).await.map(Some),
                Step::Detach => detach_safely(target, &node, &mut sent).await.map(|()| None),
                _ => ok_if_not_connected(target.driver.force_detach(&target.handle, &node).await)
                    .map(|()| None),
            };
            answer = None;
            called_since_volume_read = true;
            if let Err(error) = &result
                && error.class() == ErrorClass::UnknownOutcome
            {
                self.context.locks.call_may_land(
                    &target.driver_name,
                    &target.handle,
                    sent,
                    target.driver.lands_within(),
                );
            }
            if result.is_ok() && matches!(step, Step::Detach | Step::ForceDetach { .. }) {
                self.tell_claims_cut(target).await;
            }
            if let Step::ForceDetach { reason, .. } = &step {
                let reason = format!("{reason:?}");
                self.context
                    .metrics
                    .force_detach_called(&reason, result.is_ok());
            }
            let called = match &result {
                Ok(info) => CallResult::Done(info.as_ref()),
                Err(error) => {
                    warn!(?step, %error, class = ?error.class(), "driver call failed");
                    CallResult::Failed(error)
                }
            };
            let after = after_call(&input, &step, called, Timestamp::now());
            self.status = after.status;
            self.notice();
            confirmed = after.confirmed;
            if let Some(ending) = after.ends {
                if !self.persist().await? {
                    continue;
                }
                return Ok(self.outcome(ending));
            }
        }
        if self.basis != Basis::Conflicted {
            self.persist().await?;
        }
        // Out of steps without settling (writes refused again and again): not at once, but
        // with backoff.
        warn!("no settled state within {MAX_STEPS} steps");
        Ok(self.outcome(Recheck::Backoff { deadline: None }))
    }

    /// Whether the attachment is live and not attached, and this process held its Volume (as
    /// cached) too recently for an attach to rest on the hold. Waiting is never unsafe: it only
    /// spares the turn and the probe of a reconcile whose attach would wait anyway.
    fn waits_for_a_settling_hold(&self, cached: Option<&Volume>) -> bool {
        let attached = self.attachment.status.as_ref().is_some_and(|s| s.attached);
        self.attachment.metadata.deletion_timestamp.is_none()
            && !attached
            && cached.is_some_and(|v| self.held_moments_ago(v))
    }

    /// Whether `volume`, not being deleted, was held by this process too recently for an attach
    /// to rest on the hold.
    fn held_moments_ago(&self, volume: &Volume) -> bool {
        volume.metadata.deletion_timestamp.is_none()
            && self
                .context
                .recently_held
                .settling(&volume.uid().unwrap_or_default())
    }

    /// The target of the attachment's Volume as the apiserver has it. A live attachment whose
    /// Volume it may attach to holds that Volume first (adds the operator's finalizer, guarded by
    /// the uid and finalizers read), and attaches only on a later read that finds it held: an
    /// attach rests on a Volume that cannot go before its attachments do, and a Volume deleted
    /// before it was held goes at once with nothing attached to it. A Volume that is not this reconcile's turn, a problem (an alias, a deleting Volume)
    /// or a deleted attachment's holds nothing.
    async fn fresh_target(&self, locked: Option<&(String, String)>) -> Result<FreshVolume, Error> {
        let api = Api::<Volume>::all(self.context.client.clone());
        for _ in 0..WRITE_TRIES {
            let (volume, as_of) =
                volume_read_fresh(&api, &self.attachment.spec.volume_name).await?;
            // Held by this process a moment ago (by the Volume controller, or another
            // attachment): attached on only once that hold has settled, as after this
            // reconcile's own.
            if let Some(v) = &volume
                && self.attachment.metadata.deletion_timestamp.is_none()
                && v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
                && self.held_moments_ago(v)
            {
                return Ok(FreshVolume::JustHeld);
            }
            // For an attach, the other Volumes of its backend volume as the apiserver had them
            // at this read or later: one the cache had not seen (created a moment ago) may make
            // the attach exclusive, or this Volume its alias.
            let listed = match &volume {
                Some(v)
                    if v.metadata.deletion_timestamp.is_none()
                        && self.attachment.metadata.deletion_timestamp.is_none() =>
                {
                    Some(aliases_as_of(self.context, v, as_of.as_deref()).await?)
                }
                _ => None,
            };
            let target = self.target(volume.clone().map(Arc::new), listed.as_deref());
            let key = target
                .as_ref()
                .ok()
                .map(|t| (t.driver_name.clone(), t.handle.clone()));
            if key.is_some() && key.as_ref() != locked {
                return Ok(FreshVolume::Replaced);
            }
            let Some(volume) = volume.filter(|_| {
                target.is_ok() && self.attachment.metadata.deletion_timestamp.is_none()
            }) else {
                return Ok(FreshVolume::Read(target));
            };
            if !self.context.fence.permits() {
                return Ok(FreshVolume::Fenced);
            }
            match hold_volume(self.context, &api, &volume).await {
                Ok(Some(written)) => {
                    info!(
                        volume = written.name_any(),
                        uid = written.uid().unwrap_or_default(),
                        "held the Volume for the attach"
                    );
                    self.context
                        .own_volume_writes
                        .wrote(volume.resource_version(), &written);
                    return Ok(FreshVolume::JustHeld);
                }
                Ok(None) => return Ok(FreshVolume::Read(target)),
                // Changed since it was read (held by the Volume controller meanwhile, deleted):
                // read it again.
                Err(Error::Conflict(_)) => continue,
                Err(error) if error.is_not_found() => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(FreshVolume::Changing)
    }

    /// The controller's action for how the reconcile ends.
    fn outcome(&self, recheck: Recheck) -> Outcome {
        match recheck {
            Recheck::Settled(None) => Outcome::Settled(Action::await_change()),
            Recheck::Settled(Some(after)) => Outcome::Settled(Action::requeue(after)),
            Recheck::Soon(after) => Outcome::Retry(Action::requeue(after)),
            Recheck::Backoff { deadline } => Outcome::Retry(Action::requeue(
                self.context.backoff.failed(&self.name, deadline),
            )),
        }
    }

    /// The backend and policy of `volume` (the attachment's Volume, from the cache or read
    /// fresh), or why there is none. A deleted attachment that recorded what it attached goes
    /// there, even if its Volume was replaced or is gone.
    fn target(
        &self,
        volume: Option<Arc<Volume>>,
        listed: Option<&[Arc<Volume>]>,
    ) -> Result<Target, VolumeProblem> {
        let volume_name = &self.attachment.spec.volume_name;
        let deleting = self.attachment.metadata.deletion_timestamp.is_some();
        let recorded = self
            .attachment
            .status
            .as_ref()
            .and_then(|s| s.bound_to.as_ref());
        if deleting
            && let Some(recorded) = recorded
            && volume
                .as_ref()
                .is_none_or(|v| v.uid().as_deref() != Some(recorded.volume_uid.as_str()))
        {
            return self.recorded_target(recorded);
        }
        let volume = volume.ok_or_else(|| VolumeProblem::VolumeNotFound(volume_name.clone()))?;
        // A Volume on its way out, or an alias of another's backend volume, is not attached
        // anywhere new; a detach still reaches it.
        if volume.metadata.deletion_timestamp.is_some() && !deleting {
            return Err(VolumeProblem::VolumeDeleting(volume_name.clone()));
        }
        // The cache's aliases, and those the apiserver listed: either may lack one the other has.
        let mut aliases = aliases_of(self.context, &volume);
        for alias in listed.unwrap_or_default() {
            if !aliases.iter().any(|a| a.uid() == alias.uid()) {
                aliases.push(alias.clone());
            }
        }
        if !deleting && let Some(owner) = owner_of_handle(&aliases, &volume) {
            return Err(VolumeProblem::DuplicateHandle { owner });
        }
        let driver = self.context.driver(&volume.spec.driver)?;
        let stuck_after = stuck_after(
            volume.spec.stuck_after.as_deref(),
            self.context.config.default_stuck_after,
        )?;
        Ok(Target {
            driver,
            driver_name: volume.spec.driver.clone(),
            handle: volume.spec.volume_handle.clone(),
            policy: VolumePolicy {
                // Exclusive unless every Volume that names the backend volume allows more: an
                // alias created at the same moment must not let a second writer in.
                multi_attach: volume.spec.multi_attach
                    && aliases.iter().all(|a| a.spec.multi_attach),
                stuck_after,
                auto_force_detach: volume.spec.auto_force_detach,
            },
            binding: Binding {
                driver: volume.spec.driver.clone(),
                volume_handle: volume.spec.volume_handle.clone(),
                volume_uid: volume.uid().unwrap_or_default(),
            },
        })
    }

    /// The backend volume a deleted attachment recorded, when its Volume no longer names it. Its
    /// Volume's policy is gone with it: the operator's defaults apply to the detach.
    fn recorded_target(&self, recorded: &Binding) -> Result<Target, VolumeProblem> {
        Ok(Target {
            driver: self.context.driver(&recorded.driver)?,
            driver_name: recorded.driver.clone(),
            handle: recorded.volume_handle.clone(),
            policy: VolumePolicy {
                // A detach never attaches: the multi-attach guard has nothing to guard.
                multi_attach: false,
                stuck_after: self.context.config.default_stuck_after,
                // Nothing says a client may be cut off: a stuck detach waits for a person.
                auto_force_detach: false,
            },
            binding: recorded.clone(),
        })
    }

    /// Calls the driver's attach; what it returns is the connection info the status records.
    async fn attach(&self, target: &Target) -> Result<ConnectionInfo, DriverError> {
        let spec = &self.attachment.spec;
        let request = AttachRequest {
            volume_handle: target.handle.clone(),
            node: spec.node_name.clone(),
            connector: spec.connector.clone().unwrap_or_default(),
            read_only: spec.read_only.unwrap_or(false),
            exclusive: !target.policy.multi_attach,
        };
        let mut info = target.driver.attach(&request).await?;
        // Connection info is how a confirmed attachment shows it was attached by its driver; a
        // driver with nothing to tell still leaves its name.
        if info.is_empty() {
            info.insert("driver".into(), target.driver.kind().into());
        }
        Ok(info)
    }

    /// Another attachment of the same backend volume to the same node, not being deleted and
    /// attached as the backend confirmed, as the cache shows it or the apiserver listed it on
    /// this turn (`listed_siblings`): it claims the same connection.
    fn sibling(&self, ours: Option<&Binding>) -> Option<String> {
        let ours = ours?;
        let claims = |a: &VolumeAttachment| self.claims_our_connection(a, ours);
        // A live attachment asks only what was listed on its turn (where it attaches on the
        // records alone): the cache is large, and no other live one needs the answer.
        if self.attachment.metadata.deletion_timestamp.is_none() {
            return self
                .listed_siblings
                .iter()
                .flatten()
                .filter(|a| claims(a))
                .map(|a| a.name_any())
                .filter(|name| !self.gone_siblings.contains(name))
                .min();
        }
        let cached = self.context.attachments_by_binding.get(
            &self.context.attachments,
            &backend_key(&ours.driver, &ours.volume_handle),
            claims,
        );
        let listed = self.listed_siblings.iter().flatten().filter(|a| claims(a));
        let mut siblings: Vec<String> = cached
            .iter()
            .map(|a| a.as_ref())
            .chain(listed)
            .map(|a| a.name_any())
            .filter(|name| !self.gone_siblings.contains(name))
            .collect();
        siblings.sort();
        siblings.into_iter().next()
    }

    /// Whether this attachment, live and about to call an attach (anew, or again for an intent),
    /// can ask no backend whether another node holds its single-attach volume: the records of
    /// the other attachments of that backend volume are then listed on the turn, before the
    /// reads (as a deleted one lists its claims).
    fn guards_by_records(&self, target: &Result<Target, VolumeProblem>) -> bool {
        let begins_an_attach = matches!(
            phase_of(&self.status),
            AttachmentPhase::Pending
                | AttachmentPhase::Failed
                | AttachmentPhase::Detached
                | AttachmentPhase::Attaching
        );
        self.attachment.metadata.deletion_timestamp.is_none()
            && begins_an_attach
            && target
                .as_ref()
                .is_ok_and(|t| !t.driver.can_probe() && !t.policy.multi_attach)
    }

    /// For a live attachment, the attachments on other nodes whose records, as listed on this
    /// turn, claim a connection to the backend volume `ours` names that no confirmed detach has
    /// ended (`status.boundTo` is cleared only then), deleted ones included; `None` when not
    /// listed on this turn.
    fn claimed_elsewhere(&self, ours: &Binding) -> Option<Vec<String>> {
        if self.attachment.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let listed = self.listed_siblings.as_ref()?;
        let mut claims: Vec<String> = listed
            .iter()
            .filter(|other| {
                other.uid() != self.attachment.uid()
                    && other.spec.node_name != self.attachment.spec.node_name
                    && bound_to_same_backend_volume(other, ours)
            })
            .map(|other| {
                format!(
                    "attachment {} on node {}",
                    other.name_any(),
                    other.spec.node_name
                )
            })
            .collect();
        claims.sort();
        Some(claims)
    }

    /// Whether `other`, not being deleted and attached as the backend confirmed, claims the
    /// connection `ours` stands for: the same backend volume on the same node.
    fn claims_our_connection(&self, other: &VolumeAttachment, ours: &Binding) -> bool {
        other.spec.node_name == self.attachment.spec.node_name
            && other.metadata.deletion_timestamp.is_none()
            && other.uid() != self.attachment.uid()
            && holds_its_connection(other)
            && bound_to_same_backend_volume(other, ours)
    }

    /// After this attachment's detach or forced detach of the connection `target` stands for was
    /// confirmed (an OK call), the other attachments that claimed it learn that it is gone: each
    /// is recorded as having lost its connection, and attaches again. Nothing else would tell
    /// them on a backend that cannot be probed. A deleted attachment does not cut a connection
    /// another claims unless a forced detach was already under way (it hands it over), and it
    /// listed the claims on this turn before its call; a live one cuts it on a person's token.
    /// Telling never undoes the call's answer, which this reconcile goes on to store: an
    /// apiserver that keeps refusing leaves the other claim untold, and says so in the log
    /// (on a backend that can be probed, that claim's own probe still finds the connection gone).
    async fn tell_claims_cut(&self, target: &Target) {
        let listed = match &self.listed_siblings {
            Some(listed) if self.attachment.metadata.deletion_timestamp.is_some() => {
                Ok(listed.clone())
            }
            _ => {
                self.siblings_listed(&target.binding.driver, &target.binding.volume_handle)
                    .await
            }
        };
        let listed = match listed {
            Ok(listed) => listed,
            Err(error) => {
                error!(%error, "cannot list the other claims of the connection the detach cut: they are not told");
                return;
            }
        };
        for other in listed
            .iter()
            .filter(|a| self.claims_our_connection(a, &target.binding))
        {
            if let Err(error) = self.tell_cut(other.clone(), &target.binding).await {
                error!(%error, other = other.name_any(), "cannot record that the detach cut this attachment's connection: it is not told");
            }
        }
    }

    /// Records on `other` that its connection was cut, conditioned on the version read; read
    /// again and tried again if it changed and still claims the connection.
    async fn tell_cut(&self, mut other: VolumeAttachment, ours: &Binding) -> Result<(), Error> {
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        let mut refused = None;
        for _ in 0..WRITE_TRIES {
            let current = other.status.clone().unwrap_or_default();
            let next = cut_by_another(
                &current,
                &self.name,
                other.metadata.generation,
                Timestamp::now(),
            );
            let patch = status_patch(other.resource_version(), &current, &next)?;
            match self
                .api
                .patch_status(&other.name_any(), &params, &Patch::Merge(&patch))
                .await
                .map_err(Error::from_write)
            {
                Ok(written) => {
                    info!(
                        other = written.name_any(),
                        "the detach cut the connection another attachment claimed: told it"
                    );
                    let notice = crate::decide::events::cut_by_another(
                        &self.name,
                        &ours.volume_handle,
                        &written.spec.node_name,
                    );
                    self.context.events.publish(&written, &notice).await;
                    return Ok(());
                }
                Err(Error::Conflict(error)) => {
                    refused = Some(Error::Conflict(error));
                    match self.api.get_opt(&other.name_any()).await? {
                        Some(fresh)
                            if fresh.uid() == other.uid()
                                && self.claims_our_connection(&fresh, ours) =>
                        {
                            other = fresh;
                        }
                        // Gone, replaced, or no longer claiming it: nothing to tell.
                        _ => return Ok(()),
                    }
                }
                Err(error) if error.is_not_found() => return Ok(()),
                // Tried again a moment later: a busy or restarting apiserver.
                Err(error) => {
                    refused = Some(error);
                    tokio::time::sleep(TELL_RETRY).await;
                }
            }
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The attachments that may claim the connection to the backend volume `handle` of `driver`,
    /// as the apiserver has them: those that name this attachment's Volume or another Volume of
    /// that backend volume (the Volumes, then their attachments, as the apiserver had them on
    /// the turn, each from its cache once it has caught up: [`volumes_naming_as_of`],
    /// [`attachments_naming_as_of`]). Read on the volume's turn, which an attach takes too: no
    /// attachment of this backend volume becomes attached between this list and the call it
    /// comes before.
    async fn siblings_listed(
        &self,
        driver: &str,
        handle: &str,
    ) -> Result<Vec<VolumeAttachment>, Error> {
        let as_of = volumes_version_now(self.context, &self.attachment.spec.volume_name).await?;
        let mut names: BTreeSet<String> =
            volumes_naming_as_of(self.context, driver, handle, as_of.as_deref())
                .await?
                .iter()
                .map(|v| v.name_any())
                .collect();
        names.insert(self.attachment.spec.volume_name.clone());
        attachments_naming_as_of(&names, self.context, as_of.as_deref()).await
    }

    /// Releases the finalizer: the object goes. `false` if the release was refused as based on an
    /// older version.
    async fn release(&mut self) -> Result<bool, Error> {
        Ok(self.remove_finalizer(OnNewerVersions::OnItsGrounds).await? != Removal::Refused)
    }

    /// Removes the operator's finalizer, on the condition that the attachment is still the
    /// version it was decided on. Where that version is gone and another writer touched only
    /// what the decision does not rest on (a label, another controller's field: [`same_grounds`]),
    /// a deleted attachment's release (`OnItsGrounds`) is read again and sent on the condition
    /// that the apiserver still finds those grounds, tested by the apiserver on the copy it
    /// patches: a tool that relabels the object faster than a read and a write take cannot hold
    /// it forever.
    async fn remove_finalizer(&mut self, newer: OnNewerVersions) -> Result<Removal, Error> {
        let answer = finalizer::remove(&self.api, &self.attachment, ATTACHMENT_FINALIZER).await;
        if let Some(done) = removal(answer, "the attachment changed since it was read")? {
            return Ok(done);
        }
        // Only a deleted attachment: a deletion is neither undone nor moved, so that its UID
        // stands for its deletion too.
        if newer == OnNewerVersions::OnItsGrounds
            && self.attachment.metadata.deletion_timestamp.is_some()
        {
            for _ in 1..WRITE_TRIES {
                // The lease is checked again before each try, as before a driver call.
                if !self.context.fence.permits() {
                    break;
                }
                let Some((fresh, grounds)) = self.grounds_read().await? else {
                    break;
                };
                if !same_grounds(&fresh, &self.attachment) {
                    break;
                }
                let answer = finalizer::remove_on_grounds(
                    &self.api,
                    &self.name,
                    fresh.finalizers(),
                    ATTACHMENT_FINALIZER,
                    &grounds,
                )
                .await;
                if let Some(done) = removal(answer, "what it rests on changed")? {
                    return Ok(done);
                }
            }
        }
        self.basis = Basis::Conflicted;
        Ok(Removal::Refused)
    }

    /// The attachment as the apiserver has it now, with the values there of what a release rests
    /// on (its UID, spec, status and force-detach request) as the apiserver encodes them, so that
    /// its tests compare like with like.
    async fn grounds_read(
        &self,
    ) -> Result<Option<(VolumeAttachment, Vec<(String, Value)>)>, Error> {
        let api = Api::<DynamicObject>::all_with(
            self.context.client.clone(),
            &ApiResource::erase::<VolumeAttachment>(&()),
        );
        let Some(raw) = api.get_opt(&self.name).await? else {
            return Ok(None);
        };
        // A test of a member against null passes where it is missing, but not where its parent is.
        let request = match &raw.metadata.annotations {
            Some(annotations) => (
                format!(
                    "/metadata/annotations/{}",
                    FORCE_DETACH_ANNOTATION
                        .replace('~', "~0")
                        .replace('/', "~1")
                ),
                json!(annotations.get(FORCE_DETACH_ANNOTATION)),
            ),
            None => ("/metadata/annotations".to_owned(), Value::Null),
        };
        let grounds = vec![
            ("/metadata/uid".to_owned(), json!(raw.metadata.uid)),
            ("/spec".to_owned(), raw.data["spec"].clone()),
            ("/status".to_owned(), raw.data["status"].clone()),
            request,
        ];
        let fresh = serde_json::from_value(serde_json::to_value(&raw)?)?;
        Ok(Some((fresh, grounds)))
    }

    /// Publishes the Events the status written (or released) on `object` tells.
    async fn publish_notices(&mut self, object: &VolumeAttachment) {
        for notice in std::mem::take(&mut self.notices) {
            self.context.events.publish(object, &notice).await;
        }
    }

    /// Releases the finalizer without storing the status first, then tells what the status
    /// would have said (its Events). `false` as [`Self::release`].
    async fn release_as_last_write(&mut self) -> Result<bool, Error> {
        if !self.release().await? {
            return Ok(false);
        }
        let released = self.attachment.clone();
        self.publish_notices(&released).await;
        Ok(true)
    }

    /// Leaves the connection to `to`, once the apiserver confirms it claims it, and releases
    /// this attachment without a detach. `false` if it does not (gone, or being deleted too), or
    /// the release was refused: decide again.
    /// `ours` is the connection this attachment stands for: its target's binding, which for a
    /// deleted attachment is what it recorded attaching, else what its Volume names (an attach
    /// of unknown outcome records no binding).
    async fn hand_over(&mut self, to: &str, ours: Option<&Binding>) -> Result<bool, Error> {
        let live = self.api.get_opt(to).await?.filter(|sibling| {
            sibling.metadata.deletion_timestamp.is_none()
                && sibling.spec.node_name == self.attachment.spec.node_name
                && holds_its_connection(sibling)
                // Asked again of the object as read now: one of the sibling's name created
                // again since the cache showed it may be another volume's.
                && ours.is_some_and(|ours| bound_to_same_backend_volume(sibling, ours))
        });
        let Some(sibling) = live else {
            self.gone_siblings.push(to.to_owned());
            return Ok(false);
        };
        // Not on newer versions: the hand-over rests on the sibling just read as well.
        match self.remove_finalizer(OnNewerVersions::Refused).await? {
            Removal::Removed => {}
            Removal::Gone => return Ok(true),
            Removal::Refused => return Ok(false),
        }
        let spec = &self.attachment.spec;
        let (released, kept) = handed_over(&self.name, to, &spec.volume_name, &spec.node_name);
        self.context
            .events
            .publish(&self.attachment, &released)
            .await;
        self.context.events.publish(&sibling, &kept).await;
        Ok(true)
    }

    /// Reads the attachment from the apiserver and continues from it. `false` if it is gone, or
    /// was replaced by a new object of the same name (which has reconciles of its own).
    async fn refresh(&mut self) -> Result<bool, Error> {
        match self.api.get_opt(&self.name).await? {
            Some(fresh) if fresh.uid() == self.attachment.uid() => {
                self.adopt(fresh, Basis::Fresh);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Writes the intent a driver call is about to act on — the phase, a force-detach and its
    /// token — if the server does not have it yet. The rest waits for the end of the reconcile,
    /// so that a call that keeps failing does not make the status flap between writes.
    async fn persist_intent(&mut self) -> Result<bool, Error> {
        if self.status.phase == self.stored.phase
            && self.status.force_detach == self.stored.force_detach
        {
            return Ok(true);
        }
        self.persist().await
    }

    /// Writes the status if it changed, on the condition that the attachment is still the
    /// version it was decided on, then publishes the events the change deserves. `false` when
    /// the apiserver refused it as based on an older version: nothing was written, and nothing
    /// may be done before the attachment is read again.
    async fn persist(&mut self) -> Result<bool, Error> {
        if self.status == self.stored {
            return Ok(true);
        }
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        let mut version = self.attachment.resource_version();
        let mut tries = 0;
        let written = loop {
            // What changed from the stored status, on condition that the server still has the
            // version it was decided on (`same_grounds` below keeps that status the stored one).
            let patch = status_patch(version.clone(), &self.stored, &self.status)?;
            match self
                .api
                .patch_status(&self.name, &params, &Patch::Merge(&patch))
                .await
                .map_err(Error::from_write)
            {
                Ok(written) => break written,
                Err(Error::Conflict(error)) => {
                    debug!(%error, "status write refused: the attachment changed since it was read");
                    self.context.metrics.write_conflict("VolumeAttachment");
                    tries += 1;
                    // Another writer touched what this decision does not rest on (a label,
                    // another controller's field): the same status still holds on the new
                    // version. Anything else, and the decision is taken again.
                    match self.api.get_opt(&self.name).await? {
                        Some(fresh)
                            if tries < WRITE_TRIES && same_grounds(&fresh, &self.attachment) =>
                        {
                            version = fresh.resource_version();
                        }
                        _ => {
                            self.basis = Basis::Conflicted;
                            return Ok(false);
                        }
                    }
                }
                Err(error) => return Err(error),
            }
        };
        if let Some(reason) = force_confirmed(&self.stored, &self.status) {
            self.context.metrics.force_detached(&format!("{reason:?}"));
        }
        self.publish_notices(&written).await;
        self.adopt(written, Basis::Fresh);
        Ok(true)
    }

    /// Collects the events that the change since the last call deserves.
    fn notice(&mut self) {
        let spec = &self.attachment.spec;
        let notices = between(
            &self.noticed,
            &self.status,
            &spec.volume_name,
            &spec.node_name,
        );
        let reported = self.reported_failure.as_deref();
        self.notices
            .extend(notices.into_iter().filter(|n| is_news(n, reported)));
        self.noticed = self.status.clone();
    }
}

/// What a finalizer release's `answer` says: removed, or the object gone; `None` where it was
/// refused because `refused_as` (logged).
fn removal(answer: Result<(), Error>, refused_as: &str) -> Result<Option<Removal>, Error> {
    match answer {
        Ok(()) => Ok(Some(Removal::Removed)),
        Err(error) if error.is_not_found() => Ok(Some(Removal::Gone)),
        Err(Error::Conflict(error)) => {
            debug!(%error, "finalizer release refused: {refused_as}");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Whether `attachment` recorded attaching the backend volume `ours` names. An attachment
/// attached as the backend confirmed records it; one without a record claims nothing.
fn bound_to_same_backend_volume(attachment: &VolumeAttachment, ours: &Binding) -> bool {
    attachment
        .status
        .as_ref()
        .and_then(|s| s.bound_to.as_ref())
        .is_some_and(|theirs| {
            (&theirs.driver, &theirs.volume_handle) == (&ours.driver, &ours.volume_handle)
        })
}

/// Whether an attachment holds its connection, so that another may leave it to it: Attached, as
/// the backend confirmed. One that is Pending, Failed or on its way cannot keep what it is given.
fn holds_its_connection(attachment: &VolumeAttachment) -> bool {
    attachment
        .status
        .as_ref()
        .is_some_and(|status| status.phase == Some(AttachmentPhase::Attached) && status.attached)
}

/// How long telling another attachment its connection was cut waits before it tries again
/// after an error of the apiserver.
const TELL_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// How often a status write, or a deleted attachment's release, is tried on new versions that
/// changed nothing it rests on, before the decision is taken again.
const WRITE_TRIES: usize = 3;

/// What became of a release of the operator's finalizer.
#[derive(Debug, PartialEq, Eq)]
enum Removal {
    /// Removed: the object goes.
    Removed,
    /// The object was gone already.
    Gone,
    /// Refused as based on an older version, and not sent again (a newer version differs in
    /// what the decision rests on, is gone, or was not to be tried): decide again.
    Refused,
}

/// Whether a release refused as based on an older version is sent again on a newer one.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum OnNewerVersions {
    /// Refused: decide again.
    Refused,
    /// Sent again, conditioned on what the decision rests on, where nothing of it changed.
    OnItsGrounds,
}

/// The attachment's Volume read from the apiserver, for a step that may call the driver.
enum FreshVolume {
    /// The target it gives, or why there is none; held if the attachment may attach to it.
    Read(Result<Target, VolumeProblem>),
    /// It names another backend volume than the one whose turn this reconcile holds.
    Replaced,
    /// The lease is in doubt: nothing is held, nothing attached.
    Fenced,
    /// Held just now: look again soon, and attach only on a later read that finds it held and
    /// not deleted. The apiserver may still carry out a DELETE that read the Volume before the
    /// finalizer was added (kubernetes/kubernetes#77988): such a Volume is gone by then.
    JustHeld,
    /// It changed under every try to hold it: look again after a backoff.
    Changing,
}

/// Whether `fresh` is the object `read` was, with nothing a decision rests on changed: the same
/// object (UID), spec, status, force-detach request, finalizers and deletion. Labels and other
/// annotations are not among them (the cache does not even keep them: `slim_for_cache`).
fn same_grounds(fresh: &VolumeAttachment, read: &VolumeAttachment) -> bool {
    fresh.uid() == read.uid()
        && fresh.spec == read.spec
        && fresh.status == read.status
        && fresh.annotations().get(FORCE_DETACH_ANNOTATION)
            == read.annotations().get(FORCE_DETACH_ANNOTATION)
        && fresh.metadata.finalizers == read.metadata.finalizers
        && fresh.metadata.deletion_timestamp == read.metadata.deletion_timestamp
}

/// The safe detach: terminate the connection (refused while a user holds it), then detach.
/// `sent` ends as the time the last call was sent, from which a failure of unknown outcome is
/// waited out.
async fn detach_safely(
    target: &Target,
    node: &str,
    sent: &mut tokio::time::Instant,
) -> Result<(), DriverError> {
    ok_if_not_connected(
        target
            .driver
            .terminate_connection(&target.handle, node)
            .await,
    )?;
    // A failure of unknown outcome from here on is the second call's: it was sent now.
    *sent = tokio::time::Instant::now();
    ok_if_not_connected(target.driver.detach(&target.handle, node).await)
}
