//! The Raft core: a pure state machine stepped by messages, ticks and client requests, which
//! returns its effects as a [`Ready`]. Term handling happens once in [`Node::step`]; then one
//! function per role handles the message.

use super::backup_state;
use super::configurations::Configurations;
use super::log::RaftLog;
use super::membership::{ConfChange, Membership};
use super::message::*;
use super::progress::{Progress, ProgressState};
use super::ready::{Waiter, ENTRY_BUDGET};
use super::rng::Rng;
use super::snapshot::{SnapshotId, SnapshotReceive, SnapshotSend, SnapshotState, CHUNK_BYTES};
use super::state_machine::{Applied, StateMachine};
use super::transfer::{self, HeldAppend, Transfer};
use super::types::*;
use log::{debug, info, warn};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

mod reads;
mod reconfig;
#[cfg(test)]
mod snapshot_tests;
mod started_over;
mod users;
use super::ready::{ChunkRead, ChunkWrite, HardState, Ready, StoreRead};
use super::state_machine::record_of;
use reads::ReadOf;
pub use reconfig::PROMOTE_MAX_LAG;
pub use started_over::vote_floor_from;

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
    /// A peer started over on an empty data dir votes and campaigns only once its log reaches
    /// this index or holds an entry of a term above `vote_floor_term` (see `started_over.rs`);
    /// 0: no floor.
    pub vote_floor: Index,
    pub vote_floor_term: Term,
    /// A peer started over on an empty data dir: its first vote floor (index, term), kept for
    /// good. A removal of this ID at or before it removed an earlier server (see
    /// `started_over.rs`); (0, 0): never started over.
    pub started_over: (Index, Term),
}

