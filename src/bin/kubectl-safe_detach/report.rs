//! What `status` and `orphans` say about the objects: built from the objects and the clock alone,
//! so every sentence a person reads is tested without a cluster.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use safe_detach::api::reasons;
use safe_detach::api::{
    AttachmentPhase, ConditionStatus, ForceDetachState, ForceDetachStatus, OrphanPolicy,
    ProbeRecord, ProbeResult, Volume, VolumeAttachment, condition_with, find_condition,
    parse_duration,
    types::{ATTACH_BLOCKED, BACKEND_IN_SYNC, READY, REQUEST_REJECTED, STUCK},
};
use safe_detach::decide::elapsed_since;
use serde::Serialize;
use std::time::Duration;

/// The operator's `defaultStuckAfter` when its configuration sets none (docs/design.md).
pub const DOCUMENTED_DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(120);

/// Where the stuck clock's length comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ClockSource {
    /// The Volume's `stuckAfter`.
    Volume,
    /// The operator's default, as given with `--default-stuck-after`.
    OperatorDefault,
    /// The operator's documented default; its configuration may set another.
    AssumedDefault,
    /// Cannot be told: the Volume is missing or its `stuckAfter` cannot be read.
    Unknown,
}

/// When an attachment counts as stuck.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StuckClock {
    /// True when the operator says so (condition `Stuck`), or the deadline has passed on a
    /// clock whose length is known.
    pub stuck: bool,
    /// The clock's length, e.g. `30s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck_after: Option<String>,
    pub source: ClockSource,
    /// When the current phase counts (or counted) as stuck; only for Attaching and Detaching.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// How long it has been stuck.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck_for: Option<String>,
}

/// One condition, as shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShownCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// What `status` says about one attachment.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentReport {
    pub name: String,
    pub volume: String,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<AttachmentPhase>,
    /// Backend-confirmed only.
    pub attached: bool,
    pub deleting: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_phase: Option<String>,
    /// The Volume's `autoForceDetach`; absent when the Volume is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_force_detach: Option<bool>,
    pub clock: StuckClock,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_detach: Option<ForceDetachStatus>,
    pub handled_tokens: Vec<String>,
    pub conditions: Vec<ShownCondition>,
    /// Why the attachment is not where it should be, and what a person can do; absent when
    /// nothing needs doing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

/// A backend connection no attachment claims.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanReport {
    pub volume: String,
    pub node: String,
    pub since: Time,
    pub age: String,
    pub orphan_policy: OrphanPolicy,
    /// What the operator does with it.
    pub action: String,
}

/// Durations as kubectl prints ages: `45s`, `3m10s`, `2h5m`, `3d4h`.
pub fn human(duration: Duration) -> String {
    let s = duration.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 if (s % 3600) < 60 => format!("{}h", s / 3600),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ if (s % 86400) < 3600 => format!("{}d", s / 86400),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

fn stuck_after_of(
    volume: Option<&Volume>,
    default: Option<Duration>,
) -> (Option<Duration>, ClockSource) {
    match volume.map(|v| v.spec.stuck_after.as_deref()) {
        None => (None, ClockSource::Unknown),
        Some(Some(text)) => match parse_duration(text) {
            Ok(d) => (Some(d), ClockSource::Volume),
            Err(_) => (None, ClockSource::Unknown),
        },
        Some(None) => match default {
            Some(d) => (Some(d), ClockSource::OperatorDefault),
            None => (
                Some(DOCUMENTED_DEFAULT_STUCK_AFTER),
                ClockSource::AssumedDefault,
            ),
        },
    }
}

fn condition<'a>(a: &'a VolumeAttachment, type_: &str) -> Option<&'a Condition> {
    find_condition(&a.status.as_ref()?.conditions, type_)
}

/// The condition of `type_`, if it has `status`.
fn condition_in<'a>(
    a: &'a VolumeAttachment,
    type_: &str,
    status: ConditionStatus,
) -> Option<&'a Condition> {
    condition_with(&a.status.as_ref()?.conditions, type_, status)
}

