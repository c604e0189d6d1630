//! The operator's promises under races and lag, end to end: the real binary under its RBAC-bound
//! identity, on the real control plane, against a real `qemu-storage-daemon`. The faults are the
//! ones that make a record and the backend drift apart without anyone editing a record by hand:
//! attachments that race for one volume, a volume released to several waiting nodes at once, an
//! informer cache that lags the apiserver, a leader cut off from the apiserver while another
//! replica takes over, and another controller's finalizer added before the operator has seen the
//! object.
//!
//! Every check is what a user or the backend sees: the daemon's own list of exports (read over
//! QMP, directly), the commands the daemon was sent (logged by the QMP proxy), the objects' status
//! and finalizers, and the Events. Clocks are those of `support::scenario`: `defaultStuckAfter:
//! 5s`, `resyncInterval: 2s`, a driver deadline of 2s.

mod support;

use futures::future::join_all;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use safe_detach::api::{
    ATTACHMENT_FINALIZER, AttachmentPhase, ForceDetachState, VOLUME_FINALIZER, VolumeAttachment,
};
use safe_detach::driver::nbd::parse_export_id;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::scenario::{
    FIRST_REPLICA, RESYNC, Scenario, Setup, attached, condition, describe_events, export_id, has,
    phase, show,
};
use tokio::time::Instant;

const VA: &str = "VolumeAttachment";
const NODE_A: &str = "node-a";
const HANDLE: &str = "vol1";
/// How often the daemon's exports are read while a race runs: often enough to see an export
/// that lives for a single reconcile.
const EXPORT_POLL: Duration = Duration::from_millis(20);
/// Another controller's finalizer, as a backup or replication tool would put on an attachment.
const OTHER_FINALIZER: &str = "example.com/other";

// ---------------------------------------------------------------------------------------------
// Watching the backend while a race runs
// ---------------------------------------------------------------------------------------------

/// What the daemon's exports showed over a watched stretch of time.
#[derive(Default)]
struct ExportLog {
    polls: usize,
    /// For each volume handle ever exported to more than one node: the node sets seen.
    shared: BTreeMap<String, BTreeSet<Vec<String>>>,
    /// Every export id seen at least once.
    ever: BTreeSet<String>,
}

impl ExportLog {
    fn record(&mut self, ids: &[String]) {
        self.polls += 1;
        let mut nodes_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for id in ids {
            self.ever.insert(id.clone());
            if let Some((handle, node)) = parse_export_id(id) {
                nodes_of.entry(handle).or_default().push(node.to_owned());
            }
        }
        for (handle, nodes) in nodes_of {
            if nodes.len() > 1 {
                self.shared
                    .entry(handle.to_owned())
                    .or_default()
                    .insert(nodes);
            }
        }
    }

