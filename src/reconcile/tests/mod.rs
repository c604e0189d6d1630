//! The reconcilers between the pure core and the real binary: the attachment controller's
//! reconcile run against an apiserver in memory ([`fake_api`]) and a backend in memory
//! ([`scripted_driver`]), both writing to one log, so that each test pins the exact order of
//! reads, status writes, finalizer patches, Events and driver calls that the design's rules
//! demand: the intent written before the call it announces, nothing that says detached before
//! the backend confirmed it, no write once converged, a failed try held back until its backoff
//! is due, and the finalizer released only on the backend's word (a forced detach's confirmation
//! stored first). The Volume controller's reconcile runs on the same fakes where a case needs it
//! (a Volume gone since the cache had it).

mod fake_api;
mod scripted_driver;

use super::backoff::Backoff;
use super::claims::Claims;
use super::events::Publisher;
use super::index::Index;
use super::lanes::Lanes;
use super::lock::VolumeLocks;
use super::recently_held::RecentlyHeld;
use super::{Context, attachment};
use crate::api::{
    ATTACHMENT_FINALIZER, AttachmentPhase, Binding, FORCE_DETACH_ANNOTATION, VOLUME_FINALIZER,
    Volume, VolumeAttachment, VolumeAttachmentStatus,
};
use crate::config::Config;
use crate::driver::{Driver, DriverError};
use crate::runtime::leader::Fence;
use crate::runtime::metrics::Metrics;
use fake_api::FakeApi;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::watcher;
use scripted_driver::ScriptedDriver;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the apiserver answered and the driver was asked, in order.
pub type Log = Arc<Mutex<Vec<String>>>;

const RESYNC: Duration = Duration::from_secs(60);
const NODE: &str = "node-a";

/// One Volume (`vol`, backend volume `h1`) of the scripted driver, the operator's context over
/// the fake apiserver, and caches the test fills as a watch would.
struct Harness {
    log: Log,
    api: FakeApi,
    driver: Arc<ScriptedDriver>,
    context: Arc<Context>,
    attachments: Writer<VolumeAttachment>,
    /// The watch of every attachment of a replica of one shard, and its index.
    claims: Option<(Writer<VolumeAttachment>, Index<VolumeAttachment>)>,
    volumes: Writer<Volume>,
}

impl Harness {
    fn new() -> Self {
        Self::managing(None)
    }

    /// The harness of an operator that manages only what `label_selector` selects (its
    /// `--selector`), or everything.
    fn managing(label_selector: Option<&str>) -> Self {
        let log = Log::default();
        let api = FakeApi::new(log.clone());
        let driver = Arc::new(ScriptedDriver::new(log.clone()));
        let client = api.client();
        let (volumes, mut volumes_writer) = reflector::store::<Volume>();
        let (attachments, mut attachments_writer) = reflector::store::<VolumeAttachment>();
        let spec = serde_json::from_value(json!({
            "driver": "scripted",
            "volumeHandle": "h1",
            "autoForceDetach": true,
        }))
        .expect("a Volume spec");
        // Held, as the Volume controller leaves it.
        let mut volume = Volume::new("vol", spec);
        volume.metadata.finalizers = Some(vec![VOLUME_FINALIZER.to_owned()]);
        let volume = api.create(&volume);
        let volumes_by_handle = Index::new(super::volume_backend_key);
        let attachments_by_volume = Index::new(super::attachment_volume_key);
        let attachments_by_binding = Index::new(super::attachment_binding_key);
        // The first list, then what the watch sees after it.
        for event in [watcher::Event::InitDone, watcher::Event::Apply(volume)] {
            volumes_writer.apply_watcher_event(&event);
            volumes_by_handle.taken_in(&event);
        }
        attachments_writer.apply_watcher_event(&watcher::Event::InitDone);
        let drivers = [("scripted".to_owned(), driver.clone() as Arc<dyn Driver>)].into();
        // A replica of one shard watches every attachment beside its own cache.
        let (claims, claims_writer) = match label_selector {
            None => (
                Claims::shared(
                    attachments.clone(),
                    attachments_by_volume.clone(),
                    Default::default(),
                ),
                None,
            ),
            Some(_) => {
                let (every, writer) = reflector::store::<VolumeAttachment>();
                let by_volume = Index::new(super::attachment_volume_key);
                (
                    Claims::shared(every, by_volume.clone(), Default::default()),
                    Some((writer, by_volume)),
                )
            }
        };
        let (lanes, _woken) = Lanes::new(4, attachments.clone());
        let context = Arc::new(Context {
            events: Publisher::new(client.clone(), "test".into()),
            client,
            config: Config {
                default_stuck_after: Duration::from_secs(120),
                resync_interval: RESYNC,
                concurrency: 4,
                api_rate: None,
                drivers,
            },
            volumes,
            volumes_by_handle,
            // Never reached unless a test says so: every attach lists the aliases.
            volumes_progress: Default::default(),
            attachments,
            attachments_by_volume,
            attachments_by_binding,
            // The same for the attachments: every detach lists the claims of its connection.
            claims,
            backoff: Backoff::default(),
            metrics: Arc::new(Metrics::default()),
            locks: VolumeLocks::default(),
            fence: Fence::open(),
            lanes,
            own_volume_writes: Default::default(),
            // Long enough that no hold settles in a test unless it says so.
            recently_held: RecentlyHeld::new(Duration::from_secs(3600)),
            field_selector_refused: Default::default(),
            handle_selector_refused: Default::default(),
            label_selector: label_selector.map(str::to_owned),
        });
        Self {
            log,
            api,
            driver,
            context,
            attachments: attachments_writer,
            claims: claims_writer,
            volumes: volumes_writer,
        }
    }

    /// The Volume cache's watch reports it has taken in every change up to `version` (with
    /// `object` at that version).
    fn volume_cache_reaches(&self, object: &Volume, version: u64) {
        let mut at_version = object.clone();
        at_version.metadata.resource_version = Some(version.to_string());
        self.context
            .volumes_progress
            .recorder()
            .taken_in(&watcher::Event::Apply(at_version));
    }

    /// The cache of every attachment reports it has taken in every change up to `version`.
    fn claims_cache_reaches(&self, version: u64) {
        let spec = serde_json::from_value(json!({ "volumeName": "elsewhere", "nodeName": NODE }))
            .expect("an attachment spec");
        let mut at_version = VolumeAttachment::new("progress", spec);
        at_version.metadata.resource_version = Some(version.to_string());
        self.context
            .claims
            .progress()
            .recorder()
            .taken_in(&watcher::Event::Apply(at_version));
    }

    /// The attachment cache takes `event` in, as its watch delivers it.
    fn attachment_seen(&mut self, event: &watcher::Event<VolumeAttachment>) {
        self.attachments.apply_watcher_event(event);
        self.context.attachments_by_volume.taken_in(event);
        self.context.attachments_by_binding.taken_in(event);
    }

    /// The Volume cache takes `event` in, as its watch delivers it.
    fn volume_seen(&mut self, event: &watcher::Event<Volume>) {
        self.volumes.apply_watcher_event(event);
        self.context.volumes_by_handle.taken_in(event);
    }

    /// The watch of every attachment of a replica of one shard takes `event` in.
    fn claim_seen(&mut self, event: &watcher::Event<VolumeAttachment>) {
        let (writer, index) = self.claims.as_mut().expect("a watch of every attachment");
        writer.apply_watcher_event(event);
        index.taken_in(event);
    }

    /// Creates an attachment of `vol` to [`NODE`], and lets the cache see it.
    fn create(&mut self, name: &str, annotations: &[(&str, &str)]) {
        let spec = serde_json::from_value(json!({ "volumeName": "vol", "nodeName": NODE }))
            .expect("an attachment spec");
        let mut attachment = VolumeAttachment::new(name, spec);
        for (key, value) in annotations {
            attachment
                .annotations_mut()
                .insert((*key).to_owned(), (*value).to_owned());
        }
        self.api.create(&attachment);
        self.catch_up(name);
    }

    /// The cache catches up with the apiserver, as a watch does, for `name`.
    fn catch_up(&mut self, name: &str) {
        let event = match self.api.get::<VolumeAttachment>(name) {
            Some(now) => watcher::Event::Apply(now),
            None => match self.cached(name) {
                Some(last) => watcher::Event::Delete(last),
                None => return,
            },
        };
        self.attachment_seen(&event);
    }

    fn cached(&self, name: &str) -> Option<VolumeAttachment> {
        self.context
            .attachments
            .get(&ObjectRef::new(name))
            .map(|a| a.as_ref().clone())
    }

    /// One reconcile of `name` as the controller starts it, from the cache's copy; the log of
    /// what it did is taken.
    async fn reconcile(&mut self, name: &str) -> (Action, Vec<String>) {
        let cached = self.cached(name).expect("the attachment is in the cache");
        let action = attachment::reconcile(Arc::new(cached), self.context.clone())
            .await
            .expect("the reconcile succeeds");
        let log = std::mem::take(&mut *self.log.lock().expect("the log"));
        (action, log)
    }

    /// Takes the operator's finalizer off the Volume at the apiserver, as before the Volume
    /// controller first held it (the cache keeps its copy).
    fn unhold_volume(&self) {
        let mut volume = self.api.get::<Volume>("vol").expect("the Volume");
        volume.metadata.finalizers = None;
        self.api.replace(&volume);
    }

    /// Makes the Volume multi-attach, at the apiserver and in the cache.
    fn allow_multi_attach(&mut self) {
        let mut volume = self.api.get::<Volume>("vol").expect("the Volume");
        volume.spec.multi_attach = true;
        self.api.replace(&volume);
        let now = self.api.get::<Volume>("vol").expect("the Volume");
        self.volume_seen(&watcher::Event::Apply(now));
    }

