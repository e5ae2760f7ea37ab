//! Every configuration in a server's log (Raft thesis §4.1): which one is in force (the
//! latest, committed or not), reverting when an uncommitted one is truncated, and what a
//! compaction or snapshot folds into the base.

use super::membership::{Member, Membership};
use super::message::{Entry, Payload};
use super::types::{Index, NodeId, Term};
use std::collections::BTreeSet;

/// Every configuration a server knows: the bootstrap one (in force before any configuration
/// entry) and one per configuration entry in its log, by index. The latest is in force (§4.1).
#[derive(Clone, Debug)]
pub struct Configurations {
    base: Membership,
    /// Index and term of the entry that made `base` (0, 0 for the bootstrap configuration);
    /// after a compaction or an installed snapshot, the latest configuration at or below it.
    base_at: (Index, Term),
    /// (index, term, configuration) of each configuration entry in the log, by index.
    entries: Vec<(Index, Term, Membership)>,
    /// IDs of members of configurations compacted away that `base` no longer has: removed
    /// servers, remembered so that a late retry of an old `AddLearner` never re-adds one
    /// (and a retried `Remove` is answered as done) after their entries are gone.
    removed: BTreeSet<NodeId>,
    /// Configuration entries up to here are folded into `base` and `removed` (a compaction or
    /// a snapshot); a late copy of one must not count again (the log may still hold some of
    /// them: it keeps trailing entries before a snapshot).
    folded: Index,
}

impl Configurations {
    /// From the bootstrap configuration and the log as restored.
    pub fn restore(base: Membership, log: &[Entry]) -> Configurations {
        Configurations::restore_after(base, (0, 0), 0, &[], log)
    }

    /// From the configuration in force at a snapshot at index `through` (made by the entry at
    /// `base_at`), the servers removed before it, and the log after it.
    pub fn restore_after(
        base: Membership,
        base_at: (Index, Term),
        through: Index,
        removed: &[NodeId],
        log: &[Entry],
    ) -> Configurations {
        let mut c = Configurations {
            base,
            base_at,
            entries: Vec::new(),
            removed: removed.iter().copied().collect(),
            folded: through,
        };
        c.appended(log);
        c
    }

    /// The configuration in force at `index` and the (index, term) of the entry that made it.
    pub fn at(&self, index: Index) -> (&Membership, (Index, Term)) {
        self.entries
            .iter()
            .rev()
            .find(|(i, _, _)| *i <= index)
            .map_or((&self.base, self.base_at), |(i, t, m)| (m, (*i, *t)))
    }

    /// The log up to `through` is compacted: the configuration in force there becomes the base.
    pub fn compact(&mut self, through: Index) {
        self.removed = self.removed_at(through).into_iter().collect();
        let (m, at) = self.at(through);
        let (m, at) = (m.clone(), at);
        self.base = m;
        self.base_at = at;
        self.entries.retain(|(i, _, _)| *i > through);
        self.folded = self.folded.max(through);
    }

    /// Servers that were members of a configuration up to `index` but are not in the one in
    /// force there: what a snapshot at `index` must remember (see `removed`).
    pub fn removed_at(&self, index: Index) -> Vec<NodeId> {
        let in_force = self.at(index).0;
        let earlier = self
            .entries
            .iter()
            .take_while(|(i, _, _)| *i <= index)
            .flat_map(|(_, _, m)| m.members.iter().map(|x| x.id));
        let ids: BTreeSet<NodeId> = self
            .removed
            .iter()
            .copied()
            .chain(self.base.members.iter().map(|x| x.id))
            .chain(earlier)
            .filter(|&id| !in_force.contains(id))
            .collect();
        ids.into_iter().collect()
    }

    /// The configuration in force: the latest in the log, committed or not.
    pub fn latest(&self) -> &Membership {
        self.entries.last().map_or(&self.base, |(_, _, m)| m)
    }

    /// Index of the latest configuration entry; 0 for the bootstrap configuration.
    pub fn latest_index(&self) -> Index {
        self.entries.last().map_or(self.base_at.0, |(i, _, _)| *i)
    }

