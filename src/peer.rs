//! The shell around the core: threads, channels, and the persist → send → advance → reply loop.
//!
//! Three threads:
//! - the **receiver** ([`transport::Listener::run`]) turns datagrams into [`Inbox`] items:
//!   peer messages into the peer queue, client requests into the client queue (shedding them
//!   when it is full); with a cluster secret it verifies each datagram first ([`crate::auth`]);
//! - the **timer** puts a [`Inbox::Tick`] in the peer queue every tick, and forwards shutdown;
//! - the **node thread** (the thread that calls [`run`]) is the sole owner of the core [`Node`],
//!   the [`Wal`] and the send side of the socket.
//!
//! The node thread blocks for one item, then drains whatever else is already queued, stepping
//! the core for each, and only then takes the core's [`Ready`]. Many requests that arrive together
//! thus share one `Ready` and one fsync: group commit falls out of the loop's shape.
//!
//! Peer messages and ticks come first: the node thread takes everything in the peer queue
//! before any client request, and looks at it again before each further request. A batch holds
//! at most [`MAX_CLIENT_BATCH`] requests, so a heartbeat or an AppendEntries answer waits at
//! most for one bounded batch, however many clients are queued. Client load can slow clients,
//! never cost the leader its followers.

use crate::cluster::{self, ClusterFile, Start};
use crate::config::PeerConfig;
use crate::metrics::{Metrics, MetricsServer};
use crate::raft::node::{ChunkRead, ChunkWrite, StoreRead};
use crate::raft::{
    self, Body, ClientOp, ClientReply, ClientRequest, ClientResult, Entry, HardState, Index,
    Membership, Message, Node, NodeId, Ready, ReplyTo, StatusInfo,
};
use crate::raft::{LogRecord, SnapshotId, SnapshotState, Term};
use crate::storage::{Disk, Restored, Staged};
use crate::transport::{self, Accept, Directory, Inbound, Queues, RateLimiter, Transport};
use crossbeam_channel::{never, select, Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Peer messages and ticks queued beyond which the receiver drops peer messages (the node
/// thread would have to be stalled for a long time: peers keep a bounded window in flight).
pub const PEER_QUEUE_CAPACITY: usize = 16 * 1024;
/// Client requests queued beyond which the receiver sheds them. A few batches' worth: a request
/// queued behind more would wait longer than clients wait before retrying.
pub const CLIENT_QUEUE_CAPACITY: usize = 4 * MAX_CLIENT_BATCH;
/// Peer-queue items stepped into the core before its `Ready` is carried out.
pub const MAX_BATCH: usize = 4096;
/// Client requests stepped into the core before its `Ready` is carried out. Large enough that
/// an fsync is shared by hundreds of appends, small enough that one batch (stepping, sending,
/// one fsync, and the replies) takes a few milliseconds, far below an election timeout.
pub const MAX_CLIENT_BATCH: usize = 512;
/// Ticks stepped into the core per batch; more that are queued are skipped. After the node
/// thread stalls (a slow fsync, descheduled), the ticks queued meanwhile would otherwise reach
/// the core all at once: a leader would conclude it had lost its followers (check quorum) and
/// followers that their leader was gone, before either had a chance to send or hear anything.
/// Skipping them makes time in the core run slow during the stall, as Go's tickers do for
/// etcd: elections are delayed, never made unsafe.
pub const MAX_TICKS_PER_BATCH: usize = 2;
/// A batch (stepping, fsync, sending) that takes this long is logged with where the time went,
/// as is one that skips this many ticks (the one after a stall).
pub const SLOW_BATCH: Duration = Duration::from_millis(50);
const SKIPPED_TICKS_TO_LOG: usize = 5;
/// AppendEntries in flight to one follower.
pub const MAX_INFLIGHT: usize = 32;

/// Everything the node thread reacts to.
#[derive(Debug)]
pub enum Inbox {
    Peer(Message),
    Client(ReplyTo, ClientRequest),
    Tick,
    Shutdown,
}

impl From<Inbound> for Inbox {
    fn from(item: Inbound) -> Inbox {
        match item {
            Inbound::Peer(m) => Inbox::Peer(m),
            Inbound::Client(to, req) => Inbox::Client(to, req),
        }
    }
}

/// How the config's milliseconds become the core's ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub tick: Duration,
    pub heartbeat_ticks: u64,
    pub election_ticks: (u64, u64),
}

/// The least difference, in ticks, between the longest and the shortest election timeout.
/// Peers act on whole ticks, and each draws its timeout uniformly from `min..=max`: with at
/// least 4 values to draw from, two peers pick the same one (and may split the vote) with
/// probability at most 1/4, and a split repeats n times with at most (1/4)^n. With none,
/// peers whose clocks tick together split every time.
pub const MIN_ELECTION_SPREAD_TICKS: u64 = 3;

impl Timing {
    /// A tick is a fifth of the heartbeat interval, between 1 and 10 ms. The election minimum
    /// is kept above the heartbeat, whatever the rounding, so followers hear from a live leader
    /// before they give up on it; the maximum is kept [`MIN_ELECTION_SPREAD_TICKS`] above the
    /// minimum (and says so in the log if that widens the configured range).
    pub fn from_ms(heartbeat_ms: u64, election_ms: (u64, u64)) -> Timing {
        let tick_ms = (heartbeat_ms / 5).clamp(1, 10);
        let heartbeat_ticks = (heartbeat_ms / tick_ms).max(1);
        let min = (election_ms.0 / tick_ms).max(heartbeat_ticks + 1);
        let configured_max = election_ms.1 / tick_ms;
        let max = configured_max.max(min + MIN_ELECTION_SPREAD_TICKS);
        if max > configured_max {
            log::info!(
                "election timeout {}-{} ms is {min}-{configured_max} ticks of {tick_ms} ms; widening the maximum to {max} ticks ({} ms) so that peers draw different timeouts and split votes do not repeat",
                election_ms.0,
                election_ms.1,
                max * tick_ms
            );
        }
        Timing {
            tick: Duration::from_millis(tick_ms),
            heartbeat_ticks,
            election_ticks: (min, max),
        }
    }
}

/// The core's config for this peer, with `bootstrap` the membership from its `cluster` file
/// (empty for a peer that joins): never the JSON's, which only bootstraps an empty data dir.
pub fn core_config(
    config: &PeerConfig,
    bootstrap: Membership,
    timing: &Timing,
    seed: u64,
) -> raft::Config {
    raft::Config {
        id: config.node_id,
        membership: bootstrap,
        election_ticks: timing.election_ticks,
        heartbeat_ticks: timing.heartbeat_ticks,
        max_inflight: MAX_INFLIGHT,
        seed,
    }
}

/// A seed for the core's generator from the clock, the process and the node ID, so that peers
/// started at the same instant still draw different election timeouts. (The core may not read
/// clocks; the shell may.)
pub fn seed(node_id: NodeId) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ node_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(std::process::id());
    // SplitMix64's finaliser, so nearby inputs give unrelated seeds.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How a peer starts, beyond its config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `--join`: with an empty data_dir, join an existing cluster (learning its ID and
    /// configurations from the leader) instead of bootstrapping one from `other_peers`.
    pub join: bool,
}

