//! The controllers: they read the cluster and the backend, ask the decision core what to do, and
//! do it — driver calls, status writes, events, requeues. They decide nothing on their own.

mod attachment;
mod backoff;
mod cache_progress;
mod claims;
mod events;
mod finalizer;
mod index;
mod lanes;
mod lock;
mod own_writes;
mod recently_held;
mod status_patch;
mod sweep;
#[cfg(test)]
mod tests;
mod volume;
mod volume_wakes;

use crate::api::{
    VOLUME_FINALIZER, VOLUME_HANDLE_FIELD, VOLUME_NAME_FIELD, Volume, VolumeAttachment,
    VolumeStatus,
};
use crate::config::Config;
use crate::decide::{ProbeAnswer, VolumeProblem};

use crate::driver::Driver;
use crate::runtime::health::Health;
use crate::runtime::leader::Fence;
use crate::runtime::metrics::Metrics;
use backoff::Backoff;
use cache_progress::CacheProgress;
use claims::Claims;
use events::Publisher;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt, TryStreamExt};
use index::Index;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller, Error as ControllerError};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use lanes::Lanes;
use lock::VolumeLocks;
use own_writes::OwnWrites;
use recently_held::RecentlyHeld;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{info, warn};
use volume_wakes::VolumeWakes;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A guarded write found the object changed since the version it was decided on.
    #[error("the object changed since it was read: {0}")]
    Conflict(kube::Error),
    #[error("cannot encode the status: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    /// A short, stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubeApi",
            Self::Conflict(_) => "Conflict",
            Self::Encode(_) => "Encode",
        }
    }

    /// Whether the object is gone.
    fn is_not_found(&self) -> bool {
        matches!(self, Self::Kube(kube::Error::Api(status)) if status.code == 404)
    }

    /// The error of a write conditioned on a `resourceVersion`: a stale one is answered 409.
    fn from_write(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(status) if status.code == 409 => Self::Conflict(error),
            _ => Self::Kube(error),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    events: Publisher,
    volumes: Store<Volume>,
    /// The Volumes of the cache by their backend volume ([`backend_key`]).
    volumes_by_handle: Index<Volume>,
    /// How far the Volume cache has come (see [`CacheProgress`]).
    volumes_progress: CacheProgress,
    attachments: Store<VolumeAttachment>,
    /// The attachments of the cache by the Volume they name, and by the backend volume they
    /// recorded attaching ([`backend_key`]).
    attachments_by_volume: Index<VolumeAttachment>,
    attachments_by_binding: Index<VolumeAttachment>,
    /// Every attachment of the cluster, for the claims of a connection.
    claims: Claims,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    /// One reconcile per backend volume between its authorizing probe and its confirmation.
    locks: VolumeLocks,
    /// Closed when this replica cannot be sure it still holds the lease.
    fence: Fence,
    /// How many attachment reconciles run at once, by kind.
    lanes: Lanes,
    /// The Volumes this replica wrote, until the cache shows them.
    own_volume_writes: Arc<OwnWrites<Volume>>,
    /// The Volumes this process held a moment ago: an attach waits until a hold has settled.
    recently_held: RecentlyHeld,
    /// The apiserver refused to list attachments by `spec.volumeName` (before Kubernetes 1.31):
    /// every list of the attachments naming a Volume lists them all.
    field_selector_refused: AtomicBool,
    /// The label selector of the Volumes and attachments this replica manages (`--selector`):
    /// another shard's Volume of the same driver name and handle may be another backend's, and
    /// is no alias.
    label_selector: Option<String>,
    /// The same for Volumes by `spec.volumeHandle` (a CRD installed before that field was
    /// selectable, or an apiserver before 1.31).
    handle_selector_refused: AtomicBool,
}

impl Context {
    /// The driver a Volume names, or why there is none.
    fn driver(&self, name: &str) -> Result<Arc<dyn Driver>, VolumeProblem> {
        self.config
            .drivers
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeProblem::UnknownDriver(name.to_owned()))
    }
}

/// This replica: the name its Events report it by, and whether it may act now.
pub struct Replica {
    pub instance: String,
    pub fence: Fence,
}

/// How the controllers stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every reconcile under way finished (or none was: the caches never synced).
    Drained,
    /// Reconciles were dropped where they stood after the shutdown's grace (20 s): a driver
    /// call of one may still be under way at the backend.
    CutShort,
}

