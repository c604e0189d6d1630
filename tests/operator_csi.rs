//! The operator end to end on the `csi` driver: the real operator binary, the real control plane,
//! and the Kubernetes mock CSI plugin, with the fault-injecting gRPC proxy between them.
//!
//! The mock lists its node as published for every volume, so the operator runs with
//! `trustPublishedNodes: false`: it never probes, and confirmation rests on an OK
//! `ControllerPublishVolume` / `ControllerUnpublishVolume`. What really happened on the backend
//! is read from the plugin's own publish record (`CsiPlugin::controller_published_nodes`,
//! asked directly, not through the proxy) and from the proxy's call counts.
//!
//! The mock has one node id, its driver name, and every attachment here uses it.

mod support;

use kube::ResourceExt;
use safe_detach::api::{
    ATTACHMENT_FINALIZER, AttachmentPhase, FORCE_DETACH_ANNOTATION, ForceDetachReason,
    ForceDetachState, ProbeResult, VolumeAttachment, VolumePhase,
};
use safe_detach::config::{ConfigFile, DriverEntry};
use safe_detach::driver::csi::{CsiConfig, DRIVER_KEY, NODE_ID_KEY};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use support::cluster::unique_name;
use support::csi::{CsiPlugin, DRIVER_NAME};
use support::grpc_proxy::{Fault, GrpcProxy};
use support::harness::{
    Harness, POLL, RESYNC, STUCK_AFTER, WAIT, attached, describe_events, phase, show,
};
use support::operator::{Operator, Options};
use support::scenario::{condition, has, volume_condition};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const PUBLISH: &str = "/csi.v1.Controller/ControllerPublishVolume";
const UNPUBLISH: &str = "/csi.v1.Controller/ControllerUnpublishVolume";
const GET_VOLUME: &str = "/csi.v1.Controller/ControllerGetVolume";
const LIST_VOLUMES: &str = "/csi.v1.Controller/ListVolumes";

/// `phaseSince` is stored with whole seconds, so the stuck clock read back can run up to a
/// second ahead of the real one.
const CLOCK_GRAIN: Duration = Duration::from_secs(1);
const VA: &str = "VolumeAttachment";

struct Setup {
    /// Each driver call's deadline, as the operator's configuration writes it.
    deadline: &'static str,
    /// Whether the operator reaches the plugin through the proxy (else directly).
    via_proxy: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            deadline: "2s",
            via_proxy: true,
        }
    }
}

/// One scenario: a plugin, the proxy in front of it, and through [`Harness`] (which it
/// dereferences to) an operator for this test's shard and the objects the test creates. Fields
/// drop in order: the operator is killed and the objects deleted first, the plugin last.
struct CsiScenario {
    harness: Harness,
    proxy: Arc<GrpcProxy>,
    plugin: CsiPlugin,
}

impl std::ops::Deref for CsiScenario {
    type Target = Harness;

    fn deref(&self) -> &Harness {
        &self.harness
    }
}

impl std::ops::DerefMut for CsiScenario {
    fn deref_mut(&mut self) -> &mut Harness {
        &mut self.harness
    }
}

impl CsiScenario {
    async fn start(setup: Setup) -> Self {
        let plugin = CsiPlugin::start().await;
        let proxy = Arc::new(GrpcProxy::start(
            plugin.socket(),
            &plugin.dir().join("proxy.sock"),
        ));
        let endpoint = if setup.via_proxy {
            proxy.socket().to_owned()
        } else {
            plugin.socket().to_owned()
        };
        let config = ConfigFile {
            default_stuck_after: Some(format!("{}s", STUCK_AFTER.as_secs())),
            resync_interval: Some(format!("{}s", RESYNC.as_secs())),
            drivers: vec![
                DriverEntry::csi(
                    "csi",
                    CsiConfig {
                        endpoint,
                        trust_published_nodes: false,
                    },
                )
                .with_deadline(setup.deadline),
            ],
            ..ConfigFile::default()
        }
        .to_text()
        .expect("the plugin's socket path is UTF-8");
        let shard = unique_name("csi-shard");
        let operator = Operator::start_with(&shard, &config, Options::default()).await;
        Self {
            harness: Harness::new(operator, shard).await,
            proxy,
            plugin,
        }
    }

