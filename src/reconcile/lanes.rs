//! Turns to run for the attachment reconciles: up to the configured concurrency in each of two
//! lanes at once (the detaches of deleted attachments, and the others, so that a drained rack's
//! storm does not hold up a person's attach), the rest queued here in arrival order.
//!
//! A reconcile that finds its lane full does not wait inside the controller: it is queued, and
//! returns. kube-runtime's controller polls every reconcile it holds in flight on each wake-up
//! and scans the objects woken while theirs runs, so thousands waiting there would cost it time
//! in proportion to their number at every step of every other. When a turn ends, the next queued
//! object is given its place (reserved for it) and woken through the controller's own trigger.

use crate::api::VolumeAttachment;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a place is kept for a woken object that does not come for it (deleted meanwhile).
pub const RESERVED_FOR: Duration = Duration::from_secs(1);

/// When a queued reconcile looks again if its turn has not come by then (it is woken when it
/// does; this only bounds the wait should a wake-up be lost).
pub const QUEUED_RECHECK: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Attachments being deleted: their detaches.
    Releasing,
    /// Everything else: attaches, forced detaches, the converged.
    Others,
}

impl Lane {
    fn index(self) -> usize {
        match self {
            Self::Releasing => 0,
            Self::Others => 1,
        }
    }
}

/// The attachment reconciles' turns, and the trigger that wakes the queued.
pub struct Lanes {
    turns: Mutex<Turns<ObjectRef<VolumeAttachment>>>,
    wake: UnboundedSender<ObjectRef<VolumeAttachment>>,
    attachments: Store<VolumeAttachment>,
}

/// A reconcile's turn in its lane, given back when dropped.
pub struct Turn<'a> {
    lanes: &'a Lanes,
    lane: Lane,
}

impl Lanes {
    /// Lanes of `capacity` each, and the stream of the objects whose turn came (for the
    /// controller's `reconcile_on`).
    pub fn new(
        capacity: usize,
        attachments: Store<VolumeAttachment>,
    ) -> (Self, UnboundedReceiver<ObjectRef<VolumeAttachment>>) {
        let (wake, woken) = unbounded();
        let lanes = Self {
            turns: Mutex::new(Turns::new(capacity)),
            wake,
            attachments,
        };
        (lanes, woken)
    }

    /// A turn now, or `None`: the object is queued and will be woken when its turn comes.
    pub fn enter(&self, lane: Lane, object: &ObjectRef<VolumeAttachment>) -> Option<Turn<'_>> {
        let mut wake = Vec::new();
        let entered =
            self.turns()
                .enter(lane, object, Instant::now(), |o| self.exists(o), &mut wake);
        self.send(wake);
        // Built only for a turn taken: a dropped `Turn` gives one back.
        entered.then(|| Turn { lanes: self, lane })
    }

    fn turns(&self) -> std::sync::MutexGuard<'_, Turns<ObjectRef<VolumeAttachment>>> {
        // Nothing panics while holding it; if something did, the counts are still usable.
        self.turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the object is still there to be woken.
    fn exists(&self, object: &ObjectRef<VolumeAttachment>) -> bool {
        self.attachments.get(object).is_some()
    }

    fn send(&self, wake: Vec<ObjectRef<VolumeAttachment>>) {
        for object in wake {
            // Closed only when the controller is gone.
            let _ = self.wake.unbounded_send(object);
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut wake = Vec::new();
        self.lanes.turns().leave(
            self.lane,
            Instant::now(),
            |o| self.lanes.exists(o),
            &mut wake,
        );
        self.lanes.send(wake);
    }
}

/// The turns of both lanes: which objects run, which have a place kept, which wait.
#[derive(Debug)]
pub struct Turns<T> {
    capacity: usize,
    lanes: [LaneState<T>; 2],
    /// The lane each queued object waits in. A queue entry whose object is not here, or is here
    /// for the other lane, is stale and skipped.
    queued: HashMap<T, Lane>,
}

#[derive(Debug)]
struct LaneState<T> {
    /// Running reconciles and kept places.
    taken: usize,
    queue: VecDeque<T>,
    waiting: usize,
    reserved: HashMap<T, Instant>,
}

impl<T> Default for LaneState<T> {
    fn default() -> Self {
        Self {
            taken: 0,
            queue: VecDeque::new(),
            waiting: 0,
            reserved: HashMap::new(),
        }
    }
}

