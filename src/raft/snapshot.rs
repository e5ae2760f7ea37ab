//! Snapshots (thesis ch. 5): what one holds, how it is named on the wire, and the leader's
//! progress in streaming one to a follower in datagram-sized chunks.
//!
//! The state machine is the applied log itself, which the shell keeps on disk (the store), so a
//! snapshot at index `i` is "the store's records up to `i`" plus the small state beside them:
//! the client-session table, the configuration in force, and `i`'s term. Streamed, it is one
//! byte sequence: the store's record bytes `[0, records_len)`, then the meta file's bytes
//! `[0, meta_len)`. The core only counts offsets; the shell reads and writes the bytes.

use super::membership::Membership;
use super::types::{ClientId, Index, NodeId, Term};
use super::users::UserRecord;
use serde::{Deserialize, Serialize};

/// Bytes of snapshot stream per InstallSnapshot chunk: base64 makes them 4/3 as many, which
/// still fits a datagram with its envelope.
pub const CHUNK_BYTES: u64 = 40_000;

/// Names one snapshot and lets a receiver verify what it was streamed: equal IDs mean equal
/// bytes. Records are a prefix-stable stream (committed entries never change), so a receiver
/// may keep received record bytes when the snapshot it is sent changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId {
    /// Last included index and its term (§7).
    pub index: Index,
    pub term: Term,
    /// Length and CRC-32 of the store's record bytes up to and including `index`.
    pub records_len: u64,
    pub records_crc: u32,
    /// Length and CRC-32 of the meta file ([`SnapshotMeta`] as JSON).
    pub meta_len: u64,
    pub meta_crc: u32,
}

impl SnapshotId {
    /// Bytes in the whole stream: records, then meta.
    pub fn total_len(&self) -> u64 {
        // Saturating: an ID off the wire may claim any lengths (receivers check them).
        self.records_len.saturating_add(self.meta_len)
    }
}

/// One client session as a snapshot keeps it (see `state_machine::StateMachine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client: ClientId,
    pub seq: u64,
    pub index: Index,
    pub term: Term,
    pub data_hash: u64,
}

/// The state a snapshot holds besides the records: what the core needs to resume at `index`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub index: Index,
    pub term: Term,
    /// The configuration in force at `index` (the latest one at or before it), and the index
    /// and term of the entry that made it (0, 0: the bootstrap configuration).
    pub membership: Membership,
    #[serde(default)]
    pub config_at: (Index, Term),
    /// Servers removed from the cluster up to `index` (members of an earlier configuration,
    /// not of `membership`): their IDs come back only by an explicit rejoin.
    #[serde(default)]
    pub removed: Vec<NodeId>,
    /// Client sessions, least recently used first.
    pub sessions: Vec<SessionRecord>,
    /// Users and their roles, by name (never a key: see [`super::users`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserRecord>,
}

/// The meta file of a snapshot, as written to disk and streamed after the records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub state: SnapshotState,
    /// The store's record bytes covered, and their CRC-32, so a restart can cut the store
    /// back to exactly the snapshot and a receiver can check the records it was streamed.
    pub records_len: u64,
    pub records_crc: u32,
}

/// Chunks of one snapshot the leader has in flight to a follower at once.
pub const CHUNK_WINDOW: u64 = 16;

/// The leader's progress in streaming one snapshot to one follower (etcd's StateSnapshot).
/// The follower takes chunks only in order and answers each with the bytes it holds, so a lost
/// chunk shows as an answer that does not move: the leader goes back to it once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSend {
    pub id: SnapshotId,
    /// The follower holds the stream's bytes `[0, acked)`. Never decreases for one snapshot.
    pub acked: u64,
    /// Offset of the next chunk to send.
    pub next: u64,
    /// Ticks since `acked` last moved.
    pub stall_ticks: u64,
    /// What the latest answer said the follower holds: below `acked` when a restart cost it
    /// staged bytes it had not synced (or when the answer is a late one).
    last_have: u64,
    /// The offset last gone back to: the answers to chunks sent before that go-back say the
    /// same thing again and must not cause another.
    went_back_to: Option<u64>,
}

