//! The observer: the campaign's own view of the system, taken without the operator's help. Each
//! round reads the records (one LIST of the shard's VolumeAttachments, then one of its Volumes)
//! and then the backend (`query-block-exports` on the daemon's own socket, or the CSI plugin's
//! own publish record, never through the proxy the operator goes through), in that order: the operator writes "detached" only after the backend confirmed, so an
//! export listed after a record said "detached" was listed while the record said so.
//!
//! The checks that need two rounds, or the Events, keep their state here; every finding is a
//! [`Violation`] with the rule it breaks.

use super::super::qmp;
use super::backend::BackendReader;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use safe_detach::api::{
    AttachmentPhase, ForceDetachState, VOLUME_FINALIZER, Volume, VolumeAttachment,
};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The rules the campaign checks; see docs/reliability.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// A record says detached while the backend still exports that (volume, node).
    DetachedWhileExported,
    /// A single-attach volume exported to two nodes at once.
    DoubleAttach,
    /// A token forced more than once on one object.
    TokenReplayed,
    /// An automatic force before `stuckAfter`, or on a Volume that does not allow it.
    EarlyOrUnallowedForce,
    /// Not converged within the bound once the faults stopped.
    NoConvergence,
    /// The operator panicked.
    Panic,
    /// The operator kept writing while everything was converged.
    HotLoop,
    /// A deleted Volume released (its finalizer gone) while an attachment still named it.
    ReleasedWhileNamed,
    /// A connection cut while a live attachment recorded it attached and said nothing of a
    /// detach: the operator took away a disk someone was told is there.
    CutWhileAttached,
    /// A deleted Volume under `orphanPolicy: Detach` released while the backend still connected
    /// it to a node no VolumeAttachment names: the connection was left with no record of it.
    ReleasedWithOrphan,
}

impl Rule {
    pub const ALL: [Rule; 10] = [
        Rule::DetachedWhileExported,
        Rule::ReleasedWhileNamed,
        Rule::ReleasedWithOrphan,
        Rule::CutWhileAttached,
        Rule::DoubleAttach,
        Rule::TokenReplayed,
        Rule::EarlyOrUnallowedForce,
        Rule::NoConvergence,
        Rule::Panic,
        Rule::HotLoop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::DetachedWhileExported => "detached-while-exported",
            Rule::DoubleAttach => "double-attach",
            Rule::TokenReplayed => "token-replayed",
            Rule::EarlyOrUnallowedForce => "early-or-unallowed-force",
            Rule::NoConvergence => "no-convergence",
            Rule::Panic => "panic",
            Rule::HotLoop => "hot-loop",
            Rule::ReleasedWhileNamed => "released-while-named",
            Rule::CutWhileAttached => "cut-while-attached",
            Rule::ReleasedWithOrphan => "released-with-orphan",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub rule: Rule,
    pub at: Instant,
    pub detail: String,
}

/// What happened, in order, with timestamps: operations, faults, and changes the observer saw.
#[derive(Clone)]
pub struct History {
    start: Instant,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl History {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            lines: Arc::default(),
        }
    }

    pub fn note(&self, line: impl Into<String>) {
        self.lines
            .lock()
            .expect("history")
            .push((Instant::now(), line.into()));
    }

