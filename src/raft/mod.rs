//! The Raft protocol as a pure state machine: no sockets, threads, clocks, files or global
//! randomness, so a test can run a whole cluster in one process, deterministically.
//!
//! - Roles (§5.1): follower, pre-candidate (thesis §9.6), candidate, leader; one step function
//!   each in [`node`]. Term handling comes first for every message: a newer term makes us a
//!   follower, an older one is answered with our term or dropped.
//! - Persistent state (Figure 2): current term, vote and the log. [`Ready`] hands them to the
//!   shell, which makes them durable before sending any message that depends on them.
//! - Replication (§5.3) in [`log`] and [`progress`]: consistency check, truncation only on real
//!   conflicts, fast backtracking hints, pipelined AppendEntries with a bounded window.
//! - Commitment (§5.4.2): only entries of the leader's own term are committed by counting.
//! - Reads (thesis §6.4): ReadIndex, confirmed by a majority round of heartbeats.
//! - Leadership transfer (thesis §3.10) in [`transfer`]: catch the target up, TimeoutNow.
//! - Membership (thesis ch. 4) in [`membership`]: one server at a time, configurations in the
//!   log, in force once appended; learners count in no quorum. The leader refuses a change
//!   that would leave fewer than a majority of the new voters heard from ([`guard`]).
//! - Snapshots (thesis ch. 5) in [`snapshot`]: the shell keeps the applied log on disk; the
//!   core compacts its log once a snapshot is durable and streams snapshots in chunks.
//! - Time enters as ticks; randomness from a seed in [`Config`].

pub mod backup_state;
pub mod configurations;
pub mod guard;
pub mod log;
pub mod membership;
pub mod message;
pub mod node;
pub mod progress;
pub mod ready;
pub mod rng;
pub mod snapshot;
pub mod state_machine;
pub mod transfer;
pub mod types;
pub mod users;

pub use membership::{ConfChange, Member, MemberRole, Membership};
pub use message::*;
pub use node::{Config, Node};
pub use ready::{ChunkRead, ChunkWrite, HardState, Ready, StoreRead, PAGE_BUDGET};
pub use snapshot::{SessionRecord, SnapshotId, SnapshotMeta, SnapshotState, CHUNK_BYTES};
pub use state_machine::record_of;
pub use types::*;
pub use users::{UserChange, UserInfo, UserOp, UserRecord, UserRole};
