//! What the core hands the shell, and the order the shell must carry it out in: a [`Ready`]
//! holds the state to make durable, the messages to send, the entries applied and the replies
//! to give. Persisting before sending is what keeps a vote or an acknowledged entry from being
//! forgotten by a crash (Raft Figure 2, §5.1; §10.2.1 for the one exception).

use super::message::{Body, ClientReply, Entry, LogRecord, Message};
use super::snapshot::SnapshotId;
use super::types::{Index, NodeId, ReplyTo, Term, DATAGRAM_OVERHEAD, MAX_DATAGRAM};

/// What must survive a crash for Raft to be safe (Figure 2's "persistent state"), plus the
/// commit index, which is kept only to apply sooner after a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub vote: Option<NodeId>,
    pub commit: Index,
}

/// The effects of the steps since the last `ready`, for the shell to carry out in order:
/// 1. persist `hard_state` and `entries` with one fsync (entries replace any log suffix from
///    `entries[0].index` on);
/// 2. send `messages` (before step 1 only when `send_before_persist`, Raft §10.2.1);
/// 3. call [`Node::advance`], then send `replies`.
#[derive(Debug, Default)]
pub struct Ready {
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    pub messages: Vec<Message>,
    /// True when no message depends on this Ready's writes: a leader whose term and vote are
    /// already durable may replicate its new entries while writing them itself.
    pub send_before_persist: bool,
    pub replies: Vec<(ReplyTo, ClientReply)>,
    /// Entries applied since the last Ready, as records of the applied log: the shell appends
    /// them to its store (after `advance`) before it serves `store_reads`.
    pub applied: Vec<LogRecord>,
    /// Pages of entries this core no longer holds in memory: the shell answers them from its
    /// store, after appending `applied`.
    pub store_reads: Vec<StoreRead>,
    /// Leader: snapshot chunks for the shell to read from its store and send.
    pub chunk_reads: Vec<ChunkRead>,
    /// Follower: snapshot chunks received, for the shell to stage; it then calls
    /// [`Node::snapshot_chunk_stored`] or, with the whole snapshot verified and durable,
    /// [`Node::install_snapshot`].
    pub chunk_writes: Vec<ChunkWrite>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.replies.is_empty()
            && self.applied.is_empty()
            && self.store_reads.is_empty()
            && self.chunk_reads.is_empty()
            && self.chunk_writes.is_empty()
    }
}

/// A linearizable read whose entries the shell serves from its store: records `start..` up to
/// `read_index`, one page (see [`PAGE_BUDGET`]), answered as `ClientResult::Entries`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreRead {
    pub reply_to: ReplyTo,
    pub id: u64,
    pub start: Index,
    pub read_index: Index,
}

/// Bytes of `snapshot`'s stream `[offset, offset + len)`, to send to `to` as InstallSnapshot
/// in `term`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRead {
    pub to: NodeId,
    pub term: Term,
    pub snapshot: SnapshotId,
    pub offset: u64,
    pub len: u64,
}

impl ChunkRead {
    /// The InstallSnapshot message from `from` carrying this chunk, read as `data` (base64)
    /// with CRC-32 `crc`.
    pub fn message(&self, from: NodeId, data: String, crc: u32) -> Message {
        Message {
            cluster: 0,
            from,
            to: self.to,
            term: self.term,
            body: Body::InstallSnapshot {
                snapshot: self.snapshot,
                offset: self.offset,
                data,
                crc,
            },
            reply_at: None,
        }
    }
}

/// A received InstallSnapshot chunk, from the leader `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkWrite {
    pub from: NodeId,
    pub snapshot: SnapshotId,
    pub offset: u64,
    pub data: String,
    pub crc: u32,
}

/// A client waiting for an answer: where to send it, and the request ID to echo.
#[derive(Clone, Copy, Debug)]
pub struct Waiter {
    pub(super) reply_to: ReplyTo,
    pub(super) id: u64,
}

/// Room in a datagram for entries, after the envelope.
pub(super) const ENTRY_BUDGET: usize = MAX_DATAGRAM - DATAGRAM_OVERHEAD;
/// Encoded bytes of entries in one page of a query answer.
pub const PAGE_BUDGET: usize = ENTRY_BUDGET;