    pub fn offset(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    /// The last `before` lines up to `at` and the `after` lines following it.
    pub fn around(&self, at: Instant, before: usize, after: usize) -> String {
        let lines = self.lines.lock().expect("history");
        let split = lines.partition_point(|(t, _)| *t <= at);
        let from = split.saturating_sub(before);
        let to = (split + after).min(lines.len());
        lines[from..to]
            .iter()
            .map(|(t, line)| {
                let mark = if *t <= at { ' ' } else { '+' };
                format!("{mark}{:8.3}s {line}", self.offset(*t))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One attachment as a round saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub volume: String,
    pub node: String,
    pub phase: Option<AttachmentPhase>,
    pub attached: bool,
    pub deleting: bool,
    pub phase_since: Option<Timestamp>,
    pub token: Option<String>,
    /// Whether it records a forced detach under way (`status.forceDetach.state: InProgress`).
    pub forcing: bool,
    /// The uid of the Volume it recorded attaching (`status.boundTo`).
    pub bound_uid: Option<String>,
    /// Whether it records a failed attach (`Ready=False, AttachFailed`): a later try may have
    /// been decided without a new write.
    pub attach_failed: bool,
}

impl Record {
    pub fn of(attachment: &VolumeAttachment) -> Self {
        let status = attachment.status.as_ref();
        Self {
            name: attachment.name_any(),
            uid: attachment.uid().unwrap_or_default(),
            resource_version: attachment.resource_version().unwrap_or_default(),
            volume: attachment.spec.volume_name.clone(),
            node: attachment.spec.node_name.clone(),
            phase: status.and_then(|s| s.phase),
            attached: status.is_some_and(|s| s.attached),
            deleting: attachment.metadata.deletion_timestamp.is_some(),
            phase_since: status.and_then(|s| s.phase_since.as_ref()).map(|t| t.0),
            token: status
                .and_then(|s| s.force_detach.as_ref())
                .and_then(|f| f.token.clone()),
            forcing: status
                .and_then(|s| s.force_detach.as_ref())
                .is_some_and(|f| f.state == ForceDetachState::InProgress),
            bound_uid: status
                .and_then(|s| s.bound_to.as_ref())
                .map(|b| b.volume_uid.clone()),
            attach_failed: status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.reason == safe_detach::api::reasons::ATTACH_FAILED)
            }),
        }
    }

    /// Whether the record says the volume is not connected to the node: `Detached`; `Failed`
    /// (never connected, cannot reach its backend); or `attached: false` outside an intent phase
    /// once it had been true (`ever_attached`). `Attaching` and `Detaching` claim the connection,
    /// and so does an attachment not attached yet (`Pending`, or no status): it may be a moment
    /// from its intent, or the one a deleted attachment of the same (volume, node) handed its
    /// connection over to (design.md, "Hand-over").
    fn denies(&self, ever_attached: bool) -> bool {
        match self.phase {
            Some(AttachmentPhase::Detached | AttachmentPhase::Failed) => true,
            Some(AttachmentPhase::Attaching | AttachmentPhase::Detaching) | None => false,
            Some(AttachmentPhase::Attached | AttachmentPhase::Pending) => {
                !self.attached && ever_attached
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} uid {} rv {} {}@{} phase {:?} attached {} deleting {} token {:?}",
            self.name,
            short(&self.uid),
            self.resource_version,
            self.volume,
            self.node,
            self.phase,
            self.attached,
            self.deleting,
            self.token
        )
    }
}

fn short(uid: &str) -> &str {
    &uid[..uid.len().min(8)]
}

/// A create the workload sent: its window decides whether an attachment the observer could not
/// yet list may account for an export.
#[derive(Clone, Debug)]
pub struct CreateWindow {
    pub volume: String,
    pub node: String,
    pub sent: Instant,
    pub answered: Option<Instant>,
    /// The uid of the attachment it created, once answered OK.
    pub uid: Option<String>,
}

/// A DELETE of a Volume the workload sent, and how the apiserver answered it.
#[derive(Clone, Debug)]
pub struct VolumeDelete {
    /// The Volume's uid, from the answer.
    pub uid: String,
    pub sent: Instant,
    /// Answered by the removal of the Volume (a `Status`), not by the Volume marked deleting:
    /// the DELETE found no finalizer when it read it.
    pub removed_at_once: bool,
}

/// One observation round.
#[derive(Clone, Debug)]
pub struct Round {
    pub listed_at: Instant,
    pub backend_at: Instant,
    pub records: Vec<Record>,
    /// The shard's Volumes, listed after the records; `None` when the list failed.
    pub volumes: Option<Vec<VolumeId>>,
    /// When the list of Volumes was answered.
    pub volumes_at: Instant,
    /// The backend's exports as (backend volume handle, node); `None` when it could not be asked.
    pub exports: Option<BTreeSet<(String, String)>>,
    /// Export ids no Volume of the schedule accounts for.
    pub stray: Vec<String>,
    /// How many times the backend had begun or ended a restart when it was read: a connection
    /// the backend lost by restarting was not cut by the operator.
    pub backend_epoch: usize,
}

/// A possible "detached while exported", waiting for the next round to rule out a record that
/// moved on in between.
/// A connection gone from the backend while a live attachment recorded it attached, unchanged
/// since the round before it went: a cut if the record is still unchanged a round later (a
/// forced detach of that attachment records its intent before its call, so it shows by then).
#[derive(Clone, Debug)]
struct Cut {
    pair: (String, String),
    /// The record, as it was when the connection was last seen and first missed.
    record: Record,
    /// When the connection was first missed.
    at: Instant,
    /// The backend's restart count when the connection was last seen.
    epoch: usize,
    /// The other live records of the pair when the connection was last seen, by uid, with the
    /// force-detach token each recorded: a person's token on one of them cuts the connection
    /// they share (design.md, "Hand-over").
    others: BTreeMap<String, Option<String>>,
}

struct Candidate {
    pair: (String, String),
    round: Round,
    /// Live, not-deleting records that deny the connection: they must be unchanged next round.
    live: Vec<(String, String)>,
}

/// A Volume as a round lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeId {
    pub name: String,
    pub uid: String,
    /// Whether it carries the operator's finalizer: only then can the operator release it. One
    /// deleted before the operator added it is gone at once, whatever names it, provided no
    /// attachment had claimed a connection to it.
    pub held: bool,
    /// Whether it carries a deletion timestamp.
    pub deleting: bool,
}

/// A Volume seen gone while attachments named it a round before: a violation if one of them is
/// still there a round later, since it then existed all through the Volume's release.
struct Release {
    volume: String,
    uid: String,
    /// The uids of the attachments that named the Volume while it was last seen.
    naming: Vec<String>,
    /// By when the Volume was certainly deleted: the end of the first round that listed it
    /// deleting, if one did.
    deleted_by: Option<Instant>,
    /// Whether it was seen holding the operator's finalizer.
    held: bool,
    /// When a list first showed it held, if one did.
    held_since: Option<Instant>,
    /// Rounds left in which an attachment that stays may still show a claim on it.
    rounds_left: usize,
    at: Instant,
}

/// The workload's latest create of a Volume name.
#[derive(Clone, Copy, Debug)]
pub struct VolumeCreate {
    /// When it was sent.
    pub sent: Instant,
    /// The `resourceVersion` of the created object, once answered: the apiserver's own order of
    /// the create against every other write.
    pub version: Option<u64>,
}

/// An export as the observer first saw it, in a run of rounds that saw it without a break.
#[derive(Clone, Copy, Debug)]
struct Exported {
    /// The backend read of that first round.
    since: Instant,
    /// The lowest `resourceVersion` of the records in that round that claimed it with an
    /// intent to attach and no failed attempt recorded: the version its decision was written
    /// at, if no other decision followed it.
    intent: Option<u64>,
}