    fn node(&self) -> &'static str {
        self.plugin.node()
    }

    /// Creates a volume on the plugin and a Volume of the `csi` driver for it; returns the
    /// Volume's name and the plugin's volume id.
    async fn volume(&mut self, prefix: &str) -> (String, String) {
        let name = self.volume_name(prefix);
        let handle = self.plugin.create_volume(&name).await;
        self.apply_volume(&name, json!({ "driver": "csi", "volumeHandle": handle }))
            .await;
        (name, handle)
    }

    /// Creates a VolumeAttachment of `volume` to the plugin's node.
    async fn attachment(&mut self, prefix: &str, volume: &str) -> String {
        let node = self.node();
        self.harness.attachment(prefix, volume, node).await
    }

    async fn request_force_detach(&self, name: &str, token: &str) {
        self.annotate(name, token).await;
    }

    /// How many times an Event of `reason` whose note contains `note` was reported.
    async fn occurrences_noting(&self, name: &str, reason: &str, note: &str) -> i32 {
        self.events_about(VA, name)
            .await
            .iter()
            .filter(|e| e.reason == reason && e.note.contains(note))
            .map(|e| e.count)
            .sum()
    }

    /// Waits until an Event of `reason` whose note contains `note` was reported `count` times.
    async fn wait_occurrences(&self, name: &str, reason: &str, note: &str, count: i32) {
        let give_up = Instant::now() + WAIT;
        loop {
            let seen = self.occurrences_noting(name, reason, note).await;
            if seen == count {
                return;
            }
            assert!(
                seen < count && Instant::now() < give_up,
                "{reason} events about {name}: {seen}, expected {count}:\n{}",
                describe_events(&self.events_about(VA, name).await)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The plugin's own record of where the volume is controller-published.
    async fn published(&self, handle: &str) -> BTreeSet<String> {
        self.plugin.controller_published_nodes(handle).await
    }

    /// Disarms `method` as soon as `trigger` has been called `count` times, from a task of its
    /// own that polls every millisecond; returns when that was and how many calls of `method`
    /// the proxy had seen by then.
    fn disarm_after(
        &self,
        method: &'static str,
        trigger: &'static str,
        count: usize,
    ) -> JoinHandle<(Instant, usize)> {
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            let give_up = Instant::now() + 2 * WAIT;
            while proxy.calls(trigger) < count {
                assert!(
                    Instant::now() < give_up,
                    "{trigger} was not called {count} times"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            proxy.disarm(method);
            (Instant::now(), proxy.calls(method))
        })
    }
}

fn is_attached(attachment: &VolumeAttachment) -> bool {
    phase(attachment) == Some(AttachmentPhase::Attached) && attached(attachment)
}

fn nodes(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

/// The status parts that say the backend cannot be probed, plainly.
fn assert_not_probeable(attachment: &VolumeAttachment) {
    let status = attachment.status.as_ref().expect("a status");
    let probe = status.last_probe.as_ref().expect("a lastProbe");
    assert_eq!(probe.result, ProbeResult::NotProbeable, "{probe:?}");
    assert!(probe.nodes.is_empty(), "{probe:?}");
    let in_sync = condition(attachment, "BackendInSync");
    assert!(
        has(in_sync, "Unknown", Some("NotProbeable")),
        "BackendInSync: {in_sync:?}"
    );
    assert!(
        in_sync.is_some_and(|c| c.message.contains("cannot be probed")),
        "{in_sync:?}"
    );
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_and_detach_rest_on_ok_calls_and_the_status_says_not_probeable() {
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, handle) = s.volume("csi-vol").await;
    let name = s.attachment("csi-va", &volume).await;

    let attachment = s.wait_attached(&name).await;
    let status = attachment.status.as_ref().expect("a status");
    assert_eq!(
        status.connection_info.get(NODE_ID_KEY).map(String::as_str),
        Some(s.node())
    );
    assert_eq!(
        status.connection_info.get(DRIVER_KEY).map(String::as_str),
        Some(DRIVER_NAME)
    );
    assert!(
        attachment
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == ATTACHMENT_FINALIZER),
        "the finalizer holds the attachment"
    );
    assert!(has(
        condition(&attachment, "Ready"),
        "True",
        Some("Attached")
    ));
    assert_not_probeable(&attachment);
    assert_eq!(s.published(&handle).await, nodes(&[s.node()]));
    assert_eq!(s.proxy.calls(PUBLISH), 1, "one publish");
    s.wait_event(VA, &name, "Attached", &[&volume, s.node()])
        .await;

    // The Volume says so too: in use, not probeable, no node list it cannot know.
    let give_up = Instant::now() + WAIT;
    let volume_object = loop {
        let v = s.volumes.get(&volume).await.expect("get Volume");
        let status = v.status.as_ref();
        if status.and_then(|s| s.phase) == Some(VolumePhase::InUse) {
            break v;
        }
        assert!(Instant::now() < give_up, "Volume not InUse: {:?}", v.status);
        tokio::time::sleep(POLL).await;
    };
    let volume_status = volume_object.status.as_ref().expect("a status");
    assert_eq!(
        volume_status.last_probe.as_ref().map(|p| p.result),
        Some(ProbeResult::NotProbeable)
    );
    assert!(volume_status.connected_nodes.is_empty());
    assert!(has(
        volume_condition(&volume_object, "Ready"),
        "True",
        Some("NotProbeable")
    ));

    s.delete_attachment(&name).await;
    s.wait_attachment_gone(&name).await;
    assert!(
        s.published(&handle).await.is_empty(),
        "the finalizer was released with the volume still published"
    );
    assert_eq!(s.proxy.calls(UNPUBLISH), 1, "one unpublish");
    s.wait_event(VA, &name, "Detached", &[&volume]).await;
    // Nothing asked the plugin where the volume is published: its answer is not trusted.
    assert_eq!(
        s.proxy.calls(GET_VOLUME),
        0,
        "ControllerGetVolume was called"
    );
    assert_eq!(s.proxy.calls(LIST_VOLUMES), 0, "ListVolumes was called");
}

#[tokio::test(flavor = "multi_thread")]
async fn force_detach_on_request_acts_once_per_token_then_attaches_again() {
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, handle) = s.volume("csi-vol").await;
    let name = s.attachment("csi-va", &volume).await;
    s.wait_attached(&name).await;
    let (publishes, unpublishes) = (s.proxy.calls(PUBLISH), s.proxy.calls(UNPUBLISH));

    let token = "2026-11-25T10:00:00Z";
    s.request_force_detach(&name, token).await;
    s.wait_event(VA, &name, "ForceDetaching", &["Requested", token])
        .await;
    s.wait_event(VA, &name, "ForceDetached", &["Requested", token])
        .await;
    let attachment = s
        .wait_for(
            &s.attachments,
            &name,
            "attached again after the forced detach",
            WAIT,
            |a| {
                a.is_some_and(|a| {
                    is_attached(a)
                        && a.status
                            .as_ref()
                            .and_then(|s| s.force_detach.as_ref())
                            .is_some_and(|f| f.token.as_deref() == Some(token))
                })
            },
        )
        .await
        .expect("present");
    let force = attachment
        .status
        .as_ref()
        .and_then(|s| s.force_detach.clone())
        .expect("forceDetach");
    assert_eq!(force.reason, ForceDetachReason::Requested);
    assert_eq!(force.state, ForceDetachState::Succeeded);
    assert_eq!(force.attempts, 1);
    assert!(force.finished_at.is_some());
    assert_not_probeable(&attachment);
    // The plugin saw one unpublish and one publish, and its record ends published: the publish
    // came last.
    assert_eq!(s.proxy.calls(UNPUBLISH), unpublishes + 1, "unpublishes");
    assert_eq!(s.proxy.calls(PUBLISH), publishes + 1, "publishes");
    assert_eq!(s.published(&handle).await, nodes(&[s.node()]));
    s.wait_occurrences(&name, "Attached", &volume, 2).await;

    // The same token again, with another change to make the operator look: nothing happens.
    let seen = s.attachment_reconciles().await;
    s.merge_metadata(
        &name,
        json!({ "annotations": { FORCE_DETACH_ANNOTATION: token, "test.safedetach.io/touched": "1" } }),
    )
    .await;
    // Two more reconciles: at most one of them (one under way) can predate the change.
    s.wait_reconciles_beyond(seen + 1.0).await;
    assert_eq!(
        s.proxy.calls(UNPUBLISH),
        unpublishes + 1,
        "acted twice on {token}"
    );
    assert_eq!(s.proxy.calls(PUBLISH), publishes + 1);
    assert_eq!(s.occurrences_noting(&name, "ForceDetached", token).await, 1);
    assert!(is_attached(
        &s.get_attachment(&name).await.expect("present")
    ));

    // A new token asks again. (Its Event is the subject of
    // `every_forced_detach_has_an_event_naming_its_token`.)
    let again = "2026-11-25T10:05:00Z";
    s.request_force_detach(&name, again).await;
    let attachment = s
        .wait_for(
            &s.attachments,
            &name,
            "attached again after the second request",
            WAIT,
            |a| {
                a.is_some_and(|a| {
                    is_attached(a)
                        && a.status
                            .as_ref()
                            .and_then(|s| s.force_detach.as_ref())
                            .is_some_and(|f| {
                                f.token.as_deref() == Some(again)
                                    && f.state == ForceDetachState::Succeeded
                            })
                })
            },
        )
        .await
        .expect("present");
    assert_not_probeable(&attachment);
    assert_eq!(s.proxy.calls(UNPUBLISH), unpublishes + 2);
    assert_eq!(s.proxy.calls(PUBLISH), publishes + 2);
    assert_eq!(s.published(&handle).await, nodes(&[s.node()]));
}

/// Each forced detach is announced by Events that name its token (docs/design.md: "they say
/// forced, the reason and the token"), the second request's as much as the first's.
#[tokio::test(flavor = "multi_thread")]
async fn every_forced_detach_has_an_event_naming_its_token() {
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, _) = s.volume("csi-vol").await;
    let name = s.attachment("csi-va", &volume).await;
    s.wait_attached(&name).await;
    for token in ["first-token", "second-token"] {
        s.request_force_detach(&name, token).await;
        s.wait_event(VA, &name, "ForceDetaching", &["Requested", token])
            .await;
        s.wait_event(VA, &name, "ForceDetached", &["Requested", token])
            .await;
        s.wait_for(&s.attachments, &name, "attached again", WAIT, |a| {
            a.is_some_and(|a| {
                is_attached(a)
                    && a.status
                        .as_ref()
                        .and_then(|s| s.force_detach.as_ref())
                        .is_some_and(|f| f.token.as_deref() == Some(token))
            })
        })
        .await;
    }
}

