//! The per-peer JSON config, in the original project's shape, validated with errors
//! ([`ConfigError`]) that name the file and the field.

use crate::auth::{Keys, Secret};
use crate::raft::{Member, MemberRole, Membership, NodeId};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
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

/// Why a config could not be loaded, validated or used. `Display` gives the sentence the peer
/// and client binaries print (after `error: `); where a variant holds its cause (an I/O or
/// JSON error, or the error inside a file), that sentence already includes the cause's text,
/// and [`std::error::Error::source`] gives the cause itself.
#[derive(Debug)]
pub enum ConfigError {
    /// The config file at `path` cannot be read.
    Read { path: PathBuf, source: io::Error },
    /// An error in the config file at `path`: [`PeerConfig::load`] wraps every error of
    /// [`PeerConfig::parse`] in one, to name the file.
    File {
        path: PathBuf,
        error: Box<ConfigError>,
    },
    /// Not JSON, or not a config's shape: a missing, unknown or mistyped field.
    Json(serde_json::Error),
    /// A field's value is out of bounds: `field` of this peer, or with `peer` set, of its
    /// `other_peers[peer]`. `problem` says what is wrong and what is accepted.
    Field {
        field: &'static str,
        peer: Option<usize>,
        problem: String,
    },
    /// `other_peers[peer]` has this peer's own `node_ID`.
    OwnNodeId { peer: usize, node_id: NodeId },
    /// `other_peers[peer]` has the `node_ID` of an earlier entry.
    DuplicateNodeId { peer: usize, node_id: NodeId },
    /// The `host` of this peer (`peer: None`) or of `other_peers[peer]` does not resolve:
    /// `source` is the resolver's error, or `None` if it gave no address.
    ResolveHost {
        peer: Option<usize>,
        host: String,
        source: Option<io::Error>,
    },
    /// A member's `host:port` ([`resolve_address`]) does not resolve, as in `ResolveHost`.
    ResolveAddress {
        address: String,
        source: Option<io::Error>,
    },
    /// The `secret_file` at `path` is missing, unsafe or holds no valid key. `message` is the
    /// whole sentence, naming the file (the `auth` module's errors are sentences).
    Secret { path: PathBuf, message: String },
}

impl ConfigError {
    fn field(field: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            field,
            peer: None,
            problem: problem.into(),
        }
    }

    fn peer_field(peer: usize, field: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            field,
            peer: Some(peer),
            problem: problem.into(),
        }
    }
}

/// Writes `field` of this peer, or of `other_peers[peer]`, as errors name it.
fn write_field(f: &mut fmt::Formatter<'_>, field: &str, peer: Option<usize>) -> fmt::Result {
    match peer {
        None => write!(f, "field `{field}`: "),
        Some(i) => write!(f, "field `other_peers[{i}].{field}`: "),
    }
}

/// Writes why `target` did not resolve.
fn write_unresolved(
    f: &mut fmt::Formatter<'_>,
    target: &str,
    source: &Option<io::Error>,
) -> fmt::Result {
    match source {
        Some(e) => write!(f, "cannot resolve {target:?}: {e}"),
        None => write!(f, "{target:?} resolves to no address"),
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "config {}: cannot read: {source}", path.display())
            }
            ConfigError::File { path, error } => write!(f, "config {}: {error}", path.display()),
            ConfigError::Json(e) => write!(f, "{e}"),
            ConfigError::Field {
                field,
                peer,
                problem,
            } => {
                write_field(f, field, *peer)?;
                write!(f, "{problem}")
            }
            ConfigError::OwnNodeId { peer, node_id } => {
                write_field(f, "node_ID", Some(*peer))?;
                write!(f, "{node_id} is this peer's own node_ID")
            }
            ConfigError::DuplicateNodeId { peer, node_id } => {
                write_field(f, "node_ID", Some(*peer))?;
                write!(f, "duplicate node_ID {node_id}")
            }
            ConfigError::ResolveHost { peer, host, source } => {
                write_field(f, "host", *peer)?;
                write_unresolved(f, host, source)
            }
            ConfigError::ResolveAddress { address, source } => write_unresolved(f, address, source),
            ConfigError::Secret { message, .. } => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            ConfigError::File { error, .. } => Some(error.as_ref()),
            ConfigError::Json(e) => Some(e),
            ConfigError::ResolveHost { source, .. }
            | ConfigError::ResolveAddress { source, .. } => source.as_ref().map(|e| e as _),
            ConfigError::Field { .. }
            | ConfigError::OwnNodeId { .. }
            | ConfigError::DuplicateNodeId { .. }
            | ConfigError::Secret { .. } => None,
        }
    }
}

