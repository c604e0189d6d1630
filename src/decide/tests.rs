//! The decision table: the five cases of the design as named rows, then every combination of
//! desired state × phase × backend answer × request × deadline × autoForceDetach × multiAttach,
//! checked against the safety invariant, then a walk from every state to convergence.

use super::recheck::{self, Recheck};
use super::status::{CallResult, after_call, after_step, force_confirmed};
use super::*;
use crate::api::types::READY;
use crate::api::{Binding, ForceDetachStatus, VolumeAttachmentStatus, find_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const NODE: &str = "node-a";
const OTHER: &str = "node-b";
const STUCK_AFTER: Duration = Duration::from_secs(120);
const RESYNC: Duration = Duration::from_secs(300);

/// The policy a status is computed with when a test is not about it.
static ANY_POLICY: VolumePolicy = VolumePolicy {
    multi_attach: false,
    stuck_after: STUCK_AFTER,
    auto_force_detach: true,
};

static NO_STATUS: std::sync::LazyLock<VolumeAttachmentStatus> =
    std::sync::LazyLock::new(VolumeAttachmentStatus::default);

/// What a decision rests on, all defaults: a test sets the fields it is about.
fn on_record() -> Input<'static> {
    Input {
        deleting: false,
        has_finalizer: true,
        node: NODE,
        status: &NO_STATUS,
        request: &Request::None,
        volume: Ok(&ANY_POLICY),
        target: None,
        sibling: None,
        claimed_elsewhere: Some(&[]),
        backend: None,
        basis: Basis::Fresh,
        turn: Turn::Ours,
        generation: Some(1),
        resync: RESYNC,
        now: t(10),
    }
}

/// The status after `step` from `current`, decided on `on` otherwise.
fn stepped(current: &VolumeAttachmentStatus, step: &Step, on: &Input) -> VolumeAttachmentStatus {
    after_step(
        &Input {
            status: current,
            ..on.clone()
        },
        step,
    )
}

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn policy(auto_force_detach: bool, multi_attach: bool) -> VolumePolicy {
    VolumePolicy {
        multi_attach,
        stuck_after: STUCK_AFTER,
        auto_force_detach,
    }
}

fn in_phase(phase: AttachmentPhase, since: i64) -> VolumeAttachmentStatus {
    VolumeAttachmentStatus {
        phase: Some(phase),
        phase_since: Some(Time(t(since))),
        ..Default::default()
    }
}

fn connected(nodes: &[&str]) -> ProbeAnswer {
    ProbeAnswer::Answered(Connections::to(nodes.iter().copied()))
}

/// The backend connects the volume to `nodes`, and also through an export that names no node.
fn unattributed(nodes: &[&str]) -> ProbeAnswer {
    let mut connections = Connections::to(nodes.iter().copied());
    connections.unattributed.insert("by-hand".into());
    ProbeAnswer::Answered(connections)
}

/// One row: the attachment, its backend and the clock.
struct Row {
    deleting: bool,
    status: VolumeAttachmentStatus,
    backend: ProbeAnswer,
    request: Request,
    policy: VolumePolicy,
    basis: Basis,
    turn: Turn,
    now: Timestamp,
}

impl Row {
    fn new(phase: AttachmentPhase, backend: ProbeAnswer) -> Self {
        Self {
            deleting: false,
            status: in_phase(phase, 0),
            backend,
            request: Request::None,
            policy: policy(true, false),
            basis: Basis::Fresh,
            turn: Turn::Ours,
            now: t(10),
        }
    }
    fn deleting(mut self) -> Self {
        self.deleting = true;
        self
    }
    fn stuck(mut self) -> Self {
        self.now = t(1000);
        self
    }
    fn manual(mut self) -> Self {
        self.policy.auto_force_detach = false;
        self
    }
    fn requested(mut self, token: &str) -> Self {
        self.request = Request::New(token.into());
        self
    }
    fn input(&self) -> Input<'_> {
        Input {
            deleting: self.deleting,
            has_finalizer: true,
            node: NODE,
            status: &self.status,
            request: &self.request,
            volume: Ok(&self.policy),
            target: None,
            sibling: None,
            claimed_elsewhere: Some(&[]),
            backend: Some(&self.backend),
            basis: self.basis,
            turn: self.turn,
            generation: Some(1),
            resync: RESYNC,
            now: self.now,
        }
    }
    fn decide(&self) -> Step {
        decide(&self.input())
    }
    /// What a status is computed against for this row, with `target` as what it reaches.
    fn observed<'a>(&'a self, target: &'a Binding) -> Input<'a> {
        Input {
            node: NODE,
            target: Some(target),
            generation: Some(1),
            volume: Ok(&self.policy),
            backend: Some(&self.backend),
            request: &Request::None,
            now: self.now,
            ..on_record()
        }
    }
}

use AttachmentPhase::*;

// The five cases of the design, by name.

#[test]
fn case_1_stuck_attaching_not_connected_is_cleaned_up_then_attached_from_scratch() {
    let row = Row::new(Attaching, connected(&[])).stuck();
    assert_eq!(
        row.decide(),
        Step::ForceDetach {
            reason: ForceDetachReason::StuckAttaching,
            token: None
        }
    );
}

#[test]
fn case_2_stuck_attaching_connected_here_rolls_forward() {
    let row = Row::new(Attaching, connected(&[NODE])).stuck();
    assert_eq!(
        row.decide(),
        Step::MarkAttached {
            rolled_forward: true
        }
    );
}

#[test]
fn case_3_detaching_not_connected_is_marked_detached_then_released() {
    let row = Row::new(Detaching, connected(&[])).deleting().stuck();
    assert_eq!(row.decide(), Step::MarkDetached);
    let row = Row::new(Detached, connected(&[])).deleting();
    assert_eq!(row.decide(), Step::ReleaseFinalizer);
}

#[test]
fn case_4_stuck_detaching_connected_is_force_detached() {
    let row = Row::new(Detaching, connected(&[NODE])).deleting().stuck();
    assert_eq!(
        row.decide(),
        Step::ForceDetach {
            reason: ForceDetachReason::StuckDetaching,
            token: None
        }
    );
}

// Case 5 (orphans) is the Volume's decision: see `volume_tests` below.

#[test]
fn normal_attach_records_intent_before_calling_the_driver() {
    assert_eq!(
        Row::new(Pending, connected(&[])).decide(),
        Step::BeginAttach
    );
    assert_eq!(Row::new(Attaching, connected(&[])).decide(), Step::Attach);
    let mut row = Row::new(Attaching, connected(&[NODE]));
    assert_eq!(
        row.decide(),
        Step::Attach,
        "connected but no connection info yet: fetch it idempotently"
    );
    row.status
        .connection_info
        .insert("uri".into(), "nbd://x".into());
    assert_eq!(
        row.decide(),
        Step::MarkAttached {
            rolled_forward: false
        }
    );
    row.status.phase = Some(Attached);
    assert_eq!(
        row.decide(),
        Step::Wait {
            why: Wait::Converged,
            recheck_after: Some(RESYNC)
        }
    );
    assert_eq!(
        Row::new(Attached, connected(&[NODE])).decide(),
        Step::Attach,
        "confirmed (rolled forward) without connection info: fetch it idempotently"
    );
}

#[test]
fn normal_detach_records_intent_then_detaches_safely() {
    assert_eq!(
        Row::new(Attached, connected(&[NODE])).deleting().decide(),
        Step::BeginDetach
    );
    assert_eq!(
        Row::new(Detaching, connected(&[NODE])).deleting().decide(),
        Step::Detach
    );
    assert_eq!(
        Row::new(Detaching, connected(&[])).deleting().decide(),
        Step::MarkDetached
    );
}

#[test]
fn a_stuck_attachment_with_auto_force_detach_off_keeps_trying_safely() {
    assert_eq!(
        Row::new(Detaching, connected(&[NODE]))
            .deleting()
            .stuck()
            .manual()
            .decide(),
        Step::Detach
    );
    assert_eq!(
        Row::new(Attaching, connected(&[]))
            .stuck()
            .manual()
            .decide(),
        Step::Attach
    );
}

#[test]
fn a_new_token_forces_a_detach_in_any_phase() {
    for phase in [Pending, Attaching, Attached, Detaching, Detached, Failed] {
        for deleting in [false, true] {
            let mut row = Row::new(phase, connected(&[NODE])).requested("t1");
            row.deleting = deleting;
            assert_eq!(
                row.decide(),
                Step::ForceDetach {
                    reason: ForceDetachReason::Requested,
                    token: Some("t1".into())
                },
                "{phase:?} deleting={deleting}"
            );
        }
    }
}

#[test]
fn a_backend_that_cannot_be_probed_is_confirmed_only_by_its_calls() {
    let unprobed = ProbeAnswer::Unprobeable(None);
    assert_eq!(
        Row::new(Pending, unprobed.clone()).decide(),
        Step::BeginAttach
    );
    assert_eq!(Row::new(Attaching, unprobed.clone()).decide(), Step::Attach);
    let confirmed = ProbeAnswer::Unprobeable(Some(Confirmed::Connected));
    assert_eq!(
        Row::new(Attaching, confirmed).decide(),
        Step::MarkAttached {
            rolled_forward: false
        }
    );
    // Without a call's word, a Detaching attachment is never marked detached, stuck or not.
    assert_eq!(
        Row::new(Detaching, unprobed.clone()).deleting().decide(),
        Step::Detach
    );
    assert_eq!(
        Row::new(Detaching, unprobed).deleting().stuck().decide(),
        Step::ForceDetach {
            reason: ForceDetachReason::StuckDetaching,
            token: None
        }
    );
    let disconnected = ProbeAnswer::Unprobeable(Some(Confirmed::Disconnected));
    assert_eq!(
        Row::new(Detaching, disconnected).deleting().decide(),
        Step::MarkDetached
    );
}