    /// The handles that were exported to two nodes or more at one moment, and to which.
    fn describe_shared(&self) -> String {
        self.shared
            .iter()
            .map(|(handle, sets)| format!("  {handle}: {sets:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs `work` while reading the daemon's exports every [`EXPORT_POLL`], and returns its result
/// with what the daemon showed meanwhile.
async fn watching_exports<T>(s: &Scenario, work: impl Future<Output = T>) -> (T, ExportLog) {
    let done = AtomicBool::new(false);
    let watch = async {
        let mut log = ExportLog::default();
        while !done.load(Ordering::SeqCst) {
            log.record(&s.qsd.export_ids().await);
            tokio::time::sleep(EXPORT_POLL).await;
        }
        log
    };
    let work = async {
        let result = work.await;
        done.store(true, Ordering::SeqCst);
        result
    };
    futures::join!(work, watch)
}

/// Attached, as the backend confirmed it.
fn is_attached(attachment: &VolumeAttachment) -> bool {
    phase(attachment) == Some(AttachmentPhase::Attached) && attached(attachment)
}

/// Not attached, and told why: another node holds the volume.
fn is_blocked(attachment: &VolumeAttachment) -> bool {
    !attached(attachment)
        && phase(attachment) != Some(AttachmentPhase::Attached)
        && has(
            condition(attachment, "AttachBlocked"),
            "True",
            Some("HeldByAnotherNode"),
        )
}

/// One Volume and the attachments that compete for it, each with its node.
struct Contest {
    volume: String,
    handle: String,
    attachments: Vec<(String, &'static str)>,
}

impl Contest {
    /// Creates a Volume on a new image, waits until the operator has taken it in (its finalizer,
    /// so that an attachment of it is not turned away as naming an unknown Volume), and names an
    /// attachment for each of `nodes`, created later.
    async fn prepare(s: &mut Scenario, handle: &str, nodes: &[&'static str]) -> Self {
        let volume = s.volume("race", handle, json!({})).await;
        s.wait_volume(&volume, "taken in by the operator", |v| {
            v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
        })
        .await;
        let attachments = nodes
            .iter()
            .map(|node| (s.attachment_name("race"), *node))
            .collect();
        Self {
            volume,
            handle: handle.to_owned(),
            attachments,
        }
    }

    /// Creates all the attachments at once.
    async fn create_all(&self, s: &Scenario) {
        join_all(
            self.attachments
                .iter()
                .map(|(name, node)| s.create_attachment(name, &self.volume, node)),
        )
        .await;
    }

    /// The attachments' current records.
    async fn records(&self, s: &Scenario) -> Vec<(String, &'static str, VolumeAttachment)> {
        let mut records = Vec::new();
        for (name, node) in &self.attachments {
            let record = s.get_attachment(name).await.expect("the attachment exists");
            records.push((name.clone(), *node, record));
        }
        records
    }

    /// Waits until every attachment is either attached or blocked.
    async fn wait_settled(&self, s: &Scenario) {
        for (name, _) in &self.attachments {
            s.wait_attachment(name, "attached, or blocked by another node", |a| {
                is_attached(a) || is_blocked(a)
            })
            .await;
        }
    }

    /// What is wrong with the outcome, if anything: it must be exactly one attachment attached,
    /// every other one blocked.
    async fn judge(&self, s: &Scenario) -> Option<String> {
        let records = self.records(s).await;
        let winners: Vec<&str> = records
            .iter()
            .filter(|(_, _, a)| is_attached(a))
            .map(|(_, node, _)| *node)
            .collect();
        let not_blocked: Vec<&str> = records
            .iter()
            .filter(|(_, _, a)| !is_attached(a) && !is_blocked(a))
            .map(|(_, node, _)| *node)
            .collect();
        (winners.len() != 1 || !not_blocked.is_empty()).then(|| {
            format!(
                "  {} ({}): attached on {winners:?}; neither attached nor blocked on {not_blocked:?}",
                self.volume, self.handle
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Single-attach under concurrency
// ---------------------------------------------------------------------------------------------

/// Nodes that ask for the same single-attach Volume at the same moment: the backend never exports
/// it to two of them at once, and in the end one node has it while the others are told another
/// node holds it. Six Volumes race at once, each with an attachment for each of three nodes, all
/// eighteen created in one burst.
#[tokio::test(flavor = "multi_thread")]
async fn attachments_created_at_once_never_export_a_single_attach_volume_to_two_nodes() {
    let mut s = Scenario::start().await;
    let nodes = ["node-a", "node-b", "node-c"];
    let mut contests = Vec::new();
    for i in 0..6 {
        contests.push(Contest::prepare(&mut s, &format!("burst{i}"), &nodes).await);
    }

    let ((), exports) = watching_exports(&s, async {
        join_all(contests.iter().map(|c| c.create_all(&s))).await;
        for contest in &contests {
            contest.wait_settled(&s).await;
        }
        // Settled is not the end of a race: the next resyncs must not undo it either.
        tokio::time::sleep(2 * RESYNC).await;
    })
    .await;

    println!(
        "FIGURE: burst of {} attachments: {} of {} volumes exported to two nodes at once ({} reads of the exports)",
        contests.len() * nodes.len(),
        exports.shared.len(),
        contests.len(),
        exports.polls
    );
    let mut wrong = Vec::new();
    for contest in &contests {
        wrong.extend(contest.judge(&s).await);
    }
    assert!(
        exports.shared.is_empty() && wrong.is_empty(),
        "attachments created at once: {} of {} single-attach volumes were exported to two nodes at once:\n{}\n{} of {} did not end with exactly one node attached and the others blocked:\n{}\n--- operator log (end) ---\n{}",
        exports.shared.len(),
        contests.len(),
        exports.describe_shared(),
        wrong.len(),
        contests.len(),
        wrong.join("\n"),
        s.log_tail(60)
    );
}

/// A single-attach Volume that the backend connects to two nodes anyway (here, an export made
/// behind the operator's back) is never taken as normal: the Volume's `MultiAttached` condition
/// turns True with a Warning Event, the attachment's `BackendInSync` turns False, and both clear
/// once the second connection is gone. The operator attaches nothing more meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_attach_volume_seen_on_two_nodes_is_reported() {
    let mut s = Scenario::start().await;
    let volume = s.volume("seen-twice", HANDLE, json!({})).await;
    let name = s.attachment("seen-twice", &volume, NODE_A).await;
    s.wait_attached(&name).await;

    s.export_out_of_band(HANDLE, "node-b", false).await;
    let reported = s
        .wait_volume(&volume, "MultiAttached=True", |v| {
            has(
                support::scenario::volume_condition(v, "MultiAttached"),
                "True",
                Some("ConnectedToSeveralNodes"),
            )
        })
        .await;
    let message = &support::scenario::volume_condition(&reported, "MultiAttached")
        .expect("the condition")
        .message;
    assert!(
        message.contains("node-a") && message.contains("node-b"),
        "{message}"
    );
    let event = s
        .wait_event("Volume", &volume, "MultiAttached", &["node-b"])
        .await;
    assert_eq!(event.type_, "Warning", "{event:?}");
    s.wait_attachment(&name, "BackendInSync=False MultiAttached", |a| {
        has(
            condition(a, "BackendInSync"),
            "False",
            Some("MultiAttached"),
        )
    })
    .await;

    s.delete_export_out_of_band(HANDLE, "node-b").await;
    s.wait_volume(&volume, "MultiAttached=False", |v| {
        has(
            support::scenario::volume_condition(v, "MultiAttached"),
            "False",
            None,
        )
    })
    .await;
    s.wait_attachment(&name, "BackendInSync=True", |a| {
        has(condition(a, "BackendInSync"), "True", None) && is_attached(a)
    })
    .await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert_eq!(
        s.occurrences("Volume", &volume, "MultiAttached").await,
        1,
        "one Warning for one episode"
    );
}

/// A Volume released by the node that held it goes to exactly one of the nodes waiting for it:
/// the others stay blocked, and the backend never exports it to two of them at once. Four Volumes,
/// each held by node-a with three more nodes waiting, are released at the same moment.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_volume_goes_to_exactly_one_waiting_node() {
    let mut s = Scenario::start().await;
    let waiting = ["node-b", "node-c", "node-d"];
    let mut contests = Vec::new();
    let mut holders = Vec::new();
    for i in 0..4 {
        let handle = format!("storm{i}");
        let contest = Contest::prepare(&mut s, &handle, &waiting).await;
        let (holder, _) = s.attach("holder", &contest.volume, NODE_A).await;
        contest.create_all(&s).await;
        for (name, _) in &contest.attachments {
            s.wait_attachment(name, "blocked by node-a", is_blocked)
                .await;
        }
        holders.push(holder);
        contests.push(contest);
    }

    let ((), exports) = watching_exports(&s, async {
        join_all(holders.iter().map(|h| s.delete_attachment(h))).await;
        for holder in &holders {
            s.wait_attachment_gone(holder).await;
        }
        for contest in &contests {
            contest.wait_settled(&s).await;
        }
        tokio::time::sleep(2 * RESYNC).await;
    })
    .await;

    println!(
        "FIGURE: release storm: {} of {} volumes exported to two nodes at once ({} reads of the exports)",
        exports.shared.len(),
        contests.len(),
        exports.polls
    );
    let mut wrong = Vec::new();
    for contest in &contests {
        wrong.extend(contest.judge(&s).await);
    }
    assert!(
        exports.shared.is_empty() && wrong.is_empty(),
        "released to several waiting nodes: {} of {} volumes were exported to two nodes at once:\n{}\n{} of {} did not end with exactly one waiting node attached:\n{}\n--- operator log (end) ---\n{}",
        exports.shared.len(),
        contests.len(),
        exports.describe_shared(),
        wrong.len(),
        contests.len(),
        wrong.join("\n"),
        s.log_tail(60)
    );
}

// ---------------------------------------------------------------------------------------------
// A lagging cache
// ---------------------------------------------------------------------------------------------

/// How late the operator's informer cache learns of a change, its own writes included.
const WATCH_LAG: Duration = Duration::from_millis(300);

/// A force-detach token acts once, even when the operator's cache sees its own writes 300 ms late:
/// the backend is told once to cut the export off, one ForceDetached event is published, and the
/// attachment is attached again and stays attached.
#[tokio::test(flavor = "multi_thread")]
async fn a_force_detach_token_acts_once_while_the_operators_cache_lags() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("token", HANDLE, json!({})).await;
    let (name, _) = s.attach("token", &volume, NODE_A).await;
    let export = export_id(HANDLE, NODE_A);
    let hard_deletes = |s: &Scenario| hard_deletes_of(s, HANDLE, NODE_A);
    assert_eq!(hard_deletes(&s), 0, "nothing was forced before the request");

    s.api().set_watch_delay(WATCH_LAG);
    let token = "lagging-1";
    s.annotate(&name, token).await;
    s.wait_attachment(
        &name,
        "force-detached by the token, then Attached again",
        |a| {
            let forced = a.status.as_ref().and_then(|st| st.force_detach.as_ref());
            forced.is_some_and(|f| {
                f.token.as_deref() == Some(token) && f.state == ForceDetachState::Succeeded
            }) && is_attached(a)
        },
    )
    .await;
    // Long enough for every write of the force to come back through the lagging cache many times.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let forced = hard_deletes(&s);
    let events = s.occurrences(VA, &name, "ForceDetached").await;
    println!(
        "FIGURE: one token under a {WATCH_LAG:?} watch lag: {forced} forced deletes of the export, {events} ForceDetached events"
    );
    assert!(
        forced == 1 && events == 1,
        "the token {token:?} forced the export off {forced} times at the backend and was announced by {events} ForceDetached events (want 1 and 1); events:\n{}\n--- operator log (end) ---\n{}",
        describe_events(&s.events_about(VA, &name).await),
        s.log_tail(60)
    );
    let last = s.get_attachment(&name).await;
    assert!(
        last.as_ref().is_some_and(is_attached),
        "not Attached after the force: {}",
        show(last.as_ref())
    );
    assert_eq!(s.qsd.export_ids().await, [export]);
}

// ---------------------------------------------------------------------------------------------
// Leader election
// ---------------------------------------------------------------------------------------------

/// The election identity of the second replica.
const SECOND_REPLICA: &str = "replica-2";
/// How long a silent leader keeps the lease.
const LEASE: &str = "4s";
/// Long enough for the lease to run out and the other replica to take it and start acting.
const TAKEOVER: Duration = Duration::from_secs(20);

/// A leader cut off from the apiserver keeps running on what it saw last. Meanwhile the other
/// replica takes the lease, and a user deletes an attachment: the new leader detaches it and
/// releases its finalizer (another controller's finalizer keeps the object, Detached, as a backup
/// tool's would). The cut-off replica must not act on it again: the daemon does not export it
/// again, during the partition or after it heals; the record the new leader wrote stays Detached;
/// and the lease stays with the new leader.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_leader_does_not_act_after_another_replica_took_over() {
    let mut s = Scenario::with(Setup {
        api_proxy: true,
        leader_election: Some(LEASE),
        ..Setup::default()
    })
    .await;
    s.wait_leader(FIRST_REPLICA, TAKEOVER).await;
    let (_second, _second_api) = s.second_operator(SECOND_REPLICA).await;
    let volume = s.volume("fenced", HANDLE, json!({})).await;
    let (name, _) = s.attach("fenced", &volume, NODE_A).await;
    add_finalizer(&s.attachments, &name, OTHER_FINALIZER).await;
    let export = export_id(HANDLE, NODE_A);
    assert_eq!(s.qsd.export_ids().await, std::slice::from_ref(&export));
    // Cut the leader off only once it is done with the attach (its Event sent, the Volume's
    // status written) and has looked again with nothing to write: what it holds is then a cache
    // that says Attached, not a write half sent.
    s.wait_event(VA, &name, "Attached", &[]).await;
    s.wait_volume(&volume, "InUse", |v| {
        v.status
            .as_ref()
            .is_some_and(|st| st.connected_nodes == [NODE_A])
    })
    .await;
    tokio::time::sleep(RESYNC).await;

    s.api().freeze();
    s.wait_leader(SECOND_REPLICA, TAKEOVER).await;
    s.delete_attachment(&name).await;
    s.wait_attachment(&name, "Detached, and released by the new leader", |a| {
        phase(a) == Some(AttachmentPhase::Detached)
            && !attached(a)
            && a.finalizers() == [OTHER_FINALIZER]
    })
    .await;
    assert!(
        !s.qsd.export_ids().await.contains(&export),
        "the new leader recorded Detached while the daemon still exports {export}"
    );

    // The cut-off replica's cache still says Attached, and at every resync it probes the daemon
    // and finds the export gone.
    let window = 3 * RESYNC + Duration::from_secs(1);
    let ((), during) = watching_exports(&s, tokio::time::sleep(window)).await;
    s.api().thaw();
    let ((), after) = watching_exports(&s, tokio::time::sleep(window)).await;

    let record = s.get_attachment(&name).await;
    let holder = s.lease_holder().await;
    remove_finalizer(&s.attachments, &name, OTHER_FINALIZER).await;
    println!(
        "FIGURE: partitioned leader: {export} exported again during the partition: {}, after it healed: {}; the record after: {:?}; lease holder after: {holder:?}",
        during.ever.contains(&export),
        after.ever.contains(&export),
        record.as_ref().and_then(phase),
    );
    let mut problems = Vec::new();
    if during.ever.contains(&export) {
        problems.push(format!(
            "during the partition the daemon exported {export} again"
        ));
    }
    if after.ever.contains(&export) {
        problems.push(format!(
            "after the partition healed the daemon exported {export} again"
        ));
    }
    let stays = |a: &VolumeAttachment| phase(a) == Some(AttachmentPhase::Detached) && !attached(a);
    if !record.as_ref().is_some_and(stays) {
        problems.push(format!(
            "the record the new leader wrote was overwritten; it now says:\n{}",
            show(record.as_ref())
        ));
    }
    if holder.as_deref() != Some(SECOND_REPLICA) {
        problems.push(format!(
            "after the partition healed the lease is held by {holder:?}, not by the replica that took over ({SECOND_REPLICA})"
        ));
    }
    assert!(
        problems.is_empty(),
        "the replica cut off from the apiserver acted after another took over:\n  {}\n--- its log (end) ---\n{}",
        problems.join("\n  "),
        s.log_tail(40)
    );
}

// ---------------------------------------------------------------------------------------------
// Finalizers
// ---------------------------------------------------------------------------------------------

/// How late the operator's cache learns of a change, so that another controller's change lands
/// before the operator has seen the object at all.
const SLOW_WATCH: Duration = Duration::from_secs(2);

/// Another controller's finalizer, added after the attachment was created but before the operator
/// has seen it, survives the operator adding its own: the attachment ends Attached with both
/// finalizers, each once.
#[tokio::test(flavor = "multi_thread")]
async fn adding_the_finalizer_keeps_another_controllers_finalizer() {
    let mut s = Scenario::with(Setup {
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("shared", HANDLE, json!({})).await;
    s.wait_volume(&volume, "taken in by the operator", |v| {
        v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
    })
    .await;

    s.api().set_watch_delay(SLOW_WATCH);
    let created = Instant::now();
    let name = s.attachment("shared", &volume, NODE_A).await;
    // The other controller comes a moment later, well before the operator's cache has the object,
    // so that the operator first acts on the object as created, without any finalizer.
    tokio::time::sleep(SLOW_WATCH / 4).await;
    let fresh = s.get_attachment(&name).await.expect("just created");
    assert!(
        fresh.finalizers().is_empty() && created.elapsed() < SLOW_WATCH,
        "the operator reached the attachment before the other controller; the test proves nothing"
    );
    // Conditional on the version read, so that nothing the operator wrote meanwhile is replaced.
    s.merge_metadata(
        &name,
        json!({ "resourceVersion": fresh.resource_version(), "finalizers": [OTHER_FINALIZER] }),
    )
    .await;
    let attached = s.wait_attached(&name).await;

    let finalizers = attached.finalizers().to_vec();
    let count = |f: &str| finalizers.iter().filter(|x| *x == f).count();
    let (other, ours) = (count(OTHER_FINALIZER), count(ATTACHMENT_FINALIZER));
    // Let the object go once the operator has released it; the scenario's clean-up would too.
    remove_finalizer(&s.attachments, &name, OTHER_FINALIZER).await;
    assert!(
        other == 1 && ours == 1,
        "after the attach the finalizers are {finalizers:?}: {OTHER_FINALIZER} {other} times, {ATTACHMENT_FINALIZER} {ours} times (want once each)"
    );
}

/// Adds `finalizer` at the end of the object's finalizers, which must exist already.
async fn add_finalizer(api: &Api<VolumeAttachment>, name: &str, finalizer: &str) {
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "add", "path": "/metadata/finalizers/-", "value": finalizer },
    ]))
    .expect("a JSON patch");
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap_or_else(|e| panic!("add {finalizer} to {name}: {e}"));
}

/// Removes `finalizer` from the object, if it is there, without touching the others.
async fn remove_finalizer(api: &Api<VolumeAttachment>, name: &str, finalizer: &str) {
    let Some(object) = api.get_opt(name).await.expect("read the attachment") else {
        return;
    };
    let Some(index) = object.finalizers().iter().position(|f| f == finalizer) else {
        return;
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": path, "value": finalizer },
        { "op": "remove", "path": path },
    ]))
    .expect("a JSON patch");
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap_or_else(|e| panic!("remove {finalizer} from {name}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// Tokens act at most once over an object's life
// ---------------------------------------------------------------------------------------------

/// How many times the daemon was told to cut `handle`'s export for `node` off.
fn hard_deletes_of(s: &Scenario, handle: &str, node: &str) -> usize {
    let export = export_id(handle, node);
    s.proxy()
        .calls_of("block-export-del")
        .iter()
        .filter(|arguments| arguments["id"] == export && arguments["mode"] == "hard")
        .count()
}

/// The NBD URI the operator recorded for an attachment.
fn uri_of(attachment: &VolumeAttachment) -> String {
    attachment
        .status
        .as_ref()
        .and_then(|st| st.connection_info.get("uri").cloned())
        .expect("an NBD URI")
}

/// The tokens the attachment records as handled.
fn handled_tokens(attachment: &VolumeAttachment) -> Vec<String> {
    attachment
        .status
        .as_ref()
        .map(|s| s.handled_tokens.clone())
        .unwrap_or_default()
}

/// Waits until the attachment is Attached again after the force-detach of `token` succeeded.
async fn forced_and_reattached(s: &Scenario, name: &str, token: &str) {
    s.wait_attachment(name, &format!("forced by {token}, then Attached"), |a| {
        let forced = a.status.as_ref().and_then(|st| st.force_detach.as_ref());
        forced.is_some_and(|f| {
            f.token.as_deref() == Some(token) && f.state == ForceDetachState::Succeeded
        }) && is_attached(a)
    })
    .await;
}

/// t1, then t2, then t1 again (a manifest reverted in Git): t1 and t2 each force once; going
/// back to t1 is no request, and the export and its client are left alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_reverted_token_does_not_force_again() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("revert", HANDLE, json!({})).await;
    let (name, _) = s.attach("revert", &volume, NODE_A).await;

    s.annotate(&name, "t1").await;
    forced_and_reattached(&s, &name, "t1").await;
    s.annotate(&name, "t2").await;
    forced_and_reattached(&s, &name, "t2").await;
    assert_eq!(hard_deletes_of(&s, HANDLE, NODE_A), 2);

    s.annotate(&name, "t1").await;
    // Several resyncs: time for any reconcile to take t1 for new.
    tokio::time::sleep(3 * RESYNC).await;
    let last = s.get_attachment(&name).await.expect("present");
    assert_eq!(
        hard_deletes_of(&s, HANDLE, NODE_A),
        2,
        "the reverted token t1 forced again:\n{}",
        show(Some(&last))
    );
    assert_eq!(handled_tokens(&last), ["t1", "t2"], "{}", show(Some(&last)));
    assert!(is_attached(&last), "{}", show(Some(&last)));
    assert_eq!(s.occurrences(VA, &name, "ForceDetached").await, 2);
}

/// A requested force-detach, then an automatic one (a deleted attachment whose client will not
/// let go, stuck detaching): the automatic force leaves the handled token handled, so the old
/// annotation does not force a third time on the way out.
#[tokio::test(flavor = "multi_thread")]
async fn an_automatic_force_does_not_revive_an_old_token() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("auto-after-token", HANDLE, json!({})).await;
    let (name, _) = s.attach("auto-after-token", &volume, NODE_A).await;
    s.annotate(&name, "t1").await;
    forced_and_reattached(&s, &name, "t1").await;
    assert_eq!(hard_deletes_of(&s, HANDLE, NODE_A), 1);

    let attached = s.get_attachment(&name).await.expect("present");
    let uri = uri_of(&attached);
    let client = support::qsd::NbdClient::connect_uri(&uri)
        .await
        .expect("a client holds the export");
    s.delete_attachment(&name).await;
    s.wait_attachment_gone(&name).await;
    drop(client);

    let requested = s
        .events_about(VA, &name)
        .await
        .into_iter()
        .filter(|e| e.reason == "ForceDetached" && e.note.contains("Requested"))
        .count();
    let stuck = s
        .events_about(VA, &name)
        .await
        .into_iter()
        .filter(|e| e.reason == "ForceDetached" && e.note.contains("StuckDetaching"))
        .count();
    assert_eq!(
        (requested, stuck, hard_deletes_of(&s, HANDLE, NODE_A)),
        (1, 1, 2),
        "want t1 once and the stuck detach once; events:\n{}",
        describe_events(&s.events_about(VA, &name).await)
    );
}

/// An attachment created with the annotation already on it (a manifest re-applied after the
/// object was deleted, or restored from Git) attaches and is not forced: the token is recorded as
/// handled and an Event says so. A new token forces as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_present_at_creation_is_recorded_not_acted_on() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("born-with-token", HANDLE, json!({})).await;
    let name = s.attachment_name("born-with-token");
    let object = json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "VolumeAttachment",
        "metadata": {
            "name": name,
            "labels": { support::operator::SHARD_LABEL: s.shard },
            "annotations": { safe_detach::api::FORCE_DETACH_ANNOTATION: "from-git" },
        },
        "spec": { "volumeName": volume, "nodeName": NODE_A },
    });
    s.attachments
        .patch(
            &name,
            &PatchParams::apply("safe-detach-e2e"),
            &Patch::Apply(&object),
        )
        .await
        .expect("create the attachment");
    let attached = s.wait_attached(&name).await;
    tokio::time::sleep(2 * RESYNC).await;
    assert_eq!(
        hard_deletes_of(&s, HANDLE, NODE_A),
        0,
        "a token present at creation forced:\n{}",
        show(Some(&attached))
    );
    let last = s.get_attachment(&name).await.expect("present");
    assert_eq!(handled_tokens(&last), ["from-git"], "{}", show(Some(&last)));
    assert!(
        last.status
            .as_ref()
            .is_some_and(|st| st.force_detach.is_none())
    );
    s.wait_event(VA, &name, "TokenPresentAtCreation", &["from-git"])
        .await;

    s.annotate(&name, "fresh").await;
    forced_and_reattached(&s, &name, "fresh").await;
    assert_eq!(hard_deletes_of(&s, HANDLE, NODE_A), 1);
}

/// An attachment that is deleted while blocked (Pending: its volume held by another node) is
/// never marked Detached on the record alone: an attach of unknown outcome may lie behind a
/// block, so the idempotent detach is called for its node first. The holder is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_attachment_is_detached_before_it_is_released() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("blocked-delete", HANDLE, json!({})).await;
    let (holder, _) = s.attach("holder", &volume, NODE_A).await;
    let waiter = s.attachment("waiter", &volume, "node-b").await;
    s.wait_attachment(&waiter, "blocked", is_blocked).await;

