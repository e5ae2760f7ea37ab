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
use crate::storage::fs::Fs;
use crate::storage::store::Store;
use crate::storage::wal::Wal;
use std::path::{Path, PathBuf};

/// Restores `file` into the data dir of `config`, or explains why not (nothing written then).
pub fn restore(config: &PeerConfig, file: &Path) -> Result<(), String> {
    restore_in(&Fs::Real, config, file)
}

/// [`restore`] into a data dir on filesystem `fs` (the backup is read from the real one).
/// Durable when it returns: the renamed data dir's parent is synced.
pub fn restore_in(fs: &Fs, config: &PeerConfig, file: &Path) -> Result<(), String> {
    let dir = &config.data_dir;
    let refuse = |why: String| {
        format!(
            "{}: --restore {}: {why}; nothing was written",
            config.name,
            file.display()
        )
    };
    if let Some(entry) = first_entry(fs, dir).map_err(&refuse)? {
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
    let exists = |path: &Path| {
        fs.try_exists(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    if exists(&building).map_err(&refuse)? {
        // Left by a restore that stopped midway: ours to remove.
        fs.remove_dir_all(&building)
            .map_err(|e| refuse(format!("cannot remove {}: {e}", building.display())))?;
    }
    let result = build(fs, config, file, &verified, &building);
    if let Err(e) = result {
        let _ = fs.remove_dir_all(&building);
        return Err(refuse(e));
    }
    // An empty data dir (checked above) is replaced by the rename, which refuses a non-empty
    // one: nothing that appeared there meanwhile is lost.
    fs.rename(&building, dir).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            building.display(),
            dir.display()
        )
    })?;
    // Until the parent is synced, a power cut can take the rename back: the peer would then
    // bootstrap an empty cluster where it acknowledged writes on the restored one.
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs.sync_dir(parent)
        .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
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
fn first_entry(fs: &Fs, dir: &Path) -> Result<Option<String>, String> {
    match fs.list(dir) {
        Ok(entries) => Ok(entries
            .into_iter()
            .next()
            .map(|(name, _)| format!("{name:?}"))),
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
    fs: &Fs,
    config: &PeerConfig,
    file: &Path,
    verified: &backup::Verified,
    into: &Path,
) -> Result<(), String> {
    let storage = |e: crate::storage::StorageError| e.to_string();
    let (mut wal, _, _) = Wal::open_in(fs, into, config.node_id).map_err(storage)?;
    let (mut store, _) = Store::open_in(fs, into).map_err(storage)?;
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
    file.write_in(fs, into)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::simfs::SimFs;
    use crate::storage::Disk;

    const CONFIG: &str = r#"{ "name": "peer01", "node_ID": 1, "host": "127.0.0.1", "port": 3000,
        "other_peers": [ {"node_ID": 2, "host": "127.0.0.1", "port": 3001} ] }"#;

    #[test]
    fn a_restored_data_dir_survives_a_power_cut_once_the_restore_returned() {
        let backup =
            std::env::temp_dir().join(format!("raft-restore-power-cut-{}", std::process::id()));
        crate::backup::tests::write_with(&backup, 40, 3, |_| {});
        let sim = SimFs::new(7);
        let fs = Fs::Sim(sim.clone());
        let mut config = PeerConfig::parse(CONFIG).unwrap();
        config.data_dir = PathBuf::from("/peers/one/data");
        restore_in(&fs, &config, &backup).unwrap();
        std::fs::remove_file(&backup).unwrap();
        sim.power_cut();
        let file = ClusterFile::load_in(&fs, &config.data_dir)
            .unwrap()
            .expect("the cluster file survives");
        assert!(file.name.starts_with("raft/restored-"), "{}", file.name);
        let (disk, restored) = Disk::open_in(&fs, &config.data_dir, 1, 0, 0).unwrap();
        let (state, _) = restored.snapshot.expect("the snapshot survives");
        assert_eq!((state.index, state.term), (40, 14));
        assert_eq!(restored.base, (40, 14), "the WAL continues from it");
        assert_eq!(restored.hard_state.commit, 40);
        drop(disk);
        // Refused, nothing touched, on the now non-empty data dir.
        crate::backup::tests::write_with(&backup, 3, 3, |_| {});
        let refused = restore_in(&fs, &config, &backup).unwrap_err();
        std::fs::remove_file(&backup).unwrap();
        assert!(refused.contains("is not empty"), "{refused}");
        assert_eq!(
            ClusterFile::load_in(&fs, &config.data_dir).unwrap(),
            Some(file)
        );
    }
}