/// For callers whose errors are still sentences: the same text as `Display`.
impl From<ConfigError> for String {
    fn from(e: ConfigError) -> String {
        e.to_string()
    }
}

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
    /// Whether a peer off loopback may run without a `secret_file` (`insecure`, default
    /// false): without it, such a peer refuses to start. Logs a warning at every start.
    pub insecure: bool,
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
    insecure: Option<bool>,
    snapshot_entries: Option<u64>,
    snapshot_trailing: Option<u64>,
}

impl PeerConfig {
    /// Reads and validates `path`. A relative `data_dir` is taken relative to the working
    /// directory, as the original's paths were; the default is `data/<name>`.
    pub fn load(path: &Path) -> Result<PeerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PeerConfig::parse(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// Parses and validates config text; errors name the offending field.
    pub fn parse(text: &str) -> Result<PeerConfig, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(ConfigError::Json)?;
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
            return Err(ConfigError::field(
                "name",
                format!(
                    "{:?} must be non-empty letters, digits, '-', '_' or '.'",
                    raw.name
                ),
            ));
        }
        if raw.node_id == 0 {
            return Err(ConfigError::field("node_ID", "must be at least 1"));
        }
        if raw.port == 0 {
            return Err(ConfigError::field("port", "must be 1-65535"));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in raw.other_peers.iter().enumerate() {
            if p.node_id == raw.node_id {
                return Err(ConfigError::OwnNodeId {
                    peer: i,
                    node_id: p.node_id,
                });
            }
            if p.node_id == 0 {
                return Err(ConfigError::peer_field(i, "node_ID", "must be at least 1"));
            }
            if !seen.insert(p.node_id) {
                return Err(ConfigError::DuplicateNodeId {
                    peer: i,
                    node_id: p.node_id,
                });
            }
            if p.port == 0 {
                return Err(ConfigError::peer_field(i, "port", "must be 1-65535"));
            }
        }
        let (min, max) = election_timeout_ms;
        if min == 0 || min > max || max > MAX_ELECTION_TIMEOUT_MS {
            return Err(ConfigError::field(
                "election_timeout_ms",
                format!(
                    "[{min},{max}] must be [min,max] with 0 < min <= max <= {MAX_ELECTION_TIMEOUT_MS}"
                ),
            ));
        }
        if heartbeat_ms == 0 || heartbeat_ms >= min {
            return Err(ConfigError::field(
                "heartbeat_ms",
                format!("{heartbeat_ms} must be at least 1 and below the election minimum {min}"),
            ));
        }
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| Path::new("data").join(&raw.name));
        let metrics_addr = match &raw.metrics_addr {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                ConfigError::field(
                    "metrics_addr",
                    format!("{a:?} is not an address like \"127.0.0.1:9300\": {e}"),
                )
            })?),
        };
        if raw
            .secret_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::field("secret_file", "must name a file"));
        }
        let cluster = raw.cluster.unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        if cluster.is_empty() || cluster.len() > 128 {
            return Err(ConfigError::field(
                "cluster",
                format!("{cluster:?} must be 1 to 128 bytes"),
            ));
        }
        let snapshot_entries = raw.snapshot_entries.unwrap_or(DEFAULT_SNAPSHOT_ENTRIES);
        if snapshot_entries == 0 || snapshot_entries > MAX_SNAPSHOT_ENTRIES {
            return Err(ConfigError::field(
                "snapshot_entries",
                format!("{snapshot_entries} must be 1 to {MAX_SNAPSHOT_ENTRIES}"),
            ));
        }
        let snapshot_trailing = raw.snapshot_trailing.unwrap_or(DEFAULT_SNAPSHOT_TRAILING);
        if snapshot_trailing > MAX_SNAPSHOT_ENTRIES {
            return Err(ConfigError::field(
                "snapshot_trailing",
                format!("{snapshot_trailing} must be at most {MAX_SNAPSHOT_ENTRIES}"),
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
            insecure: raw.insecure.unwrap_or(false),
        })
    }

    /// The MAC keys from `secret_file` and `cluster`, or `None` if the config names no secret
    /// file (datagrams are then not authenticated). Reads the file each time: call it once, at
    /// start-up. A secret file that is missing, unreadable, accessible by others, or holds no
    /// valid key is an error naming the file.
    pub fn keys(&self) -> Result<Option<Arc<Keys>>, ConfigError> {
        let Some(path) = &self.secret_file else {
            return Ok(None);
        };
        let secret_error = |message| ConfigError::Secret {
            path: path.clone(),
            message,
        };
        let secret = Secret::load(path).map_err(secret_error)?;
        let keys = Keys::new(&secret, &self.cluster)
            .map_err(|e| secret_error(format!("secret_file {}: {e}", path.display())))?;
        Ok(Some(Arc::new(keys)))
    }

    /// Every peer's address by node ID, this one included, resolved once.
    pub fn addresses(&self) -> Result<BTreeMap<NodeId, SocketAddr>, ConfigError> {
        let mut out = BTreeMap::new();
        out.insert(self.node_id, resolve(&self.host, self.port, None)?);
        for (i, p) in self.other_peers.iter().enumerate() {
            out.insert(p.node_id, resolve(&p.host, p.port, Some(i))?);
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

/// Resolves the `host` of this peer (`peer: None`) or of `other_peers[peer]`.
fn resolve(host: &str, port: u16, peer: Option<usize>) -> Result<SocketAddr, ConfigError> {
    prefer_ipv4((host, port)).map_err(|source| ConfigError::ResolveHost {
        peer,
        host: host.to_string(),
        source,
    })
}

/// Resolves a member's `host:port` (from a configuration in the log, or a client's address
/// book) to one socket address.
pub fn resolve_address(address: &str) -> Result<SocketAddr, ConfigError> {
    prefer_ipv4(address).map_err(|source| ConfigError::ResolveAddress {
        address: address.to_string(),
        source,
    })
}

/// The first IPv4 address `target` resolves to, else its first: so that "localhost" means the
/// same socket for peers and clients. Fails with the resolver's error, or with `None` if it
/// gave no address.
fn prefer_ipv4(target: impl ToSocketAddrs) -> Result<SocketAddr, Option<io::Error>> {
    let addrs: Vec<SocketAddr> = target.to_socket_addrs().map_err(Some)?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    const GOOD: &str = r#"{ "name": "peer01", "node_ID": 1, "host": "127.0.0.1", "port": 3000,
        "other_peers": [ {"node_ID": 2, "host": "127.0.0.1", "port": 3001},
                         {"node_ID": 3, "host": "localhost", "port": 3002} ] }"#;

    /// A fresh directory under the system's temporary one.
    fn temp_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "raft-config-{what}-{}-{}",
            std::process::id(),
            crate::auth::fresh_epoch()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

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
        assert!(
            matches!(c.keys(), Ok(None)),
            "no secret_file: unauthenticated"
        );
    }

    #[test]
    fn a_secret_file_is_loaded_and_checked_at_start_up() {
        let dir = temp_dir("secret");
        let path = dir.join("cluster.key");
        let with = |extra: &str| {
            PeerConfig::parse(
                &GOOD.replace(r#""port": 3000,"#, &format!(r#""port": 3000, {extra}"#)),
            )
        };
        let c = with(&format!(r#""secret_file": {:?},"#, path.to_str().unwrap())).unwrap();
        let e = c.keys().unwrap_err();
        assert!(
            matches!(&e, ConfigError::Secret { path: p, .. } if *p == path),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "secret_file {}: does not exist (scripts/start-cluster.sh makes one)",
                path.display()
            )
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
            assert!(
                matches!(&e, ConfigError::Secret { path: p, .. } if *p == path),
                "{e}"
            );
        }
        let e = with(r#""secret_file": "","#).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Field {
                    field: "secret_file",
                    peer: None,
                    ..
                }
            ),
            "{e}"
        );
        let e = with(r#""cluster": "","#).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Field {
                    field: "cluster",
                    peer: None,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn err_of(edit: &str, with: &str) -> ConfigError {
        PeerConfig::parse(&GOOD.replace(edit, with)).unwrap_err()
    }

    /// The error of GOOD with `extra` fields added.
    fn err_with(extra: &str) -> ConfigError {
        err_of(r#""port": 3000,"#, &format!(r#""port": 3000, {extra}"#))
    }

    /// Whether `e` is about `field` of this peer (`peer: None`) or of `other_peers[peer]`.
    fn is_field(e: &ConfigError, field: &str, peer: Option<usize>) -> bool {
        matches!(e, ConfigError::Field { field: f, peer: p, .. } if *f == field && *p == peer)
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = err_of(r#""node_ID": 2, "host""#, r#""node_ID": 1, "host""#);
        assert!(
            matches!(
                e,
                ConfigError::OwnNodeId {
                    peer: 0,
                    node_id: 1
                }
            ),
            "{e}"
        );
        let e = err_of(r#""node_ID": 3,"#, r#""node_ID": 2,"#);
        assert!(
            matches!(
                e,
                ConfigError::DuplicateNodeId {
                    peer: 1,
                    node_id: 2
                }
            ),
            "{e}"
        );
        let e = err_of(r#""node_ID": 2, "host""#, r#""node_ID": 0, "host""#);
        assert!(is_field(&e, "node_ID", Some(0)), "{e}");
        let e = err_of(r#""port": 3002"#, r#""port": 0"#);
        assert!(is_field(&e, "port", Some(1)), "{e}");
        let e = err_of(r#""node_ID": 1, "host""#, r#""node_ID": 0, "host""#);
        assert!(is_field(&e, "node_ID", None), "{e}");
        let e = err_of(r#""port": 3000,"#, r#""port": 0,"#);
        assert!(is_field(&e, "port", None), "{e}");
        let e = err_of(r#""name": "peer01","#, r#""name": "peer 01","#);
        assert!(is_field(&e, "name", None), "{e}");
        let e = err_with(r#""election_timeout_ms": [300, 100],"#);
        assert!(is_field(&e, "election_timeout_ms", None), "{e}");
        let e = err_with(r#""heartbeat_ms": 150,"#);
        assert!(is_field(&e, "heartbeat_ms", None), "{e}");
        // Absurdly large values, which overflowed timing and snapshot arithmetic.
        for field in [
            r#""election_timeout_ms": [18446744073709551613, 18446744073709551615],"#,
            r#""snapshot_entries": 18446744073709551615,"#,
            r#""snapshot_trailing": 18446744073709551615,"#,
        ] {
            let name = field.split('"').nth(1).unwrap();
            let e = err_with(field);
            assert!(is_field(&e, name, None), "{e}");
        }
        // A mistyped, missing or unknown field is the JSON decoder's to report.
        for e in [
            err_of(r#""port": 3000,"#, r#""port": "x","#),
            err_of(r#""name": "peer01","#, ""),
            err_with(r#""colour": 1,"#),
        ] {
            assert!(matches!(&e, ConfigError::Json(j) if j.is_data()), "{e}");
        }
        let e = err_with(r#""metrics_addr": "nowhere","#);
        assert!(is_field(&e, "metrics_addr", None), "{e}");
        let with = r#""port": 3000, "metrics_addr": "127.0.0.1:9300","#;
        let c = PeerConfig::parse(&GOOD.replace(r#""port": 3000,"#, with)).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9300".parse().unwrap()));
    }

    /// The binaries print these sentences, and tests outside the library match them.
    #[test]
    fn errors_print_todays_sentences() {
        let text = |e: ConfigError| String::from(e);
        assert_eq!(
            text(err_of(r#""port": 3000,"#, r#""port": 0,"#)),
            "field `port`: must be 1-65535"
        );
        assert_eq!(
            text(err_of(r#""node_ID": 2, "host""#, r#""node_ID": 1, "host""#)),
            "field `other_peers[0].node_ID`: 1 is this peer's own node_ID"
        );
        assert_eq!(
            text(err_of(r#""node_ID": 3,"#, r#""node_ID": 2,"#)),
            "field `other_peers[1].node_ID`: duplicate node_ID 2"
        );
        assert_eq!(
            text(err_with(r#""heartbeat_ms": 150,"#)),
            "field `heartbeat_ms`: 150 must be at least 1 and below the election minimum 150"
        );
        assert_eq!(
            text(err_of(r#""port": 3000,"#, r#""port": "x","#)),
            "invalid type: string \"x\", expected u16 at line 1 column 66"
        );
        assert_eq!(
            text(ConfigError::ResolveHost {
                peer: Some(1),
                host: "nowhere".into(),
                source: None
            }),
            "field `other_peers[1].host`: \"nowhere\" resolves to no address"
        );
        // No port: refused before any lookup.
        let e = resolve_address("nohost").unwrap_err();
        let ConfigError::ResolveAddress {
            source: Some(io), ..
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!(e.to_string(), format!("cannot resolve \"nohost\": {io}"));

        let dir = temp_dir("load");
        let path = dir.join("peer.json");
        let e = PeerConfig::load(&path).unwrap_err();
        let ConfigError::Read { source, .. } = &e else {
            panic!("{e}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            format!("config {}: cannot read: {source}", path.display())
        );
        std::fs::write(&path, GOOD.replace(r#""port": 3000,"#, r#""port": 0,"#)).unwrap();
        let e = PeerConfig::load(&path).unwrap_err();
        assert!(
            matches!(&e, ConfigError::File { path: p, error } if *p == path
                && is_field(error, "port", None)),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("config {}: field `port`: must be 1-65535", path.display())
        );
        assert!(e.source().is_some_and(|s| s.is::<ConfigError>()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