/// A connection the workload asked the backend for behind the operator's back
/// ([`super::plan::Op::Orphan`]).
#[derive(Clone, Debug)]
pub struct OrphanMade {
    pub handle: String,
    /// When it was asked for: once the monitor was the workload's, right before the export's
    /// command (nothing else reaches the daemon in between, so the export is new after this);
    /// for a make of unknown outcome, when the workload began to ask.
    pub sent: Instant,
    /// `Some(true)`: made; `Some(false)`: refused (nothing made); `None`: no answer, so it may
    /// have been made, then or later.
    pub made: Option<bool>,
}

/// The connections the workload makes behind the operator's back, and the Volumes that must
/// force theirs off before they go.
#[derive(Clone, Debug, Default)]
pub struct Orphans {
    /// The names of the Volumes under `orphanPolicy: Detach`.
    pub forced_first: BTreeSet<String>,
    /// Every such connection asked for, in order.
    pub made: Arc<Mutex<Vec<OrphanMade>>>,
}

impl Orphans {
    /// Whether a connection of `handle` may have been made in `(after, until]`: one the daemon
    /// answered made then, or one of unknown outcome asked for before `until` (its command may
    /// have been carried out any time after).
    pub fn made_between(&self, handle: &str, after: Instant, until: Instant) -> bool {
        self.made.lock().expect("orphans made").iter().any(|m| {
            m.handle == handle
                && m.sent <= until
                && match m.made {
                    Some(true) => m.sent > after,
                    Some(false) => false,
                    None => true,
                }
        })
    }
}

/// The daemon's own record of the forces of orphans: every `block-export-del` of an export to
/// [`super::plan::ORPHAN_NODE`] the operator sent (only an orphan's force sends one), by handle
/// and time. None may come under `orphanPolicy: Report` (`detach_policy` false for the handle);
/// under `Detach` none before `grace` has passed since the orphan was made. That is judged for
/// the first orphan of each handle only, when the daemon answered it made: the operator keeps
/// the time it first saw an orphan of a (volume, node) for as long as no probe of its shows that
/// connection gone, so a later orphan that replaced one it never saw go (a daemon restart in
/// between, a force that landed unconfirmed) may rightly be forced on the older one's time. A
/// second of slack: the operator's record has whole seconds. Returns what broke the rule.
pub fn judge_orphan_forces(
    detach_policy: impl Fn(&str) -> Option<bool>,
    made: &[OrphanMade],
    forces: &[(String, Instant)],
    grace: Duration,
) -> Vec<String> {
    let node = super::plan::ORPHAN_NODE;
    let mut found = Vec::new();
    for (handle, _) in forces {
        if detach_policy(handle) == Some(false) {
            found.push(format!(
                "{handle} forced off {node}, though its Volume is under orphanPolicy Report"
            ));
        }
    }
    let handles: BTreeSet<&String> = made.iter().map(|m| &m.handle).collect();
    for handle in handles {
        let Some(first) = made
            .iter()
            .find(|m| &m.handle == handle && m.made != Some(false))
        else {
            continue;
        };
        if first.made != Some(true) || detach_policy(handle) != Some(true) {
            continue;
        }
        let Some((_, at)) = forces
            .iter()
            .find(|(h, at)| h == handle && *at > first.sent)
        else {
            continue;
        };
        let after = at.duration_since(first.sent);
        if after + Duration::from_secs(1) < grace {
            found.push(format!(
                "{handle} forced off {node} {:.3}s after the orphan was made (stuckAfter {grace:?})",
                after.as_secs_f64()
            ));
        }
    }
    found
}

/// Rounds a release stays under watch for a claim on the released Volume to show.
const RELEASE_WATCH_ROUNDS: usize = 5;

/// The observer's state across rounds.
pub struct Observer {
    /// Volume name → handle, for reading export ids.
    handles: BTreeMap<String, String>,
    /// The single-attach Volumes, by name: a backend volume that one of them names while it
    /// exists is exclusive, whichever Volume an attachment came through.
    single: BTreeSet<String>,
    /// Every attachment ever seen, by uid: its spec and every distinct record seen.
    pub seen: BTreeMap<String, Vec<(Timestamp, Record)>>,
    previous: Vec<Record>,
    candidates: Vec<Candidate>,
    /// The last round whose Volume list was read: its Volumes, and its records (listed before).
    last_volumes: Option<(Vec<VolumeId>, Vec<Record>)>,
    releases: Vec<Release>,
    /// Volume uid → the end of the first round that listed it deleting.
    deleted_by: BTreeMap<String, Instant>,
    pub creates: Arc<Mutex<Vec<CreateWindow>>>,
    /// Volume name → its latest create.
    pub volume_creates: Arc<Mutex<BTreeMap<String, VolumeCreate>>>,
    /// The workload's DELETEs of Volumes, with the apiserver's answers.
    volume_deletes: Arc<Mutex<Vec<VolumeDelete>>>,
    /// Volume uid → when a list first showed it held.
    held_since: BTreeMap<String, Instant>,
    /// Releases judged the apiserver's race ([`Observer::removed_by_the_apiservers_race`]).
    pub apiserver_races: usize,
    /// Whether the schedule's Volumes carry the finalizer from their creation (the admission
    /// policy): then no DELETE can find one unheld.
    hold_at_create: bool,
    /// Each export as first seen in the run of rounds that has seen it without a break (an
    /// unanswered read breaks every run: the daemon may have restarted).
    exported_since: BTreeMap<(String, String), Exported>,
    pub violations: Vec<Violation>,
    pub rounds: usize,
    history: History,
    last_exports: Option<BTreeSet<(String, String)>>,
    /// The backend's restart count at the last round that read it.
    last_epoch: usize,
    cuts: Vec<Cut>,
    /// Every version with an intent to attach (`Attaching`, no failed attempt recorded) that a
    /// watch of the shard's attachments delivered: a list each round can miss an intent written
    /// and followed by `Attached` between two rounds.
    pub intents: Arc<Mutex<Vec<Record>>>,
    /// Double attaches not explained by an intent seen so far, judged a round later, once a
    /// watch event that lagged the round has had time to come.
    doubles: Vec<Double>,
    /// The connections made behind the operator's back.
    pub orphans: Orphans,
    /// The last Volume list that was answered, and when.
    last_listed: Option<(Vec<VolumeId>, Instant)>,
}

