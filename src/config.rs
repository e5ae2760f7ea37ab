//! The per-peer JSON config, in the original project's shape, validated with errors that name
//! the file and the field.

use crate::auth::{Keys, Secret};
use crate::raft::{Member, MemberRole, Membership, NodeId};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default election timeout range, in milliseconds.
pub const DEFAULT_ELECTION_TIMEOUT_MS: (u64, u64) = (150, 300);
/// Default heartbeat interval, in milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u64 = 50;
/// Largest `election_timeout_ms` maximum accepted (an hour): anything near it is a typo, and
/// far larger values overflow tick arithmetic.
const MAX_ELECTION_TIMEOUT_MS: u64 = 3_600_000;
/// Largest `snapshot_entries` and `snapshot_trailing` accepted: far more than any log holds,
/// and far from overflowing index arithmetic.
const MAX_SNAPSHOT_ENTRIES: u64 = 1 << 40;
/// Default `snapshot_entries`: entries applied between two snapshots.
pub const DEFAULT_SNAPSHOT_ENTRIES: u64 = 10_000;
/// Default `snapshot_trailing`: entries kept in the log before a snapshot's index.
pub const DEFAULT_SNAPSHOT_TRAILING: u64 = 1_000;
/// Default cluster name, bound into every MAC.
pub const DEFAULT_CLUSTER: &str = "raft";

/// One peer's validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub node_id: NodeId,
    pub host: String,
    pub port: u16,
    pub other_peers: Vec<PeerAddr>,
    pub data_dir: PathBuf,
    pub election_timeout_ms: (u64, u64),
    pub heartbeat_ms: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The file holding the cluster secret (`secret_file`); without one, datagrams are not
    /// authenticated. Relative to the working directory, as `data_dir` is.
    pub secret_file: Option<PathBuf>,
    /// The cluster's name (`cluster`), bound into every MAC: the same secret under two names
    /// gives two clusters that cannot take each other's datagrams. Every peer and client of a
    /// cluster must use the same one.
    pub cluster: String,
    /// A snapshot is taken once this many entries were applied since the last one
    /// (`snapshot_entries`).
    pub snapshot_entries: u64,
    /// Entries kept in the log before a snapshot's index, so a follower slightly behind still
    /// gets plain AppendEntries (`snapshot_trailing`).
    pub snapshot_trailing: u64,
}

/// Another peer's identity and address.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    #[serde(rename = "node_ID")]
    pub node_id: NodeId,
    pub host: String,
    pub port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    #[serde(rename = "node_ID")]
    node_id: NodeId,
    host: String,
    port: u16,
    other_peers: Vec<PeerAddr>,
    data_dir: Option<PathBuf>,
    election_timeout_ms: Option<(u64, u64)>,
    heartbeat_ms: Option<u64>,
    metrics_addr: Option<String>,
    secret_file: Option<PathBuf>,
    cluster: Option<String>,
    snapshot_entries: Option<u64>,
    snapshot_trailing: Option<u64>,
}