/// Runs both controllers until `shutdown` resolves. With a `label_selector`, only the Volumes and
/// VolumeAttachments it matches are managed: one operator per backend or shard.
pub async fn run(
    client: Client,
    config: Config,
    label_selector: Option<String>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    replica: Replica,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Stopped {
    let watch = match &label_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let attachments_api = Api::<VolumeAttachment>::all(client.clone());
    let volumes_api = Api::<Volume>::all(client.clone());

    // One watch of each kind. The caches keep objects slimmed (`slim_for_cache`); what the other
    // controller needs of each object a watch delivers is handed to it too, after the cache took
    // the object in (`Touched`), instead of a second watch of the same kind. The attachment
    // controller's concurrency is unbounded: the lanes (`Lanes`) bound what runs.
    let (attachments_touched, touched_attachments) = Touched::channel();
    let attachments_progress = CacheProgress::default();
    let attachments_by_volume = Index::new(attachment_volume_key);
    let attachments_by_binding = Index::new(attachment_binding_key);
    let (attachments, writer) = reflector::store();
    let attachment_controller = Controller::for_stream(
        reflector(
            writer,
            watcher(attachments_api, watch.clone()).modify(slim_for_cache),
        )
        .inspect_err({
            let progress = attachments_progress.clone();
            move |_| progress.forget()
        })
        // An attachment's change concerns its Volume's view of which connections are claimed,
        // when it changes what the Volume reads of it.
        .inspect_ok({
            let mut wakes = VolumeWakes::default();
            let mut progress = attachments_progress.recorder();
            let (by_volume, by_binding) = (
                attachments_by_volume.clone(),
                attachments_by_binding.clone(),
            );
            move |event| {
                by_volume.taken_in(event);
                by_binding.taken_in(event);
                progress.taken_in(event);
                for volume in wakes.volumes_to_wake(event) {
                    attachments_touched.wake(ObjectRef::<Volume>::new(&volume));
                }
            }
        })
        .applied_objects(),
        attachments.clone(),
    );
    // A Volume the watch delivers is what the cache holds now: the writes of this replica it
    // shows need no longer be kept.
    let own_volume_writes = Arc::new(OwnWrites::default());
    let volumes_progress = CacheProgress::default();
    let volumes_by_handle = Index::new(volume_backend_key);
    let (volumes_touched, touched_volumes) = Touched::channel();
    let (volumes, writer) = reflector::store();
    let volume_controller = Controller::for_stream(
        reflector(writer, watcher(volumes_api, watch).modify(slim_for_cache))
            .inspect_err({
                let progress = volumes_progress.clone();
                move |_| progress.forget()
            })
            .inspect_ok({
                let own_volume_writes = own_volume_writes.clone();
                let mut progress = volumes_progress.recorder();
                let by_handle = volumes_by_handle.clone();
                move |event| {
                    by_handle.taken_in(event);
                    progress.taken_in(event);
                    match event {
                        watcher::Event::Apply(volume) | watcher::Event::InitApply(volume) => {
                            own_volume_writes.seen(volume);
                        }
                        watcher::Event::Delete(volume) => own_volume_writes.forget(volume),
                        watcher::Event::Init | watcher::Event::InitDone => {}
                    }
                    volumes_touched.send(event, what_attachments_follow);
                }
            })
            .applied_objects(),
        volumes.clone(),
    )
    .with_config(
        kube::runtime::controller::Config::default().concurrency(volume_concurrency(&config)),
    );

    metrics.observe(attachments.clone(), volumes.clone());
    let caches_synced = {
        let (attachments, volumes) = (attachments.clone(), volumes.clone());
        async move {
            synced(&attachments).await;
            synced(&volumes).await;
        }
    }
    .boxed()
    .shared();
    // The process before this one (this one before a restart, or the leader before it) may have
    // left calls under way that a backend carries out after their caller is gone: nothing is
    // asked of or done to such a backend until they can no longer land, and the operator is not
    // ready before then.
    let earlier_calls_land_within: Vec<(String, Duration)> = config
        .drivers
        .iter()
        .map(|(name, driver)| (name.clone(), driver.lands_within()))
        .filter(|(_, within)| !within.is_zero())
        .collect();
    let settled = tokio::time::Instant::now()
        + earlier_calls_land_within
            .iter()
            .map(|(_, within)| *within)
            .max()
            .unwrap_or_default();
    tokio::spawn({
        let (health, caches_synced) = (health.clone(), caches_synced.clone());
        async move {
            caches_synced.await;
            info!("caches synced");
            tokio::time::sleep_until(settled).await;
            health.set_ready(true);
        }
    });
    tokio::spawn(check_drivers(
        config.drivers.clone(),
        health.clone(),
        config.resync_interval.min(DRIVER_CHECK_INTERVAL),
    ));
    // The claims of a connection: this replica's attachment cache where it watches every
    // attachment, else a watch of every attachment beside it.
    let (claims, claims_watch) = match &label_selector {
        None => (
            Claims::shared(
                attachments.clone(),
                attachments_by_volume.clone(),
                attachments_progress,
            ),
            None,
        ),
        Some(_) => {
            let (claims, watch) = Claims::watched(client.clone());
            (claims, Some(watch))
        }
    };
    let (lanes, turns_come) = Lanes::new(config.concurrency, attachments.clone());
    let context = Arc::new(Context {
        lanes,
        events: Publisher::new(client.clone(), replica.instance),
        client,
        config,
        volumes: volumes.clone(),
        volumes_by_handle,
        volumes_progress,
        attachments: attachments.clone(),
        attachments_by_volume: attachments_by_volume.clone(),
        attachments_by_binding,
        claims,
        backoff: Backoff::default(),
        metrics: metrics.clone(),
        locks: VolumeLocks::default(),
        fence: replica.fence,
        own_volume_writes,
        recently_held: RecentlyHeld::default(),
        label_selector,
        field_selector_refused: AtomicBool::new(false),
        handle_selector_refused: AtomicBool::new(false),
    });

    for (name, within) in &earlier_calls_land_within {
        info!(driver = %name, wait = ?within, "acting on this driver's volumes after a wait: calls made before this process led may still land");
        context.locks.earlier_calls_may_land(name, *within);
    }

    // A Volume's change (its policy, its backend connections) concerns each of its attachments.
    // Only what an attachment's decision rests on, though: the Volume's spec (its generation),
    // its deletion, and the nodes its backend volume is connected to (a holder's detach, which a
    // blocked attach waits for). Its other status writes wake no one.
    let attachments_of_volume = {
        let attachments = attachments.clone();
        move |volume: Volume| {
            let name = volume.metadata.name.unwrap_or_default();
            attachments_by_volume
                .get(&attachments, &name, |a| a.spec.volume_name == name)
                .into_iter()
                .map(|a| ObjectRef::from_obj(&*a))
                .collect::<Vec<_>>()
        }
    };
    let volume_changes = touched_volumes
        .map(Ok)
        .predicate_filter(concerns_attachments, PredicateConfig::default());

    // The converged objects whose record the backend no longer matches, as the sweep finds them.
    let (attachments_found, found_attachments) = futures::channel::mpsc::unbounded();
    let (volumes_found, found_volumes) = futures::channel::mpsc::unbounded();
    tokio::spawn(sweep::run(
        context.clone(),
        sweep::Found {
            attachments: attachments_found,
            volumes: volumes_found,
        },
    ));

    let shutdown = shutdown.shared();
    let attachment_loop = attachment_controller
        .watches_stream(volume_changes, attachments_of_volume)
        .reconcile_on(found_attachments)
        .reconcile_on(turns_come)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            attachment::reconcile,
            attachment::error_policy,
            context.clone(),
        )
        .for_each(|result| {
            record("VolumeAttachment", &metrics, result);
            futures::future::ready(())
        });
    let volume_loop = volume_controller
        .reconcile_on(touched_attachments)
        .reconcile_on(found_volumes)
        .graceful_shutdown_on(shutdown.clone())
        .run(volume::reconcile, volume::error_policy, context)
        .for_each(|result| {
            record("Volume", &metrics, result);
            futures::future::ready(())
        });
    info!("controllers started");
    let stopped = tokio::select! {
        _ = futures::future::join(attachment_loop, volume_loop) => {
            info!("controllers stopped");
            Stopped::Drained
        }
        stopped = stop_waiting(shutdown, caches_synced) => {
            match stopped {
                Stopped::CutShort => {
                    warn!("controllers stopped without waiting for the reconciles under way");
                }
                Stopped::Drained => {
                    info!("controllers stopped while waiting for their caches: nothing was under way");
                }
            }
            stopped
        }
    };
    if let Some(watch) = claims_watch {
        watch.abort();
    }
    stopped
}

