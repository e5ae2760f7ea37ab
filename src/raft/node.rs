//! The Raft core: a pure state machine stepped by messages, ticks and client requests.
//! (Stub of the public API; the implementation lands in the core commit.)

use super::message::*;

/// Static parameters of one core. Durations are in ticks; the shell decides how long a tick is.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Every other voter's ID.
    pub peers: Vec<NodeId>,
    /// An election timeout is drawn uniformly from `[min, max]` ticks.
    pub election_ticks: (u64, u64),
    pub heartbeat_ticks: u64,
    /// AppendEntries in flight to one follower before the leader waits for acknowledgements.
    pub max_inflight: usize,
    /// Seed of the core's own random generator (election timeouts).
    pub seed: u64,
}

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
    pub send_before_persist: bool,
    pub replies: Vec<(ReplyTo, ClientReply)>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.replies.is_empty()
    }
}

pub struct Node {}

impl Node {
    /// A core restored from durable state (`entries` is the whole durable log, from index 1).
    pub fn new(_config: Config, _hard_state: HardState, _entries: Vec<Entry>) -> Node {
        unimplemented!()
    }
    pub fn id(&self) -> NodeId {
        unimplemented!()
    }
    /// Advances time by one tick.
    pub fn tick(&mut self) {
        unimplemented!()
    }
    /// Handles a message from a peer.
    pub fn step(&mut self, _msg: Message) {
        unimplemented!()
    }
    /// Handles a client request; the reply appears in a later `Ready`.
    pub fn request(&mut self, _reply_to: ReplyTo, _req: ClientRequest) {
        unimplemented!()
    }
    /// Takes the accumulated effects. Call [`Node::advance`] once they are carried out.
    pub fn ready(&mut self) -> Ready {
        unimplemented!()
    }
    /// The last `Ready`'s hard state and entries are durable.
    pub fn advance(&mut self) {
        unimplemented!()
    }
    pub fn status(&self) -> StatusInfo {
        unimplemented!()
    }
}
