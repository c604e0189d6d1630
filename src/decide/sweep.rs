//! The sweep: which converged records no longer match the backend. A driver that can answer for
//! all of its volumes at once is asked once per resync interval, and only the objects whose record
//! disagrees with that answer are reconciled, instead of each converged object probing on its own
//! timer (thousands of probes, each a listing of every connection). The reconcile that follows
//! probes for itself: the sweep's answer only says where to look.

use crate::api::{ProbeResult, VolumeAttachmentStatus, VolumeStatus};
use crate::driver::Connections;
use std::collections::BTreeSet;

/// Whether an attachment's record disagrees with `connections`, the backend's answer for its
/// volume: the record says attached where the backend shows no connection to its node, or the
/// other way round; or the backend shows a connection that names no node; or the record's last
/// probe went unanswered; or it was never reconciled.
pub fn attachment_disagrees(
    status: Option<&VolumeAttachmentStatus>,
    node: &str,
    connections: &Connections,
) -> bool {
    let Some(status) = status else {
        return true;
    };
    status.attached != connections.includes(node)
        || !connections.unattributed.is_empty()
        || status
            .last_probe
            .as_ref()
            .is_none_or(|probe| probe.result == ProbeResult::Unreachable)
}

/// Whether a Volume's status disagrees with `connections`: other nodes than it records, a
/// connection that names no node, or its last probe unanswered.
pub fn volume_disagrees(status: Option<&VolumeStatus>, connections: &Connections) -> bool {
    let Some(status) = status else {
        return true;
    };
    let recorded: BTreeSet<&str> = status.connected_nodes.iter().map(String::as_str).collect();
    let shown: BTreeSet<&str> = connections.nodes.iter().map(String::as_str).collect();
    recorded != shown
        || !connections.unattributed.is_empty()
        || status
            .last_probe
            .as_ref()
            .is_none_or(|probe| probe.result == ProbeResult::Unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AttachmentPhase, ProbeRecord};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn probe(result: ProbeResult, nodes: &[&str]) -> Option<ProbeRecord> {
        Some(ProbeRecord {
            time: Time(jiff::Timestamp::UNIX_EPOCH),
            result,
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            message: None,
        })
    }

    fn attached(on: bool) -> VolumeAttachmentStatus {
        VolumeAttachmentStatus {
            phase: Some(if on {
                AttachmentPhase::Attached
            } else {
                AttachmentPhase::Detached
            }),
            attached: on,
            last_probe: probe(
                if on {
                    ProbeResult::Connected
                } else {
                    ProbeResult::NotConnected
                },
                if on { &["a"] } else { &[] },
            ),
            ..Default::default()
        }
    }

    #[test]
    fn an_attachment_that_matches_the_backend_is_left_alone() {
        assert!(!attachment_disagrees(
            Some(&attached(true)),
            "a",
            &Connections::to(["a", "b"])
        ));
        assert!(!attachment_disagrees(
            Some(&attached(false)),
            "a",
            &Connections::to(["b"])
        ));
    }

    #[test]
    fn an_attachment_is_looked_at_when_the_backend_says_otherwise() {
        // A connection lost out of band, and one made behind the record's back.
        assert!(attachment_disagrees(
            Some(&attached(true)),
            "a",
            &Connections::to(["b"])
        ));
        assert!(attachment_disagrees(
            Some(&attached(false)),
            "a",
            &Connections::to(["a"])
        ));
        let mut by_hand = Connections::to(["a"]);
        by_hand.unattributed.insert("export x".into());
        assert!(attachment_disagrees(Some(&attached(true)), "a", &by_hand));
        let unanswered = VolumeAttachmentStatus {
            last_probe: probe(ProbeResult::Unreachable, &[]),
            ..attached(true)
        };
        assert!(attachment_disagrees(
            Some(&unanswered),
            "a",
            &Connections::to(["a"])
        ));
        assert!(attachment_disagrees(None, "a", &Connections::default()));
    }

    #[test]
    fn a_volume_is_looked_at_when_its_nodes_are_not_the_backends() {
        let status = VolumeStatus {
            connected_nodes: vec!["b".into(), "a".into()],
            last_probe: probe(ProbeResult::Connected, &["a", "b"]),
            ..Default::default()
        };
        assert!(!volume_disagrees(
            Some(&status),
            &Connections::to(["a", "b"])
        ));
        assert!(volume_disagrees(Some(&status), &Connections::to(["a"])));
        assert!(volume_disagrees(
            Some(&status),
            &Connections::to(["a", "b", "c"])
        ));
        let mut by_hand = Connections::to(["a", "b"]);
        by_hand.unattributed.insert("export x".into());
        assert!(volume_disagrees(Some(&status), &by_hand));
        assert!(volume_disagrees(None, &Connections::default()));
    }
}
