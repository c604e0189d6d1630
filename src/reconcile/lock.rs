//! One reconcile at a time per backend volume, from the probe that authorizes a step to the
//! probe that confirms it.
//!
//! Attachments and the Volume controller reconcile concurrently; two attachments of one volume
//! must not both see it free and both attach, and an orphan must not be forced off while an
//! attachment of the same volume is between its attach and its confirmation. The key is what the
//! backend knows, (driver, volume handle), not the Volume's name: two Volumes naming one handle
//! share one lock. The backend's own check (an exclusive attach) guards what this lock cannot:
//! other processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// How many keys may be added between two sweeps of the locks nobody holds or waits for.
const SWEEP_EVERY: usize = 1024;

/// The per-volume locks, shared by every reconcile.
#[derive(Default)]
pub struct VolumeLocks {
    inner: Mutex<Locks>,
}

#[derive(Default)]
struct Locks {
    by_volume: HashMap<(String, String), Weak<tokio::sync::Mutex<()>>>,
    added_since_sweep: usize,
}

/// This reconcile's turn at one volume; the next waiter's turn begins when it drops.
pub type VolumeTurn = OwnedMutexGuard<()>;

impl VolumeLocks {
    /// Waits up to `wait` for the turn at (driver, handle); `None` if another reconcile holds it
    /// that long (the caller looks again shortly, rather than tie up a worker).
    pub async fn turn(&self, driver: &str, handle: &str, wait: Duration) -> Option<VolumeTurn> {
        let lock = self.lock_of(driver, handle);
        tokio::time::timeout(wait, lock.lock_owned()).await.ok()
    }

    fn lock_of(&self, driver: &str, handle: &str) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is still whole.
        let mut locks = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (driver.to_owned(), handle.to_owned());
        if let Some(lock) = locks.by_volume.get(&key).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.by_volume.insert(key, Arc::downgrade(&lock));
        locks.added_since_sweep += 1;
        if locks.added_since_sweep >= SWEEP_EVERY {
            locks.by_volume.retain(|_, lock| lock.strong_count() > 0);
            locks.added_since_sweep = 0;
        }
        lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_turn_per_volume_and_other_volumes_are_free() {
        let locks = VolumeLocks::default();
        let wait = Duration::from_millis(20);
        let first = locks.turn("nbd", "vol1", wait).await;
        assert!(first.is_some());
        assert!(locks.turn("nbd", "vol1", wait).await.is_none());
        assert!(locks.turn("nbd", "vol2", wait).await.is_some());
        assert!(locks.turn("csi", "vol1", wait).await.is_some());
        drop(first);
        assert!(locks.turn("nbd", "vol1", wait).await.is_some());
    }

    #[tokio::test]
    async fn a_waiter_gets_the_turn_when_the_holder_lets_go() {
        let locks = Arc::new(VolumeLocks::default());
        let held = locks.turn("nbd", "vol1", Duration::ZERO).await;
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move {
                locks
                    .turn("nbd", "vol1", Duration::from_secs(5))
                    .await
                    .is_some()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn unused_locks_are_swept() {
        let locks = VolumeLocks::default();
        for i in 0..SWEEP_EVERY + 1 {
            drop(locks.turn("nbd", &format!("vol{i}"), Duration::ZERO).await);
        }
        let held = locks.inner.lock().unwrap().by_volume.len();
        assert!(held < SWEEP_EVERY, "{held} locks kept");
    }
}
