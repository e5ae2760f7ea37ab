//! Drives a running cluster (or one it spawns) with C appends in flight for S seconds, and
//! reports committed, acknowledged appends per second and their latency.
//!
//! One process and one UDP socket: each in-flight slot is its own client ID, so exactly-once
//! retries work as for real clients.

use argh::FromArgs;
use raft::config::PeerConfig;
use raft::raft::{ClientOp, ClientRequest, ClientResult, Datagram, NodeId, MAX_DATAGRAM};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(FromArgs)]
/// Benchmark a raft cluster: committed appends per second and latency.
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

/// Peers started by `--spawn`, killed on drop.
struct Spawned {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() {
    let args: Args = argh::from_env();
    if !(1..=65_536).contains(&args.clients)
        || args.size == 0
        || args.size > raft::raft::MAX_ENTRY_DATA
    {
        eprintln!(
            "error: --clients must be 1..=65536 and --size 1..={}",
            raft::raft::MAX_ENTRY_DATA
        );
        std::process::exit(1);
    }
    let (_spawned, peers) = if args.spawn {
        match spawn_cluster() {
            Ok((s, p)) => (Some(s), p),
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
        (None, peers)
    };
    if let Err(e) = run(&args, &peers) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run(args: &Args, peers: &BTreeMap<NodeId, SocketAddr>) -> Result<(), String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    raft::transport::enlarge_buffers(&socket);
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(|e| format!("socket: {e}"))?;
    let ids: Vec<NodeId> = peers.keys().copied().collect();
    let leader = find_leader(&socket, peers, Duration::from_secs(10))?;
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
    let send = |slot_index: usize, slot: &mut Slot, next_request: &mut u64| {
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
        let bytes = req.encode().expect("bench request fits a datagram");
        let _ = socket.send_to(&bytes, peers[&slot.target]);
    };
    for (i, slot) in slots.iter_mut().enumerate() {
        slot.seq = 1;
        slot.started = Instant::now();
        send(i, slot, &mut next_request);
    }
    let deadline = start + Duration::from_secs(args.duration);
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    let mut last_progress = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let retry_after = Duration::from_millis(300);
    let mut last_retry_scan = Instant::now();
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                let Ok(Datagram::Reply(reply)) = Datagram::decode(&buf[..n]) else {
                    continue;
                };
                let i = (reply.id & 0xFFFF) as usize;
                let Some(slot) = slots.get_mut(i).filter(|s| s.request_id == reply.id) else {
                    continue; // an answer to an earlier attempt
                };
                match reply.result {
                    ClientResult::Appended { .. } => {
                        latencies_us.push(slot.started.elapsed().as_micros() as u32);
                        slot.seq += 1;
                        slot.started = Instant::now();
                        slot.target = reply.from;
                        send(i, slot, &mut next_request);
                    }
                    ClientResult::NotLeader { leader: hint } => {
                        if let Some(l) = hint.filter(|l| peers.contains_key(l)) {
                            slot.target = l;
                            send(i, slot, &mut next_request);
                        }
                        // Without a hint, the retry timer below moves on.
                    }
                    _ => {
                        errors += 1;
                        slot.seq += 1;
                        slot.started = Instant::now();
                        send(i, slot, &mut next_request);
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
                    send(i, slot, &mut next_request);
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
    let secs = start.elapsed().as_secs_f64();
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
        "{ops} appends committed in {secs:.1} s with {} in flight, {} B each: {ops_per_sec:.0} ops/s; latency p50 {} µs, p99 {} µs, max {} µs; {errors} errors",
        args.clients,
        args.size,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "{}",
        serde_json::json!({
            "clients": args.clients,
            "size": args.size,
            "ops": ops,
            "ops_per_sec": (ops_per_sec * 10.0).round() / 10.0,
            "p50_us": pct(0.5),
            "p99_us": pct(0.99),
            "max_us": pct(1.0),
            "errors": errors,
        })
    );
    Ok(())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Asks every peer for its status until one says it leads.
fn find_leader(
    socket: &UdpSocket,
    peers: &BTreeMap<NodeId, SocketAddr>,
    within: Duration,
) -> Result<NodeId, String> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    while Instant::now() < deadline {
        for addr in peers.values() {
            let req = Datagram::Request(ClientRequest {
                id: 0,
                op: ClientOp::Status,
            });
            let _ = socket.send_to(&req.encode()?, addr);
        }
        let round = Instant::now() + Duration::from_millis(100);
        while Instant::now() < round {
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                if let Ok(Datagram::Reply(r)) = Datagram::decode(&buf[..n]) {
                    if let ClientResult::Status(s) = r.result {
                        if s.role == raft::raft::Role::Leader {
                            return Ok(s.id);
                        }
                    }
                }
            }
        }
    }
    Err(format!(
        "no leader among {} peers within {within:?}",
        peers.len()
    ))
}

/// Starts three peers on free loopback ports with data in a fresh temporary folder.
fn spawn_cluster() -> Result<(Spawned, BTreeMap<NodeId, SocketAddr>), String> {
    let dir = std::env::temp_dir().join(format!("raft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
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
    };
    let mut peers = BTreeMap::new();
    for i in 0..3 {
        let others: Vec<serde_json::Value> = (0..3)
            .filter(|&j| j != i)
            .map(|j| serde_json::json!({"node_ID": j + 1, "host": "127.0.0.1", "port": ports[j]}))
            .collect();
        let config = serde_json::json!({
            "name": format!("bench{}", i + 1),
            "node_ID": i + 1,
            "host": "127.0.0.1",
            "port": ports[i],
            "other_peers": others,
            "data_dir": dir.join(format!("data{}", i + 1)),
        });
        let path = dir.join(format!("peer{}.json", i + 1));
        std::fs::write(&path, config.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let log = std::fs::File::create(dir.join(format!("peer{}.log", i + 1)))
            .map_err(|e| format!("log file: {e}"))?;
        let child = Command::new(&peer)
            .arg("-p")
            .arg(&path)
            .env("RUST_LOG", "warn")
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
    Ok((spawned, peers))
}
