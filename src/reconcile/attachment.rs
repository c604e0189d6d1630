//! The VolumeAttachment controller: probe, decide, execute, until the decision is to wait.
//!
//! Writes follow the crash rule of the design: an intent (phase Attaching or Detaching, a
//! force-detach in progress) is written before the driver call it announces, and anything that
//! says "detached" is written only after the probe that confirmed it. Everything else is written
//! once, at the end, and only if it changed.

use super::{Context, Error, finalizer, probe, synced};
use crate::MANAGER;
use crate::api::{
    FINALIZER, FORCE_DETACH_ANNOTATION, ForceDetachState, Volume, VolumeAttachment,
    VolumeAttachmentStatus, find_condition, parse_duration,
};
use crate::decide::events::{Notice, between};
use crate::decide::status::READY;
use crate::decide::status::{Observed, after_step, attached_with, driver_failed};
use crate::decide::{
    Backend, Confirmed, Input, Misconfiguration, Request, Step, VolumePolicy, Wait, decide,
    stuck_in,
};
use crate::driver::{AttachRequest, Driver, DriverError, ok_if_not_connected};
use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, info_span, warn};

/// More steps than any path needs (force, confirm, begin, attach, confirm): a bound, not a budget.
const MAX_STEPS: usize = 8;

/// The backend, as one attachment reaches it.
struct Target {
    driver: Arc<dyn Driver>,
    handle: String,
    policy: VolumePolicy,
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
    let result = Reconcile::new(&attachment, &context)
        .run()
        .instrument(span)
        .await;
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
    let handled = attachment
        .status
        .as_ref()
        .and_then(|s| s.force_detach.as_ref())
        .and_then(|f| f.token.as_deref());
    let annotation = attachment.annotations().get(FORCE_DETACH_ANNOTATION);
    matches!(
        Request::read(annotation.map(String::as_str), handled),
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

/// How a reconcile ended: settled (its backoff is forgotten), or to be retried with backoff after
/// a failed driver call or an unreachable backend.
enum Outcome {
    Settled(Action),
    Retry(Action),
}

/// One reconcile of one attachment: the state it carries between steps.
struct Reconcile<'a> {
    attachment: &'a VolumeAttachment,
    context: &'a Context,
    api: Api<VolumeAttachment>,
    name: String,
    /// The status as the server has it.
    stored: VolumeAttachmentStatus,
    /// The status as computed so far.
    status: VolumeAttachmentStatus,
    has_finalizer: bool,
    /// The events the steps so far deserve, published with the next write. Collected step by
    /// step, so that a reason that is replaced within the reconcile (RolledForward, ConnectionLost)
    /// is still told.
    notices: Vec<Notice>,
    /// The status the notices were last computed against.
    noticed: VolumeAttachmentStatus,
    /// The failure the stored status already reports: told once, not again at every retry.
    reported_failure: Option<String>,
}

impl<'a> Reconcile<'a> {
    fn new(attachment: &'a VolumeAttachment, context: &'a Context) -> Self {
        let status = attachment.status.clone().unwrap_or_default();
        Self {
            attachment,
            context,
            api: Api::all(context.client.clone()),
            name: attachment.name_any(),
            stored: status.clone(),
            noticed: status.clone(),
            reported_failure: find_condition(&status.conditions, READY)
                .filter(|c| c.status == "False")
                .map(|c| c.reason.clone()),
            notices: Vec::new(),
            status,
            has_finalizer: attachment.finalizers().iter().any(|f| f == FINALIZER),
        }
    }

