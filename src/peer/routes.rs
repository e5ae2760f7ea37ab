//! Whom the node thread hears and where it sends: the cluster ID, a joining peer's adoption
//! of its cluster, and the addresses of the configurations in force.

use crate::cluster::{self, ClusterFile, Start};
use crate::config::PeerConfig;
use crate::raft::membership::check_address;
use crate::raft::{self, Body, Index, Member, Membership, Message, NodeId};
use crate::transport::{self, Accept, Directory};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Addresses learned from messages, at most: enough for any cluster, and a bound on what
/// forged sender IDs can make this peer keep when datagrams are not authenticated.
const MAX_LEARNED: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    pub(super) config_index: Index,
    /// The configuration in force (the latest in the log).
    pub(super) latest: Membership,
    /// The one in force once the log is committed up to the commit index.
    pub(super) committed: Membership,
    /// Everyone the core may send to.
    pub(super) contacts: Vec<NodeId>,
    /// Removed members the core still tells of their removal, at their address in the last
    /// configuration of its log that listed them: a peer that started after their removal
    /// knows it from nowhere else.
    pub(super) removed: Vec<Member>,
}

/// A joining peer's state until the first AppendEntries tells it the cluster.
#[derive(Clone, Debug)]
pub(super) struct Joining {
    config: PeerConfig,
    /// When it started waiting, and when it last said it still is.
    since: Instant,
    reminded: Instant,
}

/// How often a joining peer that no leader has reached says so.
const JOINING_REMINDER: Duration = Duration::from_secs(5);

/// The shell's side of membership: which cluster this peer is in, where peers are, and whom to
/// hear. Addresses come from the newest knowledge that has one: the configuration in force,
/// the committed one, the `cluster` file's bootstrap membership, then the JSON's `other_peers`
/// (for a joining peer, its contact points).
#[derive(Debug)]
pub(super) struct Routes {
    me: NodeId,
    name: String,
    data_dir: PathBuf,
    /// Our cluster ID; 0 while joining.
    cluster: u64,
    /// The bootstrap membership and cluster name, for the wrong-cluster warning.
    bootstrap: String,
    /// Every address known: the JSON's, then the `cluster` file's, then each configuration's
    /// as it comes into force (later ones win); never forgotten, so a removed member can still
    /// be told of its removal.
    older: BTreeMap<NodeId, String>,
    /// Addresses learned from peer messages (their `reply_at`) for nodes none of the above
    /// gives one for: a member added while we were away, or, for a joining peer, a leader its
    /// contact points did not include. At most [`MAX_LEARNED`].
    learned: BTreeMap<NodeId, String>,
    joining: Option<Joining>,
    /// The configurations the directory was last computed from; `None`: recompute.
    pub(super) seen: Option<Routing>,
    /// The core's routing key when `seen` was computed.
    pub(super) seen_key: Option<raft::node::RoutingKey>,
}

impl Routes {
    pub(super) fn new(config: &PeerConfig, start: &Start) -> Routes {
        let mut older: BTreeMap<NodeId, String> = config
            .other_peers
            .iter()
            .map(|p| (p.node_id, format!("{}:{}", p.host, p.port)))
            .collect();
        let (cluster, bootstrap, joining) = match start {
            Start::Member(file) => {
                for m in &file.bootstrap.members {
                    older.insert(m.id, m.address.clone());
                }
                (file.id, describe(file), None)
            }
            Start::Joining => (
                0,
                "none yet: joining".to_string(),
                Some(Joining {
                    config: config.clone(),
                    since: Instant::now(),
                    reminded: Instant::now(),
                }),
            ),
        };
        older.remove(&config.node_id);
        Routes {
            me: config.node_id,
            name: config.name.clone(),
            data_dir: config.data_dir.clone(),
            cluster,
            bootstrap,
            older,
            learned: BTreeMap::new(),
            joining,
            seen: None,
            seen_key: None,
        }
    }