/// The stuck clock of `attachment` under `volume`'s policy (or the operator's `default`).
pub fn clock(
    attachment: &VolumeAttachment,
    volume: Option<&Volume>,
    default: Option<Duration>,
    now: Timestamp,
) -> StuckClock {
    let status = attachment.status.clone().unwrap_or_default();
    let (after, source) = stuck_after_of(volume, default);
    let can_be_stuck = matches!(
        status.phase,
        Some(AttachmentPhase::Attaching | AttachmentPhase::Detaching)
    );
    // As the operator counts: a stored time is cut to whole seconds, so the clock runs from the
    // latest instant it can stand for (`decide::stuck_in`).
    let deadline = match (&status.phase_since, after, can_be_stuck) {
        (Some(since), Some(after), true) => {
            let after = jiff::SignedDuration::try_from(after + Duration::from_secs(1)).ok();
            after.and_then(|a| since.0.checked_add(a).ok()).map(Time)
        }
        _ => None,
    };
    let flagged = condition_in(attachment, STUCK, ConditionStatus::True);
    let overdue =
        source != ClockSource::AssumedDefault && deadline.as_ref().is_some_and(|d| d.0 <= now);
    let stuck = can_be_stuck && (flagged.is_some() || overdue);
    let stuck_since = flagged
        .map(|c| c.last_transition_time.0)
        .or(deadline.as_ref().map(|d| d.0));
    StuckClock {
        stuck,
        stuck_after: after.map(human),
        source,
        deadline,
        stuck_for: stuck
            .then(|| stuck_since.map(|since| human(elapsed_since(since, now))))
            .flatten(),
    }
}

/// Ready reasons that name a problem with the Volume or the configuration: nothing reaches the
/// backend until it is fixed.
const VOLUME_PROBLEMS: [(&str, &str); 6] = [
    (
        "VolumeNotFound",
        "create the Volume it names, or delete the attachment",
    ),
    (
        "UnknownDriver",
        "name a driver the operator is configured with",
    ),
    ("InvalidVolume", "fix the Volume's spec"),
    (
        "VolumeDeleting",
        "the Volume is being deleted: delete this attachment",
    ),
    (
        "VolumeReplaced",
        "delete the attachment: it is detached from what it attached (status.boundTo)",
    ),
    (
        "DuplicateVolumeHandle",
        "delete the alias Volume (and its attachments), or point it at its own handle",
    ),
];

const DRIVER_FAILURES: [&str; 3] = [
    reasons::ATTACH_FAILED,
    reasons::DETACH_FAILED,
    reasons::FORCE_DETACH_FAILED,
];

/// What the backend's last answer says about a stuck phase.
fn backend_says(phase: AttachmentPhase, node: &str, probe: Option<&ProbeRecord>) -> String {
    let Some(probe) = probe else {
        return "the backend has not been asked yet".into();
    };
    match (phase, probe.result) {
        (AttachmentPhase::Detaching, ProbeResult::Connected) => {
            format!("the backend still shows it connected to {node} (a client may hold it)")
        }
        (AttachmentPhase::Attaching, ProbeResult::NotConnected) => {
            "the backend does not show it connected yet".into()
        }
        (_, ProbeResult::ConnectedElsewhere) => format!(
            "the backend shows it connected to {} instead",
            probe.nodes.join(", ")
        ),
        (_, ProbeResult::Unreachable) => format!(
            "the backend did not answer ({})",
            probe.message.as_deref().unwrap_or("no message")
        ),
        (_, result) => format!("the backend said {result:?}"),
    }
}