    s.delete_attachment(&waiter).await;
    s.wait_attachment_gone(&waiter).await;
    let detaches = s
        .proxy()
        .calls_of("block-export-del")
        .iter()
        .filter(|arguments| arguments["id"] == export_id(HANDLE, "node-b"))
        .count();
    assert!(
        detaches >= 1,
        "released without a detach call for node-b: {:?}",
        s.proxy().calls_of("block-export-del")
    );
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    let holder = s.get_attachment(&holder).await;
    assert!(
        holder.as_ref().is_some_and(is_attached),
        "{}",
        show(holder.as_ref())
    );
}

/// An export of the volume's disk that the operator did not make (added by hand, under another
/// name) may serve any node: while it exists, a deleted attachment is not released (its own
/// export is gone, but "not connected" cannot be said), `BackendInSync` says why, and no other
/// node attaches the single-attach volume. Once it is removed, the release follows.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_that_names_no_node_keeps_the_volume_held() {
    let mut s = Scenario::start().await;
    let volume = s.volume("by-hand", HANDLE, json!({})).await;
    let (name, _) = s.attach("by-hand", &volume, NODE_A).await;
    s.qsd
        .qmp(
            "block-export-add",
            json!({
                "type": "nbd", "id": "by-hand", "node-name": "sd-vol1", "name": "by-hand",
            }),
        )
        .await
        .expect("an export by hand");

    s.delete_attachment(&name).await;
    let waiter = s.attachment("waiter", &volume, "node-b").await;
    s.wait_attachment(&name, "BackendInSync=False UnattributedConnection", |a| {
        has(
            condition(a, "BackendInSync"),
            "False",
            Some("UnattributedConnection"),
        )
    })
    .await;
    tokio::time::sleep(2 * RESYNC).await;
    let held = s.get_attachment(&name).await;
    assert!(
        held.as_ref()
            .is_some_and(|a| a.finalizers().iter().any(|f| f == ATTACHMENT_FINALIZER)),
        "released while an unattributed export of its disk exists: {}",
        show(held.as_ref())
    );
    let blocked = s.get_attachment(&waiter).await.expect("the waiter");
    assert!(is_blocked(&blocked), "{}", show(Some(&blocked)));
    assert!(
        !s.qsd
            .export_ids()
            .await
            .contains(&export_id(HANDLE, "node-b")),
        "attached to node-b past an unattributed export"
    );

    s.qsd
        .qmp(
            "block-export-del",
            json!({ "id": "by-hand", "mode": "hard" }),
        )
        .await
        .expect("remove the export by hand");
    s.wait_attachment_gone(&name).await;
    s.wait_attached(&waiter).await;
}

