//! The operator end to end: the real binary under its RBAC-bound identity, on the real control
//! plane, against a real `qemu-storage-daemon` with real NBD clients (`qemu-io`) holding exports
//! open. Every stuck state here is made real — a backend that refuses, a reply that is lost, a
//! client that will not let go, an operator killed mid-call — never written into a status by hand.
//!
//! Each test has its own daemon, its own operator and its own shard of objects (see
//! `support::scenario`), so the tests run side by side. Clocks are short: `defaultStuckAfter: 5s`
//! (the CRD's minimum), `resyncInterval: 2s`, a driver deadline of 2s unless a test says otherwise.
//!
//! Run with `--nocapture` to see the `FIGURE:` lines.

mod support;

use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, WatchEvent, WatchParams};
use safe_detach::api::{
    ATTACHMENT_FINALIZER, AttachmentPhase, ForceDetachReason, ForceDetachState, OrphanPolicy,
    VOLUME_FINALIZER, VolumeAttachment, VolumePhase,
};
use serde_json::json;
use std::time::Duration;
use support::api_proxy::ApiWrite;
use support::operator::driver_calls;
use support::qmp_proxy::Fault;
use support::qsd::{NbdClient, ReadOutcome};
use support::scenario::{
    RESYNC, STUCK_AFTER, Scenario, Setup, WAIT, attached, condition, describe_events, export_id,
    has, phase, volume_condition,
};
use tokio::time::Instant;

const VA: &str = "VolumeAttachment";
const VOLUME: &str = "Volume";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const HANDLE: &str = "vol1";

/// The NBD URI the operator recorded for an attachment.
fn uri(attachment: &VolumeAttachment) -> String {
    attachment
        .status
        .as_ref()
        .and_then(|s| s.connection_info.get("uri"))
        .unwrap_or_else(|| panic!("{} has no connectionInfo.uri", attachment.name_any()))
        .clone()
}

/// A node's NBD client on the attachment's export, proven by a first read.
async fn client_of(attachment: &VolumeAttachment) -> NbdClient {
    NbdClient::connect_uri(&uri(attachment))
        .await
        .expect("an NBD client reaches the export the operator recorded")
}

/// The time recorded as the start of the attachment's current phase.
fn phase_since(attachment: &VolumeAttachment) -> Timestamp {
    attachment
        .status
        .as_ref()
        .and_then(|s| s.phase_since.as_ref())
        .expect("phaseSince recorded")
        .0
}

fn secs(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).expect("a small duration")
}

/// How long from now until `at` (zero if it has passed).
fn until(at: Timestamp) -> Duration {
    let left = at.duration_since(Timestamp::now());
    if left.is_negative() {
        Duration::ZERO
    } else {
        left.unsigned_abs()
    }
}

fn force_detach(attachment: &VolumeAttachment) -> safe_detach::api::ForceDetachStatus {
    attachment
        .status
        .as_ref()
        .and_then(|s| s.force_detach.clone())
        .unwrap_or_else(|| panic!("{} has no forceDetach record", attachment.name_any()))
}

/// Polls the attachment and the daemon together until the attachment is gone, and checks on the
/// way that the record never said "detached" (phase `Detached`, or the object released) while
/// the daemon still listed the export. Each round reads the record first and the daemon second,
/// so an export listed after a "detached" record was listed when the record was written.
/// Returns (when the export was first seen gone, when the record first said detached).
async fn watch_detach_order(s: &Scenario, name: &str, export: &str) -> (Instant, Instant) {
    let give_up = Instant::now() + WAIT;
    let mut export_gone = None;
    let mut recorded = None;
    loop {
        let record = s.get_attachment(name).await;
        let says_detached = record
            .as_ref()
            .is_none_or(|a| phase(a) == Some(AttachmentPhase::Detached));
        let listed = s.qsd.export_ids().await.iter().any(|id| id == export);
        let now = Instant::now();
        assert!(
            !(says_detached && listed),
            "the record of {name} says detached ({}) while the daemon still lists {export}\n--- operator log (end) ---\n{}",
            record.map_or("object released".into(), |a| format!("{:?}", a.status)),
            s.log_tail(60)
        );
        if !listed && export_gone.is_none() {
            export_gone = Some(now);
        }
        if says_detached && recorded.is_none() {
            recorded = Some(now);
        }
        if record.is_none() {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "{name} was not released within {WAIT:?}\n--- operator log (end) ---\n{}",
            s.log_tail(80)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (
        export_gone.expect("the export went away"),
        recorded.expect("the record said detached"),
    )
}

// ---------------------------------------------------------------------------------------------
// The normal course
// ---------------------------------------------------------------------------------------------

/// Attach: a VolumeAttachment becomes Attached, confirmed by the backend, with an NBD URI a node
/// really reads through. Detach: deleting it detaches on the backend, and only then does the
/// operator release its finalizer.
#[tokio::test(flavor = "multi_thread")]
async fn normal_attach_serves_the_volume_and_delete_detaches_and_releases_the_finalizer() {
    let mut s = Scenario::start().await;
    let volume = s.volume("normal", HANDLE, json!({})).await;
    let (name, attachment) = s.attach("normal", &volume, NODE_A).await;

    assert!(
        attachment
            .finalizers()
            .iter()
            .any(|f| f == ATTACHMENT_FINALIZER),
        "the finalizer holds the attachment: {:?}",
        attachment.finalizers()
    );
    assert!(has(
        condition(&attachment, "Ready"),
        "True",
        Some("Attached")
    ));
    assert!(has(condition(&attachment, "BackendInSync"), "True", None));
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    let mut client = client_of(&attachment).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
    s.wait_event(VA, &name, "Attached", &[&volume, NODE_A])
        .await;
    s.wait_volume(&volume, "InUse on node-a", |v| {
        v.status.as_ref().is_some_and(|st| {
            st.phase == Some(VolumePhase::InUse) && st.connected_nodes == [NODE_A]
        })
    })
    .await;

    s.delete_attachment(&name).await;
    s.wait_attachment_gone(&name).await;
    assert!(s.qsd.export_ids().await.is_empty(), "the export is gone");
    assert!(
        s.qsd.block_nodes().await.is_empty(),
        "the detach released the volume's block node"
    );
    s.wait_event(VA, &name, "Detached", &[&volume, NODE_A])
        .await;
    assert_eq!(s.occurrences(VA, &name, "ForceDetaching").await, 0);
    s.wait_volume(&volume, "Available", |v| {
        v.status.as_ref().is_some_and(|st| {
            st.phase == Some(VolumePhase::Available) && st.connected_nodes.is_empty()
        })
    })
    .await;
}

/// A Volume deleted while an attachment names it stays until that attachment is detached and
/// gone: otherwise the attachment could never confirm its detach. No new attach happens on it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volume_waits_for_its_attachments_and_attaches_nothing_new() {
    let mut s = Scenario::start().await;
    let volume = s.volume("protected", HANDLE, json!({})).await;
    let (name, _) = s.attach("protected", &volume, NODE_A).await;
    s.wait_volume(&volume, "holding the attachments finalizer", |v| {
        v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
    })
    .await;

    s.volumes
        .delete(&volume, &Default::default())
        .await
        .expect("delete the Volume");
    let waiting = s
        .wait_volume(&volume, "waiting for its attachments", |v| {
            v.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.reason == "WaitingForAttachments")
            })
        })
        .await;
    assert!(waiting.metadata.deletion_timestamp.is_some());
    s.wait_event("Volume", &volume, "WaitingForAttachments", &[NODE_A])
        .await;
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A)],
        "the attachment is untouched"
    );

    // A new attachment to the Volume on its way out is refused, without a backend call.
    let late = s.attachment("late", &volume, NODE_B).await;
    s.wait_attachment(&late, "refused: the Volume is being deleted", |a| {
        has(condition(a, "Ready"), "False", Some("VolumeDeleting"))
    })
    .await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);

    s.delete_attachment(&late).await;
    s.delete_attachment(&name).await;
    s.wait_attachment_gone(&name).await;
    assert!(
        s.qsd.export_ids().await.is_empty(),
        "detached through the Volume"
    );
    s.wait_for(&s.volumes, &volume, "gone", WAIT, |v| v.is_none())
        .await;
}