/// One line: why the attachment needs attention and what a person can do; `None` when it does
/// not.
pub fn advice(
    attachment: &VolumeAttachment,
    volume: Option<&Volume>,
    clock: &StuckClock,
) -> Option<String> {
    let name = attachment.metadata.name.as_deref().unwrap_or_default();
    let node = &attachment.spec.node_name;
    let status = attachment.status.clone().unwrap_or_default();
    let ready = condition(attachment, READY);
    if let Some(ready) = condition_in(attachment, READY, ConditionStatus::False)
        && let Some((_, fix)) = VOLUME_PROBLEMS.iter().find(|(r, _)| *r == ready.reason)
    {
        return Some(format!("{} ({}): {fix}", ready.reason, ready.message));
    }
    if let Some(rejected) = condition_in(attachment, REQUEST_REJECTED, ConditionStatus::True) {
        return Some(format!(
            "the force-detach request was refused ({}): ask again with `kubectl safe-detach force {name}`",
            rejected.message
        ));
    }
    if let Some(f) = status
        .force_detach
        .as_ref()
        .filter(|f| f.state == ForceDetachState::InProgress)
    {
        let token = f
            .token
            .as_deref()
            .map(|t| format!(", token {t}"))
            .unwrap_or_default();
        let said = f
            .message
            .as_deref()
            .map(|m| format!("; the backend said last: {m}"))
            .unwrap_or_default();
        return Some(format!(
            "a force-detach ({:?}{token}) is under way, attempt {}{said}: it is retried until the backend confirms; wait",
            f.reason, f.attempts
        ));
    }
    if let Some(c) = condition_in(attachment, BACKEND_IN_SYNC, ConditionStatus::False)
        .filter(|c| c.reason == "UnattributedConnection" || c.reason == "MultiAttached")
    {
        return Some(format!(
            "{} ({}): remove the connection no node accounts for on the backend",
            c.reason, c.message
        ));
    }
    if let Some(blocked) = condition_in(attachment, ATTACH_BLOCKED, ConditionStatus::True) {
        return Some(format!(
            "held by another node ({}): detach it there (delete that attachment, or `kubectl safe-detach force` it)",
            blocked.message
        ));
    }
    let phase = status.phase?;
    if clock.stuck {
        let for_ = clock
            .stuck_for
            .as_deref()
            .map(|f| format!(" for {f}"))
            .unwrap_or_default();
        let mut why = format!(
            "stuck {phase:?}{for_}: {}",
            backend_says(phase, node, status.last_probe.as_ref())
        );
        if let Some(failed) = ready.filter(|c| DRIVER_FAILURES.contains(&c.reason.as_str())) {
            why.push_str(&format!(" ({}: {})", failed.reason, failed.message));
        }
        let todo = match volume.map(|v| v.spec.auto_force_detach) {
            Some(true) => format!(
                "autoForceDetach is on, so the operator resolves it on its own (a force-detach, recorded only once the backend confirms): wait, or ask now with `kubectl safe-detach force {name} --wait`"
            ),
            Some(false) => format!(
                "autoForceDetach is off for Volume {}, so a person decides: `kubectl safe-detach force {name} --wait` cuts {node} off through the backend (a client still connected loses the disk)",
                attachment.spec.volume_name
            ),
            None => format!(
                "its Volume {} cannot be read, so whether the operator forces it on its own is unknown: `kubectl safe-detach force {name} --wait` forces it",
                attachment.spec.volume_name
            ),
        };
        return Some(format!("{why}; {todo}"));
    }
    let unreachable = condition_in(attachment, BACKEND_IN_SYNC, ConditionStatus::Unknown)
        .filter(|c| c.reason == reasons::BACKEND_UNREACHABLE);
    if let Some(in_sync) = unreachable {
        return Some(format!(
            "the backend did not answer the last probe ({}): nothing is concluded until it does; check the backend and the driver settings",
            in_sync.message
        ));
    }
    if let Some(failed) = ready.filter(|c| DRIVER_FAILURES.contains(&c.reason.as_str())) {
        return Some(format!(
            "{} ({}): retried with backoff",
            failed.reason, failed.message
        ));
    }
    None
}