/// Case 1: every publish answers past the driver's deadline (its outcome unknown) until the
/// attachment is stuck; the operator then cleans up with force_detach (an unpublish) and attaches
/// from scratch.
#[tokio::test(flavor = "multi_thread")]
async fn case1_publish_times_out_until_stuck_then_clean_up_and_attach_from_scratch() {
    let mut s = CsiScenario::start(Setup {
        deadline: "1s",
        ..Setup::default()
    })
    .await;
    let (volume, handle) = s.volume("csi-vol").await;
    s.proxy.arm(PUBLISH, Fault::Delay(Duration::from_secs(3)));
    // The clean-up's unpublish clears the way for the attach from scratch.
    let cleared = s.disarm_after(PUBLISH, UNPUBLISH, 1);
    let created = Instant::now();
    let name = s.attachment("csi-va", &volume).await;

    // Until the clean-up, the record never says attached, whatever the plugin did.
    let give_up = Instant::now() + WAIT;
    while s.proxy.calls(UNPUBLISH) == 0 {
        if let Some(a) = s.get_attachment(&name).await {
            assert!(
                !attached(&a) && phase(&a) != Some(AttachmentPhase::Attached),
                "attached on a publish that timed out:\n{}",
                show(Some(&a))
            );
        }
        assert!(Instant::now() < give_up, "no clean-up within {WAIT:?}");
        tokio::time::sleep(POLL).await;
    }
    let (cleared, timed_out_publishes) = cleared.await.expect("the disarming task");
    assert!(timed_out_publishes >= 1);
    assert!(
        cleared - created >= STUCK_AFTER - CLOCK_GRAIN,
        "cleaned up {:?} after creation, before stuckAfter {STUCK_AFTER:?}",
        cleared - created
    );

    let attachment = s.wait_attached(&name).await;
    let status = attachment.status.as_ref().expect("a status");
    let force = status.force_detach.as_ref().expect("forceDetach");
    assert_eq!(force.reason, ForceDetachReason::StuckAttaching);
    assert_eq!(force.state, ForceDetachState::Succeeded);
    assert_eq!(force.token, None);
    assert_eq!(
        status.connection_info.get(NODE_ID_KEY).map(String::as_str),
        Some(s.node())
    );
    assert_not_probeable(&attachment);
    assert_eq!(s.published(&handle).await, nodes(&[s.node()]));
    s.wait_event(VA, &name, "AttachFailed", &["Timeout"]).await;
    s.wait_event(VA, &name, "ForceDetaching", &["StuckAttaching"])
        .await;
    s.wait_event(VA, &name, "ForceDetached", &["StuckAttaching"])
        .await;
    eprintln!(
        "case 1: {timed_out_publishes} publish(es) delayed past the deadline, clean-up {:?} after creation, {} publish(es) in all",
        cleared - created,
        s.proxy.calls(PUBLISH)
    );
}