    /// What to do with a peer message before the core sees it. A joining peer adopts the
    /// cluster ID of the first AppendEntries, writing the `cluster` file (fsynced) before the
    /// core handles it, and ignores anything else until then; a message of another cluster
    /// that the receiver let through before it knew ours is ignored. `Ok(false)`: ignore it.
    pub(super) fn admit(&mut self, msg: &Message) -> Result<bool, String> {
        if let Some(joining) = &self.joining {
            if !matches!(msg.body, Body::AppendEntries { .. }) || msg.cluster == 0 {
                log::debug!(
                    "{}: joining: ignoring {} from node {} until an AppendEntries names the cluster",
                    self.name,
                    msg.body.name(),
                    msg.from
                );
                return Ok(false);
            }
            let file = ClusterFile::joined(&joining.config, msg.cluster);
            file.write(&self.data_dir)?;
            log::info!(
                "{}: joined cluster {:016x} (from node {}'s AppendEntries in term {}); recorded in {}",
                self.name,
                msg.cluster,
                msg.from,
                msg.term,
                self.data_dir.join(cluster::CLUSTER_FILE).display()
            );
            self.cluster = msg.cluster;
            self.bootstrap = describe(&file);
            self.joining = None;
            self.seen = None;
            self.learn(msg);
            return Ok(true);
        }
        let admitted = self.cluster == 0 || msg.cluster == self.cluster;
        if admitted {
            self.learn(msg);
        }
        Ok(admitted)
    }

    /// A joining peer that no leader has reached yet says so now and then, with what to do:
    /// its contact points need not be members any more (the leader reaches it at its own
    /// address once it is added), but it must be added.
    pub(super) fn still_joining(&mut self, now: Instant) {
        let Some(joining) = &mut self.joining else {
            return;
        };
        if now.duration_since(joining.reminded) < JOINING_REMINDER {
            return;
        }
        joining.reminded = now;
        let c = &joining.config;
        log::warn!(
            "{}: still joining after {} s: no leader has sent this peer its log. Add it from the cluster (client add-learner {} {}:{}); its contact points {:?} need not be members any more",
            self.name,
            now.duration_since(joining.since).as_secs(),
            c.node_id,
            c.host,
            c.port,
            c.other_peers.iter().map(|p| p.node_id).collect::<Vec<_>>()
        );
    }

    /// Learns the sender's address from a message of our cluster, if nothing else gives one
    /// (or it moved since we learned it); the directory is recomputed before anything is sent,
    /// so the answer to this very message reaches it.
    fn learn(&mut self, msg: &Message) {
        let Some(address) = &msg.reply_at else {
            return;
        };
        if msg.from == self.me
            || self.older.contains_key(&msg.from)
            || self.learned.get(&msg.from) == Some(address)
        {
            return;
        }
        if let Err(e) = check_address(address) {
            log::debug!("{}: node {} sent a bad address: {e}", self.name, msg.from);
            return;
        }
        if self.learned.len() >= MAX_LEARNED && !self.learned.contains_key(&msg.from) {
            log::debug!(
                "{}: not learning node {}'s address: {MAX_LEARNED} learned already",
                self.name,
                msg.from
            );
            return;
        }
        log::info!(
            "{}: learned node {}'s address {address} from its {} (no configuration here lists it)",
            self.name,
            msg.from,
            msg.body.name()
        );
        self.learned.insert(msg.from, address.clone());
        self.seen = None;
    }