// ---------------------------------------------------------------------------------------------
// The five cases
// ---------------------------------------------------------------------------------------------

/// Case 1: Attaching past stuckAfter, the backend shows nothing connected.
///
/// Made real like this: an earlier, half-finished attach left the volume's block node open in
/// the daemon *read-only* (as a read-only attachment's leftovers would be), with no export. The
/// backend shows the volume connected nowhere, yet every attach of a writable export fails
/// ("Cannot export read-only node as writable"), so the attachment stays Attaching. Only the
/// cleanup does it good: the idempotent force_detach deletes the (absent) export and releases the
/// volume's now unused block node, and the attach from scratch then opens it read-write.
#[tokio::test(flavor = "multi_thread")]
async fn case1_stuck_attaching_while_not_connected_is_cleaned_up_and_attached_from_scratch() {
    let mut s = Scenario::start().await;
    let volume = s.volume("case1", HANDLE, json!({})).await;
    let image = s.qsd.image_dir().join(HANDLE);
    s.qsd
        .qmp(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": safe_detach::driver::nbd::block_node_name(HANDLE),
                "read-only": true,
                "file": { "driver": "file", "filename": image },
            }),
        )
        .await
        .expect("a leftover read-only block node");

    let name = s.attachment("case1", &volume, NODE_A).await;
    let failing = s
        .wait_attachment(&name, "Attaching with its attach failing", |a| {
            phase(a) == Some(AttachmentPhase::Attaching)
                && has(condition(a, "Ready"), "False", Some("AttachFailed"))
        })
        .await;
    assert!(
        s.qsd.export_ids().await.is_empty(),
        "the backend shows nothing connected"
    );
    assert!(!attached(&failing));
    let attaching_since = phase_since(&failing);

    let forcing = s
        .wait_event(VA, &name, "ForceDetaching", &["StuckAttaching"])
        .await;
    assert!(
        forcing.first >= attaching_since + secs(STUCK_AFTER),
        "forced at {} although Attaching only since {attaching_since} (stuckAfter {STUCK_AFTER:?})",
        forcing.first
    );
    s.wait_event(VA, &name, "ForceDetached", &["StuckAttaching"])
        .await;
    let attachment = s.wait_attached(&name).await;

    let record = force_detach(&attachment);
    assert_eq!(record.reason, ForceDetachReason::StuckAttaching);
    assert_eq!(record.state, ForceDetachState::Succeeded);
    assert_eq!(
        record.token, None,
        "the operator's own decision, no request"
    );
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert_eq!(
        s.qsd.block_nodes().await,
        [safe_detach::driver::nbd::block_node_name(HANDLE)]
    );
    // Opening it for writing succeeds only on a writable export: attached from scratch.
    let mut client = client_of(&attachment).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
}

/// Case 2 through a lost reply: the daemon creates the export but its reply never arrives. The
/// operator treats the outcome as unknown, probes, finds the export, and rolls forward to
/// Attached on that one export — it does not add a second.
#[tokio::test(flavor = "multi_thread")]
async fn case2_lost_attach_reply_is_probed_and_rolled_forward_onto_the_one_export() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        ..Setup::default()
    })
    .await;
    let volume = s.volume("lost", HANDLE, json!({})).await;
    s.proxy().arm("block-export-add", Fault::DropReply);

    let (name, attachment) = s.attach("lost", &volume, NODE_A).await;
    assert_eq!(s.proxy().fired(), 1, "the reply was really lost");
    let failed = s
        .wait_event(VA, &name, "AttachFailed", &["LostReply"])
        .await;
    assert_eq!(failed.type_, "Warning");
    s.wait_event(VA, &name, "Attached", &[]).await;
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A)],
        "exactly one export"
    );
    assert!(force_detach_absent(&attachment));
    let mut client = client_of(&attachment).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
}

fn force_detach_absent(attachment: &VolumeAttachment) -> bool {
    attachment
        .status
        .as_ref()
        .is_none_or(|s| s.force_detach.is_none())
}

/// Brings an attachment into case 2 for real: the operator is killed while its `block-export-add`
/// has run on the daemon but the reply is held back, and it is started again only once the
/// recorded Attaching is older than stuckAfter. Returns the attachment's name.
async fn stuck_attach_that_completed(s: &mut Scenario, volume: &str) -> String {
    s.proxy().arm(
        "block-export-add",
        Fault::DelayReply(Duration::from_secs(60)),
    );
    let name = s.attachment("rollfwd", volume, NODE_A).await;
    let attaching = s
        .wait_attachment(&name, "Attaching", |a| {
            phase(a) == Some(AttachmentPhase::Attaching)
        })
        .await;
    let give_up = Instant::now() + WAIT;
    while s.proxy().fired() == 0 {
        assert!(Instant::now() < give_up, "block-export-add never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.operator.kill();
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A)],
        "the daemon carried the attach out"
    );
    let record = s.get_attachment(&name).await.expect("present");
    assert_eq!(phase(&record), Some(AttachmentPhase::Attaching));
    // Let the recorded intent become stuck while no operator runs.
    tokio::time::sleep(until(
        phase_since(&attaching) + secs(STUCK_AFTER) + SignedDuration::from_secs(1),
    ))
    .await;
    s.operator.restart();
    name
}