/// [`run_with`] and default options: an empty data_dir bootstraps a cluster.
pub fn run(config: PeerConfig, shutdown: Receiver<()>) -> Result<(), String> {
    run_with(config, Options::default(), shutdown)
}

/// Runs this peer until `shutdown` receives a message (or its sender is dropped), or a
/// committed configuration removes it (then `Ok`). Binds the socket, opens the storage, reads
/// (or writes) the `cluster` file, restores the core, and runs the node loop on the calling
/// thread. Returns an error, after stopping its threads, if the socket or storage cannot be
/// opened or storage fails later: continuing after a failed fsync could break Raft's promises.
pub fn run_with(
    config: PeerConfig,
    options: Options,
    shutdown: Receiver<()>,
) -> Result<(), String> {
    let timing = Timing::from_ms(config.heartbeat_ms, config.election_timeout_ms);
    let (transport, listener) = transport::bind(&config)?;
    let started = std::time::Instant::now();
    let (storage, restored) = Disk::open(
        &config.data_dir,
        config.node_id,
        config.snapshot_entries,
        config.snapshot_trailing,
    )
    .map_err(|e| {
        format!(
            "{}: cannot open storage in {}: {e}",
            config.name,
            config.data_dir.display()
        )
    })?;
    let Restored {
        hard_state,
        snapshot,
        base,
        entries,
    } = restored;
    let address = transport.local_addr().map_or_else(
        |_| format!("{}:{}", config.host, config.port),
        |a| a.to_string(),
    );
    log::info!(
        "{} (node {}) on {address}, data in {}: restored term {}, vote {:?}, commit {}, last index {}, snapshot at {}, log from {}; tick {:?}, heartbeat {} ticks, election {:?} ticks",
        config.name,
        config.node_id,
        config.data_dir.display(),
        hard_state.term,
        hard_state.vote,
        hard_state.commit,
        entries.last().map_or(base.0, |e| e.index),
        snapshot.as_ref().map_or(0, |(s, _)| s.index),
        base.0 + 1,
        timing.tick,
        timing.heartbeat_ticks,
        timing.election_ticks,
    );
    let log_is_empty =
        entries.is_empty() && hard_state == HardState::default() && snapshot.is_none();
    let start = cluster::prepare(&config, options.join, log_is_empty)?;
    let routes = Routes::new(&config, &start);
    let bootstrap = match start {
        Start::Member(file) => file.bootstrap,
        Start::Joining => Membership::default(),
    };
    let node = Node::restore(
        core_config(&config, bootstrap, &timing, seed(config.node_id)),
        hard_state,
        snapshot,
        base,
        entries,
    );
    log::info!(
        "{}: log replayed and state machine rebuilt in {} ms",
        config.name,
        started.elapsed().as_millis()
    );

    let metrics = transport.metrics();
    let metrics_server = match config.metrics_addr {
        Some(addr) => Some(
            MetricsServer::start(addr, Arc::clone(&metrics))
                .map_err(|e| format!("{}: {e}", config.name))?,
        ),
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    // Stops the other threads however the node loop ends, a panic in the core included.
    let _stop_on_exit = StopOnDrop(Arc::clone(&stop));
    let (peers_tx, peers_rx) = crossbeam_channel::bounded::<Inbox>(PEER_QUEUE_CAPACITY);
    let (clients_tx, clients_rx) = crossbeam_channel::bounded::<Inbox>(CLIENT_QUEUE_CAPACITY);
    let receiver = {
        let stop = Arc::clone(&stop);
        let queues = Queues {
            peers: peers_tx.clone(),
            clients: clients_tx,
        };
        thread::Builder::new()
            .name("receiver".into())
            .spawn(move || {
                listener.run(queues, stop);
            })
            .map_err(|e| format!("cannot start the receiver thread: {e}"))?
    };
    let timer = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("timer".into())
            .spawn(move || timer_loop(timing.tick, peers_tx, shutdown, stop))
            .map_err(|e| format!("cannot start the timer thread: {e}"))?
    };

    let inbox = Inboxes::new(peers_rx, clients_rx);
    let mut instruments = Instruments::new(metrics, timing.tick);
    let mut routes = Some(routes);
    let result = node_loop(
        node,
        storage,
        transport,
        inbox,
        &mut instruments,
        &mut routes,
    );
    drop(metrics_server);

    stop.store(true, Ordering::Relaxed);
    for (name, handle) in [("receiver", receiver), ("timer", timer)] {
        if handle.join().is_err() {
            log::error!("the {name} thread panicked");
        }
    }
    match &result {
        Ok(()) => log::info!("{} (node {}) stopped", config.name, config.node_id),
        Err(e) => log::error!("{} (node {}) stopping: {e}", config.name, config.node_id),
    }
    result
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Puts a `Tick` in the peer queue every `tick`, until `stop` or shutdown. Does not catch up
/// after a stall (a late tick is followed by the next one a full tick later): time in the core
/// may run slow under load, which delays elections but never makes them unsafe. Ticks share the
/// peer queue, which the node thread drains first, so client load cannot hold them back.
fn timer_loop(tick: Duration, inbox: Sender<Inbox>, shutdown: Receiver<()>, stop: Arc<AtomicBool>) {
    let mut next = Instant::now() + tick;
    while !stop.load(Ordering::Relaxed) {
        let wait = next.saturating_duration_since(Instant::now());
        select! {
            recv(shutdown) -> _ => {
                log::info!("shutting down");
                let _ = inbox.send(Inbox::Shutdown);
                return;
            }
            default(wait) => {
                if inbox.send(Inbox::Tick).is_err() {
                    return;
                }
                let now = Instant::now();
                next += tick;
                if next <= now {
                    next = now + tick;
                }
            }
        }
    }
}

/// What the node loop needs from the core; [`Node`] in production, fakes in the tests.
trait Core {
    fn tick(&mut self);
    fn step(&mut self, msg: Message);
    fn request(&mut self, reply_to: ReplyTo, req: ClientRequest);
    fn ready(&mut self) -> Ready;
    fn advance(&mut self);
    /// The core's view, for metrics.
    fn status(&self) -> Option<StatusInfo> {
        None
    }
    /// What routing needs to know of the configurations; `None` in fakes.
    fn routing(&self) -> Option<Routing> {
        None
    }
    /// Changes whenever [`Core::routing`] may have: checked every batch, so that the
    /// configurations are copied only when they change.
    fn routing_key(&self) -> Option<raft::node::RoutingKey> {
        None
    }
    /// A committed configuration removed this node: the peer stops.
    fn removed(&self) -> bool {
        false
    }
    fn id(&self) -> NodeId {
        0
    }
    fn applied_index(&self) -> Index {
        0
    }
    fn hard_state(&self) -> HardState {
        HardState::default()
    }
    /// The log's last index and term.
    fn last(&self) -> (Index, Term) {
        (0, 0)
    }
    fn snapshot_state(&self) -> Option<SnapshotState> {
        None
    }
    fn snapshot_taken(&mut self, _id: SnapshotId, _trailing: u64) -> Option<(Index, Term)> {
        None
    }
    /// The entries the latest `snapshot_taken` dropped, to be freed elsewhere.
    fn take_compacted(&mut self) -> Vec<Entry> {
        Vec::new()
    }
    fn snapshot_chunk_stored(&mut self, _leader: NodeId, _index: Index, _have: u64) {}
    fn install_snapshot(&mut self, _leader: NodeId, _state: SnapshotState, _id: SnapshotId) {}
}

impl Core for Node {
    fn tick(&mut self) {
        Node::tick(self)
    }
    fn step(&mut self, msg: Message) {
        Node::step(self, msg)
    }
    fn request(&mut self, reply_to: ReplyTo, req: ClientRequest) {
        Node::request(self, reply_to, req)
    }
    fn ready(&mut self) -> Ready {
        Node::ready(self)
    }
    fn advance(&mut self) {
        Node::advance(self)
    }
    fn status(&self) -> Option<StatusInfo> {
        Some(Node::status(self))
    }
    fn routing(&self) -> Option<Routing> {
        Some(Routing {
            config_index: self.config_index(),
            latest: self.membership().clone(),
            committed: self.committed_membership().clone(),
            contacts: self.contacts(),
        })
    }
    fn routing_key(&self) -> Option<raft::node::RoutingKey> {
        Some(Node::routing_key(self))
    }
    fn removed(&self) -> bool {
        Node::removed(self)
    }
    fn id(&self) -> NodeId {
        Node::id(self)
    }
    fn applied_index(&self) -> Index {
        Node::applied_index(self)
    }
    fn hard_state(&self) -> HardState {
        Node::hard_state(self)
    }
    fn last(&self) -> (Index, Term) {
        (self.log().last_index(), self.log().last_term())
    }
    fn snapshot_state(&self) -> Option<SnapshotState> {
        Some(Node::snapshot_state(self))
    }
    fn snapshot_taken(&mut self, id: SnapshotId, trailing: u64) -> Option<(Index, Term)> {
        Node::snapshot_taken(self, id, trailing)
    }
    fn take_compacted(&mut self) -> Vec<Entry> {
        Node::take_compacted(self)
    }
    fn snapshot_chunk_stored(&mut self, leader: NodeId, index: Index, have: u64) {
        Node::snapshot_chunk_stored(self, leader, index, have)
    }
    fn install_snapshot(&mut self, leader: NodeId, state: SnapshotState, id: SnapshotId) {
        Node::install_snapshot(self, leader, state, id)
    }
}

/// The core's configurations as routing sees them; routing is recomputed when this changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    config_index: Index,
    /// The configuration in force (the latest in the log).
    latest: Membership,
    /// The one in force once the log is committed up to the commit index.
    committed: Membership,
    /// Everyone the core may send to.
    contacts: Vec<NodeId>,
}

