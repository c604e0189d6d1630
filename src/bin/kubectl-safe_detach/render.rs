//! Tables and descriptions for people; `-o json|yaml` prints the reports themselves.

use jiff::Timestamp;
use safe_detach::api::{AttachmentPhase, ForceDetachState, ForceDetachStatus, ProbeRecord};
use safe_detach::decide::elapsed_since;

use crate::report::{AttachmentReport, ClockSource, OrphanReport, StuckClock, human};

/// Columns padded to their widest cell, two spaces apart, as kubectl prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn ago(time: Timestamp, now: Timestamp) -> String {
    format!("{} ago", human(elapsed_since(time, now)))
}

/// The backend's last answer, short: `Connected [node-b] 3s ago`.
pub fn probe_short(probe: Option<&ProbeRecord>, now: Timestamp) -> String {
    let Some(p) = probe else {
        return "not asked yet".into();
    };
    let nodes = if p.nodes.is_empty() {
        String::new()
    } else {
        format!(" [{}]", p.nodes.join(","))
    };
    format!("{:?}{nodes} {}", p.result, ago(p.time.0, now))
}

/// The stuck clock, short: `yes, 12s`, `in 20s`, `-`.
pub fn clock_short(clock: &StuckClock, stuckable: bool, now: Timestamp) -> String {
    if clock.stuck {
        return format!("yes, {}", clock.stuck_for.as_deref().unwrap_or("?"));
    }
    match (&clock.deadline, clock.source) {
        (Some(deadline), source) => {
            let left = human(elapsed_since(now, deadline.0));
            if source == ClockSource::AssumedDefault {
                format!("in {left}?")
            } else {
                format!("in {left}")
            }
        }
        (None, ClockSource::Unknown) if stuckable => "unknown clock".into(),
        (None, _) => "-".into(),
    }
}

fn force_short(force: Option<&ForceDetachStatus>, now: Timestamp) -> String {
    match force {
        None => "-".into(),
        Some(f) => match (f.state, &f.finished_at) {
            (ForceDetachState::Succeeded, Some(at)) => {
                format!("Succeeded {:?} {}", f.reason, ago(at.0, now))
            }
            (state, _) => format!("{state:?} {:?} x{}", f.reason, f.attempts),
        },
    }
}

/// The table of `status` for several attachments, then one line per attachment that needs a
/// person's attention.
pub fn status_table(reports: &[AttachmentReport], now: Timestamp) -> String {
    if reports.is_empty() {
        return "No VolumeAttachments found.\n".into();
    }
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.volume.clone(),
                r.node.clone(),
                phase_text(r),
                r.attached.to_string(),
                r.in_phase.clone().unwrap_or_else(|| "-".into()),
                clock_short(
                    &r.clock,
                    matches!(
                        r.phase,
                        Some(AttachmentPhase::Attaching | AttachmentPhase::Detaching)
                    ),
                    now,
                ),
                probe_short(r.last_probe.as_ref(), now),
                force_short(r.force_detach.as_ref(), now),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NAME",
            "VOLUME",
            "NODE",
            "PHASE",
            "ATTACHED",
            "IN PHASE",
            "STUCK",
            "BACKEND",
            "FORCE-DETACH",
        ],
        &rows,
    );
    let notes: Vec<String> = reports
        .iter()
        .filter_map(|r| r.advice.as_ref().map(|a| format!("{}: {a}\n", r.name)))
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.extend(notes);
    }
    out
}

fn phase_text(r: &AttachmentReport) -> String {
    let phase = r.phase.map_or("-".to_owned(), |p| format!("{p:?}"));
    if r.deleting {
        format!("{phase} (deleting)")
    } else {
        phase
    }
}

fn clock_text(r: &AttachmentReport, now: Timestamp) -> String {
    let c = &r.clock;
    let after = match (c.stuck_after.as_deref(), c.source) {
        (Some(a), ClockSource::Volume) => format!("stuckAfter {a}, from the Volume"),
        (Some(a), ClockSource::OperatorDefault) => {
            format!("stuckAfter {a}, the operator's default as given")
        }
        (Some(a), _) => format!(
            "stuckAfter {a}, the operator's default unless its configuration sets defaultStuckAfter (--default-stuck-after)"
        ),
        (None, _) => "stuckAfter unknown: the Volume cannot be read".to_owned(),
    };
    match (&c.deadline, c.stuck) {
        (Some(d), true) => format!(
            "yes, for {}: the deadline was {} ({after})",
            c.stuck_for.as_deref().unwrap_or("?"),
            d.0
        ),
        (None, true) => format!(
            "yes, for {} ({after})",
            c.stuck_for.as_deref().unwrap_or("?")
        ),
        (Some(d), false) => format!(
            "no; counts as stuck at {} (in {}; {after})",
            d.0,
            human(elapsed_since(now, d.0))
        ),
        (None, false) => format!("no: only Attaching and Detaching can be stuck ({after})"),
    }
}

