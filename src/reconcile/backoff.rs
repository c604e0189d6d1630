//! Per-object exponential backoff. kube-runtime has none of its own, and one failing object must
//! neither hot-loop nor slow the others down.
//!
//! A failing reconcile writes its status, and that write wakes the controller again at once: the
//! requeue delay alone would never apply. So the backoff also holds the object until its next try
//! is due, and a reconcile that comes earlier only waits (see [`Backoff::holding`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Backoff {
    objects: Mutex<HashMap<String, Failures>>,
}

struct Failures {
    count: u32,
    next_try: Instant,
}

impl Backoff {
    /// Counts a failure of `key` and returns how long to wait before the next try: doubling from
    /// 1 s to 5 min, but no later than `deadline` when that is sooner (the moment the object must
    /// be looked at anyway, such as its stuck deadline).
    pub fn failed(&self, key: &str, deadline: Option<Duration>) -> Duration {
        let mut objects = self.lock();
        let failures = objects.entry(key.to_owned()).or_insert(Failures {
            count: 0,
            next_try: Instant::now(),
        });
        let mut delay = FIRST
            .saturating_mul(2u32.saturating_pow(failures.count))
            .min(LONGEST);
        if let Some(deadline) = deadline.filter(|d| !d.is_zero()) {
            delay = delay.min(deadline);
        }
        failures.count = failures.count.saturating_add(1);
        failures.next_try = Instant::now() + delay;
        delay
    }

    /// How long `key` is still held after its last failure; `None` when it may be tried now.
    pub fn holding(&self, key: &str) -> Option<Duration> {
        let objects = self.lock();
        let left = objects
            .get(key)?
            .next_try
            .checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    /// Forgets the failures of `key` once it succeeds.
    pub fn succeeded(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.objects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_a_ceiling_holds_and_resets_on_success() {
        let backoff = Backoff::default();
        let delays: Vec<u64> = (0..11)
            .map(|_| backoff.failed("a", None).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(
            backoff.failed("b", None),
            FIRST,
            "objects back off independently"
        );
        assert!(
            backoff
                .holding("a")
                .is_some_and(|d| d > Duration::from_secs(299))
        );
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(backoff.holding("a"), None);
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a", None), FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_sooner_than_the_delay_wins_unless_it_has_passed() {
        let backoff = Backoff::default();
        for _ in 0..5 {
            backoff.failed("a", None);
        }
        assert_eq!(
            backoff.failed("a", Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        // A deadline already reached gives no reason to hurry: the backoff applies.
        assert_eq!(
            backoff.failed("a", Some(Duration::ZERO)),
            Duration::from_secs(64)
        );
    }
}