impl SnapshotSend {
    pub fn new(id: SnapshotId) -> SnapshotSend {
        SnapshotSend {
            id,
            acked: 0,
            next: 0,
            stall_ticks: 0,
            last_have: 0,
            went_back_to: None,
        }
    }

    /// The chunks (offset, length) to send now, within the window past `acked`; marks them sent.
    pub fn to_send(&mut self) -> Vec<(u64, u64)> {
        let total = self.id.total_len();
        let mut out = Vec::new();
        while self.next < total && self.next < self.acked + CHUNK_WINDOW * CHUNK_BYTES {
            let len = CHUNK_BYTES.min(total - self.next);
            out.push((self.next, len));
            self.next += len;
        }
        out
    }

    /// The follower holds `[0, have)`, short of the whole stream: a follower holding all of it
    /// answers that it is done, so a larger `have` is not a follower's and is ignored (it would
    /// stop the stream for good).
    pub fn acknowledge(&mut self, have: u64) {
        if have >= self.id.total_len() {
            return;
        }
        self.last_have = have;
        if have > self.acked {
            self.acked = have;
            self.next = self.next.max(have);
            self.stall_ticks = 0;
        } else if have == self.acked && have < self.next && self.went_back_to != Some(have) {
            self.next = have;
            self.went_back_to = Some(have);
        }
    }

    /// One tick without news: after `limit` of them, send again from what the follower last
    /// said it holds (which a restart may have set back).
    pub fn tick(&mut self, limit: u64) {
        self.stall_ticks += 1;
        if self.stall_ticks >= limit {
            self.stall_ticks = 0;
            self.acked = self.last_have;
            self.next = self.acked;
            self.went_back_to = None;
        }
    }

    /// A newer snapshot replaces this one mid-stream. Records are a prefix-stable stream, so
    /// the follower keeps the record bytes it holds; the meta part starts over.
    pub fn switch_to(&mut self, id: SnapshotId) {
        let keep = self.acked.min(self.id.records_len).min(id.records_len);
        *self = SnapshotSend::new(id);
        self.acked = keep;
        self.last_have = keep;
        self.next = keep;
    }
}

/// A follower's view of the snapshot streams sent to it: the newest snapshot a leader of the
/// current term has sent. A leader streams ever newer snapshots within its term, so a chunk of
/// an older one in the same term is a late or duplicated datagram of a stream it gave up: it
/// must not reach the staging, which would start over and throw away the newer stream's bytes.
/// A leader of a later term may stream an older snapshot (it had taken fewer): that is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotReceive {
    term: Term,
    newest: Option<SnapshotId>,
}

