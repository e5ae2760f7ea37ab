//! The `cluster` file in a peer's data directory: which cluster the directory belongs to (its
//! ID, 16 hex digits) and the bootstrap membership, the configuration in force until the log
//! has a configuration entry.
//!
//! The config file's `other_peers` is used once: to bootstrap an empty data directory, which
//! writes this file. Every later start takes the bootstrap membership from here, and the
//! configurations from the log, so editing the JSON cannot change who the members are. A peer
//! started with `--join` writes the file when the first AppendEntries tells it the cluster ID;
//! its bootstrap membership is empty (it learns every configuration from the log).

use crate::config::PeerConfig;
use crate::raft::{Index, Membership, Term};
use crate::storage::fs::{write_atomically, Fs};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::Path;

/// The file's name in the data directory.
pub const CLUSTER_FILE: &str = "cluster";

/// What the `cluster` file records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFile {
    /// The cluster ID every peer message carries ([`Membership::cluster_id`]).
    pub id: u64,
    /// The cluster name it was computed with (the config's `cluster`).
    pub name: String,
    /// The configuration in force before the log has one; empty for a peer that joined.
    pub bootstrap: Membership,
    /// Whether this peer joined an existing cluster (`--join`) rather than bootstrapping it.
    pub joined: bool,
    /// A joined peer votes only once its log reaches this index: where its leader's log stood
    /// when it first reached this peer (`raft::node::vote_floor_from`), with that
    /// AppendEntries' term. Index 0: no floor (any more).
    pub vote_floor: (Index, Term),
    /// The first vote floor of a joined peer, kept for good: removals of its ID up to there
    /// removed an earlier server (`raft::Config::started_over`). (0, 0) for a bootstrapped one.
    pub started_over: (Index, Term),
}

/// The file's JSON form.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    cluster_id: String,
    name: String,
    joined: bool,
    bootstrap: Membership,
    #[serde(default, skip_serializing_if = "is_zero")]
    vote_floor: Index,
    #[serde(default, skip_serializing_if = "is_zero")]
    vote_floor_term: Term,
    #[serde(default, skip_serializing_if = "is_zero")]
    started_over: Index,
    #[serde(default, skip_serializing_if = "is_zero")]
    started_over_term: Term,
}

fn is_zero(i: &Index) -> bool {
    *i == 0
}

/// How a peer starts, as its data directory and `--join` decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// The directory belongs to this cluster (just bootstrapped, or from an earlier start).
    Member(ClusterFile),
    /// `--join` on an empty directory: no cluster yet; the first AppendEntries names it.
    Joining,
}

impl ClusterFile {
    /// The file an empty data directory is bootstrapped with from `config`.
    pub fn bootstrap(config: &PeerConfig) -> ClusterFile {
        let bootstrap = config.initial_membership();
        ClusterFile {
            id: bootstrap.cluster_id(&config.cluster),
            name: config.cluster.clone(),
            bootstrap,
            joined: false,
            vote_floor: (0, 0),
            started_over: (0, 0),
        }
    }

    /// The file a joining peer writes once the leader tells it the cluster's ID.
    pub fn joined(config: &PeerConfig, id: u64, vote_floor: (Index, Term)) -> ClusterFile {
        ClusterFile {
            id,
            name: config.cluster.clone(),
            bootstrap: Membership::default(),
            joined: true,
            vote_floor,
            started_over: vote_floor,
        }
    }

    /// Reads `dir/cluster`; `None` if there is none. A file that does not parse, or whose ID
    /// does not match its bootstrap membership, is an error naming the file.
    pub fn load(dir: &Path) -> Result<Option<ClusterFile>, String> {
        ClusterFile::load_in(&Fs::Real, dir)
    }

