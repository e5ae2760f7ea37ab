//! Drives a running cluster (or one it spawns) with C appends in flight for S seconds, and
//! reports committed, acknowledged appends per second, their latency, and the leader changes
//! the peers themselves reported during the run.
//!
//! One process and one UDP socket for the appends: each in-flight slot is its own client ID, so
//! exactly-once retries work as for real clients. A second thread polls every peer's status
//! (its own socket) to count leader changes; with `--garbage-rate`, a third floods the leader
//! with junk datagrams, to show that client load cannot cost the cluster its leader.
//!
//! Datagrams are authenticated when the cluster is: with `-p`, if the config names a
//! `secret_file`; with `--spawn`, always (a fresh secret in the temporary folder), unless
//! `--no-auth`, which is how the cost of authentication is measured.

use argh::FromArgs;
use raft::auth::{self, ClientAuth, FromPeer, Keys, Secret};
use raft::client::Client;
use raft::config::PeerConfig;
use raft::raft::rng::Rng;
use raft::raft::{
    ClientOp, ClientReply, ClientRequest, ClientResult, Datagram, NodeId, Term, MAX_DATAGRAM,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[derive(FromArgs)]
/// Benchmark a raft cluster: committed appends per second, latency, and leader changes.
struct Args {
    /// config of any peer of the cluster (default peers/peer1.json)
    #[argh(option, short = 'p', default = "PathBuf::from(\"peers/peer1.json\")")]
    path: PathBuf,
    /// appends in flight (default 1)
    #[argh(option, default = "1")]
    clients: usize,
    /// seconds to run (default 10)
    #[argh(option, default = "10")]
    duration: u64,
    /// bytes per entry (default 64)
    #[argh(option, default = "64")]
    size: usize,
    /// start a three-peer cluster on loopback in a temporary folder first
    #[argh(switch)]
    spawn: bool,
    /// with --spawn: keep the temporary folder with the peers' logs (level from RUST_LOG,
    /// default info) and print its path
    #[argh(switch)]
    keep_logs: bool,
    /// also send this many junk datagrams per second to the current leader (default 0);
    /// only to peers whose configured address is 127.0.0.1
    #[argh(option, default = "0")]
    garbage_rate: u64,
    /// milliseconds between status polls of every peer, which count leader changes
    /// (default 150)
    #[argh(option, default = "150")]
    poll_ms: u64,
    /// with --spawn: run the peers without a secret_file (unauthenticated datagrams), to
    /// measure what authentication costs
    #[argh(switch)]
    no_auth: bool,
    /// with --spawn: the peers' snapshot_entries (default: the peers' default, 10,000), to
    /// measure what snapshots cost
    #[argh(option)]
    snapshot_entries: Option<u64>,
}

/// One in-flight append.
struct Slot {
    client: u64,
    seq: u64,
    request_id: u64,
    started: Instant,
    sent: Instant,
    target: NodeId,
}

/// Peers started by `--spawn`, killed on drop; their folder is removed unless `keep`.
struct Spawned {
    children: Vec<Child>,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.keep {
            eprintln!("peer logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn main() {
    let args: Args = argh::from_env();
    if !(1..=65_536).contains(&args.clients)
        || args.size == 0
        || args.size > raft::raft::MAX_ENTRY_DATA
        || args.poll_ms == 0
        || args.garbage_rate > 10_000_000
    {
        eprintln!(
            "error: --clients must be 1..=65536, --size 1..={}, --poll-ms at least 1 and --garbage-rate at most 10000000",
            raft::raft::MAX_ENTRY_DATA
        );
        std::process::exit(1);
    }
    if args.no_auth && !args.spawn {
        eprintln!("error: --no-auth is for --spawn; a running cluster authenticates if its config names a secret_file");
        std::process::exit(1);
    }
    let (spawned, peers, keys) = if args.spawn {
        match spawn_cluster(args.keep_logs, !args.no_auth, args.snapshot_entries) {
            Ok((s, p, k)) => (Some(s), p, k),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    } else {
        let config = PeerConfig::load(&args.path).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        });
        let peers = config.addresses().unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        });
        let keys = config.keys().unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        });
        (None, peers, keys)
    };
    if args.garbage_rate > 0 && !peers.values().any(|a| is_flood_target(*a)) {
        eprintln!("error: --garbage-rate only floods peers configured on 127.0.0.1; none is");
        std::process::exit(1);
    }
    let peer_pids: Vec<u32> = spawned
        .as_ref()
        .map_or(Vec::new(), |s| s.children.iter().map(|c| c.id()).collect());
    if let Err(e) = run(&args, &peers, keys, &peer_pids) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

