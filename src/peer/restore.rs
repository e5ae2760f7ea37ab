//! `peer --restore FILE`: a new cluster from a backup ([`crate::backup`]).
//!
//! Only into an empty (or missing) `data_dir`, and only from a backup that reads back whole
//! with its checksum: anything else is refused before a byte is written. The data dir is built
//! beside the target and renamed into place at the end, so a failure midway leaves nothing.
//! It holds the backup's records in the store with a snapshot at the backup's index (the
//! configuration: the config's bootstrap members; the backup's client sessions and users), a
//! WAL that continues from that snapshot, and a `cluster` file with a new cluster ID derived
//! from the backup's checksum: every peer restored from the same file joins the same new
//! cluster, and none of the old cluster's peers is heard.
//! Users' keys derive from the secret and the config's `cluster` name, not the cluster ID, so
//! their credentials keep working when the config keeps both.

use crate::backup;
use crate::cluster::{self, ClusterFile};
use crate::config::PeerConfig;
use crate::raft::{HardState, Membership, SnapshotState};
use crate::storage::store::Store;
use crate::storage::wal::Wal;
use std::path::{Path, PathBuf};

/// Restores `file` into the data dir of `config`, or explains why not (nothing written then).
pub fn restore(config: &PeerConfig, file: &Path) -> Result<(), String> {
    let dir = &config.data_dir;
    let refuse = |why: String| {
        format!(
            "{}: --restore {}: {why}; nothing was written",
            config.name,
            file.display()
        )
    };
    if let Some(entry) = first_entry(dir).map_err(&refuse)? {
        return Err(refuse(format!(
            "data_dir {} is not empty (it holds {entry}); restore into an empty or missing data_dir",
            dir.display()
        )));
    }
    let verified = backup::read(file, |_| Ok(())).map_err(&refuse)?;
    let h = &verified.header;
    log::info!(
        "{}: backup {} of cluster {:?} verified: {} entries up to index {} (term {}), BLAKE3 {}",
        config.name,
        file.display(),
        h.cluster,
        h.records,
        h.index,
        h.term,
        verified.blake3
    );
    let recorded = match &verified.configuration {
        Some(c) => format!(
            "members {} (the configuration of index {}), {} client sessions and {} users{}",
            Membership::new(c.members.clone()).describe(),
            c.config_index,
            verified.sessions.len(),
            verified.users.len(),
            if h.version < 3 {
                " (a version 2 backup: users are not in it)"
            } else {
                ""
            }
        ),
        None => "no members, client sessions or users (a version 1 backup)".into(),
    };
    log::info!(
        "{}: the backup recorded {recorded}; the new cluster's members come from the config",
        config.name
    );
    if h.cluster != config.cluster {
        log::warn!(
            "{}: the backup is of cluster {:?}; the restored cluster is named {:?} by the config",
            config.name,
            h.cluster,
            config.cluster
        );
        if !verified.users.is_empty() {
            log::warn!(
                "{}: the backup's {} users keep their names and roles, but their credentials work only where the config's `cluster` is {:?} (a user's key derives from that name and the secret): use that name in every peer's and client's config, or add the users again",
                config.name,
                verified.users.len(),
                h.cluster
            );
        }
    }
    if !verified.users.is_empty() && config.secret_file.is_none() {
        log::warn!(
            "{}: the backup has {} users, but the config names no secret_file: their credentials work only with the backed-up cluster's secret_file",
            config.name,
            verified.users.len()
        );
    }
    let building = beside(dir, "restoring");
    if building.exists() {
        // Left by a restore that stopped midway: ours to remove.
        std::fs::remove_dir_all(&building)
            .map_err(|e| refuse(format!("cannot remove {}: {e}", building.display())))?;
    }
    let result = build(config, file, &verified, &building);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(refuse(e));
    }
    if dir.exists() {
        // Empty (checked above): rename cannot replace a non-empty directory anyway.
        std::fs::remove_dir(dir).map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    std::fs::rename(&building, dir).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            building.display(),
            dir.display()
        )
    })?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    log::warn!(
        "{}: restored {} entries, {} client sessions and {} users (to index {}, term {}) from {} into {}: a NEW cluster with members {}",
        config.name,
        h.records,
        verified.sessions.len(),
        verified.users.len(),
        h.index,
        h.term,
        file.display(),
        dir.display(),
        config.initial_membership().describe()
    );
    Ok(())
}

/// The first thing in `dir`, if it exists and holds anything.
fn first_entry(dir: &Path) -> Result<Option<String>, String> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries
            .next()
            .map(|e| e.map_or_else(|e| e.to_string(), |e| format!("{:?}", e.file_name())))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read data_dir {}: {e}", dir.display())),
    }
}

/// `{parent}/.{name}.{what}`: on the same file system as `dir`, for an atomic rename.
fn beside(dir: &Path, what: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!(".{name}.{what}"))
}

/// Writes the restored data dir into `into`, reading the backup a second time (and checking it
/// again: it could have changed since it was verified).
fn build(
    config: &PeerConfig,
    file: &Path,
    verified: &backup::Verified,
    into: &Path,
) -> Result<(), String> {
    let storage = |e: crate::storage::StorageError| e.to_string();
    let (mut wal, _, _) = Wal::open(into, config.node_id).map_err(storage)?;
    let (mut store, _) = Store::open(into).map_err(storage)?;
    let again = backup::read(file, |page| store.append(page).map_err(|e| e.to_string()))?;
    if again != *verified {
        return Err("the backup changed while it was being restored".into());
    }
    let h = &verified.header;
    let bootstrap = config.initial_membership();
    if h.index > 0 {
        let state = SnapshotState {
            index: h.index,
            term: h.term,
            membership: bootstrap.clone(),
            config_at: (0, 0),
            removed: Vec::new(),
            // Retries of appends made before the backup are answered as they were.
            sessions: verified.sessions.clone(),
            // By name, with the index and term that added each: peers with the backed-up
            // cluster's secret and `cluster` name derive the same keys from them.
            users: verified.users.clone(),
        };
        store.write_snapshot(&state).map_err(storage)?;
        let hard_state = HardState {
            term: h.term,
            vote: None,
            commit: h.index,
        };
        wal.rotate(&hard_state, (h.index, h.term))
            .map_err(storage)?;
        wal.compact(h.index).map_err(storage)?;
    }
    // A new cluster: its ID is the bootstrap membership's fingerprint under a name that
    // carries the backup's checksum, the same on every peer restored from this file.
    let name = cluster::restored_name(&config.cluster, &verified.blake3[..16]);
    let file = ClusterFile {
        id: bootstrap.cluster_id(&name),
        name,
        bootstrap,
        joined: false,
        vote_floor: (0, 0),
        started_over: (0, 0),
    };
    file.write(into)?;
    Ok(())
}