/// A Volume replaced under a live attachment (its finalizer removed by hand, deleted, and created
/// again under the same name with another handle) does not get the attachment attached to the new
/// handle: the attachment says so (`Ready=False, VolumeReplaced`). Deleted, the attachment is
/// detached from what it attached — the old export goes before the release — and the new handle
/// is never exported.
#[tokio::test(flavor = "multi_thread")]
async fn an_attachment_is_detached_from_what_it_attached_after_its_volume_was_replaced() {
    let mut s = Scenario::start().await;
    let volume = s.volume("replaced", HANDLE, json!({})).await;
    let (name, _) = s.attach("replaced", &volume, NODE_A).await;
    replace_volume(&s, &volume, "vol2").await;

    s.wait_attachment(&name, "Ready=False VolumeReplaced", |a| {
        has(condition(a, "Ready"), "False", Some("VolumeReplaced"))
    })
    .await;
    tokio::time::sleep(2 * RESYNC).await;
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A)],
        "the attachment was attached to the replacing Volume's handle"
    );

    s.delete_attachment(&name).await;
    s.wait_attachment_gone(&name).await;
    assert!(
        s.qsd.export_ids().await.is_empty(),
        "released while what it attached is still exported: {:?}",
        s.qsd.export_ids().await
    );
}

