//! The running system's invariant under the situations the per-volume turn, the conditioned
//! writes and the fence do not cover, end to end: the real operator binary on the real control
//! plane against a real `qemu-storage-daemon`.
//!
//! - An attachment deleted and created again under the same name while the operator's cache
//!   still has the old one.
//! - Two Volumes that name one backend volume.
//! - Two attachments of one (volume, node).
//! - An orphan that comes back while the operator's cache still has the Volume's older status.
//! - A restarted operator whose attachments are listed seconds after its Volumes.
//! - The apiserver restarting under attaches and detaches under way.
//!
//! Every check is what the backend shows (the daemon's exports, read over QMP directly, and the
//! commands it was sent, logged by the QMP proxy) or what the apiserver holds. Clocks are those
//! of `support::scenario`: `defaultStuckAfter: 5s`, `resyncInterval: 2s`, a driver deadline of 2s.

mod support;

use kube::ResourceExt;
use safe_detach::api::{AttachmentPhase, VOLUME_FINALIZER, Volume, VolumeAttachment};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;
use support::cluster::unique_name;
use support::harness::WAIT;
use support::operator::SHARD_LABEL;
use support::qmp_proxy::Fault;
use support::qsd::{NbdClient, ReadOutcome};
use support::scenario::{Scenario, Setup, attached, export_id, phase, show};
use tokio::time::Instant;

const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const EXPORT_POLL: Duration = Duration::from_millis(20);

/// Attached, as the backend confirmed it.
fn is_attached(attachment: &VolumeAttachment) -> bool {
    phase(attachment) == Some(AttachmentPhase::Attached) && attached(attachment)
}

/// How many times the daemon was told to cut `handle`'s export for `node` off.
fn hard_deletes_of(s: &Scenario, handle: &str, node: &str) -> usize {
    deletes_of(s, handle, node, "hard")
}

/// How many times the daemon was told to delete `handle`'s export for `node` in `mode`.
fn deletes_of(s: &Scenario, handle: &str, node: &str, mode: &str) -> usize {
    let export = export_id(handle, node);
    s.proxy()
        .calls_of("block-export-del")
        .iter()
        .filter(|arguments| arguments["id"] == export && arguments["mode"] == mode)
        .count()
}

/// Creates a Volume and waits until the operator has taken it in (its finalizer).
async fn taken_in(s: &mut Scenario, prefix: &str, handle: &str, spec: serde_json::Value) -> String {
    let volume = s.volume(prefix, handle, spec).await;
    s.wait_volume(&volume, "taken in by the operator", |v| {
        v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
    })
    .await;
    volume
}

/// Deletes `attachment`, then waits for its detach and for its Volume's release; the export must
/// be gone with them.
async fn detached_then_released(s: &Scenario, attachment: &str, volume: &str, export: &str) {
    s.delete_attachment(attachment).await;
    s.wait_attachment_gone(attachment).await;
    s.wait_for(&s.volumes, volume, "released and gone", WAIT, |v| {
        v.is_none()
    })
    .await;
    assert!(
        !s.qsd.export_ids().await.iter().any(|id| id == export),
        "the export {export} outlived its attachment's detach"
    );
}

/// Reads the daemon's exports every [`EXPORT_POLL`] for `window`: every export id seen, and
/// whether `export` was missing at some poll.
async fn watch_exports(s: &Scenario, window: Duration, export: &str) -> (BTreeSet<String>, usize) {
    let until = Instant::now() + window;
    let mut ever = BTreeSet::new();
    let mut missing = 0;
    while Instant::now() < until {
        let ids = s.qsd.export_ids().await;
        if !ids.iter().any(|id| id == export) {
            missing += 1;
        }
        ever.extend(ids);
        tokio::time::sleep(EXPORT_POLL).await;
    }
    (ever, missing)
}

// ---------------------------------------------------------------------------------------------
// An attachment re-created under the same name while the cache has the old one
// ---------------------------------------------------------------------------------------------