/// A single-attach backend volume exported to nodes whose exports no older intent explains yet.
#[derive(Clone, Debug)]
struct Double {
    handle: String,
    /// The nodes whose exports were seen only after the single-attach Volume was created, each
    /// with the attachments of that (backend volume, node) the round listed.
    newer: Vec<(String, Vec<String>)>,
    /// Every node it was exported to.
    nodes: Vec<String>,
    /// The created Volume's `resourceVersion`.
    version: Option<u64>,
    names: Vec<String>,
    at: Instant,
}

impl Observer {
    pub fn new(
        handles: BTreeMap<String, String>,
        single: BTreeSet<String>,
        creates: Arc<Mutex<Vec<CreateWindow>>>,
        volume_creates: Arc<Mutex<BTreeMap<String, VolumeCreate>>>,
        volume_deletes: Arc<Mutex<Vec<VolumeDelete>>>,
        hold_at_create: bool,
        history: History,
    ) -> Self {
        Self {
            handles,
            single,
            seen: BTreeMap::new(),
            previous: Vec::new(),
            candidates: Vec::new(),
            last_volumes: None,
            releases: Vec::new(),
            deleted_by: BTreeMap::new(),
            creates,
            volume_creates,
            volume_deletes,
            held_since: BTreeMap::new(),
            apiserver_races: 0,
            hold_at_create,
            exported_since: BTreeMap::new(),
            violations: Vec::new(),
            rounds: 0,
            history,
            last_exports: None,
            last_epoch: 0,
            cuts: Vec::new(),
            intents: Arc::default(),
            doubles: Vec::new(),
            orphans: Orphans::default(),
            last_listed: None,
        }
    }

    /// Judges what the last round left for the next one: the schedule is over.
    pub fn finish(&mut self) {
        self.judge_doubles();
    }

    /// The decision an export of `pair` rests on, as the watch delivered it: of each of
    /// `claimants` (the attachments of the pair a round listed), its latest intent to attach —
    /// an older one, followed by a detach and a new intent, decided nothing the export shows —
    /// and of those the lowest `resourceVersion`.
    fn watched_intent(&self, pair: &(String, String), claimants: &[String]) -> Option<u64> {
        let intents = self.intents.lock().expect("intents");
        claimants
            .iter()
            .filter_map(|uid| {
                intents
                    .iter()
                    .filter(|r| &r.uid == uid && self.of_pair(r, pair))
                    .filter_map(|r| r.resource_version.parse::<u64>().ok())
                    .max()
            })
            .min()
    }

    /// Judges the double attaches of the round before, with the intents the watch has delivered
    /// since: an export whose intent was written at an older version than the single-attach
    /// Volume's create was decided before it (design.md accepts that window).
    fn judge_doubles(&mut self) {
        for double in std::mem::take(&mut self.doubles) {
            let (decided_before, newer): (Vec<&(String, Vec<String>)>, Vec<_>) =
                double.newer.iter().partition(|(node, claimants)| {
                    self.watched_intent(&(double.handle.clone(), node.clone()), claimants)
                        .zip(double.version)
                        .is_some_and(|(intent, version)| intent < version)
                });
            let decided_before: Vec<&String> = decided_before.iter().map(|(n, _)| n).collect();
            let newer: Vec<&String> = newer.iter().map(|(n, _)| n).collect();
            if newer.is_empty() {
                self.history.note(format!(
                    "exports of {} on {decided_before:?}: an intent the watch delivered was written before single-attach {:?} was created: not judged",
                    double.handle, double.names
                ));
                continue;
            }
            self.violate(
                Rule::DoubleAttach,
                double.at,
                format!(
                    "single-attach volume {} exported to {:?} at once ({newer:?} seen \
                     only after it was created, with no intent older than it)",
                    double.names.join(", "),
                    double.nodes
                ),
            );
        }
    }

    /// Takes one round: the records (attachments, then Volumes), then the backend.
    pub async fn round(
        &mut self,
        attachments: &Api<VolumeAttachment>,
        volumes: &Api<Volume>,
        selector: &str,
        backend: &BackendReader,
        backend_epoch: &AtomicUsize,
    ) -> Option<Round> {
        let listed_at = Instant::now();
        let listed = attachments
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        let records: Vec<Record> = listed.items.iter().map(Record::of).collect();
        let volumes = volumes
            .list(&ListParams::default().labels(selector))
            .await
            .ok()
            .map(|list| {
                list.items
                    .iter()
                    .map(|v| VolumeId {
                        name: v.name_any(),
                        uid: v.uid().unwrap_or_default(),
                        held: v.finalizers().iter().any(|f| f == VOLUME_FINALIZER),
                        deleting: v.metadata.deletion_timestamp.is_some(),
                    })
                    .collect()
            });
        let volumes_at = Instant::now();
        let connections = backend.connections().await.ok();
        let backend_at = Instant::now();
        let backend_epoch = backend_epoch.load(Ordering::SeqCst);
        let mut stray = Vec::new();
        let exports = connections.map(|connections| {
            stray.extend(connections.unparsed);
            let mut pairs = BTreeSet::new();
            for (handle, node) in connections.pairs {
                if self.handles.values().any(|h| *h == handle) {
                    pairs.insert((handle, node));
                } else {
                    stray.push(format!("{handle}@{node}"));
                }
            }
            pairs
        });
        let round = Round {
            listed_at,
            backend_at,
            records,
            volumes,
            volumes_at,
            exports,
            stray,
            backend_epoch,
        };
        self.check(&round);
        self.rounds += 1;
        Some(round)
    }

