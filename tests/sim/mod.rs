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
//! the invariants are computed against the configurations in force.
//!
//! Snapshots (thesis ch. 5), when [`SimConfig::snapshot_every`] is set: each node's shell keeps
//! the applied log (its store) and takes snapshots as the real one does, compacting its WAL;
//! leaders stream snapshots in chunks through the simulated network, receivers stage them
//! durably and install them; crashes strike between a snapshot's durability and telling the
//! core. The checks then compare logs only where both still hold entries, and the stores'
//! records (the applied history) with each other and with what was committed.

#![allow(dead_code)]

use raft::raft::node::{record_of, ChunkRead, ChunkWrite, StoreRead, PAGE_BUDGET};
use raft::raft::{
    escaped_len, Body, ClientId, ClientOp, ClientReply, ClientRequest, ClientResult, ConfChange,
    Config, Datagram, Entry, HardState, Index, LogRecord, MemberRole, Membership, Message, Node,
    NodeId, Payload, Ready, ReplyTo, Role, SnapshotId, SnapshotMeta, SnapshotState, Term,
    ENTRY_OVERHEAD,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Virtual microseconds.
pub type Time = u64;
pub const MS: Time = 1_000;

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
    /// Bytes added to each record's length in a snapshot's stream, as if entries were larger:
    /// snapshots then span several chunks.
    pub record_pad: u64,
    /// Probability of crashing at each snapshot crash point met (see [`SNAPSHOT_CRASH_POINTS`]).
    pub crash_in_snapshot: f64,
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
            record_pad: 0,
            crash_in_snapshot: 0.0,
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

/// What survives a crash: whatever a Ready persisted (the shell fsyncs each one as one frame,
/// so a crash during the write loses the batch whole), the latest snapshot, and the store up
/// to it.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    /// The WAL: its base (the last index and term compacted into a snapshot), and the entries
    /// after it.
    pub base: (Index, Term),
    pub entries: Vec<Entry>,
    /// The applied log (one record per applied entry, from index 1). Durable up to the latest
    /// snapshot's index: a crash cuts it back there, as the real store's restart does.
    pub store: Vec<LogRecord>,
    /// Running (bytes, hash) of the store's records, for snapshot IDs; filled on demand.
    sums: Vec<(u64, u64)>,
    /// The latest snapshot, durable.
    pub snapshot: Option<(SnapshotState, SnapshotId)>,
    /// The snapshot being received, durable so that a restarted receiver resumes.
    pub staged: Option<Staged>,
}

/// A snapshot being received: its ID, and the bytes of its records and meta held from 0.
#[derive(Clone, Copy, Debug)]
pub struct Staged {
    pub id: SnapshotId,
    pub records: u64,
    pub meta: u64,
}

impl Disk {
    fn persist(&mut self, rd: &Ready) {
        if let Some(hs) = rd.hard_state {
            self.hard_state = hs;
        }
        if let Some(first) = rd.entries.first() {
            self.entries
                .truncate((first.index - self.base.0 - 1) as usize);
            self.entries.extend_from_slice(&rd.entries);
        }
    }

    /// The WAL's last index.
    pub fn last_index(&self) -> Index {
        self.base.0 + self.entries.len() as Index
    }

    pub fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |(s, _)| s.index)
    }

    /// Cuts the store back to `len` records.
    fn store_truncate(&mut self, len: usize) {
        self.store.truncate(len);
        self.sums.truncate(len);
    }

    /// (bytes, hash) of the store's first `n` records as a snapshot streams them.
    fn store_sums(&mut self, n: usize, pad: u64) -> (u64, u64) {
        while self.sums.len() < n {
            let (bytes, hash) = self.sums.last().copied().unwrap_or((0, 0));
            let r = &self.store[self.sums.len()];
            let line = serde_json::to_string(r).expect("record encodes");
            let h = chain(hash, str_hash(&line));
            self.sums.push((bytes + line.len() as u64 + 1 + pad, h));
        }
        if n == 0 {
            (0, 0)
        } else {
            self.sums[n - 1]
        }
    }
}

