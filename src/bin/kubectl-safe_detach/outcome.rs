//! Following a requested force-detach to its backend-confirmed outcome, one observed version of
//! the attachment at a time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use safe_detach::api::types::REQUEST_REJECTED;
use safe_detach::api::{
    AttachmentPhase, ConditionStatus, ForceDetachReason, ForceDetachState, VolumeAttachment,
    condition_with,
};
use serde::Serialize;

use crate::report::human;

/// Where the request stands in one observed version of the attachment.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// The operator has not taken the token yet.
    NotTaken,
    /// The force-detach of the token runs; the backend has not confirmed yet.
    Running {
        attempts: u32,
        message: Option<String>,
    },
    /// The backend confirmed the volume disconnected from the node.
    Confirmed(Confirmed),
    /// The operator will not act on the token: it says why.
    Refused(String),
    /// The attachment is gone (or replaced by another of the same name) before the token's
    /// outcome was seen.
    Gone,
}

/// The backend-confirmed force-detach of the token.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Confirmed {
    pub reason: ForceDetachReason,
    pub attempts: u32,
    pub started_at: Time,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What became of the attachment after the confirmed force-detach.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state")]
pub enum Aftermath {
    /// Not settled yet (or not within the time given): the phase it was last seen in.
    Unsettled { phase: Option<AttachmentPhase> },
    /// A live attachment, attached again from scratch and confirmed by the backend.
    AttachedAgain {
        #[serde(skip_serializing_if = "Option::is_none")]
        at: Option<Time>,
    },
    /// An attachment being deleted: released once the detach was confirmed.
    Released,
}

/// Reads one version of the attachment (`None`: deleted) against the token the plugin wrote
/// on the object of `uid`.
pub fn progress(seen: Option<&VolumeAttachment>, uid: &str, token: &str) -> Progress {
    let Some(a) = seen.filter(|a| a.metadata.uid.as_deref() == Some(uid)) else {
        return Progress::Gone;
    };
    let status = a.status.clone().unwrap_or_default();
    match &status.force_detach {
        Some(f) if f.token.as_deref() == Some(token) => {
            return match f.state {
                ForceDetachState::Succeeded => Progress::Confirmed(Confirmed {
                    reason: f.reason,
                    attempts: f.attempts,
                    started_at: f.started_at.clone(),
                    finished_at: f.finished_at.clone(),
                    message: f.message.clone(),
                }),
                ForceDetachState::InProgress => Progress::Running {
                    attempts: f.attempts,
                    message: f.message.clone(),
                },
            };
        }
        _ => {}
    }
    if status.handled_tokens.iter().any(|t| t == token) {
        return Progress::Refused(format!(
            "the operator recorded token {token} as handled without a force-detach of its own (see the attachment's Events, e.g. TokenPresentAtCreation)"
        ));
    }
    let current = crate::token::current_annotation(a);
    if let Some(rejected) = a
        .status
        .as_ref()
        .and_then(|s| condition_with(&s.conditions, REQUEST_REJECTED, ConditionStatus::True))
        && current == Some(token)
    {
        return Progress::Refused(format!(
            "the operator rejected the request: {}",
            rejected.message
        ));
    }
    if current.is_some() && current != Some(token) {
        return Progress::Refused(format!(
            "the force-detach annotation was changed to {:?} by someone else before the operator took {token}",
            current.unwrap_or_default()
        ));
    }
    Progress::NotTaken
}

/// What became of the attachment after its force-detach was confirmed.
pub fn aftermath(seen: Option<&VolumeAttachment>, uid: &str) -> Aftermath {
    let Some(a) = seen.filter(|a| a.metadata.uid.as_deref() == Some(uid)) else {
        return Aftermath::Released;
    };
    let status = a.status.clone().unwrap_or_default();
    if a.metadata.deletion_timestamp.is_none()
        && status.phase == Some(AttachmentPhase::Attached)
        && status.attached
    {
        return Aftermath::AttachedAgain {
            at: status.phase_since.clone(),
        };
    }
    Aftermath::Unsettled {
        phase: status.phase,
    }
}

/// Whether waiting longer could change the aftermath.
pub fn settled(aftermath: &Aftermath) -> bool {
    !matches!(aftermath, Aftermath::Unsettled { .. })
}

/// The report of a force-detach: what was forced, why, when the backend confirmed, what then.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForceReport {
    pub name: String,
    pub volume: String,
    pub node: String,
    pub token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_reason: Option<String>,
    pub confirmed: Confirmed,
    pub afterwards: Aftermath,
}