/// A joining peer's state until the first AppendEntries tells it the cluster.
#[derive(Clone, Debug)]
struct Joining {
    config: PeerConfig,
}

/// The shell's side of membership: which cluster this peer is in, where peers are, and whom to
/// hear. Addresses come from the newest knowledge that has one: the configuration in force,
/// the committed one, the `cluster` file's bootstrap membership, then the JSON's `other_peers`
/// (for a joining peer, its contact points).
#[derive(Debug)]
struct Routes {
    me: NodeId,
    name: String,
    data_dir: PathBuf,
    /// Our cluster ID; 0 while joining.
    cluster: u64,
    /// The bootstrap membership and cluster name, for the wrong-cluster warning.
    bootstrap: String,
    /// Every address known: the JSON's, then the `cluster` file's, then each configuration's
    /// as it comes into force (later ones win); never forgotten, so a removed member can still
    /// be told of its removal.
    older: BTreeMap<NodeId, String>,
    joining: Option<Joining>,
    /// The configurations the directory was last computed from; `None`: recompute.
    seen: Option<Routing>,
    /// The core's routing key when `seen` was computed.
    seen_key: Option<raft::node::RoutingKey>,
}

impl Routes {
    fn new(config: &PeerConfig, start: &Start) -> Routes {
        let mut older: BTreeMap<NodeId, String> = config
            .other_peers
            .iter()
            .map(|p| (p.node_id, format!("{}:{}", p.host, p.port)))
            .collect();
        let (cluster, bootstrap, joining) = match start {
            Start::Member(file) => {
                for m in &file.bootstrap.members {
                    older.insert(m.id, m.address.clone());
                }
                (file.id, describe(file), None)
            }
            Start::Joining => (
                0,
                "none yet: joining".to_string(),
                Some(Joining {
                    config: config.clone(),
                }),
            ),
        };
        older.remove(&config.node_id);
        Routes {
            me: config.node_id,
            name: config.name.clone(),
            data_dir: config.data_dir.clone(),
            cluster,
            bootstrap,
            older,
            joining,
            seen: None,
            seen_key: None,
        }
    }