/// Case 2 proper: Attaching past stuckAfter, and the backend shows the volume connected to this
/// node (the attach completed, the operator never heard). It is rolled forward: confirmed and
/// marked Attached on the one export, announced as RolledForward (event and Ready reason) so a
/// person can tell it from a plain attach, with the connection info a node needs (the idempotent
/// attach returns it without connecting anything), and nothing forced.
#[tokio::test(flavor = "multi_thread")]
async fn case2_stuck_attach_that_completed_on_the_backend_is_rolled_forward() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        deadline: "10s",
        ..Setup::default()
    })
    .await;
    let volume = s.volume("rollfwd", HANDLE, json!({})).await;
    let name = stuck_attach_that_completed(&mut s, &volume).await;

    let attachment = s
        .wait_attachment(&name, "Attached with connectionInfo.uri", |a| {
            phase(a) == Some(AttachmentPhase::Attached)
                && attached(a)
                && a.status
                    .as_ref()
                    .is_some_and(|st| st.connection_info.contains_key("uri"))
        })
        .await;
    s.wait_event(VA, &name, "RolledForward", &[&volume, NODE_A])
        .await;
    let now = s.get_attachment(&name).await.expect("present");
    assert!(has(condition(&now, "Ready"), "True", Some("RolledForward")));
    assert!(has(condition(&now, "BackendInSync"), "True", None));
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert!(force_detach_absent(&now), "nothing was forced");
    assert_eq!(s.occurrences(VA, &name, "ForceDetaching").await, 0);
    let mut client = client_of(&attachment).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
    // Still one export after the operator has looked again.
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
}

/// An Attached attachment whose export disappears behind the operator's back (an admin deleted
/// it, the daemon lost it): the operator notices on its next probe, says so with a ConnectionLost
/// Warning, records the truth and attaches again, so the node gets a working export back.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_lost_out_of_band_is_reported_and_attached_again() {
    let mut s = Scenario::start().await;
    let volume = s.volume("lostconn", HANDLE, json!({})).await;
    let (name, attachment) = s.attach("lostconn", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;
    let attached_events = s.occurrences(VA, &name, "Attached").await;

    s.delete_export_out_of_band(HANDLE, NODE_A).await;
    assert_eq!(client.read().await, ReadOutcome::IoError);
    let again = wait_reattached(&s, &name, attached_events).await;
    let lost = s.wait_event(VA, &name, "ConnectionLost", &[]).await;
    assert_eq!(lost.type_, "Warning");
    assert!(force_detach_absent(&again));
    let mut fresh = client_of(&again).await;
    assert_eq!(fresh.read().await, ReadOutcome::Ok);
    fresh.close().await;
}

