//! The Volumes this process held (added the operator's finalizer to) a moment ago.
//!
//! The apiserver may still carry out a DELETE that read a Volume before its finalizer was added
//! (kubernetes/kubernetes#77988): the Volume is then gone at once, finalizer and all. An attach
//! that rests on a Volume held a moment ago could be left with nothing that holds it. So an
//! attach waits until the hold is [`SETTLE`] old, whichever controller added it: a DELETE that
//! raced it has been carried out by then, and a read after it finds the Volume gone. This narrows
//! the window; it cannot close it (a DELETE held up longer by the apiserver still lands).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How old a hold must be before an attach rests on it.
pub const SETTLE: Duration = Duration::from_millis(200);

/// When this process held each Volume (by UID), for as long as a hold takes to settle.
pub struct RecentlyHeld {
    settle: Duration,
    at: Mutex<HashMap<String, Instant>>,
}

impl Default for RecentlyHeld {
    fn default() -> Self {
        Self::new(SETTLE)
    }
}

impl RecentlyHeld {
    pub fn new(settle: Duration) -> Self {
        Self {
            settle,
            at: Mutex::default(),
        }
    }

    /// Records that the Volume with `uid` is held now: called before the finalizer's PATCH is
    /// sent (another reconcile may read it held before this one has the answer) and again
    /// once it is answered.
    pub fn held(&self, uid: &str) {
        let now = Instant::now();
        let mut at = self.at.lock().expect("the recent holds");
        at.retain(|_, held| now.duration_since(*held) < self.settle);
        at.insert(uid.to_owned(), now);
    }

    /// Whether the hold of the Volume with `uid` has yet to settle; `false` once it has (or if
    /// this process never added it: a hold by another replica is older than a hand-over).
    pub fn settling(&self, uid: &str) -> bool {
        let at = self.at.lock().expect("the recent holds");
        at.get(uid).is_some_and(|held| held.elapsed() < self.settle)
    }

    /// Lets every hold settle now, as if its time had passed.
    #[cfg(test)]
    pub fn settle_all(&self) {
        self.at.lock().expect("the recent holds").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_settles_after_its_time_and_is_forgotten() {
        let holds = RecentlyHeld::new(Duration::from_secs(3600));
        assert!(!holds.settling("u1"));
        holds.held("u1");
        assert!(holds.settling("u1"));
        assert!(!holds.settling("u2"));

        let holds = RecentlyHeld::new(Duration::from_millis(20));
        holds.held("u1");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!holds.settling("u1"));
        holds.held("u2");
        assert_eq!(
            holds.at.lock().expect("the recent holds").len(),
            1,
            "a settled hold is forgotten"
        );
    }
}