/// Replaces a Volume behind its attachments' back, once the operator has put its finalizer on
/// it: deletes it (the operator then adds no finalizer again), removes its finalizer by hand, and
/// creates it again under the same name with `handle`.
async fn replace_volume(s: &Scenario, volume: &str, handle: &str) {
    s.wait_for(
        &s.volumes,
        volume,
        "the Volume's finalizer",
        Duration::from_secs(30),
        |v| v.is_some_and(|v| v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)),
    )
    .await;
    s.volumes
        .delete(volume, &Default::default())
        .await
        .expect("delete the Volume");
    s.volumes
        .patch(
            volume,
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{ "op": "remove", "path": "/metadata/finalizers" }]))
                    .expect("a JSON patch"),
            ),
        )
        .await
        .expect("remove the Volume's finalizer by hand");
    s.wait_for(&s.volumes, volume, "gone", Duration::from_secs(30), |v| {
        v.is_none()
    })
    .await;
    s.create_volume(volume, handle, json!({})).await;
}

/// A Volume created again over the same backend volume, under a live attachment, is not one the
/// attachment attached through (`VolumeReplaced`), but its record stays the backend's word: while
/// the export is there it says attached; once the export is gone (removed here by hand) it says
/// `attached: false`, phase Failed, and still waits for a person. Deleted, it is released.
#[tokio::test(flavor = "multi_thread")]
async fn an_attachment_under_a_volume_recreated_over_its_disk_follows_the_backend() {
    let mut s = Scenario::start().await;
    let volume = s.volume("recreated", HANDLE, json!({})).await;
    let (name, _) = s.attach("recreated", &volume, NODE_A).await;
    replace_volume(&s, &volume, HANDLE).await;

    let replaced = s
        .wait_attachment(&name, "Ready=False VolumeReplaced", |a| {
            has(condition(a, "Ready"), "False", Some("VolumeReplaced"))
        })
        .await;
    assert!(
        attached(&replaced) && phase(&replaced) == Some(AttachmentPhase::Attached),
        "the export is there: {}",
        show(Some(&replaced))
    );
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);

    s.qsd
        .qmp(
            "block-export-del",
            json!({ "id": export_id(HANDLE, NODE_A), "mode": "hard" }),
        )
        .await
        .expect("remove the export by hand");
    s.wait_attachment(&name, "attached: false, phase Failed", |a| {
        !attached(a)
            && phase(a) == Some(AttachmentPhase::Failed)
            && has(condition(a, "Ready"), "False", Some("VolumeReplaced"))
    })
    .await;
    tokio::time::sleep(2 * RESYNC).await;
    assert!(
        s.qsd.export_ids().await.is_empty(),
        "attached through the Volume that replaced its own: {:?}",
        s.qsd.export_ids().await
    );

    s.delete_attachment(&name).await;
    s.wait_attachment_gone(&name).await;
}