impl PeerConfig {
    /// Reads and validates `path`. A relative `data_dir` is taken relative to the working
    /// directory, as the original's paths were; the default is `data/<name>`.
    pub fn load(path: &Path) -> Result<PeerConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config {}: cannot read: {e}", path.display()))?;
        PeerConfig::parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Parses and validates config text; errors name the offending field.
    pub fn parse(text: &str) -> Result<PeerConfig, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("{e}"))?;
        let election_timeout_ms = raw
            .election_timeout_ms
            .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MS);
        let heartbeat_ms = raw.heartbeat_ms.unwrap_or(DEFAULT_HEARTBEAT_MS);
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(format!(
                "field `name`: {:?} must be non-empty letters, digits, '-', '_' or '.'",
                raw.name
            ));
        }
        if raw.node_id == 0 {
            return Err("field `node_ID`: must be at least 1".into());
        }
        if raw.port == 0 {
            return Err("field `port`: must be 1-65535".into());
        }
        let mut seen = BTreeSet::new();
        for (i, p) in raw.other_peers.iter().enumerate() {
            if p.node_id == raw.node_id {
                return Err(format!(
                    "field `other_peers[{i}].node_ID`: {} is this peer's own node_ID",
                    p.node_id
                ));
            }
            if p.node_id == 0 {
                return Err(format!(
                    "field `other_peers[{i}].node_ID`: must be at least 1"
                ));
            }
            if !seen.insert(p.node_id) {
                return Err(format!(
                    "field `other_peers[{i}].node_ID`: duplicate node_ID {}",
                    p.node_id
                ));
            }
            if p.port == 0 {
                return Err(format!("field `other_peers[{i}].port`: must be 1-65535"));
            }
        }
        let (min, max) = election_timeout_ms;
        if min == 0 || min > max || max > MAX_ELECTION_TIMEOUT_MS {
            return Err(format!(
                "field `election_timeout_ms`: [{min},{max}] must be [min,max] with 0 < min <= max <= {MAX_ELECTION_TIMEOUT_MS}"
            ));
        }
        if heartbeat_ms == 0 || heartbeat_ms >= min {
            return Err(format!(
                "field `heartbeat_ms`: {heartbeat_ms} must be at least 1 and below the election minimum {min}"
            ));
        }
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| Path::new("data").join(&raw.name));
        let metrics_addr = match &raw.metrics_addr {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                format!(
                    "field `metrics_addr`: {a:?} is not an address like \"127.0.0.1:9300\": {e}"
                )
            })?),
        };
        if raw
            .secret_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("field `secret_file`: must name a file".into());
        }
        let cluster = raw.cluster.unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        if cluster.is_empty() || cluster.len() > 128 {
            return Err(format!(
                "field `cluster`: {cluster:?} must be 1 to 128 bytes"
            ));
        }
        let snapshot_entries = raw.snapshot_entries.unwrap_or(DEFAULT_SNAPSHOT_ENTRIES);
        if snapshot_entries == 0 || snapshot_entries > MAX_SNAPSHOT_ENTRIES {
            return Err(format!(
                "field `snapshot_entries`: {snapshot_entries} must be 1 to {MAX_SNAPSHOT_ENTRIES}"
            ));
        }
        let snapshot_trailing = raw.snapshot_trailing.unwrap_or(DEFAULT_SNAPSHOT_TRAILING);
        if snapshot_trailing > MAX_SNAPSHOT_ENTRIES {
            return Err(format!(
                "field `snapshot_trailing`: {snapshot_trailing} must be at most {MAX_SNAPSHOT_ENTRIES}"
            ));
        }
        Ok(PeerConfig {
            snapshot_entries,
            snapshot_trailing,
            name: raw.name,
            node_id: raw.node_id,
            host: raw.host,
            port: raw.port,
            other_peers: raw.other_peers,
            data_dir,
            election_timeout_ms,
            heartbeat_ms,
            metrics_addr,
            secret_file: raw.secret_file,
            cluster,
        })
    }

    /// The MAC keys from `secret_file` and `cluster`, or `None` if the config names no secret
    /// file (datagrams are then not authenticated). Reads the file each time: call it once, at
    /// start-up. A secret file that is missing, unreadable, accessible by others, or holds no
    /// valid key is an error naming the file.
    pub fn keys(&self) -> Result<Option<Arc<Keys>>, String> {
        let Some(path) = &self.secret_file else {
            return Ok(None);
        };
        let secret = Secret::load(path)?;
        let keys = Keys::new(&secret, &self.cluster)
            .map_err(|e| format!("secret_file {}: {e}", path.display()))?;
        Ok(Some(Arc::new(keys)))
    }

    /// Every peer's address by node ID, this one included, resolved once.
    pub fn addresses(&self) -> Result<BTreeMap<NodeId, SocketAddr>, String> {
        let mut out = BTreeMap::new();
        out.insert(self.node_id, resolve(&self.host, self.port, "host")?);
        for (i, p) in self.other_peers.iter().enumerate() {
            out.insert(
                p.node_id,
                resolve(&p.host, p.port, &format!("other_peers[{i}].host"))?,
            );
        }
        Ok(out)
    }

    /// The initial membership this file describes: this peer and `other_peers`, all voters,
    /// at `host:port` as written. Used once, to bootstrap an empty `data_dir`.
    pub fn initial_membership(&self) -> Membership {
        let me = Member {
            id: self.node_id,
            address: format!("{}:{}", self.host, self.port),
            role: MemberRole::Voter,
        };
        let others = self.other_peers.iter().map(|p| Member {
            id: p.node_id,
            address: format!("{}:{}", p.host, p.port),
            role: MemberRole::Voter,
        });
        Membership::new(std::iter::once(me).chain(others).collect())
    }

    /// The other peers' IDs, sorted.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.other_peers.iter().map(|p| p.node_id).collect();
        ids.sort_unstable();
        ids
    }
}

fn resolve(host: &str, port: u16, field: &str) -> Result<SocketAddr, String> {
    prefer_ipv4((host, port), &format!("{host:?}")).map_err(|e| format!("field `{field}`: {e}"))
}

/// Resolves a member's `host:port` (from a configuration in the log, or a client's address
/// book) to one socket address.
pub fn resolve_address(address: &str) -> Result<SocketAddr, String> {
    prefer_ipv4(address, &format!("{address:?}"))
}