/// A user creates attachment X of volume 1 to node-a, thinks better of it, deletes it (it has no
/// finalizer yet: the operator has not seen it) and creates X again, now of volume 2 to node-b.
/// The operator's cache lags: it sees the first X first. Whatever it does with that stale X,
/// volume 1 must never be exported to node-b (no attachment ever asked for that), and the X that
/// exists must never be recorded Attached with volume 1's connection info.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_attachment_never_gets_the_old_ones_volume() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let first = taken_in(&mut s, "recreated", "rvol1", json!({})).await;
    let second = taken_in(&mut s, "recreated", "rvol2", json!({})).await;
    let name = s.attachment_name("recreated");

    s.api().set_watch_delay(Duration::from_secs(6));
    s.create_attachment(&name, &first, NODE_A).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    s.delete_attachment(&name).await;
    s.wait_for(
        &s.attachments,
        &name,
        "gone at once (no finalizer yet)",
        Duration::from_secs(5),
        |a| a.is_none(),
    )
    .await;
    s.create_attachment(&name, &second, NODE_B).await;
    let uid = s.get_attachment(&name).await.expect("just created").uid();

    // The stale X reaches the operator 6 s after its creation; the new one 3.5 s later.
    let wrong = export_id("rvol1", NODE_B);
    let mut wrong_record = None;
    let until = Instant::now() + Duration::from_secs(16);
    let mut ever = BTreeSet::new();
    while Instant::now() < until {
        ever.extend(s.qsd.export_ids().await);
        if let Some(a) = s.get_attachment(&name).await
            && a.uid() == uid
            && is_attached(&a)
            && a.status
                .as_ref()
                .and_then(|st| st.connection_info.get("exportName"))
                .is_some_and(|e| *e == wrong)
            && wrong_record.is_none()
        {
            wrong_record = Some(show(Some(&a)));
        }
        tokio::time::sleep(EXPORT_POLL).await;
    }
    s.api().set_watch_delay(Duration::ZERO);
    let now = s.qsd.export_ids().await;
    println!(
        "FIGURE: re-created attachment: exports ever seen {ever:?}; now {now:?}; recorded Attached with {wrong}: {}",
        wrong_record.is_some()
    );
    let mut problems = Vec::new();
    if ever.contains(&wrong) {
        problems.push(format!(
            "the daemon exported volume 1 to {NODE_B} ({wrong}), which no attachment asked for; still there at the end: {}",
            now.contains(&wrong)
        ));
    }
    if let Some(record) = wrong_record {
        problems.push(format!(
            "the attachment of volume 2 was recorded Attached with volume 1's connection info:\n{record}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\n--- operator log (end) ---\n{}",
        problems.join("\n"),
        s.log_tail(60)
    );
}

// ---------------------------------------------------------------------------------------------
// Two Volumes that name one backend volume
// ---------------------------------------------------------------------------------------------

/// Volume 1 is attached to node-a, a user reading and writing through it. A second Volume names
/// the same backend volume (same driver and handle: the per-volume turn is shared, so the design
/// expects it), with `orphanPolicy: Detach`. The connection to node-a is claimed by an attachment
/// of the same backend volume: it is no orphan, and nothing may force it off.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_volume_of_one_handle_does_not_force_off_the_first_ones_attachment() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "shared1";
    let volume = taken_in(&mut s, "shared", handle, json!({})).await;
    let (name, record) = s.attach("shared", &volume, NODE_A).await;
    let uri = record.status.as_ref().expect("a status").connection_info["uri"].clone();
    let mut user = NbdClient::connect_uri(&uri)
        .await
        .expect("the user connects");

    let _other = taken_in(
        &mut s,
        "shared-alias",
        handle,
        json!({ "orphanPolicy": "Detach", "stuckAfter": "5s" }),
    )
    .await;
    let export = export_id(handle, NODE_A);
    // Twice the grace, and the 1 s look again after a force.
    let (_, missing) = watch_exports(&s, Duration::from_secs(13), &export).await;
    let forced = hard_deletes_of(&s, handle, NODE_A);
    let read = user.read().await;
    let last = s.get_attachment(&name).await;
    println!(
        "FIGURE: two Volumes of one handle: {forced} forced deletes of {export}, missing at {missing} polls, the user's read afterwards: {read:?}"
    );
    assert!(
        forced == 0 && missing == 0,
        "the second Volume took {export}, claimed by attachment {name} of the first, for an orphan: {forced} forced deletes, missing at {missing} polls; the user's read afterwards: {read:?}; the attachment now:\n{}\n--- operator log (end) ---\n{}",
        show(last.as_ref()),
        s.log_tail(60)
    );
    user.close().await;
}

// ---------------------------------------------------------------------------------------------
// Two attachments of one (volume, node)
// ---------------------------------------------------------------------------------------------

