//! The daemon's exports as one QMP connection knows them: listed once, then kept up to date, and
//! indexed so that a call's question costs what the volume has, not what the daemon serves.

use super::names::{block_node_name, parse_export_id};
use crate::driver::Connections;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One entry of `query-block-exports`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub(super) struct ExportInfo {
    pub id: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
    #[serde(rename = "shutting-down")]
    pub shutting_down: bool,
}

/// The exports, by id, by block node, and by the volume handle their id names (for the exports
/// this driver made).
#[derive(Debug, Default)]
pub(super) struct Exports {
    by_id: HashMap<String, ExportInfo>,
    by_block_node: HashMap<String, BTreeSet<String>>,
    by_handle: HashMap<String, BTreeSet<String>>,
}

impl Exports {
    pub fn listed(exports: Vec<ExportInfo>) -> Self {
        let mut indexed = Self::default();
        for export in exports {
            indexed.insert(export);
        }
        indexed
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn get(&self, id: &str) -> Option<&ExportInfo> {
        self.by_id.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// Whether any export serves the block node.
    pub fn serve(&self, block_node: &str) -> bool {
        self.by_block_node
            .get(block_node)
            .is_some_and(|ids| !ids.is_empty())
    }

    /// Adds the export, or replaces the one of the same id.
    pub fn insert(&mut self, export: ExportInfo) {
        self.remove(&export.id);
        self.by_block_node
            .entry(export.node_name.clone())
            .or_default()
            .insert(export.id.clone());
        if let Some((handle, _)) = parse_export_id(&export.id) {
            self.by_handle
                .entry(handle.to_owned())
                .or_default()
                .insert(export.id.clone());
        }
        self.by_id.insert(export.id.clone(), export);
    }

    pub fn remove(&mut self, id: &str) {
        let Some(export) = self.by_id.remove(id) else {
            return;
        };
        remove_from(&mut self.by_block_node, &export.node_name, id);
        if let Some((handle, _)) = parse_export_id(id) {
            remove_from(&mut self.by_handle, handle, id);
        }
    }

    pub fn mark_shutting_down(&mut self, id: &str) {
        if let Some(export) = self.by_id.get_mut(id) {
            export.shutting_down = true;
        }
    }

    /// Who holds exports of the volume: the node of each export this driver made, and the id of
    /// any other export of the volume's block node (one added by hand), which serves the disk just
    /// as well.
    pub fn holders_of(&self, handle: &str) -> Vec<String> {
        let connections = self.connections_of(handle);
        let by_hand = connections
            .unattributed
            .into_iter()
            .map(|id| format!("export {id}"));
        connections.nodes.into_iter().chain(by_hand).collect()
    }

    /// Where the volume is connected: the node of each export this driver made for it, and,
    /// unattributed, any other export of its block node (another name for the same disk, which
    /// may serve any node).
    pub fn connections_of(&self, handle: &str) -> Connections {
        let mut connections = Connections::default();
        for id in self.by_handle.get(handle).into_iter().flatten() {
            if let Some((_, node)) = parse_export_id(id) {
                connections.nodes.insert(node.to_owned());
            }
        }
        for id in self
            .by_block_node
            .get(&block_node_name(handle))
            .into_iter()
            .flatten()
        {
            // Long handles share hashed block-node names now and then: only an export made for
            // this very handle is attributed to it.
            if parse_export_id(id).is_none_or(|(of, _)| of != handle) {
                connections.unattributed.insert(id.clone());
            }
        }
        connections
    }

    /// [`Self::connections_of`] for each of `handles`.
    pub fn connections_of_each(&self, handles: &[String]) -> BTreeMap<String, Connections> {
        handles
            .iter()
            .map(|handle| (handle.clone(), self.connections_of(handle)))
            .collect()
    }
}

fn remove_from(index: &mut HashMap<String, BTreeSet<String>>, key: &str, id: &str) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::nbd::export_id;

    fn export(id: &str, node_name: &str) -> ExportInfo {
        ExportInfo {
            id: id.to_owned(),
            node_name: node_name.to_owned(),
            shutting_down: false,
        }
    }

    /// The question answered by reading every export, as the listing comes.
    fn scanned(exports: &[ExportInfo], handle: &str) -> Connections {
        let mut connections = Connections::default();
        for export in exports {
            let ours = parse_export_id(&export.id);
            if let Some((of, node)) = ours
                && of == handle
            {
                connections.nodes.insert(node.to_owned());
            }
            if export.node_name == block_node_name(handle)
                && ours.is_none_or(|(of, _)| of != handle)
            {
                connections.unattributed.insert(export.id.clone());
            }
        }
        connections
    }

    fn answers_as_scanned(exports: &Exports, listing: &[ExportInfo], handles: &[&str]) {
        for handle in handles {
            assert_eq!(
                exports.connections_of(handle),
                scanned(listing, handle),
                "{handle}"
            );
        }
    }

    #[test]
    fn the_index_answers_as_a_scan_of_the_listing_does() {
        let long_a = "a".repeat(40);
        let long_b = "b".repeat(40);
        let listing = vec![
            export(&export_id("vol1", "node-a"), &block_node_name("vol1")),
            export(&export_id("vol1", "node-b"), &block_node_name("vol1")),
            // Added by hand: the same disk under another name.
            export("by-hand", &block_node_name("vol1")),
            // Our naming, another block node: attributed to the handle it names.
            export(&export_id("vol2", "node-a"), "elsewhere"),
            export(&export_id(&long_a, "node-c"), &block_node_name(&long_a)),
            // A hashed name shared by another handle's block node (as a collision would be).
            export(&export_id(&long_b, "node-c"), &block_node_name(&long_a)),
            export("sd_not__a valid id", &block_node_name("vol3")),
        ];
        let mut exports = Exports::listed(listing.clone());
        let handles = [
            "vol1",
            "vol2",
            "vol3",
            "vol4",
            long_a.as_str(),
            long_b.as_str(),
        ];
        answers_as_scanned(&exports, &listing, &handles);
        assert_eq!(exports.len(), listing.len());
        assert!(exports.serve(&block_node_name("vol1")));
        assert!(!exports.serve(&block_node_name("vol4")));

        // Kept up to date: removals, replacements and additions answer as a new listing would.
        exports.remove("by-hand");
        exports.remove(&export_id("vol2", "node-a"));
        exports.insert(export(
            &export_id("vol3", "node-b"),
            &block_node_name("vol3"),
        ));
        exports.insert(export(&export_id("vol1", "node-a"), "moved"));
        let relisted: Vec<ExportInfo> = listing
            .iter()
            .filter(|e| e.id != "by-hand" && e.id != export_id("vol2", "node-a"))
            .filter(|e| e.id != export_id("vol1", "node-a"))
            .cloned()
            .chain([
                export(&export_id("vol3", "node-b"), &block_node_name("vol3")),
                export(&export_id("vol1", "node-a"), "moved"),
            ])
            .collect();
        answers_as_scanned(&exports, &relisted, &handles);
        assert_eq!(exports.len(), relisted.len());
        assert_eq!(
            exports.holders_of("vol1"),
            vec!["node-a".to_owned(), "node-b".to_owned()]
        );
        exports.remove(&export_id("vol1", "node-b"));
        exports.remove(&export_id("vol1", "node-a"));
        assert!(exports.holders_of("vol1").is_empty());
        assert!(!exports.serve(&block_node_name("vol1")));
    }
}