/// The only addresses the junk flood may be sent to: this machine's 127.0.0.1.
fn is_flood_target(addr: SocketAddr) -> bool {
    addr.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// What the appends saw.
struct Load {
    latencies_us: Vec<u32>,
    errors: u64,
    secs: f64,
    /// The slowest append that completed in each second of the run (in µs), to find the
    /// moments to look at in the peers' logs.
    worst_per_second: Vec<u32>,
    /// Wall-clock time of the start, in seconds since the Unix epoch.
    started_at: u64,
}

/// The appends' socket: plain JSON, or sealed for each peer and opened with the cluster's keys.
struct Wire {
    socket: UdpSocket,
    auth: Option<ClientAuth>,
    /// Reused for every request: room for the envelope's header, then the JSON.
    out: Vec<u8>,
}

/// What a peer sent the appends' socket.
enum Incoming {
    Reply(ClientReply),
    /// Peer `id` dropped our requests and told us its epoch: resend what went to it.
    Notice(NodeId),
}

impl Wire {
    /// Sends `d` to peer `to` at `addr`; errors (a full buffer, say) are the network's.
    fn send(&mut self, d: &Datagram, to: NodeId, addr: SocketAddr) {
        self.out.clear();
        if self.auth.is_some() {
            self.out.resize(auth::HEADER_LEN, 0);
        }
        if serde_json::to_writer(&mut self.out, d).is_err() {
            return;
        }
        let socket = &self.socket;
        let send = |b: &[u8]| socket.send_to(b, addr).map(|_| ());
        let _ = match &mut self.auth {
            None => send(&self.out),
            Some(auth) => auth.seal_request(to, &mut self.out, send),
        };
    }

    /// Decodes what arrived: a reply, a notice, or nothing we take.
    fn open(&mut self, bytes: &[u8]) -> Option<Incoming> {
        let body = match &mut self.auth {
            None => bytes,
            Some(auth) => match auth.open(bytes).ok()? {
                FromPeer::Reply { body, .. } => body,
                FromPeer::Notice { from } => return Some(Incoming::Notice(from)),
            },
        };
        match Datagram::decode(body) {
            Ok(Datagram::Reply(reply)) => Some(Incoming::Reply(reply)),
            _ => None,
        }
    }
}

fn run(
    args: &Args,
    peers: &BTreeMap<NodeId, SocketAddr>,
    keys: Option<Arc<Keys>>,
    peer_pids: &[u32],
) -> Result<(), String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    raft::transport::enlarge_buffers(&socket);
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(|e| format!("socket: {e}"))?;
    let auth = match &keys {
        Some(keys) => Some(ClientAuth::new(Arc::clone(keys), peers.keys().copied())?),
        None => None,
    };
    eprintln!(
        "datagrams {}",
        if auth.is_some() {
            "authenticated (keyed BLAKE3)"
        } else {
            "not authenticated"
        }
    );
    let mut wire = Wire {
        socket,
        auth,
        out: Vec::new(),
    };
    let leader = find_leader(&mut wire, peers, Duration::from_secs(10))?;
    let drops_before = kernel_drops(peers);

    let stop = Arc::new(AtomicBool::new(false));
    let current_leader = Arc::new(AtomicU64::new(leader));
    let watch = {
        let client = Client::with_keys(peers.clone(), Duration::from_millis(500), keys.clone())
            .map_err(|e| format!("status client: {e}"))?;
        let (stop, current_leader) = (Arc::clone(&stop), Arc::clone(&current_leader));
        let every = Duration::from_millis(args.poll_ms);
        thread::Builder::new()
            .name("status".into())
            .spawn(move || watch_leaders(client, every, &stop, &current_leader))
            .map_err(|e| format!("cannot start the status thread: {e}"))?
    };
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let flood = if args.garbage_rate > 0 {
        let targets: BTreeMap<NodeId, SocketAddr> = peers
            .iter()
            .filter(|(_, a)| is_flood_target(**a))
            .map(|(&i, &a)| (i, a))
            .collect();
        let (rate, stop, current_leader) = (
            args.garbage_rate,
            Arc::clone(&stop),
            Arc::clone(&current_leader),
        );
        Some(
            thread::Builder::new()
                .name("garbage".into())
                .spawn(move || flood(&targets, rate, deadline, &stop, &current_leader))
                .map_err(|e| format!("cannot start the garbage thread: {e}"))?,
        )
    } else {
        None
    };

    let cpu_before = cpu_ticks(peer_pids);
    let load = drive(args, &mut wire, peers, leader, deadline);
    let cpu = cpu_ticks(peer_pids)
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    stop.store(true, Ordering::Relaxed);
    let garbage = flood.map(|f| f.join().unwrap_or(Ok(0))).transpose()?;
    let seen = watch
        .join()
        .map_err(|_| "the status thread panicked".to_string())?;
    let drops_after = kernel_drops(peers);
    report(
        args,
        load?,
        &seen,
        garbage,
        &drops_before,
        &drops_after,
        Cost {
            authenticated: wire.auth.is_some(),
            cpu_ticks: cpu,
        },
    );
    Ok(())
}