/// Two attachments ask for one volume on node-a (a duplicate manifest, a second tool). Both end
/// Attached on the one export. Deleting the duplicate must not take the volume from the other,
/// which nobody asked to detach and whose user is connected: the export stays, and nothing is
/// forced off.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_duplicate_attachment_leaves_the_other_of_the_same_node_connected() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "dup1";
    let volume = taken_in(&mut s, "dup", handle, json!({})).await;
    let (keep, record) = s.attach("dup", &volume, NODE_A).await;
    let uri = record.status.as_ref().expect("a status").connection_info["uri"].clone();
    let mut user = NbdClient::connect_uri(&uri)
        .await
        .expect("the user connects");
    let (duplicate, _) = s.attach("dup", &volume, NODE_A).await;
    let export = export_id(handle, NODE_A);
    assert_eq!(s.qsd.export_ids().await, std::slice::from_ref(&export));

    s.delete_attachment(&duplicate).await;
    // Past the stuck clock (5 s) of a safe detach the user refuses, and the force after it.
    let (_, missing) = watch_exports(&s, Duration::from_secs(12), &export).await;
    let forced = hard_deletes_of(&s, handle, NODE_A);
    let safe = deletes_of(&s, handle, NODE_A, "safe");
    let read = user.read().await;
    let kept = s.get_attachment(&keep).await;
    println!(
        "FIGURE: duplicate attachment deleted: {safe} safe and {forced} forced deletes of {export}, missing at {missing} polls, the user's read afterwards: {read:?}"
    );
    assert!(
        forced == 0 && missing == 0,
        "deleting {duplicate} took {export} from {keep}, which is live and nobody asked to detach: {safe} safe and {forced} forced deletes, missing at {missing} polls; the user's read afterwards: {read:?}; {keep} now:\n{}\n--- operator log (end) ---\n{}",
        show(kept.as_ref()),
        s.log_tail(60)
    );
    user.close().await;
}

// ---------------------------------------------------------------------------------------------
// A deleted Volume's orphan, forced through a lost reply and a lagging cache
// ---------------------------------------------------------------------------------------------

/// A Volume under `orphanPolicy: Detach` is the last record of a connection no attachment claims:
/// deleted, it stays until that connection is forced off and the backend shows it gone. Here the
/// operator's cache lags 5 s, and the reply to its forced `block-export-del` is lost (the daemon
/// carries it out): the call's outcome is unknown to the operator, which releases the Volume only
/// on a later probe. Each poll reads the Volume first, then the exports: an export still served
/// after the Volume was seen gone is a release too early (one removed between the release and
/// that read is missed). At no poll is the Volume gone while the export is served, and it does
/// go.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volumes_orphan_forced_through_a_lost_reply_goes_before_the_volume() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "orphandel1";
    let volume = taken_in(
        &mut s,
        "orphandel",
        handle,
        json!({ "orphanPolicy": "Detach", "stuckAfter": "5s" }),
    )
    .await;
    let uri = s.export_out_of_band(handle, NODE_A, false).await;
    let mut client = NbdClient::connect_uri(&uri).await.expect("a client");
    s.wait_volume(&volume, "the orphan recorded", |v| {
        v.status
            .as_ref()
            .is_some_and(|st| st.orphans.iter().any(|o| o.node == NODE_A))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.api().set_watch_delay(Duration::from_secs(5));
    s.proxy().arm("block-export-del", Fault::DropReply);
    s.volumes
        .delete(&volume, &Default::default())
        .await
        .expect("delete the Volume");

    let export = export_id(handle, NODE_A);
    let give_up = Instant::now() + WAIT;
    let mut served_while_there = 0;
    loop {
        let present = s.volumes.get_opt(&volume).await.expect("get the Volume");
        let exports = s.qsd.export_ids().await;
        let served = exports.contains(&export);
        if present.is_none() {
            assert!(
                !served,
                "the Volume went while {export} was still served\n{}",
                s.log_tail(80)
            );
            break;
        }
        served_while_there += usize::from(served);
        assert!(
            Instant::now() < give_up,
            "the deleted Volume did not go; exports {exports:?}\n{}",
            s.log_tail(80)
        );
        tokio::time::sleep(EXPORT_POLL).await;
    }
    s.api().set_watch_delay(Duration::ZERO);
    let fired = s.proxy().fired();
    let forced = hard_deletes_of(&s, handle, NODE_A);
    println!(
        "FIGURE: deleted Volume's orphan: the export seen served at {served_while_there} polls while the Volume stayed, {forced} hard deletes, {fired} replies lost"
    );
    assert!(
        served_while_there > 0,
        "the orphan was seen served meanwhile"
    );
    assert_eq!(fired, 1, "the forced delete's reply was lost");
    assert!(forced >= 1);
    assert!(s.qsd.export_ids().await.is_empty());
    assert_eq!(client.read().await, ReadOutcome::IoError, "cut off");
}

// ---------------------------------------------------------------------------------------------
// An orphan that comes back under a lagging cache
// ---------------------------------------------------------------------------------------------

/// Under `orphanPolicy: Detach` an unclaimed connection is forced off only once it has been
/// unclaimed for the grace (stuckAfter, 5 s here), "so that an attach racing with the
/// attachment's creation is never cut off". A connection to node-a appears, is recorded as an
/// orphan, goes away before its grace ends, and the operator records that. The operator's cache
/// lags its own writes (30 s). Once the first orphan's grace would have ended, a new connection
/// to node-a appears: it gets a grace of its own, and is not forced off within 4 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_returning_orphan_gets_its_whole_grace_while_the_cache_lags() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "orphan1";
    let volume = taken_in(
        &mut s,
        "orphan",
        handle,
        json!({ "orphanPolicy": "Detach", "stuckAfter": "5s" }),
    )
    .await;
    let orphans = |v: &Volume| -> Vec<String> {
        v.status
            .as_ref()
            .map(|st| st.orphans.iter().map(|o| o.node.clone()).collect())
            .unwrap_or_default()
    };

    s.export_out_of_band(handle, NODE_A, false).await;
    let seen = s
        .wait_volume(&volume, "the orphan recorded", |v| orphans(v) == [NODE_A])
        .await;
    let since = seen.status.as_ref().expect("a status").orphans[0].since.0;
    // Let that write reach the cache, then make the cache lag.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.api().set_watch_delay(Duration::from_secs(30));
    s.delete_export_out_of_band(handle, NODE_A).await;
    s.wait_volume(&volume, "the orphan gone from the record", |v| {
        orphans(v).is_empty()
            && v.status
                .as_ref()
                .is_some_and(|st| st.connected_nodes.is_empty())
    })
    .await;
    assert_eq!(
        hard_deletes_of(&s, handle, NODE_A),
        0,
        "the first orphan left on its own"
    );

    // Past the end of the first orphan's grace, counted from when it was first seen.
    let past = since.checked_add(Duration::from_secs(7)).expect("a time");
    let wait = past.duration_since(jiff::Timestamp::now());
    if let Ok(wait) = Duration::try_from(wait) {
        tokio::time::sleep(wait).await;
    }
    s.export_out_of_band(handle, NODE_A, false).await;
    let appeared = Instant::now();
    let export = export_id(handle, NODE_A);
    let (_, missing) = watch_exports(&s, Duration::from_secs(4), &export).await;
    let forced = hard_deletes_of(&s, handle, NODE_A);
    let first_force = s
        .proxy()
        .calls()
        .into_iter()
        .find(|c| c.command == "block-export-del" && c.arguments["id"] == export)
        .map(|c| {
            let at = Instant::from_std(c.at);
            at.saturating_duration_since(appeared)
        });
    s.api().set_watch_delay(Duration::ZERO);
    let record = s.get_volume(&volume).await;
    println!(
        "FIGURE: returning orphan under a 30 s cache lag: forced {forced} times, the first {first_force:?} after it appeared (grace 5 s); missing at {missing} polls"
    );
    assert!(
        forced == 0 && missing == 0,
        "the new connection {export} was forced off {first_force:?} after it appeared, before its 5 s grace (forced {forced} times, missing at {missing} polls): the grace was counted from the first orphan's time in the cached Volume; the Volume now:\n{}\n--- operator log (end) ---\n{}",
        show(Some(&record)),
        s.log_tail(60)
    );
}

