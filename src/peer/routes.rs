//! Whom the node thread hears and where it sends: the cluster ID, a joining peer's adoption
//! of its cluster, and the addresses of the configurations in force.

use crate::cluster::{self, ClusterFile, Start};
use crate::config::PeerConfig;
use crate::raft::membership::check_address;
use crate::raft::{self, Body, Index, Member, Membership, Message, NodeId, Term};
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
    /// It adopts no cluster before this long after it started (the longest election
    /// timeout): a leader cut off from its majority before this ID's removal committed may
    /// still send it AppendEntries, and must have stepped down (check quorum) first, or our
    /// answers could keep it leading a stale configuration that still counts this ID.
    adopt_after: Duration,
    /// Cluster IDs its contact points answered a [`Body::ClusterProbe`] with, by contact
    /// point: only an AppendEntries of one of these is adopted, so that a peer of another
    /// cluster that happens to send here is never taken for ours.
    vouched: BTreeMap<NodeId, u64>,
    probed: Option<Instant>,
}

/// How often a joining peer asks its contact points which cluster they are in.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

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
    /// The `cluster` file's vote floor (see `raft::node::vote_floor_from`), until it is
    /// cleared there; and the one just adopted, for the core.
    vote_floor_on_disk: Index,
    adopted_floor: Option<(Index, Term)>,
    floor_warnings: transport::RateLimiter,
    /// Joining peers that asked which cluster we are in, to be answered.
    probe_answers: Vec<NodeId>,
    /// The configurations the directory was last computed from; `None`: recompute.
    pub(super) seen: Option<Routing>,
    /// The core's routing key when `seen` was computed.
    pub(super) seen_key: Option<raft::node::RoutingKey>,
}

