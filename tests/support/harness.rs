//! What every end-to-end scenario has, whatever its backend: the real operator binary managing
//! one shard, the objects the test creates in that shard, the ways a test waits for and inspects
//! them (their status, their Events, the operator's own metrics), and one clean-up path. The
//! scenarios of a backend ([`super::scenario::Scenario`] for nbd, the CSI one of
//! `tests/operator_csi.rs`) add their backend and dereference to this.
//!
//! On drop the operator is killed before the objects are deleted, so that it cannot put a
//! finalizer back.

pub use super::cluster::{POLL, WAIT};
use super::cluster::{TestObjects, admin_client};
use super::operator::{Operator, SHARD_LABEL};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Resource};
use safe_detach::api::{AttachmentPhase, FORCE_DETACH_ANNOTATION, Volume, VolumeAttachment};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::fmt::Debug;
use std::time::Duration;
use tokio::time::Instant;

/// The field manager of the objects the tests write.
pub const TEST_MANAGER: &str = "safe-detach-e2e";
/// The stuck clock of every Volume that sets none (the CRD's minimum), as every scenario
/// configures its operator.
pub const STUCK_AFTER: Duration = Duration::from_secs(5);
/// How often the operator looks again at converged objects, as every scenario configures it.
pub const RESYNC: Duration = Duration::from_secs(2);
/// Where the replicas of a leader election keep their Lease (the operator's default).
pub const LEASE_NAMESPACE: &str = "safe-detach";

/// The operator of one shard, and the objects of that shard.
pub struct Harness {
    pub operator: Operator,
    objects: TestObjects,
    pub client: Client,
    pub volumes: Api<Volume>,
    pub attachments: Api<VolumeAttachment>,
    pub events: Api<Event>,
    pub shard: String,
    /// The objects created, for a clean-up that no operator can race (see `Drop`).
    created: Vec<(&'static str, String)>,
}

impl Harness {
    /// The harness of `operator`, which manages `shard`.
    pub async fn new(operator: Operator, shard: String) -> Self {
        let client = admin_client().await;
        Self {
            operator,
            objects: TestObjects::default(),
            volumes: Api::all(client.clone()),
            attachments: Api::all(client.clone()),
            events: Api::namespaced(client.clone(), "default"),
            client,
            shard,
            created: Vec::new(),
        }
    }

    /// Deletes `kind`/`name` with the rest at the end: a Lease, a ClusterRole or a
    /// ClusterRoleBinding.
    pub fn clean_up(&mut self, kind: &'static str, name: String) {
        assert!(
            matches!(kind, "Lease" | "ClusterRole" | "ClusterRoleBinding"),
            "no clean-up for the kind {kind}"
        );
        self.created.push((kind, name));
    }