    /// Term of the latest configuration entry (0 for the bootstrap configuration): with its
    /// index, it names the entry, even after a truncation put another at the same index.
    pub fn latest_term(&self) -> Term {
        self.entries.last().map_or(self.base_at.1, |(_, t, _)| *t)
    }

    /// The configuration in force once the log is committed up to `commit`.
    pub fn committed(&self, commit: Index) -> &Membership {
        self.at(commit).0
    }

    /// Index of the configuration entry in force once the log is committed up to `commit`
    /// (0: the bootstrap configuration).
    pub fn committed_index(&self, commit: Index) -> Index {
        self.at(commit).1 .0
    }

    /// Whether `id` is or was a member of any configuration known here.
    pub fn ever_member(&self, id: NodeId) -> bool {
        self.removed.contains(&id)
            || self.base.contains(id)
            || self.entries.iter().any(|(_, _, m)| m.contains(id))
    }

    /// The configuration entry (index, term) that removed `id`, as of `index`: the first one
    /// after the last configuration at or before `index` that lists it, when the one in force
    /// at `index` does not; (0, 0) when that entry was folded into the base (a snapshot or
    /// compaction remembers `id` as removed). None if the configuration in force at `index`
    /// lists `id`, or if `id` was never a member as far as this server knows.
    pub fn removal_at(&self, id: NodeId, index: Index) -> Option<(Index, Term)> {
        let mut removal = None;
        for (i, t, m) in self.entries.iter().rev().skip_while(|(i, _, _)| *i > index) {
            if m.contains(id) {
                return removal;
            }
            removal = Some((*i, *t));
        }
        if self.base.contains(id) {
            removal
        } else if self.removed.contains(&id) {
            Some((0, 0))
        } else {
            None
        }
    }

    /// `id` as the last configuration known here that lists it has it (address and role).
    pub fn last_listing(&self, id: NodeId) -> Option<&Member> {
        self.entries
            .iter()
            .rev()
            .find_map(|(_, _, m)| m.get(id))
            .or_else(|| self.base.get(id))
    }

    /// The removals of `id` in the log that a later configuration undid (it was added back,
    /// `Rejoin`): the (index, term) of each entry that removed it and was followed by one that
    /// lists it again.
    pub fn undone_removals(&self, id: NodeId) -> Vec<(Index, Term)> {
        let mut undone = Vec::new();
        let mut listed = self.base.contains(id);
        let mut removal = None;
        for (i, t, m) in &self.entries {
            match (listed, m.contains(id)) {
                (true, false) => removal = Some((*i, *t)),
                (false, true) => undone.extend(removal.take()),
                _ => {}
            }
            listed = m.contains(id);
        }
        undone
    }

    /// Servers that the base or a configuration entry in the log lists and the latest
    /// configuration does not, each with the index of the entry that removed it: removals
    /// not yet folded into a snapshot.
    pub fn removed_in_log(&self) -> Vec<(NodeId, Index)> {
        let latest = self.latest();
        let ids: BTreeSet<NodeId> = self
            .base
            .ids()
            .chain(self.entries.iter().flat_map(|(_, _, m)| m.ids()))
            .filter(|&id| !latest.contains(id))
            .collect();
        let at = self.latest_index();
        ids.into_iter()
            .filter_map(|id| self.removal_at(id, at).map(|(i, _)| (id, i)))
            .collect()
    }

    /// Records configuration entries among `entries`, just stored in the log. Entries that
    /// were already there (a duplicated or late AppendEntries) change nothing; a truncated
    /// suffix is dropped by [`Configurations::retain_in_log`] first, not here, so that a stale
    /// prefix of the log never hides a later configuration. Entries already folded by a
    /// compaction or snapshot are skipped.
    pub fn appended(&mut self, entries: &[Entry]) {
        for e in entries.iter().filter(|e| e.index > self.folded) {
            if let Payload::Config(m) = &e.payload {
                self.entries.retain(|(i, _, _)| *i != e.index);
                let at = self.entries.partition_point(|(i, _, _)| *i < e.index);
                self.entries.insert(at, (e.index, e.term, m.clone()));
            }
        }
    }