/// Case 4: the plugin refuses the unpublish (FAILED_PRECONDITION: in use) while the attachment is
/// deleted. It stays Detaching — through the stuck clock and the forced unpublishes, which CSI
/// cannot make harder — and is released only after an unpublish returns OK.
#[tokio::test(flavor = "multi_thread")]
async fn case4_refused_unpublish_stays_detaching_until_an_unpublish_succeeds() {
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, handle) = s.volume("csi-vol").await;
    let name = s.attachment("csi-va", &volume).await;
    s.wait_attached(&name).await;

    s.proxy.arm(
        UNPUBLISH,
        Fault::Fail {
            code: tonic::Code::FailedPrecondition,
            message: "volume is still in use on the node".into(),
        },
    );
    let deleted = Instant::now();
    s.delete_attachment(&name).await;

    // While every unpublish is refused: still there, finalizer held, Detaching, still attached,
    // still published — until the forced path has been refused twice.
    let give_up = Instant::now() + WAIT;
    let mut forced_first: Option<Instant> = None;
    let (forced_seen, attempts) = loop {
        let a = s
            .get_attachment(&name)
            .await
            .expect("the attachment was released while every unpublish was refused");
        let shown = || show(Some(&a));
        assert!(
            a.metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f == ATTACHMENT_FINALIZER),
            "{}",
            shown()
        );
        assert!(a.metadata.deletion_timestamp.is_some());
        assert!(
            attached(&a),
            "attached turned false unconfirmed:\n{}",
            shown()
        );
        if phase(&a) != Some(AttachmentPhase::Attached) {
            assert_eq!(phase(&a), Some(AttachmentPhase::Detaching), "{}", shown());
        }
        assert_eq!(s.published(&handle).await, nodes(&[s.node()]));
        let force = a.status.as_ref().and_then(|s| s.force_detach.clone());
        if let Some(force) = &force {
            assert_eq!(
                force.reason,
                ForceDetachReason::StuckDetaching,
                "{}",
                shown()
            );
            assert_eq!(force.state, ForceDetachState::InProgress, "{}", shown());
            let first = *forced_first.get_or_insert_with(Instant::now);
            if force.attempts >= 2
                && force
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains("InUse"))
            {
                break (first, force.attempts);
            }
        }
        assert!(
            Instant::now() < give_up,
            "no second forced attempt within {WAIT:?}:\n{}",
            shown()
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(
        forced_seen - deleted >= STUCK_AFTER - CLOCK_GRAIN,
        "forced {:?} after the deletion, before stuckAfter {STUCK_AFTER:?}",
        forced_seen - deleted
    );
    let refused = s.proxy.calls(UNPUBLISH);
    assert!(
        refused >= 3,
        "a safe unpublish and two forced ones: {refused}"
    );
    assert!(s.occurrences_noting(&name, "DetachFailed", "InUse").await >= 1);
    // The stuck phase is told once, by the force that resolves it, not by a Warning of its own.
    s.wait_force_of_stuck_detaching(&name).await;
    s.wait_event(VA, &name, "ForceDetachFailed", &["InUse"])
        .await;
    eprintln!(
        "case 4: forced {:?} after the deletion; {attempts} forced attempts seen {:?} after the first",
        forced_seen - deleted,
        Instant::now() - forced_seen
    );

    s.proxy.disarm(UNPUBLISH);
    s.wait_attachment_gone(&name).await;
    assert!(
        s.proxy.calls(UNPUBLISH) > refused,
        "released without an unpublish that returned OK"
    );
    assert!(s.published(&handle).await.is_empty());
    s.wait_event(VA, &name, "ForceDetached", &["StuckDetaching"])
        .await;
    // One forced detach, however many calls it took: the refused calls are attempts.
    let scrape = s.operator.scrape().await;
    let forced = |family, result: Option<&'static str>| {
        let mut labels = vec![("reason", "StuckDetaching")];
        labels.extend(result.map(|r| ("result", r)));
        scrape.sum(family, &labels)
    };
    assert_eq!(
        forced("safedetach_force_detaches_total", None),
        1.0,
        "{}",
        scrape.0
    );
    let failed_calls = forced("safedetach_force_detach_calls_total", Some("error"));
    assert!(failed_calls >= 2.0, "{}", scrape.0);
    assert!(
        forced("safedetach_force_detach_calls_total", Some("ok")) >= 1.0,
        "{}",
        scrape.0
    );
}