impl<T: Clone + Eq + Hash> Turns<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            lanes: [LaneState::default(), LaneState::default()],
            queued: HashMap::new(),
        }
    }

    /// Asks for a turn in `lane`: `true` if the object may run now (it must [`Self::leave`]
    /// after), else it is queued. Either way, the objects to wake for the places that came free
    /// are added to `wake`; `exists` says whether an object is still there to be woken.
    pub fn enter(
        &mut self,
        lane: Lane,
        object: &T,
        now: Instant,
        exists: impl Fn(&T) -> bool,
        wake: &mut Vec<T>,
    ) -> bool {
        let other = match lane {
            Lane::Releasing => Lane::Others,
            Lane::Others => Lane::Releasing,
        };
        // An object that changed lanes (deleted while it waited) gives up what it had in the other.
        if self.lanes[other.index()].reserved.remove(object).is_some() {
            self.lanes[other.index()].taken -= 1;
        }
        if self.queued.get(object) == Some(&other) {
            self.queued.remove(object);
            self.lanes[other.index()].waiting -= 1;
        }
        let state = &mut self.lanes[lane.index()];
        let entered = if state.reserved.remove(object).is_some() {
            if self.queued.remove(object).is_some() {
                state.waiting -= 1;
            }
            true
        } else if state.taken < self.capacity && state.waiting == 0 {
            state.taken += 1;
            true
        } else {
            if !self.queued.contains_key(object) {
                self.queued.insert(object.clone(), lane);
                state.queue.push_back(object.clone());
                state.waiting += 1;
            }
            false
        };
        self.fill(now, &exists, wake);
        if entered {
            return true;
        }
        // Woken at once: a place came free for it just now.
        let state = &mut self.lanes[lane.index()];
        if state.reserved.remove(object).is_some() {
            wake.retain(|woken| woken != object);
            return true;
        }
        false
    }

    /// Ends a turn in `lane`, adding the objects to wake to `wake`.
    pub fn leave(
        &mut self,
        lane: Lane,
        now: Instant,
        exists: impl Fn(&T) -> bool,
        wake: &mut Vec<T>,
    ) {
        let state = &mut self.lanes[lane.index()];
        debug_assert!(state.taken > 0, "a turn left that was never taken");
        state.taken = state.taken.saturating_sub(1);
        self.fill(now, &exists, wake);
    }

    /// How many objects wait in `lane`.
    #[cfg(test)]
    fn waiting(&self, lane: Lane) -> usize {
        self.lanes[lane.index()].waiting
    }

    /// Gives up places kept too long, then gives the free places to the queued, in order.
    fn fill(&mut self, now: Instant, exists: &impl Fn(&T) -> bool, wake: &mut Vec<T>) {
        for lane in [Lane::Releasing, Lane::Others] {
            let state = &mut self.lanes[lane.index()];
            let before = state.reserved.len();
            state
                .reserved
                .retain(|_, since| now.saturating_duration_since(*since) < RESERVED_FOR);
            state.taken -= before - state.reserved.len();
            while state.taken < self.capacity
                && let Some(next) = state.queue.pop_front()
            {
                if self.queued.get(&next) != Some(&lane) {
                    continue;
                }
                self.queued.remove(&next);
                state.waiting -= 1;
                if !exists(&next) {
                    continue;
                }
                state.taken += 1;
                state.reserved.insert(next.clone(), now);
                wake.push(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALWAYS: fn(&u32) -> bool = |_| true;

    fn enter(turns: &mut Turns<u32>, lane: Lane, object: u32, now: Instant) -> (bool, Vec<u32>) {
        let mut wake = Vec::new();
        let entered = turns.enter(lane, &object, now, ALWAYS, &mut wake);
        (entered, wake)
    }

    /// A lane of one: 1 runs, 2 and 3 wait in that order.
    fn one_running_two_queued(now: Instant) -> Turns<u32> {
        let mut turns = Turns::new(1);
        assert!(enter(&mut turns, Lane::Others, 1, now).0);
        assert!(!enter(&mut turns, Lane::Others, 2, now).0);
        assert!(!enter(&mut turns, Lane::Others, 3, now).0);
        turns
    }

    fn leave(turns: &mut Turns<u32>, lane: Lane, now: Instant) -> Vec<u32> {
        let mut wake = Vec::new();
        turns.leave(lane, now, ALWAYS, &mut wake);
        wake
    }

    #[test]
    fn the_queued_run_in_order_each_in_the_place_kept_for_it() {
        let now = Instant::now();
        let mut turns = Turns::new(2);
        assert_eq!(enter(&mut turns, Lane::Others, 1, now), (true, vec![]));
        assert_eq!(enter(&mut turns, Lane::Others, 2, now), (true, vec![]));
        assert_eq!(enter(&mut turns, Lane::Others, 3, now), (false, vec![]));
        assert_eq!(enter(&mut turns, Lane::Others, 4, now), (false, vec![]));
        // Asking again keeps the place in the queue.
        assert_eq!(enter(&mut turns, Lane::Others, 3, now), (false, vec![]));
        assert_eq!(turns.waiting(Lane::Others), 2);
        assert_eq!(leave(&mut turns, Lane::Others, now), vec![3]);
        // A newcomer does not take the place kept for 3.
        assert_eq!(enter(&mut turns, Lane::Others, 5, now), (false, vec![]));
        assert_eq!(enter(&mut turns, Lane::Others, 3, now), (true, vec![]));
        assert_eq!(leave(&mut turns, Lane::Others, now), vec![4]);
        assert_eq!(leave(&mut turns, Lane::Others, now), vec![5]);
        assert_eq!(enter(&mut turns, Lane::Others, 4, now), (true, vec![]));
        assert_eq!(enter(&mut turns, Lane::Others, 5, now), (true, vec![]));
        assert_eq!(turns.waiting(Lane::Others), 0);
    }

    #[test]
    fn a_full_lane_holds_up_no_one_in_the_other() {
        let now = Instant::now();
        let mut turns = Turns::new(1);
        assert!(enter(&mut turns, Lane::Releasing, 1, now).0);
        for object in 2..100 {
            assert!(!enter(&mut turns, Lane::Releasing, object, now).0);
        }
        assert!(enter(&mut turns, Lane::Others, 100, now).0);
        assert_eq!(turns.waiting(Lane::Releasing), 98);
        assert_eq!(turns.waiting(Lane::Others), 0);
    }

    #[test]
    fn a_place_not_taken_is_given_to_the_next_after_a_while() {
        let now = Instant::now();
        let mut turns = one_running_two_queued(now);
        // 2 is woken but never comes (deleted meanwhile).
        assert_eq!(leave(&mut turns, Lane::Others, now), vec![2]);
        assert_eq!(enter(&mut turns, Lane::Others, 3, now), (false, vec![]));
        let later = now + RESERVED_FOR;
        assert_eq!(enter(&mut turns, Lane::Others, 3, later), (true, vec![]));
        // 2 coming late is a newcomer.
        assert_eq!(enter(&mut turns, Lane::Others, 2, later), (false, vec![]));
    }

    #[test]
    fn an_object_gone_from_the_cache_is_not_woken() {
        let now = Instant::now();
        let mut turns = one_running_two_queued(now);
        let mut wake = Vec::new();
        turns.leave(Lane::Others, now, |object| *object != 2, &mut wake);
        assert_eq!(wake, vec![3]);
        assert_eq!(turns.waiting(Lane::Others), 0);
    }

    #[test]
    fn an_object_that_changes_lanes_gives_up_its_place_in_the_other() {
        let now = Instant::now();
        let mut turns = one_running_two_queued(now);
        // 2 is deleted while it waits: it now asks in the releasing lane, and runs there.
        assert!(enter(&mut turns, Lane::Releasing, 2, now).0);
        assert_eq!(turns.waiting(Lane::Others), 1);
        assert_eq!(leave(&mut turns, Lane::Others, now), vec![3]);
        // 3 is deleted once woken: the place kept for it in the other lane is given up at once.
        assert!(!enter(&mut turns, Lane::Releasing, 3, now).0);
        assert!(enter(&mut turns, Lane::Others, 4, now).0);
        assert_eq!(leave(&mut turns, Lane::Releasing, now), vec![3]);
        assert!(enter(&mut turns, Lane::Releasing, 3, now).0);
    }

    #[test]
    fn whatever_the_order_no_lane_runs_more_than_its_capacity_and_no_one_is_left_waiting() {
        // A small deterministic random walk over enters and leaves of 20 objects.
        let mut seed: u64 = 7;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let start = Instant::now();
        let mut turns = Turns::new(3);
        let mut running: Vec<(u32, Lane)> = Vec::new();
        let mut woken: Vec<u32> = Vec::new();
        for step in 0..10_000u64 {
            let now = start + Duration::from_millis(step);
            let lane = if next(2) == 0 {
                Lane::Releasing
            } else {
                Lane::Others
            };
            if next(3) == 0 && !running.is_empty() {
                let (_, lane) = running.swap_remove(next(running.len() as u64) as usize);
                woken.extend(leave(&mut turns, lane, now));
            } else {
                // Mostly the woken come for their place; sometimes someone else asks.
                let object = if !woken.is_empty() && next(4) != 0 {
                    woken.swap_remove(next(woken.len() as u64) as usize)
                } else {
                    next(20) as u32
                };
                if running.iter().any(|(o, _)| *o == object) {
                    continue;
                }
                let (entered, wake) = enter(&mut turns, lane, object, now);
                woken.extend(wake);
                if entered {
                    running.push((object, lane));
                }
            }
            for lane in [Lane::Releasing, Lane::Others] {
                let here = running.iter().filter(|(_, l)| *l == lane).count();
                assert!(here <= 3, "step {step}: {here} running in {lane:?}");
            }
        }
        // Everyone leaves; whoever waits is woken and comes.
        let end = start + Duration::from_secs(3600);
        for (_, lane) in running.drain(..) {
            woken.extend(leave(&mut turns, lane, end));
        }
        let mut rounds = 0;
        while let Some(object) = woken.pop() {
            rounds += 1;
            assert!(rounds < 1000);
            for lane in [Lane::Releasing, Lane::Others] {
                let mut wake = Vec::new();
                if turns.lanes[lane.index()].reserved.contains_key(&object)
                    && turns.enter(lane, &object, end, ALWAYS, &mut wake)
                {
                    woken.extend(wake);
                    woken.extend(leave(&mut turns, lane, end));
                    break;
                }
                woken.extend(wake);
            }
        }
        assert_eq!(turns.waiting(Lane::Releasing), 0);
        assert_eq!(turns.waiting(Lane::Others), 0);
        assert_eq!(turns.lanes[0].taken + turns.lanes[1].taken, 0);
    }
}

#[cfg(test)]
mod storm {
    use super::*;
    use futures::StreamExt;
    use kube::runtime::{reflector, watcher};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_of_reconciles_never_holds_more_turns_than_the_lanes_allow() {
        const OBJECTS: usize = 2000;
        const CAPACITY: usize = 16;
        let (store, mut writer) = reflector::store::<VolumeAttachment>();
        let objects: Vec<VolumeAttachment> = (0..OBJECTS)
            .map(|i| {
                let mut a = VolumeAttachment::new(
                    &format!("a{i}"),
                    serde_json::from_value(serde_json::json!({
                        "volumeName": "v", "nodeName": "n"
                    }))
                    .unwrap(),
                );
                a.metadata.uid = Some(format!("u{i}"));
                a
            })
            .collect();
        for object in &objects {
            writer.apply_watcher_event(&watcher::Event::Apply(object.clone()));
        }
        let (lanes, mut woken) = Lanes::new(CAPACITY, store);
        let lanes = Arc::new(lanes);
        let notify: Arc<HashMap<String, Notify>> = Arc::new(
            objects
                .iter()
                .map(|a| (a.metadata.name.clone().unwrap(), Notify::new()))
                .collect(),
        );
        tokio::spawn({
            let notify = notify.clone();
            async move {
                while let Some(object) = woken.next().await {
                    notify[&object.name].notify_one();
                }
            }
        });
        let running: Arc<[AtomicUsize; 2]> = Arc::new(Default::default());
        let most: Arc<[AtomicUsize; 2]> = Arc::new(Default::default());
        let tasks: Vec<_> = objects
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let (lanes, notify, running, most) =
                    (lanes.clone(), notify.clone(), running.clone(), most.clone());
                let object = ObjectRef::from_obj(a);
                tokio::spawn(async move {
                    let lane = if i % 3 == 0 {
                        Lane::Releasing
                    } else {
                        Lane::Others
                    };
                    loop {
                        if let Some(turn) = lanes.enter(lane, &object) {
                            let now = running[lane.index()].fetch_add(1, Ordering::SeqCst) + 1;
                            most[lane.index()].fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_micros(200)).await;
                            running[lane.index()].fetch_sub(1, Ordering::SeqCst);
                            drop(turn);
                            return;
                        }
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            notify[&object.name].notified(),
                        )
                        .await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        for lane in [Lane::Releasing, Lane::Others] {
            let most = most[lane.index()].load(Ordering::SeqCst);
            assert!(most <= CAPACITY, "{most} turns at once in {lane:?}");
            assert!(most > CAPACITY / 2, "only {most} turns at once in {lane:?}");
        }
    }
}