    /// Waits until the operator has worked through more reconciles of attachments than the
    /// `before` it had earlier.
    pub async fn wait_reconciles_beyond(&self, before: f64) {
        let give_up = Instant::now() + WAIT;
        while self.attachment_reconciles().await <= before {
            assert!(
                Instant::now() < give_up,
                "the operator did not reconcile again within {WAIT:?}:\n{}",
                self.log_tail(60)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A unique VolumeAttachment name outside every shard, deleted with the harness.
    pub fn unserved_attachment_name(&mut self, prefix: &str) -> String {
        self.objects.attachment(prefix)
    }

    /// Creates (or replaces) the Volume `name` in this shard with the whole `spec`.
    pub async fn apply_volume(&self, name: &str, spec: Value) {
        let object = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "Volume",
            "metadata": { "name": name, "labels": self.labels() },
            "spec": spec,
        });
        self.volumes
            .patch(name, &apply(), &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("create Volume {name}: {e}"));
    }

    /// How many reconciles of an attachment the operator has worked through so far, by its own
    /// `safedetach_reconcile_duration_seconds` (a reconcile held back by its backoff, or queued
    /// for its turn, is not counted): reconciles of this shard's attachments. Needs an operator
    /// started with a known HTTP address.
    pub async fn attachment_reconciles(&self) -> f64 {
        super::operator::Scrape::of(self.operator.http_address())
            .await
            .map_or(0.0, |scrape| {
                scrape.sum(
                    "safedetach_reconcile_duration_seconds_count",
                    &[("kind", "VolumeAttachment")],
                )
            })
    }

    /// The labels that put an object in this harness's shard.
    pub fn labels(&self) -> Value {
        json!({ SHARD_LABEL: self.shard })
    }

    /// A unique Volume name, deleted with the scenario, for a Volume created later.
    pub fn volume_name(&mut self, prefix: &str) -> String {
        let name = self.objects.volume(prefix);
        self.created.push(("Volume", name.clone()));
        name
    }

    /// Creates a VolumeAttachment of `volume` to `node` in this scenario's shard.
    pub async fn attachment(&mut self, prefix: &str, volume: &str, node: &str) -> String {
        let name = self.attachment_name(prefix);
        self.create_attachment(&name, volume, node).await;
        name
    }

    /// A unique VolumeAttachment name, deleted with the scenario, for an attachment created
    /// later (several of them at once, for instance).
    pub fn attachment_name(&mut self, prefix: &str) -> String {
        let name = self.objects.attachment(prefix);
        self.created.push(("VolumeAttachment", name.clone()));
        name
    }

    /// Creates the VolumeAttachment `name` of `volume` to `node` in this scenario's shard.
    pub async fn create_attachment(&self, name: &str, volume: &str, node: &str) {
        let object = json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "VolumeAttachment",
            "metadata": { "name": name, "labels": self.labels() },
            "spec": { "volumeName": volume, "nodeName": node },
        });
        self.attachments
            .patch(name, &apply(), &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("create VolumeAttachment {name}: {e}"));
    }

    /// Creates an attachment and waits until the backend-confirmed `Attached` is recorded.
    pub async fn attach(
        &mut self,
        prefix: &str,
        volume: &str,
        node: &str,
    ) -> (String, VolumeAttachment) {
        let name = self.attachment(prefix, volume, node).await;
        let attached = self.wait_attached(&name).await;
        (name, attached)
    }

    pub async fn wait_attached(&self, name: &str) -> VolumeAttachment {
        self.wait_attachment(name, "Attached and confirmed", |a| {
            phase(a) == Some(AttachmentPhase::Attached) && attached(a)
        })
        .await
    }

