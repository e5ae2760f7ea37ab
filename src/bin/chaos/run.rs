//! A Jepsen-style fault-injection run against real peer processes.
//!
//! [`run()`] starts N `peer` processes on loopback, each with its own config and data directory
//! in the run's folder, and a [`proxy`](crate::proxy) on every directed peer-to-peer link. Client threads
//! (through the client library, straight to the peers) append unique values and read the whole
//! log, while the [`nemesis`](crate::nemesis) crashes, kills, pauses, partitions, and drops, duplicates and
//! delays datagrams on a seeded schedule. Every operation goes into a [`history`](crate::history) with its
//! invoke and return times and outcome (ok, failed = refused, unknown = timed out).
//!
//! With `--netns` ([`netns`](crate::netns)) the peers run in network namespaces of their own and talk to
//! each other directly; partitions take links down or filter packets, and the faults that act
//! on single datagrams (loss, dup, delay), which need the proxies, are not available.
//!
//! At the end everything is healed, the cluster must elect a leader, the final log is read once
//! per peer (each read is answered by whoever leads, and is itself checked as an operation of
//! the history), and every peer's status must converge to the same commit index. The
//! [`checker`](crate::checker) then decides whether the history is linearizable against that final log.
//!
//! Outcomes: [`RunOutcome::Valid`], [`RunOutcome::Violation`] (with the first violating
//! operation), or [`RunOutcome::Aborted`] when the run itself could not be done.

use crate::checker::{self, Verdict};
use crate::cluster::{wait_for_leader, Cluster};
use crate::history::{self, secs, Call, FaultEvent, Micros, Observed, Op, Outcome};
use crate::nemesis::{self, FaultKind, Links, Nemesis};
use crate::netns::{NetnsConfig, NetnsGuard};
use crate::proxy::Network;
use raft::auth::{self, ClientAuth, FromPeer, Keys, Secret};
use raft::client::{Client, ClientError};
use raft::raft::{
    ClientOp, ClientRequest, ClientResult, Datagram, LogRecord, NodeId, MAX_DATAGRAM,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the healed cluster has to elect a leader, answer the final reads and converge.
pub const HEAL_WITHIN: Duration = Duration::from_secs(30);

/// Client IDs of the final reads start here, to tell them from the workload's clients.
pub const FINAL_READ_CLIENT: u32 = 1000;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub duration: Duration,
    /// The faults as given on the command line, for the command that reproduces the run.
    pub faults_arg: String,
    pub faults: Vec<FaultKind>,
    pub seed: u64,
    /// Concurrent client threads.
    pub clients: usize,
    /// Each client operation's deadline.
    pub client_timeout: Duration,
    /// Each client waits up to this long between operations.
    pub think: Duration,
    /// The share of operations that are queries.
    pub query_ratio: f64,
    /// The share of operations sent through a client that knows only one peer.
    pub pinned_ratio: f64,
    /// The run's folder; a fresh one in the temporary directory if `None`.
    pub out: Option<PathBuf>,
    /// Keep the peers' data directories even when the run is valid.
    pub keep_data: bool,
    /// The peer binary.
    pub peer_exe: PathBuf,
    /// Run the peers in network namespaces of these names and addresses, without proxies.
    pub netns: Option<NetnsConfig>,
    /// Authenticate datagrams: a fresh secret file in the run's folder that every peer and
    /// client uses. Not with `netns`, whose script writes the peers' configs.
    pub auth: bool,
    /// The peers' `snapshot_entries` (their `snapshot_trailing` is a tenth of it), if set.
    pub snapshot_entries: Option<u64>,
}

impl Options {
    /// The command line that repeats this run's schedule (thread timing aside).
    pub fn reproduce(&self) -> String {
        format!(
            "cargo run --release --bin chaos -- --nodes {} --duration {} --faults {} --seed {} --clients {} --client-timeout-ms {} --think-ms {} --query-percent {} --pinned-percent {}{}{}{}",
            self.nodes,
            self.duration.as_secs(),
            self.faults_arg,
            self.seed,
            self.clients,
            self.client_timeout.as_millis(),
            self.think.as_millis(),
            (self.query_ratio * 100.0).round(),
            (self.pinned_ratio * 100.0).round(),
            self.netns.as_ref().map_or(String::new(), NetnsConfig::args),
            if self.auth || self.netns.is_some() {
                ""
            } else {
                " --no-auth"
            },
            self.snapshot_entries
                .map_or(String::new(), |n| format!(" --snapshot-entries {n}")),
        )
    }

