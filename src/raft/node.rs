//! The Raft core: a pure state machine stepped by messages, ticks and client requests, which
//! returns its effects as a [`Ready`]. Term handling happens once in [`Node::step`]; then one
//! function per role handles the message.

use super::log::RaftLog;
use super::membership::Configurations;
use super::message::*;
use super::progress::{Progress, ProgressState};
use super::rng::Rng;
use super::snapshot::{SnapshotId, SnapshotSend, SnapshotState, CHUNK_BYTES};
use super::transfer::{self, HeldAppend, Transfer};
use crate::state_machine::{data_hash, Applied, StateMachine};
use log::{debug, info, warn};
use std::collections::{BTreeMap, HashMap, VecDeque};

mod reconfig;
#[cfg(test)]
mod snapshot_tests;
pub use reconfig::PROMOTE_MAX_LAG;

/// See [`Node::routing_key`].
pub type RoutingKey = (Index, Term, Index, usize);

/// Static parameters of one core. Durations are in ticks; the shell decides how long a tick is.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// The bootstrap configuration, in force until the log has a configuration entry: the
    /// initial members from the peer's config file, or none for a peer that joins (§4.1).
    pub membership: Membership,
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
    reply_to: ReplyTo,
    id: u64,
}

/// A linearizable query waiting for a majority to confirm leadership (thesis §6.4).
#[derive(Clone, Debug)]
struct PendingRead {
    /// Confirmed once a majority echoes a read sequence number at least this large.
    seq: u64,
    /// The commit index when the read arrived; the answer covers the log up to here.
    read_index: Index,
    start: Index,
    waiter: Waiter,
}

/// Room in a datagram for entries, after the envelope.
const ENTRY_BUDGET: usize = MAX_DATAGRAM - DATAGRAM_OVERHEAD;
/// Encoded bytes of entries in one page of a query answer.
pub const PAGE_BUDGET: usize = ENTRY_BUDGET;

pub struct Node {
    cfg: Config,
    /// Latest term this node has seen (Figure 2). Never decreases, persisted before use.
    term: Term,
    /// Candidate this node voted for in `term` (Figure 2); at most one per term.
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    sm: StateMachine,
    rng: Rng,
    election_elapsed: u64,
    election_timeout: u64,
    heartbeat_elapsed: u64,
    /// Votes (or pre-votes) received in the current campaign: granted or refused.
    votes: BTreeMap<NodeId, bool>,
    /// Leader only: one per follower.
    progress: BTreeMap<NodeId, Progress>,
    /// Leader only: client appends already in the log but not yet applied, by (client, seq).
    pending_appends: HashMap<(ClientId, u64), Index>,
    /// Leader only: who to answer when the entry at an index is applied. One per entry, so one
    /// per `(client, seq)`: a retry replaces the earlier attempt's waiter.
    waiters: BTreeMap<Index, Waiter>,
    /// Read sequence numbers increase for the node's whole life, so no old echo can count.
    read_seq: u64,
    pending_reads: VecDeque<PendingRead>,
    /// Reads that arrived before this leader committed an entry of its own term.
    reads_before_own_commit: Vec<(Index, Waiter)>,
    /// Ready bookkeeping.
    persisted_hard_state: HardState,
    handed_hard_state: Option<HardState>,
    ready_outstanding: bool,
    /// Entries the latest snapshot compacted away, until the shell takes them to free.
    compacted: Vec<Entry>,
    replicate_now: bool,
    heartbeat_now: bool,
    msgs: Vec<Message>,
    replies: Vec<(ReplyTo, ClientReply)>,
    /// Malformed peer messages dropped so far.
    malformed: u64,
    /// A leadership transfer this node started, until a leader of a later term is known or it
    /// is abandoned (kept after stepping down, to answer whoever asked).
    transfer: Option<Transfer>,
    /// Leader only: appends that arrived during a transfer, proposed if it is abandoned.
    held_appends: Vec<HeldAppend>,
    /// Every configuration in the log, the latest in force (thesis §4.1).
    configs: Configurations,
    /// Leader only: members removed by a configuration, still sent the log until they can
    /// have learned that their removal committed: (removal index, ticks since it committed,
    /// ticks since they also acknowledged it). See `tick_leaving`.
    leaving: BTreeMap<NodeId, (Index, u64, u64)>,
    /// This node has been a member of a configuration it applied (or of the bootstrap one).
    was_member: bool,
    /// A committed configuration no longer lists this node, which was a member, and our
    /// commit index had caught up with the leader's when we saw it: it takes no further part,
    /// and the shell stops it. See `note_removal`.
    removed: bool,
    /// Counters for operators: elections started, and leadership changes seen, with the last
    /// (term, leader) seen so that one change counts once.
    elections_started: u64,
    leader_changes: u64,
    last_leader_seen: Option<(Term, NodeId)>,
    /// The latest snapshot durable on this node (taken or installed), sent to followers that
    /// need compacted entries.
    snapshot: Option<SnapshotId>,
    /// Entries up to here were applied before this core was restored or installed a snapshot,
    /// so which of them took no effect is known only to the store: reads at or below it go
    /// to the shell.
    mem_floor: Index,
    applied_records: Vec<LogRecord>,
    store_reads: Vec<StoreRead>,
    chunk_reads: Vec<ChunkRead>,
    chunk_writes: Vec<ChunkWrite>,
}

impl Node {
    /// A core restored from durable state (`entries` is the whole durable log, from index 1).
    pub fn new(cfg: Config, hard_state: HardState, entries: Vec<Entry>) -> Node {
        Node::restore(cfg, hard_state, None, (0, 0), entries)
    }