    /// What to do with a peer message before the core sees it. A joining peer adopts the
    /// cluster ID of the first AppendEntries, writing the `cluster` file (fsynced) before the
    /// core handles it, and ignores anything else until then; a message of another cluster
    /// that the receiver let through before it knew ours is ignored. `Ok(false)`: ignore it.
    fn admit(&mut self, msg: &Message) -> Result<bool, String> {
        if let Some(joining) = &self.joining {
            if !matches!(msg.body, Body::AppendEntries { .. }) || msg.cluster == 0 {
                log::debug!(
                    "{}: joining: ignoring {} from node {} until an AppendEntries names the cluster",
                    self.name,
                    msg.body.name(),
                    msg.from
                );
                return Ok(false);
            }
            let file = ClusterFile::joined(&joining.config, msg.cluster);
            file.write(&self.data_dir)?;
            log::info!(
                "{}: joined cluster {:016x} (from node {}'s AppendEntries in term {}); recorded in {}",
                self.name,
                msg.cluster,
                msg.from,
                msg.term,
                self.data_dir.join(cluster::CLUSTER_FILE).display()
            );
            self.cluster = msg.cluster;
            self.bootstrap = describe(&file);
            self.joining = None;
            self.seen = None;
            return Ok(true);
        }
        Ok(self.cluster == 0 || msg.cluster == self.cluster)
    }

    /// The directory for `routing`, if it (or our cluster) changed since the last one.
    fn update(&mut self, routing: Routing) -> Option<Directory> {
        if self.seen.as_ref() == Some(&routing) {
            return None;
        }
        // Addresses from configurations are kept after their member leaves them: a removed
        // member is still sent the log until it has learned of its removal (`contacts`).
        for m in routing
            .committed
            .members
            .iter()
            .chain(&routing.latest.members)
        {
            self.older.insert(m.id, m.address.clone());
        }
        let mut wheres = self.older.clone();
        wheres.remove(&self.me);
        let mut addresses = BTreeMap::new();
        for (id, address) in wheres {
            // Resolving may wait for DNS; it happens only when the configuration changes.
            match transport::resolve_address(&address) {
                Ok(a) => {
                    addresses.insert(id, a);
                }
                Err(e) => log::warn!("{}: peer {id}: {e}; cannot send to it", self.name),
            }
        }
        // Every node we have an address for may send to us, not only the members of the
        // configuration in force here (thesis §4.1): a peer catching up through old
        // configurations must hear a leader that those configurations do not list.
        let senders: BTreeSet<NodeId> = routing
            .latest
            .ids()
            .chain(routing.committed.ids())
            .chain(routing.contacts.iter().copied())
            .chain(self.older.keys().copied())
            .filter(|&id| id != self.me)
            .collect();
        let index_moved = self.seen.as_ref().map(|r| r.config_index) != Some(routing.config_index);
        if routing.config_index > 0 && index_moved {
            log::info!(
                "{}: configuration at index {} in force: {}",
                self.name,
                routing.config_index,
                routing.latest.describe()
            );
        }
        let directory = Directory {
            accept: Accept {
                senders,
                any_sender: routing.latest.members.is_empty(),
                cluster: self.cluster,
                bootstrap: self.bootstrap.clone(),
            },
            addresses,
        };
        self.seen = Some(routing);
        Some(directory)
    }
}

/// A cluster file's bootstrap membership and name, for logs.
fn describe(file: &ClusterFile) -> String {
    if file.joined {
        format!("joined, cluster name {:?}", file.name)
    } else {
        format!(
            "bootstrapped with {}, cluster name {:?}",
            file.bootstrap.describe(),
            file.name
        )
    }
}

/// Client appends whose arrival time is kept for the commit-latency histogram, at most; past
/// this (answers lost to retries on other peers) the table starts over.
const MAX_ARRIVALS: usize = 65_536;

/// What the node loop measures for operators.
struct Instruments {
    metrics: Arc<Metrics>,
    /// How long a core tick is, to show the leader's last contact with followers in ms.
    tick: Duration,
    /// When each client append not yet answered was stepped, by (client address, request ID).
    arrivals: HashMap<(ReplyTo, u64), Instant>,
}

impl Instruments {
    fn new(metrics: Arc<Metrics>, tick: Duration) -> Instruments {
        Instruments {
            metrics,
            tick,
            arrivals: HashMap::new(),
        }
    }

    fn arrived(&mut self, from: ReplyTo, req: &ClientRequest) {
        if matches!(req.op, ClientOp::Append { .. }) {
            if self.arrivals.len() >= MAX_ARRIVALS {
                self.arrivals.clear();
            }
            self.arrivals.insert((from, req.id), Instant::now());
        }
    }

    /// Measures an answer on its way out, and fills in what only the shell knows.
    fn answering(&mut self, to: ReplyTo, reply: &mut ClientReply) {
        if let Some(arrived) = self.arrivals.remove(&(to, reply.id)) {
            if let ClientResult::Appended { .. } = reply.result {
                self.metrics
                    .commit_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
        }
        if let ClientResult::Status(info) = &mut reply.result {
            let tick_ms = self.tick.as_millis() as u64;
            for f in &mut info.followers {
                f.last_contact_ms = Some(f.last_contact_ticks * tick_ms);
            }
        }
    }

    fn persisted(&self, took: Duration, entries: usize) {
        self.metrics.fsync_duration.observe(took.as_secs_f64());
        if entries > 0 {
            self.metrics.entries_per_fsync.observe(entries as f64);
        }
    }
}

/// The parts of a `Ready` carried out after `advance`: the applied log and snapshots.
struct AfterAdvance {
    applied: Vec<LogRecord>,
    store_reads: Vec<StoreRead>,
    chunk_reads: Vec<ChunkRead>,
    chunk_writes: Vec<ChunkWrite>,
}

/// What the node loop needs from storage.
trait Durable {
    fn persist(&mut self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), String>;
    /// Appends applied records to the store, serves reads from it, sends and stages snapshot
    /// chunks, and takes a snapshot when one is due. Nothing in fakes.
    fn after_advance(
        &mut self,
        _rd: AfterAdvance,
        _core: &mut impl Core,
        _out: &mut impl Outbox,
    ) -> Result<(), String> {
        Ok(())
    }
}

impl Durable for Disk {
    fn persist(&mut self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), String> {
        self.wal.persist(hard_state, entries)
    }