    /// Annotates `name` as `kubectl annotate` would.
    fn annotate(&mut self, name: &str, key: &str, value: &str) {
        let mut attachment = self
            .api
            .get::<VolumeAttachment>(name)
            .expect("the attachment");
        attachment
            .annotations_mut()
            .insert(key.to_owned(), value.to_owned());
        self.api.replace(&attachment);
        self.catch_up(name);
    }
}

/// The position of the first entry that starts with `prefix`.
fn position(log: &[String], prefix: &str) -> usize {
    log.iter()
        .position(|entry| entry.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {log:#?}"))
}

/// Creates `name`, an attachment of `vol` to [`NODE`] at the apiserver only (the cache has not
/// seen it), held and `Attached` as the backend confirmed, on the connection `binding` names.
fn attached_at_the_apiserver(harness: &Harness, name: &str, binding: Binding) {
    attached_at_the_apiserver_on(harness, name, NODE, binding);
}

/// The same on `node`.
fn attached_at_the_apiserver_on(harness: &Harness, name: &str, node: &str, binding: Binding) {
    let spec = serde_json::from_value(json!({ "volumeName": "vol", "nodeName": node }))
        .expect("an attachment spec");
    let mut attachment = harness.api.create(&VolumeAttachment::new(name, spec));
    attachment.metadata.finalizers = Some(vec![ATTACHMENT_FINALIZER.to_owned()]);
    attachment.status = Some(VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Attached),
        attached: true,
        bound_to: Some(binding),
        ..Default::default()
    });
    harness.api.replace(&attachment);
}

/// What an attachment of `vol` binds to: the scripted driver, handle h1, the Volume's UID.
fn binding_of_vol(harness: &Harness) -> Binding {
    let volume = harness.api.get::<Volume>("vol").expect("the Volume");
    Binding {
        driver: "scripted".into(),
        volume_handle: "h1".into(),
        volume_uid: volume.uid().expect("a UID"),
    }
}

/// `name`, created already, recorded at the apiserver as an attach intended `since` then: its
/// finalizer, phase `Attaching`, bound to `binding`.
fn intended_at_the_apiserver(
    harness: &Harness,
    name: &str,
    binding: &Binding,
    since: jiff::Timestamp,
) {
    let mut attachment = harness
        .api
        .get::<VolumeAttachment>(name)
        .expect("the attachment");
    attachment.metadata.finalizers = Some(vec![ATTACHMENT_FINALIZER.to_owned()]);
    attachment.status = Some(VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Attaching),
        phase_since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(since)),
        bound_to: Some(binding.clone()),
        ..Default::default()
    });
    harness.api.replace(&attachment);
}

/// The reconcile logged no attach, and told of another node's claim.
fn blocked_by_another_nodes_claim(log: &[String]) {
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver attach")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|entry| entry == "event ClaimedByAnotherNode"),
        "{log:#?}"
    );
}

/// Attached and converged: the starting point of the detach tests.
async fn attached(harness: &mut Harness, name: &str) {
    harness.create(name, &[]);
    harness.reconcile(name).await;
    harness.catch_up(name);
    assert!(harness.driver.connects("h1", NODE));
}

/// Attaches `name` as [`attached`] does, then deletes it, and lets the cache see the deletion.
async fn attached_then_deleted(harness: &mut Harness, name: &str) {
    attached(harness, name).await;
    harness.api.delete::<VolumeAttachment>(name);
    harness.catch_up(name);
}

#[tokio::test]
async fn an_attach_writes_its_intent_first_and_attached_only_on_the_probe_after_the_call() {
    let mut harness = Harness::new();
    harness.create("va", &[]);
    let (action, log) = harness.reconcile("va").await;
    assert_eq!(
        log,
        [
            r#"write volumeattachments/va: finalizers ["safedetach.io/detach"]"#,
            "driver probe h1",
            // The Volume read fresh before a call rests on its policy, and its aliases.
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            // Rule 4: the intent is stored before the call it announces.
            "write volumeattachments/va/status: phase=Attaching attached=false",
            "driver attach h1 node-a",
            // Attached only on the backend's word, asked after the call.
            "driver probe h1",
            "write volumeattachments/va/status: phase=Attached attached=true",
            "event Attached",
        ]
    );
    assert_eq!(action, Action::requeue(RESYNC));
}

#[tokio::test]
async fn an_attach_holds_its_volume_first_so_that_a_deletion_waits_for_the_attachment() {
    let mut harness = Harness::new();
    // The Volume controller has not held it yet.
    harness.unhold_volume();
    harness.create("va", &[]);
    let (action, log) = harness.reconcile("va").await;
    let held = position(
        &log,
        r#"write volumes/vol: finalizers ["safedetach.io/attachments"]"#,
    );
    assert!(held > position(&log, "list volumes metadata.name=vol"));
    // Held just now: the attach waits for a later read that finds the Volume held (a DELETE
    // that read it before the finalizer may still be carried out).
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver attach") || entry.contains("phase=Attaching")),
        "{log:#?}"
    );
    assert_eq!(action, Action::requeue(crate::decide::BUSY_RECHECK));
    harness.catch_up("va");
    // Looked at again before the hold has settled: still no attach, and no probe.
    let (action, log) = harness.reconcile("va").await;
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver ") || entry.contains("phase=Attaching")),
        "{log:#?}"
    );
    assert_eq!(action, Action::requeue(crate::decide::BUSY_RECHECK));
    harness.context.recently_held.settle_all();
    let (_, log) = harness.reconcile("va").await;
    assert!(
        position(&log, "list volumes metadata.name=vol")
            < position(&log, "write volumeattachments/va/status: phase=Attaching")
    );
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("write volumes/vol:")),
        "{log:#?}"
    );
    assert!(harness.driver.connects("h1", NODE));
    let volume = harness.api.get::<Volume>("vol").expect("the Volume");
    assert_eq!(volume.finalizers(), [VOLUME_FINALIZER]);
    // Deleted now, it stays: its release is the Volume controller's, once no attachment names it.
    harness.api.delete::<Volume>("vol");
    assert!(harness.api.get::<Volume>("vol").is_some());
}

/// The cache still has the Volume, the apiserver no longer: the intent the cache suggested (an
/// attach, bound to that Volume) is dropped once the fresh read finds it gone, and nothing
/// records a claim on a Volume nothing was attached to.
#[tokio::test]
async fn an_intent_decided_on_the_cached_volume_is_not_written_once_the_volume_is_gone() {
    let mut harness = Harness::new();
    harness.unhold_volume();
    harness.api.delete::<Volume>("vol");
    harness.create("va", &[]);
    let (_, log) = harness.reconcile("va").await;
    assert!(
        !log.iter().any(|entry| entry.contains("phase=Attaching")),
        "{log:#?}"
    );
    let stored = harness
        .api
        .get::<VolumeAttachment>("va")
        .and_then(|a| a.status)
        .unwrap_or_default();
    assert_eq!(stored.bound_to, None, "{log:#?}");
    assert!(!harness.driver.connects("h1", NODE));
}

/// A single-attach alias created a moment ago, which the Volume cache has not seen yet, makes
/// the attach of a multi-attach Volume of the same backend volume exclusive: an attach lists the
/// Volume's aliases from the apiserver too.
#[tokio::test]
async fn an_alias_the_cache_has_not_seen_yet_still_makes_the_attach_exclusive() {
    let mut harness = Harness::new();
    harness.allow_multi_attach();
    // Created now; the cache has not seen it.
    let spec = serde_json::from_value(json!({ "driver": "scripted", "volumeHandle": "h1" }))
        .expect("a Volume spec");
    harness.api.create(&Volume::new("vol-alias", spec));
    harness.driver.connect("h1", "node-b");
    harness.create("va", &[]);
    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter()
            .any(|entry| entry == "list volumes spec.volumeHandle=h1"),
        "{log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE), "{log:#?}");
}

/// An attach whose Volume cache has taken in every change up to the version its Volume was read
/// at takes the aliases from the cache, which then holds every one the apiserver had at that
/// read: no list of the Volumes by backend volume.
#[tokio::test]
async fn an_attach_reads_the_aliases_from_a_cache_that_has_reached_its_read() {
    let mut harness = Harness::new();
    harness.create("va", &[]);
    let vol = harness.api.get::<Volume>("vol").expect("the Volume");
    // Further than any version this apiserver reaches in the test.
    harness.volume_cache_reaches(&vol, 1_000);
    let (_, log) = harness.reconcile("va").await;
    assert_eq!(
        log,
        [
            r#"write volumeattachments/va: finalizers ["safedetach.io/detach"]"#,
            "driver probe h1",
            "list volumes metadata.name=vol",
            "write volumeattachments/va/status: phase=Attaching attached=false",
            "driver attach h1 node-a",
            "driver probe h1",
            "write volumeattachments/va/status: phase=Attached attached=true",
            "event Attached",
        ]
    );
}

/// A Volume cache that has moved, but not as far as the version the Volume was read at, is not
/// taken for the aliases: the attach waits a moment for it, then lists them, and the alias the
/// cache has not seen makes it exclusive.
#[tokio::test]
async fn an_attach_lists_the_aliases_when_its_cache_has_not_reached_its_read() {
    let mut harness = Harness::new();
    harness.allow_multi_attach();
    let vol = harness.api.get::<Volume>("vol").expect("the Volume");
    let spec = serde_json::from_value(json!({ "driver": "scripted", "volumeHandle": "h1" }))
        .expect("a Volume spec");
    harness.api.create(&Volume::new("vol-alias", spec));
    harness.driver.connect("h1", "node-b");
    harness.create("va", &[]);
    // The cache has taken in the Volume's creation, and nothing since.
    let created_at = vol
        .resource_version()
        .and_then(|v| v.parse().ok())
        .expect("a version");
    harness.volume_cache_reaches(&vol, created_at);
    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter()
            .any(|entry| entry == "list volumes spec.volumeHandle=h1"),
        "{log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE), "{log:#?}");
}

/// A Volume the Volume controller held a moment ago is attached on no sooner than one the
/// attachment held itself: a DELETE that read it before the finalizer may still be carried out.
#[tokio::test]
async fn an_attach_waits_until_the_volume_controllers_hold_has_settled() {
    let mut harness = Harness::new();
    let uid = harness
        .api
        .get::<Volume>("vol")
        .expect("the Volume")
        .uid()
        .expect("a uid");
    // As the Volume controller records the finalizer it has just added.
    harness.context.recently_held.held(&uid);
    harness.create("va", &[]);
    let (action, log) = harness.reconcile("va").await;
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver attach") || entry.contains("phase=Attaching")),
        "{log:#?}"
    );
    // Nor is the backend asked: the attach would wait anyway.
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver probe")),
        "{log:#?}"
    );
    assert_eq!(action, Action::requeue(crate::decide::BUSY_RECHECK));
    harness.context.recently_held.settle_all();
    harness.catch_up("va");
    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter().any(|entry| entry == "driver attach h1 node-a"),
        "{log:#?}"
    );
}

