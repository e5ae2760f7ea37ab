//! Shared helpers for the tests on real processes: temp dirs that are kept on failure, configs
//! on free loopback ports, a cluster of `peer` processes that is killed when dropped, leader
//! waiting, a seeded generator for fault schedules, append workers and the log checker.
//!
//! Each test file uses only part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

use raft::client::{Client, ClientError, PeerStatus};
use raft::config::PeerConfig;
use raft::raft::{LogRecord, NodeId, Role, Term};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const PEER: &str = env!("CARGO_BIN_EXE_peer");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_client");

/// Runs the tests of one file one at a time: each starts several processes, and on a shared
/// 2-core machine overlapping clusters only add election noise. Poisoning is ignored so that one
/// failed test does not fail the rest.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tool or privilege a test needs (`what`) is missing here, for the reason `why`. Under CI
/// (the environment variable `CI` set and non-empty, as `.ci/run` and CI services set it) this
/// fails the test: `.ci/run` installs every such tool and runs as root, so a missing one means
/// the test did not run, which CI must not pass over. Elsewhere it prints `SKIPPED: <why>` and
/// returns, and the caller leaves out what needs the tool.
pub fn missing_tool(what: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "CI is set and {what} is missing: {why}; .ci/run installs what the tests need \
             (and runs as root). Unset CI to skip instead."
        );
    }
    println!("SKIPPED: {why}");
}

/// A fresh directory, removed when the test passes and kept (and printed) when it fails.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!("raft-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Loopback ports free for UDP and TCP, never handed out before in this test process (see
/// `raft::ports`: below the kernel's ephemeral range, so no socket bound to port 0 takes one
/// before the peer binds it).
pub fn free_ports(n: usize) -> Vec<u16> {
    raft::ports::free_loopback_ports(n).unwrap()
}

/// A free loopback address for a TCP server (a peer's `metrics_addr`), as `free_ports`.
pub fn free_tcp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]))
}

/// The config of peer `id` (of IDs 1..=ports.len()) as JSON, its data in `dir/data-peer{id}`.
pub fn config_json(dir: &Path, ports: &[u16], id: u64) -> Value {
    let others: Vec<Value> = ports
        .iter()
        .enumerate()
        .filter(|&(j, _)| j as u64 + 1 != id)
        .map(|(j, &p)| serde_json::json!({"node_ID": j + 1, "host": "127.0.0.1", "port": p}))
        .collect();
    serde_json::json!({
        "name": format!("peer{id}"),
        "node_ID": id,
        "host": "127.0.0.1",
        "port": ports[id as usize - 1],
        "other_peers": others,
        "data_dir": dir.join(format!("data-peer{id}")),
        "election_timeout_ms": [150, 300],
        "heartbeat_ms": 50,
    })
}

pub fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// Writes one config per peer (IDs 1..=n) into `dir`; returns their paths by ID.
pub fn write_configs(dir: &Path, n: usize) -> BTreeMap<u64, PathBuf> {
    let ports = free_ports(n);
    let mut configs = BTreeMap::new();
    for id in 1..=n as u64 {
        let path = dir.join(format!("peer{id}.json"));
        write_json(&path, &config_json(dir, &ports, id));
        configs.insert(id, path);
    }
    configs
}

/// A running cluster; dropping it kills every peer process it started.
pub struct Cluster {
    pub peers: BTreeMap<u64, Child>,
    pub configs: BTreeMap<u64, PathBuf>,
    pub dir: TempDir,
    /// Appends acknowledged so far by this cluster's append workers.
    pub acked: Arc<AtomicUsize>,
}

/// Runs `scripts/NAME ARGS` with `home` as `RAFT_HOME`, the test's binaries and `envs`.
pub fn script(home: &Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let target = Path::new(PEER).parent().unwrap().parent().unwrap();
    Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name),
    )
    .args(args)
    .env("RAFT_HOME", home)
    .env("CARGO_TARGET_DIR", target)
    .env("RAFT_NO_BUILD", "1")
    .env("RUST_LOG", "info")
    .envs(envs.iter().copied())
    .output()
    .unwrap()
}

/// Stops whatever the scripts started in its `RAFT_HOME`, even when the test fails.
pub struct StopScripts(pub PathBuf);