/// An unpublish answered `NOT_FOUND` is, in the CSI spec's words, "not assumed unpublished": on a
/// plugin that cannot be probed, the attachment keeps its finalizer and `attached: true` while
/// every unpublish says so, and is released only after one returns OK.
#[tokio::test(flavor = "multi_thread")]
async fn an_unpublish_answered_not_found_is_not_taken_for_a_detach() {
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, handle) = s.volume("csi-vol").await;
    let name = s.attachment("csi-va", &volume).await;
    s.wait_attached(&name).await;

    s.proxy.arm(
        UNPUBLISH,
        Fault::Fail {
            code: tonic::Code::NotFound,
            message: "node not found".into(),
        },
    );
    s.delete_attachment(&name).await;
    let held_until = Instant::now() + STUCK_AFTER + RESYNC * 2;
    while Instant::now() < held_until {
        let a = s
            .get_attachment(&name)
            .await
            .expect("released on a NOT_FOUND unpublish");
        assert!(
            attached(&a) && a.finalizers().iter().any(|f| f == ATTACHMENT_FINALIZER),
            "said detached on a NOT_FOUND unpublish:\n{}",
            show(Some(&a))
        );
        assert_ne!(
            phase(&a),
            Some(AttachmentPhase::Detached),
            "{}",
            show(Some(&a))
        );
        tokio::time::sleep(POLL).await;
    }
    let refused = s.proxy.calls(UNPUBLISH);
    assert!(refused >= 2, "the unpublish is retried: {refused} calls");
    assert_eq!(s.published(&handle).await, nodes(&[s.node()]));

    s.proxy.disarm(UNPUBLISH);
    s.wait_attachment_gone(&name).await;
    assert!(s.published(&handle).await.is_empty());
}