#[test]
fn where_the_backend_cannot_be_asked_another_nodes_record_blocks_a_new_single_attach() {
    let unprobed = ProbeAnswer::Unprobeable(None);
    let claims = ["attachment a2 on node node-b".to_owned()];
    let decide_with = |row: &Row, claimed: Option<&[String]>| {
        decide(&Input {
            claimed_elsewhere: claimed,
            ..row.input()
        })
    };
    for phase in [Pending, Failed, Detached] {
        let row = Row::new(phase, unprobed.clone());
        assert_eq!(
            decide_with(&row, Some(&claims)),
            Step::BlockAttach {
                holders: claims.to_vec(),
                seen_in: HoldersSeenIn::Records,
            },
            "{phase:?}"
        );
        // Not listed on this turn: the list comes with the fresh reads, never a guess.
        assert_eq!(decide_with(&row, None), Step::Refresh, "{phase:?}");
        assert_eq!(decide_with(&row, Some(&[])), Step::BeginAttach, "{phase:?}");
        // A multi-attach volume may be on other nodes too.
        let mut multi = Row::new(phase, unprobed.clone());
        multi.policy.multi_attach = true;
        assert_eq!(decide_with(&multi, Some(&claims)), Step::BeginAttach);
    }
    // An attach already intended is called again only while no other node claims the volume
    // (an intent written while the Volume was multi-attach was decided on no list); its phase
    // stays (its call may have landed), and once stuck it is forced off its own node, or waits
    // for a person: two such intents never wait on each other for good.
    let attaching = Row::new(Attaching, unprobed.clone());
    let blocked = Step::BlockAttach {
        holders: claims.to_vec(),
        seen_in: HoldersSeenIn::Records,
    };
    assert_eq!(decide_with(&attaching, Some(&claims)), blocked);
    assert_eq!(decide_with(&attaching, Some(&[])), Step::Attach);
    assert_eq!(decide_with(&attaching, None), Step::Refresh);
    let status = stepped(&attaching.status, &blocked, &attaching.input());
    assert_eq!(status.phase, Some(Attaching));
    assert_eq!(
        decide_with(
            &Row::new(Attaching, unprobed.clone()).stuck(),
            Some(&claims)
        ),
        Step::ForceDetach {
            reason: ForceDetachReason::StuckAttaching,
            token: None
        }
    );
    assert_eq!(
        decide_with(
            &Row::new(Attaching, unprobed.clone()).stuck().manual(),
            Some(&claims)
        ),
        blocked
    );
    // Not forced off a connection another attachment of its node holds: that one's client
    // would lose its disk for a claim that never attached.
    let stuck = Row::new(Attaching, unprobed.clone()).stuck();
    assert_eq!(
        decide(&Input {
            claimed_elsewhere: Some(&claims),
            sibling: Some("vc"),
            ..stuck.input()
        }),
        blocked
    );
    let mut multi = Row::new(Attaching, unprobed.clone());
    multi.policy.multi_attach = true;
    assert_eq!(decide_with(&multi, Some(&claims)), Step::Attach);
    assert_eq!(decide_with(&multi, None), Step::Attach);
    // A backend that answers is asked instead of the records.
    let probed = Row::new(Pending, connected(&[]));
    assert_eq!(decide_with(&probed, Some(&claims)), Step::BeginAttach);
    // The block tells who claims the volume, and is looked at again without the resync's wait.
    let blocked = Step::BlockAttach {
        holders: claims.to_vec(),
        seen_in: HoldersSeenIn::Records,
    };
    let row = Row::new(Pending, unprobed);
    let status = stepped(&row.status, &blocked, &row.input());
    let condition = find_condition(&status.conditions, crate::api::types::ATTACH_BLOCKED).unwrap();
    assert_eq!(condition.status, "True");
    assert_eq!(condition.reason, "ClaimedByAnotherNode");
    assert!(condition.message.contains("attachment a2 on node node-b"));
    assert_eq!(
        recheck::ending(&blocked, &row.input(), false),
        Some(Recheck::Backoff {
            deadline: Some(recheck::CLAIMED_RECHECK)
        })
    );
}

fn handled(tokens: &[&str]) -> VolumeAttachmentStatus {
    VolumeAttachmentStatus {
        handled_tokens: tokens.iter().map(|t| t.to_string()).collect(),
        ..in_phase(Attached, 0)
    }
}

#[test]
fn a_token_acts_once() {
    assert_eq!(Request::read(Some("t1"), &handled(&["t1"])), Request::None);
    assert_eq!(
        Request::read(Some("t2"), &handled(&["t1"])),
        Request::New("t2".into())
    );
    // Reverting to an earlier token is no new request.
    assert_eq!(
        Request::read(Some("t1"), &handled(&["t1", "t2"])),
        Request::None
    );
    assert_eq!(Request::read(None, &handled(&["t1"])), Request::None);
    assert!(matches!(
        Request::read(Some(""), &handled(&[])),
        Request::Invalid { .. }
    ));
    assert!(matches!(
        Request::read(Some(&"x".repeat(129)), &handled(&[])),
        Request::Invalid { .. }
    ));
    assert!(matches!(
        Request::read(Some("a\nb"), &handled(&[])),
        Request::Invalid { .. }
    ));
    // A record written before the list was kept names its token in the force-detach record.
    let mut older = handled(&[]);
    older.force_detach = Some(ForceDetachStatus {
        token: Some("t1".into()),
        reason: ForceDetachReason::Requested,
        state: ForceDetachState::Succeeded,
        attempts: 1,
        started_at: Time(t(0)),
        finished_at: None,
        message: None,
    });
    assert_eq!(Request::read(Some("t1"), &older), Request::None);
}

#[test]
fn a_token_present_at_creation_is_recorded_not_acted_on() {
    let never_seen = VolumeAttachmentStatus::default();
    let request = Request::read(Some("t1"), &never_seen);
    assert_eq!(request, Request::AtCreation("t1".into()));
    let mut row = Row::new(Pending, connected(&[]));
    row.status = never_seen;
    row.request = request.clone();
    let step = row.decide();
    assert_eq!(step, Step::BeginAttach);
    let observed = Input {
        node: NODE,
        target: None,
        generation: Some(1),
        volume: Ok(&row.policy),
        backend: Some(&row.backend),
        request: &request,
        now: row.now,
        ..on_record()
    };
    let status = stepped(&row.status, &step, &observed);
    assert_eq!(status.handled_tokens, ["t1"]);
    assert_eq!(Request::read(Some("t1"), &status), Request::None);
    let notices = events::between(&row.status, &status, "v", NODE);
    assert!(
        notices.iter().any(|n| n.reason == "TokenPresentAtCreation"),
        "{notices:?}"
    );
}

#[test]
fn an_automatic_force_does_not_make_a_handled_token_new_again() {
    let policy = policy(true, false);
    let mut status = handled(&["t1"]);
    status.phase = Some(Detaching);
    let answer = connected(&[NODE]);
    let observed = Input {
        node: NODE,
        target: None,
        generation: Some(1),
        volume: Ok(&policy),
        backend: Some(&answer),
        request: &Request::None,
        now: t(1000),
        ..on_record()
    };
    let forced = stepped(
        &status,
        &Step::ForceDetach {
            reason: ForceDetachReason::StuckDetaching,
            token: None,
        },
        &observed,
    );
    assert_eq!(forced.force_detach.as_ref().unwrap().token, None);
    assert_eq!(Request::read(Some("t1"), &forced), Request::None);
}

#[test]
fn the_handled_tokens_are_bounded_and_forget_the_oldest() {
    let policy = policy(true, false);
    let answer = connected(&[NODE]);
    let mut status = in_phase(Attached, 0);
    for i in 0..MAX_HANDLED_TOKENS + 3 {
        let token = format!("t{i}");
        let request = Request::read(Some(&token), &status);
        let observed = Input {
            node: NODE,
            target: None,
            generation: Some(1),
            volume: Ok(&policy),
            backend: Some(&answer),
            request: &request,
            now: t(10),
            ..on_record()
        };
        status = stepped(
            &status,
            &Step::ForceDetach {
                reason: ForceDetachReason::Requested,
                token: Some(token),
            },
            &observed,
        );
    }
    assert_eq!(status.handled_tokens.len(), MAX_HANDLED_TOKENS);
    assert_eq!(
        status.handled_tokens.first().map(String::as_str),
        Some("t3")
    );
    assert_eq!(
        status.handled_tokens.last().map(String::as_str),
        Some(format!("t{}", MAX_HANDLED_TOKENS + 2).as_str())
    );
}

#[test]
fn an_attach_is_blocked_while_another_node_holds_a_single_attach_volume() {
    let step = Row::new(Pending, connected(&[OTHER])).decide();
    assert_eq!(
        step,
        Step::BlockAttach {
            holders: vec![OTHER.into()],
            seen_in: HoldersSeenIn::Backend,
        }
    );
    assert_eq!(
        Row::new(Attaching, connected(&[OTHER])).decide(),
        Step::BlockAttach {
            holders: vec![OTHER.into()],
            seen_in: HoldersSeenIn::Backend,
        }
    );
    let mut multi = Row::new(Pending, connected(&[OTHER]));
    multi.policy.multi_attach = true;
    assert_eq!(multi.decide(), Step::BeginAttach);
}