impl Drop for StopScripts {
    fn drop(&mut self) {
        let _ = script(&self.0, "stop-cluster.sh", &[], &[]);
    }
}

/// Checks `holds` every 20 ms for `span`, and panics with `what` and its Err at the first
/// failure: a state that must last (a peer stays up, a probe stays unready), not merely be
/// seen once.
pub fn holds_for(span: Duration, what: &str, mut holds: impl FnMut() -> Result<(), String>) {
    let end = Instant::now() + span;
    loop {
        if let Err(seen) = holds() {
            panic!("{what} did not hold for {span:?}:\n{seen}");
        }
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls `attempt` every 20 ms until it returns Ok, and panics with `what` and the last Err
/// (the state seen last, for the failure message) once `within` has passed.
pub fn poll_until<T>(
    within: Duration,
    what: &str,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Ok(done) => return done,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what} within {within:?}; last seen:\n{last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Cluster {
    pub fn start(name: &str, n: usize) -> Cluster {
        Cluster::start_configured(name, n, |_| {})
    }

    /// [`Cluster::start`], with `configure` called on each config file before any peer starts.
    pub fn start_configured(name: &str, n: usize, configure: impl Fn(&Path)) -> Cluster {
        let dir = TempDir::new(name);
        let configs = write_configs(&dir.0, n);
        for path in configs.values() {
            configure(path);
        }
        Cluster::start_in(dir, configs)
    }

    /// Starts a peer on each of `configs` (written under `dir`).
    pub fn start_in(dir: TempDir, configs: BTreeMap<u64, PathBuf>) -> Cluster {
        let ids: Vec<u64> = configs.keys().copied().collect();
        let mut cluster = Cluster {
            peers: BTreeMap::new(),
            configs,
            dir,
            acked: Arc::new(AtomicUsize::new(0)),
        };
        for id in ids {
            cluster.start_peer(id);
        }
        cluster
    }

    /// Starts peer `id` on its config; its output is appended to its log file, so that the
    /// log of a restarted peer still shows what came before.
    pub fn start_peer(&mut self, id: u64) {
        self.start_peer_with(id, &[]);
    }

    /// [`Cluster::start_peer`] with more arguments (e.g. `--join`).
    pub fn start_peer_with(&mut self, id: u64, args: &[&str]) {
        assert!(
            !self.peers.contains_key(&id),
            "peer {id} is already running"
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .unwrap();
        let child = Command::new(PEER)
            .arg("-p")
            .arg(&self.configs[&id])
            .args(args)
            .current_dir(&self.dir.0)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PEER}: {e}"));
        self.peers.insert(id, child);
    }

    /// SIGKILL: the process gets no chance to flush or clean up anything.
    pub fn kill_peer(&mut self, id: u64) {
        let mut child = self.peers.remove(&id).expect("peer is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGKILLs every running peer before waiting for any, so they die together.
    pub fn kill_all(&mut self) {
        for child in self.peers.values_mut() {
            child.kill().unwrap();
        }
        for (_, mut child) in std::mem::take(&mut self.peers) {
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    pub fn stop_peer(&mut self, id: u64) {
        let mut child = self.peers.remove(&id).expect("peer is running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", child.id());
        let status = wait_with_deadline(&mut child, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("peer {id} did not exit within 5 s of SIGTERM"));
        assert!(
            status.success(),
            "peer {id} exited with {status} after SIGTERM; its log ends:\n{}",
            tail(&self.log_path(id))
        );
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.0.join(format!("peer{id}.stderr"))
    }

    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// The data dir the config of peer `id` names.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        PeerConfig::load(&self.configs[&id]).unwrap().data_dir
    }

    /// Every peer's client address by ID, from the first config.
    pub fn addresses(&self) -> BTreeMap<NodeId, SocketAddr> {
        PeerConfig::load(&self.configs[&1])
            .unwrap()
            .addresses()
            .unwrap()
    }

    /// Every peer's port by ID, from the first config.
    pub fn ports(&self) -> BTreeMap<NodeId, u16> {
        self.addresses()
            .into_iter()
            .map(|(id, a)| (id, a.port()))
            .collect()
    }

    /// Writes the config of a new peer `id` on `port` whose contact points are `contacts`
    /// (id → port), lets `configure` edit it, and starts the peer with `--join`.
    pub fn start_joining(
        &mut self,
        id: u64,
        port: u16,
        contacts: &BTreeMap<u64, u16>,
        configure: impl Fn(&Path),
    ) {
        let others: Vec<Value> = contacts
            .iter()
            .filter(|&(&c, _)| c != id)
            .map(|(&c, &p)| serde_json::json!({"node_ID": c, "host": "127.0.0.1", "port": p}))
            .collect();
        let config = serde_json::json!({
            "name": format!("peer{id}"),
            "node_ID": id,
            "host": "127.0.0.1",
            "port": port,
            "other_peers": others,
            "data_dir": self.dir.0.join(format!("data-peer{id}")),
            "election_timeout_ms": [150, 300],
            "heartbeat_ms": 50,
        });
        let path = self.dir.0.join(format!("peer{id}.json"));
        write_json(&path, &config);
        configure(&path);
        self.configs.insert(id, path);
        self.start_peer_with(id, &["--join"]);
    }

    /// A client library handle on this cluster with the given per-operation deadline.
    pub fn lib_client(&self, timeout: Duration) -> Client {
        Client::new(self.addresses(), timeout).unwrap()
    }

    /// Panics if a peer we did not kill has exited.
    pub fn check_alive(&mut self) {
        for (id, child) in &mut self.peers {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "peer {id} exited with {status}; its stderr ends:\n{}",
                    tail(&self.dir.0.join(format!("peer{id}.stderr")))
                );
            }
        }
    }

    /// Runs the client binary with the first config.
    pub fn client(&self, args: &[&str]) -> Output {
        Command::new(CLIENT)
            .arg("-p")
            .arg(&self.configs[&1])
            .args(args)
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `client ARGS` with the peer 1 config and expects exit 0; returns its JSON lines.
    pub fn client_ok(&self, args: &[&str]) -> Vec<Value> {
        let out = self.client(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "client {args:?}: {}",
            describe(&out)
        );
        json_lines(&out.stdout)
    }

    /// The peers that say they are leader, as (id, term), from one `client status`.
    pub fn leaders(&self) -> (Vec<(u64, u64)>, String) {
        let out = self.client(&["--timeout-ms", "500", "status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let leaders = json_lines(&out.stdout)
            .iter()
            .filter(|l| l["answered"] == true && l["role"] == "leader")
            .map(|l| (l["id"].as_u64().unwrap(), l["term"].as_u64().unwrap()))
            .collect();
        (leaders, text)
    }

    /// Polls `client status` until exactly one peer says it is leader.
    pub fn wait_for_one_leader(&mut self, within: Duration) -> u64 {
        poll_until(within, "no single leader", || {
            self.check_alive();
            match self.leaders() {
                (leaders, _) if leaders.len() == 1 => Ok(leaders[0].0),
                (_, text) => Err(text),
            }
        })
    }

    /// Polls library `status` until exactly one peer says it is leader; returns (id, term).
    pub fn wait_for_leader(&mut self, within: Duration) -> (NodeId, Term) {
        let mut client = self.lib_client(Duration::from_millis(300));
        poll_until(within, "no single leader", || {
            self.check_alive();
            let status = client.status();
            match leaders_of(&status)[..] {
                [one] => Ok(one),
                _ => Err(format!("{status:#?}")),
            }
        })
    }

    /// Polls until every peer answers `status` with the same last and commit index (and all
    /// have applied it), and one of them is leader; returns that common last index.
    pub fn wait_until_converged(&mut self, within: Duration) -> u64 {
        let mut client = self.lib_client(Duration::from_millis(300));
        poll_until(within, "peers did not converge", || {
            self.check_alive();
            let status = client.status();
            let infos: Vec<_> = status.iter().filter_map(|s| s.info.as_ref()).collect();
            let last = infos.first().map_or(0, |i| i.last_index);
            let converged = infos.len() == status.len()
                && leaders_of(&status).len() == 1
                && infos.iter().all(|i| {
                    i.last_index == last && i.commit_index == last && i.applied_index == last
                });
            if converged {
                Ok(last)
            } else {
                Err(format!("{status:#?}"))
            }
        })
    }

    /// Waits until the append workers have had `more` appends acknowledged beyond `since`
    /// (a count read from `acked` earlier): the cluster is making progress again.
    pub fn wait_for_acks(&self, since: usize, more: usize, within: Duration) {
        poll_until(within, "append workers made no progress", || {
            let now = self.acked.load(Ordering::Relaxed);
            if now >= since + more {
                Ok(())
            } else {
                Err(format!("{} acknowledged since, {more} wanted", now - since))
            }
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.peers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The peers that answered as leader, as (id, term).
pub fn leaders_of(status: &[PeerStatus]) -> Vec<(NodeId, Term)> {
    status
        .iter()
        .filter_map(|s| s.info.as_ref())
        .filter(|i| i.role == Role::Leader)
        .map(|i| (i.id, i.term))
        .collect()
}

/// Waits for `child` to exit; None if it is still running at the deadline.
pub fn wait_with_deadline(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `peer -p config` and expects it to exit on its own within `within`; returns its exit
/// code and everything it wrote to stderr and stdout. Kills it and panics if it keeps running.
pub fn run_peer_expecting_exit(
    dir: &Path,
    config: &Path,
    within: Duration,
) -> (Option<i32>, String) {
    let out_path = dir.join(format!(
        "{}.expect-exit.out",
        config.file_name().unwrap().to_string_lossy()
    ));
    let out = File::create(&out_path).unwrap();
    let mut child = Command::new(PEER)
        .arg("-p")
        .arg(config)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child, within);
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(status) => {
            eprintln!(
                "peer -p {} exited with {status}: {}",
                config.file_name().unwrap().to_string_lossy(),
                text.lines().last().unwrap_or("(no output)")
            );
            (status.code(), text)
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "peer -p {} was expected to exit, but still ran after {within:?}; output:\n{text}",
                config.display()
            );
        }
    }
}

/// The last lines of a file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A small seeded generator (SplitMix64) for fault schedules: the same seed gives the same
/// choices, though not the same timing of the processes around them.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `E2E_SEED` if set, else from the clock; prints the seed either way.
    pub fn from_env(test: &str) -> Rng {
        let seed = match std::env::var("E2E_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("E2E_SEED={s:?} is not a u64")),
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        };
        eprintln!("{test}: seed {seed} (rerun with E2E_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        raft::raft::rng::splitmix64(self.0)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// Uniform in lo..=hi milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What one append worker saw.
#[derive(Debug, Default)]
pub struct Appends {
    /// Data → the index its append was acknowledged at.
    pub acked: BTreeMap<String, u64>,
    /// Data whose last attempt timed out: in the log at most once.
    pub unknown: BTreeSet<String>,
    /// Every data string sent.
    pub sent: BTreeSet<String>,
    /// Attempts that timed out (each followed by a retry of the same data, or given up).
    pub timeouts: usize,
    /// Appends acknowledged after at least one timed-out attempt of the same data.
    pub acked_after_retry: usize,
}

impl Appends {
    pub fn merge(&mut self, other: Appends) {
        for (data, index) in other.acked {
            assert!(
                self.acked.insert(data.clone(), index).is_none(),
                "{data:?} acknowledged twice"
            );
        }
        self.unknown.extend(other.unknown);
        self.sent.extend(other.sent);
        self.timeouts += other.timeouts;
        self.acked_after_retry += other.acked_after_retry;
    }
}

/// Appends `{prefix}-0`, `{prefix}-1`, ... one at a time until `stop` is set (or `limit` are
/// done). A timed-out append is retried with the same data, so with the same `(client, seq)`,
/// up to `tries` attempts in all; after that its outcome stays unknown and the next data is
/// taken. A refusal or a local error is a test failure.
pub fn append_worker(
    mut client: Client,
    prefix: &str,
    tries: usize,
    limit: usize,
    stop: &AtomicBool,
    acked: &AtomicUsize,
) -> Appends {
    let mut out = Appends::default();
    for n in 0..limit {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let data = format!("{prefix}-{n}");
        out.sent.insert(data.clone());
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client.append(&data) {
                Ok(a) => {
                    out.acked.insert(data.clone(), a.index);
                    acked.fetch_add(1, Ordering::Relaxed);
                    if attempt > 1 {
                        out.acked_after_retry += 1;
                    }
                    break;
                }
                Err(ClientError::Timeout(_)) => {
                    out.timeouts += 1;
                    if attempt >= tries || stop.load(Ordering::Relaxed) {
                        out.unknown.insert(data.clone());
                        break;
                    }
                }
                Err(e) => panic!("append {data:?} (attempt {attempt}) failed: {e:?}"),
            }
        }
    }
    out
}

/// Starts `workers` append workers on threads, appending `{prefix}-c{w}-{n}`, until `stop` is
/// set or each has done `limit`; [`join_workers`] collects what they saw.
pub fn spawn_workers(
    cluster: &Cluster,
    prefix: &str,
    workers: usize,
    timeout: Duration,
    tries: usize,
    limit: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Appends>> {
    (0..workers)
        .map(|w| {
            let client = cluster.lib_client(timeout);
            let stop = Arc::clone(stop);
            let acked = Arc::clone(&cluster.acked);
            let prefix = format!("{prefix}-c{w}");
            std::thread::Builder::new()
                .name(format!("client{w}"))
                .spawn(move || append_worker(client, &prefix, tries, limit, &stop, &acked))
                .unwrap()
        })
        .collect()
}

pub fn join_workers(handles: Vec<std::thread::JoinHandle<Appends>>) -> Appends {
    let mut all = Appends::default();
    for h in handles {
        all.merge(h.join().expect("an append worker panicked"));
    }
    all
}

/// Reads the whole committed log through the library, retrying a timed-out query until
/// `within` has passed.
pub fn query_log(cluster: &Cluster, within: Duration) -> Vec<LogRecord> {
    let mut client = cluster.lib_client(Duration::from_secs(5));
    let deadline = Instant::now() + within;
    loop {
        match client.query() {
            Ok(records) => return records,
            Err(ClientError::Timeout(e)) if Instant::now() < deadline => {
                eprintln!("query timed out ({e}); retrying");
            }
            Err(e) => panic!("query failed: {e:?}"),
        }
    }
}

/// Checks the committed log against what the clients saw:
/// - indices run 1..=n without gaps;
/// - every entry has data, or is a `noop` or a `duplicate` (a retried append applied once);
/// - no data appears twice, and nothing appears that no client sent;
/// - every acknowledged append is at the index it was acknowledged at.
///
/// Returns the number of `duplicate` entries.
pub fn check_log(records: &[LogRecord], appends: &Appends) -> usize {
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r.index,
            i as u64 + 1,
            "indices run 1..n without gaps, but entry {} is at position {}",
            r.index,
            i + 1
        );
    }
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    let mut duplicates = 0;
    for r in records {
        match (&r.data, r.kind.as_deref()) {
            (Some(data), None) => {
                assert!(
                    appends.sent.contains(data.as_str()),
                    "entry {} holds {data:?}, which no client sent",
                    r.index
                );
                if let Some(first) = seen.insert(data, r.index) {
                    panic!(
                        "{data:?} was applied twice: at entries {first} and {}",
                        r.index
                    );
                }
            }
            (None, Some("noop")) => {}
            (None, Some("duplicate")) => duplicates += 1,
            _ => panic!(
                "entry {} is neither data nor a noop or duplicate: {r:?}",
                r.index
            ),
        }
    }
    for (data, &index) in &appends.acked {
        let at = records.get(index as usize - 1).unwrap_or_else(|| {
            panic!(
                "{data:?} was acknowledged at index {index}, but the log ends at {}",
                records.len()
            )
        });
        assert_eq!(
            at.data.as_deref(),
            Some(data.as_str()),
            "{data:?} was acknowledged at index {index}, which holds {at:?}"
        );
    }
    duplicates
}

/// Where the frames of a WAL segment's bytes end: after its 24-byte header, each frame is a
/// 36-byte header (its payload length at bytes 24..28) and the payload; a preallocated
/// segment has zeros where the next header would be.
pub fn wal_frames_end(bytes: &[u8]) -> usize {
    const HEADER: usize = 36;
    let mut off = 24.min(bytes.len());
    while off + HEADER <= bytes.len() && bytes[off..off + HEADER].iter().any(|&b| b != 0) {
        let len = u32::from_le_bytes(bytes[off + 24..off + 28].try_into().unwrap());
        off = (off + HEADER + len as usize).min(bytes.len());
    }
    off
}
