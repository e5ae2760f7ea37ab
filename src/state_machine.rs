//! What applying a committed entry means: the replicated log itself is the state, plus a
//! bounded table of client sessions that turns retried appends into no-ops (exactly-once).
//! It is derived from the log alone, so every peer computes the same table, including after a
//! restart or a change of leader.

use crate::raft::message::{ClientId, Entry, Index, Payload, Term};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Most client sessions kept; the least recently used (by log index) is evicted beyond this,
/// deterministically on every peer. An evicted client's retry would be applied again, so the
/// bound is far above the number of clients that can be retrying at once.
pub const MAX_SESSIONS: usize = 65_536;

/// The latest applied append of one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Session {
    seq: u64,
    index: Index,
    term: Term,
}

/// The outcome of applying an entry, or of looking a request up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Noop,
    /// The append took effect at `index`; for a duplicate, `index` is the original's.
    Appended {
        index: Index,
        term: Term,
    },
    /// An older request than the client's latest: its result is no longer known.
    Superseded,
}

#[derive(Debug, Default)]
pub struct StateMachine {
    /// Every entry up to here has been applied.
    pub applied: Index,
    sessions: HashMap<ClientId, Session>,
    /// Sessions by the index of their latest append, for least-recently-used eviction.
    by_index: BTreeMap<Index, ClientId>,
    /// Committed entries that were retries of an already applied append.
    duplicates: BTreeSet<Index>,
}

impl StateMachine {
    /// Applies the next committed entry. Panics if `entry` is not the next index: applying out
    /// of order would break State Machine Safety.
    pub fn apply(&mut self, entry: &Entry) -> Applied {
        assert_eq!(entry.index, self.applied + 1, "entries must apply in order");
        self.applied = entry.index;
        let Payload::Data { client, seq, .. } = &entry.payload else {
            return Applied::Noop;
        };
        if let Some(prior) = self.lookup(*client, *seq) {
            self.duplicates.insert(entry.index);
            return prior;
        }
        if let Some(old) = self.sessions.insert(
            *client,
            Session {
                seq: *seq,
                index: entry.index,
                term: entry.term,
            },
        ) {
            self.by_index.remove(&old.index);
        }
        self.by_index.insert(entry.index, *client);
        while self.sessions.len() > MAX_SESSIONS {
            let (_, oldest) = self.by_index.pop_first().expect("sessions are indexed");
            self.sessions.remove(&oldest);
        }
        Applied::Appended {
            index: entry.index,
            term: entry.term,
        }
    }

    /// The result of `(client, seq)` if it was already applied.
    pub fn lookup(&self, client: ClientId, seq: u64) -> Option<Applied> {
        let s = self.sessions.get(&client)?;
        match seq.cmp(&s.seq) {
            std::cmp::Ordering::Equal => Some(Applied::Appended {
                index: s.index,
                term: s.term,
            }),
            std::cmp::Ordering::Less => Some(Applied::Superseded),
            std::cmp::Ordering::Greater => None,
        }
    }

    /// Whether the committed entry at `index` was a retry that took no effect.
    pub fn is_duplicate(&self, index: Index) -> bool {
        self.duplicates.contains(&index)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(index: Index, client: ClientId, seq: u64) -> Entry {
        Entry {
            index,
            term: 1,
            payload: Payload::Data {
                client,
                seq,
                data: format!("{client}-{seq}"),
            },
        }
    }

    #[test]
    fn a_retried_append_applies_once_and_answers_with_the_original_index() {
        let mut sm = StateMachine::default();
        assert_eq!(
            sm.apply(&data(1, 7, 1)),
            Applied::Appended { index: 1, term: 1 }
        );
        assert_eq!(
            sm.apply(&data(2, 7, 1)),
            Applied::Appended { index: 1, term: 1 }
        );
        assert!(sm.is_duplicate(2));
        assert!(!sm.is_duplicate(1));
        assert_eq!(sm.lookup(7, 0), Some(Applied::Superseded));
        assert_eq!(sm.lookup(7, 2), None);
    }

    #[test]
    fn sessions_are_bounded_by_evicting_the_least_recent() {
        let mut sm = StateMachine::default();
        for i in 1..=(MAX_SESSIONS as u64 + 10) {
            sm.apply(&data(i, i, 1));
        }
        assert_eq!(sm.session_count(), MAX_SESSIONS);
        assert_eq!(sm.lookup(1, 1), None, "oldest evicted");
        assert!(sm.lookup(MAX_SESSIONS as u64 + 10, 1).is_some());
    }
}
