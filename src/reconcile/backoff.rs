//! Per-object exponential backoff. kube-runtime has none of its own, and one failing object must
//! neither hot-loop nor slow the others down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Counts a failure of `key` and returns how long to wait before the next try.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = failures.entry(key.to_owned()).or_default();
        let delay = FIRST
            .saturating_mul(2u32.saturating_pow(*count))
            .min(LONGEST);
        *count = count.saturating_add(1);
        delay
    }

    /// Forgets the failures of `key` once it succeeds.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_a_ceiling_and_resets_on_success() {
        let backoff = Backoff::default();
        let delays: Vec<u64> = (0..11).map(|_| backoff.failed("a").as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff.failed("b"), FIRST, "objects back off independently");
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a"), FIRST);
    }
}
