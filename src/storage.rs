//! Durable hard state and log for one peer (stub; see the storage commit).
use crate::raft::{Entry, HardState, NodeId};
use std::path::Path;

pub struct Storage {}

impl Storage {
    /// Opens (creating if missing) `dir`, locks it, checks it belongs to `node_id`, replays it.
    pub fn open(_dir: &Path, _node_id: NodeId) -> Result<(Storage, HardState, Vec<Entry>), String> {
        unimplemented!()
    }
    /// Writes `hard_state` and `entries` (replacing any suffix from `entries[0].index`), one fsync.
    pub fn persist(
        &mut self,
        _hard_state: Option<&HardState>,
        _entries: &[Entry],
    ) -> Result<(), String> {
        unimplemented!()
    }
}