/// Two attachments of one Volume to one node share one connection (a GitOps rename creates the
/// new name before it prunes the old one). Deleting one hands the connection over: it is released
/// without a detach, the node's client keeps reading, the other stays Attached, and an Event on
/// each names the other.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_one_of_two_attachments_of_a_node_keeps_the_connection() {
    let mut s = Scenario::start().await;
    let volume = s.volume("renamed", HANDLE, json!({})).await;
    let (old, attached) = s.attach("old-name", &volume, NODE_A).await;
    let uri = uri_of(&attached);
    let mut client = support::qsd::NbdClient::connect_uri(&uri)
        .await
        .expect("a client on node-a");
    let (new, _) = s.attach("new-name", &volume, NODE_A).await;

    s.delete_attachment(&old).await;
    s.wait_attachment_gone(&old).await;
    // Past stuckAfter: a detach of the shared export would have been forced by now.
    tokio::time::sleep(support::scenario::STUCK_AFTER + 2 * RESYNC).await;
    assert_eq!(
        client.read().await,
        support::qsd::ReadOutcome::Ok,
        "the client of the remaining attachment was cut off"
    );
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    let kept = s.get_attachment(&new).await;
    assert!(
        kept.as_ref().is_some_and(is_attached),
        "{}",
        show(kept.as_ref())
    );
    s.wait_event(VA, &old, "HandedOver", &[&new]).await;
    s.wait_event(VA, &new, "ConnectionKept", &[&old]).await;
    client.close().await;
}

