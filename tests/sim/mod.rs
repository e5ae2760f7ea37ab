//! A deterministic cluster simulator for the Raft core: N cores in one process over a seeded,
//! virtual-time network that drops, duplicates, reorders, delays (some datagrams by seconds) and
//! partitions datagrams, with crash-restart from durable state (also part-way through a
//! `Ready`), SIGSTOP-like pauses, leadership transfers and retrying clients. Raft's safety
//! properties are checked after every event, incrementally so that long runs stay cheap; a
//! failure panics with the seed, and `SIM_SEED=<seed>` reruns that seed (`SIM_PARANOID=1` adds
//! the full, quadratic versions of the checks).
//!
//! Membership (thesis ch. 4): an administrator issues one-server changes as a client does
//! ([`Sim::change_members`]), node slots start and stop with them (a joining node starts with
//! an empty disk and an empty bootstrap configuration; a node stops once `removed()`), and
//! the invariants are computed against the configurations in force. A removed node can be
//! started over on an empty disk and added back ([`Sim::rejoin`]), and a node restarted with
//! a JSON listing an old set of peers ([`Sim::restart_with_peers`]).
//!
//! Addresses: as the real shell, a node sends only to peers it has an address for, and takes
//! messages only from them: those of its JSON (a joining node's contact points), of its
//! `cluster` file's bootstrap membership and of every configuration in force in its life
//! (never forgotten), plus, with [`SimConfig::learn_addresses`], every peer that sent it a
//! message (the sender's address rides in it). Messages it has no address for are not sent
//! ([`Stats::unaddressed`]); messages from a sender it cannot place are dropped
//! ([`Stats::unknown_sender`]).
//!
//! Storage (`disk.rs`): each node runs the real storage code (`raft::storage::Disk`: WAL,
//! store, snapshots, staged installs, and the node loop's after-advance round trip) over a
//! simulated filesystem of its own, so crashes are process kills or power cuts that lose what
//! was not synced. With [`SimConfig::snapshot_every`] set, nodes take snapshots as the peer
//! does, compacting their WALs; leaders stream snapshots in chunks through the simulated
//! network, receivers stage and install them; crashes strike before the core is told of a
//! snapshot and at the fsyncs of an install. The checks then compare logs only where both
//! still hold entries, and the stores' records (the applied history) with each other and with
//! what was committed.
//!
//! Disk faults (`faults.rs`, `SIM_DISK_FAULTS=0` turns them off): a node's disk fills for a
//! while, and its next fsync or write fails, carried out as the peer's node loop does: a batch
//! with no room holds the whole Ready and is retried, a failed fsync or write exits the process.

#![allow(dead_code)]

mod checks;
mod clients;
mod disk;
mod faults;
#[allow(unused_imports)] // by tests/simulation.rs, not tests/membership.rs
pub use faults::{disk_faults_enabled, DiskStats};
mod membership;

use raft::peer::AfterAdvance;
use raft::raft::node::RoutingKey;
use raft::raft::record_of;
use raft::raft::{
    Body, ClientId, ClientOp, ClientReply, ClientRequest, ClientResult, ConfChange, Config,
    Datagram, Entry, HardState, Index, LogRecord, MemberRole, Membership, Message, Node, NodeId,
    Payload, Ready, ReplyTo, Role, SnapshotId, SnapshotState, Term,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Virtual microseconds.
pub type Time = u64;
pub const MS: Time = 1_000;

#[allow(unused_imports)]
pub use membership::address_of;
pub use raft::raft::rng::Rng;

/// Knobs of the simulated world.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub tick: Time,
    pub election_ticks: (u64, u64),
    pub heartbeat_ticks: u64,
    pub max_inflight: usize,
    /// Probability that a datagram is lost / delivered twice.
    pub drop: f64,
    pub duplicate: f64,
    /// One-way delay, uniform in this range (random delays reorder datagrams).
    pub delay: (Time, Time),
    /// Probability that a datagram is instead delayed by `long_delay_range` (the MIT lab's
    /// long-reordering network: it arrives long after everything sent after it).
    pub long_delay: f64,
    pub long_delay_range: (Time, Time),
    /// Probability, per Ready, that the node crashes while carrying it out (at a point chosen
    /// uniformly among the kinds of [`CrashPoint`] that Ready has).
    pub crash_in_ready: f64,
    /// How long a client waits for an answer before retrying elsewhere.
    pub client_retry: Time,
    /// Datagrams a paused node's socket buffer holds; later ones are lost, as in a full buffer.
    pub pause_buffer: usize,
    /// Snapshots: a node takes one once it has applied this many entries past its latest,
    /// keeping this many entries before it in its log. None: never (the core then behaves as
    /// before snapshots existed).
    pub snapshot_every: Option<(u64, u64)>,
    /// Probability of crashing at each snapshot crash point met (see [`SNAPSHOT_CRASH_POINTS`];
    /// for a power cut during an install, per round trip that stages chunks).
    pub crash_in_snapshot: f64,
    /// Whether a node learns the address of the sender of every peer message delivered to it
    /// (the sender's address rides in the message), and so takes messages from, and answers,
    /// any peer. Off: as a shell that knows only the addresses of its JSON, its `cluster`
    /// file and its configurations, it drops what comes from anyone else (see [`Sim::admit`]).
    pub learn_addresses: bool,
    /// Whether [`Sim::random_membership_change`] now and then adds a removed node back
    /// ([`ConfChange::Rejoin`], the node started over on an empty disk).
    pub rejoins: bool,
}

impl SimConfig {
    pub fn reliable(nodes: usize) -> SimConfig {
        SimConfig {
            nodes,
            tick: 10 * MS,
            election_ticks: (15, 30),
            heartbeat_ticks: 5,
            max_inflight: 8,
            drop: 0.0,
            duplicate: 0.0,
            delay: (100, 2 * MS),
            long_delay: 0.0,
            long_delay_range: (200 * MS, 2_000 * MS),
            crash_in_ready: 0.0,
            client_retry: 100 * MS,
            pause_buffer: 1_000,
            snapshot_every: None,
            crash_in_snapshot: 0.0,
            learn_addresses: true,
            rejoins: true,
        }
    }
    pub fn unreliable(nodes: usize) -> SimConfig {
        SimConfig {
            drop: 0.1,
            duplicate: 0.05,
            delay: (100, 20 * MS),
            ..SimConfig::reliable(nodes)
        }
    }
}