/// The plugin publishes, but its reply is lost: an unknown outcome, never "attached". The
/// operator publishes again (idempotent) and ends Attached with one publish record.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_publish_reply_is_retried_and_ends_attached_with_one_publish_record() {
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, handle) = s.volume("csi-vol").await;
    s.proxy.arm(PUBLISH, Fault::Drop);
    let disarmed = s.disarm_after(PUBLISH, PUBLISH, 1);
    let name = s.attachment("csi-va", &volume).await;

    let give_up = Instant::now() + WAIT;
    let attachment = loop {
        let seen = s.get_attachment(&name).await;
        // Read after the object: an Attached record must rest on the second publish.
        let publishes = s.proxy.calls(PUBLISH);
        if let Some(a) = seen {
            if attached(&a) || phase(&a) == Some(AttachmentPhase::Attached) {
                assert!(
                    publishes >= 2,
                    "attached on the publish whose reply was lost:\n{}",
                    show(Some(&a))
                );
            }
            if is_attached(&a) {
                break a;
            }
        }
        assert!(Instant::now() < give_up, "not attached within {WAIT:?}");
        tokio::time::sleep(POLL).await;
    };
    disarmed.await.expect("the disarming task");
    let publishes = s.proxy.calls(PUBLISH);
    assert!(
        publishes >= 2,
        "the lost publish and its retry: {publishes}"
    );
    eprintln!("lost publish reply: {publishes} publishes in all");
    assert_eq!(s.published(&handle).await, nodes(&[s.node()]));
    let status = attachment.status.as_ref().expect("a status");
    assert_eq!(
        status.connection_info.get(NODE_ID_KEY).map(String::as_str),
        Some(s.node())
    );
    assert_not_probeable(&attachment);
    s.wait_event(VA, &name, "AttachFailed", &["LostReply"])
        .await;
}