    pub async fn get_attachment(&self, name: &str) -> Option<VolumeAttachment> {
        self.attachments
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("get VolumeAttachment {name}: {e}"))
    }

    pub async fn get_volume(&self, name: &str) -> Volume {
        self.volumes
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get Volume {name}: {e}"))
    }

    /// Waits until the attachment exists and satisfies `done`.
    pub async fn wait_attachment(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&VolumeAttachment) -> bool,
    ) -> VolumeAttachment {
        self.wait_for(&self.attachments, name, what, WAIT, |a| {
            a.is_some_and(&done)
        })
        .await
        .expect("present")
    }

    /// Waits until the Volume exists and satisfies `done`.
    pub async fn wait_volume(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&Volume) -> bool,
    ) -> Volume {
        self.wait_for(&self.volumes, name, what, WAIT, |v| v.is_some_and(&done))
            .await
            .expect("present")
    }

    /// Waits until the attachment is gone: its finalizer released by the operator.
    pub async fn wait_attachment_gone(&self, name: &str) {
        self.wait_for(
            &self.attachments,
            name,
            "gone (finalizer released)",
            WAIT,
            |a| a.is_none(),
        )
        .await;
    }

    /// Polls `name` until `done` holds for what the server returns (`None`: not found). Fails
    /// with the last object seen and the end of the operator's log.
    pub async fn wait_for<K>(
        &self,
        api: &Api<K>,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(Option<&K>) -> bool,
    ) -> Option<K>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    {
        let give_up = Instant::now() + timeout;
        loop {
            let seen = api
                .get_opt(name)
                .await
                .unwrap_or_else(|e| panic!("get {name}: {e}"));
            if done(seen.as_ref()) {
                return seen;
            }
            if Instant::now() >= give_up {
                let shown = show(seen.as_ref());
                panic!(
                    "{name}: not {what} within {timeout:?}; last seen:\n{shown}\n--- operator log (end) ---\n{}",
                    self.log_tail(80)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Deletes the attachment (its finalizer then holds it until the operator releases it).
    pub async fn delete_attachment(&self, name: &str) {
        self.attachments
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete VolumeAttachment {name}: {e}"));
    }

    /// Sets the force-detach annotation to `token`, as `kubectl annotate --overwrite` does.
    /// Returns the resourceVersion the change produced.
    pub async fn annotate(&self, name: &str, token: &str) -> String {
        self.merge_metadata(
            name,
            json!({ "annotations": { FORCE_DETACH_ANNOTATION: token } }),
        )
        .await
    }

    /// Merges `metadata` into the attachment's metadata; returns the new resourceVersion.
    pub async fn merge_metadata(&self, name: &str, metadata: Value) -> String {
        let patched = self
            .attachments
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": metadata })),
            )
            .await
            .unwrap_or_else(|e| panic!("patch VolumeAttachment {name}: {e}"));
        patched
            .metadata
            .resource_version
            .expect("a resourceVersion")
    }

    /// The Events the operator published about the object `kind`/`name`, oldest first.
    pub async fn events_about(&self, kind: &str, name: &str) -> Vec<SeenEvent> {
        events_in(&self.events, kind, name).await
    }

    /// How many times an Event of `reason` was reported about the object, counting repeats that
    /// the event recorder folded into one Event's series.
    pub async fn occurrences(&self, kind: &str, name: &str, reason: &str) -> i32 {
        self.events_about(kind, name)
            .await
            .iter()
            .filter(|e| e.reason == reason)
            .map(|e| e.count)
            .sum()
    }

    /// Waits for the `ForceDetaching` of the automatic force that resolves attachment `name`'s
    /// stuck Detaching: it says the phase was stuck, and no `StuckDetaching` Warning goes with it.
    pub async fn wait_force_of_stuck_detaching(&self, name: &str) -> SeenEvent {
        let kind = "VolumeAttachment";
        let forcing = self
            .wait_event(
                kind,
                name,
                "ForceDetaching",
                &[
                    "Detaching for longer than stuckAfter",
                    "reason StuckDetaching",
                ],
            )
            .await;
        assert_eq!(self.occurrences(kind, name, "StuckDetaching").await, 0);
        forcing
    }

    /// Waits for an Event of `reason` about the object whose note contains every one of `notes`.
    pub async fn wait_event(
        &self,
        kind: &str,
        name: &str,
        reason: &str,
        notes: &[&str],
    ) -> SeenEvent {
        let give_up = Instant::now() + WAIT;
        loop {
            let events = self.events_about(kind, name).await;
            if let Some(found) = events
                .iter()
                .find(|e| e.reason == reason && notes.iter().all(|n| e.note.contains(n)))
            {
                return found.clone();
            }
            if Instant::now() >= give_up {
                panic!(
                    "no {reason} event about {kind} {name} saying {notes:?} within {WAIT:?}; events seen:\n{}\n--- operator log (end) ---\n{}",
                    describe_events(&events),
                    self.log_tail(80)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last `lines` lines of the operator's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = strip_ansi(&self.operator.log());
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Harness {
    /// Kills the operator, then deletes the objects before stripping their finalizers: once an
    /// object is being deleted no finalizer can be added, so even an operator outside the test's
    /// control (one without a selector) cannot keep it. (`TestObjects` strips, then deletes.)
    fn drop(&mut self) {
        self.operator.kill();
        let created = std::mem::take(&mut self.created);
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            runtime.block_on(async {
                let client = admin_client().await;
                let attachments = Api::<VolumeAttachment>::all(client.clone());
                let volumes = Api::<Volume>::all(client.clone());
                let leases = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE);
                let roles = Api::<ClusterRole>::all(client.clone());
                let bindings = Api::<ClusterRoleBinding>::all(client);
                let gone = DeleteParams::default();
                for (kind, name) in created.iter().rev() {
                    match *kind {
                        "VolumeAttachment" => delete_then_strip(&attachments, name).await,
                        "Volume" => delete_then_strip(&volumes, name).await,
                        "Lease" => drop(leases.delete(name, &gone).await),
                        "ClusterRole" => drop(roles.delete(name, &gone).await),
                        "ClusterRoleBinding" => drop(bindings.delete(name, &gone).await),
                        _ => unreachable!("`clean_up` takes only the kinds above"),
                    }
                }
            });
        });
        // Whatever is left, `TestObjects` deletes after this.
        let _ = cleanup.join();
    }
}

/// Server-side apply as the tests' own field manager.
pub fn apply() -> PatchParams {
    PatchParams::apply(TEST_MANAGER).force()
}

/// What a failure message shows of an object: the metadata that matters here, and its status.
pub fn show<K: Serialize>(object: Option<&K>) -> String {
    object.map_or_else(
        || "not found".to_owned(),
        |object| {
            let value = serde_json::to_value(object).expect("serializable");
            let shown = json!({
                "metadata": {
                    "finalizers": value["metadata"]["finalizers"],
                    "deletionTimestamp": value["metadata"]["deletionTimestamp"],
                    "annotations": value["metadata"]["annotations"],
                },
                "status": value["status"],
            });
            serde_json::to_string_pretty(&shown).expect("serializable")
        },
    )
}

/// The Events in `api` about the object `kind`/`name`, oldest first.
pub async fn events_in(api: &Api<Event>, kind: &str, name: &str) -> Vec<SeenEvent> {
    let list = api
        .list(&ListParams::default().fields(&format!("regarding.name={name}")))
        .await
        .unwrap_or_else(|e| panic!("list events of {name}: {e}"));
    let mut seen: Vec<SeenEvent> = list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some(kind))
        .map(SeenEvent::from)
        .collect();
    seen.sort_by_key(|e| e.first);
    seen
}

pub fn describe_events(events: &[SeenEvent]) -> String {
    events
        .iter()
        .map(|e| format!("  {} {} (x{}): {}", e.type_, e.reason, e.count, e.note))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn phase(attachment: &VolumeAttachment) -> Option<AttachmentPhase> {
    attachment.status.as_ref()?.phase
}

pub fn attached(attachment: &VolumeAttachment) -> bool {
    attachment.status.as_ref().is_some_and(|s| s.attached)
}

async fn delete_then_strip<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let _ = api.delete(name, &DeleteParams::default()).await;
    let strip = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
    let _ = api.patch(name, &PatchParams::default(), &strip).await;
}

/// An Event as a test looks at it.
#[derive(Clone, Debug)]
pub struct SeenEvent {
    pub reason: String,
    pub type_: String,
    pub note: String,
    /// How often it was reported: 1, or the count of the series the recorder folded repeats into.
    pub count: i32,
    /// When it was first reported.
    pub first: jiff::Timestamp,
}

impl From<Event> for SeenEvent {
    fn from(event: Event) -> Self {
        Self {
            reason: event.reason.unwrap_or_default(),
            type_: event.type_.unwrap_or_default(),
            note: event.note.unwrap_or_default(),
            count: event.series.as_ref().map_or(1, |s| s.count),
            first: event
                .event_time
                .map(|t| t.0)
                .or(event.metadata.creation_timestamp.map(|t| t.0))
                .unwrap_or_default(),
        }
    }
}

/// The operator's log without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