fn force_text(force: Option<&ForceDetachStatus>) -> String {
    let Some(f) = force else {
        return "none".into();
    };
    let token = f
        .token
        .as_deref()
        .map_or("no token (automatic)".to_owned(), |t| format!("token {t}"));
    let finished = f
        .finished_at
        .as_ref()
        .map(|t| format!(", confirmed by the backend at {}", t.0))
        .unwrap_or_default();
    let message = f
        .message
        .as_deref()
        .map(|m| format!("; {m}"))
        .unwrap_or_default();
    format!(
        "{:?}: {:?}, {token}, {} attempt{}, started at {}{finished}{message}",
        f.state,
        f.reason,
        f.attempts,
        if f.attempts == 1 { "" } else { "s" },
        f.started_at.0
    )
}

/// `status NAME`: everything about one attachment, one field a line.
pub fn status_detail(r: &AttachmentReport, now: Timestamp) -> String {
    let mut lines: Vec<(&str, String)> = Vec::new();
    lines.push(("VolumeAttachment", r.name.clone()));
    let policy = r
        .auto_force_detach
        .map_or(" (the Volume cannot be read)".to_owned(), |auto| {
            format!(" (autoForceDetach: {auto})")
        });
    lines.push(("Volume", format!("{}{policy}", r.volume)));
    lines.push(("Node", r.node.clone()));
    let since = match (&r.in_phase, &r.phase_since) {
        (Some(age), Some(t)) => format!(" for {age} (since {})", t.0),
        _ => String::new(),
    };
    lines.push(("Phase", format!("{}{since}", phase_text(r))));
    lines.push((
        "Attached",
        if r.attached {
            "true (confirmed by the backend)".to_owned()
        } else {
            "false".to_owned()
        },
    ));
    let backend = match &r.last_probe {
        None => "not asked yet".to_owned(),
        Some(p) => {
            let message = p
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            format!(
                "{}, asked at {}{message}",
                probe_short(Some(p), now),
                p.time.0
            )
        }
    };
    lines.push(("Backend said", backend));
    lines.push(("Stuck", clock_text(r, now)));
    lines.push(("Force-detach", force_text(r.force_detach.as_ref())));
    lines.push((
        "Handled tokens",
        if r.handled_tokens.is_empty() {
            "none".to_owned()
        } else {
            r.handled_tokens.join(", ")
        },
    ));
    for (i, c) in r.conditions.iter().enumerate() {
        let text = format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message);
        lines.push((if i == 0 { "Conditions" } else { "" }, text));
    }
    lines.push((
        "What to do",
        r.advice
            .clone()
            .unwrap_or_else(|| "nothing: it is where it should be".into()),
    ));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    lines
        .into_iter()
        .map(|(k, v)| {
            let key = if k.is_empty() {
                String::new()
            } else {
                format!("{k}:")
            };
            format!("{key:<width$}{v}\n")
        })
        .collect()
}

/// The table of `orphans`.
pub fn orphans_table(orphans: &[OrphanReport]) -> String {
    if orphans.is_empty() {
        return "No orphaned backend connections: every connection the operator saw is claimed by an attachment.\n".into();
    }
    let rows: Vec<Vec<String>> = orphans
        .iter()
        .map(|o| {
            vec![
                o.volume.clone(),
                o.node.clone(),
                o.age.clone(),
                o.since.0.to_string(),
                format!("{:?}", o.orphan_policy),
                o.action.clone(),
            ]
        })
        .collect();
    table(
        &[
            "VOLUME",
            "NODE",
            "AGE",
            "SINCE",
            "ORPHAN POLICY",
            "WHAT HAPPENS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let out = table(
            &["NAME", "PHASE"],
            &[
                vec!["a-long-name".into(), "Attached".into()],
                vec!["b".into(), "Detaching".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME         PHASE\na-long-name  Attached\nb            Detaching\n"
        );
    }

    #[test]
    fn the_stuck_column_marks_an_assumed_clock() {
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let clock = StuckClock {
            stuck: false,
            stuck_after: Some("2m".into()),
            source: ClockSource::AssumedDefault,
            deadline: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-01T10:00:20Z".parse().unwrap(),
            )),
            stuck_for: None,
        };
        assert_eq!(clock_short(&clock, true, now), "in 20s?");
        let unknown = StuckClock {
            source: ClockSource::Unknown,
            deadline: None,
            stuck_after: None,
            ..clock
        };
        assert_eq!(clock_short(&unknown, true, now), "unknown clock");
        assert_eq!(clock_short(&unknown, false, now), "-");
    }
}