fn str_hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// A snapshot's ID, from its content: equal IDs mean equal snapshots.
fn snapshot_id(state: &SnapshotState, (records_len, records_hash): (u64, u64)) -> SnapshotId {
    let records_crc = records_hash as u32;
    let meta = SnapshotMeta {
        state: state.clone(),
        records_len,
        records_crc,
    };
    let meta = serde_json::to_string(&meta).expect("meta encodes");
    SnapshotId {
        index: state.index,
        term: state.term,
        records_len,
        records_crc,
        meta_len: meta.len() as u64,
        meta_crc: str_hash(&meta) as u32,
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
    /// Advanced; some or all client replies not sent.
    BeforeReplies,
    /// A snapshot taken is durable, but the core was never told (`snapshot_taken` not called,
    /// the WAL not compacted).
    SnapshotBeforeTaken,
    /// A received snapshot is durable (store swapped, snapshot current) but the WAL was not
    /// yet reset to its base: a restart finds a WAL that may not reach the snapshot.
    InstallBeforeWalReset,
    /// A received snapshot is durable and the WAL reset, but the core was never told
    /// (`install_snapshot` not called, so no acknowledgement).
    InstallBeforeAck,
}

/// Where snapshot work may crash, with probability [`SimConfig::crash_in_snapshot`] each.
pub const SNAPSHOT_CRASH_POINTS: [CrashPoint; 3] = [
    CrashPoint::SnapshotBeforeTaken,
    CrashPoint::InstallBeforeWalReset,
    CrashPoint::InstallBeforeAck,
];

pub const CRASH_POINTS: [CrashPoint; 6] = [
    CrashPoint::BeforePersist,
    CrashPoint::SentBeforePersist,
    CrashPoint::AfterPersist,
    CrashPoint::BetweenMessages,
    CrashPoint::BeforeAdvance,
    CrashPoint::BeforeReplies,
];

/// One step of carrying out a Ready, in the shell's order.
#[derive(Clone, Copy, Debug)]
enum Act {
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
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub long_delayed: u64,
    pub crashes: u64,
    pub crashes_in_ready: BTreeMap<CrashPoint, u64>,
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
    next_id: NodeId,
    /// The membership change in progress, and every answer the administrator got.
    pub admin: Option<AdminOp>,
    admin_request_id: u64,
    pub admin_done: Vec<(ConfChange, ClientResult)>,
    /// Removed by a committed change: stopped by the operator at the next [`Sim::decommission`].
    decommission: BTreeSet<NodeId>,
    nodes: BTreeMap<NodeId, Option<Node>>,
    pub disks: BTreeMap<NodeId, Disk>,
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
    /// Every snapshot taken, by ID: what a receiver installs once it holds all its bytes.
    pub snapshots: HashMap<SnapshotId, Arc<(SnapshotState, Vec<LogRecord>)>>,
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
            initial: ids.clone(),
            joined: BTreeSet::new(),
            retired: BTreeSet::new(),
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
            snapshots: HashMap::new(),
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
            seed: self
                .seed
                .wrapping_mul(31)
                .wrapping_add(id * 7919 + self.restarts),
        }
    }

    fn start(&mut self, id: NodeId) {
        let cfg = self.core_config(id);
        let disk = &self.disks[&id];
        let node = Node::restore(
            cfg,
            disk.hard_state,
            disk.snapshot.clone(),
            disk.base,
            disk.entries.clone(),
        );
        // The core replaces a WAL that does not reach its snapshot (or disagrees with it) by
        // the snapshot's base; so does the shell.
        let base = node.log().base();
        if base != disk.base {
            if !node.log().entries().is_empty() || base.0 != disk.snapshot_index() {
                self.fail(&format!(
                    "node {id} restored with log base {base:?}, its WAL's is {:?}",
                    disk.base
                ));
            }
            self.reset_wal(id, base);
        }
        self.last_commit.insert(id, node.commit_index());
        self.leader_commit_checked.insert(id, node.commit_index());
        // A new life: its durable log is checked against what was committed from scratch.
        self.checked_commit.insert(id, 0);
        self.leader_tail.remove(&id);
        self.leader_log.remove(&id);
        self.nodes.insert(id, Some(node));
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
    /// SIGKILL: the node loses everything not on its disk, including datagrams it held paused.
    pub fn crash(&mut self, id: NodeId) {
        if self.nodes[&id].is_some() {
            self.stats.crashes += 1;
        }
        self.nodes.insert(id, None);
        self.paused.remove(&id);
        // The store is durable up to the latest snapshot: a restart cuts it back there.
        if let Some(disk) = self.disks.get_mut(&id) {
            let keep = disk.snapshot_index() as usize;
            disk.store_truncate(keep);
            // As the real store: staged records are synced only now and then, and meta bytes
            // are held in memory, so a restart keeps some prefix of the records received.
            if let Some(st) = disk.staged.as_mut() {
                st.records = self.rng.range(0, st.records);
                st.meta = 0;
            }
            let checked = self.store_checked.entry(id).or_default();
            *checked = (*checked).min(keep);
        }
    }
    pub fn restart(&mut self, id: NodeId) {
        if self.nodes[&id].is_none() && !self.retired.contains(&id) {
            self.restarts += 1;
            self.stats.restarts += 1;
            self.start(id);
        }
    }
    /// Starts a new node slot with an empty disk and an empty bootstrap configuration, as a
    /// server that joins (thesis §4.1); returns its ID.
    pub fn spawn(&mut self) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        self.ids.push(id);
        self.joined.insert(id);
        self.disks.insert(id, Disk::default());
        self.prefix.insert(id, Vec::new());
        self.start(id);
        let phase = self.rng.range(0, self.cfg.tick - 1);
        self.schedule(phase, Event::Tick(id));
        id
    }

    /// Stops node `id` for good, as an operator does once it has left the cluster. Its disk is
    /// kept for the invariants.
    pub fn retire(&mut self, id: NodeId) {
        self.nodes.insert(id, None);
        self.paused.remove(&id);
        self.ids.retain(|&i| i != id);
        self.retired.insert(id);
        self.decommission.remove(&id);
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
            Event::Tick(id) => Some(*id),
            Event::Deliver(Message { to: id, .. }) | Event::Request(id, ..) => Some(*id),
            _ => None,
        };
        if let Some(id) = target.filter(|id| self.paused.contains_key(id)) {
            if let Event::Tick(_) = event {
                self.schedule(self.cfg.tick, event);
            } else if let Some(Some(queue)) = self.paused.get_mut(&id) {
                if queue.len() < self.cfg.pause_buffer {
                    queue.push(event);
                }
            }
            return true;
        }
        let touched = match event {
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
                if self.nodes[&id].is_none() {
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
        self.leader_commit_check(touched);
        self.after_event(touched);
        // A removed node takes no further part; its process stops (thesis §4.2.2).
        if self.node(touched).is_some_and(|n| n.removed()) {
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
        self.check(id);
        if self.maybe_snapshot(id) {
            self.process_ready(id);
            self.check(id);
        }
    }

    /// Carries out a node's Ready the way the shell does, possibly crashing part-way.
    fn process_ready(&mut self, id: NodeId) {
        loop {
            let Some(node) = self.nodes.get_mut(&id).unwrap().as_mut() else {
                return;
            };
            let (role, term) = (node.role(), node.term());
            let mut rd = node.ready();
            if rd.is_empty() {
                return;
            }
            // Carried out right after `advance` (see `after_advance`).
            let applied = std::mem::take(&mut rd.applied);
            let store_reads = std::mem::take(&mut rd.store_reads);
            let chunk_reads = std::mem::take(&mut rd.chunk_reads);
            let chunk_writes = std::mem::take(&mut rd.chunk_writes);
            let mut after = Some((applied, store_reads, chunk_reads, chunk_writes));
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
            for (g, act) in acts.iter().enumerate() {
                if let Some((at, point)) = crash_before {
                    if at == g {
                        *self.stats.crashes_in_ready.entry(point).or_default() += 1;
                        self.crash(id);
                        return;
                    }
                }
                match *act {
                    Act::Persist => self.persist(id, role, term, &rd),
                    Act::Send(k) => self.send(rd.messages[k].clone()),
                    Act::Advance => {
                        self.nodes.get_mut(&id).unwrap().as_mut().unwrap().advance();
                        self.leader_commit_check(id);
                        let (applied, reads, chunk_reads, chunk_writes) =
                            after.take().expect("one advance");
                        if !self.after_advance(id, applied, reads, chunk_reads, chunk_writes) {
                            return;
                        }
                    }
                    Act::Reply(k) => {
                        let (to, reply) = rd.replies[k].clone();
                        self.transmit(Event::Reply(to, reply));
                    }
                }
            }
        }
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

    // ---- snapshots (the shell's side) ----------------------------------------------------------

    /// The rest of a Ready, once the core advanced: the applied records go to the store, reads
    /// below the core's memory are served from it, snapshot chunks are sent and received.
    /// Returns false if the node crashed meanwhile.
    fn after_advance(
        &mut self,
        id: NodeId,
        applied: Vec<LogRecord>,
        store_reads: Vec<StoreRead>,
        chunk_reads: Vec<ChunkRead>,
        chunk_writes: Vec<ChunkWrite>,
    ) -> bool {
        let disk = self.disks.get_mut(&id).unwrap();
        for r in applied {
            let next = disk.store.len() as Index + 1;
            if r.index != next {
                let what = format!(
                    "node {id} applied {} while its store ends at {}",
                    r.index,
                    next - 1
                );
                self.fail(&what);
            }
            disk.store.push(r);
        }
        for r in store_reads {
            self.serve_store_read(id, r);
        }
        for c in chunk_reads {
            self.send_chunk(id, c);
        }
        for w in chunk_writes {
            if !self.stage_chunk(id, w) {
                return false;
            }
        }
        true
    }

    /// Answers one page of the store, as the core answers from its log: records `start..`
    /// up to `read_index`, as many as fit [`PAGE_BUDGET`] but at least one.
    fn serve_store_read(&mut self, id: NodeId, r: StoreRead) {
        self.stats.store_reads += 1;
        let store = &self.disks[&id].store;
        if r.start == 0 || r.start > r.read_index || r.read_index > store.len() as Index {
            self.fail(&format!(
                "node {id} asked to read {}..={} from a store of {} records",
                r.start,
                r.read_index,
                store.len()
            ));
        }
        let mut entries = Vec::new();
        let mut used = 0;
        let mut next = None;
        for index in r.start..=r.read_index {
            let record = &store[index as usize - 1];
            used += ENTRY_OVERHEAD + record.data.as_deref().map_or(0, escaped_len);
            if used > PAGE_BUDGET && !entries.is_empty() {
                next = Some(index);
                break;
            }
            entries.push(record.clone());
        }
        let reply = ClientReply {
            id: r.id,
            from: id,
            result: ClientResult::Entries {
                entries,
                read_index: r.read_index,
                next,
            },
        };
        self.transmit(Event::Reply(r.reply_to, reply));
    }

    /// Reads a chunk of the node's current snapshot and sends it (its length rides in `data`).
    fn send_chunk(&mut self, id: NodeId, c: ChunkRead) {
        let current = self.disks[&id].snapshot.as_ref().map(|(_, sid)| *sid);
        if current != Some(c.snapshot) || c.len == 0 || c.offset + c.len > c.snapshot.total_len() {
            self.fail(&format!(
                "node {id} asked to send bytes {}+{} of snapshot {:?}; its current one is \
                 {current:?}",
                c.offset, c.len, c.snapshot
            ));
        }
        self.stats.chunks_sent += 1;
        self.send(c.message(id, c.len.to_string(), 0));
    }

    /// The receiver's side of a chunk, as the real store stages it: in order only; another
    /// snapshot keeps the records held if they are a prefix of its records (committed records
    /// never change), else starts over; the whole stream held, the snapshot is installed.
    /// Returns false if the node crashed.
    fn stage_chunk(&mut self, id: NodeId, w: ChunkWrite) -> bool {
        let node = self.nodes[&id].as_ref().unwrap();
        let applied = node.applied_index();
        // As the peer: an earlier chunk of this Ready may have installed it already.
        if w.snapshot.index <= applied {
            return true;
        }
        let Ok(len) = w.data.parse::<u64>() else {
            self.fail(&format!("node {id} got a chunk with data {:?}", w.data));
        };
        let sid = w.snapshot;
        let disk = self.disks.get_mut(&id).unwrap();
        let mut st = match disk.staged {
            Some(st) if st.id == sid => st,
            Some(st) if st.records <= sid.records_len => Staged {
                id: sid,
                records: st.records,
                meta: 0,
            },
            _ => Staged {
                id: sid,
                records: 0,
                meta: 0,
            },
        };
        if w.offset == st.records + st.meta && w.offset + len <= sid.total_len() {
            let r = len.min(sid.records_len - st.records);
            st.records += r;
            st.meta += len - r;
        }
        disk.staged = Some(st);
        let have = st.records + st.meta;
        if have < sid.total_len() {
            let node = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
            node.snapshot_chunk_stored(w.from, sid.index, have);
            return true;
        }
        let Some(snap) = self.snapshots.get(&sid).cloned() else {
            self.fail(&format!(
                "node {id} received snapshot {sid:?}, which nobody took"
            ));
        };
        let (state, records) = &*snap;
        // Durable: the store is the snapshot's records, the snapshot current.
        let disk = self.disks.get_mut(&id).unwrap();
        disk.store_truncate(0);
        disk.store.extend_from_slice(records);
        disk.snapshot = Some((state.clone(), sid));
        disk.staged = None;
        self.store_checked.insert(id, 0);
        if self.snapshot_crash(id, CrashPoint::InstallBeforeWalReset) {
            return false;
        }
        self.reset_wal(id, (sid.index, sid.term));
        let disk = self.disks.get_mut(&id).unwrap();
        disk.hard_state.commit = disk.hard_state.commit.max(sid.index);
        if self.snapshot_crash(id, CrashPoint::InstallBeforeAck) {
            return false;
        }
        self.stats.installs += 1;
        let node = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
        node.install_snapshot(w.from, state.clone(), sid);
        true
    }

    /// The WAL of node `id` now starts at a snapshot's `base`, with no entries: its durable log
    /// is the committed one up to there.
    fn reset_wal(&mut self, id: NodeId, base: (Index, Term)) {
        let Some((e, _)) = self.committed.get(&base.0).filter(|_| base.0 > 0) else {
            if base.0 > 0 {
                self.fail(&format!(
                    "node {id}'s WAL reset to {base:?}, never seen committed"
                ));
            }
            let disk = self.disks.get_mut(&id).unwrap();
            disk.base = base;
            disk.entries.clear();
            self.prefix.insert(id, Vec::new());
            return;
        };
        if e.term != base.1 {
            self.fail(&format!(
                "node {id}'s WAL reset to {base:?}, but term {} was committed there",
                e.term
            ));
        }
        let disk = self.disks.get_mut(&id).unwrap();
        disk.base = base;
        disk.entries.clear();
        let prefix = self.committed_prefix[..base.0 as usize].to_vec();
        self.prefix.insert(id, prefix);
    }

    /// Crashes node `id` at `point` with probability [`SimConfig::crash_in_snapshot`].
    fn snapshot_crash(&mut self, id: NodeId, point: CrashPoint) -> bool {
        if !self.rng.chance(self.cfg.crash_in_snapshot) {
            return false;
        }
        *self.stats.crashes_in_ready.entry(point).or_default() += 1;
        self.crash(id);
        true
    }

    /// Takes a snapshot on node `id` if it applied [`SimConfig::snapshot_every`] entries past
    /// its latest: durable first, then the core is told and the WAL compacted to the base it
    /// returns. Returns whether one was taken.
    fn maybe_snapshot(&mut self, id: NodeId) -> bool {
        let Some((every, trailing)) = self.cfg.snapshot_every else {
            return false;
        };
        let Some(node) = self.nodes[&id].as_ref() else {
            return false;
        };
        if node.applied_index() < self.disks[&id].snapshot_index() + every.max(1) {
            return false;
        }
        let state = node.snapshot_state();
        let pad = self.cfg.record_pad;
        let disk = self.disks.get_mut(&id).unwrap();
        if disk.store.len() as Index != state.index {
            let what = format!(
                "node {id} snapshots at {} with {} records in its store",
                state.index,
                disk.store.len()
            );
            self.fail(&what);
        }
        let sid = snapshot_id(&state, disk.store_sums(state.index as usize, pad));
        match self.snapshots.get(&sid) {
            Some(known) => {
                if known.0 != state || known.1[..] != disk.store[..] {
                    let what = format!("two different snapshots have ID {sid:?}");
                    self.fail(&what);
                }
            }
            None => {
                let records = disk.store.clone();
                self.snapshots
                    .insert(sid, Arc::new((state.clone(), records)));
            }
        }
        if self.trace {
            println!("t={} node {id} takes snapshot {sid:?}", self.now);
        }
        let disk = self.disks.get_mut(&id).unwrap();
        disk.snapshot = Some((state, sid));
        self.stats.snapshots += 1;
        if self.snapshot_crash(id, CrashPoint::SnapshotBeforeTaken) {
            return true;
        }
        let node = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
        if let Some(base) = node.snapshot_taken(sid, trailing) {
            self.stats.compactions += 1;
            let disk = self.disks.get_mut(&id).unwrap();
            let at = base.0.checked_sub(disk.base.0 + 1).map(|k| k as usize);
            let term = at.and_then(|k| disk.entries.get(k)).map(|e| e.term);
            if base.0 > sid.index || term != Some(base.1) {
                let what = format!(
                    "node {id} compacted to {base:?} (snapshot {}), its WAL has {term:?} there",
                    sid.index
                );
                self.fail(&what);
            }
            disk.entries.drain(..=at.unwrap());
            disk.base = base;
        }
        true
    }

    /// Makes a Ready's writes durable, checking Leader Append-Only and Log Matching on them.
    fn persist(&mut self, id: NodeId, role: Role, term: Term, rd: &Ready) {
        let durable = self.disks[&id].last_index();
        if let Some(first) = rd.entries.first() {
            let base = self.disks[&id].base;
            if first.index <= base.0 {
                self.fail(&format!(
                    "node {id} writes entry {} at or below its WAL's base {base:?}",
                    first.index
                ));
            }
            if first.index > durable + 1 {
                self.fail(&format!(
                    "node {id} writes entry {} past the end of its durable log ({durable})",
                    first.index
                ));
            }
            // Leader Append-Only (Figure 3): a leader only ever appends to its log.
            if role == Role::Leader {
                if first.index != durable + 1 {
                    self.fail(&format!(
                        "Leader Append-Only: leader {id} of term {term} rewrites its log from \
                         index {} (it had {durable} entries)",
                        first.index
                    ));
                }
                if let Some(e) = rd.entries.iter().find(|e| e.term != term) {
                    self.fail(&format!(
                        "leader {id} of term {term} appends an entry of term {}",
                        e.term
                    ));
                }
                for (k, e) in rd.entries.iter().enumerate() {
                    if let Payload::Config(m) = &e.payload {
                        self.leader_appends_config(id, term, e.index, m, &rd.entries[..k]);
                    }
                }
            }
        }
        self.disks.get_mut(&id).unwrap().persist(rd);
        let Some(first) = rd.entries.first() else {
            return;
        };
        let prefix = self.prefix.get_mut(&id).unwrap();
        prefix.truncate(first.index as usize - 1);
        let mut h = prefix.last().copied().unwrap_or(0);
        let mut conflict = None;
        for e in &rd.entries {
            h = chain(h, entry_hash(e));
            prefix.push(h);
            // Log Matching (Figure 3), over every log that ever existed: an entry's index and
            // term determine it and everything before it.
            let first_writer = self.written.entry((e.index, e.term)).or_insert((h, id));
            if first_writer.0 != h && conflict.is_none() {
                conflict = Some((e.index, e.term, first_writer.1));
            }
        }
        if let Some((index, term, other)) = conflict {
            self.fail(&format!(
                "Log Matching: node {id} wrote an entry at index {index} of term {term} whose \
                 log differs from the one node {other} wrote with that entry"
            ));
        }
    }

    pub fn run_for(&mut self, duration: Time) {
        let end = self.now + duration;
        while self
            .events
            .first_key_value()
            .is_some_and(|(k, _)| k.0 <= end)
        {
            self.step();
        }
        self.now = end;
    }

    /// Processes `n` events, or fewer if `within` passes first.
    pub fn run_events_within(&mut self, n: u64, within: Time) {
        let end = self.now + within;
        for _ in 0..n {
            if self.events.first_key_value().is_none_or(|(k, _)| k.0 > end) {
                self.now = end;
                return;
            }
            self.step();
        }
    }

    /// Runs until `pred` holds, checking after every event; false if `within` passes first.
    pub fn run_until(&mut self, within: Time, mut pred: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + within;
        while !pred(self) {
            if self.events.first_key_value().is_none_or(|(k, _)| k.0 > end) {
                self.now = end;
                return pred(self);
            }
            self.step();
        }
        true
    }

    // ---- observations ------------------------------------------------------------------------

    /// The live leaders of the highest term any live leader has.
    pub fn leaders(&self) -> Vec<NodeId> {
        let live: Vec<&Node> = self.nodes.values().flatten().collect();
        let top = live
            .iter()
            .filter(|n| n.role() == Role::Leader)
            .map(|n| n.term())
            .max();
        live.iter()
            .filter(|n| n.role() == Role::Leader && Some(n.term()) == top)
            .map(|n| n.id())
            .collect()
    }

    /// Every live node of `among` that believes it is leader, whatever its term.
    pub fn leaders_among(&self, among: &[NodeId]) -> Vec<NodeId> {
        among
            .iter()
            .copied()
            .filter(|&i| self.node(i).is_some_and(|n| n.role() == Role::Leader))
            .collect()
    }

    /// A leader that a majority of live nodes follow in its term (a settled cluster).
    pub fn stable_leader(&self) -> Option<NodeId> {
        let leader = *self.leaders().first()?;
        let node = self.node(leader)?;
        let (term, m) = (node.term(), node.membership());
        let followers = m
            .voter_ids()
            .filter(|&v| {
                self.node(v)
                    .is_some_and(|n| n.term() == term && n.leader() == Some(leader))
            })
            .count();
        (followers >= m.quorum()).then_some(leader)
    }

    pub fn wait_for_leader(&mut self, within: Time) -> NodeId {
        if !self.run_until(within, |s| s.stable_leader().is_some()) {
            self.fail("no leader elected in time");
        }
        self.stable_leader().unwrap()
    }

    /// Lets a minority settle for `settle` (a stale leader steps down by check quorum within
    /// two minimum election timeouts), then runs for `during`, failing if any live node of
    /// `minority` is Leader at any moment of it.
    pub fn assert_no_leader_among(&mut self, minority: &[NodeId], settle: Time, during: Time) {
        self.run_for(settle);
        if self.run_until(during, |s| !s.leaders_among(minority).is_empty()) {
            self.fail(&format!(
                "node {:?} is leader without a majority",
                self.leaders_among(minority)
            ));
        }
    }

    /// The longest committed prefix any node knows, as (index, term, payload) entries.
    pub fn committed_log(&self) -> Vec<Entry> {
        self.committed.values().map(|(e, _)| e.clone()).collect()
    }

    /// How many live nodes have committed `index`.
    pub fn n_committed(&self, index: Index) -> usize {
        self.nodes
            .values()
            .flatten()
            .filter(|n| n.commit_index() >= index)
            .count()
    }

    pub fn max_commit(&self) -> Index {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    /// How many terms have had a leader.
    pub fn elections(&self) -> usize {
        self.leader_of_term.len()
    }

    /// Appends acknowledged to clients so far.
    pub fn acked_appends(&self) -> usize {
        self.clients
            .iter()
            .map(|c| {
                c.done
                    .iter()
                    .filter(|o| matches!(o, Op::Append { .. }))
                    .count()
            })
            .sum()
    }

    pub fn answered_queries(&self) -> usize {
        self.clients
            .iter()
            .map(|c| {
                c.done
                    .iter()
                    .filter(|o| matches!(o, Op::Query { .. }))
                    .count()
            })
            .sum()
    }

    pub fn refused_appends(&self) -> usize {
        self.clients
            .iter()
            .map(|c| {
                c.done
                    .iter()
                    .filter(|o| matches!(o, Op::Refused { .. }))
                    .count()
            })
            .sum()
    }

    pub fn client_retries(&self) -> u64 {
        self.clients.iter().map(|c| c.retries).sum()
    }

    // ---- invariants --------------------------------------------------------------------------

    /// The latest committed configuration.
    pub fn committed_config(&self) -> Membership {
        self.committed_configs.values().next_back().unwrap().clone()
    }

    fn bootstrap(&self, id: NodeId) -> Membership {
        if self.joined.contains(&id) {
            Membership::default()
        } else {
            Membership::voters(&self.initial)
        }
    }

    /// Checks made when leader `id` of `term` writes a configuration entry at `index`
    /// (`before`: the entries it writes with it, ahead of it): Ongaro's rule (an entry of its
    /// term is committed), at most one uncommitted configuration, and one server changed.
    fn leader_appends_config(
        &self,
        id: NodeId,
        term: Term,
        index: Index,
        m: &Membership,
        before: &[Entry],
    ) {
        let node = self.nodes[&id].as_ref().unwrap();
        let commit = node.commit_index();
        if node.log().term_at(commit) != Some(term) {
            self.fail(&format!(
                "leader {id} of term {term} appends configuration {index} before committing an \
                 entry of its term (commit {commit}): Ongaro's rule"
            ));
        }
        let disk = &self.disks[&id].entries;
        let (prev_index, prev) = before
            .iter()
            .rev()
            .chain(disk.iter().rev())
            .find_map(|e| match &e.payload {
                Payload::Config(m) => Some((e.index, m.clone())),
                _ => None,
            })
            .unwrap_or_else(|| match &self.disks[&id].snapshot {
                // The WAL was compacted: the configuration in force at the snapshot's index.
                Some((s, _)) => (s.config_at.0, s.membership.clone()),
                None => (0, self.bootstrap(id)),
            });
        if prev_index > commit {
            self.fail(&format!(
                "leader {id} of term {term} appends configuration {index} while {prev_index} is \
                 uncommitted (commit {commit})"
            ));
        }
        if member_changes(&prev, m) > 1 {
            self.fail(&format!(
                "leader {id} of term {term} changes more than one server at {index}: {} (at \
                 {prev_index}) -> {} (in force: {} at {})",
                prev.describe(),
                m.describe(),
                node.membership().describe(),
                node.config_index()
            ));
        }
    }

    /// A leader's commit index moved: the entry there must be on the disks of a majority of
    /// the voters of its configuration (learners count for nothing). Also for a leader that
    /// has just stepped down on committing its own removal.
    fn leader_commit_check(&mut self, id: NodeId) {
        let Some(node) = self.nodes[&id].as_ref() else {
            return;
        };
        let commit = node.commit_index();
        if commit <= self.leader_commit_checked.get(&id).copied().unwrap_or(0) {
            return;
        }
        self.leader_commit_checked.insert(id, commit);
        let term = node.term();
        let leading = node.role() == Role::Leader
            || (node.removed() && self.was_leader.get(&id) == Some(&term));
        if !leading {
            return;
        }
        let m = node.membership();
        let Some(&h) = self.prefix[&id].get(commit as usize - 1) else {
            self.fail(&format!(
                "leader {id} of term {term} committed {commit}, beyond its durable log"
            ));
        };
        let holders: Vec<NodeId> = m
            .voter_ids()
            .filter(|v| self.prefix.get(v).and_then(|p| p.get(commit as usize - 1)) == Some(&h))
            .collect();
        if holders.len() < m.quorum() {
            self.fail(&format!(
                "leader {id} of term {term} committed {commit}, stored only on voters \
                 {holders:?} of its configuration {}",
                m.describe()
            ));
        }
    }

    /// Raft's safety properties (Figure 3), checked after every event that touched `id`:
    /// O(1) per event plus the work of what changed, so that long runs stay cheap.
    fn check(&mut self, id: NodeId) {
        let Some(node) = self.nodes[&id].as_ref() else {
            return;
        };
        self.checks += 1;
        let (term, commit, role) = (node.term(), node.commit_index(), node.role());
        let last_index = node.log().last_index();
        // Terms never go backwards, across restarts too (they are durable).
        let last = self.last_term.insert(id, term).unwrap_or(0);
        if term < last {
            self.fail(&format!("node {id}: term went back from {last} to {term}"));
        }
        // Commit index never goes backwards within a life.
        let last = self.last_commit.insert(id, commit).unwrap_or(0);
        if commit < last {
            self.fail(&format!(
                "node {id}: commit went back from {last} to {commit}"
            ));
        }
        if commit > last_index {
            self.fail(&format!(
                "node {id}: commit {commit} beyond its last index {last_index}"
            ));
        }
        if node.applied_index() != commit {
            self.fail(&format!(
                "node {id}: applied {} != commit {commit}",
                node.applied_index()
            ));
        }
        // Once a Ready is carried out, the log in memory is the log on disk (so checks made on
        // what was written hold for what the node uses). Cheap always, in full now and then.
        let d = &self.disks[&id];
        if d.base != node.log().base() {
            self.fail(&format!(
                "node {id}: log in memory starts after {:?}, its WAL after {:?}",
                node.log().base(),
                d.base
            ));
        }
        if d.store.len() as Index != node.applied_index() {
            self.fail(&format!(
                "node {id}: applied {} but its store holds {} records",
                node.applied_index(),
                d.store.len()
            ));
        }
        let disk = &d.entries;
        let full = self.paranoid || self.checks.is_multiple_of(512);
        if d.last_index() != last_index
            || disk.last() != node.log().entries().last()
            || (full && disk[..] != node.log().entries()[..])
        {
            let base = d.base.0;
            let at = (0..disk.len().min(node.log().entries().len()))
                .find(|&k| disk[k] != node.log().entries()[k])
                .map_or(String::new(), |k| {
                    format!(", first difference at {}", base + k as Index + 1)
                });
            self.fail(&format!(
                "node {id}: log in memory (last {last_index}) is not its durable log (last {}){at}",
                d.last_index()
            ));
        }
        // One vote per term (§5.2), across restarts: the vote is durable once the Ready that
        // changed it is carried out, and no node may then vote for anyone else in that term.
        if let Some(v) = node.vote() {
            if let Some(&before) = self.votes.get(&(term, id)) {
                if before != v {
                    self.fail(&format!(
                        "node {id} voted for {before} and then {v} in term {term}"
                    ));
                }
            } else {
                self.votes.insert((term, id), v);
            }
        }
        // Learners, joining and removed servers never campaign (thesis §4.2.1).
        if matches!(role, Role::Candidate | Role::PreCandidate)
            && (!node.membership().is_voter(id) || node.removed())
        {
            self.fail(&format!(
                "node {id} campaigns in term {term} but is no voter of {}",
                node.membership().describe()
            ));
        }
        // Election Safety: at most one leader per term.
        if role == Role::Leader {
            if let Some(&other) = self.leader_of_term.get(&term) {
                if other != id {
                    self.fail(&format!("two leaders in term {term}: {other} and {id}"));
                }
            }
            self.leader_of_term.insert(term, id);
        }
        // State Machine Safety: every node commits (and applies) the same entry at an index.
        // Only indices not yet checked in this node's life.
        let from = self.checked_commit[&id] + 1;
        for index in from..=commit {
            let node = self.nodes[&id].as_ref().unwrap();
            if index <= node.log().base().0 {
                // Compacted: the store's record stands for the entry.
                let r = &self.disks[&id].store[index as usize - 1];
                match self.committed.get(&index) {
                    Some((e, _)) if record_matches(r, e) => {}
                    other => self.fail(&format!(
                        "node {id} holds {r:?} at compacted index {index}; committed there: \
                         {other:?}"
                    )),
                }
                continue;
            }
            let entry = node.log().get(index).expect("committed entry present");
            match self.committed.get(&index) {
                Some((e, _)) if e != entry => self.fail(&format!(
                    "node {id} committed {entry:?} at {index}, another committed {e:?}"
                )),
                Some(_) => {}
                None => {
                    let entry = entry.clone();
                    self.newly_committed(id, term, entry);
                }
            }
        }
        self.checked_commit.insert(id, commit.max(from - 1));
        self.check_store(id);
        if role == Role::Leader && self.was_leader.get(&id) != Some(&term) {
            self.was_leader.insert(id, term);
            self.new_leader(id, term);
        }
        if role == Role::Leader {
            self.leader_append_only(id, term);
            self.match_indices_are_sound(id, term);
        } else {
            self.leader_tail.remove(&id);
        }
        if self.paranoid {
            self.full_check(id);
        }
    }

    /// State Machine Safety on the applied history: every store's records agree with every
    /// other's (duplicates included) and with the committed entries. Incremental: each
    /// record is checked once per content.
    fn check_store(&mut self, id: NodeId) {
        let from = self.store_checked.get(&id).copied().unwrap_or(0);
        let store = &self.disks[&id].store;
        for (k, r) in store.iter().enumerate().skip(from) {
            match self.committed.get(&(k as Index + 1)) {
                Some((e, _)) if r.index == k as Index + 1 && record_matches(r, e) => {}
                other => self.fail(&format!(
                    "node {id}'s store holds {r:?} at {}; committed there: {other:?}",
                    k + 1
                )),
            }
            match self.applied_records.get(k) {
                Some(first) if first != r => self.fail(&format!(
                    "node {id}'s store holds {r:?} at {}, another's {first:?}",
                    k + 1
                )),
                Some(_) => {}
                None => self.applied_records.push(r.clone()),
            }
        }
        let len = store.len();
        self.store_checked.insert(id, len);
    }

    /// A committed index seen for the first time (that it is durable on a majority of the
    /// committing leader's voters is checked in `leader_commit_check`). Committed
    /// configurations form a chain of one-server changes (thesis §4.2), so the majorities of
    /// any two consecutive ones overlap.
    fn newly_committed(&mut self, id: NodeId, term: Term, entry: Entry) {
        let index = entry.index;
        if let Payload::Config(m) = &entry.payload {
            let prev = self.committed_config();
            if member_changes(&prev, m) > 1 {
                self.fail(&format!(
                    "node {id} committed configuration {index} {} after {}: more than one \
                     server changed",
                    m.describe(),
                    prev.describe()
                ));
            }
            self.committed_configs.insert(index, m.clone());
        }
        let top = self.committed_by_term.entry(term).or_default();
        *top = (*top).max(index);
        if index != self.committed_prefix.len() as Index + 1 {
            self.fail(&format!(
                "node {id} committed {index}, but only 1..={} were seen committed",
                self.committed_prefix.len()
            ));
        }
        let h = chain(
            self.committed_prefix.last().copied().unwrap_or(0),
            entry_hash(&entry),
        );
        self.committed_prefix.push(h);
        self.committed.insert(index, (entry, term));
    }

    /// Checks made once when `id` becomes leader of `term`.
    fn new_leader(&mut self, id: NodeId, term: Term) {
        // A leader was granted votes by a majority of the voters of its configuration in its
        // term, itself included; a learner's grant counts for nothing.
        let node = self.nodes[&id].as_ref().unwrap();
        let m = node.membership();
        let mut granted = self.grants.get(&(term, id)).cloned().unwrap_or_default();
        if node.vote() == Some(id) {
            granted.insert(id);
        }
        let voters: BTreeSet<NodeId> = granted.into_iter().filter(|&v| m.is_voter(v)).collect();
        if !m.is_voter(id) || voters.len() < m.quorum() {
            self.fail(&format!(
                "node {id} became leader of term {term} with votes from only the voters \
                 {voters:?} of {}",
                m.describe()
            ));
        }
        // Leader Completeness: a leader has every entry committed in an earlier term. By Log
        // Matching (checked on every write) it suffices to check the last such entry.
        let top = self
            .committed_by_term
            .range(..term)
            .map(|(_, &i)| i)
            .max()
            .unwrap_or(0);
        if top > 0 {
            let (entry, _) = &self.committed[&top];
            let held = if top <= node.log().base().0 {
                self.disks[&id]
                    .store
                    .get(top as usize - 1)
                    .is_some_and(|r| record_matches(r, entry))
            } else {
                node.log().get(top) == Some(entry)
            };
            if !held {
                self.fail(&format!(
                    "leader {id} of term {term} lacks committed entry {top} ({entry:?})"
                ));
            }
        }
    }

    /// Leader Append-Only in memory: while leader of the same term, the last index never falls
    /// and the entry at the last index seen stays the same. (Rewrites show up on disk as a
    /// leader's write that is not an append, checked in `persist`.)
    fn leader_append_only(&mut self, id: NodeId, term: Term) {
        let log = self.nodes[&id].as_ref().unwrap().log();
        let (last, base) = (log.last_index(), log.base().0);
        if let Some(&(t, before, h)) = self.leader_tail.get(&id) {
            // (An entry compacted since was committed, and checked as such.)
            let changed =
                last < before || (before > base && log.get(before).map(entry_hash) != Some(h));
            if t == term && changed {
                self.fail(&format!(
                    "Leader Append-Only: leader {id} of term {term} changed its log at or below \
                     index {before} (last now {last})"
                ));
            }
        }
        let h = log.get(last).map_or(0, entry_hash);
        self.leader_tail.insert(id, (term, last, h));
        if self.paranoid {
            let entries = log.entries().to_vec();
            if let Some((t, before)) = self.leader_log.get(&id) {
                let shorter = before.last().is_some_and(|e| e.index > last);
                let changed = before
                    .iter()
                    .any(|e| e.index > base && log.get(e.index) != Some(e));
                if *t == term && (shorter || changed) {
                    self.fail(&format!(
                        "Leader Append-Only (full check): leader {id} of term {term} changed its log"
                    ));
                }
            }
            self.leader_log.insert(id, (term, entries));
        }
    }

    /// What a leader counts towards commitment is real: a follower's match index never falls
    /// within the leader's term (no follower here loses what it acknowledged), and the
    /// follower's durable log agrees with the leader's up to it, unless a newer term has since
    /// reached the follower's disk.
    fn match_indices_are_sound(&mut self, id: NodeId, term: Term) {
        let info = self.nodes[&id].as_ref().unwrap().status();
        for f in &info.followers {
            let m = f.match_index;
            if let Some(&(t, before)) = self.match_seen.get(&(id, f.id)) {
                if t == term && m < before {
                    self.fail(&format!(
                        "leader {id} of term {term}: match index of follower {} fell from \
                         {before} to {m}",
                        f.id
                    ));
                }
            }
            self.match_seen.insert((id, f.id), (term, m));
            if m == 0 || self.disks[&f.id].hard_state.term > term {
                continue;
            }
            let mine = self.prefix[&id].get(m as usize - 1);
            let theirs = self.prefix[&f.id].get(m as usize - 1);
            if mine.is_none() || mine != theirs {
                self.fail(&format!(
                    "leader {id} of term {term} counts follower {} as matching up to {m}, but \
                     its durable log ({} entries) does not agree with the leader's ({})",
                    f.id,
                    self.prefix[&f.id].len(),
                    info.last_index
                ));
            }
        }
    }

    /// The checks the incremental ones stand for, in full: every committed index of the node,
    /// every earlier-term committed entry in a leader's log, Log Matching against every other
    /// live node. Quadratic; only with `SIM_PARANOID`.
    fn full_check(&self, id: NodeId) {
        let node = self.nodes[&id].as_ref().unwrap();
        let base = node.log().base().0;
        let store = &self.disks[&id].store;
        // Compacted entries: the store's records stand for them.
        let holds = |index: Index, entry: &Entry| {
            if index <= base {
                store
                    .get(index as usize - 1)
                    .is_some_and(|r| record_matches(r, entry))
            } else {
                node.log().get(index) == Some(entry)
            }
        };
        for index in 1..=node.commit_index() {
            let entry = self.committed.get(&index).map(|c| &c.0);
            if !entry.is_some_and(|e| holds(index, e)) {
                self.fail(&format!(
                    "full check: node {id} committed at {index}, not {entry:?}"
                ));
            }
        }
        if node.role() == Role::Leader {
            for (index, (entry, seen_in)) in &self.committed {
                if *seen_in < node.term() && !holds(*index, entry) {
                    self.fail(&format!(
                        "full check: leader {id} of term {} lacks committed entry {index}",
                        node.term()
                    ));
                }
            }
        }
        let mine = node.log().entries();
        for (other_id, other) in &self.nodes {
            let Some(other) = other else { continue };
            if *other_id == id {
                continue;
            }
            // Only the indices both logs still hold (above both bases).
            let theirs = other.log().entries();
            let (lo, hi) = (
                base.max(other.log().base().0),
                node.log().last_index().min(other.log().last_index()),
            );
            let at = |log: &[Entry], b: Index, i: Index| log[(i - b - 1) as usize].clone();
            let other_base = other.log().base().0;
            if let Some(k) = (lo + 1..=hi)
                .rev()
                .find(|&i| at(mine, base, i).term == at(theirs, other_base, i).term)
            {
                if (lo + 1..=k).any(|i| at(mine, base, i) != at(theirs, other_base, i)) {
                    self.fail(&format!(
                        "full check: Log Matching between nodes {id} and {other_id} at {k}"
                    ));
                }
            }
        }
    }

    // ---- membership -----------------------------------------------------------------------------

    pub fn admin_busy(&self) -> bool {
        self.admin.is_some()
    }

    /// The administrator gives up on the change in progress (its entry may still commit).
    pub fn admin_abandon(&mut self) {
        self.admin = None;
    }

    /// Asks for `change` and runs until it is answered; returns the answer.
    pub fn change_members_and_wait(&mut self, change: ConfChange, within: Time) -> ClientResult {
        self.change_members(change.clone());
        if !self.run_until(within, |s| !s.admin_busy()) {
            self.fail(&format!("{change:?} not answered in time"));
        }
        self.admin_done.last().unwrap().1.clone()
    }

    /// Asks for one membership change as `client` does: to the leader if one is known, retried
    /// (Busy, NotLeader, timeouts) until it is committed or refused.
    pub fn change_members(&mut self, change: ConfChange) {
        assert!(self.admin.is_none(), "one membership change at a time");
        self.stats.config_requests += 1;
        let target = match self.leaders().first() {
            Some(&l) => l,
            None => self.rng.pick(&self.ids.clone()),
        };
        self.admin = Some(AdminOp {
            change,
            target,
            request_id: 0,
            since: self.now,
            retry_same: false,
        });
        self.admin_send();
    }

    /// A random one-server change toward `cfg.nodes` voters, from the committed configuration:
    /// a learner is promoted (or removed if its node is gone); above `cfg.nodes` voters a
    /// member is removed (the leader as often as not); otherwise a fresh node joins as a
    /// learner (or, now and then, a member is removed first). So over a run members are added,
    /// promoted, removed and replaced, mostly between `cfg.nodes` and one more voter.
    pub fn random_membership_change(&mut self) {
        if self.admin.is_some() {
            return;
        }
        let m = self.committed_config();
        let voters: Vec<NodeId> = m.voter_ids().collect();
        let learner = m
            .members
            .iter()
            .find(|x| x.role == MemberRole::Learner)
            .map(|x| x.id);
        let n = self.cfg.nodes;
        let change = if let Some(id) = learner {
            if self.ids.contains(&id) && self.rng.chance(0.8) {
                ConfChange::Promote { id }
            } else {
                ConfChange::Remove { id }
            }
        } else if voters.len() > n || (voters.len() == n && self.rng.chance(0.1)) {
            let leader = self.leaders().first().copied().filter(|l| m.is_voter(*l));
            let id = match leader {
                Some(l) if self.rng.chance(0.5) => l,
                _ => self.rng.pick(&voters),
            };
            ConfChange::Remove { id }
        } else {
            let id = self.spawn();
            ConfChange::AddLearner {
                id,
                address: format!("10.0.{}.{}:7000", id / 256, id % 256),
            }
        };
        self.change_members(change);
    }

    /// Stops the nodes whose removal committed and that have not stopped by themselves (they
    /// missed the news, as an operator would stop them).
    pub fn decommission(&mut self) {
        let m = self.committed_config();
        for id in self.decommission.clone() {
            if !m.contains(id) {
                self.retire(id);
            }
        }
    }

    /// Stops every node that is not a member of the committed configuration (with no change
    /// in progress): what an operator does before declaring the cluster settled.
    pub fn retire_non_members(&mut self) {
        assert!(self.admin.is_none());
        let m = self.committed_config();
        for id in self.ids.clone() {
            if !m.contains(id) {
                self.retire(id);
            }
        }
    }

    fn admin_send(&mut self) {
        let Some(op) = self.admin.as_mut() else {
            return;
        };
        self.admin_request_id += 1;
        op.request_id = self.admin_request_id;
        op.retry_same = false;
        let req = ClientRequest {
            id: op.request_id,
            op: ClientOp::ChangeMembers {
                change: op.change.clone(),
            },
        };
        let (target, request_id) = (op.target, op.request_id);
        let to = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
        self.transmit(Event::Request(target, to, req));
        self.schedule(self.cfg.client_retry, Event::AdminTimer(request_id));
    }

    fn admin_timeout(&mut self, request_id: u64) {
        let Some(op) = self.admin.as_ref().filter(|op| op.request_id == request_id) else {
            return;
        };
        if !op.retry_same || !self.ids.contains(&op.target) {
            let ids = self.ids.clone();
            let target = self.rng.pick(&ids);
            self.admin.as_mut().unwrap().target = target;
        }
        self.admin_send();
    }

    fn admin_reply(&mut self, reply: ClientReply) {
        let Some(op) = self.admin.clone() else {
            return;
        };
        if reply.id != op.request_id {
            return; // stale or duplicated answer
        }
        if self.paranoid || std::env::var("SIM_VERBOSE").is_ok() {
            println!(
                "t={}ms {:?} from node {}: {:?}",
                self.now / MS,
                op.change,
                reply.from,
                reply.result
            );
        }
        match &reply.result {
            ClientResult::Configured { members, .. } => {
                let m = Membership::new(members.clone());
                if !m.has_applied(&op.change) {
                    self.fail(&format!(
                        "{:?} answered as done with {}",
                        op.change,
                        m.describe()
                    ));
                }
                self.stats.config_changes += 1;
                if let ConfChange::Remove { id } = op.change {
                    self.decommission.insert(id);
                }
            }
            ClientResult::Refused { .. } => {
                self.stats.config_refused += 1;
                // A node that never joined stops, unless some log already has it.
                if let ConfChange::AddLearner { id, .. } = op.change {
                    let known = self
                        .nodes
                        .values()
                        .flatten()
                        .any(|n| n.id() != id && n.membership().contains(id));
                    if !known && self.ids.contains(&id) {
                        self.retire(id);
                    }
                }
            }
            // Not now: the retry timer asks again, of the same leader.
            ClientResult::Busy { .. } => {
                self.stats.config_busy += 1;
                let op = self.admin.as_mut().unwrap();
                op.target = reply.from;
                op.retry_same = true;
                let request_id = op.request_id;
                self.schedule(20 * MS, Event::AdminTimer(request_id));
                return;
            }
            ClientResult::NotLeader { leader } => {
                if let Some(l) = leader.filter(|&l| l != reply.from && self.ids.contains(&l)) {
                    self.admin.as_mut().unwrap().target = l;
                    self.admin_send();
                }
                return;
            }
            other => self.fail(&format!("unexpected answer {other:?} to {:?}", op.change)),
        }
        self.admin = None;
        self.admin_done.push((op.change, reply.result));
    }

    // ---- clients -------------------------------------------------------------------------------

    pub fn add_client(&mut self) -> usize {
        let c = self.clients.len();
        let id = self.rng.next_u64();
        let target = self.rng.pick(&self.ids.clone());
        self.clients.push(SimClient {
            id,
            seq: 0,
            target,
            pending: None,
            request_id: 0,
            done: Vec::new(),
            busy_appends: None,
            made: 0,
            retries: 0,
            shares_id: false,
        });
        c
    }

    /// Gives client `c` the ID of client `with`: their requests with the same sequence number
    /// collide.
    pub fn share_client_id(&mut self, c: usize, with: usize) {
        self.clients[c].id = self.clients[with].id;
        self.clients[c].shares_id = true;
        self.clients[with].shares_id = true;
    }

    /// Makes client `c` issue operations back to back, appends with probability
    /// `append_ratio` and otherwise linearizable queries of the log's tail, until
    /// [`Sim::stop_clients`].
    pub fn keep_busy(&mut self, c: usize, append_ratio: f64) {
        self.clients[c].busy_appends = Some(append_ratio);
        if !self.client_busy(c) {
            self.next_op(c);
        }
    }

    /// Busy clients finish the operation they have started and issue no more.
    pub fn stop_clients(&mut self) {
        for c in &mut self.clients {
            c.busy_appends = None;
        }
    }

    fn next_op(&mut self, c: usize) {
        let Some(ratio) = self.clients[c].busy_appends else {
            return;
        };
        if self.rng.chance(ratio) {
            self.clients[c].made += 1;
            let data = format!("b{c}.{}", self.clients[c].made);
            self.client_append(c, &data);
        } else {
            let start = self
                .max_commit()
                .saturating_sub(self.rng.range(0, 8))
                .max(1);
            self.client_query_from(c, start);
        }
    }

    fn client_addr(c: usize) -> ReplyTo {
        SocketAddr::from(([127, 0, 0, 1], 40000 + c as u16))
    }

    /// The lab's `Start()` without a client behind it: hands `data` to node `id` directly, once,
    /// and returns the index it would take if `id` is leader (its last index either way).
    pub fn propose_once(&mut self, id: NodeId, data: &str) -> Index {
        let client = self.rng.next_u64();
        if self.paused.contains_key(&id) {
            return 0;
        }
        let Some(node) = self.nodes.get_mut(&id).unwrap().as_mut() else {
            return 0;
        };
        let req = ClientRequest {
            id: 0,
            op: ClientOp::Append {
                client,
                seq: 1,
                data: data.to_string(),
            },
        };
        node.request(SocketAddr::from(([127, 0, 0, 1], 1)), req);
        let index = node.log().last_index();
        self.after_event(id);
        index
    }

    pub fn client_busy(&self, c: usize) -> bool {
        self.clients[c].pending.is_some()
    }

    /// Starts an append; the client retries it (same seq) until it is acknowledged.
    pub fn client_append(&mut self, c: usize, data: &str) {
        assert!(!self.client_busy(c), "one operation per client at a time");
        let client = &mut self.clients[c];
        client.seq += 1;
        client.pending = Some((
            Pending::Append {
                seq: client.seq,
                data: data.to_string(),
            },
            self.now,
        ));
        self.client_send(c);
    }

    /// Starts a linearizable query of the whole committed log.
    pub fn client_query(&mut self, c: usize) {
        self.client_query_from(c, 1);
    }

    /// Starts a linearizable query of the committed log from `start`.
    pub fn client_query_from(&mut self, c: usize, start: Index) {
        assert!(!self.client_busy(c), "one operation per client at a time");
        self.clients[c].pending = Some((
            Pending::Query {
                pages: Vec::new(),
                read_index: None,
                first: start,
                start,
            },
            self.now,
        ));
        self.client_send(c);
    }

    fn client_send(&mut self, c: usize) {
        let client = &mut self.clients[c];
        let Some((pending, _)) = &client.pending else {
            return;
        };
        client.request_id += 1;
        let op = match pending {
            Pending::Append { seq, data } => ClientOp::Append {
                client: client.id,
                seq: *seq,
                data: data.clone(),
            },
            Pending::Query {
                read_index, start, ..
            } => ClientOp::Query {
                start: *start,
                read_index: *read_index,
            },
        };
        let req = ClientRequest {
            id: client.request_id,
            op,
        };
        let (target, request_id) = (client.target, client.request_id);
        self.transmit(Event::Request(target, Self::client_addr(c), req));
        let retry = self.cfg.client_retry;
        self.schedule(retry, Event::ClientTimer(c, request_id));
    }

    fn client_timeout(&mut self, c: usize, request_id: u64) {
        if self.clients[c].request_id != request_id || self.clients[c].pending.is_none() {
            return;
        }
        let ids = self.ids.clone();
        self.clients[c].target = self.rng.pick(&ids);
        self.clients[c].retries += 1;
        self.client_send(c);
    }

    fn client_reply(&mut self, c: usize, reply: ClientReply) {
        let now = self.now;
        let client = &mut self.clients[c];
        if reply.id != client.request_id || client.pending.is_none() {
            return; // stale or duplicated answer
        }
        let (pending, invoked) = client.pending.take().unwrap();
        match (pending, reply.result) {
            (Pending::Append { data, .. }, ClientResult::Appended { index, .. }) => {
                client.done.push(Op::Append {
                    data,
                    index,
                    invoked,
                    returned: now,
                });
                self.next_op(c);
            }
            (
                Pending::Query {
                    mut pages, first, ..
                },
                ClientResult::Entries {
                    entries,
                    read_index,
                    next,
                },
            ) => {
                pages.extend(entries);
                match next {
                    Some(start) => {
                        client.pending = Some((
                            Pending::Query {
                                pages,
                                read_index: Some(read_index),
                                first,
                                start,
                            },
                            invoked,
                        ));
                        client.target = reply.from;
                        self.client_send(c);
                    }
                    None => {
                        client.done.push(Op::Query {
                            log: pages,
                            start: first,
                            read_index,
                            invoked,
                            returned: now,
                            peer: reply.from,
                        });
                        self.next_op(c);
                    }
                }
            }
            (Pending::Append { data, .. }, ClientResult::Refused { reason })
                if client.shares_id =>
            {
                client.done.push(Op::Refused { data, reason });
                self.next_op(c);
            }
            (pending, ClientResult::NotLeader { leader }) => {
                client.pending = Some((pending, invoked));
                match leader {
                    Some(l) if l != reply.from => {
                        client.target = l;
                        self.client_send(c);
                    }
                    // No leader known: the retry timer tries another node.
                    _ => {}
                }
            }
            (pending, result) => {
                self.fail(&format!(
                    "client {c}: unexpected answer {result:?} to {pending:?}"
                ));
            }
        }
    }

    /// Checks what clients saw against the final committed log: every acknowledged append is
    /// in it exactly once at its acknowledged index; every query's entries are the committed
    /// ones, contiguous up to its read index, and that read index covers every append
    /// acknowledged before the query began (no stale reads).
    pub fn check_client_history(&self) {
        let log = self.committed_log();
        let mut seen_data: BTreeMap<&str, Index> = BTreeMap::new();
        for e in &log {
            if let Payload::Data { data, client, seq } = &e.payload {
                if !self.node_view_is_duplicate(e.index) {
                    if let Some(prev) = seen_data.insert(data, e.index) {
                        self.fail(&format!(
                            "{data:?} applied twice, at {prev} and {} (client {client:x} seq {seq})",
                            e.index
                        ));
                    }
                }
            }
        }
        let mut acks: Vec<(Time, Index)> = Vec::new();
        for client in &self.clients {
            for op in &client.done {
                if let Op::Append {
                    data,
                    index,
                    returned,
                    ..
                } = op
                {
                    if seen_data.get(data.as_str()) != Some(index) {
                        self.fail(&format!(
                            "acknowledged append {data:?} at {index} is not in the final log there"
                        ));
                    }
                    acks.push((*returned, *index));
                }
            }
        }
        // The highest index acknowledged at or before each time, for the stale-read check.
        acks.sort_unstable();
        let mut highest = 0;
        let acked_by: Vec<(Time, Index)> = acks
            .iter()
            .map(|&(t, i)| {
                highest = highest.max(i);
                (t, highest)
            })
            .collect();
        for client in &self.clients {
            for op in &client.done {
                let Op::Query {
                    log: got,
                    start,
                    read_index,
                    invoked,
                    ..
                } = op
                else {
                    continue;
                };
                if *read_index > log.len() as Index {
                    self.fail(&format!(
                        "query read index {read_index} beyond the committed log ({})",
                        log.len()
                    ));
                }
                let want = (*start).max(1)..=*read_index;
                if got.len() != want.clone().count() {
                    self.fail(&format!("query of {want:?} returned {} entries", got.len()));
                }
                for (r, index) in got.iter().zip(want) {
                    let e = &log[index as usize - 1];
                    let data = match &e.payload {
                        Payload::Data { data, .. } if !self.node_view_is_duplicate(index) => {
                            Some(data.clone())
                        }
                        _ => None,
                    };
                    if r.index != index || r.term != e.term || r.data != data {
                        self.fail(&format!("query returned {r:?}, committed was {e:?}"));
                    }
                }
                let before = acked_by.partition_point(|&(t, _)| t < *invoked);
                if let Some(&(t, i)) = before.checked_sub(1).map(|k| &acked_by[k]) {
                    if i > *read_index {
                        self.fail(&format!(
                            "stale read: query at {invoked} read up to {read_index}, but index \
                             {i} was acknowledged by {t}"
                        ));
                    }
                }
            }
        }
    }

    fn node_view_is_duplicate(&self, index: Index) -> bool {
        // The applied history (as the first store held it; all agree) knows, also below the
        // snapshots that cores were restored from.
        if let Some(r) = self.applied_records.get(index as usize - 1) {
            return r.kind.as_deref() == Some("duplicate");
        }
        self.nodes
            .values()
            .flatten()
            .find(|n| n.applied_index() >= index)
            .is_some_and(|n| n.state_machine().is_duplicate(index))
    }
}

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
