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

/// When this process held each Volume (by UID), for [`SETTLE`].
#[derive(Default)]
pub struct RecentlyHeld {
    at: Mutex<HashMap<String, Instant>>,
}

impl RecentlyHeld {
    /// Records that the Volume with `uid` was held just now.
    pub fn held(&self, uid: &str) {
        let now = Instant::now();
        let mut at = self.at.lock().expect("the recent holds");
        at.retain(|_, held| now.duration_since(*held) < SETTLE);
        at.insert(uid.to_owned(), now);
    }

    /// How long until the hold of the Volume with `uid` is settled; `None` if it is (or was
    /// never added by this process: a hold by another replica is older than a hand-over).
    pub fn settling(&self, uid: &str) -> Option<Duration> {
        let at = self.at.lock().expect("the recent holds");
        at.get(uid)
            .map(|held| SETTLE.saturating_sub(held.elapsed()))
            .filter(|left| !left.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_settles_after_its_time_and_is_forgotten() {
        let holds = RecentlyHeld::default();
        assert_eq!(holds.settling("u1"), None);
        holds.held("u1");
        assert!(holds.settling("u1").is_some_and(|left| left <= SETTLE));
        std::thread::sleep(SETTLE);
        assert_eq!(holds.settling("u1"), None);
        holds.held("u2");
        assert_eq!(
            holds.at.lock().expect("the recent holds").len(),
            1,
            "a settled hold is forgotten"
        );
    }
}
