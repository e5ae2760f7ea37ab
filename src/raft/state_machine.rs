//! What applying a committed entry means: the replicated log itself is the state, plus a
//! bounded table of client sessions that turns retried appends into no-ops (exactly-once),
//! and the users and their roles ([`super::users`]).
//! It is derived from the log alone, so every peer computes the same table, including after a
//! restart or a change of leader.

use super::message::{Entry, LogRecord, Payload};
use super::snapshot::{SessionRecord, SnapshotState};
use super::types::{data_hash, ClientId, Index, Term};
use super::users::{UserRecord, Users};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Most client sessions kept; the least recently used (by log index) is evicted beyond this,
/// deterministically on every peer. An evicted client's retry would be applied again, so the
/// bound is far above the number of clients that can be retrying at once.
pub const MAX_SESSIONS: usize = 65_536;

/// Most duplicate markers kept (see [`StateMachine::is_duplicate`]). A committed duplicate
/// needs two leaders to have taken the same retry, which the leader's own checks prevent, so
/// this bound is never reached in practice; it keeps a forged or buggy client from growing it.
pub const MAX_DUPLICATES: usize = 65_536;

/// The latest applied append of one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Session {
    seq: u64,
    index: Index,
    term: Term,
    /// Fingerprint of the appended data: a retry carries the same data, so a request with the
    /// same `(client, seq)` and other data is a second client that drew the same ID.
    data_hash: u64,
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
    /// Same `(client, seq)` as an applied append but other data: two clients share an ID.
    /// Never answered as the other client's entry, which would acknowledge a lost write.
    Collision,
}

#[derive(Debug, Default)]
pub struct StateMachine {
    /// Every entry up to here has been applied.
    pub applied: Index,
    sessions: HashMap<ClientId, Session>,
    /// Sessions by the index of their latest append, for least-recently-used eviction.
    by_index: BTreeMap<Index, ClientId>,
    /// Committed entries that took no effect (retries of an applied append, collisions),
    /// at most [`MAX_DUPLICATES`] of the latest.
    duplicates: BTreeSet<Index>,
    users: Users,
}