impl Routes {
    pub(super) fn new(config: &PeerConfig, start: &Start, adopt_after: Duration) -> Routes {
        let mut older: BTreeMap<NodeId, String> = config
            .other_peers
            .iter()
            .map(|p| (p.node_id, format!("{}:{}", p.host, p.port)))
            .collect();
        let (cluster, bootstrap, joining, vote_floor_on_disk) = match start {
            Start::Member(file) => {
                for m in &file.bootstrap.members {
                    older.insert(m.id, m.address.clone());
                }
                (file.id, describe(file), None, file.vote_floor.0)
            }
            Start::Joining => (
                0,
                "none yet: joining".to_string(),
                Some(Joining {
                    config: config.clone(),
                    since: Instant::now(),
                    reminded: Instant::now(),
                    adopt_after,
                    vouched: BTreeMap::new(),
                    probed: None,
                }),
                0,
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
            vote_floor_on_disk,
            adopted_floor: None,
            floor_warnings: transport::RateLimiter::new(transport::WARN_INTERVAL),
            probe_answers: Vec::new(),
            seen: None,
            seen_key: None,
        }
    }

    /// What to do with a peer message before the core sees it. A joining peer adopts the
    /// cluster ID of the first AppendEntries, writing the `cluster` file (fsynced) before the
    /// core handles it, and ignores anything else until then; a message of another cluster
    /// that the receiver let through before it knew ours is ignored. `Ok(false)`: ignore it.
    pub(super) fn admit(&mut self, msg: &Message) -> Result<bool, String> {
        if let Some(joining) = &mut self.joining {
            if msg.body == Body::ClusterProbeAnswer {
                let contact = joining
                    .config
                    .other_peers
                    .iter()
                    .any(|p| p.node_id == msg.from);
                if contact && msg.cluster != 0 && !joining.vouched.contains_key(&msg.from) {
                    log::info!(
                        "{}: joining: contact point node {} is in cluster {:016x}",
                        self.name,
                        msg.from,
                        msg.cluster
                    );
                    joining.vouched.insert(msg.from, msg.cluster);
                }
                return Ok(false);
            }
            if !matches!(msg.body, Body::AppendEntries { .. }) || msg.cluster == 0 {
                log::debug!(
                    "{}: joining: ignoring {} from node {} until an AppendEntries names the cluster",
                    self.name,
                    msg.body.name(),
                    msg.from
                );
                return Ok(false);
            }
            let Body::AppendEntries {
                prev_log_index,
                ref entries,
                leader_commit,
                ..
            } = msg.body
            else {
                unreachable!("only an AppendEntries gets here")
            };
            if !joining.vouched.values().any(|&c| c == msg.cluster) {
                log::debug!(
                    "{}: joining: not adopting cluster {:016x} from node {}: none of the contact points said it is theirs",
                    self.name,
                    msg.cluster,
                    msg.from
                );
                return Ok(false);
            }
            if joining.since.elapsed() < joining.adopt_after {
                log::debug!(
                    "{}: joining: not adopting node {}'s cluster until an election timeout after start",
                    self.name,
                    msg.from
                );
                return Ok(false);
            }
            // Durable before the core sees the message: the floor must survive a crash.
            let floor = raft::node::vote_floor_from(prev_log_index, entries.len(), leader_commit);
            let file = ClusterFile::joined(&joining.config, msg.cluster, (floor, msg.term));
            file.write(&self.data_dir)?;
            log::info!(
                "{}: joined cluster {:016x} (from node {}'s AppendEntries in term {}); recorded in {}; votes once its log reaches index {floor}",
                self.name,
                msg.cluster,
                msg.from,
                msg.term,
                self.data_dir.join(cluster::CLUSTER_FILE).display()
            );
            self.vote_floor_on_disk = floor;
            self.adopted_floor = Some((floor, msg.term));
            self.cluster = msg.cluster;
            self.bootstrap = describe(&file);
            self.joining = None;
            self.seen = None;
            self.learn(msg);
            return Ok(true);
        }
        match msg.body {
            Body::ClusterProbe => {
                if self.cluster != 0 && msg.cluster == 0 {
                    // A probe need not carry our cluster ID: it may teach the address of a
                    // node we know nothing of, never move one we know.
                    if !self.older.contains_key(&msg.from) && !self.learned.contains_key(&msg.from)
                    {
                        self.learn(msg);
                    }
                    self.probe_answers.push(msg.from);
                }
                return Ok(false);
            }
            // A late answer to a probe of ours, after we adopted our cluster.
            Body::ClusterProbeAnswer => return Ok(false),
            _ => {}
        }
        let admitted = self.cluster == 0 || msg.cluster == self.cluster;
        if admitted {
            self.learn(msg);
        }
        Ok(admitted)
    }

    /// What the shell sends on its own, never the core: answers to joining peers' probes (our
    /// cluster ID goes in every message), and a joining peer's probes of its contact points.
    pub(super) fn probe_messages(&mut self, now: Instant) -> Vec<Message> {
        let me = self.me;
        let message = |to, body| Message {
            cluster: 0,
            from: me,
            to,
            term: 0,
            body,
            reply_at: None,
        };
        let mut out: Vec<Message> = self
            .probe_answers
            .drain(..)
            .map(|to| message(to, Body::ClusterProbeAnswer))
            .collect();
        if let Some(joining) = &mut self.joining {
            if joining
                .probed
                .is_none_or(|at| now.duration_since(at) >= PROBE_INTERVAL)
            {
                joining.probed = Some(now);
                for p in &joining.config.other_peers {
                    out.push(message(p.node_id, Body::ClusterProbe));
                }
            }
        }
        out
    }

    /// The vote floor just adopted, for the core (once).
    pub(super) fn take_adopted_floor(&mut self) -> Option<(Index, Term)> {
        self.adopted_floor.take()
    }

    /// The core's log reached the vote floor: clear it in the `cluster` file too, so that a
    /// restart after a leader truncated our log below it does not withhold votes again. A
    /// failure (a full disk) is logged and retried: a floor left on disk is only cautious.
    pub(super) fn vote_floor_reached(&mut self, core_floor: Index) {
        if self.vote_floor_on_disk == 0 || core_floor != 0 {
            return;
        }
        let path = self.data_dir.join(cluster::CLUSTER_FILE);
        let cleared = ClusterFile::load(&self.data_dir).and_then(|file| {
            let mut file = file.ok_or_else(|| format!("{} vanished", path.display()))?;
            file.vote_floor = (0, 0);
            file.write(&self.data_dir)
        });
        match cleared {
            Ok(()) => self.vote_floor_on_disk = 0,
            Err(e) => {
                if self.floor_warnings.allow(Instant::now()).is_some() {
                    log::warn!(
                        "{}: cannot clear the vote floor in {}: {e}; will retry",
                        self.name,
                        path.display()
                    );
                }
            }
        }
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
        let contacts: Vec<NodeId> = c.other_peers.iter().map(|p| p.node_id).collect();
        let waited = now.duration_since(joining.since).as_secs();
        if joining.vouched.is_empty() {
            log::warn!(
                "{}: still joining after {waited} s: none of its contact points {contacts:?} answered; it knows no running member of its cluster and takes a cluster ID from no one else. Give it a running member as a contact point (other_peers) and add it from the cluster (client add-learner {} {}:{}); it keeps asking",
                self.name,
                c.node_id,
                c.host,
                c.port,
            );
        } else {
            log::warn!(
                "{}: still joining after {waited} s: no leader has sent this peer its log. Add it from the cluster (client add-learner {} {}:{}); contact points {:?} answered",
                self.name,
                c.node_id,
                c.host,
                c.port,
                joining.vouched.keys().collect::<Vec<_>>()
            );
        }
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
        let mut routes = Routes::new(
            &config,
            &Start::Member(ClusterFile::joined(&config, 7, (0, 0))),
            Duration::ZERO,
        );
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

#[cfg(test)]
mod joining_tests {
    use super::*;

    fn joining(adopt_after: Duration) -> (Routes, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "raft-routes-joining-{}-{}",
            std::process::id(),
            crate::auth::fresh_epoch()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = PeerConfig::parse(
            r#"{"name": "p4", "node_ID": 4, "host": "127.0.0.1", "port": 9004,
                "other_peers": [{"node_ID": 1, "host": "127.0.0.1", "port": 9001}]}"#,
        )
        .unwrap();
        config.data_dir = dir.clone();
        (Routes::new(&config, &Start::Joining, adopt_after), dir)
    }

    fn append(prev_log_index: Index, entries: usize, leader_commit: Index) -> Message {
        let entry = |index| raft::Entry {
            index,
            term: 1,
            payload: raft::Payload::Noop,
        };
        Message {
            cluster: 7,
            from: 1,
            to: 4,
            term: 1,
            body: Body::AppendEntries {
                prev_log_index,
                prev_log_term: 1,
                entries: (1..=entries as Index).map(entry).collect(),
                leader_commit,
                read_seq: 0,
            },
            reply_at: None,
        }
    }

    fn answer(from: NodeId, cluster: u64) -> Message {
        Message {
            cluster,
            from,
            to: 4,
            term: 0,
            body: Body::ClusterProbeAnswer,
            reply_at: None,
        }
    }

    #[test]
    fn a_joining_peer_adopts_only_a_cluster_id_its_contact_points_answered_with() {
        let (mut routes, dir) = joining(Duration::ZERO);
        let probes = routes.probe_messages(Instant::now());
        assert_eq!(probes.len(), 1);
        assert_eq!((probes[0].to, &probes[0].body), (1, &Body::ClusterProbe));
        assert!(
            routes.probe_messages(Instant::now()).is_empty(),
            "not again at once"
        );
        assert_eq!(
            routes.admit(&append(7, 2, 5)),
            Ok(false),
            "no contact point answered"
        );
        assert_eq!(routes.admit(&answer(9, 7)), Ok(false));
        assert_eq!(
            routes.admit(&append(7, 2, 5)),
            Ok(false),
            "node 9 is no contact point"
        );
        assert_eq!(routes.admit(&answer(1, 8)), Ok(false));
        assert_eq!(
            routes.admit(&append(7, 2, 5)),
            Ok(false),
            "contact point 1 is in 8"
        );
        assert_eq!(ClusterFile::load(&dir), Ok(None), "nothing written");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_member_answers_a_joining_peers_probe_with_its_cluster() {
        let (mut routes, dir) = joining(Duration::ZERO);
        std::fs::remove_dir_all(&dir).unwrap();
        routes.joining = None;
        routes.cluster = 7;
        let probe = Message {
            cluster: 0,
            from: 5,
            to: 4,
            term: 0,
            body: Body::ClusterProbe,
            reply_at: Some("127.0.0.1:9005".into()),
        };
        assert_eq!(routes.admit(&probe), Ok(false), "not for the core");
        let out = routes.probe_messages(Instant::now());
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].to, &out[0].body), (5, &Body::ClusterProbeAnswer));
        assert_eq!(
            routes.learned.get(&5).map(String::as_str),
            Some("127.0.0.1:9005")
        );
    }