/// Waits until the attachment is Attached again after its export was removed: the export is
/// back and one more Attached event was reported. (phaseSince, kept to the second, may not tell
/// the new Attached from the old: the operator re-attaches within milliseconds.)
async fn wait_reattached(s: &Scenario, name: &str, attached_events: i32) -> VolumeAttachment {
    let give_up = Instant::now() + WAIT;
    while s.qsd.export_ids().await != [export_id(HANDLE, NODE_A)]
        || s.occurrences(VA, name, "Attached").await <= attached_events
    {
        assert!(
            Instant::now() < give_up,
            "{name} was not attached again\n{}",
            s.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.wait_attached(name).await
}

/// Case 3: Detaching, and the backend shows no connection. A node's client holds the export, so
/// the safe detach is refused and the attachment stays Detaching (autoForceDetach is off, so the
/// operator does not force). Then the export goes away out of band: the operator's next probe
/// sees it gone, marks the attachment Detached and releases the finalizer — a plain Detached,
/// nothing forced.
#[tokio::test(flavor = "multi_thread")]
async fn case3_detaching_whose_connection_is_gone_is_marked_detached_and_released() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume("case3", HANDLE, json!({ "autoForceDetach": false }))
        .await;
    let (name, attachment) = s.attach("case3", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;

    s.delete_attachment(&name).await;
    s.wait_attachment(&name, "Detaching, its safe detach refused", |a| {
        phase(a) == Some(AttachmentPhase::Detaching)
            && has(condition(a, "Ready"), "False", Some("DetachFailed"))
    })
    .await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert_eq!(client.read().await, ReadOutcome::Ok, "not cut off");

    s.delete_export_out_of_band(HANDLE, NODE_A).await;
    s.wait_attachment_gone(&name).await;
    s.wait_event(VA, &name, "Detached", &[&volume, NODE_A])
        .await;
    assert_eq!(s.occurrences(VA, &name, "ForceDetaching").await, 0);
    assert_eq!(s.occurrences(VA, &name, "ForceDetached").await, 0);
    assert!(s.qsd.export_ids().await.is_empty());
}

/// Case 4: Detaching while a node's client holds the export. The safe delete is refused and the
/// attachment stays Detaching with the client reading on; once stuckAfter has passed the operator
/// force-detaches (event ForceDetached, reason StuckDetaching), the client's next read fails, and
/// the record said Detached and the object vanished only after the export was gone.
#[tokio::test(flavor = "multi_thread")]
async fn case4_detaching_while_in_use_is_forced_after_stuck_after_and_recorded_only_once_gone() {
    let mut s = Scenario::start().await;
    let volume = s.volume("case4", HANDLE, json!({})).await;
    let (name, attachment) = s.attach("case4", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;
    let export = export_id(HANDLE, NODE_A);

    s.delete_attachment(&name).await;
    let refused = s
        .wait_attachment(&name, "Detaching, its safe detach refused", |a| {
            phase(a) == Some(AttachmentPhase::Detaching)
                && has(condition(a, "Ready"), "False", Some("DetachFailed"))
        })
        .await;
    let detaching_since = phase_since(&refused);
    let message = &condition(&refused, "Ready").expect("Ready").message;
    assert!(message.contains("InUse"), "{message}");
    assert_eq!(s.qsd.export_ids().await, std::slice::from_ref(&export));
    assert_eq!(client.read().await, ReadOutcome::Ok, "still in use");
    assert!(!refused.finalizers().is_empty());

    let (export_gone, recorded) = watch_detach_order(&s, &name, &export).await;
    assert!(
        export_gone <= recorded,
        "the export went away {:?} after the record said detached",
        export_gone - recorded
    );

    let forcing = s.wait_force_of_stuck_detaching(&name).await;
    assert!(
        forcing.first >= detaching_since + secs(STUCK_AFTER),
        "forced at {} although Detaching only since {detaching_since}",
        forcing.first
    );
    let forced = s
        .wait_event(VA, &name, "ForceDetached", &["StuckDetaching", "confirmed"])
        .await;
    assert_eq!(forced.type_, "Warning");
    assert_eq!(client.read().await, ReadOutcome::IoError, "cut off");
    assert!(s.qsd.export_ids().await.is_empty());
    assert!(s.qsd.block_nodes().await.is_empty());
}

/// `autoForceDetach: false`: a detach stuck behind a node that holds the export is not forced.
/// The Stuck condition and a StuckDetaching Warning ask a person; the client keeps its export
/// until the person sets the annotation, which then forces it loose and releases the attachment.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_detach_without_auto_force_detach_waits_for_a_person() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume("manual", HANDLE, json!({ "autoForceDetach": false }))
        .await;
    let (name, attachment) = s.attach("manual", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;
    s.delete_attachment(&name).await;

    let stuck = s
        .wait_attachment(&name, "Detaching with Stuck=True", |a| {
            phase(a) == Some(AttachmentPhase::Detaching)
                && has(condition(a, "Stuck"), "True", Some("StuckDetaching"))
        })
        .await;
    let message = &condition(&stuck, "Stuck").expect("set").message;
    assert!(message.contains("safedetach.io/force-detach"), "{message}");
    let warning = s.wait_event(VA, &name, "StuckDetaching", &[]).await;
    assert_eq!(warning.type_, "Warning");
    // A resync later: still not forced.
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert_eq!(client.read().await, ReadOutcome::Ok, "not forced");
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert_eq!(s.occurrences(VA, &name, "ForceDetaching").await, 0);

    s.annotate(&name, "decided").await;
    s.wait_attachment_gone(&name).await;
    s.wait_event(VA, &name, "ForceDetached", &["Requested", "\"decided\""])
        .await;
    assert_eq!(client.read().await, ReadOutcome::IoError);
    assert!(s.qsd.export_ids().await.is_empty());
}

/// A stuck attachment that waits for a person (`autoForceDetach: false`) keeps retrying the safe
/// detach, but with the per-object backoff the design promises (1s doubling to 5min), not at a
/// fixed short interval: a stuck volume must not hammer its backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_attachment_waiting_for_a_person_backs_off() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume("backoff", HANDLE, json!({ "autoForceDetach": false }))
        .await;
    let (name, attachment) = s.attach("backoff", &volume, NODE_A).await;
    let client = client_of(&attachment).await;
    s.delete_attachment(&name).await;
    let stuck = s
        .wait_attachment(&name, "Detaching with Stuck=True", |a| {
            phase(a) == Some(AttachmentPhase::Detaching) && has(condition(a, "Stuck"), "True", None)
        })
        .await;
    let stuck_since = condition(&stuck, "Stuck")
        .expect("set")
        .last_transition_time
        .0;
    // Count the refused safe detaches over a window starting a few seconds into being stuck.
    tokio::time::sleep(until(stuck_since + SignedDuration::from_secs(3))).await;
    let failures = |log: &str| {
        log.lines()
            .filter(|l| l.contains(&name) && l.contains("driver call failed"))
            .count()
    };
    let before = failures(&s.operator.log());
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await;
    let tries = failures(&s.operator.log()) - before;
    println!(
        "FIGURE: safe detach attempts of a stuck attachment (autoForceDetach false) in {window:?}: {tries}"
    );
    assert!(
        tries <= 2,
        "{tries} detach attempts in {window:?} while stuck: no backoff\n{}",
        s.log_tail(30)
    );
    drop(client);
}

/// Case 5 under `orphanPolicy: Report`: an export nobody asked for (made behind the operator's
/// back, under the driver's own naming) is listed in the Volume's orphans with the Orphaned
/// condition and an Orphaned event — and left alone, however long it stays.
#[tokio::test(flavor = "multi_thread")]
async fn case5_an_unclaimed_export_is_reported_as_an_orphan_and_left_alone() {
    let mut s = Scenario::start().await;
    let volume = s.volume("orphan", HANDLE, json!({})).await;
    s.wait_volume(&volume, "Available", |v| {
        v.status
            .as_ref()
            .is_some_and(|st| st.phase == Some(VolumePhase::Available))
    })
    .await;
    let (mut client, _) = s.orphan_held_open(&volume, HANDLE, "node-x").await;
    let reported = s
        .wait_volume(&volume, "reporting node-x as an orphan", |v| {
            has(
                volume_condition(v, "Orphaned"),
                "True",
                Some("UnclaimedConnection"),
            )
        })
        .await;
    let status = reported.status.expect("status");
    assert_eq!(status.connected_nodes, ["node-x"]);
    assert_eq!(status.phase, Some(VolumePhase::InUse));
    let event = s.wait_event(VOLUME, &volume, "Orphaned", &["node-x"]).await;
    assert_eq!(event.type_, "Warning");

    // Past the grace a Detach policy would wait, and a few resyncs more: still there.
    let since = status.orphans[0].since.0;
    tokio::time::sleep(until(since + secs(STUCK_AFTER + 2 * RESYNC) + secs(RESYNC))).await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, "node-x")]);
    assert_eq!(client.read().await, ReadOutcome::Ok);
    assert_eq!(s.occurrences(VOLUME, &volume, "ForceDetached").await, 0);
    let volume_now = s.get_volume(&volume).await;
    assert!(has(volume_condition(&volume_now, "Orphaned"), "True", None));

    // Deleted, the Volume goes and leaves the connection as it is, saying so.
    s.volumes
        .delete(&volume, &Default::default())
        .await
        .expect("delete the Volume");
    s.wait_for(&s.volumes, &volume, "gone", WAIT, |v| v.is_none())
        .await;
    s.wait_event(
        VOLUME,
        &volume,
        "Orphaned",
        &["deleted and released", "node-x"],
    )
    .await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, "node-x")]);
    assert_eq!(client.read().await, ReadOutcome::Ok);
    assert_eq!(s.occurrences(VOLUME, &volume, "ForceDetached").await, 0);
    client.close().await;
}