/// What the real storage code reported durable when it returned (see `disk.rs`): whatever a
/// Ready persisted, the latest snapshot announced or installed, the WAL compacted to the
/// core's base, and the records applied; and the `cluster` file, modelled here.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    /// The WAL: its base (the last index and term compacted into a snapshot), and the entries
    /// after it.
    pub base: (Index, Term),
    pub entries: Vec<Entry>,
    /// The applied log (one record per applied entry, from index 1). Durable up to the latest
    /// snapshot's index: a restart cuts it back there, as the real store does.
    pub store: Vec<LogRecord>,
    /// The latest snapshot, durable.
    pub snapshot: Option<(SnapshotState, SnapshotId)>,
    /// The `cluster` file of a joining node: whether it adopted its cluster, and its vote
    /// floor until its log reached it (see `raft::node::vote_floor_from`), and that first
    /// floor for good (`started_over`).
    pub adopted: bool,
    pub vote_floor: (Index, Term),
    pub started_over: (Index, Term),
}

impl Disk {
    fn persist(&mut self, hard_state: Option<HardState>, entries: &[Entry]) {
        if let Some(hs) = hard_state {
            self.hard_state = hs;
        }
        if let Some(first) = entries.first() {
            self.entries
                .truncate((first.index - self.base.0 - 1) as usize);
            self.entries.extend_from_slice(entries);
        }
    }

    /// The WAL's last index.
    pub fn last_index(&self) -> Index {
        self.base.0 + self.entries.len() as Index
    }

    pub fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |(s, _)| s.index)
    }
}

/// Whether `r` is what applying `e` records (as itself, or as a duplicate that took no effect).
fn record_matches(r: &LogRecord, e: &Entry) -> bool {
    *r == record_of(e, r.kind.as_deref() == Some("duplicate"))
}

/// Where in carrying out a Ready a node crashed. Every point leaves a state the shell can
/// really be in, so recovery from each must keep every promise made before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CrashPoint {
    /// Nothing done: the write was lost whole.
    BeforePersist,
    /// A leader replicating while writing: some or all messages out, its own write lost.
    SentBeforePersist,
    /// Durable, nothing sent.
    AfterPersist,
    /// Durable, some messages sent and some not.
    BetweenMessages,
    /// Durable and sent, but the core was never told (`advance` not called).
    BeforeAdvance,
    /// The power failed while the batch was written: on restart it is there whole, or not
    /// at all (a torn tail is cut off).
    TornPersist,
    /// Advanced; some or all client replies not sent.
    BeforeReplies,
    /// A snapshot taken is durable, but the core was never told (`snapshot_taken` not called,
    /// the WAL not compacted).
    SnapshotBeforeTaken,
    /// The power failed at one of the fsyncs of staging or installing a received snapshot
    /// (among them: the store swapped in, the WAL not yet reset to its base, so that a restart
    /// finds a WAL that may not reach the snapshot).
    InstallPowerCut,
    /// A received snapshot is durable and the WAL reset, but the core was never told
    /// (`install_snapshot` not called, so no acknowledgement).
    InstallBeforeAck,
}

/// Where snapshot work may crash, with probability [`SimConfig::crash_in_snapshot`] each.
pub const SNAPSHOT_CRASH_POINTS: [CrashPoint; 3] = [
    CrashPoint::SnapshotBeforeTaken,
    CrashPoint::InstallPowerCut,
    CrashPoint::InstallBeforeAck,
];

pub const CRASH_POINTS: [CrashPoint; 7] = [
    CrashPoint::BeforePersist,
    CrashPoint::TornPersist,
    CrashPoint::SentBeforePersist,
    CrashPoint::AfterPersist,
    CrashPoint::BetweenMessages,
    CrashPoint::BeforeAdvance,
    CrashPoint::BeforeReplies,
];

/// One step of carrying out a Ready, in the shell's order.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Act {
    Persist,
    Send(usize),
    Advance,
    Reply(usize),
}

#[derive(Clone, Debug)]
enum Event {
    Deliver(Message),
    Tick(NodeId),
    Request(NodeId, ReplyTo, ClientRequest),
    Reply(ReplyTo, ClientReply),
    ClientTimer(usize, u64),
    AdminTimer(u64),
    /// A node waiting for space tries again (the wait's serial).
    DiskRetry(NodeId, u64),
    /// A full disk's episode ends (its serial).
    SpaceBack(NodeId, u64),
}

/// Where the administrator's answers go.
const ADMIN_PORT: u16 = 39999;

/// The administrator's membership change in progress, retried as a client does until it gets
/// a definite answer.
#[derive(Clone, Debug)]
pub struct AdminOp {
    pub change: ConfChange,
    target: NodeId,
    request_id: u64,
    pub since: Time,
    /// The last answer was Busy: the next attempt goes to the same node.
    retry_same: bool,
}

/// One completed client operation, for checking what clients saw.
#[derive(Clone, Debug)]
pub enum Op {
    Append {
        data: String,
        index: Index,
        invoked: Time,
        returned: Time,
    },
    /// A definite refusal, which only a client sharing its ID with another may get.
    Refused { data: String, reason: String },
    Query {
        /// Entries `start..=read_index`, from every page.
        log: Vec<LogRecord>,
        start: Index,
        read_index: Index,
        invoked: Time,
        returned: Time,
        /// The node that answered the last page.
        peer: NodeId,
    },
}

#[derive(Clone, Debug)]
enum Pending {
    Append {
        seq: u64,
        data: String,
    },
    Query {
        pages: Vec<LogRecord>,
        read_index: Option<Index>,
        first: Index,
        start: Index,
    },
}

/// A client that retries with the same (client, seq) until it gets a definite answer.
#[derive(Clone, Debug)]
pub struct SimClient {
    pub id: ClientId,
    seq: u64,
    target: NodeId,
    pending: Option<(Pending, Time)>,
    request_id: u64,
    pub done: Vec<Op>,
    /// Back to back: starts its next operation the moment one completes, an append with this
    /// probability, else a query of the log's tail.
    busy_appends: Option<f64>,
    made: u64,
    /// Attempts re-sent after a timeout.
    pub retries: u64,
    /// Shares its ID with another client (as two clients that drew the same random ID), so
    /// appends may be refused; they must never be acknowledged as the other client's entry.
    shares_id: bool,
}

impl SimClient {
    /// Sends this client's next attempt to `id`.
    pub fn target_node(&mut self, id: NodeId) {
        self.target = id;
    }
}

