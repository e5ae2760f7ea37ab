//! Snapshots (thesis ch. 5): what one holds, how it is named on the wire, and the leader's
//! progress in streaming one to a follower in datagram-sized chunks.
//!
//! The state machine is the applied log itself, which the shell keeps on disk (the store), so a
//! snapshot at index `i` is "the store's records up to `i`" plus the small state beside them:
//! the client-session table, the configuration in force, and `i`'s term. Streamed, it is one
//! byte sequence: the store's record bytes `[0, records_len)`, then the meta file's bytes
//! `[0, meta_len)`. The core only counts offsets; the shell reads and writes the bytes.

use super::membership::Membership;
use super::message::{ClientId, Index, Term};
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
        self.records_len + self.meta_len
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
    /// The configuration in force at `index` (the latest one at or before it).
    pub membership: Membership,
    /// Client sessions, least recently used first.
    pub sessions: Vec<SessionRecord>,
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