/// Case 5 under `orphanPolicy: Detach`: the orphan is force-detached once it has stayed unclaimed
/// for stuckAfter (not before), confirmed by the backend and reported as a ForceDetached event.
#[tokio::test(flavor = "multi_thread")]
async fn case5_an_orphan_is_force_detached_after_the_grace_under_orphan_policy_detach() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume("orphandet", HANDLE, json!({ "orphanPolicy": "Detach" }))
        .await;
    let stored = s
        .wait_volume(&volume, "Available", |v| {
            v.status
                .as_ref()
                .is_some_and(|st| st.phase == Some(VolumePhase::Available))
        })
        .await;
    assert_eq!(stored.spec.orphan_policy, OrphanPolicy::Detach);
    let (mut client, reported) = s.orphan_held_open(&volume, HANDLE, "node-x").await;
    let since = reported.status.expect("status").orphans[0].since.0;

    let give_up = Instant::now() + WAIT;
    while !s.qsd.export_ids().await.is_empty() {
        assert!(
            Instant::now() < give_up,
            "the orphan was not force-detached\n{}",
            s.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone_at = Timestamp::now();
    assert!(
        gone_at >= since + secs(STUCK_AFTER),
        "cut off at {gone_at}, within the grace of an orphan first seen at {since}"
    );
    let event = s
        .wait_event(VOLUME, &volume, "ForceDetached", &["Orphan", "node-x"])
        .await;
    assert_eq!(event.type_, "Warning");
    assert_eq!(client.read().await, ReadOutcome::IoError, "cut off");
    s.wait_volume(&volume, "without orphans", |v| {
        v.status.as_ref().is_some_and(|st| {
            st.orphans.is_empty()
                && st.connected_nodes.is_empty()
                && st.phase == Some(VolumePhase::Available)
        }) && has(volume_condition(v, "Orphaned"), "False", None)
    })
    .await;
    assert!(s.qsd.block_nodes().await.is_empty());
}

/// Case 5 on a Volume being deleted, under `orphanPolicy: Detach`: the Volume is the last record
/// of the unclaimed connection, so it stays (Ready False, WaitingForOrphans) until the orphan has
/// been unclaimed for stuckAfter, is forced off and the backend shows it gone. Never is the
/// Volume seen gone while the export is still served.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_volume_under_orphan_policy_detach_goes_only_once_its_orphan_is_forced_off() {
    let mut s = Scenario::start().await;
    // A grace long enough that the orphan is still within it when the Volume is deleted.
    let grace = Duration::from_secs(15);
    let volume = s
        .volume(
            "orphandel",
            HANDLE,
            json!({ "orphanPolicy": "Detach", "stuckAfter": "15s" }),
        )
        .await;
    s.wait_volume(&volume, "holding its finalizer", |v| {
        v.finalizers().iter().any(|f| f == VOLUME_FINALIZER)
    })
    .await;
    let (mut client, reported) = s.orphan_held_open(&volume, HANDLE, "node-x").await;
    let since = reported.status.expect("status").orphans[0].since.0;

    s.volumes
        .delete(&volume, &Default::default())
        .await
        .expect("delete the Volume");
    s.wait_event(VOLUME, &volume, "WaitingForOrphans", &["node-x"])
        .await;
    // The Volume goes after the export, never before: once it is seen gone, nothing serves it.
    let give_up = Instant::now() + WAIT;
    let mut served_while_there = false;
    loop {
        let present = s.volumes.get_opt(&volume).await.expect("get the Volume");
        let exports = s.qsd.export_ids().await;
        let Some(present) = present else {
            assert!(
                exports.is_empty(),
                "the Volume went while {exports:?} was still served\n{}",
                s.log_tail(60)
            );
            break;
        };
        served_while_there |= !exports.is_empty();
        assert!(present.metadata.deletion_timestamp.is_some());
        assert!(
            Instant::now() < give_up,
            "the deleted Volume did not go\n{}",
            s.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone_at = Timestamp::now();
    assert!(served_while_there, "the orphan was seen served meanwhile");
    assert!(
        gone_at >= since + secs(grace),
        "gone at {gone_at}, within the grace of an orphan first seen at {since}"
    );
    s.wait_event(VOLUME, &volume, "ForceDetached", &["Orphan", "node-x"])
        .await;
    assert_eq!(client.read().await, ReadOutcome::IoError, "cut off");
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// The Cinder spec's test: an attached volume whose node holds it; a person asks for a
/// force-detach with a token. The operator announces it (ForceDetaching, reason Requested, the
/// token), cuts the client off, confirms, records the token as handled and Succeeded, and then
/// attaches again from a clean state: a new export a new client reads through.
#[tokio::test(flavor = "multi_thread")]
async fn force_detach_by_annotation_cuts_the_client_off_and_reattaches() {
    let mut s = Scenario::start().await;
    let volume = s.volume("force", HANDLE, json!({})).await;
    let (name, attachment) = s.attach("force", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;

    s.annotate(&name, "t1").await;
    let forcing = s
        .wait_event(VA, &name, "ForceDetaching", &["Requested", "\"t1\""])
        .await;
    assert_eq!(forcing.type_, "Warning");
    s.wait_event(
        VA,
        &name,
        "ForceDetached",
        &["Requested", "\"t1\"", "confirmed"],
    )
    .await;
    assert_eq!(client.read().await, ReadOutcome::IoError, "cut off");

    let again = s
        .wait_attachment(&name, "Attached again after the forced detach", |a| {
            phase(a) == Some(AttachmentPhase::Attached)
                && attached(a)
                && a.status
                    .as_ref()
                    .and_then(|st| st.force_detach.as_ref())
                    .is_some_and(|f| f.token.as_deref() == Some("t1"))
        })
        .await;
    let record = force_detach(&again);
    assert_eq!(record.token.as_deref(), Some("t1"));
    assert_eq!(record.reason, ForceDetachReason::Requested);
    assert_eq!(record.state, ForceDetachState::Succeeded);
    assert_eq!(record.attempts, 1);
    assert!(record.finished_at.is_some());
    assert_eq!(
        again.annotations().get("safedetach.io/force-detach"),
        Some(&"t1".to_owned()),
        "the operator never removes the annotation"
    );
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    let mut fresh = client_of(&again).await;
    assert_eq!(fresh.read().await, ReadOutcome::Ok);
    fresh.close().await;
}

/// Forces one detach by token and waits until the attachment is Attached again.
async fn force_and_reattach(s: &Scenario, name: &str, token: &str) -> VolumeAttachment {
    s.annotate(name, token).await;
    s.wait_attachment(name, &format!("re-Attached after token {token}"), |a| {
        phase(a) == Some(AttachmentPhase::Attached)
            && attached(a)
            && a.status
                .as_ref()
                .and_then(|st| st.force_detach.as_ref())
                .is_some_and(|f| {
                    f.token.as_deref() == Some(token) && f.state == ForceDetachState::Succeeded
                })
    })
    .await
}

/// The same token applied again (a manifest re-applied with an unrelated change, the annotation
/// unchanged) is not a request: no new ForceDetaching event, the attempts unchanged, the export
/// and its client untouched. A new token acts again, and its own events name it.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_token_acts_once_and_a_new_token_acts_again() {
    let mut s = Scenario::start().await;
    let volume = s.volume("token", HANDLE, json!({})).await;
    let (name, _) = s.attach("token", &volume, NODE_A).await;
    let once = force_and_reattach(&s, &name, "t1").await;
    let mut client = client_of(&once).await;
    let forcing_before = s.occurrences(VA, &name, "ForceDetaching").await;
    assert_eq!(forcing_before, 1);

    // Re-apply: a label changes, the annotation is written again with the same value.
    s.merge_metadata(
        &name,
        json!({
            "labels": { "reapplied": "yes" },
            "annotations": { "safedetach.io/force-detach": "t1" },
        }),
    )
    .await;
    // The change wakes a reconcile at once; two resyncs more make sure several have run.
    tokio::time::sleep(2 * RESYNC + Duration::from_secs(1)).await;
    let after = s.get_attachment(&name).await.expect("present");
    assert_eq!(
        force_detach(&after),
        force_detach(&once),
        "record untouched"
    );
    assert_eq!(force_detach(&after).attempts, 1);
    assert_eq!(phase(&after), Some(AttachmentPhase::Attached));
    assert_eq!(
        s.occurrences(VA, &name, "ForceDetaching").await,
        forcing_before,
        "no new ForceDetaching event:\n{}",
        describe_events(&s.events_about(VA, &name).await)
    );
    assert_eq!(
        client.read().await,
        ReadOutcome::Ok,
        "the client kept its export"
    );
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);

    let twice = force_and_reattach(&s, &name, "t2").await;
    let record = force_detach(&twice);
    assert_eq!(record.token.as_deref(), Some("t2"));
    assert_eq!(record.attempts, 1);
    assert_eq!(record.reason, ForceDetachReason::Requested);
    assert_eq!(client.read().await, ReadOutcome::IoError, "t2 cut it off");
    assert_eq!(
        s.occurrences(VA, &name, "ForceDetaching").await,
        forcing_before + 1,
        "one more forced detach:\n{}",
        describe_events(&s.events_about(VA, &name).await)
    );
    s.wait_event(VA, &name, "ForceDetaching", &["Requested", "\"t2\""])
        .await;
    s.wait_event(
        VA,
        &name,
        "ForceDetached",
        &["Requested", "\"t2\"", "confirmed"],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Multi-attach
// ---------------------------------------------------------------------------------------------

/// A single-attach Volume attached to node-a: an attachment for node-b stays Pending with
/// AttachBlocked naming node-a, and nothing is exported for node-b. Once node-a's attachment is
/// deleted (and detached), node-b attaches.
#[tokio::test(flavor = "multi_thread")]
async fn single_attach_volume_blocks_another_node_until_the_first_detaches() {
    let mut s = Scenario::start().await;
    let volume = s.volume("single", HANDLE, json!({})).await;
    let (a, _) = s.attach("single-a", &volume, NODE_A).await;
    let b = s.attachment("single-b", &volume, NODE_B).await;

    let blocked = s
        .wait_attachment(&b, "Pending, blocked by node-a", |x| {
            phase(x) == Some(AttachmentPhase::Pending)
                && has(
                    condition(x, "AttachBlocked"),
                    "True",
                    Some("HeldByAnotherNode"),
                )
        })
        .await;
    let message = &condition(&blocked, "AttachBlocked").expect("set").message;
    assert!(message.contains(NODE_A), "{message}");
    assert!(!attached(&blocked));
    s.wait_event(VA, &b, "HeldByAnotherNode", &[NODE_A]).await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    // Still blocked after the operator has looked again.
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    let still = s.get_attachment(&b).await.expect("present");
    assert_eq!(phase(&still), Some(AttachmentPhase::Pending));

    s.delete_attachment(&a).await;
    s.wait_attachment_gone(&a).await;
    let now_b = s.wait_attached(&b).await;
    assert!(has(condition(&now_b, "AttachBlocked"), "False", None));
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_B)]);
    let mut client = client_of(&now_b).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
}

/// A multi-attach Volume attaches to two nodes at once, each with its own working export.
#[tokio::test(flavor = "multi_thread")]
async fn multi_attach_volume_attaches_to_two_nodes() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume("multi", HANDLE, json!({ "multiAttach": true }))
        .await;
    let (_, on_a) = s.attach("multi-a", &volume, NODE_A).await;
    let (_, on_b) = s.attach("multi-b", &volume, NODE_B).await;
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A), export_id(HANDLE, NODE_B)]
    );
    let mut client_a = client_of(&on_a).await;
    let mut client_b = client_of(&on_b).await;
    assert_eq!(client_a.read().await, ReadOutcome::Ok);
    assert_eq!(client_b.read().await, ReadOutcome::Ok);
    s.wait_volume(&volume, "InUse on both nodes", |v| {
        v.status.as_ref().is_some_and(|st| {
            st.phase == Some(VolumePhase::InUse) && st.connected_nodes == [NODE_A, NODE_B]
        })
    })
    .await;
    client_a.close().await;
    client_b.close().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// An attachment naming a Volume that does not exist fails with Ready=False VolumeNotFound and a