    /// Judges one round against the rounds before it.
    pub fn check(&mut self, round: &Round) {
        let now = Timestamp::now();
        for record in &round.records {
            let versions = self.seen.entry(record.uid.clone()).or_default();
            if versions.last().is_none_or(|(_, last)| last != record) {
                versions.push((now, record.clone()));
                self.history.note(format!("saw {}", record.describe()));
            }
        }
        for gone in self
            .previous
            .iter()
            .filter(|p| !round.records.iter().any(|r| r.uid == p.uid))
        {
            self.history
                .note(format!("saw {} uid {} gone", gone.name, short(&gone.uid)));
        }
        self.judge_doubles();
        self.check_cuts(round);
        let exports_changed = round.exports != self.last_exports;
        if exports_changed {
            self.history
                .note(format!("backend exports {:?}", round.exports));
            self.last_exports = round.exports.clone();
        }

        self.check_releases(round);

        // Candidates of the previous round: confirmed if every live record that denied the
        // connection is unchanged now, so that no write (an Attaching intent) fell in between.
        for candidate in std::mem::take(&mut self.candidates) {
            let unchanged = candidate.live.iter().all(|(uid, rv)| {
                round
                    .records
                    .iter()
                    .any(|r| &r.uid == uid && &r.resource_version == rv)
            });
            if unchanged {
                self.confirm(&candidate.pair, &candidate.round);
            }
        }

        let Some(exports) = &round.exports else {
            self.exported_since.clear();
            self.previous = round.records.clone();
            return;
        };
        self.exported_since.retain(|pair, _| exports.contains(pair));
        for pair in exports {
            if self.exported_since.contains_key(pair) {
                continue;
            }
            let intent = round
                .records
                .iter()
                .filter(|r| {
                    self.of_pair(r, pair)
                        && r.phase == Some(AttachmentPhase::Attaching)
                        && !r.attach_failed
                })
                .filter_map(|r| r.resource_version.parse::<u64>().ok())
                .min();
            self.exported_since.insert(
                pair.clone(),
                Exported {
                    since: round.backend_at,
                    intent,
                },
            );
        }

        self.check_orphans_left(round, exports);

        // Exclusive while a single-attach Volume that names it exists (listed this round, before
        // the exports were read; the last list if this round's failed): once that Volume is
        // gone, a multi-attach alias owns the backend volume. An attach is exclusive while such a
        // Volume names the handle (design.md), but the exports of a multi-attach alias made
        // before that Volume was created stay: a violation needs one export seen only after the
        // create was sent. And an attach decided before the create (its intent written at an
        // older resourceVersion than the created Volume's) may still land after it: design.md
        // accepts that window, the same as any change of policy during an attach.
        let listed: Vec<VolumeId> = round
            .volumes
            .as_ref()
            .or(self.last_volumes.as_ref().map(|(volumes, _)| volumes))
            .cloned()
            .unwrap_or_default();
        let volume_creates = self.volume_creates.lock().expect("volume creates").clone();
        for (handle, nodes) in by_handle(exports) {
            if nodes.len() < 2 {
                continue;
            }
            let exclusive: Vec<&VolumeId> = listed
                .iter()
                .filter(|v| {
                    self.single.contains(&v.name)
                        && self.handle_of(&v.name) == Some(handle.as_str())
                })
                .collect();
            let Some(created) = exclusive
                .iter()
                .map(|v| volume_creates.get(&v.name).copied())
                .min_by_key(|c| c.map(|c| c.sent))
            else {
                continue;
            };
            let names: Vec<&str> = exclusive.iter().map(|v| v.name.as_str()).collect();
            let exported = |node: &String| self.exported_since[&(handle.clone(), node.clone())];
            let (older, newer): (Vec<&String>, Vec<&String>) = nodes
                .iter()
                .partition(|node| created.is_some_and(|c| exported(node).since < c.sent));
            let (decided_before, newer): (Vec<&String>, Vec<&String>) =
                newer.into_iter().partition(|node| {
                    let version = created.and_then(|c| c.version);
                    exported(node)
                        .intent
                        .zip(version)
                        .is_some_and(|(intent, version)| intent < version)
                });
            if newer.is_empty() {
                if exports_changed {
                    self.history.note(format!(
                        "exports of {handle}: on {older:?} seen before single-attach {names:?} was \
                         created (a multi-attach alias made them), on {decided_before:?} decided \
                         before it (an intent written at an older version): not judged"
                    ));
                }
                continue;
            }
            let claimants = |node: &String| -> Vec<String> {
                round
                    .records
                    .iter()
                    .filter(|r| self.of_pair(r, &(handle.clone(), node.clone())))
                    .map(|r| r.uid.clone())
                    .collect()
            };
            let newer = newer
                .into_iter()
                .map(|node| (node.clone(), claimants(node)))
                .collect();
            self.doubles.push(Double {
                handle: handle.clone(),
                newer,
                nodes: nodes.to_vec(),
                version: created.and_then(|c| c.version),
                names: names.iter().map(|n| (*n).to_owned()).collect(),
                at: round.backend_at,
            });
        }

        let creates = self.creates.lock().expect("creates").clone();
        for pair in exports {
            let of_pair: Vec<&Record> = round
                .records
                .iter()
                .filter(|r| self.of_pair(r, pair))
                .collect();
            if of_pair
                .iter()
                .any(|r| !r.denies(self.ever_attached(&r.uid)))
            {
                continue;
            }
            let ever = self
                .seen
                .values()
                .any(|v| v.last().is_some_and(|(_, r)| self.of_pair(r, pair)));
            if !ever {
                continue;
            }
            // A create answered after the list began may have made an attachment the list missed.
            let racing = creates.iter().any(|c| {
                self.handle_of(&c.volume) == Some(pair.0.as_str())
                    && c.node == pair.1
                    && c.sent < round.backend_at
                    && c.answered.is_none_or(|a| a >= round.listed_at)
            });
            if racing {
                continue;
            }
            let live: Vec<(String, String)> = of_pair
                .iter()
                .filter(|r| !r.deleting)
                .map(|r| (r.uid.clone(), r.resource_version.clone()))
                .collect();
            if live.is_empty() {
                self.confirm(pair, round);
            } else {
                self.candidates.push(Candidate {
                    pair: pair.clone(),
                    round: round.clone(),
                    live,
                });
            }
        }
        self.previous = round.records.clone();
    }

