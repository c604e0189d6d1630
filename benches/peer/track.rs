//! Follows one run's attachments through a watch (not by polling the apiserver) and notes when
//! each reached its goal: attached, or gone.

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What a phase waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    Attached,
    Gone,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// When the bench sent the create.
    created: Option<Instant>,
    /// When the watch first showed it attached.
    attached: Option<Instant>,
    /// When the bench sent the delete.
    deleting: Option<Instant>,
    /// When the watch showed it gone.
    gone: Option<Instant>,
    /// Whether the last watch event showed it present.
    present: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Names listed since the watch's last (re)start, to find what went while it was away.
    relisting: Option<HashSet<String>>,
    synced: bool,
}

/// How far a set of attachments got towards a goal.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// How many reached it.
    pub done: usize,
    /// Each one's time from the bench's request to the goal.
    pub latencies: Vec<Duration>,
    /// When the last one reached it.
    pub last: Option<Instant>,
}

/// The watch of one run's attachments; it stops when dropped.
pub struct Tracker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tracker {
    /// Watches the objects of `api` that `selector` selects; `attached` says whether one is
    /// attached.
    pub fn start<K>(api: Api<K>, selector: &str, attached: fn(&K) -> bool) -> Self
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let config = watcher::Config::default().labels(selector);
        let stream = watcher(api, config).default_backoff();
        let task = {
            let state = state.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let now = Instant::now();
                    let Ok(event) = event else { continue };
                    let mut state = state.lock().expect("tracker state");
                    match event {
                        watcher::Event::Init => state.relisting = Some(HashSet::new()),
                        watcher::Event::InitApply(object) => {
                            let name = object.name_any();
                            if let Some(listed) = state.relisting.as_mut() {
                                listed.insert(name.clone());
                            }
                            seen(&mut state, name, Some(attached(&object)), now);
                        }
                        watcher::Event::InitDone => {
                            let listed = state.relisting.take().unwrap_or_default();
                            let went: Vec<String> = state
                                .entries
                                .iter()
                                .filter(|(name, e)| e.present && !listed.contains(*name))
                                .map(|(name, _)| name.clone())
                                .collect();
                            for name in went {
                                seen(&mut state, name, None, now);
                            }
                            state.synced = true;
                        }
                        watcher::Event::Apply(object) => {
                            seen(&mut state, object.name_any(), Some(attached(&object)), now)
                        }
                        watcher::Event::Delete(object) => {
                            seen(&mut state, object.name_any(), None, now)
                        }
                    }
                    drop(state);
                    changed.notify_waiters();
                }
            })
        };
        Self {
            state,
            changed,
            task,
        }
    }

    /// Waits until the watch has listed what exists (at most `timeout`).
    pub async fn synced(&self, timeout: Duration) {
        let give_up = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.state.lock().expect("tracker state").synced {
                return;
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                panic!("the watch of the attachments did not sync within {timeout:?}");
            }
        }
    }

    /// Notes that the bench is about to send the create (for [`Goal::Attached`]) or the delete
    /// (for [`Goal::Gone`]) of `name`.
    pub fn requesting(&self, name: &str, goal: Goal) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("tracker state");
        let entry = state.entries.entry(name.to_owned()).or_default();
        match goal {
            Goal::Attached => entry.created = Some(now),
            Goal::Gone => entry.deleting = Some(now),
        }
    }

    /// How far `names` got towards `goal` now.
    pub fn progress(&self, names: &[String], goal: Goal) -> Progress {
        let state = self.state.lock().expect("tracker state");
        let mut progress = Progress::default();
        for name in names {
            let Some(entry) = state.entries.get(name) else {
                continue;
            };
            let (since, reached) = match goal {
                Goal::Attached => (entry.created, entry.attached),
                Goal::Gone => (entry.deleting, entry.gone),
            };
            if let (Some(since), Some(at)) = (since, reached) {
                progress.done += 1;
                progress.latencies.push(at.saturating_duration_since(since));
                progress.last = Some(progress.last.map_or(at, |last: Instant| last.max(at)));
            }
        }
        progress
    }

    /// Waits until every one of `names` reached `goal`, or until `give_up`.
    pub async fn wait(&self, names: &[String], goal: Goal, give_up: Instant) -> Progress {
        let give_up = tokio::time::Instant::from_std(give_up);
        loop {
            let notified = self.changed.notified();
            let progress = self.progress(names, goal);
            if progress.done == names.len() {
                return progress;
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                return self.progress(names, goal);
            }
        }
    }
}

/// Records what the watch said of `name`: present (attached or not), or gone.
fn seen(state: &mut State, name: String, attached: Option<bool>, now: Instant) {
    let entry = state.entries.entry(name).or_default();
    match attached {
        Some(attached) => {
            entry.present = true;
            if attached && entry.attached.is_none() {
                entry.attached = Some(now);
            }
        }
        None => {
            entry.present = false;
            if entry.gone.is_none() {
                entry.gone = Some(now);
            }
        }
    }
}