    /// [`ClusterFile::load`] on filesystem `fs`.
    pub fn load_in(fs: &Fs, dir: &Path) -> Result<Option<ClusterFile>, String> {
        let path = dir.join(CLUSTER_FILE);
        let text = match fs.read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        ClusterFile::parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<ClusterFile, String> {
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| format!("not a cluster file: {e}"))?;
        let id = (raw.cluster_id.len() == 16)
            .then(|| u64::from_str_radix(&raw.cluster_id, 16).ok())
            .flatten()
            .ok_or_else(|| {
                format!(
                    "field `cluster_id`: {:?} is not 16 hex digits",
                    raw.cluster_id
                )
            })?;
        if id == 0 {
            return Err("field `cluster_id`: 0 is not a cluster ID".into());
        }
        let file = ClusterFile {
            id,
            name: raw.name,
            bootstrap: Membership::new(raw.bootstrap.members),
            joined: raw.joined,
            vote_floor: (raw.vote_floor, raw.vote_floor_term),
            started_over: (raw.started_over, raw.started_over_term),
        };
        // A bootstrapped cluster's ID is its bootstrap membership's fingerprint: a mismatch
        // means the file was edited or damaged, and this peer would talk to the wrong cluster.
        if !file.joined && file.bootstrap.cluster_id(&file.name) != id {
            return Err(format!(
                "cluster ID {id:016x} does not match the bootstrap membership {} under the name {:?}; the file was edited or damaged",
                file.bootstrap.describe(),
                file.name
            ));
        }
        Ok(file)
    }

    /// Writes `dir/cluster` atomically and durably.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        self.write_in(&Fs::Real, dir)
    }

    /// [`ClusterFile::write`] on filesystem `fs`.
    pub fn write_in(&self, fs: &Fs, dir: &Path) -> Result<(), String> {
        let raw = Raw {
            cluster_id: format!("{:016x}", self.id),
            name: self.name.clone(),
            joined: self.joined,
            bootstrap: self.bootstrap.clone(),
            vote_floor: self.vote_floor.0,
            vote_floor_term: self.vote_floor.1,
            started_over: self.started_over.0,
            started_over_term: self.started_over.1,
        };
        let mut text = serde_json::to_string_pretty(&raw)
            .map_err(|e| format!("cannot encode {CLUSTER_FILE}: {e}"))?;
        text.push('\n');
        Ok(write_atomically(fs, dir, CLUSTER_FILE, text.as_bytes())?)
    }
}

/// The name a cluster restored from a backup records (`peer --restore`): the config's name
/// and a tag from the backup's checksum, so that its ID is new, and the same on every peer
/// restored from that backup.
pub fn restored_name(cluster: &str, tag: &str) -> String {
    format!("{cluster}/restored-{tag}")
}