    fn after_advance(
        &mut self,
        rd: AfterAdvance,
        core: &mut impl Core,
        out: &mut impl Outbox,
    ) -> Result<(), String> {
        let me = core.id();
        self.apply(&rd.applied)?;
        for read in &rd.store_reads {
            let result = self.page(read);
            let reply = ClientReply {
                id: read.id,
                from: me,
                result,
            };
            out.send_reply(read.reply_to, reply);
        }
        for c in &rd.chunk_reads {
            if let Some(msg) = self.chunk(c, me) {
                out.send_peer(msg);
            }
        }
        for w in &rd.chunk_writes {
            // An earlier chunk of this batch may have installed this snapshot already.
            if w.snapshot.index <= core.applied_index() {
                continue;
            }
            match self.stage(w, core.hard_state())? {
                Staged::Partial { have } => {
                    core.snapshot_chunk_stored(w.from, w.snapshot.index, have)
                }
                Staged::Installed { state, id } => core.install_snapshot(w.from, state, id),
            }
        }
        if self.snapshot_due(core.applied_index()) {
            if let Some(state) = core.snapshot_state() {
                self.start_snapshot(&state)?;
            }
        }
        if let Some(id) = self.snapshot_written()? {
            let started = Instant::now();
            let base = core.snapshot_taken(id, self.snapshot_trailing());
            self.free_later(core.take_compacted())?;
            let compacted = started.elapsed();
            if let Some((base, _)) = base {
                self.compact_wal(&core.hard_state(), core.last(), base)?;
            }
            let took = started.elapsed();
            log::info!(
                "snapshot at {} (term {}): {} bytes of records; log from {}; node thread busy {} µs for it (start {} µs, log {} µs, WAL {} µs)",
                id.index,
                id.term,
                id.records_len,
                base.map_or(0, |(b, _)| b) + 1,
                (took + self.started_in).as_micros(),
                self.started_in.as_micros(),
                compacted.as_micros(),
                (took - compacted).as_micros()
            );
        }
        Ok(())
    }
}

/// What the node loop needs from the network.
trait Outbox {
    fn send_peer(&mut self, msg: Message);
    fn send_reply(&mut self, to: ReplyTo, reply: ClientReply);
    /// Routes by `directory` from now on (it is shared with the receiver).
    fn route(&mut self, _directory: Directory) {}
}

impl Outbox for Transport {
    fn send_peer(&mut self, msg: Message) {
        Transport::send_peer(self, msg)
    }
    fn send_reply(&mut self, to: ReplyTo, reply: ClientReply) {
        Transport::send_reply(self, to, reply)
    }
    fn route(&mut self, directory: Directory) {
        self.set_directory(directory)
    }
}

/// The node thread's two queues: peer messages, ticks and shutdown in one, client requests in
/// the other. The peer queue is always looked at first.
struct Inboxes {
    peers: Receiver<Inbox>,
    clients: Receiver<Inbox>,
}

impl Inboxes {
    fn new(peers: Receiver<Inbox>, clients: Receiver<Inbox>) -> Inboxes {
        Inboxes { peers, clients }
    }