impl StateMachine {
    /// Applies the next committed entry. Panics if `entry` is not the next index: applying out
    /// of order would break State Machine Safety.
    pub fn apply(&mut self, entry: &Entry) -> Applied {
        assert_eq!(entry.index, self.applied + 1, "entries must apply in order");
        self.applied = entry.index;
        if let Payload::User(change) = &entry.payload {
            // What it did is read back from `users` by whoever waits on it.
            self.users.apply(entry.index, entry.term, change);
            return Applied::Noop;
        }
        let Payload::Data { client, seq, data } = &entry.payload else {
            return Applied::Noop;
        };
        let data_hash = data_hash(data);
        if let Some(prior) = self.lookup(*client, *seq, data_hash) {
            self.duplicates.insert(entry.index);
            if self.duplicates.len() > MAX_DUPLICATES {
                self.duplicates.pop_first();
            }
            return prior;
        }
        if let Some(old) = self.sessions.insert(
            *client,
            Session {
                seq: *seq,
                index: entry.index,
                term: entry.term,
                data_hash,
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

    /// The result of `(client, seq)` carrying data with fingerprint `data_hash`, if a request
    /// with that `(client, seq)` was already applied.
    pub fn lookup(&self, client: ClientId, seq: u64, data_hash: u64) -> Option<Applied> {
        let s = self.sessions.get(&client)?;
        match seq.cmp(&s.seq) {
            std::cmp::Ordering::Equal if data_hash != s.data_hash => Some(Applied::Collision),
            std::cmp::Ordering::Equal => Some(Applied::Appended {
                index: s.index,
                term: s.term,
            }),
            std::cmp::Ordering::Less => Some(Applied::Superseded),
            std::cmp::Ordering::Greater => None,
        }
    }

    /// Whether the committed entry at `index` took no effect (a retry, or a colliding client);
    /// only the latest [`MAX_DUPLICATES`] are remembered.
    pub fn is_duplicate(&self, index: Index) -> bool {
        self.duplicates.contains(&index)
    }

    /// The session table for a snapshot, least recently used first.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        self.by_index
            .values()
            .map(|client| {
                let s = &self.sessions[client];
                SessionRecord {
                    client: *client,
                    seq: s.seq,
                    index: s.index,
                    term: s.term,
                    data_hash: s.data_hash,
                }
            })
            .collect()
    }

    /// The state machine as a snapshot left it at `applied`. Which entries up to there took no
    /// effect is in the snapshot's records, not here.
    pub fn restore(applied: Index, sessions: &[SessionRecord]) -> StateMachine {
        let mut sm = StateMachine {
            applied,
            ..StateMachine::default()
        };
        for r in sessions {
            let session = Session {
                seq: r.seq,
                index: r.index,
                term: r.term,
                data_hash: r.data_hash,
            };
            if let Some(old) = sm.sessions.insert(r.client, session) {
                sm.by_index.remove(&old.index);
            }
            sm.by_index.insert(r.index, r.client);
        }
        sm
    }

    /// The state machine a snapshot holds: its sessions and users, applied up to its index.
    pub fn from_snapshot(state: &SnapshotState) -> StateMachine {
        let mut sm = StateMachine::restore(state.index, &state.sessions);
        sm.restore_users(&state.users);
        sm
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The users and their roles.
    pub fn users(&self) -> &Users {
        &self.users
    }

    /// Replaces the users with those a snapshot kept (after [`StateMachine::restore`]).
    pub fn restore_users(&mut self, records: &[UserRecord]) {
        self.users = Users::restore(records, self.applied);
    }
}

/// A committed entry as the applied log keeps it and a query prints it.
pub fn record_of(e: &Entry, duplicate: bool) -> LogRecord {
    let (data, kind) = match &e.payload {
        Payload::Noop => (None, Some("noop")),
        Payload::Config(_) => (None, Some("config")),
        Payload::User(_) => (None, Some("user")),
        Payload::Data { .. } if duplicate => (None, Some("duplicate")),
        Payload::Data { data, .. } => (Some(data.clone()), None),
    };
    LogRecord {
        index: e.index,
        term: e.term,
        data,
        kind: kind.map(String::from),
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
        let h = data_hash("7-1");
        assert_eq!(sm.lookup(7, 0, h), Some(Applied::Superseded));
        assert_eq!(sm.lookup(7, 2, h), None);
    }

    #[test]
    fn a_second_client_with_the_same_id_is_refused_not_acknowledged() {
        // Two clients that drew the same ID both send seq 1 with their own data: the second
        // must not be told its write is the first one's entry.
        let mut sm = StateMachine::default();
        let mut other = data(2, 7, 1);
        if let Payload::Data { data, .. } = &mut other.payload {
            *data = "someone else's write".into();
        }
        sm.apply(&data(1, 7, 1));
        assert_eq!(sm.apply(&other), Applied::Collision);
        assert!(sm.is_duplicate(2), "the colliding entry takes no effect");
        let theirs = data_hash("someone else's write");
        assert_eq!(sm.lookup(7, 1, theirs), Some(Applied::Collision));
        assert_eq!(
            sm.lookup(7, 1, data_hash("7-1")),
            Some(Applied::Appended { index: 1, term: 1 })
        );
    }

    #[test]
    fn duplicate_markers_are_bounded() {
        let mut sm = StateMachine::default();
        sm.apply(&data(1, 7, 1));
        let n = MAX_DUPLICATES as u64 + 10;
        for i in 2..=n + 1 {
            sm.apply(&data(i, 7, 1));
        }
        assert_eq!(sm.duplicates.len(), MAX_DUPLICATES);
        assert!(sm.is_duplicate(n + 1));
        assert!(!sm.is_duplicate(2), "oldest marker dropped");
    }

    #[test]
    fn a_restored_session_table_answers_retries_as_before() {
        let mut sm = StateMachine::default();
        for i in 1..=5 {
            sm.apply(&data(i, i % 3, i));
        }
        let back = StateMachine::restore(sm.applied, &sm.sessions());
        assert_eq!(back.sessions(), sm.sessions());
        for client in 0..3 {
            for seq in 0..7 {
                let h = data_hash(&format!("{client}-{seq}"));
                assert_eq!(back.lookup(client, seq, h), sm.lookup(client, seq, h));
            }
        }
    }

    #[test]
    fn sessions_are_bounded_by_evicting_the_least_recent() {
        let mut sm = StateMachine::default();
        for i in 1..=(MAX_SESSIONS as u64 + 10) {
            sm.apply(&data(i, i, 1));
        }
        assert_eq!(sm.session_count(), MAX_SESSIONS);
        assert_eq!(sm.lookup(1, 1, data_hash("1-1")), None, "oldest evicted");
        let last = MAX_SESSIONS as u64 + 10;
        assert!(sm
            .lookup(last, 1, data_hash(&format!("{last}-1")))
            .is_some());
    }
}