#[tokio::test]
async fn an_attachment_whose_volume_went_before_it_was_held_is_never_attached() {
    let mut harness = Harness::new();
    harness.unhold_volume();
    // Deleted before anything held it: gone at once, though the cache still has it.
    harness.api.delete::<Volume>("vol");
    assert!(harness.api.get::<Volume>("vol").is_none());
    harness.create("va", &[]);
    let (_, log) = harness.reconcile("va").await;
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver attach")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|entry| entry.starts_with("write volumes/")),
        "{log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE));
}

#[tokio::test]
async fn a_converged_attachment_costs_one_probe_and_no_write() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    for _ in 0..3 {
        let (action, log) = harness.reconcile("va").await;
        assert_eq!(log, ["driver probe h1"]);
        assert_eq!(action, Action::requeue(RESYNC));
    }
}

#[tokio::test]
async fn a_failed_call_is_recorded_once_and_held_back_until_its_backoff_is_due() {
    let mut harness = Harness::new();
    harness.create("va", &[]);
    harness
        .driver
        .fail_next("attach", DriverError::Unreachable("down".into()));
    let (action, log) = harness.reconcile("va").await;
    assert_eq!(
        log,
        [
            r#"write volumeattachments/va: finalizers ["safedetach.io/detach"]"#,
            "driver probe h1",
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            "write volumeattachments/va/status: phase=Attaching attached=false",
            "driver attach h1 node-a",
            // The failure is stored with the phase it left (Attaching), and told once.
            "write volumeattachments/va/status: phase=Attaching attached=false",
            "event AttachFailed",
        ]
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    // Its own status write wakes it at once: held back, it neither asks nor writes.
    harness.catch_up("va");
    let (action, log) = harness.reconcile("va").await;
    assert!(log.is_empty(), "{log:#?}");
    assert_ne!(action, Action::requeue(RESYNC));
    assert!(harness.context.backoff.holding("va").is_some());
    assert!(!harness.driver.connects("h1", NODE));
    // A person's new force-detach request is not held back.
    harness.annotate("va", FORCE_DETACH_ANNOTATION, "t1");
    let (_, log) = harness.reconcile("va").await;
    assert!(
        position(
            &log,
            "write volumeattachments/va/status: phase=Detaching attached=false force=InProgress"
        ) < position(&log, "driver force_detach h1 node-a"),
        "{log:#?}"
    );
}

/// A deleted attachment is released on the backend's word, after the probe that follows the
/// detach. Its finalizer's release is its last write: the `Detached` it would store goes with
/// it, and the Event tells it.
#[tokio::test]
async fn a_deleted_attachment_is_released_on_the_backends_word() {
    let mut harness = Harness::new();
    attached_then_deleted(&mut harness, "va").await;
    let (action, log) = harness.reconcile("va").await;
    assert_eq!(
        log,
        [
            "driver probe h1",
            // The deletion is acted on only as the apiserver has it, with the attachments that
            // may share its connection (none), and with its Volume. The Volumes of its backend
            // volume are listed: the cache has not caught up with the read that bounds them.
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            "list volumeattachments spec.volumeName=vol",
            "get volumeattachments/va",
            "list volumes metadata.name=vol",
            "write volumeattachments/va/status: phase=Detaching attached=true",
            "driver terminate_connection h1 node-a",
            "driver detach h1 node-a",
            "driver probe h1",
            "write volumeattachments/va: finalizers []",
            "event Detached",
        ]
    );
    assert_eq!(action, Action::await_change());
    assert!(harness.api.get::<VolumeAttachment>("va").is_none());
    assert!(!harness.driver.connects("h1", NODE));
}

/// A deleted attachment whose Volume cache has taken in every change up to a version read on
/// its volume's turn takes the Volumes of its backend volume from the cache: no list of the
/// Volumes by backend volume, and the attachments of the alias the cache holds are listed (they
/// may be in another shard).
#[tokio::test]
async fn a_detach_reads_the_volumes_of_its_backend_volume_from_a_cache_that_has_caught_up() {
    let mut harness = Harness::new();
    attached_then_deleted(&mut harness, "va").await;
    let mut alias = older_alias_of_h1("vol-alias");
    alias.metadata.uid = Some("uid-of-vol-alias".into());
    harness.volume_seen(&watcher::Event::Apply(alias));
    let vol = harness.api.get::<Volume>("vol").expect("the Volume");
    harness.volume_cache_reaches(&vol, 1_000);
    let (_, log) = harness.reconcile("va").await;
    assert_eq!(
        log[..5],
        [
            "driver probe h1",
            "list volumes metadata.name=vol",
            "list volumeattachments spec.volumeName=vol",
            "list volumeattachments spec.volumeName=vol-alias",
            "get volumeattachments/va",
        ],
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|line| line.contains("spec.volumeHandle")),
        "{log:#?}"
    );
}

/// A Volume cache that has not taken in a change at the version read on the turn is not taken
/// for the Volumes of the backend volume: they are listed, and an alias only the apiserver has
/// has its attachments listed too.
#[tokio::test]
async fn a_detach_lists_the_volumes_of_its_backend_volume_when_its_cache_has_not_caught_up() {
    let mut harness = Harness::new();
    attached_then_deleted(&mut harness, "va").await;
    let vol = harness.api.get::<Volume>("vol").expect("the Volume");
    harness.api.create(&older_alias_of_h1("vol-alias"));
    // The cache has taken in the Volume's creation, and nothing since.
    let created_at = vol
        .resource_version()
        .and_then(|v| v.parse().ok())
        .expect("a version");
    harness.volume_cache_reaches(&vol, created_at);
    let (_, log) = harness.reconcile("va").await;
    assert_eq!(
        log[..6],
        [
            "driver probe h1",
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            "list volumeattachments spec.volumeName=vol",
            "list volumeattachments spec.volumeName=vol-alias",
            "get volumeattachments/va",
        ],
        "{log:#?}"
    );
}

/// Another writer relabels a deleted attachment between the reads its release was decided on and
/// the release, which it refuses, and again before the release is sent on the new version: that
/// one goes through, conditioned on what the decision rests on as the apiserver finds it, not on
/// the version.
#[tokio::test]
async fn a_release_refused_for_a_label_is_tried_again_on_what_it_rests_on() {
    let mut harness = Harness::new();
    attached_then_deleted(&mut harness, "va").await;
    harness
        .api
        .before_finalizer_writes([fake_api::label(), fake_api::label()]);
    let (action, log) = harness.reconcile("va").await;
    assert_eq!(
        log[log.len() - 5..],
        [
            "driver probe h1",
            "write volumeattachments/va: refused",
            "get volumeattachments/va",
            "write volumeattachments/va: finalizers []",
            "event Detached",
        ],
        "{log:#?}"
    );
    assert_eq!(action, Action::await_change());
    assert!(harness.api.get::<VolumeAttachment>("va").is_none());
}

/// A person asks for a force-detach between the read a release is sent again on and that
/// release: the apiserver's test of the request refuses it, the next read finds the grounds
/// changed, and the decision is taken again on the attachment as it is now.
#[tokio::test]
async fn a_release_whose_grounds_changed_under_it_is_decided_again() {
    let mut harness = Harness::new();
    attached_then_deleted(&mut harness, "va").await;
    harness
        .api
        .before_finalizer_writes([fake_api::label(), fake_api::force_detach_request("t9")]);
    let (_, log) = harness.reconcile("va").await;
    let first = position(&log, "write volumeattachments/va: refused");
    assert_eq!(
        log[first..first + 5],
        [
            "write volumeattachments/va: refused",
            "get volumeattachments/va",
            // Sent on the grounds read, and refused by the apiserver's test of the request.
            "write volumeattachments/va: refused",
            // The grounds read again: changed, so no third try.
            "get volumeattachments/va",
            // The decision taken again, from a read of its own.
            "get volumeattachments/va",
        ],
        "{log:#?}"
    );
    // Decided again, the request is honoured (its confirmation stored), and only then released.
    let forced = position(&log, "driver force_detach h1 node-a");
    assert!(forced > first + 5, "{log:#?}");
    assert_eq!(
        log[forced..],
        [
            "driver force_detach h1 node-a",
            "driver probe h1",
            "write volumeattachments/va/status: phase=Detached attached=false force=Succeeded",
            "event ForceDetached",
            "write volumeattachments/va: finalizers []",
        ],
        "{log:#?}"
    );
    assert!(
        harness.api.get::<VolumeAttachment>("va").is_none(),
        "{log:#?}"
    );
}