    /// Blocks for the next item, from the peer queue if both have one. `None` once the peer
    /// queue is closed (the receiver and timer threads are both gone).
    fn next(&mut self) -> Option<Inbox> {
        if let Ok(item) = self.peers.try_recv() {
            return Some(item);
        }
        if let Ok(item) = self.clients.try_recv() {
            return Some(item);
        }
        select! {
            recv(self.peers) -> item => item.ok(),
            recv(self.clients) -> item => match item {
                Ok(item) => Some(item),
                Err(_) => {
                    // No more clients; the ticks go on. Stop selecting a closed channel.
                    self.clients = never();
                    self.peers.recv().ok()
                }
            },
        }
    }
}

/// The node thread: step a batch (the peer queue first, then at most [`MAX_CLIENT_BATCH`]
/// client requests, taking any peer item that arrives meanwhile first), carry out the core's
/// `Ready`s, repeat. Returns `Ok` on shutdown, `Err` on a storage failure (after which nothing
/// more is sent).
fn node_loop(
    mut core: impl Core,
    mut storage: impl Durable,
    mut out: impl Outbox,
    mut inbox: Inboxes,
    inst: &mut Instruments,
    routes: &mut Option<Routes>,
) -> Result<(), String> {
    let mut slow = RateLimiter::new(transport::WARN_INTERVAL);
    follow_configuration(&core, &mut out, routes);
    loop {
        let Some(first) = inbox.next() else {
            return Err("the receiver and timer threads stopped unexpectedly".into());
        };
        let mut batch = Batch::default();
        let started = Instant::now();
        let mut shutdown = batch.feed(&mut core, first, inst, routes)?;
        while !shutdown {
            if batch.peers < MAX_BATCH {
                if let Ok(item) = inbox.peers.try_recv() {
                    shutdown = batch.feed(&mut core, item, inst, routes)?;
                    continue;
                }
            }
            if batch.clients >= MAX_CLIENT_BATCH {
                break;
            }
            let Ok(item) = inbox.clients.try_recv() else {
                break;
            };
            shutdown = batch.feed(&mut core, item, inst, routes)?;
        }
        if routes.as_ref().is_some_and(|r| r.seen.is_none()) {
            // A joining peer just adopted its cluster: its answers must carry the ID.
            follow_configuration(&core, &mut out, routes);
        }
        let stepped = started.elapsed();
        let mut persisting = Duration::ZERO;
        loop {
            let rd = core.ready();
            let empty = rd.is_empty();
            persisting += carry_out(rd, &mut core, &mut storage, &mut out, inst)?;
            if empty {
                break;
            }
        }
        if let Some(status) = core.status() {
            inst.metrics.observe_status(&status);
        }
        follow_configuration(&core, &mut out, routes);
        if core.removed() {
            let routing = core.routing();
            log::info!(
                "removed from the cluster by the configuration at index {} ({}); exiting",
                routing.as_ref().map_or(0, |r| r.config_index),
                routing.map_or_else(String::new, |r| r.committed.describe())
            );
            return Ok(());
        }
        let took = started.elapsed();
        let behind = batch.skipped_ticks >= SKIPPED_TICKS_TO_LOG;
        if took >= SLOW_BATCH || behind {
            if let Some(suppressed) = slow.allow(Instant::now()) {
                let more = if suppressed > 0 {
                    format!(" ({suppressed} more since the last report)")
                } else {
                    String::new()
                };
                log::warn!(
                    "batch of {} peer items ({} ticks stepped, {} skipped) and {} client requests took {} ms: stepping {} ms, persisting {} ms, sending {} ms{more}",
                    batch.peers,
                    batch.ticks,
                    batch.skipped_ticks,
                    batch.clients,
                    took.as_millis(),
                    stepped.as_millis(),
                    persisting.as_millis(),
                    took.saturating_sub(stepped + persisting).as_millis(),
                );
            }
        }
        if shutdown {
            return Ok(());
        }
    }
}

/// Points the transport and receiver at the configuration in force, if it changed.
fn follow_configuration(core: &impl Core, out: &mut impl Outbox, routes: &mut Option<Routes>) {
    let Some(routes) = routes.as_mut() else {
        return;
    };
    let key = core.routing_key();
    if routes.seen.is_some() && key.is_some() && routes.seen_key == key {
        return;
    }
    let Some(routing) = core.routing() else {
        return;
    };
    routes.seen_key = key;
    if let Some(directory) = routes.update(routing) {
        out.route(directory);
    }
}

/// What one turn of the node loop stepped.
#[derive(Debug, Default)]
struct Batch {
    /// Items from the peer queue: messages, ticks (stepped or skipped), shutdown.
    peers: usize,
    clients: usize,
    ticks: usize,
    skipped_ticks: usize,
}

impl Batch {
    /// Feeds one inbox item to the core (a tick only if fewer than [`MAX_TICKS_PER_BATCH`]
    /// were; a peer message only if `routes` admits it); true if it asks the loop to stop. An
    /// error (the `cluster` file could not be written) stops the loop.
    fn feed(
        &mut self,
        core: &mut impl Core,
        item: Inbox,
        inst: &mut Instruments,
        routes: &mut Option<Routes>,
    ) -> Result<bool, String> {
        match item {
            Inbox::Client(reply_to, req) => {
                self.clients += 1;
                inst.arrived(reply_to, &req);
                core.request(reply_to, req);
                return Ok(false);
            }
            Inbox::Peer(msg) => {
                let admitted = match routes {
                    Some(r) => r.admit(&msg)?,
                    None => true,
                };
                if admitted {
                    core.step(msg);
                }
            }
            Inbox::Tick if self.ticks < MAX_TICKS_PER_BATCH => {
                self.ticks += 1;
                core.tick();
            }
            Inbox::Tick => self.skipped_ticks += 1,
            Inbox::Shutdown => {
                self.peers += 1;
                return Ok(true);
            }
        }
        self.peers += 1;
        Ok(false)
    }
}

/// Carries out one `Ready` in the order that keeps Raft safe: nothing that depends on the new
/// hard state or entries leaves the process before they are durable, except messages the core
/// marks safe to send first (a leader's AppendEntries, Raft §10.2.1). Replies go last, so a
/// client never hears of a state that a crash could still take back. A storage error returns
/// at once: nothing of this `Ready` is sent after it, and the core is not advanced.
fn carry_out(
    rd: Ready,
    core: &mut impl Core,
    storage: &mut impl Durable,
    out: &mut impl Outbox,
    inst: &mut Instruments,
) -> Result<Duration, String> {
    let Ready {
        hard_state,
        entries,
        mut messages,
        send_before_persist,
        replies,
        applied,
        store_reads,
        chunk_reads,
        chunk_writes,
    } = rd;
    if send_before_persist {
        for msg in messages.drain(..) {
            out.send_peer(msg);
        }
    }
    let persisting = Instant::now();
    if hard_state.is_some() || !entries.is_empty() {
        storage
            .persist(hard_state.as_ref(), &entries)
            .map_err(|e| format!("storage failed: {e}"))?;
    }
    let persisting = persisting.elapsed();
    if hard_state.is_some() || !entries.is_empty() {
        inst.persisted(persisting, entries.len());
    }
    // Empty here if they were sent before persisting.
    for msg in messages {
        out.send_peer(msg);
    }
    core.advance();
    for (to, mut reply) in replies {
        inst.answering(to, &mut reply);
        out.send_reply(to, reply);
    }
    let after = AfterAdvance {
        applied,
        store_reads,
        chunk_reads,
        chunk_writes,
    };
    storage
        .after_advance(after, core, out)
        .map_err(|e| format!("storage failed: {e}"))?;
    Ok(persisting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Body, ClientOp, ClientResult, Payload};
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn default_timing_is_a_10ms_tick() {
        let t = Timing::from_ms(50, (150, 300));
        assert_eq!(t.tick, Duration::from_millis(10));
        assert_eq!(t.heartbeat_ticks, 5);
        assert_eq!(t.election_ticks, (15, 30));
    }

    #[test]
    fn timing_keeps_the_election_minimum_above_the_heartbeat() {
        for hb in 1..200 {
            for min in [hb + 1, hb + 2, 2 * hb, 10 * hb] {
                for max in [min, min + 1, 2 * min] {
                    let t = Timing::from_ms(hb, (min, max));
                    let tick = t.tick.as_millis() as u64;
                    assert!((1..=10).contains(&tick), "{t:?}");
                    assert!(t.heartbeat_ticks >= 1, "{t:?}");
                    assert!(
                        t.election_ticks.0 > t.heartbeat_ticks,
                        "hb {hb} min {min}: {t:?}"
                    );
                    assert!(
                        t.election_ticks.0 + MIN_ELECTION_SPREAD_TICKS <= t.election_ticks.1,
                        "hb {hb} election {min}-{max}: {t:?}"
                    );
                }
            }
        }
        // 49 ms heartbeats tick every 9 ms: 5 ticks; a 50 ms minimum would also be 5 ticks.
        assert_eq!(Timing::from_ms(49, (50, 60)).election_ticks, (6, 9));
    }

    #[test]
    fn election_timeouts_keep_a_spread_of_a_few_ticks_after_rounding() {
        // Raft §5.2: randomized timeouts are what keep split votes from repeating. Ranges that
        // rounding to 10 ms ticks would collapse to a single value are widened.
        assert_eq!(Timing::from_ms(50, (150, 150)).election_ticks, (15, 18));
        assert_eq!(Timing::from_ms(50, (150, 152)).election_ticks, (15, 18));
        assert_eq!(Timing::from_ms(50, (150, 179)).election_ticks, (15, 18));
        // A range with room enough is left alone.
        assert_eq!(Timing::from_ms(50, (150, 180)).election_ticks, (15, 18));
        assert_eq!(Timing::from_ms(50, (150, 300)).election_ticks, (15, 30));
        // 1 ms ticks: the spread is 3 ms.
        assert_eq!(Timing::from_ms(5, (20, 20)).election_ticks, (20, 23));
    }

    #[test]
    fn seeds_differ_between_nodes() {
        assert_ne!(seed(1), seed(2));
    }

    /// A log of what the loop did, shared by the fakes.
    type Events = Rc<RefCell<Vec<String>>>;

    /// Called by the fake core with each request's id, so a test can act in the middle of a
    /// batch (queue a peer message, ask for shutdown).
    type Hook = Box<dyn FnMut(u64)>;

    /// A core that turns each client request into one entry, one message and one reply, all in
    /// the next `Ready`, and counts steps.
    struct FakeCore {
        events: Events,
        pending: Ready,
        send_before_persist: bool,
        hook: Option<Hook>,
    }

    impl Core for FakeCore {
        fn tick(&mut self) {
            self.events.borrow_mut().push("tick".into());
        }
        fn step(&mut self, msg: Message) {
            self.events.borrow_mut().push(format!("step {}", msg.from));
        }
        fn request(&mut self, reply_to: ReplyTo, req: ClientRequest) {
            self.events.borrow_mut().push(format!("request {}", req.id));
            if let Some(hook) = &mut self.hook {
                hook(req.id);
            }
            let index = self.pending.entries.len() as u64 + 1;
            self.pending.hard_state = Some(HardState {
                term: 1,
                vote: Some(1),
                commit: 0,
            });
            self.pending.entries.push(Entry {
                index,
                term: 1,
                payload: Payload::Noop,
            });
            self.pending.messages.push(message(1, 2));
            self.pending.send_before_persist = self.send_before_persist;
            self.pending.replies.push((
                reply_to,
                ClientReply {
                    id: req.id,
                    from: 1,
                    result: ClientResult::Appended { index, term: 1 },
                },
            ));
        }
        fn ready(&mut self) -> Ready {
            let rd = std::mem::take(&mut self.pending);
            let label = if rd.is_empty() {
                "ready (empty)"
            } else {
                "ready"
            };
            self.events.borrow_mut().push(label.into());
            rd
        }
        fn advance(&mut self) {
            self.events.borrow_mut().push("advance".into());
        }
    }

    struct FakeStorage {
        events: Events,
        fail: bool,
    }

    impl Durable for FakeStorage {
        fn persist(&mut self, hs: Option<&HardState>, entries: &[Entry]) -> Result<(), String> {
            self.events
                .borrow_mut()
                .push(format!("persist {} {}", hs.is_some(), entries.len()));
            if self.fail {
                Err("disk on fire".into())
            } else {
                Ok(())
            }
        }
    }

    struct FakeOut(Events);

    impl Outbox for FakeOut {
        fn send_peer(&mut self, msg: Message) {
            self.0.borrow_mut().push(format!("send {}", msg.to));
        }
        fn send_reply(&mut self, _to: ReplyTo, reply: ClientReply) {
            self.0.borrow_mut().push(format!("reply {}", reply.id));
        }
    }

    fn message(from: NodeId, to: NodeId) -> Message {
        Message {
            cluster: 0,
            from,
            to,
            term: 1,
            body: Body::PreVoteResponse { granted: true },
        }
    }

    fn request(id: u64) -> Inbox {
        Inbox::Client(
            "127.0.0.1:9".parse().unwrap(),
            ClientRequest {
                id,
                op: ClientOp::Status,
            },
        )
    }

    /// The node loop's two queues (unbounded), with their send sides.
    fn queues() -> (Sender<Inbox>, Sender<Inbox>, Inboxes) {
        let (peers_tx, peers_rx) = crossbeam_channel::unbounded();
        let (clients_tx, clients_rx) = crossbeam_channel::unbounded();
        (peers_tx, clients_tx, Inboxes::new(peers_rx, clients_rx))
    }

    /// Queues `item` where the receiver or the timer would put it.
    fn queue(peers: &Sender<Inbox>, clients: &Sender<Inbox>, item: Inbox) {
        match item {
            Inbox::Client(..) => clients.send(item).unwrap(),
            _ => peers.send(item).unwrap(),
        }
    }

    /// Runs the node loop over `items`, then Shutdown, and returns what it did. The Shutdown
    /// goes last in the client queue, so that it is taken after everything else (in a peer it
    /// comes through the peer queue, and is taken before any queued client request).
    fn run_loop(
        items: Vec<Inbox>,
        send_before_persist: bool,
        fail: bool,
    ) -> (Result<(), String>, Vec<String>) {
        let (peers, clients, inbox) = queues();
        for item in items {
            queue(&peers, &clients, item);
        }
        clients.send(Inbox::Shutdown).unwrap();
        run_inbox(inbox, send_before_persist, fail, None)
    }

    /// Runs the node loop with fakes on `inbox` until it ends; returns what it did.
    fn run_inbox(
        inbox: Inboxes,
        send_before_persist: bool,
        fail: bool,
        hook: Option<Hook>,
    ) -> (Result<(), String>, Vec<String>) {
        let events = Events::default();
        let core = FakeCore {
            events: events.clone(),
            pending: Ready::default(),
            send_before_persist,
            hook,
        };
        let storage = FakeStorage {
            events: events.clone(),
            fail,
        };
        let mut inst = Instruments::new(Arc::new(Metrics::new()), Duration::from_millis(10));
        let result = node_loop(
            core,
            storage,
            FakeOut(events.clone()),
            inbox,
            &mut inst,
            &mut None,
        );
        let events = events.borrow().clone();
        (result, events)
    }

    #[test]
    fn persist_comes_before_send_and_advance_before_reply() {
        let (result, events) = run_loop(vec![request(7)], false, false);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            [
                "request 7",
                "ready",
                "persist true 1",
                "send 2",
                "advance",
                "reply 7",
                "ready (empty)",
                "advance"
            ]
        );
    }

