//! The names of a cache's objects under one key of theirs (an attachment's Volume, a Volume's
//! backend volume), kept from the same watch events as the cache: a reconcile that needs the
//! attachments of one Volume reads a handful of objects, not every object of the cache. In a
//! storm of N attachments, a scan per reconcile is N² object tests: at 5,000 the scans were a
//! third of the operator's CPU.
//!
//! The index takes each event in after the store did (the watch's next step), so for a moment
//! the store may hold an object the index does not name yet, as a cache may lag the apiserver:
//! a reader that must miss nothing waits for the cache's progress ([`super::CacheProgress`]),
//! which is recorded after the index took the event in. Every lookup reads the objects from the
//! store and tests them again, so a key the index has not moved yet returns nothing wrong.
//!
//! A re-list keeps what the index named until it ends, adding what it lists, then drops what it
//! did not list: meanwhile it names a superset of the store's objects under each key.

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// The names of the objects of kind `K` under each key `key_of` gives (objects it gives none are
/// under none).
pub struct Index<K> {
    key_of: fn(&K) -> Option<String>,
    state: Arc<RwLock<State>>,
}

impl<K> Clone for Index<K> {
    fn clone(&self) -> Self {
        Self {
            key_of: self.key_of,
            state: self.state.clone(),
        }
    }
}

#[derive(Default)]
struct State {
    names: HashMap<String, BTreeSet<String>>,
    key_of_name: HashMap<String, String>,
    /// During a re-list: the names listed so far.
    relisted: Option<HashSet<String>>,
}

impl State {
    fn put(&mut self, name: &str, key: Option<String>) {
        if self.key_of_name.get(name) == key.as_ref() {
            return;
        }
        self.remove(name);
        if let Some(key) = key {
            self.names
                .entry(key.clone())
                .or_default()
                .insert(name.to_owned());
            self.key_of_name.insert(name.to_owned(), key);
        }
    }

    fn remove(&mut self, name: &str) {
        let Some(key) = self.key_of_name.remove(name) else {
            return;
        };
        if let Some(names) = self.names.get_mut(&key) {
            names.remove(name);
            if names.is_empty() {
                self.names.remove(&key);
            }
        }
    }
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    pub fn new(key_of: fn(&K) -> Option<String>) -> Self {
        Self {
            key_of,
            state: Arc::default(),
        }
    }

    /// Called with each event of the watch once the store has taken it in.
    pub fn taken_in(&self, event: &watcher::Event<K>) {
        let mut state = self.state.write().expect("the index's lock");
        match event {
            watcher::Event::Apply(object) => {
                if let Some(name) = &object.meta().name {
                    state.put(name, (self.key_of)(object));
                }
            }
            watcher::Event::Delete(object) => {
                if let Some(name) = &object.meta().name {
                    state.remove(name);
                }
            }
            watcher::Event::Init => state.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(object) => {
                if let Some(name) = &object.meta().name {
                    state.put(name, (self.key_of)(object));
                    if let Some(relisted) = state.relisted.as_mut() {
                        relisted.insert(name.clone());
                    }
                }
            }
            watcher::Event::InitDone => {
                if let Some(relisted) = state.relisted.take() {
                    let gone: Vec<String> = state
                        .key_of_name
                        .keys()
                        .filter(|name| !relisted.contains(*name))
                        .cloned()
                        .collect();
                    for name in gone {
                        state.remove(&name);
                    }
                }
            }
        }
    }

    /// The objects of `store` under `key` that `keep` keeps.
    pub fn get(&self, store: &Store<K>, key: &str, keep: impl Fn(&K) -> bool) -> Vec<Arc<K>> {
        self.get_each(store, [key], keep)
    }

