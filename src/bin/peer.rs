//! `peer -p CONFIG [--join | --force-new-cluster | --restore FILE]`: runs one Raft peer until SIGINT or SIGTERM,
//! or until a committed configuration removes it (exit status 0).

use argh::FromArgs;
use raft::config::PeerConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Run one peer of a Raft cluster, as described by its JSON config.
#[derive(FromArgs)]
struct Args {
    /// this peer's JSON config (default: peers/peer1.json)
    #[argh(option, short = 'p', default = "PathBuf::from(\"peers/peer1.json\")")]
    path: PathBuf,

    /// join an existing cluster: with an empty data_dir, start with no members, never
    /// campaign, and take the cluster ID and configuration from the first leader that
    /// replicates to this peer (add it with `client add-learner`); `other_peers` are only
    /// contact points. Without it an empty data_dir bootstraps a new cluster from
    /// `other_peers`. Ignored once the data_dir has a `cluster` file.
    #[argh(switch)]
    join: bool,

    /// recover from the loss of a majority for good: on an existing data_dir, make this peer
    /// the only voter of its cluster (a configuration entry it commits alone), keep its whole
    /// log, and lead; add members back with `client add-learner` and `promote`. Entries only
    /// the lost peers had are lost. Pick the survivor with the highest last index.
    #[argh(switch)]
    force_new_cluster: bool,

    /// with an empty data_dir, first restore a backup made by `client snapshot save`: the
    /// file is verified (a corrupt or truncated one is refused, nothing written) and becomes
    /// a NEW cluster (new cluster ID, members from this config) whose committed log is the
    /// backup's. Restore every peer of the new cluster from the same file.
    #[argh(option)]
    restore: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let config = PeerConfig::load(&args.path)?;
    let (shutdown_tx, shutdown_rx) = crossbeam_channel::unbounded();
    // With the `termination` feature this handles SIGTERM (and SIGHUP) as well as SIGINT.
    ctrlc::set_handler(move || {
        let _ = shutdown_tx.send(());
    })
    .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    let chosen = [
        ("--join", args.join),
        ("--force-new-cluster", args.force_new_cluster),
        ("--restore", args.restore.is_some()),
    ];
    let chosen: Vec<&str> = chosen.iter().filter(|c| c.1).map(|c| c.0).collect();
    if chosen.len() > 1 {
        return Err(format!("{} exclude each other", chosen.join(" and ")));
    }
    let options = raft::peer::Options {
        join: args.join,
        force_new_cluster: args.force_new_cluster,
        restore: args.restore.clone(),
    };
    raft::peer::run_with(config, options, shutdown_rx)
}