/// Hands what another controller needs of each object a watch delivers (applied, listed again,
/// or deleted) to it, after the watch's own cache took the object in (a re-list's objects join
/// that cache together, at the end of the list). Only that little is queued, never a copy of the
/// object: while the other controller pauses its triggers (a failed watch of its own backs them
/// off), a storm's changes wait there.
struct Touched<T>(UnboundedSender<T>);

impl<T> Touched<T> {
    fn channel() -> (Self, UnboundedReceiver<T>) {
        let (sender, receiver) = futures::channel::mpsc::unbounded();
        (Self(sender), receiver)
    }

    fn wake(&self, needed: T) {
        // The other controller has stopped: nothing is left to wake.
        let _ = self.0.unbounded_send(needed);
    }

    fn send<K>(&self, event: &watcher::Event<K>, needed: impl Fn(&K) -> T) {
        match event {
            watcher::Event::Apply(object)
            | watcher::Event::InitApply(object)
            | watcher::Event::Delete(object) => {
                // The other controller has stopped: nothing is left to wake.
                let _ = self.0.unbounded_send(needed(object));
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// What of a Volume the wake-ups of its attachments rest on: its identity (name and UID), and
/// what [`concerns_attachments`] reads.
fn what_attachments_follow(volume: &Volume) -> Volume {
    let metadata = &volume.metadata;
    Volume {
        metadata: ObjectMeta {
            name: metadata.name.clone(),
            namespace: metadata.namespace.clone(),
            uid: metadata.uid.clone(),
            generation: metadata.generation,
            deletion_timestamp: metadata.deletion_timestamp.clone(),
            ..ObjectMeta::default()
        },
        spec: volume.spec.clone(),
        status: volume.status.as_ref().map(|status| VolumeStatus {
            connected_nodes: status.connected_nodes.clone(),
            ..VolumeStatus::default()
        }),
    }
}

/// How long the reconciles under way may take to finish once a shutdown is asked for: less than
/// the Deployment's `terminationGracePeriodSeconds` (30), so that the lease is released before
/// the kubelet's SIGKILL. A reconcile cut short wrote its intent before its driver call, so the
/// next leader resumes from it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Resolves when the controllers are no longer worth waiting for after `shutdown`: at once if the
/// caches never synced (the controllers hold their reconciles until the caches sync, and the
/// watches that would sync them stop with the shutdown, so they would wait forever; nothing is
/// under way), else after [`SHUTDOWN_GRACE`].
async fn stop_waiting(
    shutdown: impl Future<Output = ()>,
    caches_synced: Shared<BoxFuture<'static, ()>>,
) -> Stopped {
    shutdown.await;
    if caches_synced.peek().is_none() {
        return Stopped::Drained;
    }
    tokio::time::sleep(SHUTDOWN_GRACE).await;
    Stopped::CutShort
}

/// Volume reconciles at once: as many as in an attachment lane. Each waits on the backend and
/// the apiserver in turn (a probe, a finalizer, a status write), so fewer would leave thousands
/// of new Volumes unreconciled for minutes after their attachments settled; the many changes of
/// one Volume's attachments still wake it once while it waits, not once each.
fn volume_concurrency(config: &Config) -> u16 {
    u16::try_from(config.concurrency.max(1)).unwrap_or(u16::MAX)
}

/// The prefix of the annotations this operator reads: a person's force-detach request.
const OWN_ANNOTATION_PREFIX: &str = "safedetach.io/";

/// An object as the caches keep it: its spec, its status, and of its metadata what a decision
/// reads — name, UID, version, generation, creation, finalizers, deletion, and the annotations
/// under `safedetach.io/` (a person's force-detach request). The rest goes: managed fields,
/// labels (the apiserver selects the shard), every other annotation (`kubectl apply`'s copy of
/// the manifest, a GitOps tool's tracking ids) and owner references. Nothing here reads those,
/// they are most of a small object's size (one label alone costs a B-tree node of about half a
/// kilobyte), and no write sends them back: status is patched, finalizers are patched.
fn slim_for_cache<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key.starts_with(OWN_ANNOTATION_PREFIX));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A digest of what the attachments of `volume` decide on (see [`run`]).
fn concerns_attachments(volume: &Volume) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    volume.metadata.generation.hash(&mut hasher);
    volume
        .metadata
        .deletion_timestamp
        .is_some()
        .hash(&mut hasher);
    volume
        .status
        .as_ref()
        .map(|s| &s.connected_nodes)
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Counts and logs one finished reconcile.
fn record<K>(
    kind: &str,
    metrics: &Metrics,
    result: Result<(ObjectRef<K>, Action), ControllerError<Error, watcher::Error>>,
) where
    K: Resource,
    K::DynamicType: std::fmt::Debug,
{
    let error = match result {
        Ok(_) => return metrics.reconciled(kind),
        // The object was deleted before its turn came: nothing was reconciled, nothing failed.
        Err(ControllerError::ObjectNotFound(_)) => return,
        Err(error) => error,
    };
    metrics.reconciled(kind);
    let reason = match &error {
        ControllerError::ReconcilerFailed(error, _) => error.reason(),
        ControllerError::QueueError(_) => "Watch",
        _ => "Other",
    };
    metrics.reconcile_failed(kind, reason);
    warn!(kind, %error, "reconcile failed");
}

/// How long a reconcile waits for its volume's turn before it looks again later.
const TURN_WAIT: Duration = Duration::from_secs(2);

/// How often an acting replica checks that its drivers answer, for its readiness.
const DRIVER_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Checks every driver now and then and records the ones that do not answer.
async fn check_drivers(
    drivers: std::collections::BTreeMap<String, Arc<dyn Driver>>,
    health: Arc<Health>,
    every: Duration,
) {
    loop {
        let mut unreachable = Vec::new();
        for (name, driver) in &drivers {
            if let Err(error) = driver.health_check().await {
                unreachable.push(format!("{name}: {error}"));
            }
        }
        if !unreachable.is_empty() {
            warn!(?unreachable, "drivers do not answer");
        }
        health.set_unreachable(unreachable);
        tokio::time::sleep(every).await;
    }
}

/// Resolves once `store` holds the first full list. A store's readiness signal wakes only one of
/// several waiters (the controller waits on it too), so each wait is bounded and retried.
async fn synced<K>(store: &Store<K>)
where
    K: reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(Ok(())) => return,
            // The writer is gone with its controller (the operator is stopping): nothing will
            // ever be synced, and nothing may say it was.
            Ok(Err(_)) => std::future::pending::<()>().await,
            Err(_) => {}
        }
    }
}