    /// Forgets configuration entries that are no longer in the log: `term_at` gives the log's
    /// term at an index, and an entry whose (index, term) is gone was truncated (§5.3).
    pub fn retain_in_log(&mut self, term_at: impl Fn(Index) -> Option<Term>) {
        let base = self.base_at.0;
        self.entries
            .retain(|(i, t, _)| *i <= base || term_at(*i) == Some(*t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::membership::{ConfChange, MAX_ADDRESS_LEN};
    use crate::raft::types::MAX_DATAGRAM;

    #[test]
    fn a_configuration_always_fits_one_datagram() {
        let add = |id: NodeId, address: String| ConfChange::AddLearner { id, address };
        let m = Membership::voters(&[1]);
        let long = format!("{}:1", "h".repeat(60_000));
        assert!(m.apply(&add(2, long)).unwrap_err().contains("limit"));
        // Learners with the longest addresses, until refused: every configuration accepted
        // still fits.
        let mut m = m;
        for id in 2.. {
            let address = format!("{}{id}:1", "h".repeat(MAX_ADDRESS_LEN - 8));
            match m.apply(&add(id, address)) {
                Ok(next) => m = next,
                Err(e) => {
                    assert!(e.contains("datagram"), "{e}");
                    break;
                }
            }
        }
        let entry = Entry {
            index: u64::MAX,
            term: u64::MAX,
            payload: Payload::Config(m.clone()),
        };
        let datagram = crate::raft::message::Message {
            cluster: u64::MAX,
            from: u64::MAX,
            to: u64::MAX,
            term: u64::MAX,
            body: crate::raft::message::Body::AppendEntries {
                prev_log_index: u64::MAX,
                prev_log_term: u64::MAX,
                entries: vec![entry],
                leader_commit: u64::MAX,
                read_seq: u64::MAX,
            },
            reply_at: Some("h".repeat(MAX_ADDRESS_LEN)),
        };
        let bytes = serde_json::to_vec(&datagram).unwrap();
        assert!(m.members.len() > 50, "{} members", m.members.len());
        assert!(bytes.len() <= MAX_DATAGRAM, "{} bytes", bytes.len());
    }

    #[test]
    fn the_latest_configuration_is_in_force_and_truncation_reverts_it() {
        let base = Membership::voters(&[1, 2, 3]);
        let config = |index, term, ids: &[NodeId]| Entry {
            index,
            term,
            payload: Payload::Config(Membership::voters(ids)),
        };
        let noop = |index, term| Entry {
            index,
            term,
            payload: Payload::Noop,
        };
        let mut log = vec![noop(1, 1), config(2, 1, &[1, 2, 3, 4]), noop(3, 1)];
        let mut c = Configurations::restore(base.clone(), &log);
        assert_eq!(c.latest(), &Membership::voters(&[1, 2, 3, 4]));
        assert_eq!(c.latest_index(), 2);
        assert_eq!(c.committed(1), &base);
        assert!(c.ever_member(4) && !c.ever_member(5));
        // A new leader of term 2 overwrites index 2 with another entry.
        log.truncate(1);
        log.push(noop(2, 2));
        c.retain_in_log(|i| log.get(i as usize - 1).map(|e| e.term));
        assert_eq!(c.latest(), &base);
        let more = [config(3, 2, &[1, 2]), noop(4, 2), config(5, 2, &[1, 2, 5])];
        c.appended(&more);
        assert_eq!(c.latest(), &Membership::voters(&[1, 2, 5]));
        // A duplicate of an earlier AppendEntries re-delivers the entry at 3.
        c.appended(&more[..1]);
        assert_eq!(
            c.latest_index(),
            5,
            "a duplicate must not drop later configurations"
        );
    }

    #[test]
    fn entries_stored_again_do_not_hide_a_later_configuration() {
        // A late AppendEntries carries a prefix of the log, with an older configuration.
        let config = |index, ids: &[NodeId]| Entry {
            index,
            term: 1,
            payload: Payload::Config(Membership::voters(ids)),
        };
        let log = vec![config(1, &[1, 2, 3, 4]), config(2, &[1, 2, 3])];
        let mut c = Configurations::restore(Membership::voters(&[1, 2, 3]), &log);
        c.appended(&log[..1]);
        assert_eq!(c.latest(), &Membership::voters(&[1, 2, 3]));
        assert_eq!(c.latest_index(), 2);
    }

    #[test]
    fn removals_are_found_with_the_entry_that_made_them_and_a_rejoin_undoes_one() {
        let config = |index, ids: &[NodeId]| Entry {
            index,
            term: index,
            payload: Payload::Config(Membership::voters(ids)),
        };
        // 4 joins (2), leaves (3), 5 joins (4), 4 is added back (5), 3 leaves (6).
        let log = vec![
            config(2, &[1, 2, 3, 4]),
            config(3, &[1, 2, 3]),
            config(4, &[1, 2, 3, 5]),
            config(5, &[1, 2, 3, 4, 5]),
            config(6, &[1, 2, 4, 5]),
        ];
        let c = Configurations::restore(Membership::voters(&[1, 2, 3]), &log);
        assert_eq!(c.removal_at(4, 1), None, "not yet a member");
        assert_eq!(c.removal_at(4, 2), None, "a member");
        assert_eq!(c.removal_at(4, 3), Some((3, 3)));
        assert_eq!(
            c.removal_at(4, 4),
            Some((3, 3)),
            "from the first one without it"
        );
        assert_eq!(c.removal_at(4, 5), None, "added back");
        assert_eq!(
            c.removal_at(3, 6),
            Some((6, 6)),
            "3 was in the bootstrap one"
        );
        assert_eq!(c.removal_at(5, 6), None);
        assert_eq!(c.undone_removals(4), vec![(3, 3)]);
        assert_eq!(c.undone_removals(3), Vec::<(Index, Term)>::new());
        assert_eq!(c.removed_in_log(), vec![(3, 6)]);
        // Once folded into a snapshot, a removal is no longer "in the log".
        let mut c = c;
        c.compact(6);
        assert_eq!(c.removed_in_log(), Vec::<(NodeId, Index)>::new());
        assert_eq!(c.removal_at(3, 6), Some((0, 0)), "folded into the base");
        assert_eq!(c.removal_at(4, 6), None);
    }

    #[test]
    fn removed_servers_are_remembered_across_compaction_and_snapshots() {
        let config = |index, ids: &[NodeId]| Entry {
            index,
            term: 1,
            payload: Payload::Config(Membership::voters(ids)),
        };
        // 4 joins and leaves, 5 joins; then the log is compacted past all of it.
        let log = vec![
            config(1, &[1, 2, 3, 4]),
            config(2, &[1, 2, 3]),
            config(3, &[1, 2, 3, 5]),
        ];
        let mut c = Configurations::restore(Membership::voters(&[1, 2, 3]), &log);
        assert_eq!(c.removed_at(1), Vec::<NodeId>::new());
        assert_eq!(c.removed_at(2), vec![4]);
        c.compact(3);
        assert!(c.ever_member(4) && c.ever_member(5) && !c.ever_member(6));
        assert_eq!(c.removed_at(3), vec![4]);
        // A snapshot at 3 carries it to a server that restores from it.
        let restored =
            Configurations::restore_after(c.latest().clone(), (3, 1), 3, &c.removed_at(3), &[]);
        assert!(restored.ever_member(4));
        // Added back (an explicit rejoin), 4 is a member, not a removed one.
        c.appended(&[config(4, &[1, 2, 3, 4, 5])]);
        assert_eq!(c.removed_at(4), Vec::<NodeId>::new());
        c.compact(4);
        assert_eq!(c.removed_at(4), Vec::<NodeId>::new());
        assert!(c.ever_member(4));
    }
}