#[test]
fn a_connection_lost_out_of_band_is_recorded_then_reattached() {
    assert_eq!(
        Row::new(Attached, connected(&[])).decide(),
        Step::ConnectionLost
    );
}

/// A forced detach a person requested with `token`, its intent stored, its call not confirmed.
fn requested_force_in_progress(token: &str) -> ForceDetachStatus {
    ForceDetachStatus {
        token: Some(token.into()),
        reason: ForceDetachReason::Requested,
        state: ForceDetachState::InProgress,
        attempts: 1,
        started_at: Time(t(0)),
        finished_at: None,
        message: None,
    }
}

#[test]
fn a_force_detach_under_way_goes_on_after_a_restart() {
    let mut row = Row::new(Detaching, connected(&[NODE]));
    row.status.force_detach = Some(requested_force_in_progress("t1"));
    assert_eq!(
        row.decide(),
        Step::ForceDetach {
            reason: ForceDetachReason::Requested,
            token: Some("t1".into())
        }
    );
}

#[test]
fn a_misconfiguration_fails_without_touching_the_backend() {
    let row = Row::new(Attached, connected(&[NODE]));
    let problem = VolumeProblem::VolumeNotFound("v".into());
    let input = Input {
        volume: Err(&problem),
        backend: None,
        ..row.input()
    };
    assert_eq!(decide(&input), Step::Fail(problem.clone()));
}

#[test]
fn the_finalizer_comes_before_anything_else() {
    let row = Row::new(Pending, connected(&[]));
    assert_eq!(
        decide(&Input {
            has_finalizer: false,
            ..row.input()
        }),
        Step::AddFinalizer
    );
    let row = row.deleting();
    assert!(matches!(
        decide(&Input {
            has_finalizer: false,
            ..row.input()
        }),
        Step::Wait { .. }
    ));
}

// Every combination, against the invariant.