/// What a run did, so a test can require a minimum of activity and print it.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    /// Joining nodes that adopted their cluster from an AppendEntries (with a vote floor).
    pub adoptions: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub long_delayed: u64,
    pub crashes: u64,
    pub crashes_in_ready: BTreeMap<CrashPoint, u64>,
    /// Crashes that were power cuts (unsynced data lost), the others process kills.
    pub power_cuts: u64,
    /// New WAL segments the real disks started (at snapshots and installs).
    pub wal_rotations: u64,
    pub restarts: u64,
    pub pauses: u64,
    /// Datagrams that waited in a paused node's buffer and were received on resume.
    pub received_late: u64,
    /// Leadership transfers requested.
    pub transfers: u64,
    pub faults: u64,
    /// Membership changes requested, answered as committed, and refused.
    pub config_requests: u64,
    pub config_changes: u64,
    pub config_refused: u64,
    /// Busy answers to membership changes (retried).
    pub config_busy: u64,
    /// Nodes that stopped because they learned they were removed.
    pub removed_stopped: u64,
    /// Snapshots taken (made durable), InstallSnapshot chunks sent and delivered, snapshots
    /// installed (`install_snapshot` called), and reads served from a store.
    pub snapshots: u64,
    pub chunks_sent: u64,
    pub chunks_delivered: u64,
    pub installs: u64,
    pub store_reads: u64,
    /// WAL compactions (`snapshot_taken` returned a new base).
    pub compactions: u64,
    /// Peer messages not sent: the sender knew no address for the receiver.
    pub unaddressed: u64,
    /// Peer messages the receiver dropped: from a sender whose address it did not know and
    /// could not learn ([`SimConfig::learn_addresses`] off).
    pub unknown_sender: u64,
    /// Addresses learned from the messages that carried them.
    pub learned: u64,
    /// Removed nodes started over on an empty disk to rejoin ([`Sim::respawn`]), and rejoins
    /// committed.
    pub respawns: u64,
    pub rejoins: u64,
    /// Restarts whose JSON listed an old set of peers ([`Sim::restart_with_peers`]).
    pub old_config_restarts: u64,
    /// What the injected disk faults did (`faults.rs`).
    pub disk: faults::DiskStats,
}

/// A paused node: its held datagrams, or None if what arrives is lost.
type Held = Option<Vec<Event>>;

pub struct Sim {
    pub seed: u64,
    pub cfg: SimConfig,
    pub rng: Rng,
    pub now: Time,
    /// The node slots in use: every node started and not retired (stopped for good).
    pub ids: Vec<NodeId>,
    /// The bootstrap voters; nodes added later join with an empty configuration.
    pub initial: Vec<NodeId>,
    joined: BTreeSet<NodeId>,
    pub retired: BTreeSet<NodeId>,
    /// Removed nodes started over on an empty disk ([`Sim::respawn`]).
    respawned: BTreeSet<NodeId>,
    /// Nodes started over on an empty disk by a randomized run and not yet added back, with
    /// when (see `Sim::random_membership_change`).
    awaiting_rejoin: BTreeMap<NodeId, Time>,
    /// When each node's current life started.
    started_at: BTreeMap<NodeId, Time>,
    /// When each retired node stopped (a removed node rejoins only well after).
    retired_at: BTreeMap<NodeId, Time>,
    next_id: NodeId,
    /// The membership change in progress, and every answer the administrator got.
    pub admin: Option<AdminOp>,
    admin_request_id: u64,
    pub admin_done: Vec<(ConfChange, ClientResult)>,
    /// Removed by a committed change: stopped by the operator at the next [`Sim::decommission`].
    decommission: BTreeSet<NodeId>,
    nodes: BTreeMap<NodeId, Option<Node>>,
    /// What the real storage reported durable, per node (the shadow the invariants read).
    pub disks: BTreeMap<NodeId, Disk>,
    /// Each node's real storage and simulated filesystem.
    real: BTreeMap<NodeId, disk::Real>,
    events: BTreeMap<(Time, u64), Event>,
    event_seq: u64,
    /// Directed links that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Directed links whose datagrams take this much longer (and are never lost).
    slow: BTreeMap<(NodeId, NodeId), Time>,
    /// Nodes cut off by `disconnect`.
    disconnected: BTreeSet<NodeId>,
    /// Nodes frozen in time: no ticks; what arrives meanwhile waits (SIGSTOP) or is lost.
    paused: BTreeMap<NodeId, Held>,
    /// Each node's JSON `other_peers`, which survives restarts: every other bootstrap member
    /// for a bootstrap node, the contact points it was given for a joining one (or an old
    /// list, see [`Sim::restart_with_peers`]).
    pub json_peers: BTreeMap<NodeId, Vec<NodeId>>,
    /// Each live node's address book, as the real shell keeps it (`src/peer/routes.rs`): the
    /// peers it has an address for, from its JSON, its `cluster` file's bootstrap membership,
    /// every configuration in force in this life (never forgotten), and, with
    /// [`SimConfig::learn_addresses`], every sender heard from. Lost on a crash.
    pub books: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// The routing key for which a node's book last took in its configurations.
    book_key: BTreeMap<NodeId, RoutingKey>,
    pub clients: Vec<SimClient>,
    /// Peer messages handed to the network, by (from, to) and in all.
    pub sent: u64,
    pub sent_by_link: BTreeMap<(NodeId, NodeId), u64>,
    /// When set, encoded bytes of peer messages by (from, to) (costly: encodes each message).
    pub count_bytes: bool,
    pub bytes_by_link: BTreeMap<(NodeId, NodeId), u64>,
    pub restarts: u64,
    pub stats: Stats,
    paranoid: bool,
    /// `SIM_TRACE`: print snapshot traffic and snapshots taken.
    trace: bool,
    // ---- invariant bookkeeping ----
    leader_of_term: BTreeMap<Term, NodeId>,
    /// Committed entries by index: the entry, and the term of the node that saw it committed
    /// first (Leader Completeness applies to leaders of later terms).
    committed: BTreeMap<Index, (Entry, Term)>,
    /// The highest index first seen committed by a node in each term.
    committed_by_term: BTreeMap<Term, Index>,
    /// The committed configurations, by index (0: the bootstrap one).
    committed_configs: BTreeMap<Index, Membership>,
    /// The commit index up to which a leader's commitment was checked against the voters of
    /// its configuration.
    leader_commit_checked: BTreeMap<NodeId, Index>,
    last_term: BTreeMap<NodeId, Term>,
    last_commit: BTreeMap<NodeId, Index>,
    /// Indices up to here were checked against `committed` in the node's current life.
    checked_commit: BTreeMap<NodeId, Index>,
    was_leader: BTreeMap<NodeId, Term>,
    /// A leader's (term, last index, hash of the entry there), for Leader Append-Only.
    leader_tail: BTreeMap<NodeId, (Term, Index, u64)>,
    /// The match index a leader last reported for a follower, by (leader, follower), with the
    /// leader's term.
    match_seen: HashMap<(NodeId, NodeId), (Term, Index)>,
    /// Paranoid mode: a leader's whole log when last checked.
    leader_log: BTreeMap<NodeId, (Term, Vec<Entry>)>,
    /// Each node's durable log as prefix hashes: `prefix[i - 1]` covers entries 1..=i.
    prefix: BTreeMap<NodeId, Vec<u64>>,
    /// Log Matching over all time: every (index, term) ever written, with its prefix hash and
    /// the first node that wrote it.
    written: HashMap<(Index, Term), (u64, NodeId)>,
    /// Votes cast, by (term, voter): the candidate. At most one per term, across restarts.
    votes: HashMap<(Term, NodeId), NodeId>,
    /// Granted RequestVote answers a candidate received, by (term, candidate).
    grants: HashMap<(Term, NodeId), BTreeSet<NodeId>>,
    checks: u64,
    /// The committed log's prefix hashes (`committed_prefix[i - 1]` covers 1..=i), for the
    /// durable log of a node whose WAL was reset to a snapshot's base.
    committed_prefix: Vec<u64>,
    /// The applied history: the first record any store held at each index (from 1). Every
    /// store must agree with it (State Machine Safety on what was applied, duplicates too).
    applied_records: Vec<LogRecord>,
    /// Records of each node's store checked against `applied_records` and `committed`.
    store_checked: BTreeMap<NodeId, usize>,
    /// Every snapshot taken or installed, by ID (equal IDs must mean equal snapshots).
    snapshot_states: HashMap<SnapshotId, SnapshotState>,
    /// A batch each node was writing when the power failed (see `Sim::torn_persist`): its
    /// restart may find it whole.
    in_flight: BTreeMap<NodeId, (Option<HardState>, Vec<Entry>)>,
    /// The state of the snapshot each node's real disk started last.
    started_snapshot: BTreeMap<NodeId, SnapshotState>,
    /// Disk faults injected, and the nodes waiting for space (see `faults.rs`).
    disk_faults: faults::DiskFaults,
    held: BTreeMap<NodeId, faults::Held>,
}

