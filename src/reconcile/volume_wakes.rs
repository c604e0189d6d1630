//! Which changes of an attachment wake its Volume's reconcile: those that change what the
//! Volume decides on. A Volume reads of its attachments only which exist, the node each names
//! and the phase each records (`reconcile/volume.rs`: the claimed connections, its own holders,
//! the phase it shows); whether one is `attached` also wakes it, as a sign that the backend
//! moved (a connection that showed up, or went, outside an intent). An attachment's finalizer,
//! its conditions or its token record change none of that, and each such write would otherwise
//! cost the Volume a reconcile and a probe of its backend.

use crate::api::VolumeAttachment;
use kube::ResourceExt;
use kube::runtime::watcher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// What a Volume last read of one attachment: the Volume it names, and a digest of the rest.
type Read = (String, u64);

/// What a Volume reads of each attachment the watch delivered, by name; during a re-list, what
/// the re-list delivered so far.
#[derive(Default)]
pub(super) struct VolumeWakes {
    read: HashMap<String, Read>,
    relisted: Option<HashMap<String, Read>>,
}

impl VolumeWakes {
    /// The Volumes to wake for `event`: that of an attachment that comes, goes, or changes what
    /// its Volume reads of it ([`what_volumes_read`]). A re-list wakes, once it is done (when
    /// the cache holds what it listed), the Volume of every attachment it listed and of every
    /// one it no longer lists: the watch that lost track says nothing of those deletions.
    pub(super) fn volumes_to_wake(
        &mut self,
        event: &watcher::Event<VolumeAttachment>,
    ) -> Vec<String> {
        match event {
            watcher::Event::Init => {
                self.relisted = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(attachment) => {
                self.relisted
                    .get_or_insert_with(HashMap::new)
                    .insert(attachment.name_any(), what_volumes_read(attachment));
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.relisted.take().unwrap_or_default();
                let gone = self
                    .read
                    .iter()
                    .filter(|(name, _)| !listed.contains_key(*name))
                    .map(|(_, (volume, _))| volume.clone());
                let wake: BTreeSet<String> = listed
                    .values()
                    .map(|(volume, _)| volume.clone())
                    .chain(gone)
                    .collect();
                self.read = listed;
                wake.into_iter().collect()
            }
            watcher::Event::Apply(attachment) => {
                let read = what_volumes_read(attachment);
                let volume = read.0.clone();
                if self.read.insert(attachment.name_any(), read.clone()) == Some(read) {
                    Vec::new()
                } else {
                    vec![volume]
                }
            }
            watcher::Event::Delete(attachment) => {
                self.read.remove(&attachment.name_any());
                vec![attachment.spec.volume_name.clone()]
            }
        }
    }
}

/// What a Volume's reconcile reads of `attachment`: the Volume it names, and a digest of which
/// object it is (its UID, so that one created again under the same name counts as new), the
/// node it names, its phase and whether it is attached.
fn what_volumes_read(attachment: &VolumeAttachment) -> Read {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    attachment.metadata.uid.hash(&mut hasher);
    attachment.spec.node_name.hash(&mut hasher);
    let status = attachment.status.as_ref();
    status.and_then(|s| s.phase).hash(&mut hasher);
    status.is_some_and(|s| s.attached).hash(&mut hasher);
    (attachment.spec.volume_name.clone(), hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AttachmentPhase, VolumeAttachmentStatus};
    use serde_json::json;

    fn attachment(name: &str, uid: &str, phase: Option<AttachmentPhase>) -> VolumeAttachment {
        let mut attachment: VolumeAttachment = serde_json::from_value(json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "VolumeAttachment",
            "metadata": { "name": name, "uid": uid },
            "spec": { "volumeName": format!("v-{name}"), "nodeName": "n" },
        }))
        .expect("an attachment");
        attachment.status = Some(VolumeAttachmentStatus {
            phase,
            ..VolumeAttachmentStatus::default()
        });
        attachment
    }

    fn apply(attachment: &VolumeAttachment) -> watcher::Event<VolumeAttachment> {
        watcher::Event::Apply(attachment.clone())
    }

    #[test]
    fn only_a_change_of_what_the_volume_reads_wakes_it() {
        let mut wakes = VolumeWakes::default();
        let created = attachment("a", "u1", None);
        assert_eq!(
            wakes.volumes_to_wake(&apply(&created)),
            ["v-a"],
            "a new one"
        );

        let mut held = created.clone();
        held.metadata.finalizers = Some(vec!["safedetach.io/detach".into()]);
        assert!(
            wakes.volumes_to_wake(&apply(&held)).is_empty(),
            "its finalizer"
        );

        let attaching = attachment("a", "u1", Some(AttachmentPhase::Attaching));
        assert_eq!(
            wakes.volumes_to_wake(&apply(&attaching)),
            ["v-a"],
            "its intent"
        );
        let mut noted = attaching.clone();
        noted.status.as_mut().expect("a status").observed_generation = Some(2);
        assert!(
            wakes.volumes_to_wake(&apply(&noted)).is_empty(),
            "the rest of its status"
        );
        let mut connected = attaching.clone();
        connected.status.as_mut().expect("a status").attached = true;
        assert_eq!(
            wakes.volumes_to_wake(&apply(&connected)),
            ["v-a"],
            "its connection"
        );
        let attached = attachment("a", "u1", Some(AttachmentPhase::Attached));
        assert_eq!(
            wakes.volumes_to_wake(&apply(&attached)),
            ["v-a"],
            "its phase"
        );

        let deleted = watcher::Event::Delete(attached.clone());
        assert_eq!(wakes.volumes_to_wake(&deleted), ["v-a"], "its going");
        let again = attachment("a", "u2", Some(AttachmentPhase::Attached));
        assert_eq!(
            wakes.volumes_to_wake(&apply(&again)),
            ["v-a"],
            "one created again"
        );
        assert!(wakes.volumes_to_wake(&apply(&again)).is_empty());
    }

    #[test]
    fn a_relist_wakes_the_volumes_of_what_it_lists_and_of_what_went_once_it_is_done() {
        let mut wakes = VolumeWakes::default();
        let kept = attachment("a", "u1", Some(AttachmentPhase::Attached));
        let gone = attachment("b", "u2", Some(AttachmentPhase::Attached));
        wakes.volumes_to_wake(&apply(&kept));
        wakes.volumes_to_wake(&apply(&gone));

        // `b` was deleted while the watch had lost track: the re-list no longer delivers it.
        assert!(wakes.volumes_to_wake(&watcher::Event::Init).is_empty());
        let listed = watcher::Event::InitApply(kept.clone());
        assert!(
            wakes.volumes_to_wake(&listed).is_empty(),
            "not before the cache holds it"
        );
        assert_eq!(
            wakes.volumes_to_wake(&watcher::Event::InitDone),
            ["v-a", "v-b"]
        );
        assert!(
            wakes.volumes_to_wake(&apply(&kept)).is_empty(),
            "nothing changed since"
        );
        assert_eq!(
            wakes.volumes_to_wake(&apply(&gone)),
            ["v-b"],
            "created again"
        );
    }
}
