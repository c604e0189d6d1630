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
use tokio::time::Instant;

/// How many keys may be added between two sweeps of the locks nobody holds or waits for.
const SWEEP_EVERY: usize = 1024;

/// The per-volume locks, shared by every reconcile.
#[derive(Default)]
pub struct VolumeLocks {
    inner: Mutex<Locks>,
    /// Until when a call of unknown outcome on a volume may still be carried out by its backend.
    landing: Mutex<HashMap<(String, String), Instant>>,
    /// Until when a call an earlier process made on any volume of a driver may still be.
    landing_on_driver: Mutex<HashMap<String, Instant>>,
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

    /// Records that a call on (driver, handle), sent at `sent`, ended without a known outcome,
    /// and that its backend may still carry it out for up to `within` after it was sent
    /// ([`Driver::lands_within`](crate::driver::Driver::lands_within)): counted from the send,
    /// so that a reply lost early is waited out as long as a timeout.
    pub fn call_may_land(&self, driver: &str, handle: &str, sent: Instant, within: Duration) {
        if within.is_zero() {
            return;
        }
        let until = sent + within;
        let mut landing = self.landing.lock().unwrap_or_else(|p| p.into_inner());
        landing.retain(|_, until| *until > Instant::now());
        let entry = landing
            .entry((driver.to_owned(), handle.to_owned()))
            .or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Records that calls an earlier process made on `driver`'s volumes (this process before a
    /// restart, or the leader before this one), whose outcome this process cannot know, may
    /// still be carried out for up to `within` from now.
    pub fn earlier_calls_may_land(&self, driver: &str, within: Duration) {
        if within.is_zero() {
            return;
        }
        self.landing_on_driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(driver.to_owned(), Instant::now() + within);
    }

    /// How much longer a call of unknown outcome on (driver, handle) may still land, this
    /// process's or an earlier one's; `None` once none can.
    pub fn may_still_land(&self, driver: &str, handle: &str) -> Option<Duration> {
        let now = Instant::now();
        let on_driver = {
            let landing = self
                .landing_on_driver
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            landing.get(driver).copied()
        };
        let on_volume = {
            let landing = self.landing.lock().unwrap_or_else(|p| p.into_inner());
            if landing.is_empty() {
                None
            } else {
                landing
                    .get(&(driver.to_owned(), handle.to_owned()))
                    .copied()
            }
        };
        on_driver
            .into_iter()
            .chain(on_volume)
            .max()?
            .checked_duration_since(now)
            .filter(|left| !left.is_zero())
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

    #[tokio::test(start_paused = true)]
    async fn a_call_of_unknown_outcome_keeps_its_volume_unsettled_for_the_time_given() {
        let locks = VolumeLocks::default();
        let now = Instant::now();
        assert_eq!(locks.may_still_land("csi", "vol1"), None);
        locks.call_may_land("csi", "vol1", now, Duration::ZERO);
        assert_eq!(locks.may_still_land("csi", "vol1"), None);
        locks.call_may_land("csi", "vol1", now, Duration::from_secs(30));
        locks.call_may_land("csi", "vol1", now, Duration::from_secs(10));
        assert_eq!(
            locks.may_still_land("csi", "vol1"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(locks.may_still_land("csi", "vol2"), None);
        assert_eq!(locks.may_still_land("nbd", "vol1"), None);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            locks.may_still_land("csi", "vol1"),
            Some(Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(locks.may_still_land("csi", "vol1"), None);
    }

    /// A reply lost a moment after the send is waited out as long, from the send, as a call
    /// that ran to its deadline: the backend got the same deadline either way.
    #[tokio::test(start_paused = true)]
    async fn a_call_may_land_counted_from_its_send_not_from_its_end() {
        let locks = VolumeLocks::default();
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        locks.call_may_land("csi", "vol1", sent, Duration::from_secs(6));
        assert_eq!(
            locks.may_still_land("csi", "vol1"),
            Some(Duration::from_millis(5900))
        );
        // A call whose time has run out already by the time its end is recorded leaves nothing.
        locks.call_may_land("csi", "vol2", sent, Duration::from_millis(50));
        assert_eq!(locks.may_still_land("csi", "vol2"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_processs_calls_keep_every_volume_of_the_driver_unsettled() {
        let locks = VolumeLocks::default();
        locks.earlier_calls_may_land("csi", Duration::from_secs(15));
        locks.earlier_calls_may_land("nbd", Duration::ZERO);
        assert_eq!(
            locks.may_still_land("csi", "any"),
            Some(Duration::from_secs(15))
        );
        assert_eq!(locks.may_still_land("nbd", "any"), None);
        // A call of this process's own that may land later than that counts for its volume.
        tokio::time::advance(Duration::from_secs(5)).await;
        locks.call_may_land("csi", "vol1", Instant::now(), Duration::from_secs(15));
        assert_eq!(
            locks.may_still_land("csi", "vol1"),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            locks.may_still_land("csi", "vol2"),
            Some(Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(locks.may_still_land("csi", "vol2"), None);
    }

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