/// A forced detach of a deleted attachment stores its confirmation before the release: it is the
/// record that `kubectl safe-detach force --wait` and the force metric rest on.
#[tokio::test]
async fn a_deleted_attachments_forced_detach_stores_its_confirmation_before_the_release() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    harness.api.delete::<VolumeAttachment>("va");
    harness.annotate("va", FORCE_DETACH_ANNOTATION, "t1");
    let (_, log) = harness.reconcile("va").await;
    let confirmed =
        "write volumeattachments/va/status: phase=Detached attached=false force=Succeeded";
    assert!(
        position(&log, "driver force_detach h1 node-a") < position(&log, confirmed)
            && position(&log, confirmed)
                < position(&log, "write volumeattachments/va: finalizers []")
            && position(&log, "write volumeattachments/va: finalizers []") < log.len(),
        "{log:#?}"
    );
    assert!(harness.api.get::<VolumeAttachment>("va").is_none());
}

/// Another controller's finalizer keeps a deleted attachment a while after the operator's goes:
/// it shows `Detached`, stored on the backend's word before the release.
#[tokio::test]
async fn a_deleted_attachment_that_another_finalizer_keeps_stores_detached_first() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    let mut va = harness.api.get::<VolumeAttachment>("va").expect("va");
    va.finalizers_mut().push("example.com/audit".into());
    harness.api.replace(&va);
    harness.api.delete::<VolumeAttachment>("va");
    harness.catch_up("va");
    let (_, log) = harness.reconcile("va").await;
    assert!(
        position(&log, "driver probe h1")
            < position(
                &log,
                "write volumeattachments/va/status: phase=Detached attached=false"
            )
            && position(
                &log,
                "write volumeattachments/va/status: phase=Detached attached=false"
            ) < position(
                &log,
                r#"write volumeattachments/va: finalizers ["example.com/audit"]"#
            ),
        "{log:#?}"
    );
    let kept = harness
        .api
        .get::<VolumeAttachment>("va")
        .expect("kept by the other finalizer");
    assert_eq!(kept.finalizers(), ["example.com/audit"]);
    assert_eq!(
        kept.status.and_then(|s| s.phase),
        Some(AttachmentPhase::Detached)
    );
    assert!(!harness.driver.connects("h1", NODE));
}

#[tokio::test]
async fn a_forced_detach_writes_its_token_before_the_call_and_acts_once_per_token() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    harness.annotate("va", FORCE_DETACH_ANNOTATION, "t1");
    let (_, log) = harness.reconcile("va").await;
    assert_eq!(
        log,
        [
            "driver probe h1",
            "get volumeattachments/va",
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            // The token is stored as taken, with the intent, before the call.
            "write volumeattachments/va/status: phase=Detaching attached=true force=InProgress",
            "event ForceDetaching",
            "driver force_detach h1 node-a",
            // The attachments that may have claimed the connection it cut (none).
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            "list volumeattachments spec.volumeName=vol",
            "driver probe h1",
            // The Volume read again for the new attach: the call may have taken long.
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            // The confirmed detach, written with the new attach's intent: one write for both.
            "write volumeattachments/va/status: phase=Attaching attached=false force=Succeeded",
            "event ForceDetached",
            "driver attach h1 node-a",
            "driver probe h1",
            "write volumeattachments/va/status: phase=Attached attached=true force=Succeeded",
            "event Attached",
        ]
    );
    // Attached again, and the token spent: the same annotation forces nothing more.
    harness.catch_up("va");
    let (_, log) = harness.reconcile("va").await;
    assert_eq!(log, ["driver probe h1"], "acted again on a spent token");
    assert!(harness.driver.connects("h1", NODE));
}

/// The attach that follows a forced detach in the same reconcile rests on the Volume as it is
/// after the call, not as it was read before it: a single-attach alias created during the call
/// makes the attach exclusive.
#[tokio::test]
async fn the_attach_after_a_forced_detach_reads_the_volume_again() {
    let mut harness = Harness::new();
    harness.allow_multi_attach();
    attached(&mut harness, "va").await;
    // Another node holds the backend volume, as a multi-attach Volume allows.
    harness.driver.connect("h1", "node-b");
    harness.annotate("va", FORCE_DETACH_ANNOTATION, "t1");
    let api = harness.api.clone();
    harness.driver.meanwhile("force_detach", move || {
        let spec = serde_json::from_value(
            json!({ "driver": "scripted", "volumeHandle": "h1", "multiAttach": false }),
        )
        .expect("a Volume spec");
        api.create(&Volume::new("vol-alias", spec));
    });
    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter()
            .any(|entry| entry == "driver force_detach h1 node-a"),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver attach")),
        "attached beside node-b though a single-attach Volume names h1 now: {log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE), "{log:#?}");
}

/// A Volume deleted during a forced detach: the reconcile records the confirmed detach, and no
/// intent to attach bound to a Volume on its way out.
#[tokio::test]
async fn a_volume_deleted_during_a_forced_detach_gets_no_intent_to_attach() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    harness.annotate("va", FORCE_DETACH_ANNOTATION, "t1");
    let api = harness.api.clone();
    harness
        .driver
        .meanwhile("force_detach", move || api.delete::<Volume>("vol"));
    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter()
            .any(|entry| entry == "driver force_detach h1 node-a"),
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver attach") || entry.contains("phase=Attaching")),
        "{log:#?}"
    );
    let stored = harness
        .api
        .get::<VolumeAttachment>("va")
        .and_then(|a| a.status)
        .expect("a status");
    assert_eq!(stored.phase, Some(AttachmentPhase::Detached));
    assert_eq!(stored.bound_to, None, "{stored:?}");
    assert!(!harness.driver.connects("h1", NODE));
}

#[tokio::test]
async fn a_refused_status_write_is_decided_again_on_the_version_the_apiserver_has() {
    let mut harness = Harness::new();
    harness.create("va", &[]);
    // The intent's write is refused: the call it announces waits for the write on the new
    // version, which changed nothing the decision rests on.
    harness.api.interleave_writes(1);
    let (_, log) = harness.reconcile("va").await;
    assert_eq!(
        log,
        [
            r#"write volumeattachments/va: finalizers ["safedetach.io/detach"]"#,
            "driver probe h1",
            "list volumes metadata.name=vol",
            "list volumes spec.volumeHandle=h1",
            "write volumeattachments/va/status: phase=Attaching attached=false",
            "  refused: the object changed",
            "get volumeattachments/va",
            "write volumeattachments/va/status: phase=Attaching attached=false",
            "driver attach h1 node-a",
            "driver probe h1",
            "write volumeattachments/va/status: phase=Attached attached=true",
            "event Attached",
        ]
    );
}

/// A Volume deleted since the cache had it (a bulk delete outruns the watch): its reconcile ends
/// without an error to count, log and retry, and asks nothing of the backend.
#[tokio::test]
async fn a_volume_gone_since_the_cache_had_it_ends_its_reconcile_quietly() {
    let harness = Harness::new();
    // Not held yet, so that the delete takes it at once.
    harness.unhold_volume();
    let cached = Arc::new(harness.api.get::<Volume>("vol").expect("the Volume"));
    harness.api.delete::<Volume>("vol");
    let action = super::volume::reconcile(cached, harness.context.clone())
        .await
        .expect("a gone Volume is no error");
    let log = std::mem::take(&mut *harness.log.lock().expect("the log"));
    assert_eq!(action, Action::await_change(), "{log:#?}");
    assert_eq!(log, ["write volumes/vol (gone)"], "{log:#?}");
}

#[tokio::test]
async fn a_volume_whose_cache_is_behind_its_own_writes_is_decided_on_what_it_wrote() {
    let harness = Harness::new();
    // The cache keeps the Volume as created: it never sees this replica's writes here.
    let stale = || {
        harness
            .context
            .volumes
            .get(&ObjectRef::new("vol"))
            .expect("the Volume is in the cache")
    };
    super::volume::reconcile(stale(), harness.context.clone())
        .await
        .expect("the first reconcile");
    let first = std::mem::take(&mut *harness.log.lock().expect("the log"));
    assert_eq!(
        first,
        [
            "driver probe h1",
            "write volumes/vol/status: phase=Available attached=false",
        ],
        "{first:#?}"
    );
    // Woken again (an attachment's change, say) before the watch delivered those writes: the
    // Volume is decided on what this replica wrote, so nothing is written again, and nothing is
    // refused as stale and read back.
    super::volume::reconcile(stale(), harness.context.clone())
        .await
        .expect("the second reconcile");
    let second = std::mem::take(&mut *harness.log.lock().expect("the log"));
    assert_eq!(second, ["driver probe h1"], "{second:#?}");
}

/// The controller spawns a task for every object woken, holding the reconcile's future whole; in
/// a storm thousands wait for their lane at once, so the part that runs only with a turn is
/// boxed, and what a waiting one holds stays small.
#[tokio::test]
async fn a_reconcile_waiting_for_its_turn_holds_little_memory() {
    let mut harness = Harness::new();
    harness.create("va", &[]);
    let cached = harness
        .cached("va")
        .expect("the attachment is in the cache");
    let reconcile = attachment::reconcile(Arc::new(cached), harness.context.clone());
    let size = size_of_val(&reconcile);
    assert!(size <= 1024, "the spawned reconcile is {size} bytes");
}