/// How many servers' membership or role differs between two configurations.
fn member_changes(a: &Membership, b: &Membership) -> usize {
    let ids: BTreeSet<NodeId> = a.ids().chain(b.ids()).collect();
    ids.into_iter()
        .filter(|&i| a.get(i).map(|m| m.role) != b.get(i).map(|m| m.role))
        .count()
}

/// A hash of one entry's whole content.
fn entry_hash(e: &Entry) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (e.index, e.term).hash(&mut h);
    match &e.payload {
        Payload::Noop => 0u8.hash(&mut h),
        Payload::Data { client, seq, data } => (1u8, client, seq, data).hash(&mut h),
        Payload::Config(m) => (2u8, format!("{m:?}")).hash(&mut h),
        Payload::User(u) => (3u8, format!("{u:?}")).hash(&mut h),
    }
    h.finish()
}

/// Extends a prefix hash by one entry's hash.
fn chain(prefix: u64, entry: u64) -> u64 {
    raft::raft::rng::splitmix64(prefix.rotate_left(17) ^ entry)
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Sim {
        let ids: Vec<NodeId> = (1..=cfg.nodes as NodeId).collect();
        let mut sim = Sim {
            seed,
            rng: Rng::new(seed),
            now: 0,
            nodes: BTreeMap::new(),
            disks: ids.iter().map(|&id| (id, Disk::default())).collect(),
            real: BTreeMap::new(),
            initial: ids.clone(),
            joined: BTreeSet::new(),
            retired: BTreeSet::new(),
            retired_at: BTreeMap::new(),
            respawned: BTreeSet::new(),
            awaiting_rejoin: BTreeMap::new(),
            started_at: BTreeMap::new(),
            next_id: cfg.nodes as NodeId + 1,
            admin: None,
            admin_request_id: 0,
            admin_done: Vec::new(),
            decommission: BTreeSet::new(),
            events: BTreeMap::new(),
            event_seq: 0,
            cut: BTreeSet::new(),
            slow: BTreeMap::new(),
            paused: BTreeMap::new(),
            disconnected: BTreeSet::new(),
            json_peers: ids
                .iter()
                .map(|&id| (id, ids.iter().copied().filter(|&p| p != id).collect()))
                .collect(),
            books: BTreeMap::new(),
            book_key: BTreeMap::new(),
            clients: Vec::new(),
            sent: 0,
            sent_by_link: BTreeMap::new(),
            count_bytes: false,
            bytes_by_link: BTreeMap::new(),
            restarts: 0,
            stats: Stats::default(),
            paranoid: std::env::var("SIM_PARANOID").is_ok_and(|v| v != "0"),
            trace: std::env::var("SIM_TRACE").is_ok_and(|v| v != "0"),
            leader_of_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            committed_by_term: BTreeMap::new(),
            committed_configs: BTreeMap::from([(0, Membership::voters(&ids))]),
            leader_commit_checked: BTreeMap::new(),
            last_term: BTreeMap::new(),
            last_commit: BTreeMap::new(),
            checked_commit: BTreeMap::new(),
            was_leader: BTreeMap::new(),
            leader_tail: BTreeMap::new(),
            match_seen: HashMap::new(),
            leader_log: BTreeMap::new(),
            prefix: ids.iter().map(|&id| (id, Vec::new())).collect(),
            written: HashMap::new(),
            votes: HashMap::new(),
            grants: HashMap::new(),
            checks: 0,
            committed_prefix: Vec::new(),
            applied_records: Vec::new(),
            store_checked: BTreeMap::new(),
            snapshot_states: HashMap::new(),
            started_snapshot: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            disk_faults: faults::DiskFaults::from_env(),
            held: BTreeMap::new(),
            ids,
            cfg,
        };
        for id in sim.ids.clone() {
            sim.start(id);
            let phase = sim.rng.range(0, sim.cfg.tick - 1);
            sim.schedule(phase, Event::Tick(id));
        }
        sim
    }

    fn core_config(&self, id: NodeId) -> Config {
        Config {
            id,
            membership: if self.joined.contains(&id) {
                Membership::default()
            } else {
                Membership::voters(&self.initial)
            },
            election_ticks: self.cfg.election_ticks,
            heartbeat_ticks: self.cfg.heartbeat_ticks,
            max_inflight: self.cfg.max_inflight,
            vote_floor: self.disks[&id].vote_floor.0,
            vote_floor_term: self.disks[&id].vote_floor.1,
            started_over: self.disks[&id].started_over,
            seed: self
                .seed
                .wrapping_mul(31)
                .wrapping_add(id * 7919 + self.restarts),
        }
    }

    fn start(&mut self, id: NodeId) {
        let r = self.open_disk(id);
        let cfg = self.core_config(id);
        let node = Node::restore(cfg, r.hard_state, r.snapshot, r.base, r.entries);
        // The real disk already replaced a WAL that does not reach its snapshot by the
        // snapshot's base: the core has nothing left to replace.
        let base = node.log().base();
        if base != self.disks[&id].base {
            self.fail(&format!(
                "node {id} restored with log base {base:?}, its WAL's is {:?}",
                self.disks[&id].base
            ));
        }
        self.last_commit.insert(id, node.commit_index());
        self.leader_commit_checked.insert(id, node.commit_index());
        // A new life: its durable log is checked against what was committed from scratch.
        self.checked_commit.insert(id, 0);
        self.leader_tail.remove(&id);
        self.leader_log.remove(&id);
        self.nodes.insert(id, Some(node));
        self.started_at.insert(id, self.now);
        self.open_book(id);
    }

    pub fn fail(&self, what: &str) -> ! {
        let mut dump = String::new();
        for (id, n) in &self.nodes {
            match n {
                Some(n) => dump += &format!("  node {id}: {:?}\n", n.status()),
                None => dump += &format!("  node {id}: down\n"),
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            if let Some((p, since)) = &c.pending {
                dump += &format!("  client {i}: since {since} target {} {p:?}\n", c.target);
            }
        }
        // The test binary's name without cargo's hash, and the test's name: the rerun command.
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.file_stem()?.to_str()?.rsplit_once('-')?.0.to_string()))
            .map(|b| format!(" --test {b}"))
            .unwrap_or_default();
        let test = std::thread::current()
            .name()
            .map(|n| format!("{binary} {}", n.rsplit("::").next().unwrap_or(n)))
            .unwrap_or(binary);
        panic!(
            "seed {}: at t={}µs: {what}\n{dump}rerun with SIM_SEED={} cargo test --release{test}",
            self.seed, self.now, self.seed
        );
    }

    // ---- world control ------------------------------------------------------------------------

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes[&id].as_ref()
    }
    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[&id].is_some()
    }
    pub fn up_nodes(&self) -> Vec<NodeId> {
        self.ids
            .iter()
            .copied()
            .filter(|&i| self.is_up(i))
            .collect()
    }
    pub fn down_nodes(&self) -> Vec<NodeId> {
        self.ids
            .iter()
            .copied()
            .filter(|&i| !self.is_up(i))
            .collect()
    }
    /// SIGKILL, or as often a power cut: the node loses everything not on its disk (with a
    /// power cut, also what its disk was not made to sync), including datagrams it held paused.
    pub fn crash(&mut self, id: NodeId) {
        let power_cut = self.rng.chance(0.5);
        self.kill_disk(id, power_cut);
        self.crash_process(id);
    }

    fn crash_process(&mut self, id: NodeId) {
        self.disarm(id);
        if self.nodes[&id].is_some() {
            self.stats.crashes += 1;
        }
        self.nodes.insert(id, None);
        self.paused.remove(&id);
    }
    pub fn restart(&mut self, id: NodeId) {
        if self.nodes[&id].is_none() && !self.retired.contains(&id) {
            self.restarts += 1;
            self.stats.restarts += 1;
            self.start(id);
        }
    }
    /// Starts a new node slot with an empty disk and an empty bootstrap configuration, as a
    /// server that joins (thesis §4.1), given some current members as contact points
    /// ([`Sim::random_contacts`]); returns its ID.
    pub fn spawn(&mut self) -> NodeId {
        let contacts = self.random_contacts();
        self.spawn_with_contacts(&contacts)
    }

    /// [`Sim::spawn`] with these contact points (its JSON's `other_peers`).
    pub fn spawn_with_contacts(&mut self, contacts: &[NodeId]) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        self.ids.push(id);
        self.joined.insert(id);
        self.disks.insert(id, Disk::default());
        self.prefix.insert(id, Vec::new());
        self.json_peers.insert(id, contacts.to_vec());
        self.start(id);
        let phase = self.rng.range(0, self.cfg.tick - 1);
        self.schedule(phase, Event::Tick(id));
        id
    }

    /// Some members of the committed configuration that are running, at random (at least
    /// one): what an operator gives a joining node as contact points.
    pub fn random_contacts(&mut self) -> Vec<NodeId> {
        let mut members: Vec<NodeId> = self
            .committed_config()
            .ids()
            .filter(|i| self.ids.contains(i))
            .collect();
        self.rng.shuffle(&mut members);
        let k = self.rng.range(1, members.len().max(1) as u64) as usize;
        members.truncate(k);
        members
    }

    /// Stops node `id` for good, as an operator does once it has left the cluster. Its disk is
    /// kept for the invariants.
    pub fn retire(&mut self, id: NodeId) {
        self.kill_disk(id, false);
        self.nodes.insert(id, None);
        self.paused.remove(&id);
        self.ids.retain(|&i| i != id);
        self.retired.insert(id);
        self.retired_at.insert(id, self.now);
        self.decommission.remove(&id);
    }

    // ---- addresses ----------------------------------------------------------------------------

    /// A new life's address book: its JSON's peers and, for a bootstrap node, its `cluster`
    /// file's bootstrap membership; then the configurations its log puts in force.
    fn open_book(&mut self, id: NodeId) {
        let mut book: BTreeSet<NodeId> = self
            .json_peers
            .get(&id)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        if !self.joined.contains(&id) {
            book.extend(self.initial.iter().copied());
        }
        book.remove(&id);
        self.books.insert(id, book);
        self.book_key.remove(&id);
        self.follow_configuration(id);
    }

    /// What the shell does after each batch: once the configurations may have changed (the
    /// core's routing key moved), the book takes in the members of the one in force, of the
    /// committed one, and the removed members still being told. Never forgets one.
    fn follow_configuration(&mut self, id: NodeId) {
        let Some(node) = self.nodes[&id].as_ref() else {
            return;
        };
        let key = node.routing_key();
        if self.book_key.get(&id) == Some(&key) {
            return;
        }
        self.book_key.insert(id, key);
        let book = self.books.get_mut(&id).unwrap();
        book.extend(node.membership().ids());
        book.extend(node.committed_membership().ids());
        book.extend(node.contacts());
        book.remove(&id);
    }

    /// Whether live node `id` takes a peer message from `from`, as the real receiver decides:
    /// from a peer it knows an address for; from anyone while it knows no configuration (a
    /// joining node, which has yet to hear from its cluster); with
    /// [`SimConfig::learn_addresses`], from any peer, whose address it learns from the message.
    fn admit(&mut self, id: NodeId, from: NodeId) -> bool {
        let book = self.books.get_mut(&id).unwrap();
        if book.contains(&from) {
            return true;
        }
        if self.cfg.learn_addresses {
            book.insert(from);
            self.stats.learned += 1;
            return true;
        }
        let joining = self.nodes[&id]
            .as_ref()
            .is_some_and(|n| n.membership().members.is_empty());
        if !joining {
            self.stats.unknown_sender += 1;
        }
        joining
    }

    /// Whether a joining node takes `msg`, as the real shell's `Routes::admit` decides: one
    /// that has not adopted its cluster yet ignores all but an AppendEntries, and those too
    /// until [`ADOPT_AFTER_ELECTIONS`] longest election timeouts after it started; the first it takes sets its
    /// vote floor, durably.
    fn adopt(&mut self, msg: &Message) -> bool {
        let id = msg.to;
        if !self.joined.contains(&id) || self.disks[&id].adopted {
            return true;
        }
        let Body::AppendEntries {
            prev_log_index,
            ref entries,
            leader_commit,
            ..
        } = msg.body
        else {
            return false;
        };
        if self.now
            < self.started_at[&id]
                + ADOPT_AFTER_ELECTIONS * self.cfg.election_ticks.1 * self.cfg.tick
        {
            return false;
        }
        let floor = raft::raft::node::vote_floor_from(prev_log_index, entries.len(), leader_commit);
        let disk = self.disks.get_mut(&id).unwrap();
        disk.adopted = true;
        disk.vote_floor = (floor, msg.term);
        disk.started_over = (floor, msg.term);
        self.stats.adoptions += 1;
        if let Some(n) = self.nodes.get_mut(&id).unwrap() {
            n.set_vote_floor(floor, msg.term);
        }
        true
    }

    /// Whether live node `id` knows an address for `peer`.
    pub fn knows(&self, id: NodeId, peer: NodeId) -> bool {
        self.books.get(&id).is_some_and(|b| b.contains(&peer))
    }

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }
    /// Cuts `id` off from everyone.
    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.ids.iter().copied().filter(|&p| p != id).collect();
        self.partition(&[id], &others);
    }
    /// Cuts `id` off from everyone (MIT lab's "disconnect").
    pub fn disconnect(&mut self, id: NodeId) {
        self.disconnected.insert(id);
        self.isolate(id);
    }
    /// Restores every link of `id` whose other end is not itself disconnected.
    pub fn connect(&mut self, id: NodeId) {
        self.disconnected.remove(&id);
        self.cut.retain(|&(a, b)| a != id && b != id);
        for other in self.disconnected.clone() {
            self.isolate(other);
        }
    }
    pub fn is_connected(&self, id: NodeId) -> bool {
        !self.disconnected.contains(&id)
    }
    pub fn cut_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }
    pub fn heal(&mut self) {
        self.cut.clear();
        self.disconnected.clear();
    }
    /// Adds `extra` to the delay of every datagram sent from `from` to `to` from now on (0 ends
    /// it), so that a link's old datagrams arrive after newer ones on other links.
    pub fn slow_link(&mut self, from: NodeId, to: NodeId, extra: Time) {
        if extra == 0 {
            self.slow.remove(&(from, to));
        } else {
            self.slow.insert((from, to), extra);
        }
    }
    /// SIGSTOP: no ticks, and datagrams wait in the socket buffer until [`Sim::resume`].
    pub fn pause(&mut self, id: NodeId) {
        if self.is_up(id) && !self.paused.contains_key(&id) {
            self.stats.pauses += 1;
            self.paused.insert(id, Some(Vec::new()));
        }
    }
    /// Frozen and deaf: no ticks, and whatever arrives until [`Sim::resume`] is lost.
    pub fn freeze(&mut self, id: NodeId) {
        if self.is_up(id) && !self.paused.contains_key(&id) {
            self.stats.pauses += 1;
            self.paused.insert(id, None);
        }
    }
    /// SIGCONT: the node receives, in order, everything its buffer held.
    pub fn resume(&mut self, id: NodeId) {
        if let Some(Some(held)) = self.paused.remove(&id) {
            self.stats.received_late += held.len() as u64;
            for event in held {
                self.schedule(0, event);
            }
        }
    }
    /// Asks every live leader, over the network, to hand leadership to `target` (or to its most
    /// up-to-date follower), as `client transfer-leader` does; the answer is not awaited.
    pub fn transfer_leader(&mut self, target: Option<NodeId>) {
        for l in self.leaders() {
            self.stats.transfers += 1;
            let req = ClientRequest {
                id: 0,
                op: ClientOp::TransferLeader {
                    target,
                    away_from: Some(l),
                },
            };
            self.transmit(Event::Request(
                l,
                SocketAddr::from(([127, 0, 0, 1], 1)),
                req,
            ));
        }
    }
    pub fn paused_nodes(&self) -> Vec<NodeId> {
        self.paused.keys().copied().collect()
    }

    fn schedule(&mut self, delay: Time, event: Event) {
        self.event_seq += 1;
        self.events
            .insert((self.now + delay, self.event_seq), event);
    }

    fn delay(&mut self) -> Time {
        if self.rng.chance(self.cfg.long_delay) {
            self.stats.long_delayed += 1;
            self.rng
                .range(self.cfg.long_delay_range.0, self.cfg.long_delay_range.1)
        } else {
            self.rng.range(self.cfg.delay.0, self.cfg.delay.1)
        }
    }

    /// Hands `event` to the lossy network: lost, delivered once, or twice.
    fn transmit(&mut self, event: Event) {
        if self.rng.chance(self.cfg.drop) {
            self.stats.dropped += 1;
            return;
        }
        if self.rng.chance(self.cfg.duplicate) {
            self.stats.duplicated += 1;
            let delay = self.delay();
            self.schedule(delay, event.clone());
        }
        let delay = self.delay();
        self.schedule(delay, event);
    }

    fn send(&mut self, msg: Message) {
        if !self.knows(msg.from, msg.to) {
            self.stats.unaddressed += 1;
            return;
        }
        self.sent += 1;
        *self.sent_by_link.entry((msg.from, msg.to)).or_default() += 1;
        if self.count_bytes {
            let bytes = Datagram::Peer(msg.clone()).encode().map_or(0, |b| b.len());
            *self.bytes_by_link.entry((msg.from, msg.to)).or_default() += bytes as u64;
        }
        if self.cut.contains(&(msg.from, msg.to)) {
            return;
        }
        if let Some(&extra) = self.slow.get(&(msg.from, msg.to)) {
            let delay = self.delay() + extra;
            self.schedule(delay, Event::Deliver(msg));
            return;
        }
        self.transmit(Event::Deliver(msg));
    }

    // ---- running ------------------------------------------------------------------------------

    /// Processes the next event; returns false if there is none.
    pub fn step(&mut self) -> bool {
        let Some(((time, _), event)) = self.events.pop_first() else {
            return false;
        };
        self.now = time;
        self.stats.events += 1;
        let target = match &event {
            Event::Tick(id) | Event::DiskRetry(id, _) => Some(*id),
            Event::Deliver(Message { to: id, .. }) | Event::Request(id, ..) => Some(*id),
            _ => None,
        };
        if let Some(id) = target.filter(|id| self.paused.contains_key(id)) {
            if let Event::Tick(_) | Event::DiskRetry(..) = event {
                self.schedule(self.cfg.tick, event);
            } else if let Some(Some(queue)) = self.paused.get_mut(&id) {
                if queue.len() < self.cfg.pause_buffer {
                    queue.push(event);
                }
            }
            return true;
        }
        // A node waiting for space drops what arrives, as `wait_for_space` (the sim's
        // clients send no `status`); its timer goes on.
        if let Some(id) = target.filter(|id| self.held.contains_key(id)) {
            match event {
                Event::Tick(_) => {
                    if !self.retired.contains(&id) {
                        self.schedule(self.cfg.tick, event);
                    }
                    self.stats.disk.dropped_while_full += 1;
                    return true;
                }
                Event::Deliver(_) | Event::Request(..) => {
                    self.stats.disk.dropped_while_full += 1;
                    return true;
                }
                _ => {}
            }
        }
        let touched = match event {
            Event::DiskRetry(id, serial) => {
                if !self.retry_held(id, serial) {
                    return true;
                }
                id
            }
            Event::SpaceBack(id, serial) => {
                self.space_back(id, serial);
                return true;
            }
            Event::Tick(id) => {
                if self.retired.contains(&id) {
                    return true;
                }
                self.schedule(self.cfg.tick, Event::Tick(id));
                match self.nodes.get_mut(&id).unwrap() {
                    Some(node) => node.tick(),
                    None => return true,
                }
                id
            }
            Event::Deliver(msg) => {
                let id = msg.to;
                if self.nodes[&id].is_none() || !self.admit(id, msg.from) || !self.adopt(&msg) {
                    return true;
                }
                self.stats.delivered += 1;
                if let Body::InstallSnapshot { .. } = msg.body {
                    self.stats.chunks_delivered += 1;
                }
                if self.trace
                    && matches!(
                        msg.body,
                        Body::InstallSnapshot { .. } | Body::InstallSnapshotResponse { .. }
                    )
                {
                    println!(
                        "t={} {} -> {} t{} {:?}",
                        self.now, msg.from, msg.to, msg.term, msg.body
                    );
                }
                if let Body::RequestVoteResponse { granted: true } = msg.body {
                    self.grants
                        .entry((msg.term, id))
                        .or_default()
                        .insert(msg.from);
                }
                self.nodes.get_mut(&id).unwrap().as_mut().unwrap().step(msg);
                id
            }
            Event::Request(id, reply_to, req) => {
                match self.nodes.get_mut(&id).unwrap() {
                    Some(node) => node.request(reply_to, req),
                    None => return true,
                }
                id
            }
            Event::Reply(to, reply) => {
                // Port 1 is where fire-and-forget proposals send their (ignored) answers.
                if to.port() == ADMIN_PORT {
                    self.admin_reply(reply);
                } else if let Some(c) = (to.port() as usize).checked_sub(40000) {
                    self.client_reply(c, reply);
                }
                return true;
            }
            Event::AdminTimer(request_id) => {
                self.admin_timeout(request_id);
                return true;
            }
            Event::ClientTimer(c, request_id) => {
                self.client_timeout(c, request_id);
                return true;
            }
        };
        if self.is_held(touched) {
            // Its Ready is not carried out yet: the checks wait for it.
            return true;
        }
        self.leader_commit_check(touched);
        self.after_event(touched);
        if self.is_held(touched) {
            return true;
        }
        self.went_on(touched);
        // A removed node takes no further part; its process stops (thesis §4.2.2). It must
        // really have been removed: a node started over to rejoin must not take its earlier
        // removal, replayed while it catches up, for its own.
        if let Some(n) = self.node(touched).filter(|n| n.removed()) {
            let (latest, committed) = (n.membership(), self.committed_config());
            if latest.contains(touched) || committed.contains(touched) {
                self.fail(&format!(
                    "node {touched} stops as removed, but its latest configuration (at {}) {} or \
                     the committed one {} lists it",
                    n.config_index(),
                    latest.describe(),
                    committed.describe()
                ));
            }
            self.stats.removed_stopped += 1;
            self.retire(touched);
        }
        true
    }

    /// What the shell does after an event reached node `id`: carry out its Readies, check
    /// the invariants, and take a snapshot if it is time (the invariants have then seen every
    /// entry it covers committed), carrying out what that causes.
    fn after_event(&mut self, id: NodeId) {
        self.process_ready(id);
        if self.is_held(id) {
            return;
        }
        // As the shell clears the `cluster` file's vote floor once the core's log reached it.
        if self.node(id).is_some_and(|n| n.vote_floor() == 0) {
            self.disks.get_mut(&id).unwrap().vote_floor = (0, 0);
        }
        self.check(id);
        self.follow_configuration(id);
    }

    /// Carries out a node's Readies the way the shell does, possibly crashing part-way, until
    /// one is empty, or the node waits for space or is down.
    fn process_ready(&mut self, id: NodeId) {
        loop {
            if self.is_held(id) {
                return;
            }
            let Some(node) = self.nodes.get_mut(&id).unwrap().as_mut() else {
                return;
            };
            let (role, term) = (node.role(), node.term());
            let mut rd = node.ready();
            if rd.is_empty() {
                // As the node loop: the round trip runs after the last, empty, Ready too (it
                // starts and announces snapshots).
                self.maybe_run_jobs(id);
                if let faults::AfterOutcome::InstallWaits =
                    self.after_advance(id, AfterAdvance::default())
                {
                    self.stats.disk.installs_waited += 1;
                    self.hold(id, faults::Waiting::Install, false);
                }
                return;
            }
            // Carried out right after `advance` (see `after_advance`).
            let after = Some(AfterAdvance {
                applied: std::mem::take(&mut rd.applied),
                store_reads: std::mem::take(&mut rd.store_reads),
                chunk_reads: std::mem::take(&mut rd.chunk_reads),
                chunk_writes: std::mem::take(&mut rd.chunk_writes),
            });
            let writes = rd.hard_state.is_some() || !rd.entries.is_empty();
            let mut acts = Vec::with_capacity(rd.messages.len() + rd.replies.len() + 2);
            if writes && !rd.send_before_persist {
                acts.push(Act::Persist);
            }
            acts.extend((0..rd.messages.len()).map(Act::Send));
            if writes && rd.send_before_persist {
                acts.push(Act::Persist);
            }
            acts.push(Act::Advance);
            acts.extend((0..rd.replies.len()).map(Act::Reply));
            let crash_before = if self.rng.chance(self.cfg.crash_in_ready) {
                Some(self.pick_crash_point(&acts))
            } else {
                None
            };
            let carrying = faults::Carrying {
                rd,
                after,
                acts,
                next: 0,
                role,
                term,
                handed_over: false,
                was_held: false,
            };
            if !self.carry_out(id, carrying, crash_before) {
                return;
            }
        }
    }

    /// Carries out a Ready from step `c.next` on, crashing before step `at` if `crash_before`
    /// says so. Returns false if the node went down or waits for space (as `carry_out` in the
    /// node loop: a batch the disk has no room for holds the rest of the Ready; an install the
    /// WAL reset has no room for waits once the Ready's replies are out).
    fn carry_out(
        &mut self,
        id: NodeId,
        mut c: faults::Carrying,
        crash_before: Option<(usize, CrashPoint)>,
    ) -> bool {
        let mut install_waits = false;
        for g in c.next..c.acts.len() {
            let act = c.acts[g];
            if let Some((at, point)) = crash_before {
                if at == g {
                    if matches!(act, Act::Persist) && self.faults_quiet(id) && self.rng.chance(0.5)
                    {
                        self.torn_persist(id, c.role, c.term, &c.rd);
                        return false;
                    }
                    *self.stats.crashes_in_ready.entry(point).or_default() += 1;
                    self.crash(id);
                    return false;
                }
            }
            match act {
                Act::Persist => match self.persist(id, c.role, c.term, &c.rd, !c.was_held) {
                    faults::Persisted::Done => {
                        if c.was_held {
                            self.stats.disk.written_after_space += 1;
                        }
                    }
                    faults::Persisted::Full => {
                        if !c.was_held {
                            self.stats.disk.held_batches += 1;
                        }
                        c.was_held = true;
                        c.next = g;
                        let handed_over = c.handed_over;
                        self.hold(id, faults::Waiting::Persist(Box::new(c)), handed_over);
                        return false;
                    }
                    faults::Persisted::Exit => {
                        self.exit_on_error(id);
                        return false;
                    }
                },
                Act::Send(k) => self.send(c.rd.messages[k].clone()),
                Act::Advance => {
                    self.nodes.get_mut(&id).unwrap().as_mut().unwrap().advance();
                    self.leader_commit_check(id);
                    match self.after_advance(id, c.after.take().expect("one advance")) {
                        faults::AfterOutcome::Done => {}
                        faults::AfterOutcome::Down => return false,
                        faults::AfterOutcome::InstallWaits => install_waits = true,
                    }
                }
                Act::Reply(k) => {
                    let (to, reply) = c.rd.replies[k].clone();
                    self.transmit(Event::Reply(to, reply));
                }
            }
        }
        if install_waits {
            self.stats.disk.installs_waited += 1;
            self.hold(id, faults::Waiting::Install, c.handed_over);
            return false;
        }
        true
    }

    /// A crash point for this Ready: a kind uniformly among those it has, then a position
    /// of that kind uniformly. Returns (crash before `acts[at]`, kind).
    fn pick_crash_point(&mut self, acts: &[Act]) -> (usize, CrashPoint) {
        let mut persisted = !acts.iter().any(|a| matches!(a, Act::Persist));
        let mut sent = 0;
        let mut points: Vec<(usize, CrashPoint)> = Vec::new();
        for (g, act) in acts.iter().enumerate() {
            let point = match act {
                Act::Persist | Act::Send(_) if !persisted && sent > 0 => {
                    CrashPoint::SentBeforePersist
                }
                Act::Persist | Act::Send(_) if !persisted => CrashPoint::BeforePersist,
                Act::Send(_) if sent == 0 => CrashPoint::AfterPersist,
                Act::Send(_) => CrashPoint::BetweenMessages,
                Act::Advance if sent == 0 && acts.iter().any(|a| matches!(a, Act::Persist)) => {
                    CrashPoint::AfterPersist
                }
                Act::Advance => CrashPoint::BeforeAdvance,
                Act::Reply(_) | Act::Persist => CrashPoint::BeforeReplies,
            };
            points.push((g, point));
            match act {
                Act::Persist => persisted = true,
                Act::Send(_) => sent += 1,
                _ => {}
            }
        }
        let mut kinds: Vec<CrashPoint> = points.iter().map(|p| p.1).collect();
        kinds.dedup();
        let kind = self.rng.pick(&kinds);
        let of_kind: Vec<(usize, CrashPoint)> =
            points.into_iter().filter(|p| p.1 == kind).collect();
        self.rng.pick(&of_kind)
    }
}