    #[test]
    fn messages_marked_safe_are_sent_before_persisting() {
        let (_, events) = run_loop(vec![request(7)], true, false);
        assert_eq!(
            events[1..6],
            ["ready", "send 2", "persist true 1", "advance", "reply 7"]
        );
    }

    #[test]
    fn queued_requests_share_one_ready_and_one_fsync() {
        let items: Vec<Inbox> = (0..100)
            .map(request)
            .chain([Inbox::Tick, Inbox::Peer(message(3, 1))])
            .collect();
        let (_, events) = run_loop(items, false, false);
        let count = |prefix: &str| events.iter().filter(|e| e.starts_with(prefix)).count();
        assert_eq!(count("request"), 100);
        assert_eq!(count("tick"), 1);
        assert_eq!(count("step 3"), 1);
        assert_eq!(count("persist"), 1, "{events:?}");
        assert_eq!(events[102..104], ["ready", "persist true 100"]);
        assert_eq!(count("reply"), 100);
    }

    #[test]
    fn a_storage_error_stops_the_loop_before_anything_is_sent() {
        let (result, events) = run_loop(vec![request(7), request(8)], false, true);
        assert_eq!(result, Err("storage failed: disk on fire".into()));
        assert_eq!(events.last().unwrap(), "persist true 2");
        assert!(!events
            .iter()
            .any(|e| e.starts_with("send") || e.starts_with("reply") || e == "advance"));
    }