#[test]
fn the_cache_keeps_of_the_metadata_only_what_a_decision_reads() {
    let spec = serde_json::from_value(json!({ "volumeName": "vol", "nodeName": NODE }))
        .expect("an attachment spec");
    let mut attachment = VolumeAttachment::new("va", spec);
    attachment.annotations_mut().extend([
        (
            "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
            "{\"apiVersion\":\"safedetach.io/v1alpha1\"}".to_owned(),
        ),
        (
            "argocd.argoproj.io/tracking-id".to_owned(),
            "storage:safedetach.io/VolumeAttachment:va".to_owned(),
        ),
        (FORCE_DETACH_ANNOTATION.to_owned(), "t1".to_owned()),
    ]);
    attachment.labels_mut().insert(
        "app.kubernetes.io/instance".to_owned(),
        "storage".to_owned(),
    );
    attachment.metadata.managed_fields = Some(vec![Default::default()]);
    attachment.metadata.owner_references = Some(vec![Default::default()]);
    attachment.metadata.uid = Some("u1".to_owned());
    attachment.metadata.resource_version = Some("7".to_owned());
    attachment.metadata.generation = Some(2);
    attachment.metadata.finalizers = Some(vec![ATTACHMENT_FINALIZER.to_owned()]);
    let before = attachment.clone();
    super::slim_for_cache(&mut attachment);
    assert_eq!(
        attachment.annotations().keys().collect::<Vec<_>>(),
        [FORCE_DETACH_ANNOTATION]
    );
    assert_eq!(attachment.metadata.labels, None);
    assert_eq!(attachment.metadata.managed_fields, None);
    assert_eq!(attachment.metadata.owner_references, None);
    assert_eq!(
        (
            attachment.metadata.uid.as_deref(),
            attachment.metadata.resource_version.as_deref(),
            attachment.metadata.generation,
            attachment.finalizers(),
        ),
        (Some("u1"), Some("7"), Some(2), before.finalizers())
    );
    assert_eq!(attachment.spec, before.spec);

    // An object with no annotation of its own keeps no empty map either.
    let mut volume = Volume::new(
        "vol",
        serde_json::from_value(json!({ "driver": "nbd", "volumeHandle": "h1" }))
            .expect("a Volume spec"),
    );
    volume
        .annotations_mut()
        .insert("argocd.argoproj.io/tracking-id".to_owned(), "x".to_owned());
    super::slim_for_cache(&mut volume);
    assert_eq!(volume.metadata.annotations, None);
}

#[test]
fn each_object_a_watch_delivers_reaches_the_other_controller_deletes_included() {
    let (touched, mut received) = super::Touched::<String>::channel();
    let spec: crate::api::VolumeAttachmentSpec =
        serde_json::from_value(json!({ "volumeName": "vol", "nodeName": NODE }))
            .expect("an attachment spec");
    let object = |name: &str| VolumeAttachment::new(name, spec.clone());
    for event in [
        watcher::Event::Init,
        watcher::Event::InitApply(object("listed")),
        watcher::Event::InitDone,
        watcher::Event::Apply(object("applied")),
        watcher::Event::Delete(object("deleted")),
    ] {
        touched.send(&event, |a: &VolumeAttachment| a.name_any());
    }
    drop(touched);
    let names: Vec<String> = futures::executor::block_on_stream(&mut received).collect();
    assert_eq!(names, ["listed", "applied", "deleted"]);
}

#[test]
fn what_a_volume_hands_its_attachments_wakes_them_as_the_whole_volume_would() {
    let mut volume: Volume = serde_json::from_value(json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "Volume",
        "metadata": {
            "name": "vol", "uid": "u1", "generation": 3, "resourceVersion": "17",
            "deletionTimestamp": "2026-12-01T10:00:00Z",
            "labels": { "team": "storage" }
        },
        "spec": { "driver": "nbd", "volumeHandle": "h1" },
        "status": {
            "phase": "InUse", "connectedNodes": ["node-a", "node-b"],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "BackendAnswers",
                "message": "the backend answers", "lastTransitionTime": "2026-12-01T10:00:00Z"
            }]
        }
    }))
    .expect("a Volume");
    let handed = super::what_attachments_follow(&volume);
    assert_eq!(
        super::concerns_attachments(&handed),
        super::concerns_attachments(&volume)
    );
    assert_eq!(ObjectRef::from_obj(&handed), ObjectRef::from_obj(&volume));
    assert_eq!(handed.metadata.uid.as_deref(), Some("u1"));
    assert!(
        handed
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.is_empty())
    );
    // Each part the wake-up rests on still tells a change.
    let before = super::concerns_attachments(&handed);
    volume
        .status
        .as_mut()
        .expect("status")
        .connected_nodes
        .pop();
    assert_ne!(
        super::concerns_attachments(&super::what_attachments_follow(&volume)),
        before
    );
}

/// A pass that may force an orphan off or release the Volume decides on the attachments the
/// apiserver listed and on those the cache holds: one that either lacks still claims its
/// connection.
#[test]
fn an_attachment_created_after_the_fresh_list_still_claims_its_connection() {
    let attachment = |name: &str, uid: &str, volume: &str, node: &str| {
        let spec = serde_json::from_value(json!({ "volumeName": volume, "nodeName": node }))
            .expect("an attachment spec");
        let mut attachment = VolumeAttachment::new(name, spec);
        attachment.metadata.uid = Some(uid.to_owned());
        attachment
    };
    let names = ["vol".to_owned()].into();
    let listed = [
        attachment("listed", "u1", "vol", "node-a"),
        attachment("other", "u2", "other-vol", "node-c"),
    ];
    let cached = vec![
        Arc::new(attachment("listed", "u1", "vol", "node-a")),
        Arc::new(attachment("created-after", "u3", "vol", "node-b")),
    ];
    let nodes = |claiming: Vec<Arc<VolumeAttachment>>| -> Vec<String> {
        claiming.iter().map(|a| a.spec.node_name.clone()).collect()
    };
    assert_eq!(
        nodes(super::volume::claiming(
            Some(&listed),
            cached.clone(),
            &names
        )),
        ["node-a", "node-b"],
        "each attachment once, the listed one from the list, the later one from the cache"
    );
    assert_eq!(
        nodes(super::volume::claiming(None, cached, &names)),
        ["node-a", "node-b"]
    );
    assert!(super::volume::claiming(Some(&[]), Vec::new(), &names).is_empty());
}

/// A deleted Volume is released only on the apiserver's word that no attachment names it: an
/// attachment created a moment ago, which the attachment cache has not seen yet, holds it. Where
/// the apiserver cannot select attachments by `spec.volumeName` (before Kubernetes 1.31), every
/// attachment is listed instead.
#[tokio::test]
async fn a_deleted_volume_is_released_on_the_apiservers_list_not_on_a_lagging_cache() {
    for refused in [false, true] {
        let harness = Harness::new();
        if refused {
            harness.api.refuse_field_selectors();
        }
        let reconcile_volume = || async {
            let now = harness.api.get::<Volume>("vol");
            if let Some(now) = now {
                super::volume::reconcile(Arc::new(now), harness.context.clone())
                    .await
                    .expect("the Volume's reconcile");
            }
            std::mem::take(&mut *harness.log.lock().expect("the log"))
        };
        reconcile_volume().await;
        // Created in the apiserver; the attachment cache does not have it yet.
        let spec = serde_json::from_value(json!({ "volumeName": "vol", "nodeName": NODE }))
            .expect("an attachment spec");
        harness.api.create(&VolumeAttachment::new("va", spec));
        harness.api.delete::<Volume>("vol");
        let held = reconcile_volume().await;
        let listed: &[&str] = if refused {
            &[
                "list volumeattachments spec.volumeName=vol",
                "  refused: field selector",
                "list volumeattachments",
            ]
        } else {
            &["list volumeattachments spec.volumeName=vol"]
        };
        // Decided on the cache: it would release. So read again, and list its aliases and its
        // attachments on the volume's turn.
        let aliases: &[&str] = if refused {
            &[
                "list volumes metadata.name=vol",
                "list volumes spec.volumeHandle=h1",
                "  refused: field selector",
                "list volumes",
            ]
        } else {
            &[
                "list volumes metadata.name=vol",
                "list volumes spec.volumeHandle=h1",
            ]
        };
        let expected: Vec<&str> = ["driver probe h1", "get volumes/vol"]
            .into_iter()
            .chain(aliases.iter().copied())
            .chain(["driver probe h1"])
            .chain(listed.iter().copied())
            .chain([
                "write volumes/vol/status: phase=Available attached=false",
                "event WaitingForAttachments",
            ])
            .collect();
        assert_eq!(held, expected, "refused: {refused}");
        assert!(
            harness.api.get::<Volume>("vol").is_some(),
            "released while va names it"
        );
        // The attachment goes: now the apiserver's list is empty, and the Volume is released.
        harness.api.delete::<VolumeAttachment>("va");
        let released = reconcile_volume().await;
        // Refused once, the field selectors are not tried again.
        let (aliases, listed) = if refused {
            ("list volumes", "list volumeattachments")
        } else {
            (
                "list volumes spec.volumeHandle=h1",
                "list volumeattachments spec.volumeName=vol",
            )
        };
        assert_eq!(
            released,
            [
                "driver probe h1",
                "get volumes/vol",
                "list volumes metadata.name=vol",
                aliases,
                "driver probe h1",
                listed,
                r#"write volumes/vol: finalizers []"#,
            ],
            "refused: {refused}"
        );
        assert!(harness.api.get::<Volume>("vol").is_none(), "still held");
    }
}

/// Where the apiserver cannot select attachments by `spec.volumeName`, every attachment is
/// listed in pages: one that names the deleted Volume on a later page holds it too.
#[tokio::test]
async fn the_full_list_that_stands_in_for_a_field_selector_is_read_to_its_last_page() {
    let harness = Harness::new();
    harness.api.refuse_field_selectors();
    let attachment = |name: &str, volume: &str| {
        let spec = serde_json::from_value(json!({ "volumeName": volume, "nodeName": NODE }))
            .expect("an attachment spec");
        VolumeAttachment::new(name, spec)
    };
    for i in 0..1_200 {
        harness
            .api
            .create(&attachment(&format!("a{i:04}"), "other"));
    }
    // Listed last, on the third page.
    harness.api.create(&attachment("zz", "vol"));
    harness.api.delete::<Volume>("vol");
    let deleted = harness.api.get::<Volume>("vol").expect("held, deleting");
    super::volume::reconcile(Arc::new(deleted), harness.context.clone())
        .await
        .expect("the Volume's reconcile");
    let log = std::mem::take(&mut *harness.log.lock().expect("the log"));
    for page in [
        "list volumeattachments",
        "list volumeattachments continue=500",
        "list volumeattachments continue=1000",
    ] {
        assert!(
            log.iter().any(|entry| entry == page),
            "no {page:?} in {log:#?}"
        );
    }
    assert!(
        harness.api.get::<Volume>("vol").is_some(),
        "released while zz names it: {log:#?}"
    );
}