// ---------------------------------------------------------------------------------------------
// The Volume's policy, as the cache has it
// ---------------------------------------------------------------------------------------------

/// Sets `spec` fields of the Volume `name` with a merge patch, as `kubectl patch` does.
async fn patch_volume(s: &Scenario, name: &str, spec: serde_json::Value) {
    s.volumes
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap_or_else(|e| panic!("patch Volume {name}: {e}"));
}

/// Makes the operator's cache learn of the change made in `late` 12 s late, and of what follows
/// 2 s later at once: the change reaches the operator after the later ones.
async fn behind_later_changes<F: Future<Output = ()>>(s: &Scenario, late: F) {
    s.api().set_watch_delay(Duration::from_secs(12));
    late.await;
    // Its watch chunks have come through the proxy, stamped with the long delay (generously:
    // the apiserver may be slow to send them when many tests run).
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.api().set_watch_delay(Duration::ZERO);
}

/// A multi-attach Volume is attached to node-a. Its owner makes it single-attach (the apiserver
/// has `multiAttach: false`), then an attachment to node-b is created. The operator's Volume
/// cache lags (the change reaches it 12 s late, the new attachment at once). The backend shows
/// the volume on node-a and the Volume says single-attach: node-b must not get it.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_made_single_attach_is_not_attached_to_a_second_node_on_its_old_policy() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "policy1";
    let volume = taken_in(&mut s, "policy", handle, json!({ "multiAttach": true })).await;
    let (_first, _) = s.attach("policy", &volume, NODE_A).await;
    behind_later_changes(
        &s,
        patch_volume(&s, &volume, json!({ "multiAttach": false })),
    )
    .await;
    assert!(!s.get_volume(&volume).await.spec.multi_attach);

    let second = s.attachment("policy", &volume, NODE_B).await;
    let export = export_id(handle, NODE_A);
    let (ever, missing) = watch_exports(&s, Duration::from_secs(8), &export).await;
    let wrong = export_id(handle, NODE_B);
    let record = s.get_attachment(&second).await;
    println!(
        "FIGURE: single-attach again under a lagging Volume cache: exports seen {ever:?}; {export} missing at {missing} polls"
    );
    assert!(
        !ever.contains(&wrong),
        "the single-attach Volume {volume} was exported to {NODE_B} ({wrong}) while the backend showed it on {NODE_A}: attached on the cached multiAttach: true; {second} now:\n{}\n--- operator log (end) ---\n{}",
        show(record.as_ref()),
        s.log_tail(60)
    );
}