    /// The directory for `routing`, if it (or our cluster) changed since the last one.
    pub(super) fn update(&mut self, routing: Routing) -> Option<Directory> {
        if self.seen.as_ref() == Some(&routing) {
            return None;
        }
        // Addresses from configurations are kept after their member leaves them: a removed
        // member is still sent the log until it has learned of its removal (`contacts`).
        for m in routing
            .removed
            .iter()
            .chain(&routing.committed.members)
            .chain(&routing.latest.members)
        {
            self.older.insert(m.id, m.address.clone());
        }
        // Learned addresses only fill gaps: a configuration's address, once we have one, wins.
        self.learned.retain(|id, _| !self.older.contains_key(id));
        let mut wheres = self.older.clone();
        wheres.extend(self.learned.iter().map(|(&id, a)| (id, a.clone())));
        wheres.remove(&self.me);
        let mut addresses = BTreeMap::new();
        for (id, address) in wheres {
            // Resolving may wait for DNS; it happens only when the configuration changes.
            match transport::resolve_address(&address) {
                Ok(a) => {
                    addresses.insert(id, a);
                }
                Err(e) => log::warn!("{}: peer {id}: {e}; cannot send to it", self.name),
            }
        }
        // Every node we have an address for may send to us, not only the members of the
        // configuration in force here (thesis §4.1): a peer catching up through old
        // configurations must hear a leader that those configurations do not list.
        let senders: BTreeSet<NodeId> = routing
            .latest
            .ids()
            .chain(routing.committed.ids())
            .chain(routing.contacts.iter().copied())
            .chain(self.older.keys().copied())
            .chain(self.learned.keys().copied())
            .filter(|&id| id != self.me)
            .collect();
        let index_moved = self.seen.as_ref().map(|r| r.config_index) != Some(routing.config_index);
        if routing.config_index > 0 && index_moved {
            log::info!(
                "{}: configuration at index {} in force: {}",
                self.name,
                routing.config_index,
                routing.latest.describe()
            );
        }
        let directory = Directory {
            accept: Accept {
                senders,
                any_sender: routing.latest.members.is_empty(),
                cluster: self.cluster,
                bootstrap: self.bootstrap.clone(),
            },
            addresses,
        };
        self.seen = Some(routing);
        Some(directory)
    }
}

/// A cluster file's bootstrap membership and name, for logs.
pub(super) fn describe(file: &ClusterFile) -> String {
    if file.joined {
        format!("joined, cluster name {:?}", file.name)
    } else {
        format!(
            "bootstrapped with {}, cluster name {:?}",
            file.bootstrap.describe(),
            file.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::AppendResult;
    use std::net::SocketAddr;

    fn from(id: NodeId, cluster: u64, reply_at: &str) -> Message {
        Message {
            cluster,
            from: id,
            to: 1,
            term: 1,
            body: Body::AppendEntriesResponse {
                read_seq: 0,
                result: AppendResult::Accepted { match_index: 0 },
            },
            reply_at: Some(reply_at.into()),
        }
    }

    fn routing() -> Routing {
        Routing {
            config_index: 0,
            latest: Membership::default(),
            committed: Membership::default(),
            contacts: Vec::new(),
            removed: Vec::new(),
        }
    }

    #[test]
    fn an_address_is_learned_only_where_nothing_else_gives_one_and_only_in_our_cluster() {
        let config = PeerConfig::parse(
            r#"{"name": "p1", "node_ID": 1, "host": "127.0.0.1", "port": 9001,
                "other_peers": [{"node_ID": 2, "host": "127.0.0.1", "port": 9002}]}"#,
        )
        .unwrap();
        let mut routes = Routes::new(&config, &Start::Member(ClusterFile::joined(&config, 7)));
        routes.update(routing()).expect("a first directory");
        for (msg, admitted) in [
            (from(4, 7, "127.0.0.1:9004"), true),
            (from(2, 7, "127.0.0.1:9999"), true),
            (from(5, 8, "127.0.0.1:9005"), false),
        ] {
            assert_eq!(routes.admit(&msg).unwrap(), admitted, "{msg:?}");
        }
        let d = routes
            .update(routing())
            .expect("learning changed the directory");
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(d.addresses.get(&4), Some(&at(9004)), "learned");
        assert_eq!(
            d.addresses.get(&2),
            Some(&at(9002)),
            "the config's address wins"
        );
        assert!(!d.addresses.contains_key(&5), "another cluster's node");
        assert!(d.accept.senders.contains(&4) && !d.accept.senders.contains(&5));
    }
}