/// A scenario whose driver deadline is 3 s, with one Volume and one attachment of it whose
/// publish the proxy holds 5 s, past that deadline, then carries out (the call is disarmed once
/// it has reached the proxy). Returns the scenario, the attachment's name and the volume's
/// handle.
async fn publish_held_past_its_deadline() -> (CsiScenario, String, String) {
    publish_held(Fault::Late(Duration::from_secs(5))).await
}

/// The same, with the publish armed with `fault`.
async fn publish_held(fault: Fault) -> (CsiScenario, String, String) {
    let mut s = CsiScenario::start(Setup {
        deadline: "3s",
        ..Setup::default()
    })
    .await;
    let (volume, handle) = s.volume("csi-vol").await;
    s.proxy.arm(PUBLISH, fault);
    let name = s.attachment("csi-va", &volume).await;
    let give_up = Instant::now() + WAIT;
    while s.proxy.calls(PUBLISH) == 0 {
        assert!(Instant::now() < give_up, "no publish within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.proxy.disarm(PUBLISH);
    (s, name, handle)
}

/// Once the attachment was released, and for longer than the late publish could still take to
/// land, the plugin publishes nothing.
async fn nothing_published_after_the_release(s: &CsiScenario, name: &str, handle: &str) {
    s.wait_attachment_gone(name).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        s.published(handle).await.is_empty(),
        "published with no attachment left: the late publish landed after the release\n{}",
        s.log_tail(60)
    );
}

/// A publish that the plugin carries out after the operator gave up on it, while its attachment
/// is deleted: the unpublish that confirms the detach waits until the late publish can no longer
/// land (one deadline after the timeout), so nothing stays published once the attachment is
/// released (design.md, "Wait out a call of unknown outcome"). An unpublish at once would be
/// answered OK before the publish landed.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_that_lands_after_its_timeout_is_undone_before_the_release() {
    let (s, name, handle) = publish_held_past_its_deadline().await;
    s.wait_event(VA, &name, "AttachFailed", &["Timeout"]).await;
    s.delete_attachment(&name).await;
    nothing_published_after_the_release(&s, &name, &handle).await;
    assert!(
        s.proxy.calls(UNPUBLISH) >= 1,
        "released without an unpublish"
    );
}

/// The same when the publish's reply is lost at once (the connection cut a moment after the
/// send) and the plugin carries it out 5 s after the send, within its deadline and one more: the
/// wait is counted from the send, not from the lost reply, so the unpublish comes after the
/// publish landed. Counted from the lost reply (3 s), the unpublish would be answered OK first.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_whose_reply_was_lost_early_and_that_lands_late_is_undone_before_the_release() {
    let (s, name, handle) = publish_held(Fault::LateAfterCut(Duration::from_secs(5))).await;
    s.wait_event(VA, &name, "AttachFailed", &["LostReply"])
        .await;
    s.delete_attachment(&name).await;
    nothing_published_after_the_release(&s, &name, &handle).await;
}

/// The same across a crash. The operator is killed while its publish is held at the plugin, and
/// the attachment deleted: the process started again cannot know of that call. It waits its
/// deadline and that time again before it acts on the plugin's volumes, so its unpublish comes
/// after the late publish landed (the campaign found this gap: seed 27649).
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_left_under_way_by_a_killed_operator_is_undone_before_the_release() {
    let (mut s, name, handle) = publish_held_past_its_deadline().await;
    s.operator.kill();
    s.delete_attachment(&name).await;
    s.operator.restart();
    nothing_published_after_the_release(&s, &name, &handle).await;
}