    #[test]
    fn shutdown_carries_out_the_batch_before_it_and_ignores_the_rest() {
        let (peers, clients, inbox) = queues();
        for id in 1..=3 {
            clients.send(request(id)).unwrap();
        }
        // Shutdown arrives while request 2 is being stepped; request 3 is still queued.
        let hook: Hook = Box::new(move |id| {
            if id == 2 {
                peers.send(Inbox::Shutdown).unwrap();
            }
        });
        let (result, events) = run_inbox(inbox, false, false, Some(hook));
        assert_eq!(result, Ok(()));
        assert!(events.contains(&"reply 1".to_string()), "{events:?}");
        assert!(events.contains(&"reply 2".to_string()), "{events:?}");
        assert!(!events.contains(&"request 3".to_string()), "{events:?}");
    }

    #[test]
    fn the_loop_ends_with_an_error_if_its_inbox_closes() {
        let (peers, clients, inbox) = queues();
        drop((peers, clients));
        assert!(run_inbox(inbox, false, false, None).0.is_err());
    }

    #[test]
    fn ticks_go_on_after_the_client_queue_closes() {
        let (peers, clients, inbox) = queues();
        drop(clients);
        for item in [Inbox::Tick, Inbox::Tick, Inbox::Shutdown] {
            peers.send(item).unwrap();
        }
        let (result, events) = run_inbox(inbox, false, false, None);
        assert_eq!(result, Ok(()));
        assert_eq!(events.iter().filter(|e| *e == "tick").count(), 2);
    }

    #[test]
    fn peer_messages_and_ticks_are_stepped_before_queued_client_requests() {
        // A backlog of client requests, then a follower's answer and a tick: the answer and
        // the tick must not wait behind the backlog, and the first batch must end after
        // MAX_CLIENT_BATCH requests, so its Ready (heartbeats, replication) leaves soon.
        let (peers, clients, inbox) = queues();
        for id in 0..3 * MAX_CLIENT_BATCH as u64 {
            clients.send(request(id)).unwrap();
        }
        peers.send(Inbox::Peer(message(3, 1))).unwrap();
        peers.send(Inbox::Tick).unwrap();
        clients.send(Inbox::Shutdown).unwrap();
        let (_, events) = run_inbox(inbox, false, false, None);
        assert_eq!(events[..3], ["step 3", "tick", "request 0"], "{events:?}");
        let first_ready = events.iter().position(|e| e == "ready").unwrap();
        assert_eq!(first_ready, 2 + MAX_CLIENT_BATCH, "{:?}", &events[..8]);
    }

    #[test]
    fn ticks_queued_during_a_stall_reach_the_core_a_few_at_a_time() {
        // 200 ms of ticks piled up while the node thread sat in a slow fsync. Stepped at once,
        // they would let a leader's check quorum, or a follower's election timer, fire before
        // anyone could send or answer anything.
        let (peers, clients, inbox) = queues();
        for _ in 0..20 {
            peers.send(Inbox::Tick).unwrap();
        }
        peers.send(Inbox::Peer(message(2, 1))).unwrap();
        clients.send(request(1)).unwrap();
        clients.send(Inbox::Shutdown).unwrap();
        let (_, events) = run_inbox(inbox, false, false, None);
        let ticks = events.iter().filter(|e| *e == "tick").count();
        assert_eq!(ticks, MAX_TICKS_PER_BATCH, "{events:?}");
        assert!(events.contains(&"step 2".to_string()), "{events:?}");
    }

    #[test]
    fn a_peer_message_arriving_during_a_client_batch_is_stepped_in_that_batch() {
        let (peers, clients, inbox) = queues();
        for id in 0..2 * MAX_CLIENT_BATCH as u64 {
            clients.send(request(id)).unwrap();
        }
        clients.send(Inbox::Shutdown).unwrap();
        let hook: Hook = Box::new(move |id| {
            if id == 10 {
                peers.send(Inbox::Peer(message(2, 1))).unwrap();
                peers.send(Inbox::Tick).unwrap();
            }
        });
        let (_, events) = run_inbox(inbox, false, false, Some(hook));
        // Taken right after the request during which it arrived, ahead of the queued ones.
        assert_eq!(
            events[10..14],
            ["request 10", "step 2", "tick", "request 11"],
            "{events:?}"
        );
    }

    #[test]
    fn the_timer_ticks_and_forwards_shutdown() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (shutdown_tx, shutdown_rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let timer = thread::spawn({
            let stop = Arc::clone(&stop);
            move || timer_loop(Duration::from_millis(1), tx, shutdown_rx, stop)
        });
        for _ in 0..3 {
            assert!(matches!(
                rx.recv_timeout(Duration::from_secs(5)),
                Ok(Inbox::Tick)
            ));
        }
        shutdown_tx.send(()).unwrap();
        timer.join().unwrap();
        let rest: Vec<Inbox> = rx.try_iter().collect();
        assert!(matches!(rest.last(), Some(Inbox::Shutdown)), "{rest:?}");
    }
}