/// `name`'s Volume as the apiserver has it now, and the version the apiserver answered at: read
/// as a list selected by name, which costs the apiserver what a get does and, unlike a get, says
/// how far the answer reaches (see [`aliases_as_of`]).
async fn volume_read_fresh(
    api: &Api<Volume>,
    name: &str,
) -> Result<(Option<Volume>, Option<String>), Error> {
    let selected =
        ListParams::default().fields(&format!("metadata.name={}", escape_field_value(name)));
    let list = api.list(&selected).await?;
    let volume = list.items.into_iter().find(|v| v.name_any() == name);
    Ok((volume, list.metadata.resource_version))
}

/// The other Volumes of this replica's shard that name the same backend volume as `volume`, as
/// the apiserver had them at `as_of` or later (see [`volumes_naming_as_of`]).
async fn aliases_as_of(
    context: &Context,
    volume: &Volume,
    as_of: Option<&str>,
) -> Result<Vec<Arc<Volume>>, Error> {
    let naming = volumes_naming_as_of(
        context,
        &volume.spec.driver,
        &volume.spec.volume_handle,
        as_of,
    )
    .await?;
    Ok(naming
        .into_iter()
        .filter(|other| other.uid() != volume.uid())
        .collect())
}

/// The Volumes of this replica's shard that name the backend volume `handle` of `driver`, as the
/// apiserver had them at `as_of` (a version it answered at after the caller's turn was taken) or
/// later: the cache's, once it has taken in every change up to that version (none will be
/// missing that the apiserver had then); else as the apiserver lists them now
/// ([`volumes_naming`]).
pub(super) async fn volumes_naming_as_of(
    context: &Context,
    driver: &str,
    handle: &str,
    as_of: Option<&str>,
) -> Result<Vec<Arc<Volume>>, Error> {
    if context.volumes_progress.reached(as_of).await {
        return Ok(cached_volumes_naming(context, driver, handle));
    }
    volumes_naming(context, driver, handle).await
}