/// A force-detach the plugin keeps refusing is retried with the operator's backoff (docs/design.md,
/// Backoff: "so that a failing backend neither hot-loops nor delays the stuck resolution"), not
/// as fast as the API server answers. Exponential backoff from 1 s allows at most 4 attempts in
/// the 5 s after the first; 6 leaves room.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_force_detach_is_retried_with_backoff() {
    const WINDOW: Duration = Duration::from_secs(5);
    const MOST: u32 = 6;
    let mut s = CsiScenario::start(Setup::default()).await;
    let (volume, _) = s.volume("csi-vol").await;
    let name = s.attachment("csi-va", &volume).await;
    s.wait_attached(&name).await;
    s.proxy.arm(
        UNPUBLISH,
        Fault::Fail {
            code: tonic::Code::FailedPrecondition,
            message: "volume is still in use on the node".into(),
        },
    );
    s.delete_attachment(&name).await;
    let forcing = |a: Option<&VolumeAttachment>| {
        a.and_then(|a| a.status.as_ref()?.force_detach.as_ref())
            .is_some_and(|f| f.state == ForceDetachState::InProgress)
    };
    let first = s
        .wait_for(&s.attachments, &name, "force-detaching", WAIT, forcing)
        .await;
    let attempts = |a: &VolumeAttachment| {
        a.status
            .as_ref()
            .and_then(|s| s.force_detach.as_ref())
            .map_or(0, |f| f.attempts)
    };
    let (start, from) = (Instant::now(), attempts(first.as_ref().expect("present")));
    let unpublishes = s.proxy.calls(UNPUBLISH);
    // Passes once the window has gone by within the bound; fails as soon as it is exceeded.
    loop {
        let seen = s.get_attachment(&name).await.expect("still held");
        let made = attempts(&seen) - from;
        let calls = s.proxy.calls(UNPUBLISH) - unpublishes;
        let elapsed = start.elapsed();
        assert!(
            made <= MOST,
            "{made} more forced attempts ({calls} ControllerUnpublishVolume calls) within {elapsed:?} of the first: no backoff"
        );
        if elapsed >= WINDOW {
            eprintln!("refused force_detach: {made} more attempts in {elapsed:?}");
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    s.proxy.disarm(UNPUBLISH);
    s.wait_attachment_gone(&name).await;
}

/// Median over 5 runs, through the real plugin (no proxy), of the time from a VolumeAttachment's
/// creation to its confirmed `Attached`, and from the force-detach annotation to the
/// `ForceDetached` Event. Printed as FIGURE lines (`-- --nocapture`), bounded loosely.
#[tokio::test(flavor = "multi_thread")]
async fn figures_attach_and_force_detach_latency() {
    const RUNS: usize = 5;
    const FIGURE_POLL: Duration = Duration::from_millis(10);
    let mut s = CsiScenario::start(Setup {
        via_proxy: false,
        ..Setup::default()
    })
    .await;
    let (mut to_attached, mut to_forced) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let (volume, handle) = s.volume("csi-fig").await;
        let started = Instant::now();
        let name = s.attachment("csi-fig", &volume).await;
        loop {
            if s.get_attachment(&name)
                .await
                .as_ref()
                .is_some_and(is_attached)
            {
                break;
            }
            assert!(started.elapsed() < WAIT, "run {run}: not attached");
            tokio::time::sleep(FIGURE_POLL).await;
        }
        to_attached.push(started.elapsed());
        assert_eq!(s.published(&handle).await, nodes(&[s.node()]));

        let token = format!("figure-{run}");
        let started = Instant::now();
        s.request_force_detach(&name, &token).await;
        loop {
            let events = s.events_about(VA, &name).await;
            if events
                .iter()
                .any(|e| e.reason == "ForceDetached" && e.note.contains(&token))
            {
                break;
            }
            assert!(
                started.elapsed() < WAIT,
                "run {run}: no ForceDetached event"
            );
            tokio::time::sleep(FIGURE_POLL).await;
        }
        to_forced.push(started.elapsed());
        s.wait_attached(&name).await;
    }
    let (attach, force) = (median(to_attached.clone()), median(to_forced.clone()));
    println!(
        "FIGURE: csi (mock plugin), VolumeAttachment created -> Attached: median {attach:?} over {RUNS} runs {to_attached:?}"
    );
    println!(
        "FIGURE: csi (mock plugin), force-detach annotation -> ForceDetached event: median {force:?} over {RUNS} runs {to_forced:?}"
    );
    assert!(attach < Duration::from_secs(10) && force < Duration::from_secs(10));
}