/// Decides how the peer of `config` starts, given whether its log is empty and `--join`:
/// bootstraps an empty directory (writing the `cluster` file) unless joining, and otherwise
/// reads the file. Call it with the data directory locked (after `Wal::open`).
pub fn prepare(config: &PeerConfig, join: bool, log_is_empty: bool) -> Result<Start, String> {
    let dir = &config.data_dir;
    match ClusterFile::load(dir)? {
        Some(file) => {
            if join {
                log::info!(
                    "{}: --join, but {} already names cluster {:016x}: starting as its member",
                    config.name,
                    dir.join(CLUSTER_FILE).display(),
                    file.id
                );
            }
            let initial = config.initial_membership();
            let named = file.name == config.cluster
                || file.name.starts_with(&restored_name(&config.cluster, ""));
            if !file.joined && (file.bootstrap != initial || !named) {
                log::info!(
                    "{}: the config file's members {} (cluster {:?}) differ from the bootstrap membership {} (cluster {:?}) recorded in {}; the configuration in the log decides who the members are",
                    config.name,
                    initial.describe(),
                    config.cluster,
                    file.bootstrap.describe(),
                    file.name,
                    dir.join(CLUSTER_FILE).display()
                );
            }
            Ok(Start::Member(file))
        }
        None if join => {
            if !log_is_empty {
                return Err(format!(
                    "{}: --join with data dir {}, which has a log but no {CLUSTER_FILE} file: a peer joins with an empty data dir",
                    config.name,
                    dir.display()
                ));
            }
            log::info!(
                "{}: joining: no configuration yet; waiting for a leader's AppendEntries (contact points {:?})",
                config.name,
                config.peer_ids()
            );
            Ok(Start::Joining)
        }
        None => {
            let file = ClusterFile::bootstrap(config);
            file.write(dir)?;
            let how = if log_is_empty {
                "bootstrapped"
            } else {
                "recorded (the log predates cluster files)"
            };
            log::info!(
                "{}: cluster {:016x} {how} with members {}",
                config.name,
                file.id,
                file.bootstrap.describe()
            );
            Ok(Start::Member(file))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(name: &str, other_port: u16) -> (PeerConfig, Dir) {
        let dir = std::env::temp_dir().join(format!(
            "raft-cluster-file-{name}-{}-{}",
            std::process::id(),
            crate::auth::fresh_epoch()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = PeerConfig::parse(&format!(
            r#"{{"name":"p1","node_ID":1,"host":"127.0.0.1","port":3000,
                "other_peers":[{{"node_ID":2,"host":"127.0.0.1","port":{other_port}}}]}}"#
        ))
        .unwrap();
        c.data_dir = dir.clone();
        (c, Dir(dir))
    }

    #[test]
    fn an_empty_dir_is_bootstrapped_once_and_the_file_wins_afterwards() {
        let (c, _d) = config("bootstrap", 3001);
        let Start::Member(first) = prepare(&c, false, true).unwrap() else {
            panic!("not bootstrapped")
        };
        assert_eq!(first.bootstrap, c.initial_membership());
        assert_eq!(first.id, c.initial_membership().cluster_id("raft"));
        assert!(!first.joined);
        let text = std::fs::read_to_string(c.data_dir.join(CLUSTER_FILE)).unwrap();
        assert!(text.contains(&format!("{:016x}", first.id)), "{text}");
        // A later start with other members in the JSON keeps the recorded ones.
        let mut edited = c.clone();
        edited.other_peers[0].port = 4000;
        assert_eq!(
            prepare(&edited, false, false),
            Ok(Start::Member(first.clone()))
        );
        // --join on a bootstrapped dir starts normally.
        assert_eq!(prepare(&edited, true, false), Ok(Start::Member(first)));
    }

    #[test]
    fn a_joining_peer_records_the_cluster_it_adopts() {
        let (c, _d) = config("join", 3001);
        assert_eq!(prepare(&c, true, true), Ok(Start::Joining));
        assert_eq!(
            ClusterFile::load(&c.data_dir),
            Ok(None),
            "nothing written yet"
        );
        let adopted = ClusterFile::joined(&c, 0x0123_4567_89ab_cdef, (42, 3));
        adopted.write(&c.data_dir).unwrap();
        let Start::Member(again) = prepare(&c, true, false).unwrap() else {
            panic!("the adopted cluster was not kept")
        };
        assert_eq!(again, adopted);
        assert!(again.joined && again.bootstrap.members.is_empty());
        // Without --join it is the same: the file decides.
        assert_eq!(prepare(&c, false, false), Ok(Start::Member(adopted)));
    }

    #[test]
    fn joining_with_a_log_but_no_cluster_file_is_refused() {
        let (c, _d) = config("join-log", 3001);
        let e = prepare(&c, true, false).unwrap_err();
        assert!(e.contains("--join") && e.contains(CLUSTER_FILE), "{e}");
    }

    #[test]
    fn a_corrupt_or_edited_cluster_file_is_an_error_naming_it() {
        let (c, _d) = config("corrupt", 3001);
        let path = c.data_dir.join(CLUSTER_FILE);
        for bad in [
            "",
            "garbage",
            "{}",
            r#"{"cluster_id":"xyz","name":"raft","joined":true,"bootstrap":{"members":[]}}"#,
            r#"{"cluster_id":"0000000000000000","name":"raft","joined":true,"bootstrap":{"members":[]}}"#,
            r#"{"cluster_id":"0123456789abcdef","name":"raft","joined":false,"bootstrap":{"members":[]}}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = prepare(&c, false, false).unwrap_err();
            assert!(e.contains(&path.display().to_string()), "{bad:?}: {e}");
        }
    }
}