    async fn run(mut self) -> Result<Outcome, Error> {
        let target = self.target();
        let annotation = self
            .attachment
            .annotations()
            .get(FORCE_DETACH_ANNOTATION)
            .cloned();
        let deleting = self.attachment.metadata.deletion_timestamp.is_some();

        // For a backend that cannot be probed: what the last successful call confirmed.
        let mut confirmed = None;
        for _ in 0..MAX_STEPS {
            let backend = match &target {
                Ok(target) if target.driver.can_probe() => {
                    Some(probe(target.driver.as_ref(), &target.handle).await)
                }
                Ok(_) => Some(Backend::Unprobeable(confirmed.take())),
                Err(_) => None,
            };
            // Read against the token the status records, so that once a step has taken it, the
            // request is spent: each token acts once.
            let handled = self
                .status
                .force_detach
                .as_ref()
                .and_then(|f| f.token.as_deref());
            let request = Request::read(annotation.as_deref(), handled);
            let now = Timestamp::now();
            let input = Input {
                deleting,
                has_finalizer: self.has_finalizer,
                node: &self.attachment.spec.node_name,
                status: &self.status,
                request: &request,
                volume: target.as_ref().map(|t| &t.policy),
                backend: backend.as_ref(),
                now,
            };
            let step = decide(&input);
            let observed = Observed {
                node: &self.attachment.spec.node_name,
                generation: self.attachment.metadata.generation,
                policy: target.as_ref().ok().map(|t| &t.policy),
                backend: backend.as_ref(),
                request: &request,
                now,
            };
            if step == Step::MarkDetached
                && let Some(force) = self.status.force_detach.as_ref()
                && force.state == ForceDetachState::InProgress
            {
                let reason = format!("{:?}", force.reason);
                self.context.metrics.force_detach(&reason, "Succeeded");
            }
            self.status = after_step(&self.status, &step, &observed);
            self.notice();
            info!(?step, "step");

            match &step {
                Step::AddFinalizer => {
                    // Before any backend call, so that a deletion always waits for a confirmed
                    // detach.
                    finalizer::add(&self.api, self.attachment, FINALIZER).await?;
                    self.has_finalizer = true;
                    continue;
                }
                Step::ReleaseFinalizer => {
                    self.persist().await?;
                    finalizer::remove(&self.api, self.attachment, FINALIZER).await?;
                    return Ok(Outcome::Settled(Action::await_change()));
                }
                Step::Wait { why, recheck_after } => {
                    self.persist().await?;
                    let resync = self.context.config.resync_interval;
                    let stuck_in = target
                        .as_ref()
                        .ok()
                        .and_then(|t| stuck_in(&self.status, &t.policy, now));
                    return Ok(match why {
                        Wait::Converged => Outcome::Settled(Action::requeue(
                            recheck_after.unwrap_or(resync).min(resync),
                        )),
                        Wait::BackendUnreachable => Outcome::Retry(Action::requeue(
                            self.context.backoff.failed(&self.name, stuck_in),
                        )),
                    });
                }
                Step::Fail(problem) => {
                    self.persist().await?;
                    warn!(
                        reason = problem.reason(),
                        "cannot reach the backend: {}",
                        problem.message()
                    );
                    // A missing Volume or driver is fixed by a change that wakes us; the requeue
                    // is only a safety net, slow enough never to spin.
                    return Ok(Outcome::Settled(Action::requeue(
                        self.context.config.resync_interval,
                    )));
                }
                Step::BlockAttach { .. } => {
                    // The holder's detach changes the Volume's status, which wakes us.
                    self.persist().await?;
                    return Ok(Outcome::Settled(Action::requeue(
                        self.context.config.resync_interval,
                    )));
                }
                _ => {}
            }
            // `decide` answers Fail for an attachment without a backend, before any backend step.
            let Ok(target) = &target else {
                self.persist().await?;
                return Ok(Outcome::Settled(Action::requeue(
                    self.context.config.resync_interval,
                )));
            };

            if matches!(step, Step::Attach | Step::Detach | Step::ForceDetach { .. }) {
                self.persist_intent().await?;
            }
            let result = match &step {
                Step::Attach => self.attach(target).await,
                Step::Detach => detach_safely(target, &self.attachment.spec.node_name).await,
                Step::ForceDetach { .. } => ok_if_not_connected(
                    target
                        .driver
                        .force_detach(&target.handle, &self.attachment.spec.node_name)
                        .await,
                ),
                // Record-only steps: the next probe and decision follow at once.
                _ => Ok(()),
            };
            confirmed = match (&result, &step) {
                (Ok(()), Step::Attach) => Some(Confirmed::Connected),
                (Ok(()), Step::Detach | Step::ForceDetach { .. }) => Some(Confirmed::Disconnected),
                _ => None,
            };
            if let Err(error) = result {
                // The outcome is recorded and the attachment retried later; an unknown outcome is
                // resolved by the probe that starts the next reconcile.
                warn!(?step, %error, class = ?error.class(), "driver call failed");
                driver_failed(&mut self.status, &step, &error, &observed);
                self.notice();
                if let Step::ForceDetach { reason, .. } = &step {
                    let reason = format!("{reason:?}");
                    self.context.metrics.force_detach(&reason, "Failed");
                }
                self.persist().await?;
                let deadline = stuck_in(&self.status, &target.policy, Timestamp::now());
                let delay = self.context.backoff.failed(&self.name, deadline);
                return Ok(Outcome::Retry(Action::requeue(delay)));
            }
        }
        self.persist().await?;
        Ok(Outcome::Settled(Action::requeue(Duration::from_secs(1))))
    }