    /// Faults that `mixed` stands for elsewhere but not in this run, said once at the start.
    pub fn left_out_of_mixed(&self) -> Option<String> {
        let mixed = self.faults_arg.split(',').any(|w| w.trim() == "mixed");
        let left: Vec<&str> = nemesis::ALL_FAULTS
            .iter()
            .filter(|k| !self.faults.contains(k))
            .map(|k| k.name())
            .collect();
        (mixed && !left.is_empty()).then(|| {
            format!(
                "--netns: mixed leaves out {} (they act on single datagrams, which needs the proxies)",
                left.join(", ")
            )
        })
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    Valid,
    Violation,
    /// The run could not be done, for this reason.
    Aborted(String),
}

impl RunOutcome {
    /// 0 valid, 1 violation, 3 could not run.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::Valid => 0,
            RunOutcome::Violation => 1,
            RunOutcome::Aborted(_) => 3,
        }
    }
}

pub use raft::raft::rng::Rng;

/// State shared by the clients, the nemesis and the progress line.
pub struct Shared {
    start: Instant,
    stop: AtomicBool,
    next_op: AtomicU64,
    pub ops: Mutex<Vec<Op>>,
    pub observed: Mutex<Observed>,
    pub faults: Mutex<Vec<FaultEvent>>,
    /// The fault being held now, for the progress line.
    pub fault: Mutex<String>,
    pub fault_rounds: AtomicUsize,
    /// Peers that exited without being killed, described with the time.
    pub peer_exits: Mutex<Vec<String>>,
    ok: AtomicUsize,
    failed: AtomicUsize,
    unknown: AtomicUsize,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            next_op: AtomicU64::new(0),
            ops: Mutex::new(Vec::new()),
            observed: Mutex::new(Observed::default()),
            faults: Mutex::new(Vec::new()),
            fault: Mutex::new(String::new()),
            fault_rounds: AtomicUsize::new(0),
            peer_exits: Mutex::new(Vec::new()),
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            unknown: AtomicUsize::new(0),
        }
    }

    pub fn now_us(&self) -> Micros {
        self.start.elapsed().as_micros() as Micros
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Runs one client operation and records it.
    fn record(&self, client: u32, call: Call, run: impl FnOnce(&Call) -> Outcome) -> Outcome {
        let id = self.next_op.fetch_add(1, Ordering::Relaxed);
        let invoke = self.now_us();
        let outcome = run(&call);
        let ret = self.now_us();
        match outcome {
            Outcome::Appended { .. } | Outcome::Read { .. } => &self.ok,
            Outcome::Failed { .. } => &self.failed,
            Outcome::Unknown { .. } => &self.unknown,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.ops.lock().expect("ops lock").push(Op {
            id,
            client,
            call,
            invoke,
            ret,
            outcome: outcome.clone(),
        });
        outcome
    }

    /// Appends through `client`, recorded.
    fn append(&self, who: u32, client: &mut Client, value: String) -> Outcome {
        self.record(who, Call::Append { value }, |call| {
            let Call::Append { value } = call else {
                unreachable!()
            };
            match client.append(value) {
                Ok(a) => Outcome::Appended {
                    index: a.index,
                    term: a.term,
                    peer: a.peer,
                },
                Err(e) => error_outcome(e),
            }
        })
    }

    /// Queries through `client`, recorded; returns the records too.
    fn query(&self, who: u32, client: &mut Client) -> (Outcome, Option<Vec<LogRecord>>) {
        let mut records = None;
        let outcome = self.record(who, Call::Query, |_| match client.query() {
            Ok(r) => {
                let interned = self.observed.lock().expect("observed lock").intern(&r);
                records = Some(r);
                match interned {
                    Ok((len, alt)) => Outcome::Read {
                        len,
                        alt,
                        peer: client.last_peer().unwrap_or(0),
                    },
                    Err(e) => Outcome::Unknown {
                        error: format!("malformed query result: {e}"),
                    },
                }
            }
            Err(e) => error_outcome(e),
        });
        (outcome, records)
    }
}

fn error_outcome(e: ClientError) -> Outcome {
    match e {
        ClientError::Refused(reason) => Outcome::Failed {
            error: format!("refused: {reason}"),
        },
        ClientError::Timeout(what) => Outcome::Unknown { error: what },
        ClientError::Io(what) => Outcome::Unknown {
            error: format!("io: {what}"),
        },
    }
}

/// One workload client: appends unique values and queries, until the run stops.
///
/// Most operations go through a client that knows every peer and follows the leader. A few
/// (`pinned_ratio`) go through a client that knows one peer only, with a short deadline: it is
/// answered only if that peer believes it leads, which is how a deposed leader that has not
/// noticed yet (paused, or cut off) gets asked, and how it could give a stale answer.
fn client_loop(
    who: u32,
    peers: BTreeMap<NodeId, SocketAddr>,
    keys: Option<Arc<Keys>>,
    opts: &Options,
    shared: &Shared,
) -> Result<(), String> {
    let mut client = Client::with_keys(peers.clone(), opts.client_timeout, keys.clone())
        .map_err(|e| e.to_string())?;
    let pinned_timeout = (opts.client_timeout / 3).max(Duration::from_millis(100));
    let mut pinned: Vec<Client> = peers
        .iter()
        .map(|(&id, &addr)| {
            Client::with_keys(BTreeMap::from([(id, addr)]), pinned_timeout, keys.clone())
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut rng = Rng::new(opts.seed ^ (u64::from(who) + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut n = 0u64;
    while !shared.stopping() {
        let via = if rng.chance(opts.pinned_ratio) {
            let k = rng.below(pinned.len() as u64) as usize;
            &mut pinned[k]
        } else {
            &mut client
        };
        if rng.chance(opts.query_ratio) {
            shared.query(who, via);
        } else {
            n += 1;
            shared.append(who, via, format!("{who}-{n}"));
        }
        let think = rng.below(opts.think.as_millis() as u64 + 1);
        std::thread::sleep(Duration::from_millis(think));
    }
    Ok(())
}

/// The files of a run's folder.
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub fn observed(&self) -> PathBuf {
        self.dir.join("observed.jsonl")
    }
    pub fn final_log(&self) -> PathBuf {
        self.dir.join("final.jsonl")
    }
    pub fn report(&self) -> PathBuf {
        self.dir.join("report.txt")
    }
    pub fn peers(&self) -> PathBuf {
        self.dir.join("peers")
    }
}

/// Where the run's files go: `--out`, or a fresh folder in the temporary directory.
pub fn run_folder(opts: &Options) -> Result<PathBuf, String> {
    let dir = match &opts.out {
        Some(d) => d.clone(),
        None => {
            // A fresh folder of an unpredictable name, made here (not found): nobody can have
            // put a link or a file in its place beforehand.
            let noise = getrandom::u64().map_err(|e| format!("no randomness: {e}"))?;
            let dir = std::env::temp_dir().join(format!("raft-chaos-s{}-{noise:016x}", opts.seed));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            return Ok(dir);
        }
    };
    if dir.join("history.jsonl").exists() {
        return Err(format!(
            "{} already holds a run; choose another --out",
            dir.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Everything a finished (or aborted) run knows, for the report and the summary line.
pub struct RunRecord {
    pub ops: Vec<Op>,
    pub faults: Vec<FaultEvent>,
    pub observed: Observed,
    pub final_log: Vec<LogRecord>,
    pub notes: Vec<String>,
    /// Peers that exited on their own: a bug, whatever the history says.
    pub peer_exits: Vec<String>,
}

/// Runs the whole thing: cluster, clients, nemesis, healing, final reads, check, files.
/// `interrupted` ends the workload early (Ctrl-C), as if the duration were over.
pub fn run(opts: &Options, dir: &Path, interrupted: Arc<AtomicBool>) -> RunOutcome {
    let files = Files {
        dir: dir.to_path_buf(),
    };
    let shared = Arc::new(Shared::new());
    let mut notes: Vec<String> = Vec::new();
    let outcome = drive(opts, &files, &shared, &interrupted, &mut notes);
    let ops = std::mem::take(&mut *shared.ops.lock().expect("ops lock"));
    let faults = std::mem::take(&mut *shared.faults.lock().expect("faults lock"));
    let observed = std::mem::take(&mut *shared.observed.lock().expect("observed lock"));
    let peer_exits = std::mem::take(&mut *shared.peer_exits.lock().expect("exits lock"));
    let (final_log, aborted) = match outcome {
        Ok(log) => (log, None),
        Err(reason) => (Vec::new(), Some(reason)),
    };
    let record = RunRecord {
        ops,
        faults,
        observed,
        final_log,
        notes,
        peer_exits,
    };
    finish(opts, &files, record, aborted)
}

/// Writes the files, checks (unless aborted), prints the outcome and the summary line.
fn finish(
    opts: &Options,
    files: &Files,
    mut record: RunRecord,
    aborted: Option<String>,
) -> RunOutcome {
    record.ops.sort_by_key(|o| o.id);
    let mut write_errors = Vec::new();
    for result in [
        history::write_history(&files.history(), &record.ops, &record.faults),
        history::write_observed(&files.observed(), &record.observed),
        history::write_log(&files.final_log(), &record.final_log),
    ] {
        if let Err(e) = result {
            write_errors.push(e);
        }
    }
    let verdict = match &aborted {
        None => Some(checker::check(
            &record.ops,
            &record.observed,
            &record.final_log,
        )),
        Some(_) => None,
    };
    let outcome = match (&aborted, &verdict) {
        (Some(reason), _) => RunOutcome::Aborted(reason.clone()),
        (None, Some(v)) if !v.valid() => RunOutcome::Violation,
        (None, _) if !record.peer_exits.is_empty() => RunOutcome::Aborted(format!(
            "the history is linearizable, but peers exited on their own: {}",
            record.peer_exits.join("; ")
        )),
        _ => RunOutcome::Valid,
    };
    let summary = summary_line(&record, verdict.as_ref(), &outcome);
    let report = report_text(opts, &record, verdict.as_ref(), &outcome, &summary);
    if let Err(e) = std::fs::write(files.report(), &report) {
        write_errors.push(format!("{}: {e}", files.report().display()));
    }
    if outcome == RunOutcome::Valid && !opts.keep_data {
        remove_data_dirs(&files.peers());
        // The namespace script keeps every peer's data under one folder.
        let _ = std::fs::remove_dir_all(files.peers().join("data"));
    }
    for e in &write_errors {
        eprintln!("chaos: {e}");
    }
    println!("history: {}", files.history().display());
    println!("report: {}", files.report().display());
    match (&outcome, &verdict) {
        (RunOutcome::Aborted(reason), _) => {
            println!("run could not be completed: {reason}");
            println!("reproduce: {}", opts.reproduce());
        }
        (RunOutcome::Violation, Some(v)) => {
            if let Some(first) = v.first() {
                println!("first violation ({}): {}", first.kind, first.message);
            }
            println!("reproduce: {}", opts.reproduce());
        }
        _ => {}
    }
    println!("{summary}");
    let _ = std::io::stdout().flush();
    outcome
}

fn remove_data_dirs(peers: &Path) {
    if let Ok(entries) = std::fs::read_dir(peers) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir_all(e.path().join("data"));
        }
    }
}

/// Counts of faults by kind: `crash:3,partition:2`, or `none`.
fn fault_counts(faults: &[FaultEvent]) -> String {
    let mut by_kind: Vec<(FaultKind, usize)> = Vec::new();
    for k in nemesis::ALL_FAULTS {
        let n = faults.iter().filter(|f| f.fault == k.name()).count();
        if n > 0 {
            by_kind.push((k, n));
        }
    }
    if by_kind.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k}:{n}")).collect();
    parts.join(",")
}

/// The last line a run prints.
pub fn summary_line(record: &RunRecord, verdict: Option<&Verdict>, outcome: &RunOutcome) -> String {
    let valid = match outcome {
        RunOutcome::Valid => "true",
        RunOutcome::Violation => "false",
        RunOutcome::Aborted(_) => "unknown",
    };
    let mut s = format!("valid={valid}");
    match verdict {
        Some(v) => {
            let _ = write!(
                s,
                " ops={} ok={} unknown={} failed={}",
                v.ops, v.ok, v.unknown, v.failed
            );
            for kind in [
                checker::Kind::Lost,
                checker::Kind::Duplicate,
                checker::Kind::Stale,
                checker::Kind::Diverged,
                checker::Kind::Phantom,
                checker::Kind::FailedApplied,
                checker::Kind::Order,
            ] {
                let _ = write!(s, " {kind}={}", v.count(kind));
            }
            if v.count(checker::Kind::Malformed) > 0 {
                let _ = write!(s, " malformed={}", v.count(checker::Kind::Malformed));
            }
        }
        None => {
            let _ = write!(s, " ops={}", record.ops.len());
        }
    }
    if !record.peer_exits.is_empty() {
        let _ = write!(s, " peer_exits={}", record.peer_exits.len());
    }
    let _ = write!(s, " faults={}", fault_counts(&record.faults));
    s
}

fn report_text(
    opts: &Options,
    record: &RunRecord,
    verdict: Option<&Verdict>,
    outcome: &RunOutcome,
    summary: &str,
) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "chaos run report");
    let _ = writeln!(r, "reproduce: {}", opts.reproduce());
    let _ = writeln!(
        r,
        "nodes {}, {} s, faults {:?}, seed {}, {} clients, client timeout {} ms, think up to {} ms, {:.0}% queries, {:.0}% pinned to one peer",
        opts.nodes,
        opts.duration.as_secs(),
        opts.faults_arg,
        opts.seed,
        opts.clients,
        opts.client_timeout.as_millis(),
        opts.think.as_millis(),
        opts.query_ratio * 100.0,
        opts.pinned_ratio * 100.0
    );
    if let Some(cfg) = &opts.netns {
        let _ = writeln!(
            r,
            "peers in network namespaces {p}1..{p}{n} at {s}.1..{s}.{n}, no proxies",
            p = cfg.prefix,
            n = opts.nodes,
            s = cfg.subnet
        );
    }
    let _ = writeln!(r, "outcome: {outcome:?}");
    let _ = writeln!(r, "\nfaults ({}):", record.faults.len());
    for f in &record.faults {
        let _ = writeln!(
            r,
            "  {:>8.3} s .. {:>8.3} s  {:<9} {}",
            secs(f.start),
            secs(f.end),
            f.fault,
            f.detail
        );
    }
    if !record.peer_exits.is_empty() {
        let _ = writeln!(r, "\npeers that exited on their own:");
        for e in &record.peer_exits {
            let _ = writeln!(r, "  {e}");
        }
    }
    let _ = writeln!(r, "\nnotes:");
    for n in &record.notes {
        let _ = writeln!(r, "  {n}");
    }
    let appends = record.ops.iter().filter(|o| o.is_append()).count();
    let _ = writeln!(
        r,
        "\noperations: {} ({} appends, {} queries); final log {} records, {} with client data",
        record.ops.len(),
        appends,
        record.ops.len() - appends,
        record.final_log.len(),
        record.final_log.iter().filter(|x| x.data.is_some()).count()
    );
    let mut latencies: Vec<u64> = record
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Appended { .. }))
        .map(|o| o.ret - o.invoke)
        .collect();
    latencies.sort_unstable();
    if !latencies.is_empty() {
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        let _ = writeln!(
            r,
            "acknowledged append latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    let disagreements = record.observed.disagreements();
    if !disagreements.is_empty() {
        let _ = writeln!(
            r,
            "queries disagreed about {} indexes, first {:?}",
            disagreements.len(),
            &disagreements[..disagreements.len().min(10)]
        );
    }
    if let Some(v) = verdict {
        let _ = writeln!(
            r,
            "unknown-outcome appends that took effect: {}",
            v.unknown_applied
        );
        let _ = writeln!(r, "\nviolations: {}", v.violations.len());
        for x in v.violations.iter().take(50) {
            let _ = writeln!(r, "  [{}] {}", x.kind, x.message);
        }
        if v.violations.len() > 50 {
            let _ = writeln!(r, "  ... {} more", v.violations.len() - 50);
        }
    }
    let _ = writeln!(r, "\n{summary}");
    r
}

/// Re-checks a saved run folder: history, observed records and final log.
pub fn recheck(dir: &Path) -> Result<(Verdict, RunRecord), String> {
    let files = Files {
        dir: dir.to_path_buf(),
    };
    let (ops, faults) = history::read_history(&files.history())?;
    let observed = history::read_observed(&files.observed())?;
    let final_log = history::read_log(&files.final_log())?;
    let verdict = checker::check(&ops, &observed, &final_log);
    Ok((
        verdict,
        RunRecord {
            ops,
            faults,
            observed,
            final_log,
            notes: Vec::new(),
            peer_exits: Vec::new(),
        },
    ))
}

/// Runs the cluster and the workload; returns the final log, or why the run cannot be judged.
fn drive(
    opts: &Options,
    files: &Files,
    shared: &Arc<Shared>,
    interrupted: &AtomicBool,
    notes: &mut Vec<String>,
) -> Result<Vec<LogRecord>, String> {
    if !opts.peer_exe.exists() {
        return Err(format!(
            "{} not found: build it with `cargo build --release --bins`",
            opts.peer_exe.display()
        ));
    }
    std::fs::create_dir_all(files.peers()).map_err(|e| format!("{e}"))?;
    // Declared before the cluster, so that it is dropped after it: however drive() ends, the
    // peers are killed first and then the namespaces are removed.
    let mut netns_guard: Option<NetnsGuard> = None;
    let mut keys: Option<Arc<Keys>> = None;
    let (cluster, links) = match &opts.netns {
        None => {
            let ids: Vec<NodeId> = (1..=opts.nodes as NodeId).collect();
            let ports: BTreeMap<NodeId, u16> = ids
                .iter()
                .copied()
                .zip(raft::ports::free_loopback_ports(opts.nodes)?)
                .collect();
            let network = Arc::new(Network::start(&ports, opts.seed)?);
            let secret_file = files.peers().join("cluster.key");
            if opts.auth {
                let secret = Secret::generate()?;
                secret.write(&secret_file)?;
                keys = Some(Arc::new(Keys::new(&secret, raft::config::DEFAULT_CLUSTER)?));
                notes.push(format!(
                    "datagrams encrypted and authenticated (secret in {})",
                    secret_file.display()
                ));
            } else {
                notes.push("datagrams not authenticated (--no-auth)".into());
            }
            let mut cluster = Cluster::configure(
                &files.peers(),
                &opts.peer_exe,
                &ports,
                &network,
                opts.auth.then_some(secret_file.as_path()),
                opts.snapshot_entries,
            )?;
            cluster.start_all()?;
            (cluster, Links::Proxies(network))
        }
        Some(cfg) => {
            let guard = netns_guard.insert(NetnsGuard::prepare(
                cfg,
                &files.dir.join("netns"),
                &files.peers(),
                &opts.peer_exe,
                !opts.auth,
                notes,
            )?);
            let netns = guard.netns();
            if !netns.one_way {
                notes.push(
                    "no working packet filter (nft or iptables): partitions are two-way only"
                        .into(),
                );
            }
            if let Some(left) = opts.left_out_of_mixed() {
                eprintln!("chaos: {left}");
                notes.push(left);
            }
            if opts.auth {
                // The script keeps a key it finds in its folder and names it in every config.
                let secret_file = files.peers().join("cluster.key");
                let secret = Secret::generate()?;
                secret.write(&secret_file)?;
                keys = Some(Arc::new(Keys::new(&secret, raft::config::DEFAULT_CLUSTER)?));
                notes.push(format!(
                    "--netns: datagrams encrypted and authenticated (secret in {})",
                    secret_file.display()
                ));
            } else {
                notes.push(
                    "--netns: datagrams not authenticated (--no-auth: \"insecure\": true)".into(),
                );
            }
            netns.up(opts.nodes)?;
            (
                Cluster::in_netns(netns.clone(), opts.nodes)?,
                Links::Netns(netns),
            )
        }
    };
    let peers = cluster.client_addresses();
    let cluster = Arc::new(Mutex::new(cluster));
    let mut status = Client::with_keys(peers.clone(), Duration::from_millis(300), keys.clone())
        .map_err(|e| format!("status client: {e}"))?;
    let Some(first_leader) = wait_for_leader(&mut status, HEAL_WITHIN) else {
        reap(&cluster, shared);
        let exits = shared.peer_exits.lock().expect("exits lock").join("; ");
        return Err(format!(
            "no leader within {} s of starting the peers (exits: [{exits}]); see {}",
            HEAL_WITHIN.as_secs(),
            files.peers().display()
        ));
    };
    notes.push(format!(
        "{} peers started, node {first_leader} leads at {:.3} s",
        opts.nodes,
        secs(shared.now_us())
    ));
    eprintln!(
        "chaos: {} peers up (leader {first_leader}), {} clients, {} s of {}, seed {}; files in {}",
        opts.nodes,
        opts.clients,
        opts.duration.as_secs(),
        opts.faults_arg,
        opts.seed,
        files.dir.display()
    );

    // The workload and the nemesis.
    let workload_start = Instant::now();
    let mut clients = Vec::new();
    for who in 1..=opts.clients as u32 {
        let (peers, keys, opts, shared) =
            (peers.clone(), keys.clone(), opts.clone(), shared.clone());
        clients.push(
            std::thread::Builder::new()
                .name(format!("client-{who}"))
                .spawn(move || client_loop(who, peers, keys, &opts, &shared))
                .map_err(|e| format!("client thread: {e}"))?,
        );
    }
    let nemesis = Nemesis {
        kinds: opts.faults.clone(),
        cluster: cluster.clone(),
        links: links.clone(),
        shared: shared.clone(),
        rng: Rng::new(opts.seed),
        status: Client::with_keys(peers.clone(), Duration::from_millis(300), keys.clone())
            .map_err(|e| format!("nemesis client: {e}"))?,
        admin: Client::with_keys(peers.clone(), Duration::from_secs(10), keys.clone())
            .map_err(|e| format!("nemesis client: {e}"))?,
        // Weather on top of other faults needs the proxies.
        combine: opts.faults.len() > 1 && opts.netns.is_none(),
    };
    let nemesis = std::thread::Builder::new()
        .name("nemesis".into())
        .spawn(move || nemesis.run())
        .map_err(|e| format!("nemesis thread: {e}"))?;

    let tty = std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    while workload_start.elapsed() < opts.duration && !interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        reap(&cluster, shared);
        let every = if tty { 1 } else { 5 };
        if last_line.elapsed() >= Duration::from_secs(every) {
            last_line = Instant::now();
            let line = progress_line(shared, workload_start.elapsed());
            if tty {
                eprint!("\r{line:<110.110}");
            } else {
                eprintln!("{line}");
            }
        }
    }
    if tty {
        eprintln!();
    }
    if interrupted.load(Ordering::Relaxed) {
        notes.push(format!(
            "interrupted after {:.1} s",
            workload_start.elapsed().as_secs_f64()
        ));
    }
    shared.stop.store(true, Ordering::Relaxed);
    let nemesis_result = nemesis
        .join()
        .map_err(|_| "the nemesis thread panicked".to_string())?;
    for c in clients {
        match c.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => notes.push(format!("a client could not run: {e}")),
            Err(_) => return Err("a client thread panicked".into()),
        }
    }
    nemesis_result?;
    if let Links::Proxies(network) = &links {
        let t = network.totals();
        notes.push(format!(
            "proxies: {} datagrams received, {} forwarded, {} dropped, {} duplicated, {} delayed",
            t.received, t.forwarded, t.dropped, t.duplicated, t.delayed
        ));
    }

    // Heal everything and judge the final state.
    let healed_at = shared.now_us();
    links.heal()?;
    reap(&cluster, shared);
    {
        let mut c = cluster.lock().expect("cluster lock");
        c.heal()?;
        notes.push(format!(
            "peer process starts over the run: {}",
            c.total_starts()
        ));
    }
    let deadline = Instant::now() + HEAL_WITHIN;
    let Some(leader) = wait_for_leader(&mut status, HEAL_WITHIN) else {
        final_exits(&cluster, shared)?;
        return Err(format!(
            "no leader within {} s after healing",
            HEAL_WITHIN.as_secs()
        ));
    };
    notes.push(format!(
        "healed at {:.3} s; node {leader} leads at {:.3} s",
        secs(healed_at),
        secs(shared.now_us())
    ));
    let final_log = final_reads(&peers, keys.as_ref(), shared, &cluster, deadline, notes)?;
    converge(
        &mut status,
        final_log.len() as u64,
        &cluster,
        shared,
        deadline,
        notes,
    )?;
    final_exits(&cluster, shared)?;
    Ok(final_log)
}

/// Notes peers that exited on their own since the last look.
fn reap(cluster: &Mutex<Cluster>, shared: &Shared) -> usize {
    let exits = cluster.lock().expect("cluster lock").reap_exited();
    let at = secs(shared.now_us());
    let mut all = shared.peer_exits.lock().expect("exits lock");
    for (id, what) in &exits {
        eprintln!("chaos: node {id} exited on its own at {at:.3} s: {what}");
        all.push(format!("node {id} at {at:.3} s: {what}"));
    }
    exits.len()
}

/// After healing nobody may exit: that ends the run.
fn final_exits(cluster: &Mutex<Cluster>, shared: &Shared) -> Result<(), String> {
    if reap(cluster, shared) == 0 {
        return Ok(());
    }
    let all = shared.peer_exits.lock().expect("exits lock");
    Err(format!(
        "peers exited on their own, the last after healing: {}",
        all.join("; ")
    ))
}

fn progress_line(shared: &Shared, elapsed: Duration) -> String {
    let fault = shared.fault.lock().expect("fault lock").clone();
    format!(
        "{:>5.1}s ops={} ok={} unknown={} failed={} faults={} {}",
        elapsed.as_secs_f64(),
        shared.next_op.load(Ordering::Relaxed),
        shared.ok.load(Ordering::Relaxed),
        shared.unknown.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        shared.fault_rounds.load(Ordering::Relaxed),
        if fault.is_empty() {
            "(healthy)".to_string()
        } else {
            fault
        }
    )
}

/// Reads the whole log once through every peer: the peer is asked first, and points at the
/// leader (or is it); then a fresh client reads the whole log, answered by whoever leads. Each
/// read is recorded as an operation of the history, so the checker holds it to the same rules
/// (it must contain every acknowledged append, for one). The final log is the last read.
fn final_reads(
    peers: &BTreeMap<NodeId, SocketAddr>,
    keys: Option<&Arc<Keys>>,
    shared: &Shared,
    cluster: &Mutex<Cluster>,
    deadline: Instant,
    notes: &mut Vec<String>,
) -> Result<Vec<LogRecord>, String> {
    let mut last: Option<Vec<LogRecord>> = None;
    let mut seen = Vec::new();
    for (k, (&id, &addr)) in peers.iter().enumerate() {
        let who = FINAL_READ_CLIENT + k as u32;
        let points_at = loop {
            final_exits(cluster, shared)?;
            match first_hop(id, addr, keys) {
                Some(ClientResult::Entries { .. }) => break format!("node {id} leads"),
                Some(ClientResult::NotLeader { leader: Some(l) }) => {
                    break format!("node {id} points at {l}")
                }
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "node {id} named no leader within {} s of healing",
                        HEAL_WITHIN.as_secs()
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        loop {
            final_exits(cluster, shared)?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "the final read through node {id} did not succeed within {} s of healing",
                    HEAL_WITHIN.as_secs()
                ));
            }
            let mut client =
                Client::with_keys(peers.clone(), Duration::from_secs(5), keys.cloned())
                    .map_err(|e| format!("final read client: {e}"))?;
            match shared.query(who, &mut client) {
                (Outcome::Read { len, .. }, Some(records)) => {
                    seen.push(format!(
                        "{points_at}, read {len} records from node {}",
                        client.last_peer().unwrap_or(0)
                    ));
                    last = Some(records);
                    break;
                }
                (other, _) => {
                    notes.push(format!("final read through node {id} failed: {other:?}"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    notes.push(format!("final reads: {}", seen.join("; ")));
    Ok(last.unwrap_or_default())
}

/// Sends one query straight to peer `peer` (sealed with `keys`, if given); its answer, if any
/// within a second.
fn first_hop(peer: NodeId, addr: SocketAddr, keys: Option<&Arc<Keys>>) -> Option<ClientResult> {
    let local = if addr.ip().is_loopback() {
        Ipv4Addr::LOCALHOST
    } else {
        Ipv4Addr::UNSPECIFIED
    };
    let socket = UdpSocket::bind((local, 0)).ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let id = u64::from(std::process::id()) << 20 | u64::from(addr.port());
    let request = Datagram::Request(ClientRequest {
        id,
        op: ClientOp::Query {
            start: 1,
            read_index: None,
        },
    })
    .encode()
    .ok()?;
    let mut auth = match keys {
        Some(keys) => Some(ClientAuth::new(Arc::clone(keys), [peer]).ok()?),
        None => None,
    };
    let send = |auth: &mut Option<ClientAuth>| match auth {
        None => socket.send_to(&request, addr).map(|_| ()),
        Some(auth) => {
            let mut out = auth::with_room(&request);
            auth.seal_request(peer, &mut out, |b| socket.send_to(b, addr).map(|_| ()))
        }
    };
    let mut buf = vec![0u8; MAX_DATAGRAM + auth::OVERHEAD + 1];
    let until = Instant::now() + Duration::from_secs(1);
    send(&mut auth).ok()?;
    while Instant::now() < until {
        let Ok((n, _)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let body = match &mut auth {
            None => &buf[..n],
            Some(a) => match a.open(&buf[..n]) {
                Ok(FromPeer::Reply { body, .. }) => body,
                Ok(FromPeer::Notice { .. }) => {
                    // The peer does not know this session yet: its epoch is known now.
                    send(&mut auth).ok()?;
                    continue;
                }
                Err(_) => continue,
            },
        };
        if let Ok(Datagram::Reply(reply)) = Datagram::decode(body) {
            if reply.id == id {
                return Some(reply.result);
            }
        }
    }
    None
}

/// Waits until every peer reports the same commit index (at least `at_least`), fully applied.
fn converge(
    status: &mut Client,
    at_least: u64,
    cluster: &Mutex<Cluster>,
    shared: &Shared,
    deadline: Instant,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    loop {
        final_exits(cluster, shared)?;
        let statuses = status.status();
        let infos: Vec<_> = statuses.iter().filter_map(|s| s.info.clone()).collect();
        let seen: Vec<String> = statuses
            .iter()
            .map(|s| match &s.info {
                None => format!("{}: no answer", s.id),
                Some(i) => format!(
                    "{}: {:?} term {} commit {} applied {} last {}",
                    i.id, i.role, i.term, i.commit_index, i.applied_index, i.last_index
                ),
            })
            .collect();
        let last_seen = seen.join("; ");
        let converged = infos.len() == statuses.len()
            && infos.iter().all(|i| {
                i.commit_index == infos[0].commit_index
                    && i.applied_index == i.commit_index
                    && i.commit_index >= at_least
            });
        if converged {
            notes.push(format!("statuses converged: {last_seen}"));
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "peers' statuses did not converge to one commit index within {} s of healing: {last_seen}",
                HEAL_WITHIN.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
