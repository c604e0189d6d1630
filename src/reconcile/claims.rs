//! Every attachment of the cluster, for the claims of a connection: a detach, and a Volume's
//! pass that may force an orphan off or release the Volume, must see each attachment that names
//! a Volume of the backend volume, whatever its labels (one relabelled out of a shard while
//! attached included), as the apiserver had them on the volume's turn.
//!
//! They are read from a cache of every attachment once it has taken in every change up to a
//! version read on the turn ([`CacheProgress`]): no attachment of the backend volume attaches
//! after that version without the turn, which the reader holds. A replica that manages every
//! attachment (no `--selector`) reads its controller's own cache; a replica of one shard watches
//! every attachment beside it, slimmed the same way. Until the cache has caught up (a lagging
//! or failed watch, a re-list), the reader lists instead.

use super::cache_progress::CacheProgress;
use super::index::Index;
use crate::api::VolumeAttachment;
use futures::StreamExt;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use std::collections::BTreeSet;
use tokio::task::JoinHandle;

/// A cache of every attachment and how far it has come.
#[derive(Clone)]
pub struct Claims {
    attachments: Store<VolumeAttachment>,
    by_volume: Index<VolumeAttachment>,
    progress: CacheProgress,
}

impl Claims {
    /// The controller's own cache, where it watches every attachment.
    pub fn shared(
        attachments: Store<VolumeAttachment>,
        by_volume: Index<VolumeAttachment>,
        progress: CacheProgress,
    ) -> Self {
        Self {
            attachments,
            by_volume,
            progress,
        }
    }

    /// A watch of every attachment of its own, for a replica of one shard: the cache, and the
    /// task that fills it until it is aborted.
    pub fn watched(client: Client) -> (Self, JoinHandle<()>) {
        let progress = CacheProgress::default();
        let by_volume = Index::new(super::attachment_volume_key);
        let (attachments, writer) = reflector::store();
        let api = Api::<VolumeAttachment>::all(client);
        let stream = reflector(
            writer,
            watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(super::slim_for_cache),
        );
        let task = tokio::spawn({
            let (progress, by_volume) = (progress.clone(), by_volume.clone());
            let mut recorder = progress.recorder();
            async move {
                stream
                    .for_each(|event| {
                        match &event {
                            Ok(event) => {
                                by_volume.taken_in(event);
                                recorder.taken_in(event);
                            }
                            Err(_) => progress.forget(),
                        }
                        futures::future::ready(())
                    })
                    .await;
            }
        });
        (
            Self {
                attachments,
                by_volume,
                progress,
            },
            task,
        )
    }

    /// How far the cache has come, for a test to move as a watch would.
    #[cfg(test)]
    pub fn progress(&self) -> &CacheProgress {
        &self.progress
    }

    /// The attachments that name one of `names`, once the cache has taken in every change up to
    /// `as_of`; `None` until then (waiting a moment for a cache that is moving).
    pub async fn naming_as_of(
        &self,
        names: &BTreeSet<String>,
        as_of: Option<&str>,
    ) -> Option<Vec<VolumeAttachment>> {
        if !self.progress.reached(as_of).await {
            return None;
        }
        let naming =
            self.by_volume
                .get_each(&self.attachments, names.iter().map(String::as_str), |a| {
                    names.contains(&a.spec.volume_name)
                });
        Some(naming.iter().map(|a| a.as_ref().clone()).collect())
    }
}