    /// A deleted Volume under `orphanPolicy: Detach` goes only once the backend shows no
    /// connection of it that no attachment claims: one made behind the operator's back
    /// ([`super::plan::ORPHAN_NODE`], which no attachment names) and exported without a break
    /// from before the last list that showed the Volume held until after the list that shows it
    /// gone was there all through its release. Judged on the Volume lists that were answered,
    /// the Volume's uid (a Volume created again under its name is another), and only where no
    /// other connection of its backend volume was asked for meanwhile.
    fn check_orphans_left(&mut self, round: &Round, exports: &BTreeSet<(String, String)>) {
        let Some(listed) = &round.volumes else {
            return;
        };
        let last = self.last_listed.replace((listed.clone(), round.volumes_at));
        let Some((before, before_at)) = last else {
            return;
        };
        let mut left = Vec::new();
        for gone in before.iter().filter(|v| {
            v.held
                && self.orphans.forced_first.contains(&v.name)
                && !listed.iter().any(|l| l.uid == v.uid)
                && !self.apiservers_race(
                    &v.uid,
                    self.deleted_by.get(&v.uid).copied(),
                    self.held_since.get(&v.uid).copied(),
                )
        }) {
            let Some(handle) = self.handle_of(&gone.name).map(str::to_owned) else {
                continue;
            };
            let pair = (handle.clone(), super::plan::ORPHAN_NODE.to_owned());
            let Some(exported) = self.exported_since.get(&pair).copied() else {
                continue;
            };
            if !exports.contains(&pair)
                || exported.since >= before_at
                || self
                    .orphans
                    .made_between(&handle, exported.since, round.backend_at)
            {
                continue;
            }
            left.push(format!(
                    "Volume {} uid {} (orphanPolicy Detach) released while {handle} was exported to {}, which no VolumeAttachment names: exported since {:.3}s, the Volume listed held at {:.3}s, gone at {:.3}s, still exported at {:.3}s",
                    gone.name,
                    short(&gone.uid),
                    pair.1,
                    self.history.offset(exported.since),
                    self.history.offset(before_at),
                    self.history.offset(round.volumes_at),
                self.history.offset(round.backend_at),
            ));
        }
        for detail in left {
            self.violate(Rule::ReleasedWithOrphan, round.volumes_at, detail);
        }
    }

    /// A connection a live attachment records as attached is cut only after that attachment
    /// said so (a forced detach records its intent first), or by the backend restarting. Two
    /// rounds tell: the connection listed in one and missing in the next while the record stayed
    /// as it was, and the record still unchanged in the round after.
    fn check_cuts(&mut self, round: &Round) {
        let Some(now) = &round.exports else {
            // Unanswered: the next answered round compares with the last answered one.
            return;
        };
        for cut in std::mem::take(&mut self.cuts) {
            let unchanged = round.records.contains(&cut.record);
            if unchanged
                && round.backend_epoch == cut.epoch
                && !now.contains(&cut.pair)
                && !self.forced_by_another(&cut, &round.records)
            {
                self.violate(
                    Rule::CutWhileAttached,
                    cut.at,
                    format!(
                        "the backend stopped connecting {}@{} while {} recorded it attached, and that record said nothing of a detach before or since",
                        cut.pair.0,
                        cut.pair.1,
                        cut.record.describe()
                    ),
                );
            }
        }
        if let Some(before) = &self.last_exports
            && round.backend_epoch == self.last_epoch
        {
            for pair in before.iter().filter(|p| !now.contains(*p)) {
                let attached: Vec<&Record> = round
                    .records
                    .iter()
                    .filter(|r| {
                        self.of_pair(r, pair)
                            && !r.deleting
                            && r.phase == Some(AttachmentPhase::Attached)
                            && r.attached
                            && self.previous.contains(r)
                    })
                    .collect();
                let others: BTreeMap<String, Option<String>> = self
                    .previous
                    .iter()
                    .filter(|r| self.of_pair(r, pair) && !r.deleting)
                    .map(|r| (r.uid.clone(), r.token.clone()))
                    .collect();
                for record in attached {
                    let cut = Cut {
                        pair: pair.clone(),
                        record: record.clone(),
                        at: round.backend_at,
                        epoch: self.last_epoch,
                        others: others.clone(),
                    };
                    if self.forced_by_another(&cut, &round.records) {
                        continue;
                    }
                    self.history.note(format!(
                        "{}@{} gone while {} records it attached: a cut unless that record moves on",
                        pair.0,
                        pair.1,
                        record.describe()
                    ));
                    self.cuts.push(cut);
                }
            }
        }
        self.last_epoch = round.backend_epoch;
    }