/// What the run cost the peers: whether they authenticated, and their CPU time.
struct Cost {
    authenticated: bool,
    /// User + system clock ticks the spawned peers used during the run, if known.
    cpu_ticks: Option<u64>,
}

/// Clock ticks per second of /proc/PID/stat's CPU times (USER_HZ, 100 on Linux).
const USER_HZ: u64 = 100;

/// The CPU time (user + system, in clock ticks) the processes `pids` have used so far; `None`
/// without pids or where /proc cannot tell. A robust measure of cost on a busy machine, where
/// throughput also depends on what else runs.
fn cpu_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, in parentheses, may hold spaces: count fields after it.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        total += utime + stime;
    }
    Some(total)
}

/// Keeps `args.clients` appends in flight until `deadline`.
fn drive(
    args: &Args,
    wire: &mut Wire,
    peers: &BTreeMap<NodeId, SocketAddr>,
    leader: NodeId,
    deadline: Instant,
) -> Result<Load, String> {
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    let payload: String = "x".repeat(args.size);
    let base = (std::process::id() as u64 * 1_000_003) ^ now_nanos();
    let start = Instant::now();
    let mut slots: Vec<Slot> = (0..args.clients)
        .map(|i| Slot {
            client: base.wrapping_add(i as u64 * 0x9E37_79B9),
            seq: 0,
            request_id: 0,
            started: start,
            sent: start,
            target: leader,
        })
        .collect();
    // A request ID is (attempt number << 16 | slot), so a reply finds its slot directly.
    let mut next_request = 1u64;
    let send = |wire: &mut Wire, slot_index: usize, slot: &mut Slot, next_request: &mut u64| {
        slot.request_id = (*next_request << 16) | slot_index as u64;
        *next_request += 1;
        slot.sent = Instant::now();
        let req = Datagram::Request(ClientRequest {
            id: slot.request_id,
            op: ClientOp::Append {
                client: slot.client,
                seq: slot.seq,
                data: payload.clone(),
            },
        });
        wire.send(&req, slot.target, peers[&slot.target]);
    };
    for (i, slot) in slots.iter_mut().enumerate() {
        slot.seq = 1;
        slot.started = Instant::now();
        send(wire, i, slot, &mut next_request);
    }
    let started_at = now_nanos() / 1_000_000_000;
    let mut worst_per_second: Vec<u32> = Vec::new();
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    let mut last_progress = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let retry_after = Duration::from_millis(300);
    let mut last_retry_scan = Instant::now();
    while Instant::now() < deadline {
        match wire.socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                let reply = match wire.open(&buf[..n]) {
                    None => continue,
                    Some(Incoming::Reply(reply)) => reply,
                    Some(Incoming::Notice(peer)) => {
                        // It dropped what we sent it (it restarted, or does not know us yet):
                        // resend every append in flight to it, sealed for its epoch now.
                        for (i, slot) in slots.iter_mut().enumerate() {
                            if slot.target == peer {
                                send(wire, i, slot, &mut next_request);
                            }
                        }
                        continue;
                    }
                };
                let i = (reply.id & 0xFFFF) as usize;
                let Some(slot) = slots.get_mut(i).filter(|s| s.request_id == reply.id) else {
                    continue; // an answer to an earlier attempt
                };
                match reply.result {
                    ClientResult::Appended { .. } => {
                        let us = slot.started.elapsed().as_micros() as u32;
                        latencies_us.push(us);
                        let second = start.elapsed().as_secs() as usize;
                        if worst_per_second.len() <= second {
                            worst_per_second.resize(second + 1, 0);
                        }
                        worst_per_second[second] = worst_per_second[second].max(us);
                        slot.seq += 1;
                        slot.started = Instant::now();
                        slot.target = reply.from;
                        send(wire, i, slot, &mut next_request);
                    }
                    ClientResult::NotLeader { leader: hint } => {
                        if let Some(l) = hint.filter(|l| peers.contains_key(l)) {
                            slot.target = l;
                            send(wire, i, slot, &mut next_request);
                        }
                        // Without a hint, the retry timer below moves on.
                    }
                    _ => {
                        errors += 1;
                        slot.seq += 1;
                        slot.started = Instant::now();
                        send(wire, i, slot, &mut next_request);
                    }
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
        let now = Instant::now();
        if now.duration_since(last_retry_scan) >= Duration::from_millis(10) {
            last_retry_scan = now;
            for (i, slot) in slots.iter_mut().enumerate() {
                if now.duration_since(slot.sent) > retry_after {
                    // Unanswered: try the next peer with the same (client, seq), which the
                    // cluster applies at most once; a redirect corrects a wrong guess.
                    let k = ids.iter().position(|&id| id == slot.target).unwrap_or(0);
                    slot.target = ids[(k + 1) % ids.len()];
                    if let Some(auth) = &mut wire.auth {
                        // It may have restarted: greet it afresh (once per key).
                        auth.forget(slot.target);
                    }
                    send(wire, i, slot, &mut next_request);
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            eprint!(
                "\r{:>5.1}s  {:>8} ops  {:>9.0} ops/s",
                secs,
                latencies_us.len(),
                latencies_us.len() as f64 / secs
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    Ok(Load {
        latencies_us,
        errors,
        secs: start.elapsed().as_secs_f64(),
        worst_per_second,
        started_at,
    })
}

/// Prints the human summary, then the JSON line.
fn report(
    args: &Args,
    load: Load,
    seen: &Leadership,
    garbage: Option<u64>,
    drops_before: &BTreeMap<NodeId, u64>,
    drops_after: &BTreeMap<NodeId, u64>,
    cost: Cost,
) {
    let Cost {
        authenticated,
        cpu_ticks,
    } = cost;
    let mut latencies_us = load.latencies_us;
    let (secs, errors) = (load.secs, load.errors);
    let ops = latencies_us.len();
    latencies_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies_us.is_empty() {
            0
        } else {
            latencies_us[((ops as f64 - 1.0) * p).round() as usize]
        }
    };
    let ops_per_sec = ops as f64 / secs;
    println!(
        "{ops} appends committed in {secs:.1} s with {} in flight, {} B each, datagrams {}: {ops_per_sec:.0} ops/s; latency p50 {} µs, p99 {} µs, max {} µs; {errors} errors",
        args.clients,
        args.size,
        if authenticated { "authenticated" } else { "not authenticated" },
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    let mut worst: Vec<(usize, u32)> = load.worst_per_second.iter().copied().enumerate().collect();
    worst.sort_by_key(|&(_, us)| std::cmp::Reverse(us));
    let worst: Vec<String> = worst
        .iter()
        .take(3)
        .map(|&(second, us)| {
            let t = load.started_at + second as u64;
            format!(
                "{} ms at {:02}:{:02}:{:02} UTC (+{second} s)",
                us / 1000,
                t / 3600 % 24,
                t / 60 % 60,
                t % 60
            )
        })
        .collect();
    println!("slowest appends: {}", worst.join(", "));
    let leaders: Vec<String> = seen
        .leaders
        .iter()
        .map(|(t, l)| format!("term {t}: node {l}"))
        .collect();
    println!(
        "leader changes {} (terms {} -> {}; {}); {} status polls, {} peer answers missing",
        seen.changes(),
        seen.first_term,
        seen.last_term,
        leaders.join(", "),
        seen.polls,
        seen.missing,
    );
    if let Some(sent) = garbage {
        println!(
            "garbage: {sent} datagrams to the leader ({:.0}/s of {} asked)",
            sent as f64 / secs,
            args.garbage_rate
        );
    }
    // Counters of the peers' own sockets: datagrams the kernel dropped because the receiver
    // thread did not keep up. Only known for peers on this machine.
    let drops: BTreeMap<NodeId, u64> = drops_after
        .iter()
        .map(|(id, after)| (*id, after - drops_before.get(id).copied().unwrap_or(0)))
        .collect();
    if !drops.is_empty() {
        let per_peer: Vec<String> = drops
            .iter()
            .map(|(id, n)| format!("node {id}: {n}"))
            .collect();
        println!(
            "datagrams dropped by the kernel at the peers' sockets: {}",
            per_peer.join(", ")
        );
    }
    let kernel_drops: Option<u64> = (!drops.is_empty()).then(|| drops.values().sum());
    // The peers' CPU time per committed append (all three peers together).
    let cpu_us_per_op = cpu_ticks.filter(|_| ops > 0).map(|t| {
        let us = t as f64 * 1e6 / USER_HZ as f64 / ops as f64;
        (us * 10.0).round() / 10.0
    });
    if let (Some(t), Some(per)) = (cpu_ticks, cpu_us_per_op) {
        println!(
            "peers' CPU time: {:.2} s over the run, {per} µs per committed append",
            t as f64 / USER_HZ as f64
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "clients": args.clients,
            "size": args.size,
            "auth": authenticated,
            "ops": ops,
            "ops_per_sec": (ops_per_sec * 10.0).round() / 10.0,
            "p50_us": pct(0.5),
            "p99_us": pct(0.99),
            "max_us": pct(1.0),
            "errors": errors,
            "leader_changes": seen.changes(),
            "term_change": seen.last_term.saturating_sub(seen.first_term),
            "garbage_rate": args.garbage_rate,
            "garbage_sent": garbage.unwrap_or(0),
            "kernel_drops": kernel_drops,
            "peer_cpu_us_per_op": cpu_us_per_op,
        })
    );
}

/// The cluster's leadership over the run, as the peers reported it.
#[derive(Debug, Default)]
struct Leadership {
    /// The highest term any peer reported in the first poll that got an answer.
    first_term: Term,
    /// The highest term any peer reported, up to the last poll.
    last_term: Term,
    /// The leader of each term from `first_term` on, as any peer reported it (a term has at
    /// most one leader, so one report is enough).
    leaders: BTreeMap<Term, NodeId>,
    polls: u64,
    /// Peers that did not answer a poll in time (their answer shed under load, say).
    missing: u64,
}

impl Leadership {
    /// Leaders elected after the first poll: the first poll's term, if it had a leader, does
    /// not count; every later term with a leader does.
    fn changes(&self) -> usize {
        self.leaders.range(self.first_term + 1..).count()
    }

    /// Records one poll: each peer's `(term, leader)`, or `None` if it did not answer.
    fn record(&mut self, poll: &[Option<(Term, Option<NodeId>)>]) {
        let answers: Vec<(Term, Option<NodeId>)> = poll.iter().flatten().copied().collect();
        self.polls += 1;
        self.missing += (poll.len() - answers.len()) as u64;
        let Some(top) = answers.iter().map(|&(term, _)| term).max() else {
            return;
        };
        if self.last_term == 0 {
            self.first_term = top;
        }
        self.last_term = self.last_term.max(top);
        for (term, leader) in answers {
            if let Some(l) = leader.filter(|_| term >= self.first_term) {
                self.leaders.entry(term).or_insert(l);
            }
        }
    }
}

/// Each peer's `(term, leader)` from one status call, `None` for a peer that did not answer.
fn poll(client: &mut Client) -> Vec<Option<(Term, Option<NodeId>)>> {
    client
        .status()
        .into_iter()
        .map(|p| p.info.map(|i| (i.term, i.leader)))
        .collect()
}

/// Polls every peer's status every `every` until `stop`, then once more (retrying a few times
/// until every peer answers), and keeps `current_leader` up to date for the flood.
fn watch_leaders(
    mut client: Client,
    every: Duration,
    stop: &AtomicBool,
    current_leader: &AtomicU64,
) -> Leadership {
    let mut seen = Leadership::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        seen.record(&poll(&mut client));
        if let Some((_, &l)) = seen.leaders.last_key_value() {
            current_leader.store(l, Ordering::Relaxed);
        }
        next += every;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    for _ in 0..5 {
        let answers = poll(&mut client);
        let all = answers.iter().all(Option::is_some);
        seen.record(&answers);
        if all {
            break;
        }
    }
    seen
}

/// Sends `rate` junk datagrams per second to the current leader (if it is a 127.0.0.1 peer of
/// `targets`) until `deadline` or `stop`; returns how many it sent. Never reads the answers to
/// the few valid requests among them: the kernel discards them when this socket's buffer fills.
fn flood(
    targets: &BTreeMap<NodeId, SocketAddr>,
    rate: u64,
    deadline: Instant,
    stop: &AtomicBool,
    current_leader: &AtomicU64,
) -> Result<u64, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("garbage socket: {e}"))?;
    let pool = junk(now_nanos());
    let mut sent = 0u64;
    // Datagrams due but not yet sent, capped at a tenth of a second's worth: after a stall
    // (descheduled, say) the flood resumes at its rate instead of bursting.
    let mut credit = 0.0f64;
    let cap = (rate as f64 / 10.0).max(1.0);
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && last < deadline {
        thread::sleep(Duration::from_millis(1));
        let now = Instant::now();
        credit = (credit + now.duration_since(last).as_secs_f64() * rate as f64).min(cap);
        last = now;
        let Some(&addr) = targets.get(&current_leader.load(Ordering::Relaxed)) else {
            continue;
        };
        while credit >= 1.0 {
            let bytes = &pool[sent as usize % pool.len()];
            // A full send buffer or an ICMP error from a dead port is not worth stopping for.
            let _ = socket.send_to(bytes, addr);
            sent += 1;
            credit -= 1.0;
        }
    }
    Ok(sent)
}

/// A varied pool of junk: random bytes, truncated and mangled JSON, well-formed datagrams that
/// a peer must drop (replies, messages from unknown nodes), and about one in ten valid status
/// requests, which reach the client queue.
fn junk(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    let request = |id: u64| {
        Datagram::Request(ClientRequest {
            id,
            op: ClientOp::Status,
        })
        .encode()
        .unwrap_or_default()
    };
    let valid = request(u64::MAX / 3);
    (0..1024u64)
        .map(|i| match i % 10 {
            0..=3 => {
                let len = 1 + rng.below(1400) as usize;
                (0..len).map(|_| rng.next_u64() as u8).collect()
            }
            4 | 5 => {
                let cut = 1 + rng.below(valid.len() as u64 - 1) as usize;
                valid[..cut].to_vec()
            }
            6 => {
                let mut bytes = valid.clone();
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] = rng.next_u64() as u8;
                bytes
            }
            7 => format!(
                r#"{{"Peer":{{"from":{},"to":1,"term":1,"body":{{"PreVoteResponse":{{"granted":true}}}}}}}}"#,
                1000 + rng.below(1000)
            )
            .into_bytes(),
            8 => Datagram::Reply(ClientReply {
                id: i,
                from: 1,
                result: ClientResult::NotLeader { leader: None },
            })
            .encode()
            .unwrap_or_default(),
            _ => request(i),
        })
        .collect()
}

/// Datagrams the kernel dropped at each peer's socket since it was opened (a full receive
/// buffer), from /proc/net/udp; only peers on a local IPv4 address, and only on Linux.
fn kernel_drops(peers: &BTreeMap<NodeId, SocketAddr>) -> BTreeMap<NodeId, u64> {
    std::fs::read_to_string("/proc/net/udp")
        .map(|table| drops_in(&table, peers))
        .unwrap_or_default()
}

/// The `drops` column of the rows of a /proc/net/udp `table` whose local address is a peer's.
fn drops_in(table: &str, peers: &BTreeMap<NodeId, SocketAddr>) -> BTreeMap<NodeId, u64> {
    let mut drops = BTreeMap::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(count)) = (fields.get(1), fields.last()) else {
            continue;
        };
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        let (Ok(ip), Ok(port), Ok(count)) = (
            u32::from_str_radix(ip, 16),
            u16::from_str_radix(port, 16),
            count.parse::<u64>(),
        ) else {
            continue;
        };
        // The kernel prints the address's network-order bytes as a host-order integer.
        let addr = SocketAddr::from((Ipv4Addr::from(u32::from_be(ip)), port));
        for (&id, &peer) in peers {
            if peer == addr {
                drops.insert(id, count);
            }
        }
    }
    drops
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Asks every peer for its status until one says it leads.
/// Asks every peer for its status until one says it leads (which also tells an authenticated
/// bench every peer's epoch before the run starts).
fn find_leader(
    wire: &mut Wire,
    peers: &BTreeMap<NodeId, SocketAddr>,
    within: Duration,
) -> Result<NodeId, String> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; MAX_DATAGRAM + auth::OVERHEAD + 1];
    let req = Datagram::Request(ClientRequest {
        id: 0,
        op: ClientOp::Status,
    });
    while Instant::now() < deadline {
        for (&id, &addr) in peers {
            wire.send(&req, id, addr);
        }
        let round = Instant::now() + Duration::from_millis(100);
        while Instant::now() < round {
            let Ok((n, _)) = wire.socket.recv_from(&mut buf) else {
                continue;
            };
            match wire.open(&buf[..n]) {
                Some(Incoming::Reply(r)) => {
                    if let ClientResult::Status(s) = r.result {
                        if s.role == raft::raft::Role::Leader {
                            return Ok(s.id);
                        }
                    }
                }
                Some(Incoming::Notice(id)) => wire.send(&req, id, peers[&id]),
                None => {}
            }
        }
    }
    let hint = match &wire.auth {
        Some(a) if a.heard == 0 => {
            "; no peer answered at all: a key mismatch (secret_file, cluster) is the likely cause"
        }
        _ => "",
    };
    Err(format!(
        "no leader among {} peers within {within:?}{hint}",
        peers.len()
    ))
}