impl SnapshotReceive {
    /// Whether a chunk of `id`, sent in `term` (our current term), is to be staged; notes it.
    pub fn admits(&mut self, term: Term, id: &SnapshotId) -> bool {
        if term != self.term {
            if term < self.term {
                return false;
            }
            *self = SnapshotReceive { term, newest: None };
        }
        match self.newest {
            Some(newest) if id.index < newest.index => false,
            _ => {
                self.newest = Some(*id);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(total: u64) -> SnapshotId {
        SnapshotId {
            index: 10,
            term: 2,
            records_len: total - 100,
            meta_len: 100,
            ..SnapshotId::default()
        }
    }

    #[test]
    fn an_answer_claiming_the_whole_stream_without_done_is_ignored() {
        let mut s = SnapshotSend::new(id(100 * CHUNK_BYTES));
        s.to_send();
        for have in [100 * CHUNK_BYTES, u64::MAX] {
            s.acknowledge(have);
            for _ in 0..10 {
                s.tick(10);
            }
            assert_eq!((s.acked, s.next), (0, 0));
            assert!(!s.to_send().is_empty(), "still streaming");
        }
    }

    #[test]
    fn a_window_of_chunks_then_one_per_acknowledged_chunk() {
        let mut s = SnapshotSend::new(id(100 * CHUNK_BYTES + 7));
        let first = s.to_send();
        assert_eq!(first.len() as u64, CHUNK_WINDOW);
        assert_eq!(first[1], (CHUNK_BYTES, CHUNK_BYTES));
        assert!(s.to_send().is_empty(), "window full");
        s.acknowledge(CHUNK_BYTES);
        assert_eq!(s.to_send(), vec![(CHUNK_WINDOW * CHUNK_BYTES, CHUNK_BYTES)]);
    }

    #[test]
    fn the_last_chunk_is_short_and_nothing_goes_past_the_end() {
        let mut s = SnapshotSend::new(id(CHUNK_BYTES + 7));
        assert_eq!(s.to_send(), vec![(0, CHUNK_BYTES), (CHUNK_BYTES, 7)]);
        assert!(s.to_send().is_empty());
    }

    #[test]
    fn a_lost_chunk_is_sent_again_once_not_once_per_later_answer() {
        let mut s = SnapshotSend::new(id(100 * CHUNK_BYTES));
        s.to_send();
        s.acknowledge(CHUNK_BYTES);
        // Chunk 1 is lost: the answers to chunks 2, 3, ... all say "I hold one chunk".
        s.acknowledge(CHUNK_BYTES);
        assert_eq!(s.next, CHUNK_BYTES, "gone back to the lost chunk");
        let resent = s.to_send();
        assert_eq!(resent[0], (CHUNK_BYTES, CHUNK_BYTES));
        s.acknowledge(CHUNK_BYTES);
        s.acknowledge(CHUNK_BYTES);
        assert!(
            s.to_send().is_empty(),
            "no second go-back for the same loss"
        );
    }

    #[test]
    fn a_stalled_stream_starts_again_from_what_the_follower_holds() {
        let mut s = SnapshotSend::new(id(100 * CHUNK_BYTES));
        s.to_send();
        s.acknowledge(3 * CHUNK_BYTES);
        for _ in 0..5 {
            s.tick(5);
        }
        assert_eq!(s.to_send()[0], (3 * CHUNK_BYTES, CHUNK_BYTES));
    }

    #[test]
    fn a_follower_that_lost_staged_bytes_in_a_restart_is_sent_them_again() {
        // It held 5 chunks, restarted, and kept only 3 (the rest was never synced): it drops
        // every chunk after that and keeps saying so.
        let mut s = SnapshotSend::new(id(100 * CHUNK_BYTES));
        s.to_send();
        s.acknowledge(5 * CHUNK_BYTES);
        s.to_send();
        for _ in 0..3 {
            s.acknowledge(3 * CHUNK_BYTES);
        }
        for _ in 0..5 {
            s.tick(5);
        }
        assert_eq!(s.to_send()[0], (3 * CHUNK_BYTES, CHUNK_BYTES));
    }

    #[test]
    fn a_newer_snapshot_keeps_the_records_the_follower_holds() {
        let mut s = SnapshotSend::new(id(10 * CHUNK_BYTES));
        s.to_send();
        s.acknowledge(10 * CHUNK_BYTES - 50); // into the meta part
        let newer = id(20 * CHUNK_BYTES);
        s.switch_to(newer);
        assert_eq!(s.acked, 10 * CHUNK_BYTES - 100, "meta bytes start over");
        assert_eq!(s.id, newer);
    }

    #[test]
    fn a_chunk_of_an_older_stream_in_the_same_term_is_not_staged() {
        let id = |index| SnapshotId {
            index,
            term: 1,
            records_len: index * 100,
            meta_len: 10,
            ..SnapshotId::default()
        };
        let mut r = SnapshotReceive::default();
        assert!(r.admits(2, &id(10)));
        assert!(r.admits(2, &id(20)), "a newer stream replaces it");
        assert!(r.admits(2, &id(20)), "and goes on");
        assert!(!r.admits(2, &id(10)), "a late chunk of the older one");
        assert!(!r.admits(1, &id(30)), "an older term");
        assert!(
            r.admits(3, &id(10)),
            "a new leader may send an older snapshot"
        );
    }
}