/// The lines `force --wait` prints on success.
pub fn render_force(report: &ForceReport) -> String {
    let c = &report.confirmed;
    let why = match &report.requested_reason {
        Some(reason) => format!("{:?} by a person: {reason}", c.reason),
        None => format!("{:?} by a person (no --reason given)", c.reason),
    };
    let confirmed = match &c.finished_at {
        Some(at) => {
            let took = safe_detach::decide::elapsed_since(c.started_at.0, at.0);
            format!(
                "the backend confirmed {} disconnected from {} at {} ({} after it started, {} attempt{})",
                report.volume,
                report.node,
                at.0,
                human(took),
                c.attempts,
                if c.attempts == 1 { "" } else { "s" }
            )
        }
        None => format!(
            "the backend confirmed {} disconnected from {} ({} attempts)",
            report.volume, report.node, c.attempts
        ),
    };
    let afterwards = match &report.afterwards {
        Aftermath::AttachedAgain { at: Some(at) } => {
            format!("attached again at {} (confirmed by the backend)", at.0)
        }
        Aftermath::AttachedAgain { at: None } => {
            "attached again (confirmed by the backend)".to_owned()
        }
        Aftermath::Released => {
            "not attached again: the attachment was being deleted and is released".to_owned()
        }
        Aftermath::Unsettled { phase } => format!(
            "not attached again yet: {} (`kubectl safe-detach status {}` follows it)",
            phase.map_or("no phase".to_owned(), |p| format!("{p:?}")),
            report.name
        ),
    };
    format!(
        "forced:     VolumeAttachment {} (volume {}, node {}), token {}\nwhy:        {why}\nconfirmed:  {confirmed}\nafterwards: {afterwards}\n",
        report.name, report.volume, report.node, report.token
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use safe_detach::api::{ForceDetachStatus, VolumeAttachmentSpec, VolumeAttachmentStatus};

    fn time(text: &str) -> Time {
        Time(text.parse().unwrap())
    }

    fn attachment(force: Option<(&str, ForceDetachState)>, handled: &[&str]) -> VolumeAttachment {
        let mut a = VolumeAttachment::new(
            "va",
            VolumeAttachmentSpec {
                volume_name: "vol".into(),
                node_name: "node-b".into(),
                connector: None,
                read_only: None,
            },
        );
        a.metadata.uid = Some("uid-1".into());
        a.status = Some(VolumeAttachmentStatus {
            phase: Some(AttachmentPhase::Detaching),
            handled_tokens: handled.iter().map(|t| (*t).to_owned()).collect(),
            force_detach: force.map(|(token, state)| ForceDetachStatus {
                token: Some(token.into()),
                reason: ForceDetachReason::Requested,
                state,
                attempts: 1,
                started_at: time("2026-12-01T10:00:00Z"),
                finished_at: (state == ForceDetachState::Succeeded)
                    .then(|| time("2026-12-01T10:00:02Z")),
                message: None,
            }),
            ..Default::default()
        });
        a
    }

    #[test]
    fn only_the_tokens_own_success_confirms() {
        let a = attachment(Some(("old", ForceDetachState::Succeeded)), &["old"]);
        assert_eq!(progress(Some(&a), "uid-1", "new"), Progress::NotTaken);
        let a = attachment(Some(("new", ForceDetachState::InProgress)), &["new"]);
        assert!(matches!(
            progress(Some(&a), "uid-1", "new"),
            Progress::Running { attempts: 1, .. }
        ));
        let a = attachment(Some(("new", ForceDetachState::Succeeded)), &["new"]);
        assert!(matches!(
            progress(Some(&a), "uid-1", "new"),
            Progress::Confirmed(_)
        ));
    }

    #[test]
    fn a_token_handled_without_acting_is_a_refusal() {
        let a = attachment(None, &["new"]);
        assert!(matches!(
            progress(Some(&a), "uid-1", "new"),
            Progress::Refused(_)
        ));
    }

    #[test]
    fn another_object_of_the_same_name_is_not_ours() {
        let a = attachment(Some(("new", ForceDetachState::Succeeded)), &["new"]);
        assert_eq!(progress(Some(&a), "uid-2", "new"), Progress::Gone);
        assert_eq!(progress(None, "uid-1", "new"), Progress::Gone);
        assert_eq!(aftermath(Some(&a), "uid-2"), Aftermath::Released);
    }

    #[test]
    fn attached_again_only_when_the_backend_confirmed_it() {
        let mut a = attachment(Some(("new", ForceDetachState::Succeeded)), &["new"]);
        let status = a.status.as_mut().unwrap();
        status.phase = Some(AttachmentPhase::Attached);
        status.attached = false;
        assert!(!settled(&aftermath(Some(&a), "uid-1")));
        a.status.as_mut().unwrap().attached = true;
        assert!(matches!(
            aftermath(Some(&a), "uid-1"),
            Aftermath::AttachedAgain { .. }
        ));
    }

    #[test]
    fn the_report_says_what_why_when_and_what_then() {
        let report = ForceReport {
            name: "va".into(),
            volume: "vol".into(),
            node: "node-b".into(),
            token: "t1".into(),
            requested_reason: Some("node drained".into()),
            confirmed: Confirmed {
                reason: ForceDetachReason::Requested,
                attempts: 1,
                started_at: time("2026-12-01T10:00:00Z"),
                finished_at: Some(time("2026-12-01T10:00:02Z")),
                message: None,
            },
            afterwards: Aftermath::Released,
        };
        assert_eq!(
            render_force(&report),
            "forced:     VolumeAttachment va (volume vol, node node-b), token t1\n\
             why:        Requested by a person: node drained\n\
             confirmed:  the backend confirmed vol disconnected from node-b at 2026-12-01T10:00:02Z (2s after it started, 1 attempt)\n\
             afterwards: not attached again: the attachment was being deleted and is released\n"
        );
    }
}