/// A version the apiserver answers at now, read cheaply (a list of one Volume selected by name),
/// for [`volumes_naming_as_of`]: taken on a turn, it bounds what the cache must have taken in.
async fn volumes_version_now(context: &Context, name: &str) -> Result<Option<String>, Error> {
    let api = Api::<Volume>::all(context.client.clone());
    Ok(volume_read_fresh(&api, name).await?.1)
}

/// The Volumes of this replica's shard that name the backend volume `handle` of `driver`, as the
/// apiserver has them: selected by `spec.volumeHandle` (a selectable field of the CRD); where the
/// apiserver cannot select on it, every Volume of the shard, in pages, filtered here. The same
/// Volumes the cache holds (it watches the shard), fresh.
pub(super) async fn volumes_naming(
    context: &Context,
    driver: &str,
    handle: &str,
) -> Result<Vec<Arc<Volume>>, Error> {
    let api = Api::<Volume>::all(context.client.clone());
    let naming = |other: &Volume| other.spec.driver == driver && other.spec.volume_handle == handle;
    if !context.handle_selector_refused.load(Ordering::Relaxed) {
        let field = format!("{VOLUME_HANDLE_FIELD}={}", escape_field_value(handle));
        match api.list(&shard(context).fields(&field)).await {
            Ok(list) => {
                return Ok(list
                    .items
                    .into_iter()
                    .filter(|v| naming(v))
                    .map(Arc::new)
                    .collect());
            }
            // Remembered: this apiserver will not select on the field (until a restart).
            Err(kube::Error::Api(status)) if status.code == 400 => {
                context
                    .handle_selector_refused
                    .store(true, Ordering::Relaxed);
            }
            Err(error) => return Err(error.into()),
        }
    }
    let every = list_pages(&api, shard(context), |v: &Volume| naming(v)).await?;
    Ok(every.into_iter().map(Arc::new).collect())
}

