//! `client snapshot save FILE`: a consistent backup of the committed log (with the client
//! sessions, users and membership), taken at a linearizable read index while writes go on ([`raft::backup`] has the file format). Prints
//! `{"index":N,"term":T,"bytes":B,"file":"FILE"}`; on a terminal, a progress line meanwhile.

use argh::FromArgs;
use raft::backup;
use raft::client::{Client, ClientError};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(FromArgs)]
/// Backups of the cluster's committed log (admin).
#[argh(subcommand, name = "snapshot")]
pub struct SnapshotArgs {
    #[argh(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum SnapshotCommand {
    Save(SaveArgs),
}

#[derive(FromArgs)]
/// Save the committed log, as of now (a linearizable read index), to FILE, atomically and
/// with a checksum; restore it with `peer -p CONFIG --restore FILE`. Prints
/// {"index":N,"term":T,"bytes":B,"file":"FILE"}. --timeout-ms limits each page.
#[argh(subcommand, name = "save")]
pub struct SaveArgs {
    /// where to write the backup
    #[argh(positional)]
    pub file: PathBuf,
}

/// Runs `snapshot save`; the outcome as the client's other subcommands report it.
pub fn save(
    client: &mut Client,
    cluster: &str,
    args: &SaveArgs,
) -> Result<backup::Saved, ClientError> {
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut shown = Instant::now();
    let saved = backup::save(client, cluster, &args.file, |done, of| {
        if terminal && shown.elapsed() >= Duration::from_millis(250) {
            shown = Instant::now();
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\rsaving {}: {done} of {of} entries, {} s",
                args.file.display(),
                started.elapsed().as_secs()
            );
            let _ = err.flush();
        }
    });
    if terminal && started.elapsed() >= Duration::from_millis(250) {
        eprintln!();
    }
    saved
}
