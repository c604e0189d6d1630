//! Choosing and checking force-detach tokens. A token acts at most once over an attachment's
//! life (`status.handledTokens`), so the plugin only ever writes one that the operator will take
//! as a new request.

use jiff::Timestamp;
use safe_detach::api::VolumeAttachment;
use safe_detach::decide::{Request, is_handled};

use crate::FORCE_DETACH_ANNOTATION;

/// Why a token cannot be written.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token was already handled on this attachment: the operator would ignore it.
    Handled(String),
    /// The token is the annotation's current value: writing it again asks nothing.
    Current(String),
    /// The operator would reject the token (empty, too long, control characters).
    Invalid { token: String, why: &'static str },
    /// The operator has not reconciled the attachment yet: a token found then is recorded as a
    /// past request (present at creation), never acted on.
    NotSeenYet,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Handled(token) => write!(
                f,
                "token {token:?} was already handled on this attachment (status.handledTokens): a token never acts twice; leave out --token for a fresh one"
            ),
            Self::Current(token) => write!(
                f,
                "token {token:?} is already the current force-detach request; leave out --token for a fresh one"
            ),
            Self::Invalid { token, why } => {
                write!(
                    f,
                    "token {token:?} would be rejected by the operator: {why}"
                )
            }
            Self::NotSeenYet => write!(
                f,
                "the operator has not reconciled this attachment yet (it has no status.phase): a token set now would be recorded as present at creation and not acted on; wait until it has a phase (is an operator running for it?)"
            ),
        }
    }
}

/// The current value of the force-detach annotation.
pub fn current_annotation(attachment: &VolumeAttachment) -> Option<&str> {
    attachment
        .metadata
        .annotations
        .as_ref()?
        .get(FORCE_DETACH_ANNOTATION)
        .map(String::as_str)
}

/// Checks that `token` would be taken by the operator as a new request on `attachment`.
pub fn check(attachment: &VolumeAttachment, token: &str) -> Result<(), Refusal> {
    let status = attachment.status.clone().unwrap_or_default();
    if status.phase.is_none() {
        return Err(Refusal::NotSeenYet);
    }
    if is_handled(&status, token) {
        return Err(Refusal::Handled(token.to_owned()));
    }
    if current_annotation(attachment) == Some(token) {
        return Err(Refusal::Current(token.to_owned()));
    }
    // The operator's own reading of the annotation, so the rules cannot drift apart.
    match Request::read(Some(token), &status) {
        Request::New(_) => Ok(()),
        Request::Invalid { token, why } => Err(Refusal::Invalid { token, why }),
        Request::AtCreation(_) => Err(Refusal::NotSeenYet),
        Request::None => Err(Refusal::Handled(token.to_owned())),
    }
}

/// A fresh token: the time in UTC (so a person reading `handledTokens` sees when each request
/// was made) and a random suffix (so two requests in the same second differ). `random` yields
/// suffix candidates; the first one that makes a token the operator would take as new is used.
pub fn fresh(
    attachment: &VolumeAttachment,
    now: Timestamp,
    mut random: impl FnMut() -> u64,
) -> Result<String, Refusal> {
    let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut last = Refusal::NotSeenYet;
    // Collisions need a 32-bit suffix to repeat within one second; a few tries cover any of them.
    for _ in 0..8 {
        let token = format!("{stamp}-{:08x}", random() as u32);
        match check(attachment, &token) {
            Ok(()) => return Ok(token),
            Err(Refusal::NotSeenYet) => return Err(Refusal::NotSeenYet),
            Err(refusal) => last = refusal,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safe_detach::api::{AttachmentPhase, VolumeAttachmentSpec, VolumeAttachmentStatus};
    use std::collections::BTreeMap;

    fn attachment(handled: &[&str], annotation: Option<&str>) -> VolumeAttachment {
        let mut a = VolumeAttachment::new(
            "a",
            VolumeAttachmentSpec {
                volume_name: "v".into(),
                node_name: "n".into(),
                connector: None,
                read_only: None,
            },
        );
        a.status = Some(VolumeAttachmentStatus {
            phase: Some(AttachmentPhase::Attached),
            handled_tokens: handled.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        });
        if let Some(token) = annotation {
            a.metadata.annotations = Some(BTreeMap::from([(
                FORCE_DETACH_ANNOTATION.to_owned(),
                token.to_owned(),
            )]));
        }
        a
    }

    fn now() -> Timestamp {
        "2026-12-01T21:52:32Z".parse().unwrap()
    }

    #[test]
    fn a_fresh_token_dates_the_request() {
        let token = fresh(&attachment(&[], None), now(), || 0xabcdef12).unwrap();
        assert_eq!(token, "20261201T215232Z-abcdef12");
    }

    #[test]
    fn a_fresh_token_skips_handled_and_current_ones() {
        let a = attachment(
            &["20261201T215232Z-00000001"],
            Some("20261201T215232Z-00000002"),
        );
        let mut candidates = [1u64, 2, 3].into_iter();
        let token = fresh(&a, now(), || candidates.next().unwrap()).unwrap();
        assert_eq!(token, "20261201T215232Z-00000003");
    }

    #[test]
    fn a_fresh_token_gives_up_rather_than_reuse() {
        let a = attachment(&["20261201T215232Z-00000001"], None);
        assert_eq!(
            fresh(&a, now(), || 1),
            Err(Refusal::Handled("20261201T215232Z-00000001".into()))
        );
    }

    #[test]
    fn an_explicit_token_is_refused_when_it_would_not_act() {
        let a = attachment(&["t1"], Some("t2"));
        assert_eq!(check(&a, "t1"), Err(Refusal::Handled("t1".into())));
        assert_eq!(check(&a, "t2"), Err(Refusal::Current("t2".into())));
        assert!(matches!(check(&a, ""), Err(Refusal::Invalid { .. })));
        assert!(matches!(
            check(&a, &"x".repeat(129)),
            Err(Refusal::Invalid { .. })
        ));
        assert!(matches!(check(&a, "a\nb"), Err(Refusal::Invalid { .. })));
        assert_eq!(check(&a, "t3"), Ok(()));
    }

    #[test]
    fn the_last_force_detach_token_counts_as_handled() {
        let mut a = attachment(&[], None);
        let status = a.status.as_mut().unwrap();
        status.force_detach = Some(safe_detach::api::ForceDetachStatus {
            token: Some("old".into()),
            reason: safe_detach::api::ForceDetachReason::Requested,
            state: safe_detach::api::ForceDetachState::Succeeded,
            attempts: 1,
            started_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()),
            finished_at: None,
            message: None,
        });
        assert_eq!(check(&a, "old"), Err(Refusal::Handled("old".into())));
    }

    #[test]
    fn an_attachment_the_operator_has_not_seen_is_refused() {
        let mut a = attachment(&[], None);
        a.status = None;
        assert_eq!(check(&a, "t"), Err(Refusal::NotSeenYet));
        assert_eq!(fresh(&a, now(), || 1), Err(Refusal::NotSeenYet));
    }
}