/// The attachments that name one of `names`, as the apiserver had them at `as_of` (a version read
/// on the volume's turn) or later: from the cache of every attachment once it has taken in every
/// change up to `as_of` ([`Claims`]), else listed ([`attachments_naming`]).
pub(super) async fn attachments_naming_as_of(
    names: &BTreeSet<String>,
    context: &Context,
    as_of: Option<&str>,
) -> Result<Vec<VolumeAttachment>, Error> {
    if let Some(naming) = context.claims.naming_as_of(names, as_of).await {
        return Ok(naming);
    }
    attachments_naming(names, context).await
}

/// The attachments that name one of `names` (a Volume and the other Volumes of its backend
/// volume), as the apiserver has them: selected by `spec.volumeName` (a selectable field of the
/// CRD), one list per name; where the apiserver cannot select on it (before Kubernetes 1.31),
/// every attachment, filtered here. Not only those of this replica's `--selector`: an attachment
/// that names the Volume holds it and claims its connection whatever its labels say (one
/// relabelled out of the shard while attached included).
pub(super) async fn attachments_naming(
    names: &BTreeSet<String>,
    context: &Context,
) -> Result<Vec<VolumeAttachment>, Error> {
    let api = Api::<VolumeAttachment>::all(context.client.clone());
    // In pages, keeping only those that name the Volume: a cluster may hold many thousands.
    let every = || {
        list_pages(&api, ListParams::default(), |a: &VolumeAttachment| {
            names.contains(&a.spec.volume_name)
        })
    };
    if context.field_selector_refused.load(Ordering::Relaxed) {
        return every().await;
    }
    let mut naming = Vec::new();
    for name in names {
        let selected = ListParams::default().fields(&format!("{VOLUME_NAME_FIELD}={name}"));
        match api.list(&selected).await {
            Ok(list) => naming.extend(list.items),
            // Remembered: this apiserver will not select on the field (until a restart).
            Err(kube::Error::Api(status)) if status.code == 400 => {
                context
                    .field_selector_refused
                    .store(true, Ordering::Relaxed);
                return every().await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(naming)
}

/// Holds `volume` (adds the operator's finalizer, guarded as `finalizer::add` guards it), and
/// records the hold as recent: before the PATCH is sent (another reconcile may read the Volume
/// held before this one has the answer) and again once it is answered. `None` if it was held
/// already.
async fn hold_volume(
    context: &Context,
    api: &Api<Volume>,
    volume: &Volume,
) -> Result<Option<Volume>, Error> {
    let uid = volume.uid().unwrap_or_default();
    if !volume.finalizers().iter().any(|f| f == VOLUME_FINALIZER) {
        context.recently_held.held(&uid);
    }
    let written = finalizer::add(api, volume, VOLUME_FINALIZER).await?;
    if written.is_some() {
        context.recently_held.held(&uid);
    }
    Ok(written)
}

/// Objects per page of a full list that stands in for a field selector.
const FALLBACK_PAGE: u32 = 500;

/// Every object `params` selects, read in pages to the last, that `keep` accepts: a cluster may
/// hold many thousands.
async fn list_pages<K>(
    api: &Api<K>,
    params: ListParams,
    keep: impl Fn(&K) -> bool,
) -> Result<Vec<K>, Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut kept = Vec::new();
    let mut page = params.limit(FALLBACK_PAGE);
    loop {
        let list = api.list(&page).await?;
        kept.extend(list.items.into_iter().filter(|object| keep(object)));
        match list.metadata.continue_ {
            Some(token) if !token.is_empty() => page = page.continue_token(&token),
            _ => return Ok(kept),
        }
    }
}

/// A list of the objects of this replica's shard.
fn shard(context: &Context) -> ListParams {
    match &context.label_selector {
        Some(selector) => ListParams::default().labels(selector),
        None => ListParams::default(),
    }
}

/// A field selector's value with its separators escaped, as the apiserver reads it.
fn escape_field_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace('=', "\\=")
}

/// The other Volumes that name the same backend volume (driver and handle) as `volume`, as the
/// cache has them.
fn aliases_of(context: &Context, volume: &Volume) -> Vec<Arc<Volume>> {
    let mut aliases =
        cached_volumes_naming(context, &volume.spec.driver, &volume.spec.volume_handle);
    aliases.retain(|other| other.uid() != volume.uid());
    aliases
}

/// The Volumes of the cache that name the backend volume `handle` of `driver`.
fn cached_volumes_naming(context: &Context, driver: &str, handle: &str) -> Vec<Arc<Volume>> {
    context
        .volumes_by_handle
        .get(&context.volumes, &backend_key(driver, handle), |v| {
            v.spec.driver == driver && v.spec.volume_handle == handle
        })
}

/// The attachments of the cache that name one of `names`.
fn cached_attachments_naming(
    context: &Context,
    names: &BTreeSet<String>,
) -> Vec<Arc<VolumeAttachment>> {
    context.attachments_by_volume.get_each(
        &context.attachments,
        names.iter().map(String::as_str),
        |a| names.contains(&a.spec.volume_name),
    )
}

/// The key of a backend volume in an index: its driver and its handle.
fn backend_key(driver: &str, handle: &str) -> String {
    format!("{driver}\0{handle}")
}

fn volume_backend_key(volume: &Volume) -> Option<String> {
    Some(backend_key(&volume.spec.driver, &volume.spec.volume_handle))
}

fn attachment_volume_key(attachment: &VolumeAttachment) -> Option<String> {
    Some(attachment.spec.volume_name.clone())
}

/// The backend volume an attachment recorded attaching, if any.
fn attachment_binding_key(attachment: &VolumeAttachment) -> Option<String> {
    let bound = attachment.status.as_ref()?.bound_to.as_ref()?;
    Some(backend_key(&bound.driver, &bound.volume_handle))
}

/// The Volume that owns the backend volume `volume` names, if it is another one: the first Volume
/// of a (driver, handle) owns it, by creation time and then name (Volumes created within the same
/// second are ordered by name); a later one is an alias, through which nothing is attached.
fn owner_of_handle(aliases: &[Arc<Volume>], volume: &Volume) -> Option<String> {
    let key = |v: &Volume| {
        (
            v.metadata.creation_timestamp.clone().map(|t| t.0),
            v.name_any(),
        )
    };
    aliases
        .iter()
        .filter(|other| key(other) < key(volume))
        .min_by_key(|other| key(other))
        .map(|owner| owner.name_any())
}

/// How a reconcile ended: settled (its backoff is forgotten), or to be retried with backoff after
/// a failed driver call or an unreachable backend.
enum Outcome {
    Settled(Action),
    Retry(Action),
}

/// Asks the backend where the volume is connected; no answer is recorded as such, never guessed.
async fn probe(driver: &dyn Driver, handle: &str) -> ProbeAnswer {
    match driver.probe(handle).await {
        Ok(connections) => ProbeAnswer::Answered(connections),
        Err(error) => ProbeAnswer::Unreachable(error.to_string()),
    }
}