    #[test]
    fn a_joining_peer_adopts_its_cluster_with_a_durable_vote_floor_after_an_election_timeout() {
        let (mut waiting, dir) = joining(Duration::from_secs(3600));
        waiting.admit(&answer(1, 7)).unwrap();
        assert_eq!(waiting.admit(&append(7, 2, 5)), Ok(false), "too early");
        assert_eq!(ClusterFile::load(&dir), Ok(None));
        std::fs::remove_dir_all(&dir).unwrap();

        let (mut routes, dir) = joining(Duration::ZERO);
        routes.admit(&answer(1, 7)).unwrap();
        assert_eq!(routes.admit(&append(7, 2, 5)), Ok(true));
        let file = ClusterFile::load(&dir).unwrap().unwrap();
        assert_eq!(
            (file.id, file.vote_floor),
            (7, (9, 1)),
            "prev_log_index + entries"
        );
        assert_eq!(routes.take_adopted_floor(), Some((9, 1)));
        assert_eq!(routes.take_adopted_floor(), None, "handed to the core once");
        routes.vote_floor_reached(9);
        assert_eq!(ClusterFile::load(&dir).unwrap().unwrap().vote_floor, (9, 1));
        routes.vote_floor_reached(0);
        let file = ClusterFile::load(&dir).unwrap().unwrap();
        assert_eq!(file.vote_floor, (0, 0));
        assert_eq!(file.started_over, (9, 1), "kept for good");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