/// As the shell's `peer::ADOPT_AFTER_ELECTIONS`.
const ADOPT_AFTER_ELECTIONS: u64 = 3;

// ---- seeds ------------------------------------------------------------------------------------

/// The seed before the first one this process runs: `SIM_SEED_OFFSET`, else derived from the
/// clock, so that every run explores seeds no run has tried.
pub fn seed_offset() -> u64 {
    static OFFSET: OnceLock<u64> = OnceLock::new();
    *OFFSET.get_or_init(|| match std::env::var("SIM_SEED_OFFSET") {
        Ok(s) => s.trim().parse().expect("SIM_SEED_OFFSET must be a number"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            // Microseconds: runs a second apart do not overlap even at 20,000 seeds a test.
            now.as_micros() as u64
        }
    })
}

fn env_count(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|s| {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

fn seed_list(count: u64) -> Vec<u64> {
    if let Some(seed) = env_count("SIM_SEED") {
        return vec![seed];
    }
    let offset = seed_offset();
    println!(
        "seeds {}..={} (SIM_SEED_OFFSET={offset}); rerun one with SIM_SEED=<seed>",
        offset + 1,
        offset + count
    );
    (offset + 1..=offset + count).collect()
}

/// Seeds for a scenario test: `SIM_SEED` reruns one, `SIM_SCENARIO_SEEDS` sets how many
/// (default given), starting after [`seed_offset`].
pub fn seeds(default_count: u64) -> Vec<u64> {
    seed_list(env_count("SIM_SCENARIO_SEEDS").unwrap_or(default_count))
}

/// Seeds for a randomized-fault test: `SIM_SEED` reruns one, `SIM_SEEDS` sets how many
/// (default given; CI sets thousands), starting after [`seed_offset`].
pub fn random_seeds(default_count: u64) -> Vec<u64> {
    seed_list(env_count("SIM_SEEDS").unwrap_or(default_count))
}

/// Runs `run` for every seed on `SIM_THREADS` threads (default: one per CPU) and returns what
/// each run reported, in seed order. The first failure stops the others and is re-raised.
pub fn run_seeds<T: Send>(seeds: &[u64], run: impl Fn(u64) -> T + Sync) -> Vec<(u64, T)> {
    let threads = env_count("SIM_THREADS")
        .map(|n| n as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, seeds.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results = Mutex::new(Vec::with_capacity(seeds.len()));
    let name = std::thread::current().name().unwrap_or("sim").to_string();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn_scoped(scope, || loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= seeds.len() || failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run(seeds[k])
                        })) {
                            Ok(out) => results.lock().unwrap().push((seeds[k], out)),
                            Err(panic) => {
                                // Sim::fail names the seed; a panic elsewhere (the harness,
                                // the core) does not, so say it here too.
                                eprintln!(
                                    "seed {} panicked; rerun it with SIM_SEED={}",
                                    seeds[k], seeds[k]
                                );
                                failed.store(true, Ordering::Relaxed);
                                return Err(panic);
                            }
                        }
                    })
                    .unwrap()
            })
            .collect();
        for w in workers {
            if let Err(panic) = w.join().unwrap() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    results
}