fn all_rows() -> Vec<Row> {
    let backends = [
        connected(&[]),
        connected(&[NODE]),
        connected(&[OTHER]),
        connected(&[NODE, OTHER]),
        unattributed(&[]),
        unattributed(&[NODE]),
        ProbeAnswer::Unreachable("down".into()),
        ProbeAnswer::Unprobeable(None),
        ProbeAnswer::Unprobeable(Some(Confirmed::Connected)),
        ProbeAnswer::Unprobeable(Some(Confirmed::Disconnected)),
    ];
    let requests = [
        Request::None,
        Request::New("t".into()),
        Request::AtCreation("t".into()),
        Request::Invalid {
            token: String::new(),
            why: "empty",
        },
    ];
    let mut rows = Vec::new();
    for phase in [Pending, Attaching, Attached, Detaching, Detached, Failed] {
        for backend in &backends {
            for request in &requests {
                for deleting in [false, true] {
                    for stuck in [false, true] {
                        for auto in [false, true] {
                            for multi in [false, true] {
                                for forcing in [false, true] {
                                    for basis in [Basis::Fresh, Basis::Cached, Basis::Conflicted] {
                                        for turn in [
                                            Turn::Ours,
                                            Turn::VolumeBusy,
                                            Turn::CallMayStillLand(Duration::from_secs(7)),
                                            Turn::Fenced,
                                        ] {
                                            let mut row = Row::new(phase, backend.clone());
                                            row.basis = basis;
                                            row.turn = turn;
                                            row.deleting = deleting;
                                            row.request = request.clone();
                                            row.policy = policy(auto, multi);
                                            if stuck {
                                                row = row.stuck();
                                            }
                                            if forcing {
                                                row.status.force_detach = Some(ForceDetachStatus {
                                                    token: None,
                                                    reason: ForceDetachReason::StuckDetaching,
                                                    state: ForceDetachState::InProgress,
                                                    attempts: 1,
                                                    started_at: Time(t(0)),
                                                    finished_at: None,
                                                    message: None,
                                                });
                                            }
                                            rows.push(row);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    rows
}

/// The backend's word on this node: its probe, or for a backend that cannot be probed, the call
/// that just succeeded. `None`: no word.
fn here(backend: &ProbeAnswer) -> Option<bool> {
    match backend {
        ProbeAnswer::Answered(c) => Some(c.includes(NODE)),
        ProbeAnswer::Unprobeable(Some(confirmed)) => Some(*confirmed == Confirmed::Connected),
        ProbeAnswer::Unprobeable(None) | ProbeAnswer::Unreachable(_) => None,
    }
}

/// The backend is asked only when the decision rests on it, and never by a reconcile that may
/// not act on the volume: with no answer yet, every row either takes a step that rests on the
/// record alone or asks for the probe, and deciding on the answer then given is deciding with it
/// up front.
#[test]
fn the_backend_is_asked_only_when_the_decision_rests_on_it() {
    for row in &all_rows() {
        let with_answer = row.decide();
        let unasked = decide(&Input {
            backend: None,
            ..row.input()
        });
        let context = format!(
            "phase={:?} backend={:?} request={:?} deleting={} basis={:?} turn={:?}: {with_answer:?} / unasked {unasked:?}",
            row.status.phase, row.backend, row.request, row.deleting, row.basis, row.turn,
        );
        if unasked == Step::Probe {
            assert_eq!(row.turn, Turn::Ours, "only on the volume's turn: {context}");
            assert_ne!(row.basis, Basis::Conflicted, "{context}");
        } else {
            assert_eq!(
                unasked, with_answer,
                "a step on the record alone: {context}"
            );
            assert!(
                !matches!(
                    unasked,
                    Step::Attach
                        | Step::Detach
                        | Step::ForceDetach { .. }
                        | Step::MarkAttached { .. }
                        | Step::MarkDetached
                        | Step::ConnectionLost
                        | Step::BlockAttach { .. }
                        | Step::ReleaseFinalizer
                        | Step::HandOver { .. }
                ),
                "no backend step without the backend's answer: {context}"
            );
        }
    }
}

#[test]
fn every_combination_keeps_the_invariant() {
    let rows = all_rows();
    assert_eq!(rows.len(), 6 * 10 * 4 * 2 * 2 * 2 * 2 * 2 * 3 * 4);
    for row in &rows {
        let step = row.decide();
        let context = format!(
            "phase={:?} backend={:?} request={:?} deleting={} now={} policy={:?} force={:?} basis={:?} turn={:?} -> {step:?}",
            row.status.phase,
            row.backend,
            row.request,
            row.deleting,
            row.now,
            row.policy,
            row.status.force_detach,
            row.basis,
            row.turn,
        );
        // The running system's rules: one actor, on the volume's turn, on a current record.
        let on_record = decide(&Input {
            basis: Basis::Fresh,
            turn: Turn::Ours,
            ..row.input()
        });
        match (row.turn, row.basis) {
            (Turn::Fenced, _) => {
                assert!(
                    matches!(
                        step,
                        Step::Wait {
                            why: Wait::Fenced,
                            ..
                        }
                    ),
                    "a fenced replica does nothing: {context}"
                );
                continue;
            }
            (_, Basis::Conflicted) => {
                assert_eq!(
                    step,
                    Step::Refresh,
                    "a refused write is read again: {context}"
                );
                continue;
            }
            (Turn::VolumeBusy | Turn::CallMayStillLand(_), _) => {
                // Another reconcile works on the volume, or a call may still land on it: the
                // record alone may be written, nothing asked of the backend or done to it.
                let (waits_for, recheck) = match row.turn {
                    Turn::CallMayStillLand(left) => (Wait::CallMayStillLand, left),
                    _ => (Wait::VolumeBusy, BUSY_RECHECK),
                };
                match &step {
                    Step::AddFinalizer | Step::Fail(_) => {}
                    Step::Wait {
                        why: Wait::Converged,
                        ..
                    } => {}
                    Step::Wait { why, recheck_after } => {
                        assert_eq!(*why, waits_for, "{context}");
                        assert_eq!(*recheck_after, Some(recheck), "{context}");
                    }
                    _ => panic!("nothing touches the volume now: {context}"),
                }
                continue;
            }
            (Turn::Ours, Basis::Cached) => {
                assert!(!step.needs_fresh_record(), "{context}");
                if on_record.needs_fresh_record() {
                    assert_eq!(step, Step::Refresh, "{context}");
                } else {
                    assert_eq!(step, on_record, "{context}");
                }
                continue;
            }
            (Turn::Ours, Basis::Fresh) => {}
        }
        let unprobeable = matches!(row.backend, ProbeAnswer::Unprobeable(_));
        let phase = phase_of(&row.status);
        if let ProbeAnswer::Answered(c) = &row.backend
            && !c.unattributed.is_empty()
        {
            // A connection that names no node: never "detached" from here on its word, never
            // attached elsewhere past it.
            assert!(
                !matches!(
                    step,
                    Step::MarkDetached | Step::ReleaseFinalizer | Step::MarkAttached { .. }
                ) || (c.includes(NODE) && matches!(step, Step::MarkAttached { .. })),
                "{context}"
            );
            if !c.includes(NODE) && !row.policy.multi_attach {
                assert!(
                    !matches!(step, Step::Attach | Step::BeginAttach),
                    "{context}"
                );
            }
            continue;
        }
        match (&step, here(&row.backend)) {
            // 1. Detached only on the backend's word. Without a probe, a `Detached` that was
            // itself confirmed stands for it.
            (Step::MarkDetached, h) => assert!(h == Some(false), "{context}"),
            (Step::ReleaseFinalizer, h) => assert!(
                h == Some(false) || (unprobeable && phase == Detached),
                "{context}"
            ),
            (Step::MarkAttached { .. }, h) => assert_eq!(h, Some(true), "{context}"),
            (_, _) if unprobeable => {}
            // 3. No answer, no conclusion.
            (_, None) => assert!(
                matches!(
                    step,
                    Step::Wait {
                        why: Wait::BackendUnreachable,
                        ..
                    }
                ),
                "{context}"
            ),
            // 2. No attach while another node holds a single-attach volume.
            (Step::Attach | Step::BeginAttach, Some(h)) => {
                let others = matches!(&row.backend, ProbeAnswer::Answered(c) if c.nodes.iter().any(|n| n != NODE));
                assert!(h || !others || row.policy.multi_attach, "{context}");
                assert!(!row.deleting, "{context}");
            }
            _ => {}
        }
        if let Request::New(token) = &row.request
            && !matches!(row.backend, ProbeAnswer::Unreachable(_))
        {
            assert_eq!(
                step,
                Step::ForceDetach {
                    reason: ForceDetachReason::Requested,
                    token: Some(token.clone())
                },
                "{context}"
            );
        }
        if let Request::AtCreation(token) = &row.request {
            assert!(
                !matches!(&step, Step::ForceDetach { token: Some(t), .. } if t == token),
                "a token present at creation never acts: {context}"
            );
        }
        if matches!(step, Step::ForceDetach { token: None, .. }) {
            let forcing = row.status.force_detach.is_some();
            assert!(
                forcing || row.policy.auto_force_detach,
                "automatic force only when allowed: {context}"
            );
            assert!(
                forcing || row.now == t(1000),
                "automatic force only when stuck: {context}"
            );
        }
    }
}

/// A backend that does what it is told, to walk the steps to their end.
fn simulate(backend: &mut Connections, step: &Step) {
    match step {
        // A single-attach backend refuses a second node, as invariant 2 expects of us anyway.
        Step::Attach if backend.nodes.iter().all(|n| n == NODE) => {
            backend.nodes.insert(NODE.into());
        }
        Step::Detach | Step::ForceDetach { .. } => {
            backend.nodes.remove(NODE);
        }
        _ => {}
    }
}

#[test]
fn every_state_converges_when_the_backend_works() {
    for phase in [Pending, Attaching, Attached, Detaching, Detached, Failed] {
        for start in [vec![], vec![NODE]] {
            for deleting in [false, true] {
                let mut status = in_phase(phase, 0);
                let mut backend = Connections::to(start.iter().copied());
                let policy = policy(true, false);
                let mut now = t(10);
                let mut steps = Vec::new();
                let done = loop {
                    assert!(
                        steps.len() < 10,
                        "{phase:?} {start:?} deleting={deleting} does not converge: {steps:?}"
                    );
                    let answer = ProbeAnswer::Answered(backend.clone());
                    let input = Input {
                        deleting,
                        has_finalizer: true,
                        node: NODE,
                        status: &status,
                        request: &Request::None,
                        volume: Ok(&policy),
                        target: None,
                        sibling: None,
                        claimed_elsewhere: Some(&[]),
                        backend: Some(&answer),
                        basis: Basis::Fresh,
                        turn: Turn::Ours,
                        generation: Some(1),
                        resync: RESYNC,
                        now,
                    };
                    let step = decide(&input);
                    steps.push(step.clone());
                    status = after_step(&input, &step);
                    simulate(&mut backend, &step);
                    if step == Step::Attach {
                        status
                            .connection_info
                            .insert("uri".into(), "nbd://x".into());
                    }
                    now += Duration::from_secs(1);
                    match step {
                        Step::ReleaseFinalizer => break "released",
                        Step::Wait {
                            why: Wait::Converged,
                            ..
                        } => break "attached",
                        _ => {}
                    }
                };
                let want = if deleting { "released" } else { "attached" };
                assert_eq!(
                    done, want,
                    "{phase:?} {start:?} deleting={deleting}: {steps:?}"
                );
                assert_eq!(status.attached, !deleting);
            }
        }
    }
}

#[test]
fn a_requested_force_detach_of_a_live_attachment_reattaches() {
    let policy = policy(true, false);
    let mut status = in_phase(Attached, 0);
    status.attached = true;
    let mut backend = Connections::to([NODE]);
    let mut now = t(10);
    let mut steps = Vec::new();
    for _ in 0..6 {
        let request = Request::read(Some("t1"), &status);
        let answer = ProbeAnswer::Answered(backend.clone());
        let input = Input {
            deleting: false,
            has_finalizer: true,
            node: NODE,
            status: &status,
            request: &request,
            volume: Ok(&policy),
            target: None,
            sibling: None,
            claimed_elsewhere: Some(&[]),
            backend: Some(&answer),
            basis: Basis::Fresh,
            turn: Turn::Ours,
            generation: Some(1),
            resync: RESYNC,
            now,
        };
        let step = decide(&input);
        status = after_step(&input, &step);
        simulate(&mut backend, &step);
        if step == Step::Attach {
            status
                .connection_info
                .insert("uri".into(), "nbd://x".into());
        }
        steps.push(step);
        now += Duration::from_secs(1);
    }
    assert_eq!(
        steps,
        vec![
            Step::ForceDetach {
                reason: ForceDetachReason::Requested,
                token: Some("t1".into())
            },
            Step::MarkDetached,
            Step::BeginAttach,
            Step::Attach,
            Step::MarkAttached {
                rolled_forward: false
            },
            Step::Wait {
                why: Wait::Converged,
                recheck_after: Some(RESYNC)
            },
        ]
    );
    let force = status.force_detach.unwrap();
    assert_eq!(
        (force.state, force.token.as_deref(), force.attempts),
        (ForceDetachState::Succeeded, Some("t1"), 1)
    );
}

mod status_tests {
    use super::*;
    use crate::api::types::{ATTACH_BLOCKED, BACKEND_IN_SYNC, STUCK};
    use crate::decide::events::{Severity, between};

    fn observed<'a>(
        backend: &'a ProbeAnswer,
        policy: &'a VolumePolicy,
        request: &'a Request,
        now: Timestamp,
    ) -> Input<'a> {
        Input {
            node: NODE,
            target: None,
            generation: Some(3),
            volume: Ok(policy),
            backend: Some(backend),
            request,
            now,
            ..on_record()
        }
    }

    #[test]
    fn recomputing_an_unchanged_state_changes_nothing() {
        let policy = policy(true, false);
        let backend = connected(&[NODE]);
        let step = Step::Wait {
            why: Wait::Converged,
            recheck_after: None,
        };
        let first = stepped(
            &in_phase(Attached, 0),
            &step,
            &observed(&backend, &policy, &Request::None, t(10)),
        );
        let again = stepped(
            &first,
            &step,
            &observed(&backend, &policy, &Request::None, t(500)),
        );
        assert_eq!(
            first, again,
            "a later reconcile of a converged attachment must not produce a write"
        );
        assert!(between(&first, &again, "v", NODE).is_empty());
    }

    #[test]
    fn phase_since_moves_only_on_a_phase_change() {
        let policy = policy(true, false);
        let backend = connected(&[]);
        let s1 = stepped(
            &in_phase(Pending, 0),
            &Step::BeginAttach,
            &observed(&backend, &policy, &Request::None, t(10)),
        );
        assert_eq!(s1.phase_since, Some(Time(t(10))));
        let s2 = stepped(
            &s1,
            &Step::Attach,
            &observed(&backend, &policy, &Request::None, t(20)),
        );
        assert_eq!(s2.phase_since, Some(Time(t(10))));
    }

    #[test]
    fn stuck_shows_as_a_condition_and_one_warning() {
        let policy = policy(false, false);
        let backend = connected(&[NODE]);
        let start = in_phase(Detaching, 0);
        let before = stepped(
            &start,
            &Step::Detach,
            &observed(&backend, &policy, &Request::None, t(10)),
        );
        let after = stepped(
            &before,
            &Step::Detach,
            &observed(&backend, &policy, &Request::None, t(1000)),
        );
        let stuck = find_condition(&after.conditions, STUCK).unwrap();
        assert_eq!(
            (stuck.status.as_str(), stuck.reason.as_str()),
            ("True", "StuckDetaching")
        );
        assert!(
            stuck.message.contains("safedetach.io/force-detach"),
            "{}",
            stuck.message
        );
        let notices = between(&before, &after, "v", NODE);
        assert_eq!(
            notices
                .iter()
                .filter(|n| n.reason == "StuckDetaching" && n.severity == Severity::Warning)
                .count(),
            1
        );
        let later = stepped(
            &after,
            &Step::Detach,
            &observed(&backend, &policy, &Request::None, t(2000)),
        );
        assert!(
            between(&after, &later, "v", NODE).is_empty(),
            "no repeated warning"
        );
    }

    #[test]
    fn an_automatic_force_of_a_stuck_attachment_is_one_warning_that_says_why() {
        let policy = policy(true, false);
        let backend = connected(&[NODE]);
        let start = in_phase(Detaching, 0);
        let before = stepped(
            &start,
            &Step::Detach,
            &observed(&backend, &policy, &Request::None, t(10)),
        );
        let step = Step::ForceDetach {
            reason: ForceDetachReason::StuckDetaching,
            token: None,
        };
        let forcing = stepped(
            &before,
            &step,
            &observed(&backend, &policy, &Request::None, t(1000)),
        );
        assert!(crate::api::is_true(&forcing.conditions, STUCK));
        let notices = between(&before, &forcing, "v", NODE);
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(
            (notices[0].reason.as_str(), notices[0].severity),
            ("ForceDetaching", Severity::Warning)
        );
        assert!(
            notices[0]
                .message
                .contains("Detaching for longer than stuckAfter")
                && notices[0].message.contains("reason StuckDetaching"),
            "{}",
            notices[0].message
        );
    }

    #[test]
    fn a_forced_detach_says_it_was_forced_why_and_for_which_token() {
        let policy = policy(true, false);
        let request = Request::New("t9".into());
        let step = Step::ForceDetach {
            reason: ForceDetachReason::Requested,
            token: Some("t9".into()),
        };
        let attached = in_phase(Attached, 0);
        let forcing = stepped(
            &attached,
            &step,
            &observed(&connected(&[NODE]), &policy, &request, t(10)),
        );
        let started = between(&attached, &forcing, "v", NODE);
        assert_eq!(started[0].reason, "ForceDetaching");
        assert!(
            started[0].message.contains("Requested") && started[0].message.contains("t9"),
            "{:?}",
            started[0]
        );
        let detached = stepped(
            &forcing,
            &Step::MarkDetached,
            &observed(&connected(&[]), &policy, &Request::None, t(11)),
        );
        let done = between(&forcing, &detached, "v", NODE);
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(
            (done[0].reason.as_str(), done[0].severity),
            ("ForceDetached", Severity::Warning)
        );
        assert!(done[0].message.contains("confirmed by the backend"));
        assert!(!detached.attached);
    }

    #[test]
    fn attached_follows_the_backend_not_the_record() {
        let policy = policy(true, false);
        let step = Step::Wait {
            why: Wait::Converged,
            recheck_after: None,
        };
        let status = stepped(
            &in_phase(Attached, 0),
            &step,
            &observed(&connected(&[]), &policy, &Request::None, t(10)),
        );
        assert!(!status.attached);
        assert_eq!(
            find_condition(&status.conditions, BACKEND_IN_SYNC)
                .unwrap()
                .status,
            "False"
        );
        let unreachable = ProbeAnswer::Unreachable("down".into());
        let kept = stepped(
            &VolumeAttachmentStatus {
                attached: true,
                ..in_phase(Attached, 0)
            },
            &step,
            &observed(&unreachable, &policy, &Request::None, t(10)),
        );
        assert!(kept.attached, "no answer changes nothing");
        assert_eq!(
            find_condition(&kept.conditions, BACKEND_IN_SYNC)
                .unwrap()
                .status,
            "Unknown"
        );
    }

    #[test]
    fn a_blocked_attach_names_the_holder_and_clears_when_free() {
        let policy = policy(true, false);
        let step = Step::BlockAttach {
            holders: vec![OTHER.into()],
            seen_in: HoldersSeenIn::Backend,
        };
        let blocked = stepped(
            &in_phase(Pending, 0),
            &step,
            &observed(&connected(&[OTHER]), &policy, &Request::None, t(10)),
        );
        let condition = find_condition(&blocked.conditions, ATTACH_BLOCKED).unwrap();
        assert_eq!(condition.status, "True");
        assert!(condition.message.contains(OTHER));
        let freed = stepped(
            &blocked,
            &Step::BeginAttach,
            &observed(&connected(&[]), &policy, &Request::None, t(20)),
        );
        assert_eq!(
            find_condition(&freed.conditions, ATTACH_BLOCKED)
                .unwrap()
                .status,
            "False"
        );
    }

    #[test]
    fn a_misconfigured_attachment_that_was_attached_keeps_its_phase() {
        let policy = policy(true, false);
        let request = Request::None;
        let observed = Input {
            node: NODE,
            target: None,
            generation: Some(1),
            volume: Ok(&policy),
            backend: None,
            request: &request,
            now: t(10),
            ..on_record()
        };
        let problem = VolumeProblem::UnknownDriver("iscsi".into());
        let status = stepped(
            &VolumeAttachmentStatus {
                attached: true,
                ..in_phase(Attached, 0)
            },
            &Step::Fail(problem.clone()),
            &observed,
        );
        assert_eq!(status.phase, Some(Attached));
        assert!(status.attached);
        let pending = stepped(&in_phase(Pending, 0), &Step::Fail(problem), &observed);
        assert_eq!(pending.phase, Some(Failed));
    }
}

mod volume_tests {
    use super::*;
    use crate::api::types::{ORPHANED, READY};
    use crate::api::{OrphanPolicy, VolumePhase, VolumeStatus};
    use crate::decide::volume::{VolumeDecision, VolumeInput, decide_volume};
    use std::collections::BTreeSet;

    fn input<'a>(
        backend: &'a ProbeAnswer,
        claimed: &'a BTreeSet<String>,
        policy: OrphanPolicy,
        now: Timestamp,
    ) -> VolumeInput<'a> {
        VolumeInput {
            generation: Some(1),
            problem: None,
            backend: Some(backend),
            claimed,
            held_by: claimed,
            attachment_phases: &[],
            orphan_policy: policy,
            multi_attach: false,
            grace: STUCK_AFTER,
            no_such_volume: false,
            deleting: false,
            now,
        }
    }

    #[test]
    fn a_deleted_volume_stays_while_an_attachment_names_it() {
        let backend = connected(&[NODE]);
        let claimed = BTreeSet::from([NODE.to_owned()]);
        let held = decide_volume(
            &VolumeStatus::default(),
            &VolumeInput {
                deleting: true,
                ..input(&backend, &claimed, OrphanPolicy::Report, t(0))
            },
        );
        assert!(!held.release);
        let ready = find_condition(&held.status.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "WaitingForAttachments")
        );
        assert!(ready.message.contains(NODE), "{}", ready.message);

        let unclaimed = BTreeSet::new();
        let free = decide_volume(
            &held.status,
            &VolumeInput {
                deleting: true,
                ..input(&connected(&[]), &unclaimed, OrphanPolicy::Report, t(1))
            },
        );
        assert!(free.release);
        let live = decide_volume(
            &VolumeStatus::default(),
            &input(&connected(&[]), &unclaimed, OrphanPolicy::Report, t(1)),
        );
        assert!(!live.release, "a live Volume keeps its finalizer");
    }

    #[test]
    fn a_deleted_volume_is_not_held_by_the_attachments_of_an_alias() {
        let backend = connected(&[]);
        let alias_claims: BTreeSet<String> = [NODE.to_owned()].into();
        let none = BTreeSet::new();
        let decision = decide_volume(
            &VolumeStatus::default(),
            &VolumeInput {
                deleting: true,
                held_by: &none,
                ..input(&backend, &alias_claims, OrphanPolicy::Report, t(0))
            },
        );
        assert!(decision.release);
    }

    /// The decision for a deleted Volume under `orphanPolicy: Detach` that no attachment claims.
    fn deleting_under_detach(
        backend: &ProbeAnswer,
        status: &VolumeStatus,
        now: Timestamp,
    ) -> VolumeDecision {
        decide_volume(
            status,
            &VolumeInput {
                deleting: true,
                ..input(backend, &BTreeSet::new(), OrphanPolicy::Detach, now)
            },
        )
    }

    fn ready_reason(status: &VolumeStatus) -> (String, String) {
        let ready = find_condition(&status.conditions, READY).unwrap();
        (ready.reason.clone(), ready.message.clone())
    }

    #[test]
    fn a_deleted_volume_under_orphan_policy_detach_forces_its_orphan_off_before_it_goes() {
        let deleting = deleting_under_detach;
        let orphan = connected(&[OTHER]);
        let first = deleting(&orphan, &VolumeStatus::default(), t(0));
        assert!(!first.release, "not while the backend shows an orphan");
        assert!(first.force_detach.is_empty(), "not before the grace");
        assert_eq!(first.recheck_after, Some(STUCK_AFTER));
        let (reason, message) = ready_reason(&first.status);
        assert_eq!(reason, "WaitingForOrphans");
        assert!(message.contains(OTHER), "{message}");

        let past_grace = deleting(&orphan, &first.status, t(200));
        assert_eq!(past_grace.force_detach, vec![OTHER.to_owned()]);
        assert!(!past_grace.release, "forced, but not yet shown gone");

        let gone = deleting(&connected(&[]), &past_grace.status, t(201));
        assert!(gone.release);
        assert!(gone.force_detach.is_empty());
    }

    #[test]
    fn a_deleted_volume_under_orphan_policy_detach_waits_for_a_backend_that_does_not_answer() {
        let unclaimed = BTreeSet::new();
        let decide = |backend: &ProbeAnswer, policy, problem: Option<&VolumeProblem>| {
            decide_volume(
                &VolumeStatus::default(),
                &VolumeInput {
                    deleting: true,
                    problem,
                    ..input(backend, &unclaimed, policy, t(0))
                },
            )
        };
        let unreachable = ProbeAnswer::Unreachable("connection refused".into());
        let waits = decide(&unreachable, OrphanPolicy::Detach, None);
        assert!(!waits.release);
        let (reason, message) = ready_reason(&waits.status);
        assert_eq!(reason, "WaitingForBackend");
        assert!(message.contains("connection refused"), "{message}");
        assert!(message.contains("orphanPolicy: Report"), "{message}");

        assert!(decide(&unreachable, OrphanPolicy::Report, None).release);
        // A backend that has no such volume has nothing connected under it.
        let no_such = decide_volume(
            &VolumeStatus::default(),
            &VolumeInput {
                deleting: true,
                no_such_volume: true,
                ..input(&unreachable, &unclaimed, OrphanPolicy::Detach, t(0))
            },
        );
        assert!(no_such.release);
        // Orphans cannot be found where the backend cannot be probed.
        assert!(decide(&ProbeAnswer::Unprobeable(None), OrphanPolicy::Detach, None).release);
        // A Volume that cannot reach its backend at all has nothing to wait for.
        let unknown = VolumeProblem::UnknownDriver("gone".into());
        assert!(decide(&unreachable, OrphanPolicy::Detach, Some(&unknown)).release);
    }

    #[test]
    fn a_deleted_volume_under_orphan_policy_report_goes_and_tells_what_it_leaves() {
        let unclaimed = BTreeSet::new();
        let deleting = |backend: &ProbeAnswer, policy| {
            decide_volume(
                &VolumeStatus::default(),
                &VolumeInput {
                    deleting: true,
                    ..input(backend, &unclaimed, policy, t(0))
                },
            )
        };
        let decision = deleting(&connected(&[OTHER]), OrphanPolicy::Report);
        assert!(decision.release);
        assert!(decision.force_detach.is_empty());
        let notice = events::released_leaving("vol", decision.leaves.as_deref()).unwrap();
        assert_eq!(notice.reason, "Orphaned");
        assert!(notice.message.contains(OTHER), "{}", notice.message);

        let clean = deleting(&connected(&[]), OrphanPolicy::Report);
        assert!(clean.release);
        assert_eq!(clean.leaves, None);

        // An export that names no node cannot be forced by node: neither policy waits for it,
        // and the release names it.
        for policy in [OrphanPolicy::Report, OrphanPolicy::Detach] {
            let decision = deleting(&unattributed(&[]), policy);
            assert!(decision.release, "{policy:?}");
            let leaves = decision.leaves.expect("told");
            assert!(leaves.contains("by-hand"), "{leaves}");
        }
    }

    #[test]
    fn a_deleted_volume_that_goes_unprobed_names_the_orphans_it_last_saw() {
        let unclaimed = BTreeSet::new();
        // Its last answered probe recorded an orphan on OTHER.
        let seen = decide_volume(
            &VolumeStatus::default(),
            &input(&connected(&[OTHER]), &unclaimed, OrphanPolicy::Detach, t(0)),
        )
        .status;
        assert_eq!(seen.orphans.len(), 1);
        let unknown = VolumeProblem::UnknownDriver("gone".into());
        let unreachable = ProbeAnswer::Unreachable("connection refused".into());
        for (backend, problem) in [
            (&unreachable, Some(&unknown)),
            (&ProbeAnswer::Unprobeable(None), None),
        ] {
            let decision = decide_volume(
                &seen,
                &VolumeInput {
                    deleting: true,
                    problem,
                    ..input(backend, &unclaimed, OrphanPolicy::Detach, t(1))
                },
            );
            assert!(decision.release, "{backend:?}");
            let leaves = decision.leaves.expect("told");
            assert!(leaves.contains(OTHER), "{leaves}");
            assert!(leaves.contains("as last probed"), "{leaves}");
        }
        // A backend with no such volume has nothing connected under it: nothing to tell.
        let no_such = decide_volume(
            &seen,
            &VolumeInput {
                deleting: true,
                no_such_volume: true,
                ..input(&unreachable, &unclaimed, OrphanPolicy::Detach, t(1))
            },
        );
        assert!(no_such.release);
        assert_eq!(no_such.leaves, None);
    }

    #[test]
    fn a_deleted_volume_tells_once_what_it_waits_for_and_again_when_that_changes() {
        use crate::decide::events::volume_between;
        let deleting = |backend, status: &VolumeStatus, now| {
            deleting_under_detach(backend, status, now).status
        };
        let waiting_reasons = |old: &VolumeStatus, new: &VolumeStatus| -> Vec<String> {
            volume_between(old, new, "vol", OrphanPolicy::Detach)
                .into_iter()
                .map(|n| n.reason)
                .filter(|r| r.starts_with("WaitingFor"))
                .collect()
        };
        let orphan = connected(&[OTHER]);
        let start = VolumeStatus::default();
        let first = deleting(&orphan, &start, t(0));
        assert_eq!(waiting_reasons(&start, &first), ["WaitingForOrphans"]);
        let again = deleting(&orphan, &first, t(10));
        assert!(waiting_reasons(&first, &again).is_empty(), "told once");
        assert_eq!(again, first, "nothing new, nothing to write");
        let down = deleting(&ProbeAnswer::Unreachable("down".into()), &again, t(20));
        assert_eq!(waiting_reasons(&again, &down), ["WaitingForBackend"]);
    }

    #[test]
    fn case_5_an_unclaimed_connection_is_reported() {
        let backend = connected(&[OTHER]);
        let claimed = BTreeSet::new();
        let decision = decide_volume(
            &VolumeStatus::default(),
            &input(&backend, &claimed, OrphanPolicy::Report, t(0)),
        );
        assert_eq!(decision.status.orphans.len(), 1);
        assert_eq!(decision.status.orphans[0].node, OTHER);
        assert_eq!(
            find_condition(&decision.status.conditions, ORPHANED)
                .unwrap()
                .status,
            "True"
        );
        assert!(decision.force_detach.is_empty());
        let later = decide_volume(
            &decision.status,
            &input(&backend, &claimed, OrphanPolicy::Report, t(1000)),
        );
        assert!(later.force_detach.is_empty(), "Report never detaches");
        assert_eq!(later.status, decision.status, "steady orphan, no write");
    }

    #[test]
    fn case_5_an_unclaimed_connection_is_detached_after_the_grace_period() {
        let backend = connected(&[OTHER, NODE]);
        let claimed = BTreeSet::from([NODE.to_owned()]);
        let first = decide_volume(
            &VolumeStatus::default(),
            &input(&backend, &claimed, OrphanPolicy::Detach, t(0)),
        );
        assert!(first.force_detach.is_empty(), "not before the grace period");
        assert_eq!(first.recheck_after, Some(STUCK_AFTER));
        let later = decide_volume(
            &first.status,
            &input(&backend, &claimed, OrphanPolicy::Detach, t(200)),
        );
        assert_eq!(later.force_detach, vec![OTHER.to_owned()]);
        assert_eq!(later.status.phase, Some(VolumePhase::InUse));
        let gone = decide_volume(
            &later.status,
            &input(&connected(&[NODE]), &claimed, OrphanPolicy::Detach, t(201)),
        );
        assert!(gone.status.orphans.is_empty());
        assert_eq!(
            find_condition(&gone.status.conditions, ORPHANED)
                .unwrap()
                .status,
            "False"
        );
    }
}

// The running system's inputs, by name.

#[test]
fn a_driver_call_decided_on_the_watch_cache_reads_the_record_fresh_first() {
    // The cache may not yet hold the record of a token the operator already handled: acting on
    // it would force the volume again.
    let mut row = Row::new(Attached, connected(&[NODE])).requested("t1");
    row.basis = Basis::Cached;
    assert_eq!(row.decide(), Step::Refresh);
    row.basis = Basis::Fresh;
    assert!(matches!(row.decide(), Step::ForceDetach { .. }));
    // A step that only writes the status is taken on the cache: the write itself is refused if
    // the record is old.
    let mut row = Row::new(Pending, connected(&[]));
    row.basis = Basis::Cached;
    assert_eq!(row.decide(), Step::BeginAttach);
}

#[test]
fn a_refused_write_is_read_again_before_anything_else() {
    let mut row = Row::new(Detaching, connected(&[]));
    row.basis = Basis::Conflicted;
    assert_eq!(row.decide(), Step::Refresh);
}

#[test]
fn a_volume_another_reconcile_works_on_is_left_alone() {
    let mut row = Row::new(Pending, connected(&[]));
    row.turn = Turn::VolumeBusy;
    assert_eq!(
        row.decide(),
        Step::Wait {
            why: Wait::VolumeBusy,
            recheck_after: Some(BUSY_RECHECK)
        }
    );
}

#[test]
fn a_replica_unsure_of_its_lease_does_nothing() {
    let mut row = Row::new(Detaching, connected(&[NODE])).stuck();
    row.turn = Turn::Fenced;
    assert_eq!(
        row.decide(),
        Step::Wait {
            why: Wait::Fenced,
            recheck_after: Some(FENCED_RECHECK)
        }
    );
}

#[test]
fn a_phase_that_began_in_the_future_has_not_begun_to_count() {
    // phaseSince written by a replica whose clock runs ahead, or read by one stepped back.
    let mut row = Row::new(Detaching, connected(&[NODE]));
    row.status.phase_since = Some(Time(t(10_000)));
    row.now = t(10);
    assert_eq!(row.decide(), Step::Detach, "not forced early");
    assert_eq!(
        stuck_in(&row.status, &row.policy, row.now),
        Some(STUCK_AFTER)
    );
    assert_eq!(elapsed_since(t(10), t(5)), Duration::ZERO);
    assert_eq!(elapsed_since(t(5), t(10)), Duration::from_secs(5));
}

#[test]
fn a_deleted_attachment_that_never_attached_is_detached_before_release() {
    // Pending may follow an attach of unknown outcome (then a block): nothing is marked
    // Detached before an idempotent detach.
    for backend in [connected(&[]), ProbeAnswer::Unprobeable(None)] {
        let row = Row::new(Pending, backend.clone()).deleting();
        let step = row.decide();
        assert_eq!(step, Step::Detach, "{backend:?}");
        let observed = Input {
            node: NODE,
            target: None,
            generation: Some(1),
            volume: Ok(&row.policy),
            backend: Some(&backend),
            request: &Request::None,
            now: row.now,
            ..on_record()
        };
        // The call's intent: recorded before it, as every detach's.
        let status = stepped(&row.status, &step, &observed);
        assert_eq!(status.phase, Some(Detaching));
    }
}

fn binding(handle: &str, uid: &str) -> Binding {
    Binding {
        driver: "nbd".into(),
        volume_handle: handle.into(),
        volume_uid: uid.into(),
    }
}

#[test]
fn an_attach_records_what_it_attached_and_a_confirmed_detach_forgets_it() {
    let row = Row::new(Pending, connected(&[]));
    let now = binding("vol1", "uid-1");
    let observed = row.observed(&now);
    let attaching = stepped(&row.status, &Step::BeginAttach, &observed);
    assert_eq!(
        attaching.bound_to.as_ref(),
        Some(&now),
        "recorded with the intent"
    );
    let detached = stepped(&attaching, &Step::MarkDetached, &observed);
    assert_eq!(detached.bound_to, None);
}

#[test]
fn a_live_attachment_whose_volume_was_replaced_is_not_attached_to_the_new_one() {
    let mut row = Row::new(Attached, connected(&[]));
    row.status.bound_to = Some(binding("vol1", "uid-1"));
    let replaced = binding("vol2", "uid-2");
    let step = decide(&Input {
        target: Some(&replaced),
        ..row.input()
    });
    assert!(
        matches!(&step, Step::Fail(VolumeProblem::BindingChanged { recorded, now })
            if recorded.volume_handle == "vol1" && now.volume_handle == "vol2"),
        "{step:?}"
    );
    // The same Volume: nothing to say.
    let same = binding("vol1", "uid-1");
    assert_eq!(
        decide(&Input {
            target: Some(&same),
            ..row.input()
        }),
        Step::ConnectionLost
    );
}

#[test]
fn a_volume_recreated_over_the_same_backend_volume_keeps_the_record_true_to_the_backend() {
    let mut row = Row::new(Attached, connected(&[]));
    row.status.attached = true;
    row.status.bound_to = Some(binding("vol1", "uid-1"));
    let recreated = binding("vol1", "uid-2");
    // Not asked yet: the backend volume is the same, so the claim is checked first.
    assert_eq!(
        decide(&Input {
            target: Some(&recreated),
            backend: None,
            ..row.input()
        }),
        Step::Probe
    );
    // Another backend volume, another turn's, or a record that claims nothing: no probe.
    let replaced = binding("vol2", "uid-2");
    let other_volume = Input {
        target: Some(&replaced),
        backend: None,
        ..row.input()
    };
    assert!(matches!(decide(&other_volume), Step::Fail(_)));
    let mut busy = Row::new(Attached, connected(&[]));
    busy.status = row.status.clone();
    busy.turn = Turn::VolumeBusy;
    assert!(matches!(
        decide(&Input {
            target: Some(&recreated),
            backend: None,
            ..busy.input()
        }),
        Step::Fail(_)
    ));

    // The answer shows no connection: the record stops claiming one, and says why it waits.
    let step = decide(&Input {
        target: Some(&recreated),
        ..row.input()
    });
    assert!(
        matches!(step, Step::Fail(VolumeProblem::BindingChanged { .. })),
        "{step:?}"
    );
    let observed = row.observed(&recreated);
    let after = stepped(&row.status, &step, &observed);
    assert!(!after.attached);
    assert_eq!(after.phase, Some(Failed));
    assert_eq!(
        after.bound_to, row.status.bound_to,
        "still bound to what it attached"
    );
    let ready = find_condition(&after.conditions, READY).expect("Ready");
    assert_eq!(ready.reason, "VolumeReplaced");

    // The answer shows the connection: it stays Attached, and the message says so.
    let held = connected(&[NODE]);
    let after = stepped(
        &row.status,
        &step,
        &Input {
            backend: Some(&held),
            ..observed.clone()
        },
    );
    assert!(after.attached);
    assert_eq!(after.phase, Some(Attached));
    let ready = find_condition(&after.conditions, READY).expect("Ready");
    assert!(
        ready.message.contains("backend confirms the connection"),
        "{}",
        ready.message
    );

    // A connection that names no node may be this node's: not Failed on its word.
    let by_hand = unattributed(&[]);
    let after = stepped(
        &row.status,
        &step,
        &Input {
            backend: Some(&by_hand),
            ..observed.clone()
        },
    );
    assert_eq!(after.phase, Some(Attached));

    // A record that claims no connection is not asked about.
    let mut unclaimed = Row::new(Attached, connected(&[]));
    unclaimed.status.bound_to = row.status.bound_to.clone();
    assert!(matches!(
        decide(&Input {
            target: Some(&recreated),
            backend: None,
            ..unclaimed.input()
        }),
        Step::Fail(_)
    ));
}

#[test]
fn an_answer_for_the_replacing_volume_says_nothing_of_the_one_recorded() {
    let mut row = Row::new(Attached, connected(&[]));
    row.status.attached = true;
    row.status.bound_to = Some(binding("vol1", "uid-1"));
    row.status
        .connection_info
        .insert("uri".into(), "nbd://old".into());
    // The Volume now names vol2; the answer in hand is vol2's (asked before a refresh showed
    // the record bound to vol1).
    let replaced = binding("vol2", "uid-2");
    let step = decide(&Input {
        target: Some(&replaced),
        ..row.input()
    });
    assert!(matches!(step, Step::Fail(_)), "{step:?}");
    let after = stepped(&row.status, &step, &row.observed(&replaced));
    assert!(after.attached, "vol2's answer taken for vol1's");
    assert_eq!(after.phase, Some(Attached));
    assert_eq!(after.connection_info, row.status.connection_info);
    assert_eq!(after.last_probe, row.status.last_probe);
}

#[test]
fn deleting_one_of_two_claims_on_a_connection_hands_it_over() {
    let row = Row::new(Attached, connected(&[NODE])).deleting();
    assert_eq!(
        decide(&Input {
            sibling: Some("renamed"),
            ..row.input()
        }),
        Step::HandOver {
            to: "renamed".into()
        }
    );
    // Without another claim, the normal detach.
    assert_eq!(row.decide(), Step::BeginDetach);
    // A person's request on the claim being deleted releases that claim: the hand-over does so
    // without cutting off the client of the one that stays.
    let requested = Row::new(Attached, connected(&[NODE]))
        .deleting()
        .requested("t1");
    assert_eq!(
        decide(&Input {
            sibling: Some("renamed"),
            ..requested.input()
        }),
        Step::HandOver {
            to: "renamed".into()
        }
    );
    // Without another claim, the request forces.
    assert!(matches!(requested.decide(), Step::ForceDetach { .. }));
    // A forced detach already under way goes on.
    let mut forcing = Row::new(Detaching, connected(&[NODE])).deleting();
    forcing.status.force_detach = Some(requested_force_in_progress("t1"));
    assert!(!matches!(
        decide(&Input {
            sibling: Some("renamed"),
            ..forcing.input()
        }),
        Step::HandOver { .. }
    ));
}

#[test]
fn stuck_after_is_the_volumes_own_else_the_default_and_never_a_guess() {
    let default = Duration::from_secs(120);
    assert_eq!(stuck_after(None, default), Ok(default));
    assert_eq!(
        stuck_after(Some("1m30s"), default),
        Ok(Duration::from_secs(90))
    );
    assert!(matches!(
        stuck_after(Some("ninety seconds"), default),
        Err(VolumeProblem::InvalidVolume(message)) if message.starts_with("spec.stuckAfter: ")
    ));
}

// After the call: what an OK call confirms, what a failed one records, how a reconcile ends.

#[test]
fn an_ok_call_confirms_what_it_did_and_the_decision_goes_on() {
    let row = Row::new(Attaching, connected(&[]));
    let info = crate::driver::ConnectionInfo::from([("uri".to_owned(), "nbd://x".to_owned())]);
    let attached = after_call(
        &row.input(),
        &Step::Attach,
        CallResult::Done(Some(&info)),
        row.now,
    );
    assert_eq!(attached.confirmed, Some(Confirmed::Connected));
    assert_eq!(attached.ends, None);
    assert_eq!(attached.status.connection_info, info);
    // The call alone marks nothing: the phase moves on the next decision's word.
    assert_eq!(attached.status.phase, Some(Attaching));

    let row = Row::new(Detaching, connected(&[NODE]));
    for step in [
        Step::Detach,
        Step::ForceDetach {
            reason: ForceDetachReason::Requested,
            token: Some("t1".into()),
        },
    ] {
        let detached = after_call(&row.input(), &step, CallResult::Done(None), row.now);
        assert_eq!(
            detached.confirmed,
            Some(Confirmed::Disconnected),
            "{step:?}"
        );
        assert_eq!(detached.ends, None);
        assert_eq!(detached.status.phase, Some(Detaching), "{step:?}");
    }
}

#[test]
fn a_failed_call_keeps_the_phase_says_why_and_retries_by_the_stuck_deadline_after_it() {
    // Detaching since t(0), decided at t(10); the call took until t(20).
    let row = Row::new(Detaching, connected(&[NODE])).manual();
    let error = crate::driver::DriverError::Timeout {
        operation: "detach",
        deadline: Duration::from_secs(10),
    };
    let failed = after_call(
        &row.input(),
        &Step::Detach,
        CallResult::Failed(&error),
        t(20),
    );
    assert_eq!(failed.status.phase, Some(Detaching));
    assert_eq!(failed.confirmed, None);
    let ready = find_condition(&failed.status.conditions, READY).expect("Ready");
    assert_eq!(ready.reason, "DetachFailed");
    assert!(
        ready.message.contains("did not answer"),
        "{}",
        ready.message
    );
    // Counted from the end of the call, the stored second rounded up: 120 s - (20 s - 1 s).
    assert_eq!(
        failed.ends,
        Some(Recheck::Backoff {
            deadline: Some(Duration::from_secs(101))
        })
    );

    // A forced detach that failed says so on its record, and is still under way.
    let forcing = Step::ForceDetach {
        reason: ForceDetachReason::Requested,
        token: Some("t1".into()),
    };
    let failed = after_call(&row.input(), &forcing, CallResult::Failed(&error), t(20));
    let force = failed.status.force_detach.expect("forceDetach");
    assert_eq!(force.state, ForceDetachState::InProgress);
    assert!(
        force
            .message
            .is_some_and(|m| m.starts_with("force_detach failed"))
    );
}

#[test]
fn a_refused_exclusive_attach_is_the_backends_word_that_another_node_holds_it() {
    let row = Row::new(Attaching, connected(&[]));
    let refused = crate::driver::DriverError::HeldElsewhere {
        volume: "vol".into(),
        holders: Vec::new(),
    };
    let blocked = after_call(
        &row.input(),
        &Step::Attach,
        CallResult::Failed(&refused),
        row.now,
    );
    assert_eq!(blocked.status.phase, Some(Pending));
    assert_eq!(blocked.confirmed, None);
    let condition = find_condition(
        &blocked.status.conditions,
        crate::api::types::ATTACH_BLOCKED,
    )
    .expect("AttachBlocked");
    assert!(crate::api::is_true(
        &blocked.status.conditions,
        crate::api::types::ATTACH_BLOCKED
    ));
    assert!(
        condition.message.contains("another node"),
        "{}",
        condition.message
    );
    // Woken by the holder's detach; the resync only as a net.
    assert_eq!(blocked.ends, Some(Recheck::Settled(Some(RESYNC))));
}

#[test]
fn a_forced_detach_counts_as_succeeded_once_its_confirmation_is_written() {
    let under_way = |state| VolumeAttachmentStatus {
        force_detach: Some(ForceDetachStatus {
            token: Some("t1".into()),
            reason: ForceDetachReason::Requested,
            state,
            attempts: 1,
            started_at: Time(t(0)),
            finished_at: None,
            message: None,
        }),
        ..Default::default()
    };
    let stored = under_way(ForceDetachState::InProgress);
    let written = under_way(ForceDetachState::Succeeded);
    assert_eq!(
        force_confirmed(&stored, &written),
        Some(ForceDetachReason::Requested)
    );
    // Once written, the next write of the same record counts nothing again.
    assert_eq!(force_confirmed(&written, &written), None);
    assert_eq!(force_confirmed(&stored, &stored), None);
}

#[test]
fn how_a_reconcile_ends_is_decided_with_the_step() {
    let mut row = Row::new(Attached, connected(&[NODE]));
    row.status
        .connection_info
        .insert("uri".into(), "nbd://x".into());
    let input = row.input();
    let converged = decide(&input);
    assert_eq!(
        converged,
        Step::Wait {
            why: Wait::Converged,
            recheck_after: Some(RESYNC)
        }
    );
    // The configured resync, not a number of the core's own.
    let fast = Input {
        resync: Duration::from_secs(5),
        ..row.input()
    };
    assert_eq!(
        recheck::ending(&decide(&fast), &fast, false),
        Some(Recheck::Settled(Some(Duration::from_secs(5))))
    );
    // A driver whose sweep finds what changed out of band needs no timer per attachment.
    assert_eq!(
        recheck::ending(&converged, &input, true),
        Some(Recheck::Settled(None))
    );
    let busy = Step::Wait {
        why: Wait::VolumeBusy,
        recheck_after: Some(BUSY_RECHECK),
    };
    assert_eq!(
        recheck::ending(&busy, &input, false),
        Some(Recheck::Soon(BUSY_RECHECK))
    );
    // Unanswered: with backoff, no later than the stuck deadline.
    let unreachable = Row::new(Detaching, ProbeAnswer::Unreachable("down".into()));
    let step = unreachable.decide();
    assert_eq!(
        recheck::ending(&step, &unreachable.input(), false),
        Some(Recheck::Backoff {
            deadline: stuck_in(&unreachable.status, &unreachable.policy, unreachable.now)
        })
    );
    // A misconfiguration waits for the fix that wakes it; an unanswered probe under one retries.
    let problem = Step::Fail(VolumeProblem::VolumeNotFound("v".into()));
    assert_eq!(
        recheck::ending(&problem, &input, false),
        Some(Recheck::Settled(Some(RESYNC)))
    );
    assert_eq!(
        recheck::ending(&problem, &unreachable.input(), false),
        Some(Recheck::Backoff { deadline: None })
    );
    // The steps that act go on to the next decision.
    for step in [Step::Attach, Step::MarkDetached, Step::Probe, Step::Refresh] {
        assert_eq!(recheck::ending(&step, &input, false), None, "{step:?}");
    }
}

#[test]
fn a_volume_tells_each_new_orphan_once_and_a_forced_orphan_counts_when_the_backend_confirms() {
    use crate::api::{Orphan, OrphanPolicy, VolumeStatus};
    let orphan = |node: &str| Orphan {
        node: node.into(),
        since: Time(t(0)),
    };
    let before = VolumeStatus {
        orphans: vec![orphan("node-a")],
        ..Default::default()
    };
    let after = VolumeStatus {
        orphans: vec![orphan("node-a"), orphan("node-b")],
        ..Default::default()
    };
    let notices = events::volume_between(&before, &after, "vol", OrphanPolicy::Detach);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].reason, "Orphaned");
    assert!(notices[0].message.contains("node node-b"), "{notices:?}");
    assert!(events::volume_between(&after, &after, "vol", OrphanPolicy::Detach).is_empty());

    let gone = connected(&[]);
    let still = connected(&[NODE]);
    let forced = events::orphan_forced("vol", NODE, Ok(()), Some(&gone));
    assert_eq!(
        (forced.confirmed, forced.notice.reason.as_str()),
        (true, "ForceDetached")
    );
    let forced = events::orphan_forced("vol", NODE, Ok(()), Some(&still));
    assert_eq!(
        (forced.confirmed, forced.notice.reason.as_str()),
        (false, "ForceDetachUnconfirmed")
    );
    let unanswered = ProbeAnswer::Unreachable("down".into());
    assert!(!events::orphan_forced("vol", NODE, Ok(()), Some(&unanswered)).confirmed);
    let error = crate::driver::DriverError::Unreachable("down".into());
    let forced = events::orphan_forced("vol", NODE, Err(&error), None);
    assert_eq!(
        (forced.confirmed, forced.notice.reason.as_str()),
        (false, "ForceDetachFailed")
    );
}

#[test]
fn how_a_volumes_reconcile_ends() {
    use recheck::{ORPHANS_FORCED_RECHECK, VolumeOutcome, volume_ending};
    let quiet = VolumeOutcome {
        unusable: false,
        forced: false,
        force_failed: false,
        recheck_after: None,
    };
    assert_eq!(
        volume_ending(quiet, RESYNC, false),
        Recheck::Settled(Some(RESYNC))
    );
    assert_eq!(volume_ending(quiet, RESYNC, true), Recheck::Settled(None));
    // A grace period ends sooner than the resync: looked at then, sweep or not.
    let grace = VolumeOutcome {
        recheck_after: Some(Duration::from_secs(3)),
        ..quiet
    };
    assert_eq!(
        volume_ending(grace, RESYNC, true),
        Recheck::Settled(Some(Duration::from_secs(3)))
    );
    let forced = VolumeOutcome {
        forced: true,
        ..grace
    };
    assert_eq!(
        volume_ending(forced, RESYNC, true),
        Recheck::Settled(Some(ORPHANS_FORCED_RECHECK))
    );
    let failed = VolumeOutcome {
        force_failed: true,
        ..forced
    };
    assert_eq!(
        volume_ending(failed, RESYNC, true),
        Recheck::Backoff { deadline: None }
    );
    let unusable = VolumeOutcome {
        unusable: true,
        ..failed
    };
    assert_eq!(
        volume_ending(unusable, RESYNC, true),
        Recheck::Settled(Some(RESYNC))
    );
}

#[test]
fn a_phase_under_way_with_no_recorded_start_records_one_and_becomes_stuck_from_it() {
    // Set by hand: Detaching, connected, no phaseSince.
    let mut row = Row::new(Detaching, connected(&[NODE])).deleting();
    row.status.phase_since = None;
    let step = row.decide();
    assert!(
        !matches!(step, Step::ForceDetach { .. }),
        "not stuck at first sight: {step:?}"
    );
    let recorded = after_step(&row.input(), &step);
    assert_eq!(recorded.phase_since, Some(Time(row.now)));

    row.status = recorded;
    row.now = row.now + STUCK_AFTER + Duration::from_secs(2);
    assert_eq!(
        row.decide(),
        Step::ForceDetach {
            reason: ForceDetachReason::StuckDetaching,
            token: None
        }
    );
}