/// A deleted attachment hands its connection over only to an attachment that names the same
/// backend volume when read from the apiserver: one created again under the sibling's name since
/// the cache showed it, attached to another backend volume, does not take this one's connection.
/// (An attach of unknown outcome records no binding: the connection is the target's.)
#[tokio::test]
async fn a_connection_is_handed_over_only_to_an_attachment_of_the_same_backend_volume() {
    let mut harness = Harness::new();
    let volume_uid = harness
        .api
        .get::<Volume>("vol")
        .expect("the Volume")
        .uid()
        .expect("a uid");
    let bound = |handle: &str| Binding {
        driver: "scripted".into(),
        volume_handle: handle.into(),
        volume_uid: volume_uid.clone(),
    };
    // va: an attach of unknown outcome that landed, then deleted; it recorded no binding.
    harness.create("va", &[]);
    let mut va = harness.api.get::<VolumeAttachment>("va").expect("va");
    va.metadata.finalizers = Some(vec![ATTACHMENT_FINALIZER.to_owned()]);
    va.status = Some(VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Pending),
        ..Default::default()
    });
    harness.api.replace(&va);
    harness.driver.connect("h1", NODE);
    harness.api.delete::<VolumeAttachment>("va");
    harness.catch_up("va");
    // vb, as the cache shows it: attached to h1 on the same node.
    harness.create("vb", &[]);
    let mut vb = harness.api.get::<VolumeAttachment>("vb").expect("vb");
    vb.metadata.finalizers = Some(vec![ATTACHMENT_FINALIZER.to_owned()]);
    vb.status = Some(VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Attached),
        attached: true,
        bound_to: Some(bound("h1")),
        ..Default::default()
    });
    harness.api.replace(&vb);
    harness.catch_up("vb");
    // At the apiserver, vb now stands for another backend volume.
    vb.status.as_mut().expect("a status").bound_to = Some(bound("h2"));
    harness.api.replace(&vb);

    let (_, log) = harness.reconcile("va").await;
    assert!(
        !log.iter().any(|entry| entry.contains("HandedOver")),
        "{log:#?}"
    );
    assert!(
        position(&log, "driver detach h1 node-a") < log.len(),
        "released without a detach: {log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE), "{log:#?}");
}

/// A deleted attachment does not cut a connection another attachment of the same (volume, node)
/// was confirmed on a moment ago, before the cache showed it (its turn had just ended): a deleted
/// attachment lists the attachments that may claim its connection from the apiserver before it
/// calls the driver, and hands the connection over.
#[tokio::test]
async fn a_deleted_attachment_hands_over_to_one_attached_a_moment_ago_that_the_cache_lacks() {
    let mut harness = Harness::new();
    // vb: attached at the apiserver, on the same connection; the cache has not seen it at all.
    attached_beside_then_deleted(&mut harness).await;

    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter()
            .any(|entry| entry == "list volumeattachments spec.volumeName=vol"),
        "{log:#?}"
    );
    handed_over(&harness, &log);
}

/// An operator that watches every attachment takes the claims of a deleted attachment's
/// connection from its cache once the cache has taken in every change up to a version read on
/// the volume's turn: no list of attachments, and the sibling attached on the same connection,
/// which the cache holds, is handed the connection.
#[tokio::test]
async fn a_detach_takes_the_claims_of_its_connection_from_an_attachment_cache_that_has_caught_up() {
    let mut harness = Harness::new();
    let vb = attached_beside_then_deleted(&mut harness).await;
    harness.catch_up(&vb);
    hands_over_on_the_caches(&mut harness).await;
}

/// An attachment cache that has not taken in a change at the version read on the turn is not
/// taken for the claims: they are listed, and a sibling attached since, which only the
/// apiserver has, is handed the connection.
#[tokio::test]
async fn a_detach_lists_the_claims_of_its_connection_when_its_attachment_cache_has_not_caught_up() {
    let mut harness = Harness::new();
    // The cache has taken in every change up to now, and none of what follows.
    harness.claims_cache_reaches(harness.api.last_version());
    attached_beside_then_deleted(&mut harness).await;
    let vol = harness.api.get::<Volume>("vol").expect("the Volume");
    harness.volume_cache_reaches(&vol, 1_000);

    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter()
            .any(|entry| entry == "list volumeattachments spec.volumeName=vol"),
        "{log:#?}"
    );
    handed_over(&harness, &log);
}

/// A replica of one shard (`--selector`) takes the claims from its watch of every attachment,
/// which holds one its own cache lacks (another shard's), once that watch has caught up.
#[tokio::test]
async fn a_sharded_detach_takes_the_claims_of_its_connection_from_its_watch_of_every_attachment() {
    let mut harness = Harness::managing(Some("shard=one"));
    let vb = attached_beside_then_deleted(&mut harness).await;
    let vb = harness
        .api
        .get::<VolumeAttachment>(&vb)
        .expect("vb at the apiserver");
    harness.claim_seen(&watcher::Event::Apply(vb));
    hands_over_on_the_caches(&mut harness).await;
}

/// Both caches reach a version past every write: `va`'s detach takes the claims of its
/// connection from the cache, lists no attachment, and hands the connection over.
async fn hands_over_on_the_caches(harness: &mut Harness) {
    let vol = harness.api.get::<Volume>("vol").expect("the Volume");
    harness.volume_cache_reaches(&vol, 1_000);
    harness.claims_cache_reaches(1_000);

    let (_, log) = harness.reconcile("va").await;
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("list volumeattachments")),
        "{log:#?}"
    );
    handed_over(harness, &log);
}

/// `va` attached, then `vb` attached at the apiserver on the same connection (the cache has not
/// seen it), then `va` deleted, which the cache has seen. `vb`'s name.
async fn attached_beside_then_deleted(harness: &mut Harness) -> String {
    attached(harness, "va").await;
    let binding = harness
        .api
        .get::<VolumeAttachment>("va")
        .and_then(|va| va.status?.bound_to)
        .expect("va recorded what it attached");
    attached_at_the_apiserver(harness, "vb", binding);
    harness.api.delete::<VolumeAttachment>("va");
    harness.catch_up("va");
    "vb".to_owned()
}

/// `va` went, and the connection it shared with `vb` stayed.
fn handed_over(harness: &Harness, log: &[String]) {
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver detach")
                || entry.starts_with("driver force_detach")),
        "cut vb's connection: {log:#?}"
    );
    assert!(harness.driver.connects("h1", NODE), "{log:#?}");
    assert!(
        harness.api.get::<VolumeAttachment>("va").is_none(),
        "not released: {log:#?}"
    );
}

/// The Volume controller forces no orphan off on the cache's word about the Volume's aliases: a
/// Volume of the same backend volume that the cache has not seen yet may own it, and its
/// attachments claim their connections.
#[tokio::test]
async fn an_orphan_is_not_forced_off_when_an_alias_the_cache_lacks_owns_the_backend_volume() {
    let harness = Harness::new();
    let mut volume = harness.api.get::<Volume>("vol").expect("the Volume");
    volume.spec.orphan_policy = crate::api::OrphanPolicy::Detach;
    volume.spec.stuck_after = Some("1s".into());
    harness.api.replace(&volume);
    // An alias that owns h1 (created earlier than vol, so first), and its attachment on
    // node-b, attached; neither is in the caches.
    harness.api.create(&older_alias_of_h1("vol-owner"));
    let spec = serde_json::from_value(json!({ "volumeName": "vol-owner", "nodeName": "node-b" }))
        .expect("an attachment spec");
    harness.api.create(&VolumeAttachment::new("vb", spec));
    harness.driver.connect("h1", "node-b");

    // The first pass records the unclaimed connection; once its grace is over, the next pass
    // would force it, on what the cache says.
    reconcile_volume(&harness).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let log = reconcile_volume(&harness).await;
    assert!(
        log.iter()
            .any(|entry| entry == "list volumes spec.volumeHandle=h1"),
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver force_detach")),
        "forced off a connection vol-owner's attachment claims: {log:#?}"
    );
    assert!(harness.driver.connects("h1", "node-b"));
}

/// Another Volume of the backend volume `h1`, created before `vol`: it owns the handle.
fn older_alias_of_h1(name: &str) -> Volume {
    let spec = serde_json::from_value(json!({ "driver": "scripted", "volumeHandle": "h1" }))
        .expect("a Volume spec");
    let mut alias = Volume::new(name, spec);
    alias.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::UNIX_EPOCH,
    ));
    alias
}