/// A Volume is deleted (the apiserver has its deletionTimestamp; its finalizer holds it), then
/// an attachment of it is created. The operator's Volume cache lags (the deletion reaches it
/// 12 s late, the new attachment at once). "A Volume on its way out is not attached anywhere
/// new": the backend must not export it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volume_is_not_attached_anywhere_new_while_the_cache_lags() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "gone1";
    // Multi-attach, and held by an attachment on another node: its finalizer keeps the deleted
    // Volume, and only the deletion stands between a new attachment and the backend.
    let volume = taken_in(&mut s, "deleted", handle, json!({ "multiAttach": true })).await;
    let (holder, _) = s.attach("holder", &volume, NODE_B).await;
    let volumes = s.volumes.clone();
    let name = volume.clone();
    behind_later_changes(&s, async move {
        volumes
            .delete(&name, &kube::api::DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete Volume {name}: {e}"));
    })
    .await;
    let seen = s.get_volume(&volume).await;
    assert!(seen.metadata.deletion_timestamp.is_some(), "being deleted");

    let attachment = s.attachment("deleted", &volume, NODE_A).await;
    let export = export_id(handle, NODE_A);
    let (ever, _) = watch_exports(&s, Duration::from_secs(6), &export).await;
    let record = s.get_attachment(&attachment).await;
    println!("FIGURE: attachment of a deleted Volume under a lagging cache: exports seen {ever:?}");
    // Let the detach of the deleted attachment go through before the scenario ends.
    s.delete_attachment(&attachment).await;
    s.delete_attachment(&holder).await;
    assert!(
        !ever.contains(&export),
        "Volume {volume}, being deleted, was exported to {NODE_A} ({export}) for {attachment}; the attachment then:\n{}\n--- operator log (end) ---\n{}",
        show(record.as_ref()),
        s.log_tail(60)
    );
}

// ---------------------------------------------------------------------------------------------
// A restart whose attachments are listed after its Volumes
// ---------------------------------------------------------------------------------------------

/// How late the apiserver answers the restarted operator's list of VolumeAttachments.
const LATE_LIST: Duration = Duration::from_secs(6);