    /// Whether another attachment of the cut's pair records a forced detach under way in
    /// `records` (being deleted or not: one decided before the deletion goes on), or, live, is
    /// `Detaching` or recorded a force since the connection was last seen (a new token): a force
    /// on one claim of a shared connection cuts it for every claim (design.md, "Hand-over"), and
    /// the others are told only once the backend confirmed it. A deleted attachment's plain
    /// detach excuses nothing: it hands a claimed connection over instead.
    fn forced_by_another(&self, cut: &Cut, records: &[Record]) -> bool {
        records.iter().any(|r| {
            r.uid != cut.record.uid
                && self.of_pair(r, &cut.pair)
                && (r.forcing
                    || (!r.deleting
                        && (r.phase == Some(AttachmentPhase::Detaching)
                            || (r.token.is_some() && cut.others.get(&r.uid) != Some(&r.token)))))
        })
    }

    /// A Volume stays while any attachment names it that was created before its deletion
    /// (design.md). Seen in one round's list and gone from a later one, it was released in
    /// between; an attachment that named it in the first round (listed before that round's
    /// Volumes) and is still there in the round after the later one (listed after that round's
    /// Volumes) existed all through the release. Exempt is only an attachment whose create was
    /// sent after a round had listed the Volume deleting, and that never claimed a connection to
    /// it: the operator attaches nothing to a deleting Volume, and one created between the
    /// release's list and its finalizer patch can find the Volume gone. A Volume never seen held
    /// may go at once, unless an attachment claimed a connection to it; so may one seen held whose
    /// DELETE the apiserver answered by removing it at once, in a schedule without the admission
    /// policy's hold: the DELETE read it before the operator's hold and removed it anyway
    /// (kubernetes/kubernetes#77988, design.md). A release stays under watch for a few rounds,
    /// for a claim that shows late.
    fn check_releases(&mut self, round: &Round) {
        for mut release in std::mem::take(&mut self.releases) {
            let still: Vec<&Record> = round
                .records
                .iter()
                .filter(|r| release.naming.contains(&r.uid))
                .collect();
            if still.is_empty() {
                continue;
            }
            // Held, the Volume had to stay for each of them but one created after its deletion
            // that never claimed a connection to it; not held, only for one that had.
            let raced = self.removed_by_the_apiservers_race(&release);
            let (held, free): (Vec<&Record>, Vec<&Record>) = still.into_iter().partition(|r| {
                self.claimed_connection(&r.uid, &release.uid)
                    || (release.held
                        && !raced
                        && !self.created_after_deletion(&r.uid, release.deleted_by))
            });
            if !held.is_empty() {
                let held: Vec<String> = held.into_iter().map(Record::describe).collect();
                self.violate(
                    Rule::ReleasedWhileNamed,
                    release.at,
                    format!(
                        "Volume {} uid {} was released while attachments named it, before and after: {held:?}",
                        release.volume,
                        short(&release.uid)
                    ),
                );
                continue;
            }
            if raced && release.rounds_left == RELEASE_WATCH_ROUNDS {
                self.apiserver_races += 1;
                self.history.note(format!(
                    "the apiserver removed Volume {} uid {} at once though it was seen held: its DELETE read it before the hold (kubernetes/kubernetes#77988); it holds only attachments that claimed a connection to it",
                    release.volume,
                    short(&release.uid)
                ));
            } else if release.held && release.rounds_left == RELEASE_WATCH_ROUNDS {
                for record in &free {
                    self.history.note(format!(
                        "{} uid {} was created after Volume {} uid {} was deleted and has not claimed a connection: it does not hold the Volume",
                        record.name,
                        short(&record.uid),
                        release.volume,
                        short(&release.uid)
                    ));
                }
            }
            if release.rounds_left > 0 {
                release.rounds_left -= 1;
                self.releases.push(release);
            }
        }
        let Some(volumes) = &round.volumes else {
            return;
        };
        for volume in volumes.iter().filter(|v| v.deleting) {
            self.deleted_by
                .entry(volume.uid.clone())
                .or_insert(round.backend_at);
        }
        for volume in volumes.iter().filter(|v| v.held) {
            self.held_since
                .entry(volume.uid.clone())
                .or_insert(round.volumes_at);
        }
        if let Some((before, records)) = &self.last_volumes {
            for VolumeId {
                name, uid, held, ..
            } in before
                .iter()
                .filter(|seen| !volumes.iter().any(|now| now.uid == seen.uid))
            {
                self.history
                    .note(format!("saw Volume {name} uid {} gone", short(uid)));
                let naming: Vec<String> = records
                    .iter()
                    .filter(|r| r.volume == *name)
                    .map(|r| r.uid.clone())
                    .collect();
                // One deleted before the operator held it goes at once, by design, but nothing
                // may have been attached to it: an attach holds its Volume first.
                if !naming.is_empty() {
                    self.releases.push(Release {
                        volume: name.clone(),
                        uid: uid.clone(),
                        naming,
                        deleted_by: self.deleted_by.get(uid).copied(),
                        held: *held,
                        held_since: self.held_since.get(uid).copied(),
                        rounds_left: RELEASE_WATCH_ROUNDS,
                        at: round.listed_at,
                    });
                }
            }
        }
        self.last_volumes = Some((volumes.clone(), round.records.clone()));
    }