/// A deleted Volume under `orphanPolicy: Detach` whose alias the cache still has, though the
/// apiserver no longer does, owns its backend volume: it is not released as that alias's
/// duplicate, with the connection no attachment claims left behind.
#[tokio::test]
async fn a_deleted_volume_is_not_released_as_the_duplicate_of_an_alias_gone_from_the_apiserver() {
    let mut harness = Harness::new();
    let mut volume = harness.api.get::<Volume>("vol").expect("the Volume");
    volume.spec.orphan_policy = crate::api::OrphanPolicy::Detach;
    volume.spec.stuck_after = Some("1s".into());
    harness.api.replace(&volume);
    // An older alias of h1, released and gone; the cache has not seen it go.
    let mut gone = older_alias_of_h1("vol-gone");
    gone.metadata.uid = Some("uid-of-vol-gone".into());
    harness.volume_seen(&watcher::Event::Apply(gone));
    harness.driver.connect("h1", "node-b");
    harness.api.delete::<Volume>("vol");

    let log = reconcile_volume(&harness).await;
    assert!(
        log.iter()
            .any(|entry| entry == "list volumes spec.volumeHandle=h1"),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|entry| entry.contains("finalizers []")),
        "released with node-b still connected: {log:#?}"
    );
    let held = harness
        .api
        .get::<Volume>("vol")
        .expect("vol is still there");
    let status = held.status.expect("a status");
    assert_eq!(
        status
            .orphans
            .iter()
            .map(|orphan| orphan.node.as_str())
            .collect::<Vec<_>>(),
        ["node-b"],
        "{log:#?}"
    );

    // Once its grace is over, the orphan is forced off, and the Volume goes when the backend
    // shows it gone.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let log = reconcile_volume(&harness).await;
    position(&log, "driver force_detach h1 node-b");
    assert!(!harness.driver.connects("h1", "node-b"), "{log:#?}");
    if harness.api.get::<Volume>("vol").is_some() {
        let log = reconcile_volume(&harness).await;
        assert!(
            log.iter().any(|entry| entry.contains("finalizers []")),
            "{log:#?}"
        );
    }
    assert!(harness.api.get::<Volume>("vol").is_none(), "still held");
}

/// A person's token on one of two attachments that claim the same connection cuts it for both:
/// once the backend confirmed the forced detach, the other one is recorded as having lost its
/// connection (conditioned on the version read), told by an Event, and attaches again. On a
/// backend that cannot be probed nothing else would tell it.
#[tokio::test]
async fn a_forced_detach_tells_another_attachment_of_the_connection_it_cut() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    let binding = harness
        .api
        .get::<VolumeAttachment>("va")
        .and_then(|va| va.status?.bound_to)
        .expect("va recorded what it attached");
    attached_at_the_apiserver(&harness, "vb", binding);
    harness.catch_up("vb");
    harness.annotate("va", FORCE_DETACH_ANNOTATION, "t1");
    let (_, log) = harness.reconcile("va").await;
    let forced = position(&log, "driver force_detach h1 node-a");
    let told = position(
        &log,
        "write volumeattachments/vb/status: phase=Pending attached=false",
    );
    assert!(forced < told, "{log:#?}");
    assert!(
        log[told..]
            .iter()
            .any(|entry| entry == "event ConnectionLost"),
        "{log:#?}"
    );
    let vb = harness.api.get::<VolumeAttachment>("vb").expect("vb");
    let status = vb.status.expect("a status");
    assert_eq!(status.phase, Some(AttachmentPhase::Pending));
    assert!(!status.attached);
    // vb attaches again on its own reconcile.
    harness.catch_up("vb");
    let (_, log) = harness.reconcile("vb").await;
    assert!(
        log.iter()
            .any(|entry| entry.starts_with("write volumeattachments/vb/status: phase=Attached")),
        "{log:#?}"
    );
}

/// The same, when the deletion itself is news to the reconcile: it started from a live cached
/// copy, and the read before its call finds the attachment deleted. The claims of the
/// connection are listed then, still on the turn, and the connection is handed over.
#[tokio::test]
async fn an_attachment_found_deleted_only_by_its_refresh_still_hands_over() {
    let mut harness = Harness::new();
    let volume_uid = harness
        .api
        .get::<Volume>("vol")
        .and_then(|v| v.uid())
        .expect("the Volume's uid");
    // va: live in the cache, not attached yet; at the apiserver, held and deleted since.
    harness.create("va", &[]);
    let mut va = harness.api.get::<VolumeAttachment>("va").expect("va");
    va.metadata.finalizers = Some(vec![ATTACHMENT_FINALIZER.to_owned()]);
    harness.api.replace(&va);
    harness.api.delete::<VolumeAttachment>("va");
    // vb: attached on the same connection at the apiserver; the cache has not seen it.
    attached_at_the_apiserver(
        &harness,
        "vb",
        Binding {
            driver: "scripted".into(),
            volume_handle: "h1".into(),
            volume_uid,
        },
    );
    harness.driver.connect("h1", NODE);

    let (_, log) = harness.reconcile("va").await;
    assert!(
        !log.iter()
            .any(|entry| entry.starts_with("driver detach")
                || entry.starts_with("driver force_detach")),
        "cut vb's connection: {log:#?}"
    );
    assert!(harness.driver.connects("h1", NODE), "{log:#?}");
    assert!(
        harness.api.get::<VolumeAttachment>("va").is_none(),
        "not released: {log:#?}"
    );
}

/// On a backend that cannot be probed, nothing but the records says where a single-attach
/// volume is connected, and a plugin need not refuse a second node (this one does not): an
/// attach to another node waits for the first node's claim, which the apiserver lists on the
/// turn though the cache has not seen it, until that claim's detach is confirmed.
#[tokio::test(start_paused = true)]
async fn where_the_backend_cannot_be_probed_another_nodes_claim_the_cache_lacks_blocks_an_attach() {
    let mut harness = Harness::new();
    harness.driver.cannot_probe();
    let binding = binding_of_vol(&harness);
    // va, on node-b, attached as its call confirmed: at the apiserver only.
    attached_at_the_apiserver_on(&harness, "va", "node-b", binding);
    harness.driver.connect("h1", "node-b");

    harness.create("vb", &[]);
    let (action, log) = harness.reconcile("vb").await;
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver attach")),
        "{log:#?}"
    );
    assert!(
        position(&log, "list volumeattachments spec.volumeName=vol")
            < position(&log, "write volumeattachments/vb/status: phase=Pending"),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|entry| entry == "event ClaimedByAnotherNode"),
        "{log:#?}"
    );
    let status = harness
        .api
        .get::<VolumeAttachment>("vb")
        .and_then(|vb| vb.status)
        .expect("a status");
    let blocked = crate::api::find_condition(&status.conditions, crate::api::types::ATTACH_BLOCKED)
        .expect("AttachBlocked");
    assert_eq!(blocked.reason, "ClaimedByAnotherNode");
    assert!(
        blocked.message.contains("attachment va on node node-b"),
        "{blocked:?}"
    );
    // Looked at again soon (the first backoff), not after the resync.
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    assert!(!harness.driver.connects("h1", NODE));

    // va's detach is confirmed (its record no longer bound): vb attaches on its next look.
    let mut va = harness.api.get::<VolumeAttachment>("va").expect("va");
    va.status = Some(VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Detached),
        ..Default::default()
    });
    harness.api.replace(&va);
    harness.driver.disconnect("h1", "node-b");
    tokio::time::advance(Duration::from_secs(2)).await;
    harness.catch_up("vb");
    let (_, log) = harness.reconcile("vb").await;
    assert!(
        position(&log, "list volumeattachments spec.volumeName=vol")
            < position(&log, "driver attach h1 node-a"),
        "{log:#?}"
    );
    assert!(harness.driver.connects("h1", NODE));
}