/// Warning, the operator keeps serving other objects, and the attachment attaches once its
/// Volume appears.
#[tokio::test(flavor = "multi_thread")]
async fn an_attachment_of_a_missing_volume_fails_and_the_operator_serves_on() {
    let mut s = Scenario::start().await;
    let missing = s.volume_name("missing");
    let orphaned = s.attachment("novol", &missing, NODE_A).await;
    let failed = s
        .wait_attachment(&orphaned, "Ready=False VolumeNotFound", |a| {
            has(condition(a, "Ready"), "False", Some("VolumeNotFound"))
        })
        .await;
    assert_eq!(phase(&failed), Some(AttachmentPhase::Failed));
    let event = s
        .wait_event(VA, &orphaned, "VolumeNotFound", &[&missing])
        .await;
    assert_eq!(event.type_, "Warning");

    // Still serving: another volume attaches.
    let volume = s.volume("served", "vol2", json!({})).await;
    let (_, served) = s.attach("served", &volume, NODE_B).await;
    let mut client = client_of(&served).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;

    // The missing Volume appears (under the name the attachment gave): it attaches.
    s.create_volume(&missing, HANDLE, json!({})).await;
    s.wait_attached(&orphaned).await;
    assert_eq!(
        s.qsd.export_ids().await,
        [export_id(HANDLE, NODE_A), export_id("vol2", NODE_B)]
    );
}

/// A Volume naming a driver the operator does not have: the Volume is in phase Error with
/// Ready=False UnknownDriver, its attachment gets Ready=False UnknownDriver and a Warning, and
/// nothing reaches any backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_with_an_unknown_driver_is_an_error_and_nothing_reaches_the_backend() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume("nodriver", HANDLE, json!({ "driver": "no-such-driver" }))
        .await;
    let name = s.attachment("nodriver", &volume, NODE_A).await;
    let failed = s
        .wait_attachment(&name, "Ready=False UnknownDriver", |a| {
            has(condition(a, "Ready"), "False", Some("UnknownDriver"))
        })
        .await;
    assert_eq!(phase(&failed), Some(AttachmentPhase::Failed));
    assert!(!attached(&failed));
    s.wait_event(VA, &name, "UnknownDriver", &["no-such-driver"])
        .await;
    s.wait_volume(&volume, "phase Error, Ready=False UnknownDriver", |v| {
        v.status
            .as_ref()
            .is_some_and(|st| st.phase == Some(VolumePhase::Error))
            && has(volume_condition(v, "Ready"), "False", Some("UnknownDriver"))
    })
    .await;
    assert!(s.qsd.export_ids().await.is_empty());
    assert!(s.qsd.block_nodes().await.is_empty());
}