    /// A core restored from a snapshot (if any) and the durable log: `entries` follow `base`,
    /// which is at or below the snapshot's index. A log that does not reach the snapshot, or
    /// disagrees with it, is replaced by the snapshot's base (§7: an installed snapshot whose
    /// log reset was not yet durable).
    pub fn restore(
        cfg: Config,
        hard_state: HardState,
        snapshot: Option<(SnapshotState, SnapshotId)>,
        base: (Index, Term),
        entries: Vec<Entry>,
    ) -> Node {
        assert!(
            cfg.election_ticks.0 > cfg.heartbeat_ticks
                && cfg.election_ticks.0 <= cfg.election_ticks.1,
            "election timeout must exceed the heartbeat interval"
        );
        let mut log = RaftLog::restore_after(base, entries, hard_state.commit);
        let (configs, sm, mut was_member) = match &snapshot {
            None => (
                Configurations::restore(cfg.membership.clone(), log.entries()),
                StateMachine::default(),
                false,
            ),
            Some((state, _)) => {
                if log.term_at(state.index) != Some(state.term) {
                    log = RaftLog::restore_after((state.index, state.term), Vec::new(), 0);
                }
                log.commit_to(state.index);
                let from = log.entries().partition_point(|e| e.index <= state.index);
                (
                    Configurations::restore_after(
                        state.membership.clone(),
                        state.config_at,
                        state.index,
                        &state.removed,
                        &log.entries()[from..],
                    ),
                    StateMachine::restore(state.index, &state.sessions),
                    state.membership.contains(cfg.id),
                )
            }
        };
        was_member |= cfg.membership.contains(cfg.id);
        let mem_floor = sm.applied;
        // What is on disk, with the commit index clamped to the log as restored.
        let persisted_hard_state = HardState {
            commit: log.commit,
            ..hard_state
        };
        let mut node = Node {
            rng: Rng::new(cfg.seed ^ cfg.id.rotate_left(32)),
            cfg,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            sm,
            election_elapsed: 0,
            election_timeout: 0,
            heartbeat_elapsed: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            pending_appends: HashMap::new(),
            waiters: BTreeMap::new(),
            read_seq: 0,
            pending_reads: VecDeque::new(),
            reads_before_own_commit: Vec::new(),
            persisted_hard_state,
            handed_hard_state: None,
            ready_outstanding: false,
            compacted: Vec::new(),
            replicate_now: false,
            heartbeat_now: false,
            msgs: Vec::new(),
            replies: Vec::new(),
            malformed: 0,
            transfer: None,
            held_appends: Vec::new(),
            configs,
            leaving: BTreeMap::new(),
            was_member,
            removed: false,
            elections_started: 0,
            leader_changes: 0,
            last_leader_seen: None,
            snapshot: snapshot.map(|(_, id)| id),
            mem_floor,
            applied_records: Vec::new(),
            store_reads: Vec::new(),
            chunk_reads: Vec::new(),
            chunk_writes: Vec::new(),
        };
        node.reset_election_timer();
        node.apply_committed();
        let me = node.cfg.id;
        if node.was_member && !node.membership().contains(me) {
            // Not decided here (a rejoining peer replays its earlier removal while it catches
            // up, see `note_removal`), but an operator restarting a removed peer should know.
            warn!(
                "node {me}: the latest configuration in this log (index {}) does not list this node: it was removed, and takes part again only if added back",
                node.config_index()
            );
        }
        node
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn log(&self) -> &RaftLog {
        &self.log
    }
    pub fn commit_index(&self) -> Index {
        self.log.commit
    }
    pub fn applied_index(&self) -> Index {
        self.sm.applied
    }
    pub fn state_machine(&self) -> &StateMachine {
        &self.sm
    }
    /// The configuration in force: the latest in the log, committed or not (thesis §4.1).
    pub fn membership(&self) -> &Membership {
        self.configs.latest()
    }
    /// Index of the configuration entry in force; 0 for the bootstrap configuration.
    pub fn config_index(&self) -> Index {
        self.configs.latest_index()
    }
    /// The configuration in force once everything up to the commit index applies.
    pub fn committed_membership(&self) -> &Membership {
        self.configs.committed(self.log.commit)
    }
    /// Changes whenever [`Node::membership`], [`Node::committed_membership`] or
    /// [`Node::contacts`] may have: the latest configuration entry (index and term), the
    /// committed one's index, and how many removed members are still being told.
    pub fn routing_key(&self) -> RoutingKey {
        (
            self.configs.latest_index(),
            self.configs.latest_term(),
            self.configs.committed_index(self.log.commit),
            self.leaving.len(),
        )
    }
    /// A committed configuration removed this node: it takes no further part.
    pub fn removed(&self) -> bool {
        self.removed
    }
    /// Every node this one may have to reach: the members of the configuration in force and
    /// those still being told of their removal.
    pub fn contacts(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .membership()
            .ids()
            .chain(self.leaving.keys().copied())
            .filter(|&id| id != self.cfg.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Voters of the configuration in force, other than this node: whom to ask for votes.
    fn other_voters(&self) -> Vec<NodeId> {
        let me = self.cfg.id;
        self.membership()
            .voter_ids()
            .filter(|&id| id != me)
            .collect()
    }

    fn is_voter(&self) -> bool {
        self.membership().is_voter(self.cfg.id)
    }

    /// The answer to a request only a leader takes.
    fn not_leader(&self) -> ClientResult {
        ClientResult::NotLeader {
            leader: self.leader,
        }
    }

    pub fn status(&self) -> StatusInfo {
        StatusInfo {
            id: self.cfg.id,
            role: self.role,
            term: self.term,
            leader: self.leader,
            last_index: self.log.last_index(),
            commit_index: self.log.commit,
            applied_index: self.sm.applied,
            elections_started: self.elections_started,
            leader_changes: self.leader_changes,
            auth_failures: 0,
            members: self.membership().members.clone(),
            config_index: self.config_index(),
            snapshot_index: self.snapshot.map_or(0, |s| s.index),
            first_index: self.log.base().0 + 1,
            followers: self
                .progress
                .iter()
                .map(|(&id, p)| FollowerInfo {
                    id,
                    match_index: p.match_index,
                    lag: self.log.last_index().saturating_sub(p.match_index),
                    last_contact_ticks: p.last_contact_ticks,
                    last_contact_ms: None,
                })
                .collect(),
        }
    }

    /// Counts a leadership change the first time this node learns of a (term, leader).
    fn note_leader(&mut self) {
        if let Some(leader) = self.leader {
            let seen = Some((self.term, leader));
            if seen != self.last_leader_seen {
                self.last_leader_seen = seen;
                self.leader_changes += 1;
            }
        }
    }

    // ---- time ------------------------------------------------------------------------------

    /// Advances time by one tick.
    pub fn tick(&mut self) {
        self.election_elapsed += 1;
        match self.role {
            Role::Leader => {
                self.heartbeat_elapsed += 1;
                let stall_limit = self.cfg.election_ticks.0;
                for pr in self.progress.values_mut() {
                    pr.last_contact_ticks += 1;
                    if !pr.inflight.is_empty() {
                        pr.stall_ticks += 1;
                    }
                    if let Some(s) = pr.sending.as_mut() {
                        s.tick(stall_limit);
                    }
                }
                if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
                    self.heartbeat_elapsed = 0;
                    self.heartbeat_now = true;
                }
                // Check quorum: a leader that has not heard from a majority for an election
                // timeout steps down, so clients look for the leader elsewhere.
                if self.election_elapsed >= self.cfg.election_ticks.0 {
                    self.election_elapsed = 0;
                    let me = self.cfg.id;
                    let progress = &self.progress;
                    let active = self.configs.latest().has_quorum(|id| {
                        id == me || progress.get(&id).is_some_and(|p| p.recent_active)
                    });
                    for pr in self.progress.values_mut() {
                        pr.recent_active = false;
                    }
                    if !active {
                        info!(
                            "node {}: lost contact with a majority in term {}; stepping down",
                            self.cfg.id, self.term
                        );
                        self.become_follower(self.term, None);
                    }
                }
            }
            // Learners, joining and removed servers never campaign (thesis §4.2.1). Their
            // timer still runs: a server that is a voter in a newer configuration than its
            // own must grant pre-votes once the leader is silent (thesis §9.6), or a cluster
            // whose leader is gone may never reach a majority.
            _ if !self.is_voter() || self.removed => {}
            _ => {
                if self.election_elapsed >= self.election_timeout {
                    self.campaign_pre_vote();
                }
            }
        }
        self.tick_transfer();
        self.tick_leaving();
    }

    fn reset_election_timer(&mut self) {
        let (min, max) = self.cfg.election_ticks;
        self.election_elapsed = 0;
        self.election_timeout = self.rng.range(min, max);
    }

    // ---- role changes ------------------------------------------------------------------------

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        assert!(term >= self.term, "term went backwards");
        let changed = term != self.term || self.role != Role::Follower || leader != self.leader;
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        let was_leader = self.role == Role::Leader;
        self.role = Role::Follower;
        self.leader = leader;
        self.reset_election_timer();
        if was_leader {
            self.abandon_leadership();
        }
        self.settle_transfer();
        self.note_leader();
        if changed {
            match leader {
                Some(l) => info!(
                    "node {}: follower in term {}, leader {l}",
                    self.cfg.id, self.term
                ),
                None => info!(
                    "node {}: follower in term {}, no leader",
                    self.cfg.id, self.term
                ),
            }
        }
    }

    /// Thesis §9.6: ask whether we could win before disturbing anyone's term.
    fn campaign_pre_vote(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        self.reset_election_timer();
        debug!(
            "node {}: pre-candidate for term {}",
            self.cfg.id,
            self.term + 1
        );
        if self.votes_won() {
            return self.become_candidate();
        }
        let (last_log_index, last_log_term) = (self.log.last_index(), self.log.last_term());
        for to in self.other_voters() {
            self.send(
                to,
                self.term + 1,
                Body::PreVote {
                    last_log_index,
                    last_log_term,
                },
            );
        }
    }

    /// §5.2: a new term, a vote for ourselves, and RequestVote to everyone.
    fn become_candidate(&mut self) {
        self.elections_started += 1;
        self.term += 1;
        self.vote = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        self.reset_election_timer();
        info!("node {}: candidate in term {}", self.cfg.id, self.term);
        if self.votes_won() {
            return self.become_leader();
        }
        let (last_log_index, last_log_term) = (self.log.last_index(), self.log.last_term());
        for to in self.other_voters() {
            self.send(
                to,
                self.term,
                Body::RequestVote {
                    last_log_index,
                    last_log_term,
                },
            );
        }
    }

    fn become_leader(&mut self) {
        info!("node {}: leader in term {}", self.cfg.id, self.term);
        if let Some(t) = self.transfer.take() {
            let reason = format!(
                "leadership transfer to node {} failed: node {} leads again, in term {}",
                t.target, self.cfg.id, self.term
            );
            self.reply(t.requester, ClientResult::Refused { reason });
        }
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.note_leader();
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        let next = self.log.last_index() + 1;
        let me = self.cfg.id;
        self.progress = self
            .membership()
            .ids()
            .filter(|&id| id != me)
            .map(|id| (id, Progress::new(next)))
            .collect();
        self.leaving.clear();
        self.pending_appends.clear();
        let commit = self.log.commit;
        for e in self.log.entries().iter().filter(|e| e.index > commit) {
            if let Payload::Data { client, seq, .. } = e.payload {
                self.pending_appends.insert((client, seq), e.index);
            }
        }
        // §5.4.2 / §8: an entry of our own term lets earlier entries commit, and lets reads
        // know the commit index is current.
        // Nothing commits yet: the no-op is of our term but not durable until `advance`.
        self.append_entry(Payload::Noop);
        self.replicate_now = true;
    }

    /// On losing leadership, nobody waiting on this node will get an answer from it: tell them
    /// to look elsewhere. Appends may still commit; a retry is deduplicated.
    fn abandon_leadership(&mut self) {
        self.progress.clear();
        self.leaving.clear();
        self.pending_appends.clear();
        let leader = self.leader;
        let waiters: Vec<Waiter> = std::mem::take(&mut self.waiters)
            .into_values()
            .chain(self.pending_reads.drain(..).map(|r| r.waiter))
            .chain(self.reads_before_own_commit.drain(..).map(|(_, w)| w))
            .collect();
        for w in waiters {
            self.reply(w, self.not_leader());
        }
        // Appends held for a transfer go to the node that is taking over.
        let heir = self
            .transfer
            .as_ref()
            .filter(|t| t.timeout_now_sent)
            .map(|t| t.target)
            .or(leader);
        for held in std::mem::take(&mut self.held_appends) {
            self.reply(held.requester, ClientResult::NotLeader { leader: heir });
        }
    }

    /// A grant stands for the whole campaign (the voter persisted it); a refusal may be a
    /// reordered answer to an earlier request, so it never overrides a grant.
    fn record_vote(&mut self, from: NodeId, granted: bool) {
        *self.votes.entry(from).or_insert(granted) |= granted;
    }

    /// Only voters of our configuration count (a learner's grant is no vote).
    fn votes_won(&self) -> bool {
        let votes = &self.votes;
        self.membership()
            .has_quorum(|id| votes.get(&id) == Some(&true))
    }

    fn votes_lost(&self) -> bool {
        let votes = &self.votes;
        self.membership()
            .has_quorum(|id| votes.get(&id) == Some(&false))
    }

    // ---- messages ------------------------------------------------------------------------------

    fn send(&mut self, to: NodeId, term: Term, body: Body) {
        self.msgs.push(Message {
            cluster: 0,
            from: self.cfg.id,
            to,
            term,
            body,
        });
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, msg: Message) {
        assert!(!self.ready_outstanding, "step between ready and advance");
        // Requests are taken from servers outside our configuration (thesis §4.1): a new
        // leader may know of a configuration we have not seen yet. The shell decides who may
        // reach us at all.
        if msg.to != self.cfg.id || msg.from == self.cfg.id || msg.from == 0 {
            warn!(
                "node {}: dropping message from {} to {}",
                self.cfg.id, msg.from, msg.to
            );
            return;
        }
        if self.removed {
            return;
        }
        if let Err(why) = self.check_message(&msg) {
            return self.drop_malformed(&msg, &why);
        }
        // Term handling, once for every role (Figure 2, "Rules for Servers"). An older term is
        // answered before anything that depends on our log: a deposed leader must learn the
        // new term whatever it sent.
        if msg.term < self.term {
            match msg.body {
                // Tell a stale leader or candidate about the newer term; drop stale answers.
                // The answer says only that: should the sender be re-elected in our term before
                // it arrives, it must not mistake it for a verdict on its log.
                Body::AppendEntries { .. } | Body::InstallSnapshot { .. } => self.send(
                    msg.from,
                    self.term,
                    Body::AppendEntriesResponse {
                        read_seq: 0,
                        result: AppendResult::StaleTerm,
                    },
                ),
                Body::RequestVote { .. } => self.send(
                    msg.from,
                    self.term,
                    Body::RequestVoteResponse { granted: false },
                ),
                Body::PreVote { .. } => self.send(
                    msg.from,
                    self.term,
                    Body::PreVoteResponse { granted: false },
                ),
                _ => {}
            }
            return;
        }
        // A message that contradicts our committed log comes from a broken sender: it must
        // not move our term either.
        if let Err(why) = self.check_against_log(&msg) {
            return self.drop_malformed(&msg, &why);
        }
        if msg.term > self.term {
            match &msg.body {
                // A pre-vote changes no one's term; a granted pre-vote answer carries the
                // term we would campaign in, not a newer term someone is in.
                Body::PreVote { .. } | Body::PreVoteResponse { granted: true } => {}
                Body::AppendEntries { .. } | Body::InstallSnapshot { .. } => {
                    self.become_follower(msg.term, Some(msg.from))
                }
                _ => self.become_follower(msg.term, None),
            }
        }
        match self.role {
            Role::Follower => self.step_follower(msg),
            Role::PreCandidate | Role::Candidate => self.step_candidate(msg),
            Role::Leader => self.step_leader(msg),
        }
    }

    fn drop_malformed(&mut self, msg: &Message, why: &str) {
        // Rate-limited by count (the core has no clock): the first, then every 1000th.
        self.malformed += 1;
        if self.malformed % 1000 == 1 {
            warn!(
                "node {}: dropping malformed {} from {}: {why} ({} so far)",
                self.cfg.id,
                msg.body.name(),
                msg.from,
                self.malformed
            );
        }
    }

    /// Rejects messages no correct peer sends, judged from the message alone, so that a
    /// corrupted or forged datagram is dropped instead of tripping an invariant (Raft assumes
    /// non-malicious peers; this is defence against bugs and garbage, not authentication).
    fn check_message(&self, msg: &Message) -> Result<(), String> {
        // Far beyond any real term; also keeps `term + 1` from overflowing.
        if msg.term >= u64::MAX / 2 {
            return Err(format!("term {} out of range", msg.term));
        }
        match &msg.body {
            Body::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                ..
            } => {
                let mut term = *prev_log_term;
                for (k, e) in entries.iter().enumerate() {
                    if Some(e.index) != prev_log_index.checked_add(k as Index + 1) {
                        return Err(format!("entry index {} out of sequence", e.index));
                    }
                    if e.term < term || e.term > msg.term {
                        return Err(format!("entry {} has term {}", e.index, e.term));
                    }
                    term = e.term;
                }
                if *prev_log_term > msg.term {
                    return Err(format!("prev_log_term {prev_log_term} above the term"));
                }
                Ok(())
            }
            Body::InstallSnapshot {
                snapshot,
                offset,
                data,
                ..
            } => {
                if snapshot.term > msg.term || snapshot.index == 0 {
                    return Err(format!(
                        "snapshot at {} of term {}",
                        snapshot.index, snapshot.term
                    ));
                }
                if snapshot
                    .records_len
                    .checked_add(snapshot.meta_len)
                    .is_none()
                {
                    return Err("snapshot lengths overflow".into());
                }
                if *offset >= snapshot.total_len() || data.len() as u64 > 2 * CHUNK_BYTES {
                    return Err(format!(
                        "chunk at {offset} of {} bytes, {} of data",
                        snapshot.total_len(),
                        data.len()
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Rejects current-term messages that contradict what we know: checked only after term
    /// handling, so a stale sender is told the new term rather than ignored.
    fn check_against_log(&self, msg: &Message) -> Result<(), String> {
        match &msg.body {
            Body::AppendEntries { entries, .. } => {
                // Entries at or below our commit index must be the committed ones (Log
                // Matching); a conflict there would mean the sender is broken, not us.
                // Below our base, entries are compacted: nothing to compare.
                let base = self.log.base().0;
                let committed = entries.iter().take_while(|e| e.index <= self.log.commit);
                for e in committed.filter(|e| e.index >= base) {
                    if self.log.term_at(e.index) != Some(e.term) {
                        return Err(format!("conflicts with committed entry {}", e.index));
                    }
                }
                Ok(())
            }
            Body::AppendEntriesResponse { read_seq, result } if self.role == Role::Leader => {
                // An echo of a read sequence number we never sent would confirm every read
                // up to it (thesis §6.4) without a round trip.
                if *read_seq > self.read_seq {
                    return Err(format!(
                        "echoes read_seq {read_seq}, beyond the {} sent",
                        self.read_seq
                    ));
                }
                let last = self.log.last_index();
                match *result {
                    AppendResult::Accepted { match_index } if match_index > last => {
                        Err(format!("match index {match_index} beyond our last {last}"))
                    }
                    AppendResult::Rejected { prev_log_index, .. } if prev_log_index > last => Err(
                        format!("rejected index {prev_log_index} beyond our last {last}"),
                    ),
                    // Every log matches at index 0 (§5.3): no follower rejects there.
                    AppendResult::Rejected {
                        prev_log_index: 0, ..
                    } => Err("rejected at index 0".into()),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn step_follower(&mut self, msg: Message) {
        match msg.body {
            Body::AppendEntries { .. } => {
                if self.leader != Some(msg.from) {
                    self.leader = Some(msg.from);
                    info!(
                        "node {}: follower in term {}, leader {}",
                        self.cfg.id, self.term, msg.from
                    );
                    self.settle_transfer();
                    self.note_leader();
                }
                self.election_elapsed = 0;
                self.handle_append_entries(msg);
            }
            Body::InstallSnapshot { .. } => {
                if self.leader != Some(msg.from) {
                    self.leader = Some(msg.from);
                    self.settle_transfer();
                    self.note_leader();
                }
                self.election_elapsed = 0;
                self.handle_install_snapshot(msg);
            }
            Body::RequestVote { .. } => self.handle_request_vote(msg),
            Body::PreVote { .. } => self.handle_pre_vote(msg),
            // Only our leader hands leadership over (thesis §3.10): from anyone else it would
            // depose a healthy leader. Without a leader (restarted, or back from a lost
            // election) we would campaign soon anyway, and the leader sends it only once.
            Body::TimeoutNow if self.leader.is_none_or(|l| l == msg.from) => {
                self.timeout_now(msg.from)
            }
            _ => {}
        }
    }

    /// §7 InstallSnapshot, one chunk. A snapshot we already have everything of is answered
    /// as done: our committed log matches the leader's up to its index, or our log holds its
    /// last entry (then everything up to it is the leader's, and committed, so we commit it and
    /// keep what follows, §7 step 6: entries we acknowledged must not be dropped). Any other
    /// chunk goes to the shell, which stages it and tells us what it holds.
    fn handle_install_snapshot(&mut self, msg: Message) {
        let Body::InstallSnapshot {
            snapshot,
            offset,
            data,
            crc,
        } = msg.body
        else {
            return;
        };
        if self.log_has(snapshot.index, snapshot.term) && self.log.commit_to(snapshot.index) {
            self.apply_committed();
        }
        if snapshot.index <= self.log.commit {
            return self.send(
                msg.from,
                self.term,
                Body::InstallSnapshotResponse {
                    snapshot_index: snapshot.index,
                    have: snapshot.total_len(),
                    done: true,
                },
            );
        }
        self.chunk_writes.push(ChunkWrite {
            from: msg.from,
            snapshot,
            offset,
            data,
            crc,
        });
    }

    /// Thesis §3.10: our leader hands over; campaign at once, skipping pre-vote (the leader
    /// already knows our log is up to date).
    fn timeout_now(&mut self, from: NodeId) {
        if !self.is_voter() {
            return;
        }
        info!(
            "node {}: TimeoutNow from {from} in term {}; campaigning",
            self.cfg.id, self.term
        );
        self.become_candidate();
    }

    fn step_candidate(&mut self, msg: Message) {
        match msg.body {
            Body::AppendEntries { .. } => {
                // §5.2: a leader of our term exists; recognize it.
                self.become_follower(msg.term, Some(msg.from));
                self.handle_append_entries(msg);
            }
            Body::InstallSnapshot { .. } => {
                self.become_follower(msg.term, Some(msg.from));
                self.handle_install_snapshot(msg);
            }
            Body::RequestVote { .. } => self.handle_request_vote(msg),
            Body::PreVote { .. } => self.handle_pre_vote(msg),
            Body::TimeoutNow if self.role == Role::PreCandidate => self.timeout_now(msg.from),
            // A grant carries the term we asked for; a refusal carries the voter's term.
            Body::PreVoteResponse { granted }
                if self.role == Role::PreCandidate && (msg.term == self.term + 1 || !granted) =>
            {
                self.record_vote(msg.from, granted);
                if self.votes_won() {
                    self.become_candidate();
                } else if self.votes_lost() {
                    self.become_follower(self.term, None);
                }
            }
            Body::RequestVoteResponse { granted }
                if self.role == Role::Candidate && msg.term == self.term =>
            {
                self.record_vote(msg.from, granted);
                if self.votes_won() {
                    self.become_leader();
                } else if self.votes_lost() {
                    self.become_follower(self.term, None);
                }
            }
            _ => {}
        }
    }

    fn step_leader(&mut self, msg: Message) {
        match msg.body {
            Body::AppendEntriesResponse { read_seq, result } => {
                self.handle_append_response(msg.from, read_seq, result)
            }
            Body::InstallSnapshotResponse {
                snapshot_index,
                have,
                done,
            } => self.handle_snapshot_response(msg.from, snapshot_index, have, done),
            Body::RequestVote { .. } => self.handle_request_vote(msg),
            Body::PreVote { .. } => self.handle_pre_vote(msg),
            Body::AppendEntries { .. } => {
                warn!(
                    "node {}: another leader {} in my term {}; ignoring (Election Safety broken?)",
                    self.cfg.id, msg.from, self.term
                );
            }
            _ => {}
        }
    }

    /// §5.2, §5.4.1: one vote per term, only for a candidate whose log is at least as
    /// up-to-date as ours. The vote is persisted before the answer leaves (see `ready`).
    fn handle_request_vote(&mut self, msg: Message) {
        let Body::RequestVote {
            last_log_index,
            last_log_term,
        } = msg.body
        else {
            return;
        };
        let granted = (self.vote.is_none() || self.vote == Some(msg.from))
            && self.role != Role::Leader
            && self.log.is_up_to_date(last_log_index, last_log_term);
        if granted {
            self.vote = Some(msg.from);
            self.reset_election_timer();
            debug!(
                "node {}: voted for {} in term {}",
                self.cfg.id, msg.from, self.term
            );
        }
        self.send(msg.from, self.term, Body::RequestVoteResponse { granted });
    }

    /// Thesis §9.6: grant a pre-vote for a later term if the candidate's log is up to date
    /// and we have not heard from a leader within the minimum election timeout.
    fn handle_pre_vote(&mut self, msg: Message) {
        let Body::PreVote {
            last_log_index,
            last_log_term,
        } = msg.body
        else {
            return;
        };
        let leader_alive = self.role == Role::Leader
            || (self.leader.is_some() && self.election_elapsed < self.cfg.election_ticks.0);
        let granted = msg.term > self.term
            && !leader_alive
            && self.log.is_up_to_date(last_log_index, last_log_term);
        let term = if granted { msg.term } else { self.term };
        self.send(msg.from, term, Body::PreVoteResponse { granted });
    }

    /// §5.3: the consistency check, then append, then advance the commit index.
    fn handle_append_entries(&mut self, msg: Message) {
        let Body::AppendEntries {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            read_seq,
        } = msg.body
        else {
            return;
        };
        let result = match self.log.try_append(prev_log_index, prev_log_term, &entries) {
            Some(match_index) => {
                let log = &self.log;
                self.configs.retain_in_log(|i| log.term_at(i));
                self.configs.appended(&entries);
                if self.log.commit_to(leader_commit.min(match_index)) {
                    self.apply_committed();
                }
                if match_index >= leader_commit {
                    self.note_removal();
                }
                AppendResult::Accepted { match_index }
            }
            None => {
                let (hint_index, hint_term) = match self.log.term_at(prev_log_index) {
                    None => (self.log.last_index() + 1, 0),
                    Some(t) => (self.log.first_index_of_term_at(prev_log_index), t),
                };
                AppendResult::Rejected {
                    prev_log_index,
                    hint_index,
                    hint_term,
                }
            }
        };
        self.send(
            msg.from,
            self.term,
            Body::AppendEntriesResponse { read_seq, result },
        );
    }

    fn handle_append_response(&mut self, from: NodeId, read_seq: u64, result: AppendResult) {
        // Only the newer term it carried mattered, and `step` has dealt with it.
        if result == AppendResult::StaleTerm {
            return;
        }
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.last_contact_ticks = 0;
        if read_seq > pr.read_acked {
            pr.read_acked = read_seq;
            self.confirm_reads();
        }
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        match result {
            AppendResult::StaleTerm => {}
            AppendResult::Accepted { match_index } => {
                if pr.acknowledge(match_index) {
                    pr.matched_at_read_seq = self.read_seq;
                    self.maybe_commit();
                    // Committing our own removal ends our leadership (thesis §4.2.2).
                    if self.role != Role::Leader {
                        return;
                    }
                    self.maybe_send_timeout_now();
                }
                self.send_append(from);
            }
            AppendResult::Rejected {
                prev_log_index,
                hint_index,
                hint_term,
            } => {
                if prev_log_index <= pr.match_index {
                    // The follower had everything up to its match index. Refusing a request
                    // sent after we learned that (every heartbeat raises `read_seq`) means it
                    // lost acknowledged entries: its data was wiped. That breaks Raft's
                    // assumptions, but rather than stall, start over from what it has; its old
                    // acknowledgements already counted, and commit never goes back. Any other
                    // rejection at or below the match index is a late or duplicated answer to
                    // an earlier request, and must not move the follower backwards.
                    if read_seq <= pr.matched_at_read_seq {
                        return;
                    }
                    warn!(
                        "node {}: follower {from} lost entries up to {prev_log_index} it had acknowledged (wiped data?)",
                        self.cfg.id
                    );
                    pr.match_index = hint_index.saturating_sub(1).min(prev_log_index - 1);
                    pr.matched_at_read_seq = self.read_seq;
                } else if pr.state == ProgressState::Probe && prev_log_index + 1 != pr.next_index {
                    // In Probe state, only the answer to the probe we are waiting on counts.
                    return;
                } else if pr.state == ProgressState::Snapshot {
                    // Expected while a snapshot is on its way (heartbeats probe our base).
                    return;
                }
                let next = if hint_term > 0 {
                    match self.log.last_index_of_term(hint_term) {
                        Some(i) => i + 1,
                        None => hint_index,
                    }
                } else {
                    hint_index
                };
                let pr = self.progress.get_mut(&from).expect("checked above");
                pr.probe_from(next.min(prev_log_index));
                debug!(
                    "node {}: follower {from} rejected at {prev_log_index}; probing from {}",
                    self.cfg.id, pr.next_index
                );
                self.send_append(from);
            }
        }
    }

    fn handle_snapshot_response(
        &mut self,
        from: NodeId,
        snapshot_index: Index,
        have: u64,
        done: bool,
    ) {
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.last_contact_ticks = 0;
        if done {
            // The follower's log matches ours up to the snapshot's index.
            if snapshot_index <= self.log.last_index() && pr.acknowledge(snapshot_index) {
                info!(
                    "node {}: follower {from} has the snapshot at {snapshot_index}",
                    self.cfg.id
                );
                pr.matched_at_read_seq = self.read_seq;
                self.maybe_commit();
                if self.role != Role::Leader {
                    return;
                }
                self.maybe_send_timeout_now();
            }
            return self.send_append(from);
        }
        match pr.sending.as_mut() {
            Some(s) if s.id.index == snapshot_index => s.acknowledge(have),
            _ => return,
        }
        self.send_snapshot(from);
    }

    /// Sends what the follower is missing, as flow control allows.
    fn send_append(&mut self, to: NodeId) {
        loop {
            let pr = &self.progress[&to];
            let next = pr.next_index;
            if pr.state == ProgressState::Snapshot || next <= self.log.base().0 {
                return self.send_snapshot(to);
            }
            match pr.state {
                ProgressState::Snapshot => unreachable!("handled above"),
                ProgressState::Probe if pr.probe_sent => return,
                ProgressState::Replicate
                    if pr.inflight.len() >= self.cfg.max_inflight
                        || next > self.log.last_index() =>
                {
                    return
                }
                _ => {}
            }
            let entries = self.log.entries_from(next, ENTRY_BUDGET);
            let last = entries.last().map_or(next - 1, |e| e.index);
            let prev_log_term = self
                .log
                .term_at(next - 1)
                .expect("next_index within log + 1");
            let body = Body::AppendEntries {
                prev_log_index: next - 1,
                prev_log_term,
                entries,
                leader_commit: self.log.commit,
                read_seq: self.read_seq,
            };
            self.send(to, self.term, body);
            let pr = self.progress.get_mut(&to).expect("progress exists");
            match pr.state {
                ProgressState::Probe => {
                    pr.probe_sent = true;
                    return;
                }
                ProgressState::Replicate => {
                    pr.next_index = last + 1;
                    pr.inflight.push_back(last);
                }
                ProgressState::Snapshot => unreachable!("handled above"),
            }
        }
    }

    /// Streams our latest snapshot to a follower that needs entries we compacted (§7): as
    /// many chunks as its window allows, which the shell reads from its store.
    fn send_snapshot(&mut self, to: NodeId) {
        let Some(id) = self.snapshot else {
            warn!(
                "node {}: follower {to} needs compacted entries but there is no snapshot",
                self.cfg.id
            );
            return;
        };
        let pr = self.progress.get_mut(&to).expect("progress exists");
        if pr.state != ProgressState::Snapshot {
            info!(
                "node {}: sending snapshot at {} ({} bytes) to {to}, whose next index {} is compacted",
                self.cfg.id,
                id.index,
                id.total_len(),
                pr.next_index
            );
            pr.send_snapshot(SnapshotSend::new(id));
        }
        let sending = pr.sending.as_mut().expect("in Snapshot state");
        let term = self.term;
        for (offset, len) in sending.to_send() {
            self.chunk_reads.push(ChunkRead {
                to,
                term,
                snapshot: sending.id,
                offset,
                len,
            });
        }
    }

    /// Heartbeat: resend a probe, restart a stalled pipeline, or confirm leadership with an
    /// empty AppendEntries at the known match point.
    fn heartbeat(&mut self) {
        // A fresh sequence number per round tells answers to this round from older ones, for
        // reads and for telling a wiped follower from a late rejection.
        self.read_seq += 1;
        for to in self.progress.keys().copied().collect::<Vec<_>>() {
            let pr = self.progress.get_mut(&to).expect("progress exists");
            match pr.state {
                ProgressState::Probe => {
                    pr.probe_sent = false;
                    self.send_append(to);
                }
                ProgressState::Snapshot => {
                    // Keeps the follower's election timer quiet and echoes read_seq; a follower
                    // that does have our base answers Accepted and skips the snapshot.
                    let (prev, prev_log_term) = self.log.base();
                    let body = Body::AppendEntries {
                        prev_log_index: prev,
                        prev_log_term,
                        entries: Vec::new(),
                        leader_commit: self.log.commit,
                        read_seq: self.read_seq,
                    };
                    self.send(to, self.term, body);
                    self.send_snapshot(to);
                }
                ProgressState::Replicate if pr.match_index < self.log.base().0 => {
                    let next = pr.match_index + 1;
                    pr.probe_from(next);
                    self.send_append(to);
                }
                ProgressState::Replicate if pr.stall_ticks >= self.cfg.heartbeat_ticks => {
                    // Something in the pipeline was lost: go back to one-at-a-time.
                    let next = pr.match_index + 1;
                    pr.probe_from(next);
                    self.send_append(to);
                }
                ProgressState::Replicate => {
                    let prev = pr.match_index;
                    let body = Body::AppendEntries {
                        prev_log_index: prev,
                        prev_log_term: self.log.term_at(prev).expect("match within log"),
                        entries: Vec::new(),
                        leader_commit: self.log.commit,
                        read_seq: self.read_seq,
                    };
                    self.send(to, self.term, body);
                    self.send_append(to);
                }
            }
        }
    }

    /// §5.3, §5.4.2: commit the highest index stored on a majority, but only if it is of the
    /// current term (Figure 8); the leader counts itself only for entries on its own disk.
    /// Only voters of the configuration in force count; a leader that is not one (it is
    /// removing itself, thesis §4.2.2) replicates without counting itself.
    fn maybe_commit(&mut self) {
        let (me, stable, progress) = (self.cfg.id, self.log.stable_index(), &self.progress);
        let candidate = self.configs.latest().quorum_value(|id| {
            if id == me {
                stable
            } else {
                progress.get(&id).map_or(0, |p| p.match_index)
            }
        });
        if candidate > self.log.commit && self.log.term_at(candidate) == Some(self.term) {
            self.log.commit_to(candidate);
            self.apply_committed();
            // Followers learn the new commit index with the next AppendEntries: at once for
            // any that still lack entries, otherwise at the next heartbeat.
            self.replicate_now = true;
            self.serve_reads_waiting_for_own_commit();
            self.after_config_commit();
        }
    }

    // ---- applying ----------------------------------------------------------------------------

    fn apply_committed(&mut self) {
        while self.sm.applied < self.log.commit {
            let entry = self
                .log
                .get(self.sm.applied + 1)
                .expect("committed entry in log");
            let outcome = self.sm.apply(entry);
            let index = entry.index;
            self.applied_records
                .push(record_of(entry, self.sm.is_duplicate(index)));
            if let Payload::Data { client, seq, .. } = entry.payload {
                self.pending_appends.remove(&(client, seq));
            }
            if let Payload::Config(m) = &entry.payload {
                if m.contains(self.cfg.id) {
                    self.was_member = true;
                }
            }
            if let Some(waiter) = self.waiters.remove(&index) {
                let result = match (outcome, &entry.payload) {
                    (Applied::Appended { index, term }, _) => {
                        ClientResult::Appended { index, term }
                    }
                    (outcome, Payload::Data { client, seq, .. }) => refusal(outcome, *client, *seq),
                    (_, Payload::Config(m)) => ClientResult::Configured {
                        index,
                        term: entry.term,
                        members: m.members.clone(),
                    },
                    (_, Payload::Noop) => unreachable!("clients wait only on their own entries"),
                };
                self.reply(waiter, result);
            }
        }
    }

    fn reply(&mut self, w: Waiter, result: ClientResult) {
        self.replies.push((
            w.reply_to,
            ClientReply {
                id: w.id,
                from: self.cfg.id,
                result,
            },
        ));
    }

    // ---- clients ---------------------------------------------------------------------------

    /// Handles a client request; the reply appears in a later `Ready`.
    pub fn request(&mut self, reply_to: ReplyTo, req: ClientRequest) {
        assert!(!self.ready_outstanding, "request between ready and advance");
        let waiter = Waiter {
            reply_to,
            id: req.id,
        };
        if let ClientOp::Status = req.op {
            let status = self.status();
            return self.reply(waiter, ClientResult::Status(status));
        }
        if let ClientOp::Append { data, .. } = &req.op {
            if let Err(reason) = check_entry_data(data) {
                return self.reply(waiter, ClientResult::Refused { reason });
            }
        }
        if let ClientOp::Members = req.op {
            let members = self.members_info();
            return self.reply(waiter, members);
        }
        if self.role != Role::Leader || self.removed {
            return self.reply(waiter, self.not_leader());
        }
        match req.op {
            ClientOp::Append { client, seq, data } if self.transfer.is_some() => {
                self.held_appends.push(HeldAppend {
                    requester: waiter,
                    client,
                    seq,
                    data,
                });
            }
            ClientOp::Append { client, seq, data } => self.propose(waiter, client, seq, data),
            ClientOp::Query { start, read_index } => self.query(waiter, start, read_index),
            ClientOp::TransferLeader { target, away_from } => {
                self.start_transfer(waiter, target, away_from)
            }
            ClientOp::ChangeMembers { change } => self.change_members(waiter, change),
            ClientOp::Status | ClientOp::Members => unreachable!("answered above"),
        }
    }

    // ---- leadership transfer (thesis §3.10) -----------------------------------------------------

    fn start_transfer(
        &mut self,
        waiter: Waiter,
        target: Option<NodeId>,
        away_from: Option<NodeId>,
    ) {
        let done = ClientResult::Transferred {
            leader: self.cfg.id,
            term: self.term,
        };
        let refuse = |reason: String| ClientResult::Refused { reason };
        if let Some(t) = self.transfer.as_mut() {
            if target.is_some_and(|target| target != t.target) {
                let reason = format!("a leadership transfer to node {} is in progress", t.target);
                return self.reply(waiter, refuse(reason));
            }
            // A retry of the same request: answer its latest attempt.
            t.requester = waiter;
            return;
        }
        let target = match target {
            Some(t) if t == self.cfg.id => return self.reply(waiter, done),
            Some(t) if !self.membership().is_voter(t) => {
                let reason = format!("node {t} is not a voter of this cluster");
                return self.reply(waiter, refuse(reason));
            }
            Some(t) => t,
            // A retry that reaches the new leader: leadership already moved away.
            None if away_from.is_some_and(|a| a != self.cfg.id) => return self.reply(waiter, done),
            None => match transfer::pick_target(&self.progress, self.configs.latest()) {
                Some(t) => t,
                None => {
                    let reason = "no other voter to transfer leadership to".to_string();
                    return self.reply(waiter, refuse(reason));
                }
            },
        };
        info!(
            "node {}: transferring leadership to {target} in term {}",
            self.cfg.id, self.term
        );
        self.transfer = Some(Transfer {
            target,
            term: self.term,
            elapsed: 0,
            timeout_now_sent: false,
            requester: waiter,
        });
        self.maybe_send_timeout_now();
        self.replicate_now = true;
    }

    /// Sends TimeoutNow once the target's log matches ours; new appends are held meanwhile,
    /// so our last index stays put.
    fn maybe_send_timeout_now(&mut self) {
        let Some(t) = &self.transfer else {
            return;
        };
        if self.role != Role::Leader
            || t.timeout_now_sent
            || self.progress.get(&t.target).map(|p| p.match_index) != Some(self.log.last_index())
        {
            return;
        }
        let target = t.target;
        self.send(target, self.term, Body::TimeoutNow);
        if let Some(t) = self.transfer.as_mut() {
            t.timeout_now_sent = true;
        }
    }

    /// A leader of a later term is known: answer whoever asked for the transfer.
    fn settle_transfer(&mut self) {
        let Some(t) = &self.transfer else {
            return;
        };
        let Some(leader) = self.leader.filter(|_| self.term > t.term) else {
            return;
        };
        let t = self.transfer.take().expect("checked");
        let result = if leader == t.target {
            ClientResult::Transferred {
                leader,
                term: self.term,
            }
        } else {
            let reason = format!(
                "leadership went to node {leader} in term {}, not to node {}",
                self.term, t.target
            );
            ClientResult::Refused { reason }
        };
        self.reply(t.requester, result);
    }

    /// Abandons a transfer that has not produced a new leader within an election timeout
    /// (thesis §3.10), so a dead or slow target cannot hold appends forever.
    fn tick_transfer(&mut self) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        t.elapsed += 1;
        if t.elapsed < self.cfg.election_ticks.1 {
            return;
        }
        let t = self.transfer.take().expect("checked");
        if self.role != Role::Leader {
            // Stepped down and no leader since: the outcome is unknown, so the client times
            // out rather than hear a definite answer.
            return;
        }
        let behind = self.log.last_index() - self.progress[&t.target].match_index;
        info!(
            "node {}: leadership transfer to {} abandoned ({behind} entries behind)",
            self.cfg.id, t.target
        );
        let reason = format!(
            "leadership transfer to node {} abandoned: it did not take over within an election timeout ({behind} entries behind)",
            t.target
        );
        self.reply(t.requester, ClientResult::Refused { reason });
        for held in std::mem::take(&mut self.held_appends) {
            self.propose(held.requester, held.client, held.seq, held.data);
        }
    }

    fn propose(&mut self, waiter: Waiter, client: ClientId, seq: u64, data: String) {
        match self.sm.lookup(client, seq, data_hash(&data)) {
            Some(Applied::Appended { index, term }) => {
                return self.reply(waiter, ClientResult::Appended { index, term })
            }
            Some(outcome) => return self.reply(waiter, refusal(outcome, client, seq)),
            None => {}
        }
        // A retry of an append already in our log waits for that entry instead of adding one.
        let index = match self.pending_appends.get(&(client, seq)) {
            Some(&index) => {
                let same_data = matches!(
                    self.log.get(index).map(|e| &e.payload),
                    Some(Payload::Data { data: d, .. }) if *d == data
                );
                if !same_data {
                    return self.reply(waiter, refusal(Applied::Collision, client, seq));
                }
                index
            }
            None => {
                let index = self.append_entry(Payload::Data { client, seq, data });
                self.pending_appends.insert((client, seq), index);
                index
            }
        };
        self.waiters.insert(index, waiter);
        // It commits in `advance` (once durable here) or on followers' acknowledgements.
        self.replicate_now = true;
    }

    fn append_entry(&mut self, payload: Payload) -> Index {
        let index = self.log.last_index() + 1;
        let is_config = matches!(payload, Payload::Config(_));
        let entry = Entry {
            index,
            term: self.term,
            payload,
        };
        if is_config {
            self.configs.appended(std::slice::from_ref(&entry));
        }
        self.log.append(entry);
        if is_config {
            self.sync_progress(index);
        }
        index
    }

    /// Thesis §6.4 ReadIndex. A later page (`read_index: Some`) reads committed, immutable
    /// entries up to a bound that an earlier page already confirmed.
    fn query(&mut self, waiter: Waiter, start: Index, read_index: Option<Index>) {
        if let Some(read_index) = read_index {
            if read_index <= self.log.commit {
                return self.serve_read(waiter, start, read_index);
            }
            return self.reply(waiter, self.not_leader());
        }
        if self.log.term_at(self.log.commit) != Some(self.term) {
            // Until an entry of our term commits, our commit index may be behind the
            // previous leader's.
            self.reads_before_own_commit.push((start, waiter));
            return;
        }
        let me = self.cfg.id;
        if self.membership().voter_ids().all(|id| id == me) && self.is_voter() {
            let commit = self.log.commit;
            return self.serve_read(waiter, start, commit);
        }
        self.read_seq += 1;
        self.pending_reads.push_back(PendingRead {
            seq: self.read_seq,
            read_index: self.log.commit,
            start,
            waiter,
        });
        self.heartbeat_now = true;
    }

    fn serve_reads_waiting_for_own_commit(&mut self) {
        for (start, waiter) in std::mem::take(&mut self.reads_before_own_commit) {
            self.query(waiter, start, None);
        }
    }

    /// Serves every pending read whose sequence number a majority (us included) has echoed.
    fn confirm_reads(&mut self) {
        let (me, read_seq, progress) = (self.cfg.id, self.read_seq, &self.progress);
        let confirmed = self.configs.latest().quorum_value(|id| {
            if id == me {
                read_seq
            } else {
                progress.get(&id).map_or(0, |p| p.read_acked)
            }
        });
        while self
            .pending_reads
            .front()
            .is_some_and(|r| r.seq <= confirmed)
        {
            let r = self.pending_reads.pop_front().expect("checked");
            self.serve_read(r.waiter, r.start, r.read_index);
        }
    }

    /// Answers one page of the committed log from `start` up to `read_index`.
    fn serve_read(&mut self, waiter: Waiter, start: Index, read_index: Index) {
        assert!(
            read_index <= self.sm.applied,
            "read beyond the applied index"
        );
        let start = start.max(1);
        if start <= self.mem_floor.max(self.log.base().0) && start <= read_index {
            return self.store_reads.push(StoreRead {
                reply_to: waiter.reply_to,
                id: waiter.id,
                start,
                read_index,
            });
        }
        let mut entries = Vec::new();
        let mut used = 0;
        let mut next = None;
        for index in start..=read_index {
            let e = self.log.get(index).expect("applied entry in log");
            let record = record_of(e, self.sm.is_duplicate(index));
            used += e.encoded_len();
            if used > ENTRY_BUDGET && !entries.is_empty() {
                next = Some(index);
                break;
            }
            entries.push(record);
        }
        self.reply(
            waiter,
            ClientResult::Entries {
                entries,
                read_index,
                next,
            },
        );
    }

    // ---- output ------------------------------------------------------------------------------

    /// Takes the accumulated effects. Call [`Node::advance`] once they are carried out.
    pub fn ready(&mut self) -> Ready {
        assert!(
            !self.ready_outstanding,
            "ready called twice without advance"
        );
        if self.role == Role::Leader {
            if self.heartbeat_now {
                self.heartbeat();
            } else if self.replicate_now {
                for to in self.progress.keys().copied().collect::<Vec<_>>() {
                    self.send_append(to);
                }
            }
        }
        self.heartbeat_now = false;
        self.replicate_now = false;
        let hs = HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.commit,
        };
        let vote_changed = (hs.term, hs.vote)
            != (
                self.persisted_hard_state.term,
                self.persisted_hard_state.vote,
            );
        let entries = self.log.take_unstable();
        // The commit index alone is not worth an fsync; it rides along with other writes.
        let hard_state = (vote_changed || (!entries.is_empty() && hs != self.persisted_hard_state))
            .then_some(hs);
        let rd = Ready {
            hard_state,
            send_before_persist: self.role == Role::Leader && !vote_changed,
            entries,
            messages: std::mem::take(&mut self.msgs),
            replies: std::mem::take(&mut self.replies),
            applied: std::mem::take(&mut self.applied_records),
            store_reads: std::mem::take(&mut self.store_reads),
            chunk_reads: std::mem::take(&mut self.chunk_reads),
            chunk_writes: self.chunk_writes_to_stage(),
        };
        if !rd.is_empty() {
            self.ready_outstanding = true;
            self.handed_hard_state = rd.hard_state;
        }
        rd
    }

    // ---- snapshots (thesis ch. 5) ---------------------------------------------------------------

    /// The chunks received since the last Ready whose snapshot we still need: entries that
    /// arrived after a chunk may have brought its last entry, and installing a snapshot whose
    /// last entry the log holds would drop the entries after it (§7 keeps them).
    fn chunk_writes_to_stage(&mut self) -> Vec<ChunkWrite> {
        let mut writes = std::mem::take(&mut self.chunk_writes);
        writes.retain(|w| {
            w.snapshot.index > self.sm.applied && !self.log_has(w.snapshot.index, w.snapshot.term)
        });
        writes
    }

    /// What a snapshot at the applied index holds besides the records (which the shell's store
    /// has): the shell makes it durable, then calls [`Node::snapshot_taken`].
    pub fn snapshot_state(&self) -> SnapshotState {
        let index = self.sm.applied;
        let (membership, config_at) = self.configs.at(index);
        SnapshotState {
            index,
            term: self
                .log
                .term_at(index)
                .expect("applied index in log or its base"),
            membership: membership.clone(),
            config_at,
            removed: self.configs.removed_at(index),
            sessions: self.sm.sessions(),
        }
    }

    /// A snapshot is durable: send it to followers that need what it covers, and drop the log
    /// up to `trailing` entries before it (so a follower slightly behind still gets plain
    /// AppendEntries). Returns the log's new base when the log was compacted; the shell then
    /// drops its WAL up to there.
    pub fn snapshot_taken(&mut self, id: SnapshotId, trailing: u64) -> Option<(Index, Term)> {
        assert!(
            !self.ready_outstanding,
            "snapshot between ready and advance"
        );
        assert!(
            id.index <= self.sm.applied,
            "snapshot beyond the applied index"
        );
        self.snapshot = Some(id);
        for pr in self.progress.values_mut() {
            if let Some(s) = pr.sending.as_mut() {
                s.switch_to(id);
            }
        }
        let through = id
            .index
            .saturating_sub(trailing)
            .min(self.log.stable_index());
        self.compacted = self.log.compact(through)?;
        self.configs.compact(through);
        Some(self.log.base())
    }

    /// The entries the latest [`Node::snapshot_taken`] dropped from the log, for the shell to
    /// free off the node thread (10,000 entries took it 0.6-0.7 ms at p50 in the bench).
    pub fn take_compacted(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.compacted)
    }

    /// The latest durable snapshot, if any.
    pub fn snapshot_id(&self) -> Option<SnapshotId> {
        self.snapshot
    }

    /// The shell staged a chunk of `leader`'s snapshot at `snapshot_index`: it holds `have`
    /// bytes of its stream.
    pub fn snapshot_chunk_stored(&mut self, leader: NodeId, snapshot_index: Index, have: u64) {
        assert!(
            !self.ready_outstanding,
            "chunk stored between ready and advance"
        );
        self.send(
            leader,
            self.term,
            Body::InstallSnapshotResponse {
                snapshot_index,
                have,
                done: false,
            },
        );
    }

    /// The shell verified a snapshot streamed from `leader`, made it durable and swapped its
    /// store for it, and reset its WAL to the snapshot's base: adopt it (§7: discard the whole
    /// log) and tell the leader.
    pub fn install_snapshot(&mut self, leader: NodeId, state: SnapshotState, id: SnapshotId) {
        assert!(!self.ready_outstanding, "install between ready and advance");
        let index = state.index;
        if index > self.sm.applied {
            info!(
                "node {}: installed snapshot at {index} (term {}) from {leader}",
                self.cfg.id, state.term
            );
            self.log.reset((index, state.term));
            self.configs = Configurations::restore_after(
                state.membership,
                state.config_at,
                index,
                &state.removed,
                &[],
            );
            self.sm = StateMachine::restore(index, &state.sessions);
            self.mem_floor = index;
            self.snapshot = Some(id);
            if self.configs.latest().contains(self.cfg.id) {
                self.was_member = true;
            }
            self.persisted_hard_state.commit = self.log.commit;
        }
        self.send(
            leader,
            self.term,
            Body::InstallSnapshotResponse {
                snapshot_index: index,
                have: id.total_len(),
                done: true,
            },
        );
    }

    /// Whether our log holds the entry at `index` with `term`.
    fn log_has(&self, index: Index, term: Term) -> bool {
        self.log.term_at(index) == Some(term)
    }

    /// The hard state as it stands (the shell writes it when it resets its WAL).
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.commit,
        }
    }

    /// The last non-empty `Ready`'s hard state and entries are durable; its messages are sent.
    pub fn advance(&mut self) {
        if !self.ready_outstanding {
            return;
        }
        self.ready_outstanding = false;
        if let Some(hs) = self.handed_hard_state.take() {
            self.persisted_hard_state = hs;
        }
        self.log.stable_to_last();
        if self.role == Role::Leader {
            self.maybe_commit();
        }
    }
}

/// A committed entry as the applied log keeps it and a query prints it.
pub fn record_of(e: &Entry, duplicate: bool) -> LogRecord {
    let (data, kind) = match &e.payload {
        Payload::Noop => (None, Some("noop")),
        Payload::Config(_) => (None, Some("config")),
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

/// The definite refusal for a client append that did not take effect as sent.
fn refusal(outcome: Applied, client: ClientId, seq: u64) -> ClientResult {
    let reason = match outcome {
        Applied::Collision => format!(
            "client ID collision: request {seq} of client {client:x} was already used for other data; retry with a new client"
        ),
        _ => format!("request {seq} of client {client:x} is older than its latest"),
    };
    ClientResult::Refused { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: NodeId, peers: &[NodeId]) -> Config {
        Config {
            id,
            membership: Membership::voters(&[&[id][..], peers].concat()),
            election_ticks: (10, 20),
            heartbeat_ticks: 2,
            max_inflight: 4,
            seed: 1,
        }
    }

    fn entry(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            payload: Payload::Noop,
        }
    }

    /// A peer message as the tests of this module and its children build them.
    pub(super) fn msg(from: NodeId, to: NodeId, term: Term, body: Body) -> Message {
        Message {
            cluster: 0,
            from,
            to,
            term,
            body,
        }
    }

    /// Carries out a Ready as the shell would and returns it.
    fn flush(n: &mut Node) -> Ready {
        let rd = n.ready();
        n.advance();
        rd
    }

    /// Makes node 1 of {1,2,3} leader by answering its pre-vote and vote requests.
    fn elect(n: &mut Node) {
        while n.role() != Role::PreCandidate {
            n.tick();
        }
        flush(n);
        n.step(msg(
            2,
            1,
            n.term() + 1,
            Body::PreVoteResponse { granted: true },
        ));
        assert_eq!(n.role(), Role::Candidate);
        flush(n);
        n.step(msg(
            2,
            1,
            n.term(),
            Body::RequestVoteResponse { granted: true },
        ));
        assert_eq!(n.role(), Role::Leader);
        flush(n);
    }

    fn accepted(match_index: Index) -> Body {
        Body::AppendEntriesResponse {
            read_seq: 0,
            result: AppendResult::Accepted { match_index },
        }
    }

    #[test]
    fn leader_commits_only_entries_of_its_own_term() {
        // Raft §5.4.2, Figure 8 (c): the new leader (term 4) has replicated the term-2 entry
        // at index 2 to a majority, but it must not count that: a later leader could still
        // overwrite it. Only its own term's entry commits it, indirectly.
        let hs = HardState {
            term: 3,
            vote: None,
            commit: 1,
        };
        let mut n = Node::new(cfg(1, &[2, 3]), hs, vec![entry(1, 1), entry(2, 2)]);
        elect(&mut n);
        assert_eq!(n.term(), 4);
        assert_eq!(n.log().last_index(), 3, "leader appended its no-op");
        n.step(msg(2, 1, 4, accepted(2)));
        flush(&mut n);
        assert_eq!(
            n.commit_index(),
            1,
            "old-term entry committed by counting replicas"
        );
        n.step(msg(2, 1, 4, accepted(3)));
        flush(&mut n);
        assert_eq!(n.commit_index(), 3);
    }

    #[test]
    fn a_vote_is_durable_before_it_is_sent() {
        // Figure 2: votedFor is persistent state, written before answering.
        let vote_request = |last_log_index| Body::RequestVote {
            last_log_index,
            last_log_term: 1,
        };
        let mut n = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        n.step(msg(2, 1, 1, vote_request(0)));
        let rd = flush(&mut n);
        assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((1, Some(2))));
        assert!(!rd.send_before_persist);
        let granted = |g| Body::RequestVoteResponse { granted: g };
        assert_eq!(rd.messages[0].body, granted(true));
        // §5.2: one vote per term, however up to date the second candidate is.
        n.step(msg(3, 1, 1, vote_request(5)));
        let rd = flush(&mut n);
        assert_eq!(rd.messages[0].body, granted(false));
    }

    #[test]
    fn a_leader_replicates_while_writing_and_answers_once_committed() {
        // §10.2.1: the leader may send new entries before writing them itself; the client
        // hears back only once the entry is committed.
        let mut n = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut n);
        let append = ClientRequest {
            id: 1,
            op: ClientOp::Append {
                client: 9,
                seq: 1,
                data: "x".into(),
            },
        };
        n.request("127.0.0.1:9".parse().unwrap(), append);
        let rd = flush(&mut n);
        assert!(rd.send_before_persist);
        assert_eq!(rd.entries.len(), 1);
        assert!(rd.replies.is_empty());
        n.step(msg(2, 1, 1, accepted(2)));
        let rd = flush(&mut n);
        assert_eq!(n.commit_index(), 2);
        let result = &rd.replies[0].1.result;
        assert_eq!(result, &ClientResult::Appended { index: 2, term: 1 });
    }

    #[test]
    fn forged_or_corrupt_messages_are_dropped_not_obeyed() {
        // A leader with a committed log, and a follower of it.
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        assert_eq!(leader.commit_index(), 1);
        let hs = HardState {
            term: 1,
            vote: Some(1),
            commit: 1,
        };
        let mut follower = Node::new(cfg(2, &[1, 3]), hs, vec![entry(1, 1)]);
        let append = |prev: Index, entries: Vec<Entry>| Body::AppendEntries {
            prev_log_index: prev,
            prev_log_term: 0,
            entries,
            leader_commit: 0,
            read_seq: 0,
        };
        let forged = [
            msg(1, 2, 1, append(0, vec![entry(5, 1)])),  // gap
            msg(1, 2, 2, append(0, vec![entry(1, 2)])),  // rewrites a committed entry
            msg(1, 2, 1, append(1, vec![entry(2, 50)])), // entry from a future term
            msg(1, 2, u64::MAX, append(1, vec![])),      // absurd term
            // lengths whose sum overflows (a debug-build panic once)
            msg(
                1,
                2,
                1,
                Body::InstallSnapshot {
                    snapshot: SnapshotId {
                        index: 5,
                        term: 1,
                        records_len: u64::MAX,
                        meta_len: 10,
                        ..SnapshotId::default()
                    },
                    offset: 20,
                    data: String::new(),
                    crc: 0,
                },
            ),
        ];
        for m in forged {
            follower.step(m);
            flush(&mut follower);
        }
        assert_eq!(follower.term(), 1);
        assert_eq!(follower.log().entries(), &[entry(1, 1)]);
        let rejected = |prev| Body::AppendEntriesResponse {
            read_seq: 0,
            result: AppendResult::Rejected {
                prev_log_index: prev,
                hint_index: prev,
                hint_term: 0,
            },
        };
        for m in [
            msg(2, 1, 1, accepted(1000)),
            msg(3, 1, 1, accepted(u64::MAX)),
            msg(2, 1, 1, rejected(1000)),
        ] {
            leader.step(m);
            flush(&mut leader);
        }
        for _ in 0..10 {
            leader.tick();
            flush(&mut leader);
        }
        assert_eq!(
            leader.commit_index(),
            1,
            "forged acks must not commit anything"
        );
        assert_eq!(leader.role(), Role::Leader);
    }

    #[test]
    fn a_follower_that_lost_its_log_is_replicated_to_again() {
        // Outside Raft's fault model (a wiped data dir), but it must not wedge replication.
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        let mut wiped = Node::new(cfg(2, &[1, 3]), HardState::default(), vec![]);
        // Let the leader's heartbeats and the wiped follower's answers flow a while.
        for _ in 0..20 {
            leader.tick();
            for m in flush(&mut leader).messages {
                if m.to == 2 {
                    wiped.step(m);
                    for answer in flush(&mut wiped).messages {
                        leader.step(answer);
                        flush(&mut leader);
                    }
                }
            }
        }
        assert_eq!(wiped.log().last_index(), leader.log().last_index());
    }

    fn append_req(id: u64, client: ClientId, seq: u64, data: &str) -> ClientRequest {
        ClientRequest {
            id,
            op: ClientOp::Append {
                client,
                seq,
                data: data.into(),
            },
        }
    }

    fn client_addr() -> ReplyTo {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn a_stale_term_rejection_does_not_move_a_follower_backwards() {
        // Node 1 led term 1 with entries 1-3 on node 2, then was re-elected in term 2. Node 2,
        // already in term 2, answers a delayed term-1 heartbeat; that answer reaches node 1 as
        // leader of term 2 and must not be taken as node 2 losing its log.
        let hs = HardState {
            term: 1,
            vote: Some(1),
            commit: 3,
        };
        let log = vec![entry(1, 1), entry(2, 1), entry(3, 1)];
        let mut leader = Node::new(cfg(1, &[2, 3]), hs, log.clone());
        elect(&mut leader);
        assert_eq!(leader.term(), 2);
        leader.step(msg(2, 1, 2, accepted(3)));
        flush(&mut leader);
        assert_eq!(leader.progress[&2].match_index, 3);

        let hs = HardState {
            term: 2,
            vote: Some(1),
            commit: 3,
        };
        let mut follower = Node::new(cfg(2, &[1, 3]), hs, log);
        let stale_heartbeat = Body::AppendEntries {
            prev_log_index: 3,
            prev_log_term: 1,
            entries: vec![],
            leader_commit: 3,
            read_seq: 0,
        };
        follower.step(msg(1, 2, 1, stale_heartbeat));
        let answers = flush(&mut follower).messages;
        assert_eq!(answers.len(), 1, "a stale leader is told the newer term");
        assert_eq!(answers[0].term, 2);
        for m in answers {
            leader.step(m);
            flush(&mut leader);
        }
        assert_eq!(leader.role(), Role::Leader);
        assert_eq!(
            leader.progress[&2].match_index, 3,
            "match index went backwards on a stale answer"
        );
    }

    #[test]
    fn a_late_rejection_in_the_same_term_does_not_move_a_follower_backwards() {
        // A probe at index 2 that node 2 refused (it had only entry 1) arrives late, duplicated,
        // after node 2 has caught up: only a refusal of a request sent after the leader learned
        // the match index may count as a wiped follower.
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.request(client_addr(), append_req(1, 9, 1, "x"));
        flush(&mut leader);
        leader.step(msg(2, 1, 1, accepted(2)));
        flush(&mut leader);
        assert_eq!(leader.progress[&2].match_index, 2);
        let late = Body::AppendEntriesResponse {
            read_seq: 0,
            result: AppendResult::Rejected {
                prev_log_index: 2,
                hint_index: 2,
                hint_term: 0,
            },
        };
        leader.step(msg(2, 1, 1, late));
        flush(&mut leader);
        assert_eq!(leader.progress[&2].match_index, 2);
    }

    #[test]
    fn a_deposed_leader_is_told_the_new_term_even_if_its_entries_conflict() {
        // Node 2 has committed entry 2 of term 3. The leader of term 2 still sends its own,
        // uncommitted entry 2: that conflict must not hide the newer term from it.
        let hs = HardState {
            term: 3,
            vote: None,
            commit: 2,
        };
        let mut follower = Node::new(cfg(2, &[1, 3]), hs, vec![entry(1, 1), entry(2, 3)]);
        let old = Body::AppendEntries {
            prev_log_index: 1,
            prev_log_term: 1,
            entries: vec![entry(2, 2)],
            leader_commit: 1,
            read_seq: 0,
        };
        follower.step(msg(1, 2, 2, old));
        let answers = flush(&mut follower).messages;
        assert_eq!(answers.len(), 1, "no answer to a deposed leader");
        assert_eq!((answers[0].to, answers[0].term), (1, 3));
        assert_eq!(follower.log().entries(), &[entry(1, 1), entry(2, 3)]);

        let mut deposed = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut deposed);
        deposed.step(answers[0].clone());
        assert_eq!((deposed.role(), deposed.term()), (Role::Follower, 3));
    }

    #[test]
    fn an_echo_of_a_read_seq_never_sent_confirms_no_read() {
        // Thesis §6.4: a read is served only after a majority answers a round sent after it.
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        let query = ClientRequest {
            id: 5,
            op: ClientOp::Query {
                start: 1,
                read_index: None,
            },
        };
        leader.request(client_addr(), query);
        flush(&mut leader);
        let forged = Body::AppendEntriesResponse {
            read_seq: leader.read_seq + 1000,
            result: AppendResult::Accepted { match_index: 1 },
        };
        leader.step(msg(2, 1, 1, forged));
        assert!(
            flush(&mut leader).replies.is_empty(),
            "read served unconfirmed"
        );
        let genuine = Body::AppendEntriesResponse {
            read_seq: leader.read_seq,
            result: AppendResult::Accepted { match_index: 1 },
        };
        leader.step(msg(2, 1, 1, genuine));
        let replies = flush(&mut leader).replies;
        assert!(matches!(replies[0].1.result, ClientResult::Entries { .. }));
    }

    #[test]
    fn a_rejection_at_index_0_is_dropped_not_taken_as_a_match() {
        // Every log matches at index 0, so no follower rejects there. Taken as "the follower
        // lost its log", index 0 used to underflow into a match index the follower never
        // acknowledged, committing entries held by no majority.
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        for seq in 1..=3 {
            leader.request(client_addr(), append_req(seq, 9, seq, "x"));
            flush(&mut leader);
        }
        for _ in 0..3 {
            leader.tick();
            flush(&mut leader);
        }
        assert_eq!(leader.log().last_index(), 4);
        let forged = Body::AppendEntriesResponse {
            read_seq: leader.read_seq,
            result: AppendResult::Rejected {
                prev_log_index: 0,
                hint_index: 5,
                hint_term: 0,
            },
        };
        leader.step(msg(2, 1, 1, forged));
        flush(&mut leader);
        assert_eq!(leader.commit_index(), 1, "nothing new was acknowledged");
        assert_eq!(leader.status().followers[0].match_index, 1);
    }

    #[test]
    fn retries_of_an_uncommitted_append_keep_one_waiter_and_get_one_answer() {
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        for attempt in 1..=50 {
            leader.request(client_addr(), append_req(attempt, 9, 1, "x"));
            flush(&mut leader);
        }
        assert_eq!(leader.log().last_index(), 2, "one entry for all retries");
        assert_eq!(leader.waiters.len(), 1);
        leader.step(msg(2, 1, 1, accepted(2)));
        let replies = flush(&mut leader).replies;
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1.id, 50, "the latest attempt is answered");
    }

    #[test]
    fn a_client_id_collision_is_refused_not_acknowledged_as_anothers_write() {
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        let refused = |rd: Ready| {
            rd.replies.iter().any(|(_, r)| {
                matches!(&r.result, ClientResult::Refused { reason } if reason.contains("client ID collision"))
            })
        };
        // Two clients drew ID 9; both send their first append.
        leader.request(client_addr(), append_req(1, 9, 1, "mine"));
        flush(&mut leader);
        leader.request(client_addr(), append_req(2, 9, 1, "theirs"));
        assert!(
            refused(flush(&mut leader)),
            "collision with a pending entry"
        );
        leader.step(msg(2, 1, 1, accepted(2)));
        let rd = flush(&mut leader);
        let appended = ClientResult::Appended { index: 2, term: 1 };
        assert_eq!(rd.replies.len(), 1);
        assert_eq!(rd.replies[0].1.result, appended);
        leader.request(client_addr(), append_req(3, 9, 1, "theirs"));
        assert!(
            refused(flush(&mut leader)),
            "collision with an applied entry"
        );
        leader.request(client_addr(), append_req(4, 9, 1, "mine"));
        assert_eq!(flush(&mut leader).replies[0].1.result, appended);
    }

    #[test]
    fn a_late_refusal_does_not_cancel_a_granted_vote() {
        // Five voters: node 2 grants, then its answer to an earlier request (a refusal) arrives;
        // with node 3's grant that is a majority.
        let mut n = Node::new(cfg(1, &[2, 3, 4, 5]), HardState::default(), vec![]);
        while n.role() != Role::PreCandidate {
            n.tick();
        }
        flush(&mut n);
        for voter in [2, 3] {
            n.step(msg(voter, 1, 1, Body::PreVoteResponse { granted: true }));
        }
        assert_eq!(n.role(), Role::Candidate);
        flush(&mut n);
        let vote = |g| Body::RequestVoteResponse { granted: g };
        n.step(msg(2, 1, 1, vote(true)));
        n.step(msg(2, 1, 1, vote(false)));
        n.step(msg(3, 1, 1, vote(true)));
        assert_eq!(n.role(), Role::Leader);
    }

    /// Delivers every message among `nodes` (indexed by ID - 1) until none is left, returning
    /// the client replies they produced.
    fn exchange(nodes: &mut [Node]) -> Vec<ClientReply> {
        let mut replies = Vec::new();
        let mut queue: Vec<Message> = Vec::new();
        for n in nodes.iter_mut() {
            let rd = flush(n);
            queue.extend(rd.messages);
            replies.extend(rd.replies.into_iter().map(|(_, r)| r));
        }
        replies.extend(deliver(nodes, queue));
        replies
    }

    /// Delivers `queue` and everything it causes among `nodes`; returns the client replies.
    fn deliver(nodes: &mut [Node], mut queue: Vec<Message>) -> Vec<ClientReply> {
        let mut replies = Vec::new();
        while let Some(m) = queue.pop() {
            let n = &mut nodes[m.to as usize - 1];
            n.step(m);
            let rd = flush(n);
            queue.extend(rd.messages);
            replies.extend(rd.replies.into_iter().map(|(_, r)| r));
        }
        replies
    }

    fn transfer_req(id: u64, target: Option<NodeId>) -> ClientRequest {
        ClientRequest {
            id,
            op: ClientOp::TransferLeader {
                target,
                away_from: None,
            },
        }
    }

    fn three_nodes_led_by_1() -> Vec<Node> {
        let mut nodes: Vec<Node> = (1..=3)
            .map(|id| {
                let peers: Vec<NodeId> = (1..=3).filter(|&p| p != id).collect();
                Node::new(cfg(id, &peers), HardState::default(), vec![])
            })
            .collect();
        while nodes[0].role() != Role::PreCandidate {
            nodes[0].tick();
        }
        exchange(&mut nodes);
        assert_eq!(nodes[0].role(), Role::Leader);
        nodes
    }

    #[test]
    fn leadership_transfer_hands_over_to_the_target_and_answers_once_it_leads() {
        // Thesis §3.10: catch the target up, TimeoutNow, the target campaigns at once.
        let mut nodes = three_nodes_led_by_1();
        nodes[0].request(client_addr(), transfer_req(7, Some(2)));
        let replies = exchange(&mut nodes);
        assert_eq!(nodes[1].role(), Role::Leader);
        assert_eq!(nodes[0].role(), Role::Follower);
        let term = nodes[1].term();
        assert_eq!(term, 2, "one election, without pre-vote");
        let answer = replies
            .iter()
            .find(|r| r.id == 7)
            .expect("the transfer is answered");
        assert_eq!(answer.result, ClientResult::Transferred { leader: 2, term });
    }

    #[test]
    fn timeout_now_from_anyone_but_the_leader_is_ignored() {
        let mut nodes = three_nodes_led_by_1();
        let term = nodes[0].term();
        nodes[1].step(msg(3, 2, term, Body::TimeoutNow));
        flush(&mut nodes[1]);
        assert_eq!(nodes[1].role(), Role::Follower);
        assert_eq!(nodes[1].term(), term, "no election");
        nodes[1].step(msg(1, 2, term, Body::TimeoutNow));
        flush(&mut nodes[1]);
        assert_eq!(nodes[1].role(), Role::Candidate, "the leader's is obeyed");
        // A follower that knows no leader (restarted) takes it from whoever sends it.
        let (hs, log) = (nodes[2].hard_state(), nodes[2].log().entries().to_vec());
        let mut restarted = Node::new(cfg(3, &[1, 2]), hs, log);
        restarted.step(msg(1, 3, term, Body::TimeoutNow));
        assert_eq!(restarted.role(), Role::Candidate);
    }

    #[test]
    fn appends_wait_during_a_transfer_and_go_to_the_new_leader() {
        let mut nodes = three_nodes_led_by_1();
        // Node 2 has not received entry 2 yet: TimeoutNow must wait for it.
        nodes[0].request(client_addr(), append_req(6, 9, 1, "before"));
        let mut queue = flush(&mut nodes[0]).messages;
        nodes[0].request(client_addr(), transfer_req(7, Some(2)));
        let rd = flush(&mut nodes[0]);
        assert!(
            !rd.messages.iter().any(|m| m.body == Body::TimeoutNow),
            "TimeoutNow before the target caught up"
        );
        queue.extend(rd.messages);
        let last = nodes[0].log().last_index();
        nodes[0].request(client_addr(), append_req(8, 9, 2, "held"));
        queue.extend(flush(&mut nodes[0]).messages);
        assert_eq!(
            nodes[0].log().last_index(),
            last,
            "an append during a transfer"
        );
        let replies = deliver(&mut nodes, queue);
        let held = replies
            .iter()
            .find(|r| r.id == 8)
            .expect("held append answered");
        assert_eq!(held.result, ClientResult::NotLeader { leader: Some(2) });
        assert_eq!(nodes[1].role(), Role::Leader);
        assert_eq!(
            nodes[1].log().get(2).map(|e| e.term),
            Some(1),
            "entry 2 kept"
        );
    }

    #[test]
    fn a_transfer_to_a_silent_target_is_abandoned_and_held_appends_proceed() {
        let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut leader);
        leader.step(msg(2, 1, 1, accepted(1)));
        flush(&mut leader);
        leader.request(client_addr(), transfer_req(7, Some(3)));
        flush(&mut leader);
        leader.request(client_addr(), append_req(8, 9, 1, "held"));
        flush(&mut leader);
        assert_eq!(leader.log().last_index(), 1);
        let mut replies = Vec::new();
        for _ in 0..25 {
            leader.tick();
            // Node 2 keeps the leader in contact with a majority.
            leader.step(msg(2, 1, 1, accepted(leader.log().last_index())));
            replies.extend(flush(&mut leader).replies);
        }
        assert_eq!(leader.role(), Role::Leader);
        let abandoned = replies.iter().find(|(_, r)| r.id == 7).expect("answered");
        assert!(
            matches!(&abandoned.1.result, ClientResult::Refused { reason } if reason.contains("abandoned")),
            "{:?}",
            abandoned.1.result
        );
        assert_eq!(leader.log().last_index(), 2, "the held append was proposed");
        let appended = replies.iter().find(|(_, r)| r.id == 8).expect("answered");
        assert_eq!(
            appended.1.result,
            ClientResult::Appended { index: 2, term: 1 }
        );
    }

    #[test]
    fn a_transfer_request_is_checked() {
        let mut nodes = three_nodes_led_by_1();
        let result = |nodes: &mut Vec<Node>, req| {
            nodes[0].request(client_addr(), req);
            flush(&mut nodes[0]).replies[0].1.result.clone()
        };
        let refused = |r: &ClientResult, what: &str| matches!(r, ClientResult::Refused { reason } if reason.contains(what));
        let r = result(&mut nodes, transfer_req(1, Some(9)));
        assert!(refused(&r, "not a voter"), "{r:?}");
        let r = result(&mut nodes, transfer_req(2, Some(1)));
        assert_eq!(r, ClientResult::Transferred { leader: 1, term: 1 });
        // A retry that reaches a new leader after it took over moves nothing.
        let away = ClientRequest {
            id: 3,
            op: ClientOp::TransferLeader {
                target: None,
                away_from: Some(3),
            },
        };
        let r = result(&mut nodes, away);
        assert_eq!(r, ClientResult::Transferred { leader: 1, term: 1 });
        nodes[0].request(client_addr(), transfer_req(4, Some(2)));
        flush(&mut nodes[0]);
        let r = result(&mut nodes, transfer_req(5, Some(3)));
        assert!(refused(&r, "in progress"), "{r:?}");
    }

    #[test]
    fn status_counts_elections_and_leader_changes_and_shows_followers_on_the_leader() {
        let mut nodes = three_nodes_led_by_1();
        let s1 = nodes[0].status();
        assert_eq!((s1.elections_started, s1.leader_changes), (1, 1));
        let ids: Vec<NodeId> = s1.followers.iter().map(|f| f.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert!(s1
            .followers
            .iter()
            .all(|f| f.lag == 0 && f.match_index == 1));
        let s2 = nodes[1].status();
        assert_eq!((s2.elections_started, s2.leader_changes), (0, 1));
        assert!(s2.followers.is_empty(), "only a leader reports followers");
        nodes[0].tick();
        assert_eq!(nodes[0].status().followers[0].last_contact_ticks, 1);

        nodes[0].request(client_addr(), transfer_req(7, Some(2)));
        exchange(&mut nodes);
        let (s1, s2) = (nodes[0].status(), nodes[1].status());
        assert_eq!((s1.elections_started, s1.leader_changes), (1, 2));
        assert_eq!((s2.elections_started, s2.leader_changes), (1, 2));
    }
}
