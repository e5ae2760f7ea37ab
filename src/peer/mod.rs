//! The shell around the core: threads, channels, and the persist → send → advance → reply loop.
//!
//! Three threads:
//! - the **receiver** ([`transport::Listener::run`]) turns datagrams into [`Inbox`] items:
//!   peer messages into the peer queue, client requests into the client queue (shedding them
//!   when it is full); with a cluster secret it verifies each datagram first ([`crate::auth`]);
//! - the **timer** puts a [`Inbox::Tick`] in the peer queue every tick, and forwards shutdown;
//! - the **node thread** (the thread that calls [`run`]) is the sole owner of the core [`Node`],
//!   the storage ([`Disk`]: WAL and store) and the send side of the socket.
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
//!
//! Rooms: this file starts a peer (bind, open, restore, spawn) and runs the timer;
//! [`node_loop`] is the node thread's loop and `carry_out`; [`after_advance`] the snapshot
//! round trip through the store; [`routes`] whom to hear and where to send; [`instruments`]
//! what the loop measures for metrics.

mod after_advance;
mod instruments;
mod node_loop;
pub mod recovery;
pub mod restore;
mod routes;

use crate::cluster::{self, Start};
use crate::config::PeerConfig;
use crate::metrics::MetricsServer;
use crate::raft::{
    self, ClientRequest, HardState, Index, Membership, Message, Node, NodeId, ReplyTo, Term,
};
use crate::storage::{Disk, Restored};
use crate::transport::{self, Inbound, Queues};
use crossbeam_channel::{select, Receiver, Sender};
use instruments::Instruments;
#[doc(hidden)]
pub use node_loop::hand_over;
use node_loop::{node_loop, Inboxes};
/// The node loop's seams, for the simulator (tests/sim), which carries out `Ready`s itself
/// but runs the real storage round trip after `advance` through them.
#[doc(hidden)]
pub use node_loop::{AfterAdvance, Core, Durable, Outbox};
pub use node_loop::{FULL_RETRY, MAX_BATCH, MAX_CLIENT_BATCH, MAX_TICKS_PER_BATCH, SLOW_BATCH};
use routes::Routes;
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

/// A joining peer adopts no cluster before this many longest election timeouts after it
/// started: a leader that lost its majority steps down by check quorum within two shortest
/// ones, and this leaves slack for timers that drift (see docs/membership.md).
pub const ADOPT_AFTER_ELECTIONS: u64 = 3;

/// The core's config for this peer, with `bootstrap` the membership from its `cluster` file
/// (empty for a peer that joins): never the JSON's, which only bootstraps an empty data dir.
pub fn core_config(
    config: &PeerConfig,
    bootstrap: Membership,
    (vote_floor, started_over): ((Index, Term), (Index, Term)),
    timing: &Timing,
    seed: u64,
) -> raft::Config {
    raft::Config {
        id: config.node_id,
        membership: bootstrap,
        election_ticks: timing.election_ticks,
        heartbeat_ticks: timing.heartbeat_ticks,
        max_inflight: MAX_INFLIGHT,
        vote_floor: vote_floor.0,
        vote_floor_term: vote_floor.1,
        started_over,
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `--join`: with an empty data_dir, join an existing cluster (learning its ID and
    /// configurations from the leader) instead of bootstrapping one from `other_peers`.
    pub join: bool,
    /// `--force-new-cluster`: make this peer the only voter of its cluster, keeping its log
    /// ([`recovery`]), for when a majority is lost for good.
    pub force_new_cluster: bool,
    /// `--restore FILE`: with an empty data_dir, first build a new cluster's data from a
    /// backup ([`restore`]).
    pub restore: Option<std::path::PathBuf>,
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
    if let Some(file) = &options.restore {
        restore::restore(&config, file)?;
    }
    let (transport, listener) = transport::bind(&config)?;
    let started = std::time::Instant::now();
    let (mut storage, mut restored) = Disk::open(
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
    let address = transport.local_addr().map_or_else(
        |_| format!("{}:{}", config.host, config.port),
        |a| a.to_string(),
    );
    log::info!(
        "{} (node {}) on {address}, data in {}: restored term {}, vote {:?}, commit {}, last index {}, snapshot at {}, log from {}; tick {:?}, heartbeat {} ticks, election {:?} ticks",
        config.name,
        config.node_id,
        config.data_dir.display(),
        restored.hard_state.term,
        restored.hard_state.vote,
        restored.hard_state.commit,
        restored.entries.last().map_or(restored.base.0, |e| e.index),
        restored.snapshot.as_ref().map_or(0, |(s, _)| s.index),
        restored.base.0 + 1,
        timing.tick,
        timing.heartbeat_ticks,
        timing.election_ticks,
    );
    let log_is_empty = restored.entries.is_empty()
        && restored.hard_state == HardState::default()
        && restored.snapshot.is_none();
    let start = cluster::prepare(&config, options.join, log_is_empty)?;
    if options.force_new_cluster {
        let bootstrap = match &start {
            Start::Member(file) if !log_is_empty => &file.bootstrap,
            _ => {
                return Err(format!(
                    "{}: --force-new-cluster recovers an existing data_dir, and {} holds no log of a cluster",
                    config.name,
                    config.data_dir.display()
                ))
            }
        };
        recovery::force_new_cluster(&config, &mut storage, &mut restored, bootstrap)?;
    }
    let Restored {
        hard_state,
        snapshot,
        base,
        entries,
    } = restored;
    let routes = Routes::new(
        &config,
        &start,
        timing.tick * (ADOPT_AFTER_ELECTIONS * timing.election_ticks.1) as u32,
    );
    let (bootstrap, vote_floor) = match start {
        Start::Member(file) => (file.bootstrap, (file.vote_floor, file.started_over)),
        Start::Joining => (Membership::default(), ((0, 0), (0, 0))),
    };
    let node = Node::restore(
        core_config(
            &config,
            bootstrap,
            vote_floor,
            &timing,
            seed(config.node_id),
        ),
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
    // The shortest election timeout: a follower may give up on its leader after that long.
    metrics
        .probes
        .set_election_timeout(timing.tick * timing.election_ticks.0 as u32);
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

#[cfg(test)]
mod tests {
    use super::*;

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