/// A second Volume that names the same backend volume as an existing one (an alias, here
/// `multiAttach: true` over a single-attach Volume's handle) would let two writers in, since
/// policy is per Volume and the backend's truth per handle. It is refused visibly: the alias says
/// `DuplicateVolumeHandle` with a Warning, nothing is attached through it, and its attachment can
/// still be deleted without touching the owner's connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_aliasing_another_ones_handle_is_refused() {
    let mut s = Scenario::start().await;
    let owner = s.volume("owner", HANDLE, json!({})).await;
    let (held, _) = s.attach("owner", &owner, NODE_A).await;
    // Creation times have whole seconds: the alias is created a second later, so it is younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let alias = s
        .volume("alias", HANDLE, json!({ "multiAttach": true }))
        .await;
    let through_alias = s.attachment("through-alias", &alias, "node-b").await;

    s.wait_attachment(&through_alias, "Ready=False DuplicateVolumeHandle", |a| {
        has(
            condition(a, "Ready"),
            "False",
            Some("DuplicateVolumeHandle"),
        )
    })
    .await;
    s.wait_volume(&alias, "Ready=False DuplicateVolumeHandle", |v| {
        has(
            support::scenario::volume_condition(v, "Ready"),
            "False",
            Some("DuplicateVolumeHandle"),
        )
    })
    .await;
    let warning = s
        .wait_event("Volume", &alias, "DuplicateVolumeHandle", &[&owner])
        .await;
    assert_eq!(warning.type_, "Warning");
    tokio::time::sleep(2 * RESYNC).await;
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A)],
        "attached through an alias of a single-attach volume's handle"
    );

    s.delete_attachment(&through_alias).await;
    s.wait_attachment_gone(&through_alias).await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    let still = s.get_attachment(&held).await;
    assert!(
        still.as_ref().is_some_and(is_attached),
        "{}",
        show(still.as_ref())
    );
}

