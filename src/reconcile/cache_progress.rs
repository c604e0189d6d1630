//! How far a cache has come: the newest `resourceVersion` its store has taken in.
//!
//! A watch delivers the changes of its kind in the order of their versions, and the store takes
//! each in before the event goes on. So once the store has taken in a change at version `w`, it
//! holds every change of the objects it watches up to `w`: it is at least as fresh as a list the
//! apiserver answered at any version up to `w`. An attach that must see every Volume of its
//! backend volume, one created a moment ago included, reads the Volume with a list (which says
//! the version it was answered at, `r`) and then reads the cache once the cache has reached `r`,
//! instead of asking the apiserver to test every Volume it holds against a field selector.
//!
//! Versions are compared as numbers: those of objects kept in one etcd are its revisions, one
//! counter for the list and the watch alike. A version that does not read as one is never taken
//! for progress, and the reader lists instead.
//!
//! A re-list (the watch's history expired) fills a new store beside the old one and swaps them
//! at its end. From its start until then nothing counts as reached; at its end the progress is
//! what the new store holds, even if that is older than before: the store now says what the list
//! said, and a cluster whose versions started again (its etcd restored) lists lower ones. A watch
//! error counts nothing as reached either, until the watch delivers again.

use kube::Resource;
use kube::runtime::watcher;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a reader waits for a cache that is moving to reach its version. A storm moves it
/// every few milliseconds; a cache that has not moved for this long may not move at all (nothing
/// changes), and a list answers at once.
const WAIT: Duration = Duration::from_millis(500);

/// The progress of one cache, shared by the watch that makes it and the reconciles that read it.
#[derive(Clone, Default)]
pub struct CacheProgress {
    progress: Arc<watch::Sender<Progress>>,
}

#[derive(Clone, Copy, Default)]
struct Progress {
    /// The newest version the store has taken in.
    version: u64,
    /// When it last moved.
    moved_at: Option<Instant>,
}

impl CacheProgress {
    /// What the watch feeds, after the store took its event in.
    pub fn recorder(&self) -> ProgressRecorder {
        ProgressRecorder {
            progress: self.clone(),
            relisting: None,
        }
    }

    /// Whether the store holds every change up to `version`, waiting a moment for a cache that
    /// is moving. `false` for a version that does not read as a number.
    pub async fn reached(&self, version: Option<&str>) -> bool {
        let Some(version) = version.and_then(|v| v.parse::<u64>().ok()) else {
            return false;
        };
        let now = *self.progress.borrow();
        if now.version >= version {
            return true;
        }
        let moving = now.moved_at.is_some_and(|at| at.elapsed() < WAIT);
        if !moving {
            return false;
        }
        let mut seen = self.progress.subscribe();
        tokio::time::timeout(WAIT, seen.wait_for(|now| now.version >= version))
            .await
            .is_ok_and(|answer| answer.is_ok())
    }

    /// Nothing counts as reached until the watch delivers again.
    pub fn forget(&self) {
        self.progress.send_modify(|now| now.version = 0);
    }

    /// The store now holds a list, and with it every change up to `version`: no more, no less.
    fn relisted(&self, version: u64) {
        self.progress.send_replace(Progress {
            version,
            moved_at: Some(Instant::now()),
        });
    }

    fn advance(&self, version: u64) {
        self.progress.send_if_modified(|now| {
            let newer = version > now.version;
            if newer {
                *now = Progress {
                    version,
                    moved_at: Some(Instant::now()),
                };
            }
            newer
        });
    }
}

/// Records, event by event, what the store has taken in.
pub struct ProgressRecorder {
    progress: CacheProgress,
    /// During a re-list: the newest version among the objects listed so far.
    relisting: Option<u64>,
}

impl ProgressRecorder {
    /// Called with each event once the store has taken it in.
    pub fn taken_in<K: Resource>(&mut self, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
                if let Some(version) = version_of(object) {
                    self.progress.advance(version);
                }
            }
            watcher::Event::Init => {
                self.relisting = Some(0);
                self.progress.forget();
            }
            watcher::Event::InitApply(object) => {
                if let (Some(newest), Some(version)) = (&mut self.relisting, version_of(object)) {
                    *newest = (*newest).max(version);
                }
            }
            // The store now holds the list, which was answered at a version no older than any
            // object in it.
            watcher::Event::InitDone => {
                if let Some(newest) = self.relisting.take() {
                    self.progress.relisted(newest);
                }
            }
        }
    }
}