    /// The Volume's backend and policy, or why there is none.
    fn target(&self) -> Result<Target, Misconfiguration> {
        let volume_name = &self.attachment.spec.volume_name;
        let volume = self
            .context
            .volumes
            .get(&ObjectRef::<Volume>::new(volume_name))
            .ok_or_else(|| Misconfiguration::VolumeNotFound(volume_name.clone()))?;
        // A Volume on its way out is not attached anywhere new; a detach still reaches it.
        if volume.metadata.deletion_timestamp.is_some()
            && self.attachment.metadata.deletion_timestamp.is_none()
        {
            return Err(Misconfiguration::VolumeDeleting(volume_name.clone()));
        }
        let driver = self
            .context
            .config
            .drivers
            .get(&volume.spec.driver)
            .cloned()
            .ok_or_else(|| Misconfiguration::UnknownDriver(volume.spec.driver.clone()))?;
        let stuck_after = match &volume.spec.stuck_after {
            Some(text) => parse_duration(text)
                .map_err(|e| Misconfiguration::InvalidVolume(format!("spec.stuckAfter: {e}")))?,
            None => self.context.config.default_stuck_after,
        };
        Ok(Target {
            driver,
            handle: volume.spec.volume_handle.clone(),
            policy: VolumePolicy {
                multi_attach: volume.spec.multi_attach,
                stuck_after,
                auto_force_detach: volume.spec.auto_force_detach,
            },
        })
    }

    async fn attach(&mut self, target: &Target) -> Result<(), DriverError> {
        let spec = &self.attachment.spec;
        let request = AttachRequest {
            volume_handle: target.handle.clone(),
            node: spec.node_name.clone(),
            connector: spec.connector.clone().unwrap_or_default(),
            read_only: spec.read_only.unwrap_or(false),
        };
        let mut info = target.driver.attach(&request).await?;
        // Connection info is how a confirmed attachment shows it was attached by its driver; a
        // driver with nothing to tell still leaves its name.
        if info.is_empty() {
            info.insert("driver".into(), target.driver.kind().into());
        }
        attached_with(&mut self.status, info);
        self.notice();
        Ok(())
    }

    /// Writes the intent a driver call is about to act on — the phase, a force-detach and its
    /// token — if the server does not have it yet. The rest waits for the end of the reconcile,
    /// so that a call that keeps failing does not make the status flap between writes.
    async fn persist_intent(&mut self) -> Result<(), Error> {
        if self.status.phase == self.stored.phase
            && self.status.force_detach == self.stored.force_detach
        {
            return Ok(());
        }
        self.persist().await
    }

    /// Writes the status if it changed, then publishes the events the change deserves.
    async fn persist(&mut self) -> Result<(), Error> {
        if self.status == self.stored {
            return Ok(());
        }

        let patch = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "VolumeAttachment",
            "status": self.status,
        });
        let params = PatchParams::apply(MANAGER).force();
        self.api
            .patch_status(&self.name, &params, &Patch::Apply(&patch))
            .await?;
        self.stored = self.status.clone();
        for notice in std::mem::take(&mut self.notices) {
            self.context.events.publish(self.attachment, &notice).await;
        }
        Ok(())
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
        self.notices.extend(
            notices
                .into_iter()
                .filter(|n| Some(n.reason.as_str()) != reported),
        );
        self.noticed = self.status.clone();
    }
}

/// The safe detach: terminate the connection (refused while a user holds it), then detach.
async fn detach_safely(target: &Target, node: &str) -> Result<(), DriverError> {
    ok_if_not_connected(
        target
            .driver
            .terminate_connection(&target.handle, node)
            .await,
    )?;
    ok_if_not_connected(target.driver.detach(&target.handle, node).await)
}