/// Where the backend cannot be probed, an attach already intended is not called again while
/// another node's record claims the single-attach volume: an intent written while the Volume
/// was multi-attach was decided on no list. It stays Attaching (its own call may have landed)
/// and, once stuck, is forced off its own node rather than attached beside the other.
#[tokio::test(start_paused = true)]
async fn where_the_backend_cannot_be_probed_an_intent_is_not_attached_again_beside_another_nodes_claim()
 {
    let mut harness = Harness::new();
    harness.driver.cannot_probe();
    let binding = binding_of_vol(&harness);
    attached_at_the_apiserver_on(&harness, "va", "node-b", binding.clone());
    harness.driver.connect("h1", "node-b");
    // vb's attach on node-a was intended while the Volume allowed several nodes, and its call
    // failed; the Volume is single-attach now.
    harness.create("vb", &[]);
    intended_at_the_apiserver(&harness, "vb", &binding, jiff::Timestamp::now());
    harness.catch_up("vb");
    let (_, log) = harness.reconcile("vb").await;
    blocked_by_another_nodes_claim(&log);
    let status = harness
        .api
        .get::<VolumeAttachment>("vb")
        .and_then(|vb| vb.status)
        .expect("a status");
    assert_eq!(status.phase, Some(AttachmentPhase::Attaching));
    assert!(!harness.driver.connects("h1", NODE));

    // Stuck past its stuckAfter: forced off its own node, never attached beside va.
    intended_at_the_apiserver(&harness, "vb", &binding, jiff::Timestamp::UNIX_EPOCH);
    harness.catch_up("vb");
    tokio::time::advance(Duration::from_secs(11)).await;
    let (_, log) = harness.reconcile("vb").await;
    assert!(
        log.iter()
            .any(|entry| entry == "driver force_detach h1 node-a"),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver attach")),
        "{log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE));
    assert!(harness.driver.connects("h1", "node-b"));
}

/// The same blocked intent, stuck, is not forced off its node while another attachment of that
/// node holds the connection: the force would cut that attachment's client.
#[tokio::test(start_paused = true)]
async fn a_stuck_intent_blocked_by_the_records_does_not_cut_its_nodes_attached_connection() {
    let mut harness = Harness::new();
    harness.driver.cannot_probe();
    let binding = binding_of_vol(&harness);
    attached_at_the_apiserver_on(&harness, "va", "node-b", binding.clone());
    harness.driver.connect("h1", "node-b");
    attached_at_the_apiserver_on(&harness, "vc", NODE, binding.clone());
    harness.driver.connect("h1", NODE);
    harness.create("vb", &[]);
    intended_at_the_apiserver(&harness, "vb", &binding, jiff::Timestamp::UNIX_EPOCH);
    harness.catch_up("vb");
    let (_, log) = harness.reconcile("vb").await;
    blocked_by_another_nodes_claim(&log);
    // Not only no attach: no driver call at all, and the node's connection stays.
    assert!(
        !log.iter().any(|entry| entry.starts_with("driver ")),
        "{log:#?}"
    );
    assert!(harness.driver.connects("h1", NODE));
}

/// A call whose caller gave up may still be carried out by a plugin that does not stop with it.
/// Nothing else is asked of or done to that volume until it cannot: an attach that timed out and
/// lands 5 s later is undone by the detach after the wait, where a detach at once would have
/// been confirmed before it landed, and released a connection made after it.
#[tokio::test(start_paused = true)]
async fn after_a_call_of_unknown_outcome_nothing_acts_on_its_volume_until_it_can_no_longer_land() {
    let mut harness = Harness::new();
    harness.driver.cannot_probe();
    harness.driver.lands_late_within(Duration::from_secs(15));
    harness.create("va", &[]);
    harness.driver.fail_next(
        "attach",
        DriverError::Timeout {
            operation: "attach",
            deadline: Duration::from_secs(15),
        },
    );
    let (_, log) = harness.reconcile("va").await;
    assert!(
        log.iter().any(|e| e == "driver attach h1 node-a"),
        "{log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE));

    // Deleted a second later, past its backoff: it waits for the call that may still land.
    harness.api.delete::<VolumeAttachment>("va");
    tokio::time::advance(Duration::from_secs(1)).await;
    harness.catch_up("va");
    let (action, log) = harness.reconcile("va").await;
    assert!(!log.iter().any(|e| e.starts_with("driver")), "{log:#?}");
    assert!(
        !log.iter()
            .any(|e| e.starts_with("write volumeattachments/va")),
        "{log:#?}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(14)));

    // The attach lands late, within the plugin's time.
    tokio::time::advance(Duration::from_secs(4)).await;
    harness.driver.connect("h1", NODE);
    tokio::time::advance(Duration::from_secs(11)).await;
    let (_, log) = harness.reconcile("va").await;
    assert!(
        position(&log, "driver detach h1 node-a")
            < position(&log, "write volumeattachments/va: finalizers []"),
        "{log:#?}"
    );
    assert!(!harness.driver.connects("h1", NODE));
}

/// `vol` under `orphanPolicy: Detach` with a grace of 1 s, connected to `nodes` with no
/// attachment, its orphans recorded by a first reconcile and their grace over.
async fn orphans_past_their_grace(harness: &Harness, nodes: &[&str]) {
    let mut volume = harness.api.get::<Volume>("vol").expect("the Volume");
    volume.spec.orphan_policy = crate::api::OrphanPolicy::Detach;
    volume.spec.stuck_after = Some("1s".into());
    harness.api.replace(&volume);
    for node in nodes {
        harness.driver.connect("h1", node);
    }
    reconcile_volume(harness).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

/// The Volume controller's reconcile of `vol` as the apiserver has it; its log.
async fn reconcile_volume(harness: &Harness) -> Vec<String> {
    let now = harness.api.get::<Volume>("vol").expect("the Volume");
    super::volume::reconcile(Arc::new(now), harness.context.clone())
        .await
        .expect("the Volume's reconcile");
    std::mem::take(&mut *harness.log.lock().expect("the log"))
}

/// A force rests on the Volume as read before the turn. A person who sets `orphanPolicy: Report`
/// while the pass waits for the backend's answer is not overruled: the Volume's version is read
/// again before the call, and the pass decides again on what changed.
#[tokio::test]
async fn an_orphan_is_not_forced_off_on_a_policy_changed_since_the_volume_was_read() {
    let harness = Harness::new();
    orphans_past_their_grace(&harness, &["node-b"]).await;
    // The pass on the cache probes first; the pass on the apiserver's Volume probes next.
    let (api, changed) = (harness.api.clone(), Arc::new(Mutex::new(false)));
    let seen = changed.clone();
    harness.driver.meanwhile("probe", || {});
    harness.driver.meanwhile("probe", move || {
        let mut volume = api.get::<Volume>("vol").expect("the Volume");
        volume.spec.orphan_policy = crate::api::OrphanPolicy::Report;
        api.replace(&volume);
        *seen.lock().expect("the flag") = true;
    });
    let log = reconcile_volume(&harness).await;
    assert!(*changed.lock().expect("the flag"), "{log:#?}");
    assert!(
        !log.iter().any(|e| e.starts_with("driver force_detach")),
        "forced under a policy changed to Report: {log:#?}"
    );
    // Stopped by the Volume read again after the probe, not by a refused status write.
    let second_probe = log
        .iter()
        .enumerate()
        .filter(|(_, e)| *e == "driver probe h1")
        .nth(1)
        .map(|(i, _)| i)
        .expect("two probes");
    assert!(
        log[second_probe..].iter().any(|e| e == "get volumes/vol"),
        "{log:#?}"
    );
    assert!(!log.iter().any(|e| e.contains("refused")), "{log:#?}");
    assert!(harness.driver.connects("h1", "node-b"));
}

/// After a forced detach of unknown outcome, the pass forces no other orphan of the volume: the
/// call may still land, and nothing acts on the volume until it can no longer.
#[tokio::test]
async fn after_an_orphan_force_of_unknown_outcome_no_other_orphan_is_forced_in_that_pass() {
    let harness = Harness::new();
    orphans_past_their_grace(&harness, &["node-b", "node-c"]).await;
    harness.driver.lands_late_within(Duration::from_secs(15));
    harness.driver.fail_next(
        "force_detach",
        DriverError::Timeout {
            operation: "force_detach",
            deadline: Duration::from_secs(15),
        },
    );
    let log = reconcile_volume(&harness).await;
    let forced: Vec<&String> = log
        .iter()
        .filter(|e| e.starts_with("driver force_detach"))
        .collect();
    assert_eq!(forced, ["driver force_detach h1 node-b"], "{log:#?}");
    // The next reconcile neither probes nor forces while the call may still land.
    let log = reconcile_volume(&harness).await;
    assert!(!log.iter().any(|e| e.starts_with("driver")), "{log:#?}");
}

/// The Volume controller's reconcile of `vol`, as the apiserver has it; what it asked to be
/// woken after.
async fn reconcile_volume_for_action(harness: &Harness) -> Action {
    let now = harness.api.get::<Volume>("vol").expect("the Volume");
    super::volume::reconcile(Arc::new(now), harness.context.clone())
        .await
        .expect("the Volume's reconcile")
}

/// A force of an orphan that keeps failing is retried with a growing backoff, not every second,
/// and a reconcile woken before it is due (by its own status write, say) forces nothing.
#[tokio::test]
async fn a_failing_orphan_force_backs_off_further_each_time() {
    let harness = Harness::new();
    orphans_past_their_grace(&harness, &["node-b"]).await;
    let mut delays = Vec::new();
    for _ in 0..3 {
        harness
            .driver
            .fail_next("force_detach", DriverError::Unreachable("down".into()));
        let action = reconcile_volume_for_action(&harness).await;
        delays.push(action.clone());
        harness.log.lock().expect("the log").clear();
        let early = reconcile_volume_for_action(&harness).await;
        let log = std::mem::take(&mut *harness.log.lock().expect("the log"));
        assert!(
            !log.iter().any(|e| e.starts_with("driver force_detach")),
            "forced again before the backoff was due: {log:#?}"
        );
        assert!(early != Action::await_change(), "{early:?}");
        tokio::time::sleep(action_delay(&action)).await;
    }
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s))),
    );
}

/// The delay of a requeue.
fn action_delay(action: &Action) -> Duration {
    [1, 2, 4, 8]
        .map(Duration::from_secs)
        .into_iter()
        .find(|d| *action == Action::requeue(*d))
        .unwrap_or_else(|| panic!("a requeue of whole seconds: {action:?}"))
}

/// A safe detach makes two calls. When the second one's outcome is unknown, the wait for it to
/// land runs from when it was sent, not from the first call, however long that one took.
#[tokio::test(start_paused = true)]
async fn the_wait_after_a_detach_of_unknown_outcome_runs_from_its_own_send() {
    let mut harness = Harness::new();
    attached(&mut harness, "va").await;
    harness.driver.lands_late_within(Duration::from_secs(15));
    harness
        .driver
        .takes("terminate_connection", Duration::from_secs(10));
    harness.driver.fail_next(
        "detach",
        DriverError::Timeout {
            operation: "detach",
            deadline: Duration::from_secs(15),
        },
    );
    harness.api.delete::<VolumeAttachment>("va");
    harness.catch_up("va");
    let (_, log) = harness.reconcile("va").await;
    assert!(
        position(&log, "driver terminate_connection h1 node-a")
            < position(&log, "driver detach h1 node-a"),
        "{log:#?}"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    harness.catch_up("va");
    let (action, log) = harness.reconcile("va").await;
    assert!(!log.iter().any(|e| e.starts_with("driver")), "{log:#?}");
    assert_eq!(action, Action::requeue(Duration::from_secs(14)));
}

/// A force the backend answers OK but does not show done (the connection made again at once, or
/// a backend that acknowledges and keeps it) is looked at again with a growing backoff, not
/// every second.
#[tokio::test]
async fn an_orphan_force_the_backend_does_not_confirm_backs_off_further_each_time() {
    let harness = Harness::new();
    orphans_past_their_grace(&harness, &["node-b"]).await;
    let mut delays = Vec::new();
    for _ in 0..3 {
        // The pass on the cache probes, the pass on the apiserver's Volume probes, the force,
        // then the probe that should confirm it: someone connects node-b again before that one.
        let driver = harness.driver.clone();
        harness.driver.meanwhile("probe", || {});
        harness.driver.meanwhile("probe", || {});
        harness
            .driver
            .meanwhile("probe", move || driver.connect("h1", "node-b"));
        let action = reconcile_volume_for_action(&harness).await;
        tokio::time::sleep(action_delay(&action)).await;
        delays.push(action);
    }
    let log = harness.log.lock().expect("the log").clone();
    assert_eq!(
        log.iter()
            .filter(|e| e.starts_with("driver force_detach"))
            .count(),
        3,
        "{log:#?}"
    );
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s))),
        "{log:#?}"
    );
}