fn version_of<K: Resource>(object: &K) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Volume;

    fn volume(version: &str) -> Volume {
        let mut volume = Volume::new(
            "vol",
            serde_json::from_value(serde_json::json!({"driver": "nbd", "volumeHandle": "h1"}))
                .expect("a spec"),
        );
        volume.metadata.resource_version = Some(version.to_owned());
        volume
    }

    /// A re-list starts, and lists Volumes at `versions`; it has not ended.
    fn relist_begins(recorder: &mut ProgressRecorder, versions: &[&str]) {
        recorder.taken_in(&watcher::Event::<Volume>::Init);
        for version in versions {
            recorder.taken_in(&watcher::Event::InitApply(volume(version)));
        }
    }

    #[tokio::test]
    async fn a_cache_has_reached_the_versions_of_the_changes_it_took_in() {
        let progress = CacheProgress::default();
        let mut recorder = progress.recorder();
        assert!(!progress.reached(Some("1")).await, "nothing taken in yet");
        recorder.taken_in(&watcher::Event::Apply(volume("41")));
        recorder.taken_in(&watcher::Event::Delete(volume("42")));
        assert!(progress.reached(Some("42")).await);
        assert!(progress.reached(Some("7")).await);
        assert!(
            !progress.reached(Some("43")).await,
            "a version it has not taken in"
        );
        assert!(!progress.reached(Some("not-a-number")).await);
        assert!(!progress.reached(None).await);
    }

    #[tokio::test]
    async fn a_relist_counts_only_once_the_store_holds_it() {
        let progress = CacheProgress::default();
        let mut recorder = progress.recorder();
        recorder.taken_in(&watcher::Event::Apply(volume("10")));
        relist_begins(&mut recorder, &["30", "20"]);
        assert!(
            !progress.reached(Some("10")).await,
            "nothing counts as reached during a re-list"
        );
        recorder.taken_in(&watcher::Event::<Volume>::InitDone);
        assert!(progress.reached(Some("30")).await);
        assert!(!progress.reached(Some("31")).await);
    }

    #[tokio::test]
    async fn a_relist_at_lower_versions_takes_the_progress_back() {
        // The cluster's versions started again (its etcd restored): the re-list holds less
        // than the progress before it said.
        let progress = CacheProgress::default();
        let mut recorder = progress.recorder();
        recorder.taken_in(&watcher::Event::Apply(volume("900")));
        relist_begins(&mut recorder, &["40"]);
        recorder.taken_in(&watcher::Event::<Volume>::InitDone);
        assert!(progress.reached(Some("40")).await);
        assert!(
            !progress.reached(Some("500")).await,
            "a version between the re-list and the progress before it"
        );
    }

    #[tokio::test]
    async fn a_watch_error_counts_nothing_as_reached_until_the_watch_delivers_again() {
        let progress = CacheProgress::default();
        let mut recorder = progress.recorder();
        recorder.taken_in(&watcher::Event::Apply(volume("50")));
        progress.forget();
        assert!(!progress.reached(Some("50")).await);
        recorder.taken_in(&watcher::Event::Apply(volume("51")));
        assert!(progress.reached(Some("51")).await);
    }

    #[tokio::test]
    async fn a_moving_cache_is_waited_for_and_a_still_one_is_not() {
        let progress = CacheProgress::default();
        let mut recorder = progress.recorder();
        recorder.taken_in(&watcher::Event::Apply(volume("5")));
        // Moving: the reader waits, and the change it needs arrives meanwhile.
        let waiting = tokio::spawn({
            let progress = progress.clone();
            async move { progress.reached(Some("6")).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        recorder.taken_in(&watcher::Event::Apply(volume("6")));
        assert!(waiting.await.expect("the reader"));
        // Still for longer than a reader would wait: the reader does not wait.
        progress
            .progress
            .send_modify(|now| now.moved_at = Some(Instant::now() - WAIT));
        let asked = Instant::now();
        assert!(!progress.reached(Some("7")).await);
        assert!(asked.elapsed() < WAIT);
    }
}