/// The first IPv4 address `target` resolves to, else its first: so that "localhost" means the
/// same socket for peers and clients. `what` names it in errors.
fn prefer_ipv4(target: impl ToSocketAddrs, what: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {what}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{what} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{ "name": "peer01", "node_ID": 1, "host": "127.0.0.1", "port": 3000,
        "other_peers": [ {"node_ID": 2, "host": "127.0.0.1", "port": 3001},
                         {"node_ID": 3, "host": "localhost", "port": 3002} ] }"#;

    #[test]
    fn original_shape_parses_with_defaults() {
        let c = PeerConfig::parse(GOOD).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.data_dir, Path::new("data/peer01"));
        assert_eq!(c.election_timeout_ms, (150, 300));
        assert_eq!(c.heartbeat_ms, 50);
        assert_eq!(c.peer_ids(), vec![2, 3]);
        assert_eq!(c.addresses().unwrap().len(), 3);
        assert_eq!((c.secret_file.as_ref(), c.cluster.as_str()), (None, "raft"));
        assert_eq!(c.keys(), Ok(None), "no secret_file: unauthenticated");
    }

    #[test]
    fn a_secret_file_is_loaded_and_checked_at_start_up() {
        let dir = std::env::temp_dir().join(format!(
            "raft-config-secret-{}-{}",
            std::process::id(),
            crate::auth::fresh_epoch()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.key");
        let with = |extra: &str| {
            PeerConfig::parse(
                &GOOD.replace(r#""port": 3000,"#, &format!(r#""port": 3000, {extra}"#)),
            )
        };
        let c = with(&format!(r#""secret_file": {:?},"#, path.to_str().unwrap())).unwrap();
        let e = c.keys().unwrap_err();
        assert!(
            e.contains("cluster.key") && e.contains("does not exist"),
            "{e}"
        );
        Secret::generate().unwrap().write(&path).unwrap();
        let keys = c.keys().unwrap().unwrap();
        assert_eq!(keys.len(), 1);
        // Another cluster name: other keys from the same secret.
        let named = with(&format!(
            r#""secret_file": {:?}, "cluster": "staging","#,
            path.to_str().unwrap()
        ))
        .unwrap();
        assert_ne!(named.keys().unwrap().unwrap().ids(), keys.ids());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = c.keys().unwrap_err();
            assert!(e.contains("accessible by others"), "{e}");
        }
        assert!(with(r#""secret_file": "","#)
            .unwrap_err()
            .contains("secret_file"));
        assert!(with(r#""cluster": "","#).unwrap_err().contains("cluster"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn err_of(edit: &str, with: &str) -> String {
        PeerConfig::parse(&GOOD.replace(edit, with)).unwrap_err()
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert!(err_of(r#""node_ID": 2, "host""#, r#""node_ID": 1, "host""#)
            .contains("other_peers[0].node_ID"));
        assert!(err_of(r#""node_ID": 3,"#, r#""node_ID": 2,"#).contains("duplicate"));
        let e = err_of(
            r#""port": 3000,"#,
            r#""port": 3000, "election_timeout_ms": [300, 100],"#,
        );
        assert!(e.contains("election_timeout_ms"), "{e}");
        let e = err_of(r#""port": 3000,"#, r#""port": 3000, "heartbeat_ms": 150,"#);
        assert!(e.contains("heartbeat_ms"), "{e}");
        // Absurdly large values, which overflowed timing and snapshot arithmetic.
        for field in [
            r#""election_timeout_ms": [18446744073709551613, 18446744073709551615],"#,
            r#""snapshot_entries": 18446744073709551615,"#,
            r#""snapshot_trailing": 18446744073709551615,"#,
        ] {
            let name = field.split('"').nth(1).unwrap();
            let e = err_of(r#""port": 3000,"#, &format!(r#""port": 3000, {field}"#));
            assert!(e.contains(name), "{e}");
        }
        let e = err_of(r#""port": 3000,"#, r#""port": "x","#);
        assert!(e.contains("port") || e.contains("invalid type"), "{e}");
        let e = err_of(r#""name": "peer01","#, "");
        assert!(e.contains("name"), "{e}");
        let e = err_of(r#""port": 3000,"#, r#""port": 3000, "colour": 1,"#);
        assert!(e.contains("colour"), "{e}");
        let e = err_of(
            r#""port": 3000,"#,
            r#""port": 3000, "metrics_addr": "nowhere","#,
        );
        assert!(e.contains("metrics_addr"), "{e}");
        let with = r#""port": 3000, "metrics_addr": "127.0.0.1:9300","#;
        let c = PeerConfig::parse(&GOOD.replace(r#""port": 3000,"#, with)).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9300".parse().unwrap()));
    }
}