/// An empty force-detach token is no request: the RequestRejected condition and an InvalidToken
/// Warning say so, and the attachment stays Attached with its client reading.
#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_token_is_rejected_and_the_attachment_stays_attached() {
    let mut s = Scenario::start().await;
    let volume = s.volume("badtoken", HANDLE, json!({})).await;
    let (name, attachment) = s.attach("badtoken", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;

    s.annotate(&name, "").await;
    let rejected = s
        .wait_attachment(&name, "RequestRejected=True InvalidToken", |a| {
            has(
                condition(a, "RequestRejected"),
                "True",
                Some("InvalidToken"),
            )
        })
        .await;
    assert_eq!(phase(&rejected), Some(AttachmentPhase::Attached));
    assert!(attached(&rejected));
    assert!(force_detach_absent(&rejected));
    let event = s.wait_event(VA, &name, "InvalidToken", &["empty"]).await;
    assert_eq!(event.type_, "Warning");
    assert_eq!(client.read().await, ReadOutcome::Ok);
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert_eq!(s.occurrences(VA, &name, "ForceDetaching").await, 0);
    client.close().await;
}

// ---------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------

/// The operator is killed (SIGKILL) inside its attach call: the intent (Attaching) is stored and
/// `block-export-add` has run on the daemon, its reply held back. Restarted, the operator resumes
/// from the stored intent and ends Attached on exactly one export, nothing forced.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_inside_the_attach_call_resumes_from_the_recorded_intent() {
    let mut s = Scenario::with(Setup {
        via_proxy: true,
        deadline: "10s",
        ..Setup::default()
    })
    .await;
    let volume = s.volume("crashatt", HANDLE, json!({})).await;
    s.proxy().arm(
        "block-export-add",
        Fault::DelayReply(Duration::from_secs(60)),
    );
    let name = s.attachment("crashatt", &volume, NODE_A).await;
    s.wait_attachment(&name, "Attaching", |a| {
        phase(a) == Some(AttachmentPhase::Attaching)
    })
    .await;
    let give_up = Instant::now() + WAIT;
    while s.proxy().fired() == 0 {
        assert!(Instant::now() < give_up, "block-export-add never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.operator.kill();
    let record = s.get_attachment(&name).await.expect("present");
    assert_eq!(phase(&record), Some(AttachmentPhase::Attaching));
    assert!(!attached(&record));

    s.operator.restart();
    let attachment = s.wait_attached(&name).await;
    assert_eq!(s.qsd.export_ids().await, [export_id(HANDLE, NODE_A)]);
    assert!(force_detach_absent(&attachment));
    let mut client = client_of(&attachment).await;
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
}

/// The operator is killed while a deleted attachment is Detaching, its safe detach refused by a
/// client that holds the export. The record stays Detaching while no operator runs, and its stuck
/// clock (phaseSince) survives the crash: restarted after stuckAfter, the operator force-detaches,
/// confirms and releases.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_during_a_stuck_detach_resumes_and_resolves_after_restart() {
    let mut s = Scenario::start().await;
    let volume = s.volume("crashdet", HANDLE, json!({})).await;
    let (name, attachment) = s.attach("crashdet", &volume, NODE_A).await;
    let mut client = client_of(&attachment).await;
    s.delete_attachment(&name).await;
    let refused = s
        .wait_attachment(&name, "Detaching, its safe detach refused", |a| {
            phase(a) == Some(AttachmentPhase::Detaching)
                && has(condition(a, "Ready"), "False", Some("DetachFailed"))
        })
        .await;
    s.operator.kill();
    tokio::time::sleep(until(
        phase_since(&refused) + secs(STUCK_AFTER) + SignedDuration::from_secs(1),
    ))
    .await;
    let waiting = s
        .get_attachment(&name)
        .await
        .expect("held by its finalizer");
    assert_eq!(phase(&waiting), Some(AttachmentPhase::Detaching));
    assert_eq!(phase_since(&waiting), phase_since(&refused));
    assert_eq!(client.read().await, ReadOutcome::Ok, "nothing forced yet");

    s.operator.restart();
    let (export_gone, recorded) = watch_detach_order(&s, &name, &export_id(HANDLE, NODE_A)).await;
    assert!(export_gone <= recorded);
    s.wait_event(VA, &name, "ForceDetached", &["StuckDetaching"])
        .await;
    assert_eq!(client.read().await, ReadOutcome::IoError);
    assert!(s.qsd.export_ids().await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Quiet, and figures
// ---------------------------------------------------------------------------------------------

/// Once everything has converged, the operator writes nothing. Over three resync intervals (each
/// of which sweeps: one look at the daemon for all the objects, none of them probed on its own)
/// the operator sends no write request at all — counted at a
/// front that carries all of its API traffic — and no object of the shard changes. The window runs
/// with no other test of this binary alive; the apiserver's own count of writes to these resources
/// (all clients of the cluster) is printed alongside.
#[tokio::test(flavor = "multi_thread")]
async fn converged_attachments_cause_no_writes() {
    let mut s = Scenario::with(Setup {
        exclusive: true,
        count_writes: true,
        ..Setup::default()
    })
    .await;
    s.assert_no_foreign_operator().await;
    let mut volumes = Vec::new();
    let mut attachments = Vec::new();
    for (handle, node) in [("q1", NODE_A), ("q2", NODE_B), ("q3", NODE_A)] {
        let volume = s.volume("quiet", handle, json!({})).await;
        let (name, _) = s.attach("quiet", &volume, node).await;
        volumes.push(volume);
        attachments.push(name);
    }
    for volume in &volumes {
        s.wait_volume(volume, "InUse", |v| {
            v.status
                .as_ref()
                .is_some_and(|st| st.phase == Some(VolumePhase::InUse))
        })
        .await;
    }
    assert!(
        s.api().writes().iter().any(|w| w.to_status()),
        "the counter sees the operator's writes"
    );

    let _alone = s.exclusive().await;
    let versions = async |s: &Scenario| {
        let mut all = Vec::new();
        for name in &attachments {
            let a = s.get_attachment(name).await.expect("present");
            all.push((name.clone(), a.resource_version()));
        }
        for name in &volumes {
            all.push((name.clone(), s.get_volume(name).await.resource_version()));
        }
        all
    };
    let before = versions(&s).await;
    let cluster_before = s.apiserver_writes().await;
    let calls = async |s: &Scenario| driver_calls(s.operator.http_address()).await;
    let calls_before = calls(&s).await;
    let started = Instant::now();
    let window = 3 * RESYNC + Duration::from_millis(500);
    tokio::time::sleep(window).await;
    let ours = s.api().writes_since(started);
    let cluster_after = s.apiserver_writes().await;
    let after = versions(&s).await;
    let calls_after = calls(&s).await;
    let made = |op: &str| {
        calls_after.get(op).copied().unwrap_or(0.0) - calls_before.get(op).copied().unwrap_or(0.0)
    };
    // The resync is a sweep: one look at the daemon per interval, not a probe per object.
    assert_eq!(
        made("probe"),
        0.0,
        "converged objects were probed one by one: {calls_before:?} -> {calls_after:?}"
    );
    assert!(
        made("probe_many") >= 2.0,
        "no sweep in three resync intervals: {calls_before:?} -> {calls_after:?}"
    );

    let cluster: Vec<(String, i64)> = cluster_after
        .iter()
        .map(|(k, v)| {
            let delta = v - cluster_before.get(k).copied().unwrap_or(0.0);
            (k.clone(), delta as i64)
        })
        .filter(|(_, d)| *d != 0)
        .collect();
    println!(
        "FIGURE: quiet window of {window:?}, 3 converged attachments: {} write requests by the operator; the apiserver counted {} writes to volumes/volumeattachments from all clients {cluster:?}",
        ours.len(),
        cluster.iter().map(|(_, d)| d).sum::<i64>()
    );
    assert!(
        ours.is_empty(),
        "the operator wrote in the quiet window: {ours:?}\n--- operator log (end) ---\n{}",
        s.log_tail(40)
    );
    assert_eq!(before, after, "objects changed in the quiet window");
}

/// Figures for the record: how long from the annotation to the confirmed forced detach (the
/// ForceDetached event, and the status saying Succeeded), and how many writes one forced detach
/// of a live attachment costs, re-attach included: the changes a watch sees, and the write
/// requests the operator sends (status, object, events). Five forced detaches, each with a client
/// holding the export.
#[tokio::test(flavor = "multi_thread")]
async fn figures_force_detach_latency_and_status_writes() {
    let mut s = Scenario::with(Setup {
        count_writes: true,
        ..Setup::default()
    })
    .await;
    s.assert_no_foreign_operator().await;
    let volume = s.volume("figures", HANDLE, json!({})).await;
    let (name, mut attachment) = s.attach("figures", &volume, NODE_A).await;
    let mut to_event = Vec::new();
    let mut to_status = Vec::new();
    let mut changes = Vec::new();
    let mut starts = Vec::new();
    for run in 1..=5 {
        let token = format!("figure-{run}");
        let mut client = client_of(&attachment).await;
        let events_before = s.occurrences(VA, &name, "ForceDetached").await;

        let started = Instant::now();
        starts.push(started);
        let version = s.annotate(&name, &token).await;
        let events = s.events.clone();
        let watch_events = {
            let name = name.clone();
            tokio::spawn(async move {
                loop {
                    let seen = support::scenario::events_in(&events, VA, &name).await;
                    let count: i32 = seen
                        .iter()
                        .filter(|e| e.reason == "ForceDetached")
                        .map(|e| e.count)
                        .sum();
                    if count > events_before {
                        return Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let (status_at, count, last) =
            count_writes_until_reattached(&s.attachments, &name, &version, &token).await;
        let event_at = tokio::time::timeout(WAIT, watch_events)
            .await
            .expect("the ForceDetached event in time")
            .expect("the event poller");
        assert_eq!(
            client.read().await,
            ReadOutcome::IoError,
            "run {run}: cut off"
        );
        to_status.push(status_at - started);
        to_event.push(event_at - started);
        changes.push(count);
        attachment = last;
    }
    // Let the last run's events go out, then split the operator's writes by run.
    tokio::time::sleep(RESYNC).await;
    let writes = s.api().writes();
    let runs: Vec<[usize; 4]> = (0..starts.len())
        .map(|i| {
            let of_run: Vec<_> = writes
                .iter()
                .filter(|w| w.at >= starts[i] && starts.get(i + 1).is_none_or(|next| w.at < *next))
                .collect();
            let count = |what: fn(&ApiWrite) -> bool| of_run.iter().filter(|w| what(w)).count();
            [
                count(ApiWrite::to_attachment_status),
                count(|w| w.to_safedetach() && !w.to_status()),
                count(ApiWrite::to_volume_status),
                count(ApiWrite::to_event),
            ]
        })
        .collect();
    let median = |values: &mut Vec<Duration>| {
        values.sort();
        values[values.len() / 2]
    };
    println!(
        "FIGURE: annotation -> ForceDetached event seen, median of 5: {:?} (all: {to_event:?})",
        median(&mut to_event.clone())
    );
    println!(
        "FIGURE: annotation -> status forceDetach Succeeded seen, median of 5: {:?} (all: {to_status:?})",
        median(&mut to_status.clone())
    );
    println!(
        "FIGURE: per forced detach of a live attachment, re-attach included: changes a watch sees {changes:?}; operator write requests [attachment status, attachment object, volume status, events] {runs:?}"
    );
    for (run, [status, object, _, _]) in runs.iter().enumerate() {
        assert_eq!(
            *status,
            changes[run],
            "run {}: every status write changes the object",
            run + 1
        );
        assert_eq!(*object, 0, "run {}: the finalizer stays", run + 1);
        assert!(
            (2..=3).contains(status),
            "run {}: an intent before the force, the confirmation with the new attach's intent, the attach's confirmation: {runs:?}",
            run + 1
        );
    }
}

/// Watches the attachment from `version` (the annotation's write) and counts every change after
/// it, until it is Attached again with `token` handled. Returns when the status first said the
/// force Succeeded, the number of writes, and the last version.
async fn count_writes_until_reattached(
    api: &Api<VolumeAttachment>,
    name: &str,
    version: &str,
    token: &str,
) -> (Instant, usize, VolumeAttachment) {
    let params = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut stream = api
        .watch(&params, version)
        .await
        .expect("watch the attachment")
        .boxed();
    let mut writes = 0;
    let mut succeeded_at = None;
    let watching = async {
        while let Some(event) = stream.try_next().await.expect("watch event") {
            let object = match event {
                WatchEvent::Modified(object) => object,
                WatchEvent::Bookmark(_) => continue,
                other => panic!("unexpected watch event {other:?}"),
            };
            writes += 1;
            let record = object
                .status
                .as_ref()
                .and_then(|st| st.force_detach.as_ref());
            let handled = record.is_some_and(|f| {
                f.token.as_deref() == Some(token) && f.state == ForceDetachState::Succeeded
            });
            if handled && succeeded_at.is_none() {
                succeeded_at = Some(Instant::now());
            }
            if handled && phase(&object) == Some(AttachmentPhase::Attached) && attached(&object) {
                return object;
            }
        }
        panic!("the watch ended")
    };
    let last = tokio::time::timeout(WAIT, watching)
        .await
        .expect("re-attached in time");
    (succeeded_at.expect("succeeded"), writes, last)
}