/// A linearizable query waiting for a majority to confirm leadership (thesis §6.4).
#[derive(Clone, Debug)]
struct PendingRead {
    /// Confirmed once a majority echoes a read sequence number at least this large.
    seq: u64,
    /// The commit index when the read arrived; the answer covers the log up to here.
    read_index: Index,
    what: ReadOf,
    waiter: Waiter,
}

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
    reads_before_own_commit: Vec<(ReadOf, Waiter)>,
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
    /// ticks since they also acknowledged it). See `tick_leaving`; a new leader starts with
    /// every removal still in its log (`tell_removed_members`).
    leaving: BTreeMap<NodeId, (Index, u64, u64)>,
    /// This node has been a member of a configuration it applied (or of the bootstrap one).
    was_member: bool,
    /// A committed configuration no longer lists this node, which was a member, no later one
    /// added it back, and our commit index had caught up with the leader's when we saw it: it
    /// takes no further part, and the shell stops it. See `note_removal`.
    removed: bool,
    /// Entries (index, term) that removed this node and that a later configuration in its log
    /// undid (it was added back, `Rejoin`), remembered even once a truncation took the later
    /// one away: no removal of ours. See `note_removal`.
    undone_removals: BTreeSet<(Index, Term)>,
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
    /// Follower: the snapshot streams sent to it this term, to drop stale chunks.
    receiving: SnapshotReceive,
    /// No vote or campaign until the log reaches this (index, term of the AppendEntries that
    /// set it); index 0: none. See `started_over.rs`.
    vote_floor: (Index, Term),
    /// See [`Config::started_over`]; set with the first vote floor, never cleared.
    started_over: (Index, Term),
    /// Copies of the sessions and configuration that backups being saved read in pages.
    backup_copies: backup_state::BackupCopies,
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
                    StateMachine::from_snapshot(state),
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
        let (vote_floor, started_over) = ((cfg.vote_floor, cfg.vote_floor_term), cfg.started_over);
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
            undone_removals: BTreeSet::new(),
            elections_started: 0,
            leader_changes: 0,
            last_leader_seen: None,
            snapshot: snapshot.map(|(_, id)| id),
            mem_floor,
            applied_records: Vec::new(),
            store_reads: Vec::new(),
            chunk_reads: Vec::new(),
            chunk_writes: Vec::new(),
            receiving: SnapshotReceive::default(),
            vote_floor,
            started_over,
            backup_copies: Default::default(),
        };
        node.reached_vote_floor();
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
            disk_full: false,
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
                // Below its vote floor a node's log may lack committed entries: it must not
                // stand either (started_over.rs).
                if self.election_elapsed >= self.election_timeout && self.reached_vote_floor() {
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
        self.tell_removed_members();
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
            reply_at: None,
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
            Body::ClusterProbe | Body::ClusterProbeAnswer => Err("the shell's to answer".into()),
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
        if !self.receiving.admits(self.term, &snapshot) {
            debug!(
                "node {}: ignoring a late chunk of snapshot {} from {}: a newer one is on its way",
                self.cfg.id, snapshot.index, msg.from
            );
            return;
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
        if !self.is_voter() || !self.reached_vote_floor() {
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
        let floor = self.vote_floor_allows(last_log_index, last_log_term);
        let granted = (self.vote.is_none() || self.vote == Some(msg.from))
            && self.role != Role::Leader
            && floor
            && self.log.is_up_to_date(last_log_index, last_log_term);
        if !floor {
            self.below_vote_floor(msg.from);
        }
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
        let floor = self.vote_floor_allows(last_log_index, last_log_term);
        let granted = msg.term > self.term
            && !leader_alive
            && floor
            && self.log.is_up_to_date(last_log_index, last_log_term);
        if !floor {
            self.below_vote_floor(msg.from);
        }
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
                self.reached_vote_floor();
                let log = &self.log;
                self.configs.retain_in_log(|i| log.term_at(i));
                self.configs.appended(&entries);
                if entries
                    .iter()
                    .any(|e| matches!(e.payload, Payload::Config(_)))
                {
                    self.note_undone_removals();
                }
                if self.log.commit_to(leader_commit.min(match_index)) {
                    self.apply_committed();
                }
                // Only from an AppendEntries that brought our commit index to the leader's: a
                // late one may carry a commit index the leader held back (`commit_for`) below
                // the one a newer AppendEntries already gave us, which may then cover a removal
                // of ours that the leader knows a later configuration undoes.
                if match_index >= leader_commit && self.log.commit == leader_commit {
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
        pr.heard_from();
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
                if self.started_over(from, hint_index, hint_term) {
                    return;
                }
                let pr = self.progress.get_mut(&from).expect("checked above");
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
        pr.heard_from();
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
                leader_commit: self.commit_for(to),
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
        if self.hold_snapshot(to, id.index) {
            return;
        }
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
                        leader_commit: self.commit_for(to),
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
                        leader_commit: self.commit_for(to),
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
                    (_, Payload::User(change)) => self.user_result(index, entry.term, change),
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
            ClientOp::Query { start, read_index } | ClientOp::Backup { start, read_index } => {
                self.query(waiter, start, read_index)
            }
            ClientOp::BackupState { at, from } => {
                let now = || backup_state::Copy::of(&self.sm, &self.configs, &self.log);
                let page = self.backup_copies.page(at, from, ENTRY_BUDGET, now);
                self.reply(waiter, page)
            }
            ClientOp::TransferLeader { target, away_from } => {
                self.start_transfer(waiter, target, away_from)
            }
            ClientOp::ChangeMembers { change, force } => self.change_members(waiter, change, force),
            ClientOp::Users(op) => self.users_request(waiter, op),
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
        self.read(waiter, ReadOf::Log { start })
    }

    /// Answers `what` as of the commit index once a majority confirms we still lead.
    fn read(&mut self, waiter: Waiter, what: ReadOf) {
        if self.log.term_at(self.log.commit) != Some(self.term) {
            // Until an entry of our term commits, our commit index may be behind the
            // previous leader's.
            self.reads_before_own_commit.push((what, waiter));
            return;
        }
        let me = self.cfg.id;
        if self.membership().voter_ids().all(|id| id == me) && self.is_voter() {
            let commit = self.log.commit;
            return self.answer_read(waiter, what, commit);
        }
        self.read_seq += 1;
        self.pending_reads.push_back(PendingRead {
            seq: self.read_seq,
            read_index: self.log.commit,
            what,
            waiter,
        });
        self.heartbeat_now = true;
    }

    fn serve_reads_waiting_for_own_commit(&mut self) {
        for (what, waiter) in std::mem::take(&mut self.reads_before_own_commit) {
            self.read(waiter, what);
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
            self.answer_read(r.waiter, r.what, r.read_index);
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
            users: self.sm.users().records(),
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
            self.sm = StateMachine::from_snapshot(&state);
            self.configs = Configurations::restore_after(
                state.membership,
                state.config_at,
                index,
                &state.removed,
                &[],
            );
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
mod tests;