    /// The objects of `store` under any of `keys` that `keep` keeps.
    pub fn get_each<'k>(
        &self,
        store: &Store<K>,
        keys: impl IntoIterator<Item = &'k str>,
        keep: impl Fn(&K) -> bool,
    ) -> Vec<Arc<K>> {
        let names: Vec<String> = {
            let state = self.state.read().expect("the index's lock");
            keys.into_iter()
                .filter_map(|key| state.names.get(key))
                .flatten()
                .cloned()
                .collect()
        };
        names
            .iter()
            .filter_map(|name| store.get(&ObjectRef::new(name)))
            .filter(|object| keep(object))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VolumeAttachment;
    use kube::runtime::reflector;
    use serde_json::json;

    fn attachment(name: &str, volume: &str) -> VolumeAttachment {
        let spec = serde_json::from_value(json!({ "volumeName": volume, "nodeName": "node-a" }))
            .expect("an attachment spec");
        VolumeAttachment::new(name, spec)
    }

    fn by_volume() -> Index<VolumeAttachment> {
        Index::new(|a: &VolumeAttachment| Some(a.spec.volume_name.clone()))
    }

    fn names(found: Vec<Arc<VolumeAttachment>>) -> Vec<String> {
        let mut names: Vec<String> = found
            .iter()
            .map(|a| a.meta().name.clone().unwrap())
            .collect();
        names.sort();
        names
    }

    /// What the watch delivers goes to the store, then to the index, as the operator's watch does.
    fn deliver(
        writer: &mut reflector::store::Writer<VolumeAttachment>,
        index: &Index<VolumeAttachment>,
        events: impl IntoIterator<Item = watcher::Event<VolumeAttachment>>,
    ) {
        for event in events {
            writer.apply_watcher_event(&event);
            index.taken_in(&event);
        }
    }

    fn applied(name: &str, volume: &str) -> watcher::Event<VolumeAttachment> {
        watcher::Event::Apply(attachment(name, volume))
    }

    #[test]
    fn an_object_is_found_under_its_key_until_it_goes_or_moves() {
        let (store, mut writer) = reflector::store::<VolumeAttachment>();
        let index = by_volume();
        deliver(
            &mut writer,
            &index,
            [
                watcher::Event::InitDone,
                applied("a", "v1"),
                applied("b", "v1"),
                applied("c", "v2"),
            ],
        );
        assert_eq!(names(index.get(&store, "v1", |_| true)), ["a", "b"]);
        assert_eq!(names(index.get(&store, "v2", |_| true)), ["c"]);
        assert_eq!(
            names(index.get_each(&store, ["v1", "v2"], |_| true)),
            ["a", "b", "c"]
        );

        deliver(
            &mut writer,
            &index,
            [
                applied("b", "v2"),
                watcher::Event::Delete(attachment("a", "v1")),
            ],
        );
        assert!(index.get(&store, "v1", |_| true).is_empty());
        assert_eq!(names(index.get(&store, "v2", |_| true)), ["b", "c"]);
        assert_eq!(
            names(index.get(&store, "v2", |a| a.meta().name.as_deref() == Some("c"))),
            ["c"]
        );
    }

    /// A re-list drops what it did not list once it ends, and until then finds both what the
    /// store held before and what it listed.
    #[test]
    fn a_relist_drops_what_it_did_not_list_once_it_ends() {
        let (store, mut writer) = reflector::store::<VolumeAttachment>();
        let index = by_volume();
        deliver(
            &mut writer,
            &index,
            [
                watcher::Event::InitDone,
                applied("kept", "v1"),
                applied("gone", "v1"),
                watcher::Event::Init,
                watcher::Event::InitApply(attachment("kept", "v1")),
                watcher::Event::InitApply(attachment("new", "v1")),
            ],
        );
        // The store still holds what it held before the list: both are found.
        assert_eq!(names(index.get(&store, "v1", |_| true)), ["gone", "kept"]);
        deliver(&mut writer, &index, [watcher::Event::InitDone]);
        assert_eq!(names(index.get(&store, "v1", |_| true)), ["kept", "new"]);
        assert_eq!(index.state.read().unwrap().key_of_name.len(), 2);
    }
}
