//! The objects this operator wrote, kept until its cache shows them.
//!
//! A watch delivers an operator's own write some time after the apiserver answered it; a
//! reconcile that starts in between (woken by another object's change) would decide on the
//! version the write replaced, and its conditioned write would be refused as stale: a wasted
//! write, a read and a decision taken again, on every object of a storm. So each successful write
//! is kept here with the versions it replaced, and a reconcile decides on the newer of the cached
//! object and the written one.
//!
//! Nothing is weakened by it: the written object is what the apiserver itself returned, newer
//! than the cached one, and every write stays conditioned on the version it was decided on. A
//! change by someone else since is refused as before.

use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a write is kept if neither the watch nor a reconcile finds the cache caught up (a
/// delivery that raced the write's answer): far beyond any watch's lag, only to bound the memory.
const KEEP: Duration = Duration::from_secs(120);

/// The last write of each object (by UID) the cache has not shown yet.
pub struct OwnWrites<K> {
    written: Mutex<HashMap<String, Written<K>>>,
}

struct Written<K> {
    /// The object as the apiserver returned it.
    object: K,
    /// The versions this operator's writes replaced since the cache last caught up: a cached
    /// object at one of these is behind.
    replaced: Vec<String>,
    at: Instant,
}

impl<K> Default for OwnWrites<K> {
    fn default() -> Self {
        Self {
            written: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Resource + Clone> OwnWrites<K> {
    /// The newer of `cached` and this operator's last write of the same object.
    pub fn newest(&self, cached: K) -> K {
        match self.written_after(&cached) {
            Some(written) => written,
            None => cached,
        }
    }

    /// The cache now holds `cached` (its watch delivered it): a kept write it shows, or that
    /// something newer replaced, is forgotten, so that what is kept is only what the watch has
    /// yet to deliver.
    pub fn seen(&self, cached: &K) {
        self.written_after(cached);
    }

    /// This operator's last write of `cached`'s object, if `cached` is a version it replaced;
    /// else forgets the write, which the cache shows or went past.
    fn written_after(&self, cached: &K) -> Option<K> {
        let uid = cached.uid()?;
        let mut written = self.lock();
        let behind = match (written.get(&uid), cached.resource_version()) {
            (Some(last), Some(version)) => last.replaced.contains(&version),
            _ => false,
        };
        if behind {
            return Some(written[&uid].object.clone());
        }
        written.remove(&uid);
        None
    }

    /// How many writes are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Records that `object` was written over the version `replaced`.
    pub fn wrote(&self, replaced: Option<String>, object: &K) {
        let (Some(uid), Some(replaced)) = (object.uid(), replaced) else {
            return;
        };
        // Kept as the cache keeps objects.
        let mut object = object.clone();
        super::slim_for_cache(&mut object);
        let mut written = self.lock();
        let now = Instant::now();
        written.retain(|_, w| now.duration_since(w.at) < KEEP);
        let entry = written.entry(uid).or_insert_with(|| Written {
            object: object.clone(),
            replaced: Vec::new(),
            at: now,
        });
        entry.object = object;
        entry.replaced.push(replaced);
        entry.at = now;
    }

    /// Forgets the object: it is released, or gone.
    pub fn forget(&self, object: &K) {
        if let Some(uid) = object.uid() {
            self.lock().remove(&uid);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Written<K>>> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is still whole.
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Volume;

    fn volume(uid: &str, version: &str) -> Volume {
        let spec = serde_json::from_value(serde_json::json!({
            "driver": "nbd",
            "volumeHandle": "h1",
        }))
        .expect("a Volume spec");
        let mut volume = Volume::new("vol", spec);
        volume.metadata.uid = Some(uid.to_owned());
        volume.metadata.resource_version = Some(version.to_owned());
        volume
    }

    #[test]
    fn a_cache_behind_its_own_writes_gets_the_last_written_object() {
        let writes = OwnWrites::default();
        writes.wrote(Some("1".into()), &volume("u", "2"));
        writes.wrote(Some("2".into()), &volume("u", "3"));
        // Behind by one write, and by two.
        assert_eq!(
            writes.newest(volume("u", "2")).resource_version().unwrap(),
            "3"
        );
        assert_eq!(
            writes.newest(volume("u", "1")).resource_version().unwrap(),
            "3"
        );
    }

    #[test]
    fn a_cache_that_caught_up_or_went_past_is_the_newest() {
        let writes = OwnWrites::default();
        writes.wrote(Some("1".into()), &volume("u", "2"));
        // Someone else wrote after this operator, and the cache shows it.
        assert_eq!(
            writes.newest(volume("u", "7")).resource_version().unwrap(),
            "7"
        );
        // And the write is forgotten once the cache went past it.
        assert_eq!(
            writes.newest(volume("u", "1")).resource_version().unwrap(),
            "1"
        );
    }

    #[test]
    fn another_object_of_the_same_name_is_not_replaced_by_a_write_of_the_old_one() {
        let writes = OwnWrites::default();
        writes.wrote(Some("1".into()), &volume("old", "2"));
        let recreated = writes.newest(volume("new", "1"));
        assert_eq!(recreated.uid().unwrap(), "new");
    }

    #[test]
    fn a_write_is_kept_only_until_the_watch_delivers_it() {
        let writes = OwnWrites::default();
        writes.wrote(Some("1".into()), &volume("u", "2"));
        writes.wrote(Some("2".into()), &volume("u", "3"));
        // The watch delivers the versions the writes replaced: still behind.
        writes.seen(&volume("u", "1"));
        writes.seen(&volume("u", "2"));
        assert_eq!(writes.len(), 1);
        assert_eq!(
            writes.newest(volume("u", "2")).resource_version().unwrap(),
            "3"
        );
        // Then the last write itself: nothing is kept any more.
        writes.seen(&volume("u", "3"));
        assert_eq!(writes.len(), 0);
        // Nor for another object's delivery.
        writes.wrote(Some("1".into()), &volume("v", "2"));
        writes.seen(&volume("w", "9"));
        assert_eq!(writes.len(), 1);
    }

    #[test]
    fn a_forgotten_object_is_the_cache_s_again() {
        let writes = OwnWrites::default();
        writes.wrote(Some("1".into()), &volume("u", "2"));
        writes.forget(&volume("u", "2"));
        assert_eq!(
            writes.newest(volume("u", "1")).resource_version().unwrap(),
            "1"
        );
    }
}
