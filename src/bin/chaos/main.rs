//! `chaos`: a Jepsen-style fault-injection run against real peer processes, with a
//! linearizability check of the history. See [`run`] for how a run goes.
//!
//! Exit status: 0 the history is linearizable, 1 a violation (the first violating operation
//! and the command that repeats the run are printed), 2 bad arguments, 3 the run could not be
//! done (peers would not start, no leader after healing, network namespaces cannot be made
//! for `--netns`, ...).

use argh::FromArgs;
mod checker;
mod cluster;
mod history;
mod nemesis;
mod netns;
mod proxy;
mod run;

use nemesis::FaultKind;
use netns::NetnsConfig;
use run::{Options, RunOutcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Run a Raft cluster under faults and check that its history is linearizable.
#[derive(FromArgs)]
struct Args {
    /// peers to run: 3 or 5 (default 3)
    #[argh(option, default = "3")]
    nodes: usize,
    /// seconds of workload under faults (default 60)
    #[argh(option, default = "60")]
    duration: u64,
    /// crash, killall, pause, partition, loss, dup, delay, membership (remove a member and
    /// add it back, or transfer leadership), mixed (all of them; with --netns all but loss,
    /// dup, delay and membership) or none; several may be given comma-separated (default
    /// mixed)
    #[argh(option, default = "String::from(\"mixed\")")]
    faults: String,
    /// seed of the fault schedule and of the workload's choices (default 1)
    #[argh(option, default = "1")]
    seed: u64,
    /// concurrent clients (default 4)
    #[argh(option, default = "4")]
    clients: usize,
    /// each client operation's deadline in milliseconds (default 1000)
    #[argh(option, default = "1000")]
    client_timeout_ms: u64,
    /// longest pause of a client between operations, in milliseconds (default 20)
    #[argh(option, default = "20")]
    think_ms: u64,
    /// percentage of operations that are queries (default 20)
    #[argh(option, default = "20")]
    query_percent: u64,
    /// percentage of operations sent through a client that knows only one (random) peer,
    /// which answers only while it believes it leads (default 5)
    #[argh(option, default = "5")]
    pinned_percent: u64,
    /// folder for the history, the report, and the peers' configs, logs and data
    /// (default: a new folder in the temporary directory)
    #[argh(option)]
    out: Option<PathBuf>,
    /// keep the peers' data directories after a valid run
    #[argh(switch)]
    keep_data: bool,
    /// run the peers without a secret_file (by default a fresh cluster secret encrypts and
    /// authenticates every datagram; with --netns the peers then get "insecure": true)
    #[argh(switch)]
    no_auth: bool,
    /// the peers' snapshot_entries (default: the peers' default, 10,000); small values make
    /// snapshots, compaction and InstallSnapshot happen under every fault
    #[argh(option)]
    snapshot_entries: Option<u64>,
    /// the peer binary (default: `peer` next to this binary)
    #[argh(option)]
    peer_bin: Option<PathBuf>,
    /// only re-check the history saved in this run folder, and exit
    #[argh(option)]
    check: Option<PathBuf>,
    /// run each peer in a network namespace of its own (needs root and iproute2) and make
    /// partitions on their links instead of in proxies; loss, dup and delay are not available
    #[argh(switch)]
    netns: bool,
    /// with --netns: namespaces PREFIX1..N, bridge PREFIXbr (default rchaos)
    #[argh(option, default = "String::from(netns::DEFAULT_PREFIX)")]
    netns_prefix: String,
    /// with --netns: the private /24 of the peers' addresses, as three octets (default
    /// 10.213.11)
    #[argh(option, default = "String::from(netns::DEFAULT_SUBNET)")]
    netns_subnet: String,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Some(dir) = &args.check {
        return recheck(dir);
    }
    let opts = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(cfg) = &opts.netns {
        if let Err(why) = netns::probe(cfg) {
            eprintln!("error: chaos --netns: network namespaces cannot be used here: {why}");
            println!("valid=unknown ops=0 faults=none");
            return ExitCode::from(3);
        }
    }
    let dir = match run::run_folder(&opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            println!("valid=unknown ops=0 faults=none");
            return ExitCode::from(3);
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C ends the workload early; the cluster is still healed, read and checked.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
    }
    let outcome = run::run(&opts, &dir, interrupted);
    ExitCode::from(outcome.exit_code() as u8)
}

/// Like `argh::from_env`, but a usage error exits with 2, not 1 (which means a violation).
fn parse_args() -> Result<Args, ExitCode> {
    let strings: Vec<String> = std::env::args().collect();
    let cmd = strings.first().map_or("chaos", |s| s.as_str());
    let cmd = std::path::Path::new(cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("chaos");
    let rest: Vec<&str> = strings.iter().skip(1).map(|s| s.as_str()).collect();
    Args::from_args(&[cmd], &rest).map_err(|early| match early.status {
        Ok(()) => {
            println!("{}", early.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            eprintln!("{}\nRun {cmd} --help for more information.", early.output);
            ExitCode::from(2)
        }
    })
}

fn options(args: &Args) -> Result<Options, String> {
    if !(3..=9).contains(&args.nodes) {
        return Err("--nodes must be 3 to 9 (3 or 5 are the usual)".into());
    }
    if args.clients == 0 || args.clients > 64 {
        return Err("--clients must be 1 to 64".into());
    }
    if args.query_percent > 100 || args.pinned_percent > 100 {
        return Err("--query-percent and --pinned-percent must be 0 to 100".into());
    }
    if args.client_timeout_ms < 100 {
        return Err("--client-timeout-ms must be at least 100".into());
    }
    let netns = if args.netns {
        let mut cfg = NetnsConfig::new(&args.netns_prefix, &args.netns_subnet)?;
        cfg.snapshot_entries = args.snapshot_entries;
        Some(cfg)
    } else if args.netns_prefix != netns::DEFAULT_PREFIX
        || args.netns_subnet != netns::DEFAULT_SUBNET
    {
        return Err("--netns-prefix and --netns-subnet need --netns".into());
    } else {
        None
    };
    let peer_exe = match &args.peer_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this binary: {e}"))?
            .with_file_name("peer"),
    };
    Ok(Options {
        nodes: args.nodes,
        duration: Duration::from_secs(args.duration),
        faults_arg: args.faults.clone(),
        faults: FaultKind::parse_list(&args.faults, args.netns)?,
        seed: args.seed,
        clients: args.clients,
        client_timeout: Duration::from_millis(args.client_timeout_ms),
        think: Duration::from_millis(args.think_ms),
        query_ratio: args.query_percent as f64 / 100.0,
        pinned_ratio: args.pinned_percent as f64 / 100.0,
        out: args.out.clone(),
        keep_data: args.keep_data,
        peer_exe,
        auth: !args.no_auth,
        snapshot_entries: args.snapshot_entries,
        netns,
    })
}

fn recheck(dir: &std::path::Path) -> ExitCode {
    match run::recheck(dir) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
        Ok((verdict, record)) => {
            let outcome = if verdict.valid() {
                RunOutcome::Valid
            } else {
                RunOutcome::Violation
            };
            for v in verdict.violations.iter().take(20) {
                println!("[{}] {}", v.kind, v.message);
            }
            println!("{}", run::summary_line(&record, Some(&verdict), &outcome));
            ExitCode::from(outcome.exit_code() as u8)
        }
    }
}
