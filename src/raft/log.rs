//! The in-memory Raft log: append, the AppendEntries consistency check with conflict
//! truncation (§5.3), term lookup, and which suffix still has to be made durable.

use super::message::Entry;
use super::types::{Index, Term};

/// The log after its base: the entries from `base + 1` on, the ones at or below the base
/// being compacted into a snapshot (thesis ch. 5). Invariant: `entries[i].index == base + i + 1`,
/// terms never decrease along the log, and nothing at or below `commit` is ever truncated.
#[derive(Debug, Default)]
pub struct RaftLog {
    entries: Vec<Entry>,
    /// Last index and term compacted away (0, 0 when nothing is).
    base: (Index, Term),
    /// Highest index known to be stored on a majority (§5.3). Never decreases.
    pub commit: Index,
    /// Entries up to here are durable on this node's disk.
    stable: Index,
    /// Lowest index appended or overwritten since the last `take_unstable`, if any.
    unstable_from: Option<Index>,
}

impl RaftLog {
    /// A log restored from disk: everything in it is durable.
    pub fn restore(entries: Vec<Entry>, commit: Index) -> RaftLog {
        RaftLog::restore_after((0, 0), entries, commit)
    }

    /// A log whose entries follow a compacted `base`; the base itself counts as committed.
    pub fn restore_after(base: (Index, Term), entries: Vec<Entry>, commit: Index) -> RaftLog {
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(
                e.index,
                base.0 + i as Index + 1,
                "restored log has a gap at {i}"
            );
        }
        let last = base.0 + entries.len() as Index;
        RaftLog {
            entries,
            base,
            commit: commit.min(last).max(base.0),
            stable: last,
            unstable_from: None,
        }
    }

    /// Position of `index` in `entries`; `index` must be above the base.
    fn pos(&self, index: Index) -> usize {
        (index - self.base.0 - 1) as usize
    }

    /// Last index and term compacted into a snapshot.
    pub fn base(&self) -> (Index, Term) {
        self.base
    }

    pub fn last_index(&self) -> Index {
        self.base.0 + self.entries.len() as Index
    }

    pub fn last_term(&self) -> Term {
        self.entries.last().map_or(self.base.1, |e| e.term)
    }

    /// The term of the entry at `index`; index 0 has term 0, the base its own term; None past
    /// the end or below the base (compacted).
    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.base.0 {
            return Some(self.base.1);
        }
        if index < self.base.0 {
            return (index == 0).then_some(0);
        }
        self.entries.get(self.pos(index)).map(|e| e.term)
    }

    pub fn get(&self, index: Index) -> Option<&Entry> {
        if index <= self.base.0 {
            return None;
        }
        self.entries.get(self.pos(index))
    }

    /// The entries after the base.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Entries from `start` (above the base), as many as fit `budget` encoded bytes but at
    /// least one.
    pub fn entries_from(&self, start: Index, budget: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut used = 0;
        let from = self.pos(start.max(self.base.0 + 1));
        for e in self.entries.iter().skip(from) {
            used += e.encoded_len();
            if used > budget && !out.is_empty() {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    /// Drops the entries up to `through` (which must be durable and committed): a snapshot
    /// covers them. Returns them, None if there were none: freeing thousands of entries takes
    /// time the caller may rather spend on another thread.
    pub fn compact(&mut self, through: Index) -> Option<Vec<Entry>> {
        if through <= self.base.0 {
            return None;
        }
        assert!(
            through <= self.stable && through <= self.commit,
            "compacting {through} beyond stable {} or commit {}",
            self.stable,
            self.commit
        );
        let term = self.term_at(through).expect("compacted index in log");
        let kept = self.entries.split_off(self.pos(through) + 1);
        let dropped = std::mem::replace(&mut self.entries, kept);
        self.base = (through, term);
        Some(dropped)
    }

    /// Replaces the whole log with a snapshot's base (an installed snapshot, §7): durable and
    /// committed, with nothing after it.
    pub fn reset(&mut self, base: (Index, Term)) {
        self.entries.clear();
        self.base = base;
        self.commit = self.commit.max(base.0);
        self.stable = base.0;
        self.unstable_from = None;
    }

    /// Durable last index: the leader counts itself toward a majority only up to here.
    pub fn stable_index(&self) -> Index {
        self.stable
    }

    /// §5.4.1: is a log ending at (`last_index`, `last_term`) at least as up-to-date as ours?
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }

    /// The leader appends a new entry of its own term.
    pub fn append(&mut self, entry: Entry) {
        assert_eq!(entry.index, self.last_index() + 1, "append leaves a gap");
        assert!(entry.term >= self.last_term(), "append goes back a term");
        self.mark_unstable(entry.index);
        self.entries.push(entry);
    }

    /// The follower side of AppendEntries (§5.3): if our log has `prev_term` at `prev_index`,
    /// store `entries`, truncating only at a real conflict (so a stale or duplicated request
    /// never removes anything), and return the last index known to match the leader.
    pub fn try_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
    ) -> Option<Index> {
        let (base, base_term) = self.base;
        if prev_index < base {
            // The entries up to our base are committed, so they match the leader's; check the
            // rest from the base on.
            let skip = (base - prev_index) as usize;
            if entries.len() < skip {
                return Some(prev_index + entries.len() as Index);
            }
            if entries[skip - 1].term != base_term {
                return None;
            }
            return self.try_append(base, base_term, &entries[skip..]);
        }
        if self.term_at(prev_index) != Some(prev_term) {
            return None;
        }
        for (k, e) in entries.iter().enumerate() {
            assert_eq!(
                e.index,
                prev_index + 1 + k as Index,
                "AppendEntries with a gap"
            );
            match self.term_at(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    assert!(
                        e.index > self.commit,
                        "conflict at committed index {} (commit {})",
                        e.index,
                        self.commit
                    );
                    let keep = self.pos(e.index);
                    self.entries.truncate(keep);
                    self.stable = self.stable.min(e.index - 1);
                }
                None => {}
            }
            self.mark_unstable(e.index);
            self.entries.extend_from_slice(&entries[k..]);
            break;
        }
        Some(prev_index + entries.len() as Index)
    }

    /// First index of the run of entries with the same term as `index` (fast backtracking
    /// hint); a binary search, since terms never decrease along the log.
    pub fn first_index_of_term_at(&self, index: Index) -> Index {
        self.first_index_of_term_counting(index, &mut 0)
    }

    /// [`RaftLog::first_index_of_term_at`], adding the entries it looked at to `probes`, so a
    /// test can hold it to O(log n): a follower answers every rejection with it.
    fn first_index_of_term_counting(&self, index: Index, probes: &mut u64) -> Index {
        let term = self.term_at(index).expect("index in log");
        if index <= self.base.0 {
            return index;
        }
        self.entries[..=self.pos(index)].partition_point(|e| {
            *probes += 1;
            e.term < term
        }) as Index
            + self.base.0
            + 1
    }

    /// Last index whose term is `term`, if the log has that term (terms never decrease, so
    /// binary search works).
    pub fn last_index_of_term(&self, term: Term) -> Option<Index> {
        let n = self.entries.partition_point(|e| e.term <= term);
        if n == 0 {
            return (self.base.0 > 0 && self.base.1 == term).then_some(self.base.0);
        }
        (self.entries[n - 1].term == term).then_some(self.base.0 + n as Index)
    }

    /// Raises the commit index (never lowers it) to at most the last index.
    pub fn commit_to(&mut self, index: Index) -> bool {
        let index = index.min(self.last_index());
        if index > self.commit {
            self.commit = index;
            true
        } else {
            false
        }
    }

    fn mark_unstable(&mut self, index: Index) {
        self.unstable_from = Some(self.unstable_from.map_or(index, |u| u.min(index)));
    }

    /// The entries that must still be written, from the lowest changed index on.
    pub fn take_unstable(&mut self) -> Vec<Entry> {
        match self.unstable_from.take() {
            Some(from) if from <= self.last_index() => self.entries[self.pos(from)..].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Everything handed out by `take_unstable` is now durable.
    pub fn stable_to_last(&mut self) {
        self.stable = self.last_index();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::message::Payload;

    fn e(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            payload: Payload::Noop,
        }
    }

    fn log_of(terms: &[Term]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, t)| e(i as Index + 1, *t))
            .collect();
        RaftLog::restore(entries, 0)
    }

    fn terms(log: &RaftLog) -> Vec<Term> {
        log.entries().iter().map(|e| e.term).collect()
    }

    #[test]
    fn stale_append_never_truncates() {
        // §5.3: a delayed AppendEntries carrying a prefix must not cut entries after it.
        let mut log = log_of(&[1, 1, 2, 2]);
        assert_eq!(log.try_append(1, 1, &[e(2, 1)]), Some(2));
        assert_eq!(terms(&log), vec![1, 1, 2, 2]);
        assert!(log.take_unstable().is_empty());
    }

    #[test]
    fn conflict_truncates_from_the_first_conflicting_entry() {
        let mut log = log_of(&[1, 1, 2, 2]);
        assert_eq!(log.try_append(2, 1, &[e(3, 3)]), Some(3));
        assert_eq!(terms(&log), vec![1, 1, 3]);
        assert_eq!(log.stable_index(), 2);
        assert_eq!(log.take_unstable(), vec![e(3, 3)]);
    }

    #[test]
    fn mismatch_is_refused() {
        let mut log = log_of(&[1, 1]);
        assert_eq!(log.try_append(2, 2, &[e(3, 2)]), None);
        assert_eq!(log.try_append(5, 1, &[]), None);
        assert_eq!(terms(&log), vec![1, 1]);
    }

    #[test]
    fn the_backtracking_hint_looks_at_a_logarithmic_number_of_entries() {
        // A follower a million entries into one term answers a rejection at its end: the
        // hint must not walk the term back entry by entry.
        let mut terms = vec![1; 10];
        terms.extend(std::iter::repeat_n(2, 1_000_000));
        let log = log_of(&terms);
        let mut probes = 0;
        let last = log.last_index();
        assert_eq!(log.first_index_of_term_counting(last, &mut probes), 11);
        assert!(
            probes <= 2 * 20 + 2,
            "{probes} entries looked at for 1,000,010"
        );
    }

    #[test]
    fn term_lookups_for_fast_backtracking() {
        let log = log_of(&[1, 1, 2, 2, 2, 4]);
        assert_eq!(log.first_index_of_term_at(5), 3);
        assert_eq!(log.first_index_of_term_at(2), 1);
        assert_eq!(log.first_index_of_term_at(1), 1);
        assert_eq!(log.first_index_of_term_at(6), 6);
        assert_eq!(log.first_index_of_term_at(3), 3);
        assert_eq!(log.last_index_of_term(2), Some(5));
        assert_eq!(log.last_index_of_term(3), None);
        assert_eq!(log.last_index_of_term(4), Some(6));
    }

    #[test]
    fn a_compacted_log_keeps_its_base_term_and_matches_above_it() {
        let mut log = log_of(&[1, 1, 2, 2, 3]);
        log.commit_to(4);
        let dropped = log.compact(3).expect("entries 1-3 dropped");
        assert_eq!(
            dropped.iter().map(|e| e.index).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(log.compact(3), None, "nothing left to drop");
        assert_eq!(log.base(), (3, 2));
        assert_eq!(log.term_at(3), Some(2), "the base keeps its term");
        assert_eq!(log.term_at(2), None, "compacted");
        assert_eq!(log.get(3), None);
        assert_eq!(log.get(4).map(|e| e.term), Some(2));
        assert_eq!((log.last_index(), log.last_term()), (5, 3));
        assert_eq!(log.last_index_of_term(2), Some(4));
        assert_eq!(log.first_index_of_term_at(4), 4);
        // An AppendEntries from below the base: the compacted part is committed, so it
        // matches; only the rest is checked and stored.
        assert_eq!(
            log.try_append(1, 1, &[e(2, 1), e(3, 2), e(4, 2), e(5, 3), e(6, 3)]),
            Some(6)
        );
        assert_eq!(log.last_index(), 6);
        assert_eq!(
            log.try_append(1, 1, &[e(2, 1)]),
            Some(2),
            "all below the base"
        );
        assert_eq!(
            log.try_append(2, 1, &[e(3, 9)]),
            None,
            "disagrees at the base"
        );
        assert_eq!(log.take_unstable(), vec![e(6, 3)]);
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log() {
        let mut log = log_of(&[1, 1]);
        log.reset((10, 4));
        assert_eq!((log.last_index(), log.last_term(), log.commit), (10, 4, 10));
        assert_eq!(log.stable_index(), 10);
        assert_eq!(log.try_append(10, 4, &[e(11, 4)]), Some(11));
        assert_eq!(log.take_unstable(), vec![e(11, 4)]);
    }

    #[test]
    fn up_to_date_compares_last_term_then_length() {
        let log = log_of(&[1, 2]);
        assert!(log.is_up_to_date(1, 3));
        assert!(log.is_up_to_date(2, 2));
        assert!(!log.is_up_to_date(5, 1));
        assert!(!log.is_up_to_date(1, 2));
    }
}