/// A `phaseSince` ahead of the operator's clock (written by a replica whose clock runs ahead, or
/// read after this one was stepped back) has not begun to count: a detach held by a client is not
/// forced before `stuckAfter` has really passed.
#[tokio::test(flavor = "multi_thread")]
async fn a_phase_since_in_the_future_does_not_make_an_attachment_stuck() {
    let mut s = Scenario::start().await;
    let volume = s.volume("skewed", HANDLE, json!({})).await;
    let (name, attached) = s.attach("skewed", &volume, NODE_A).await;
    let uri = uri_of(&attached);
    let mut client = support::qsd::NbdClient::connect_uri(&uri)
        .await
        .expect("a client holds the export");
    s.delete_attachment(&name).await;
    let detaching = s
        .wait_attachment(&name, "Detaching", |a| {
            phase(a) == Some(AttachmentPhase::Detaching)
        })
        .await;

    // The record as another replica, an hour ahead, would have written it.
    let ahead = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let as_operator: Api<VolumeAttachment> = Api::all(support::cluster::operator_client().await);
    let mut status = detaching.status.clone().expect("a status");
    status.phase_since = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ahead));
    as_operator
        .patch_status(
            &name,
            &PatchParams::apply(safe_detach::MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "safedetach.io/v1alpha1",
                "kind": "VolumeAttachment",
                "status": status,
            })),
        )
        .await
        .expect("write phaseSince ahead of the clock");

    tokio::time::sleep(support::scenario::STUCK_AFTER + 2 * RESYNC).await;
    assert_eq!(
        client.read().await,
        support::qsd::ReadOutcome::Ok,
        "forced off on a clock that had not run: {}",
        show(s.get_attachment(&name).await.as_ref())
    );
    assert_eq!(s.occurrences(VA, &name, "ForceDetaching").await, 0);
    client.close().await;
    s.wait_attachment_gone(&name).await;
}