/// The report of one attachment.
pub fn attachment_report(
    attachment: &VolumeAttachment,
    volume: Option<&Volume>,
    default: Option<Duration>,
    now: Timestamp,
) -> AttachmentReport {
    let status = attachment.status.clone().unwrap_or_default();
    let clock = clock(attachment, volume, default, now);
    AttachmentReport {
        name: attachment.metadata.name.clone().unwrap_or_default(),
        volume: attachment.spec.volume_name.clone(),
        node: attachment.spec.node_name.clone(),
        phase: status.phase,
        attached: status.attached,
        deleting: attachment.metadata.deletion_timestamp.is_some(),
        in_phase: status
            .phase_since
            .as_ref()
            .map(|t| human(elapsed_since(t.0, now))),
        phase_since: status.phase_since.clone(),
        auto_force_detach: volume.map(|v| v.spec.auto_force_detach),
        advice: advice(attachment, volume, &clock),
        clock,
        last_probe: status.last_probe.clone(),
        force_detach: status.force_detach.clone(),
        handled_tokens: status.handled_tokens.clone(),
        conditions: status
            .conditions
            .iter()
            .map(|c| ShownCondition {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
            .collect(),
    }
}

/// The orphans of every Volume, oldest first.
pub fn orphan_reports(volumes: &[Volume], now: Timestamp) -> Vec<OrphanReport> {
    let mut out: Vec<OrphanReport> = volumes
        .iter()
        .flat_map(|v| {
            let policy = v.spec.orphan_policy;
            let action = match policy {
                OrphanPolicy::Report => "reported only (orphanPolicy: Report)".to_owned(),
                OrphanPolicy::Detach => format!(
                    "force-detached once unclaimed for stuckAfter ({})",
                    v.spec
                        .stuck_after
                        .as_deref()
                        .unwrap_or("the operator's default")
                ),
            };
            v.status
                .iter()
                .flat_map(|s| s.orphans.iter())
                .map(move |o| OrphanReport {
                    volume: v.metadata.name.clone().unwrap_or_default(),
                    node: o.node.clone(),
                    since: o.since.clone(),
                    age: human(elapsed_since(o.since.0, now)),
                    orphan_policy: policy,
                    action: action.clone(),
                })
        })
        .collect();
    out.sort_by(|a, b| (a.since.0, &a.volume, &a.node).cmp(&(b.since.0, &b.volume, &b.node)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use safe_detach::api::{
        ForceDetachReason, Orphan, VolumeAttachmentSpec, VolumeAttachmentStatus, VolumeSpec,
        VolumeStatus,
    };

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn time(text: &str) -> Time {
        Time(at(text))
    }

    fn volume(stuck_after: Option<&str>, auto: bool) -> Volume {
        Volume::new(
            "vol",
            VolumeSpec {
                driver: "nbd".into(),
                volume_handle: "h".into(),
                multi_attach: false,
                stuck_after: stuck_after.map(str::to_owned),
                auto_force_detach: auto,
                orphan_policy: OrphanPolicy::Report,
            },
        )
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str, since: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: time(since),
        }
    }

    fn detaching(conditions: Vec<Condition>) -> VolumeAttachment {
        let mut a = VolumeAttachment::new(
            "va",
            VolumeAttachmentSpec {
                volume_name: "vol".into(),
                node_name: "node-b".into(),
                connector: None,
                read_only: None,
            },
        );
        a.status = Some(VolumeAttachmentStatus {
            phase: Some(AttachmentPhase::Detaching),
            attached: true,
            phase_since: Some(time("2026-12-01T10:00:00Z")),
            last_probe: Some(ProbeRecord {
                time: time("2026-12-01T10:00:40Z"),
                result: ProbeResult::Connected,
                nodes: vec!["node-b".into()],
                message: None,
            }),
            conditions,
            ..Default::default()
        });
        a
    }

    fn stuck_condition() -> Condition {
        condition(
            "Stuck",
            "True",
            "StuckDetaching",
            "Detaching for longer than stuckAfter",
            "2026-12-01T10:00:31Z",
        )
    }

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        let d = Duration::from_secs;
        assert_eq!(human(d(45)), "45s");
        assert_eq!(human(d(120)), "2m");
        assert_eq!(human(d(190)), "3m10s");
        assert_eq!(human(d(7200)), "2h");
        assert_eq!(human(d(7500)), "2h5m");
        assert_eq!(human(d(86400 * 3)), "3d");
        assert_eq!(human(d(86400 * 3 + 4 * 3600 + 5)), "3d4h");
    }

    #[test]
    fn the_deadline_follows_the_volume_then_the_default() {
        let a = detaching(vec![]);
        let now = at("2026-12-01T10:00:10Z");
        let c = clock(&a, Some(&volume(Some("30s"), false)), None, now);
        assert_eq!(c.source, ClockSource::Volume);
        assert_eq!(c.stuck_after.as_deref(), Some("30s"));
        // The operator's own rounding: a stored second may stand for its whole second.
        assert_eq!(c.deadline, Some(time("2026-12-01T10:00:31Z")));
        assert!(!c.stuck);

        let c = clock(&a, Some(&volume(None, false)), None, now);
        assert_eq!(c.source, ClockSource::AssumedDefault);
        assert_eq!(c.stuck_after.as_deref(), Some("2m"));
        let c = clock(
            &a,
            Some(&volume(None, false)),
            Some(Duration::from_secs(5)),
            now,
        );
        assert_eq!(c.source, ClockSource::OperatorDefault);
        assert!(c.stuck, "past a known default's deadline");

        let c = clock(&a, None, None, now);
        assert_eq!(
            (c.source, c.deadline, c.stuck),
            (ClockSource::Unknown, None, false)
        );
    }

    #[test]
    fn an_assumed_default_alone_does_not_call_it_stuck() {
        let a = detaching(vec![]);
        let c = clock(
            &a,
            Some(&volume(None, true)),
            None,
            at("2026-12-01T11:00:00Z"),
        );
        assert!(
            !c.stuck,
            "the operator's default may be longer than the documented one"
        );
    }

    #[test]
    fn the_stuck_condition_dates_how_long_it_has_been_stuck() {
        let a = detaching(vec![stuck_condition()]);
        let c = clock(
            &a,
            Some(&volume(Some("30s"), false)),
            None,
            at("2026-12-01T10:01:31Z"),
        );
        assert!(c.stuck);
        assert_eq!(c.stuck_for.as_deref(), Some("1m"));
    }

    #[test]
    fn a_stuck_attachment_without_auto_force_asks_a_person() {
        let a = detaching(vec![stuck_condition()]);
        let v = volume(Some("30s"), false);
        let r = attachment_report(&a, Some(&v), None, at("2026-12-01T10:00:45Z"));
        let advice = r.advice.unwrap();
        assert!(
            advice.starts_with(
                "stuck Detaching for 14s: the backend still shows it connected to node-b"
            ),
            "{advice}"
        );
        assert!(
            advice.contains("autoForceDetach is off for Volume vol"),
            "{advice}"
        );
        assert!(
            advice.contains("`kubectl safe-detach force va --wait`"),
            "{advice}"
        );
    }

    #[test]
    fn a_stuck_attachment_with_auto_force_says_to_wait() {
        let a = detaching(vec![stuck_condition()]);
        let v = volume(Some("30s"), true);
        let advice = attachment_report(&a, Some(&v), None, at("2026-12-01T10:00:45Z"))
            .advice
            .unwrap();
        assert!(advice.contains("autoForceDetach is on"), "{advice}");
        assert!(advice.contains("wait"), "{advice}");
    }

    #[test]
    fn a_named_problem_comes_before_the_stuck_clock() {
        let a = detaching(vec![
            stuck_condition(),
            condition(
                "Ready",
                "False",
                "UnknownDriver",
                "no driver named nbd2",
                "2026-12-01T10:00:00Z",
            ),
        ]);
        let advice = attachment_report(
            &a,
            Some(&volume(None, false)),
            None,
            at("2026-12-01T10:01:00Z"),
        )
        .advice
        .unwrap();
        assert!(
            advice.starts_with("UnknownDriver (no driver named nbd2): name a driver"),
            "{advice}"
        );
    }

    #[test]
    fn a_force_under_way_says_so_with_the_backends_last_word() {
        let mut a = detaching(vec![stuck_condition()]);
        a.status.as_mut().unwrap().force_detach = Some(ForceDetachStatus {
            token: Some("t9".into()),
            reason: ForceDetachReason::Requested,
            state: ForceDetachState::InProgress,
            attempts: 3,
            started_at: time("2026-12-01T10:00:35Z"),
            finished_at: None,
            message: Some("force_detach failed (Timeout)".into()),
        });
        let advice = attachment_report(
            &a,
            Some(&volume(None, false)),
            None,
            at("2026-12-01T10:01:00Z"),
        )
        .advice
        .unwrap();
        assert!(advice.contains("Requested, token t9"), "{advice}");
        assert!(advice.contains("attempt 3"), "{advice}");
        assert!(advice.contains("force_detach failed (Timeout)"), "{advice}");
    }

    #[test]
    fn an_attachment_where_it_should_be_needs_nothing() {
        let mut a = detaching(vec![condition(
            "Ready",
            "True",
            "Attached",
            "",
            "2026-12-01T10:00:00Z",
        )]);
        a.status.as_mut().unwrap().phase = Some(AttachmentPhase::Attached);
        let r = attachment_report(
            &a,
            Some(&volume(None, true)),
            None,
            at("2026-12-01T10:01:00Z"),
        );
        assert_eq!(r.advice, None);
        assert!(!r.clock.stuck);
        assert_eq!(r.clock.deadline, None);
    }

    #[test]
    fn orphans_are_listed_oldest_first_with_their_policy() {
        let mut report = volume(Some("1m"), true);
        report.metadata.name = Some("b".into());
        report.status = Some(VolumeStatus {
            orphans: vec![Orphan {
                node: "n2".into(),
                since: time("2026-12-01T10:00:30Z"),
            }],
            ..Default::default()
        });
        let mut detach = report.clone();
        detach.metadata.name = Some("a".into());
        detach.spec.orphan_policy = OrphanPolicy::Detach;
        detach.status = Some(VolumeStatus {
            orphans: vec![Orphan {
                node: "n1".into(),
                since: time("2026-12-01T10:00:00Z"),
            }],
            ..Default::default()
        });
        let list = orphan_reports(&[report, detach], at("2026-12-01T10:01:00Z"));
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].volume.as_str(), list[0].age.as_str()), ("a", "1m"));
        assert_eq!(list[0].orphan_policy, OrphanPolicy::Detach);
        assert!(
            list[0].action.contains("stuckAfter (1m)"),
            "{}",
            list[0].action
        );
        assert_eq!(
            (list[1].volume.as_str(), list[1].age.as_str()),
            ("b", "30s")
        );
        assert!(list[1].action.contains("Report"));
    }
}