    /// Whether held Volume `release` went by the apiserver's delete/finalizer race, not by a
    /// release: in a schedule without the admission policy's hold (under it no DELETE can find a
    /// Volume unheld), no round listed it deleting, no DELETE of it was answered by marking it
    /// deleting, and one was answered by its removal though it was sent before any list showed
    /// the Volume held. A DELETE sent after that read a Volume already held: removed at once, it
    /// had lost its finalizer some other way, which the rule must still catch.
    fn removed_by_the_apiservers_race(&self, release: &Release) -> bool {
        release.held && self.apiservers_race(&release.uid, release.deleted_by, release.held_since)
    }

    /// Whether Volume `uid`, seen held since `held_since` and listed deleting by `deleted_by`,
    /// went by the apiserver's delete/finalizer race ([`Self::removed_by_the_apiservers_race`]).
    fn apiservers_race(
        &self,
        uid: &str,
        deleted_by: Option<Instant>,
        held_since: Option<Instant>,
    ) -> bool {
        if self.hold_at_create || deleted_by.is_some() {
            return false;
        }
        let Some(held_since) = held_since else {
            return false;
        };
        let deletes = self.volume_deletes.lock().expect("volume deletes");
        let of_it = || deletes.iter().filter(|d| d.uid == uid);
        of_it().all(|d| d.removed_at_once) && of_it().any(|d| d.sent < held_since)
    }

    /// Whether attachment `uid` was created by a create sent after `deleted_by`.
    fn created_after_deletion(&self, uid: &str, deleted_by: Option<Instant>) -> bool {
        let Some(deleted_by) = deleted_by else {
            return false;
        };
        self.creates
            .lock()
            .expect("creates")
            .iter()
            .any(|c| c.uid.as_deref() == Some(uid) && c.sent > deleted_by)
    }

    /// Whether a record of attachment `uid` seen so far claimed a connection to Volume
    /// `volume_uid`: attached, or in an intent or attached phase, and bound to that Volume (or to
    /// none recorded).
    fn claimed_connection(&self, uid: &str, volume_uid: &str) -> bool {
        self.seen.get(uid).is_some_and(|records| {
            records.iter().any(|(_, r)| {
                let claims = r.attached
                    || matches!(
                        r.phase,
                        Some(
                            AttachmentPhase::Attaching
                                | AttachmentPhase::Attached
                                | AttachmentPhase::Detaching
                        )
                    );
                claims
                    && r.bound_uid
                        .as_deref()
                        .is_none_or(|bound| bound == volume_uid)
            })
        })
    }

    /// The backend volume Volume `volume` names.
    fn handle_of(&self, volume: &str) -> Option<&str> {
        self.handles.get(volume).map(String::as_str)
    }

    /// Whether `record` is of the export `pair` (backend volume, node): an attachment of any
    /// Volume that names that backend volume, aliases included, to that node.
    fn of_pair(&self, record: &Record, pair: &(String, String)) -> bool {
        record.node == pair.1 && self.handle_of(&record.volume) == Some(pair.0.as_str())
    }

    fn confirm(&mut self, pair: &(String, String), round: &Round) {
        let records: Vec<String> = round
            .records
            .iter()
            .filter(|r| self.of_pair(r, pair))
            .map(Record::describe)
            .collect();
        let released: Vec<String> = self
            .seen
            .values()
            .filter_map(|v| v.last())
            .filter(|(_, r)| self.of_pair(r, pair) && !round.records.iter().any(|x| x.uid == r.uid))
            .map(|(_, r)| format!("{} uid {} (released)", r.name, short(&r.uid)))
            .collect();
        self.violate(
            Rule::DetachedWhileExported,
            round.backend_at,
            format!(
                "the backend exports {}@{} (read {:.3}s after the records) while every record of the pair denies it: {records:?} {released:?}",
                pair.0,
                pair.1,
                round.backend_at.duration_since(round.listed_at).as_secs_f64()
            ),
        );
    }

    pub fn violate(&mut self, rule: Rule, at: Instant, detail: String) {
        // One report per rule and detail: the same condition seen round after round is one finding.
        let same_rule = self.violations.iter().filter(|v| v.rule == rule).count();
        if same_rule >= 3 || self.violations.iter().any(|v| v.detail == detail) {
            return;
        }
        self.history
            .note(format!("VIOLATION {}: {detail}", rule.name()));
        self.violations.push(Violation { rule, at, detail });
    }

    /// Whether any record of `uid` seen so far said `attached: true`.
    fn ever_attached(&self, uid: &str) -> bool {
        self.seen
            .get(uid)
            .is_some_and(|v| v.iter().any(|(_, r)| r.attached))
    }

    /// The last record seen of `uid` at or before `at`, in the phase `phase`.
    pub fn phase_since_before(
        &self,
        uid: &str,
        at: Timestamp,
        phase: AttachmentPhase,
    ) -> Option<Timestamp> {
        self.seen
            .get(uid)?
            .iter()
            .rev()
            .find(|(seen, r)| *seen <= at && r.phase == Some(phase))
            .and_then(|(_, r)| r.phase_since)
    }
}

fn by_handle(exports: &BTreeSet<(String, String)>) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (handle, node) in exports {
        map.entry(handle.clone()).or_default().push(node.clone());
    }
    map
}

/// The daemon's export ids, asked on its own QMP socket. An error (the daemon restarting, or its
/// monitor busy past the timeout) is an unanswered round, not a failure.
pub async fn query_exports(socket: &Path) -> Result<Vec<String>, String> {
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        qmp::execute(socket, "query-block-exports", json!({})),
    )
    .await
    .map_err(|_| "QMP did not answer".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(qmp::export_ids(&answer))
}