/// A Volume is deleted while an attachment still holds it on node-a, and the operator starts
/// again (a crash, a rolling update, a new leader) while the apiserver is slow to list
/// VolumeAttachments: its Volume cache fills seconds before its attachment cache. Until the
/// attachments are known, that none names the Volume is not known either: the Volume's finalizer
/// must stay, the connection must not be recorded as an orphan, and the export must stay.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volume_keeps_its_finalizer_while_its_attachments_are_still_being_listed() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let handle = "late1";
    let volume = taken_in(&mut s, "late", handle, json!({})).await;
    let (attachment, _) = s.attach("late", &volume, NODE_A).await;
    s.operator.kill();
    s.volumes
        .delete(&volume, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete Volume {volume}: {e}"));
    s.api().set_list_delay("volumeattachments", LATE_LIST);
    s.operator.restart();

    // Through the late list, and a little after it.
    let export = export_id(handle, NODE_A);
    let until = Instant::now() + LATE_LIST + Duration::from_secs(3);
    let mut broken = BTreeSet::new();
    while Instant::now() < until {
        let record = s
            .volumes
            .get_opt(&volume)
            .await
            .unwrap_or_else(|e| panic!("get Volume {volume}: {e}"));
        let Some(record) = record else {
            broken.insert("the Volume is gone".to_owned());
            break;
        };
        if !record.finalizers().iter().any(|f| f == VOLUME_FINALIZER) {
            broken.insert("the Volume's finalizer was released".to_owned());
        }
        let orphans: Vec<String> = record
            .status
            .as_ref()
            .map(|st| st.orphans.iter().map(|o| o.node.clone()).collect())
            .unwrap_or_default();
        if !orphans.is_empty() {
            broken.insert(format!("the Volume recorded orphans on {orphans:?}"));
        }
        if !s.qsd.export_ids().await.contains(&export) {
            broken.insert(format!("the export {export} went"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.api().set_list_delay("volumeattachments", Duration::ZERO);
    assert!(
        broken.is_empty(),
        "{broken:?} while {attachment} still named it on {NODE_A} and the operator's list of attachments was {LATE_LIST:?} late\n--- operator log (end) ---\n{}",
        s.log_tail(40)
    );
    // The attachment still names the Volume: its detach, then the Volume's release, as designed.
    detached_then_released(&s, &attachment, &volume, &export).await;
}

/// An attached attachment is relabelled out of the operator's shard (`--selector`), and its
/// Volume deleted. The attachment still names the Volume and holds its connection: the Volume's
/// finalizer must stay, and the export with it, whatever the attachment's labels say.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volume_stays_while_an_attachment_relabelled_out_of_the_shard_names_it() {
    let mut s = Scenario::start().await;
    let handle = "relabel1";
    let volume = taken_in(&mut s, "relabel", handle, json!({})).await;
    let (attachment, _) = s.attach("relabel", &volume, NODE_A).await;
    let relabel = |shard: String| {
        let attachments = s.attachments.clone();
        let attachment = attachment.clone();
        async move {
            let patch = json!({ "metadata": { "labels": { SHARD_LABEL: shard } } });
            attachments
                .patch(
                    &attachment,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .unwrap_or_else(|e| panic!("relabel {attachment}: {e}"));
        }
    };
    relabel(unique_name("elsewhere")).await;
    s.volumes
        .delete(&volume, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete Volume {volume}: {e}"));

    let export = export_id(handle, NODE_A);
    let until = Instant::now() + Duration::from_secs(5);
    let mut broken = BTreeSet::new();
    while Instant::now() < until {
        let record = s
            .volumes
            .get_opt(&volume)
            .await
            .unwrap_or_else(|e| panic!("get Volume {volume}: {e}"));
        match record {
            None => {
                broken.insert("the Volume is gone".to_owned());
                break;
            }
            Some(record) if !record.finalizers().iter().any(|f| f == VOLUME_FINALIZER) => {
                broken.insert("the Volume's finalizer was released".to_owned());
            }
            Some(_) => {}
        }
        if !s.qsd.export_ids().await.contains(&export) {
            broken.insert(format!("the export {export} went"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        broken.is_empty(),
        "{broken:?} while {attachment}, out of the shard, still named it on {NODE_A}\n--- operator log (end) ---\n{}",
        s.log_tail(40)
    );
    // Back in the shard and deleted: its detach, then the Volume's release.
    relabel(s.shard.clone()).await;
    detached_then_released(&s, &attachment, &volume, &export).await;
}

// ---------------------------------------------------------------------------------------------
// An export the driver did not name
// ---------------------------------------------------------------------------------------------

/// The volume's disk is exported by hand under an id the driver does not give (on the volume's
/// own block node, so it serves the same disk). The attachments' probe counts it as a connection
/// that may be anyone's; the Volume's record must not say the volume is connected nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_served_under_a_foreign_export_id_is_not_recorded_connected_nowhere() {
    let mut s = Scenario::start().await;
    let handle = "foreign1";
    let volume = taken_in(&mut s, "foreign", handle, json!({})).await;
    let image = s.qsd.image_dir().join(handle);
    let node_name = safe_detach::driver::nbd::block_node_name(handle);
    s.qsd.qmp(
        "blockdev-add",
        json!({ "driver": "raw", "node-name": node_name, "file": { "driver": "file", "filename": image } }),
    )
    .await
    .expect("blockdev-add");
    let nbd = s.qsd.nbd_socket();
    let _ = s
        .qsd
        .qmp(
            "nbd-server-start",
            json!({ "addr": { "type": "unix", "data": { "path": nbd } } }),
        )
        .await;
    s.qsd.qmp(
        "block-export-add",
        json!({ "type": "nbd", "id": "handmade", "node-name": node_name, "name": "handmade", "writable": true }),
    )
    .await
    .expect("block-export-add");
    let mut user = NbdClient::connect(&nbd, "handmade")
        .await
        .expect("a user of it");

    // Several resyncs (2 s) of the Volume.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let seen = s.get_volume(&volume).await;
    let status = seen.status.clone().unwrap_or_default();
    let result = status.last_probe.as_ref().map(|p| p.result);
    let read = user.read().await;
    println!(
        "FIGURE: foreign export of the disk: the Volume says phase {:?}, lastProbe {result:?}, connectedNodes {:?}; the user reads: {read:?}",
        status.phase, status.connected_nodes
    );
    let _ = s
        .qsd
        .qmp(
            "block-export-del",
            json!({ "id": "handmade", "mode": "hard" }),
        )
        .await;
    user.close().await;
    assert!(
        result != Some(safe_detach::api::ProbeResult::NotConnected)
            && status.phase != Some(safe_detach::api::VolumePhase::Available),
        "the Volume records its disk connected nowhere (phase {:?}, lastProbe {result:?}) while the daemon serves it as export 'handmade' to a connected user:\n{}",
        status.phase,
        show(Some(&seen))
    );
}

// ---------------------------------------------------------------------------------------------
// A storm of changes to the attachment
// ---------------------------------------------------------------------------------------------

/// Another tool changes the attachment's labels every 50 ms for the whole of its life, so that
/// almost every status write of the operator is refused as based on an older version. The
/// attachment still attaches once, to one node; its record never says Detached while the daemon
/// still exports it; and its finalizer goes only once the export is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_storm_neither_doubles_an_attach_nor_releases_early() {
    conflict_storm("storm1", None).await;
}

/// The same storm, on an attachment whose status holds a force-detach token with characters the
/// apiserver escapes when it encodes a string (`&`, `<`, `>`): the release sent again on what it
/// rests on compares the status as the apiserver encodes it, and goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_storm_releases_an_attachment_whose_status_holds_escaped_text() {
    conflict_storm("storm2", Some("t&<1>")).await;
}

/// Attaches under the label storm; with `token`, forces the attachment off and back on with that
/// force-detach token once attached; then deletes it and watches the record against the daemon.
async fn conflict_storm(handle: &str, token: Option<&str>) {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = taken_in(&mut s, "storm", handle, json!({})).await;
    let name = s.attachment_name("storm");
    s.api().set_watch_delay(Duration::from_millis(300));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let api = s.attachments.clone();
        let name = name.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let _ = api
                    .patch(
                        &name,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(
                            json!({ "metadata": { "labels": { "storm": i.to_string() } } }),
                        ),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    s.create_attachment(&name, &volume, NODE_A).await;
    let export = export_id(handle, NODE_A);
    let mut problems = Vec::new();
    // A forced detach and the attach after it take more steps under the storm.
    let within = Duration::from_secs(if token.is_some() { 60 } else { 40 });
    let until = Instant::now() + within;
    let mut deleted = false;
    let mut attached_seen = false;
    let mut forced = false;
    loop {
        // The record first, then the daemon: a record that says Detached must find it gone.
        let record = s.get_attachment(&name).await;
        let exports = s.qsd.export_ids().await;
        if exports
            .iter()
            .filter(|e| e.starts_with(&format!("sd_{handle}__")))
            .count()
            > 1
        {
            problems.push(format!("exported to several nodes: {exports:?}"));
        }
        match &record {
            Some(a) if is_attached(a) => {
                attached_seen = true;
                let handled = |token: &str| {
                    a.status
                        .as_ref()
                        .is_some_and(|st| st.handled_tokens.iter().any(|t| t == token))
                };
                match token {
                    Some(token) if !forced => {
                        s.annotate(&name, token).await;
                        forced = true;
                        attached_seen = false;
                    }
                    // Attached again after the forced detach.
                    Some(token) if !handled(token) => attached_seen = false,
                    _ => {}
                }
            }
            Some(a)
                if deleted
                    && phase(a) == Some(AttachmentPhase::Detached)
                    && exports.contains(&export) =>
            {
                problems.push(format!("recorded Detached while {export} is exported"));
            }
            None if exports.contains(&export) => {
                problems.push(format!("released while {export} is exported"));
                break;
            }
            None => break,
            _ => {}
        }
        if attached_seen && !deleted {
            s.delete_attachment(&name).await;
            deleted = true;
        }
        if Instant::now() > until {
            problems.push(format!(
                "not through within {within:?} (attached seen: {attached_seen}); last record:\n{}",
                show(record.as_ref())
            ));
            break;
        }
        tokio::time::sleep(EXPORT_POLL).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = storm.await;
    s.api().set_watch_delay(Duration::ZERO);
    let adds = s
        .proxy()
        .calls_of("block-export-add")
        .iter()
        .filter(|a| a["id"] == export)
        .count();
    let conflicts = s
        .api()
        .writes()
        .iter()
        .filter(|w| w.to_attachment_status())
        .count();
    println!(
        "FIGURE: conflict storm: {adds} export adds, {conflicts} status writes tried, problems: {}",
        problems.len()
    );
    let wanted = if token.is_some() { 2 } else { 1 };
    if adds != wanted {
        problems.push(format!("the export was added {adds} times (want {wanted})"));
    }
    if std::env::var("TMPDUMP").is_ok() {
        println!("{}", s.log_tail(200));
    }
    assert!(
        problems.is_empty(),
        "{}\n--- operator log (end) ---\n{}",
        problems.join("\n"),
        s.log_tail(200)
    );
}

/// Volumes deleted a moment after an attachment of theirs was created, many at once, each at its
/// own delay: whenever a Volume goes, no attachment may have recorded an attach to it (an
/// attach holds its Volume first, so a Volume that goes at once had nothing attached).
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_deleted_while_its_attachment_is_new_goes_only_if_nothing_attached_to_it() {
    let mut s = Scenario::start().await;
    let mut pairs = Vec::new();
    for i in 0..16 {
        let volume = s.volume("race", &format!("race{i}"), json!({})).await;
        let attachment = s.attachment_name("race");
        pairs.push((volume, attachment, Duration::from_millis(80 * i as u64)));
    }
    let s = &s;
    let broken: Vec<String> =
        futures::future::join_all(pairs.iter().map(|(volume, attachment, delay)| async move {
            s.create_attachment(attachment, volume, NODE_A).await;
            tokio::time::sleep(*delay).await;
            let uid = s.get_volume(volume).await.uid().unwrap_or_default();
            s.volumes
                .delete(volume, &kube::api::DeleteParams::default())
                .await
                .unwrap_or_else(|e| panic!("delete Volume {volume}: {e}"));
            let mut claims = Vec::new();
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let record = s.get_attachment(attachment).await;
                let gone = s
                    .volumes
                    .get_opt(volume)
                    .await
                    .unwrap_or_else(|e| panic!("get Volume {volume}: {e}"))
                    .is_none_or(|v| v.uid().unwrap_or_default() != uid);
                let status = record.as_ref().and_then(|a| a.status.clone());
                let bound = status
                    .as_ref()
                    .and_then(|st| st.bound_to.as_ref())
                    .is_some_and(|b| b.volume_uid == uid);
                if bound {
                    claims.push(format!("{:?}", status.as_ref().and_then(|st| st.phase)));
                }
                if gone {
                    return (!claims.is_empty()).then(|| {
                        format!("{volume} went while {attachment} was bound to it: {claims:?}")
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        broken.is_empty(),
        "{broken:#?}\n--- operator log (end) ---\n{}",
        s.log_tail(60)
    );
}

// ---------------------------------------------------------------------------------------------
// The apiserver restarting
// ---------------------------------------------------------------------------------------------

/// An apiserver restart as the operator sees it (`support::api_proxy`): its watches end, the
/// answers of requests under way are lost though their writes land, and for a while every request
/// is refused. Restarts fall among attaches and detaches under way; afterwards every record is
/// what the backend shows: the kept attachments `Attached` and exported, the deleted ones gone
/// and not exported, and nothing else exported.
#[tokio::test(flavor = "multi_thread")]
async fn apiserver_restarts_among_attaches_and_detaches_leave_every_record_true() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        api_proxy: true,
        ..Setup::default()
    })
    .await;
    const VOLUMES: usize = 4;
    let mut volumes = Vec::new();
    for i in 0..VOLUMES {
        let handle = format!("restart{i}");
        volumes.push((
            taken_in(&mut s, "restart", &handle, json!({})).await,
            handle,
        ));
    }
    // Half attached first, to be detached across the restarts; half attached across them.
    let mut leaving = Vec::new();
    for (volume, _) in &volumes[..VOLUMES / 2] {
        leaving.push(s.attach("leaving", volume, NODE_A).await.0);
    }
    let mut coming = Vec::new();
    for (volume, _) in &volumes[VOLUMES / 2..] {
        coming.push(s.attachment("coming", volume, NODE_B).await);
    }
    for name in &leaving {
        s.delete_attachment(name).await;
    }
    for down in [300, 1500, 700] {
        s.api().restart(Duration::from_millis(down));
        tokio::time::sleep(Duration::from_millis(down + 400)).await;
    }
    let (refused, lost) = s.api().restart_effects();

    for name in &coming {
        s.wait_attached(name).await;
    }
    for name in &leaving {
        s.wait_attachment_gone(name).await;
    }
    let expected: BTreeSet<String> = volumes[VOLUMES / 2..]
        .iter()
        .map(|(_, handle)| export_id(handle, NODE_B))
        .collect();
    let exports: BTreeSet<String> = s.qsd.export_ids().await.into_iter().collect();
    println!(
        "FIGURE: three apiserver restarts: {refused} requests refused, {lost} answers lost; exports afterwards {exports:?}"
    );
    assert!(
        refused > 0,
        "the restarts refused nothing: the fault did not happen"
    );
    assert_eq!(
        exports,
        expected,
        "the backend exports exactly the attachments kept\n--- operator log (end) ---\n{}",
        s.log_tail(60)
    );
    for name in &coming {
        assert!(is_attached(&s.get_attachment(name).await.expect("kept")));
    }
}
