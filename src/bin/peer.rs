//! `peer -p CONFIG`: runs one Raft peer until SIGINT or SIGTERM.

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
    raft::peer::run(config, shutdown_rx)
}