/// Spawned peers, their addresses, and the keys of their secret (None: unauthenticated).
type SpawnedCluster = (Spawned, BTreeMap<NodeId, SocketAddr>, Option<Arc<Keys>>);

/// Starts three peers on free loopback ports with data in a fresh temporary folder, and with
/// `auth`, a fresh secret file there that they all use.
fn spawn_cluster(
    keep: bool,
    auth: bool,
    snapshot_entries: Option<u64>,
) -> Result<SpawnedCluster, String> {
    let dir = std::env::temp_dir().join(format!("raft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let secret_file = dir.join("cluster.key");
    let keys = if auth {
        let secret = Secret::generate()?;
        secret.write(&secret_file)?;
        Some(Arc::new(Keys::new(&secret, raft::config::DEFAULT_CLUSTER)?))
    } else {
        None
    };
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let peer = exe.with_file_name("peer");
    if !peer.exists() {
        return Err(format!(
            "{} not found: build it with `cargo build --release --bins`",
            peer.display()
        ));
    }
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("free port: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut spawned = Spawned {
        children: Vec::new(),
        dir: dir.clone(),
        keep,
    };
    // Role changes are logged at info: one line each, and what a leader change is traced by.
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut peers = BTreeMap::new();
    for i in 0..3 {
        let others: Vec<serde_json::Value> = (0..3)
            .filter(|&j| j != i)
            .map(|j| serde_json::json!({"node_ID": j + 1, "host": "127.0.0.1", "port": ports[j]}))
            .collect();
        let mut config = serde_json::json!({
            "name": format!("bench{}", i + 1),
            "node_ID": i + 1,
            "host": "127.0.0.1",
            "port": ports[i],
            "other_peers": others,
            "data_dir": dir.join(format!("data{}", i + 1)),
        });
        if keys.is_some() {
            config["secret_file"] = secret_file.to_string_lossy().into_owned().into();
        }
        if let Some(n) = snapshot_entries {
            config["snapshot_entries"] = n.into();
        }
        let path = dir.join(format!("peer{}.json", i + 1));
        std::fs::write(&path, config.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let log = std::fs::File::create(dir.join(format!("peer{}.log", i + 1)))
            .map_err(|e| format!("log file: {e}"))?;
        let child = Command::new(&peer)
            .arg("-p")
            .arg(&path)
            .env("RUST_LOG", &level)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {}: {e}", peer.display()))?;
        spawned.children.push(child);
        peers.insert(
            i as NodeId + 1,
            SocketAddr::from(([127, 0, 0, 1], ports[i])),
        );
    }
    eprintln!("spawned 3 peers with data in {}", dir.display());
    Ok((spawned, peers, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::transport::{classify, Inbound};

    #[test]
    fn leader_changes_count_the_leaders_elected_after_the_first_poll() {
        let mut seen = Leadership::default();
        // An election in progress at the start: its winner is not a change.
        seen.record(&[Some((1, None)), Some((1, None)), None]);
        seen.record(&[Some((1, Some(2))), Some((1, Some(2))), Some((1, Some(2)))]);
        assert_eq!((seen.changes(), seen.missing), (0, 1));
        // A peer still in an old term does not count; terms 2 (no leader seen) and 3 move the
        // term on; the leader of term 3 is one change, seen by two peers.
        seen.record(&[Some((1, Some(2))), Some((2, None)), Some((3, Some(1)))]);
        seen.record(&[Some((3, Some(1))), Some((3, Some(1))), Some((3, Some(1)))]);
        assert_eq!(seen.changes(), 1);
        assert_eq!((seen.first_term, seen.last_term), (1, 3));
        // The same node elected again in a later term is a change too.
        seen.record(&[Some((4, Some(1))), None, None]);
        assert_eq!(seen.changes(), 2);
    }

    #[test]
    fn the_flood_goes_only_to_127_0_0_1() {
        assert!(is_flood_target("127.0.0.1:3000".parse().unwrap()));
        for other in [
            "127.0.0.2:3000",
            "10.0.0.1:3000",
            "[::1]:3000",
            "0.0.0.0:3000",
        ] {
            assert!(!is_flood_target(other.parse().unwrap()), "{other}");
        }
    }

    #[test]
    fn junk_never_passes_for_a_configured_peer() {
        let src: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let peers = raft::transport::Accept::only([2, 3]);
        let pool = junk(7);
        let mut requests = 0;
        for bytes in &pool {
            match classify(bytes, src, 1, &peers) {
                Ok(Inbound::Peer(m)) => panic!("junk accepted as a peer message: {m:?}"),
                Ok(Inbound::Client(..)) => requests += 1,
                Err(_) => {}
            }
        }
        // Mostly rejected; about one in ten a valid request that reaches the client queue.
        assert!(
            (50..=200).contains(&requests),
            "{requests} of {}",
            pool.len()
        );
    }

    #[test]
    fn kernel_drops_are_read_from_the_peers_rows() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:0BB8 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 17
  2: 0100007F:0BB9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 0
  3: 00000000:0BBA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5
";
        let peers: BTreeMap<NodeId, SocketAddr> = [
            (1, "127.0.0.1:3000".parse().unwrap()),
            (2, "127.0.0.1:3001".parse().unwrap()),
            (3, "127.0.0.1:3002".parse().unwrap()),
        ]
        .into_iter()
        .collect();
        let drops = drops_in(table, &peers);
        assert_eq!(drops, [(1, 17), (2, 0)].into_iter().collect());
    }
}
