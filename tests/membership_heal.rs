//! Membership that heals by itself on real processes (issue #22, cases 1 and 2): a member that
//! missed the configuration adding a new leader hears that leader and catches up, and a
//! joining peer whose contact points are only followers catches up through the leader. Both
//! rest on peers learning each other's address from their messages (`reply_at`).

mod common;

use common::{free_ports, one_at_a_time, poll_until, tail, wait_with_deadline, Cluster};
use raft::auth::{Keys, Secret};
use raft::client::Client;
use raft::raft::{ConfChange, NodeId, Role, StatusInfo};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The running test's cluster secret: the file every config names, and its keys for clients.
/// None: no authentication. Tests run one at a time, each setting it first.
static KEYS: Mutex<Option<(PathBuf, Arc<Keys>)>> = Mutex::new(None);

fn keys() -> Option<Arc<Keys>> {
    KEYS.lock().unwrap().as_ref().map(|(_, k)| Arc::clone(k))
}

/// Points the config at `path` at the secret, if there is one.
fn with_secret(path: &Path) {
    if let Some((key, _)) = KEYS.lock().unwrap().as_ref() {
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        json["secret_file"] = key.to_str().unwrap().into();
        common::write_json(path, &json);
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn status(peers: &BTreeMap<NodeId, SocketAddr>, id: NodeId) -> Option<StatusInfo> {
    let one: BTreeMap<NodeId, SocketAddr> = [(id, peers[&id])].into();
    let mut client = Client::with_keys(one, Duration::from_millis(300), keys()).ok()?;
    client.status().pop()?.info
}

/// A client on `peers` that follows redirects to members it learns of.
fn client(peers: &BTreeMap<NodeId, SocketAddr>, timeout: Duration) -> Client {
    let mut c = Client::with_keys(peers.clone(), timeout, keys()).unwrap();
    c.follow_cluster(true);
    c
}

fn change(peers: &BTreeMap<NodeId, SocketAddr>, change: ConfChange) {
    client(peers, Duration::from_secs(15))
        .change_members(change.clone(), false)
        .unwrap_or_else(|e| panic!("{change:?}: {e}"));
}

/// Waits until `id` follows `leader` and has applied what `leader` committed.
fn caught_up(
    cluster: &mut Cluster,
    peers: &BTreeMap<NodeId, SocketAddr>,
    id: NodeId,
    leader: NodeId,
    within: Duration,
) {
    poll_until(within, &format!("peer {id} did not catch up"), || {
        cluster.check_alive();
        let l = status(peers, leader).ok_or("the leader does not answer")?;
        let me = status(peers, id).ok_or(format!("peer {id} does not answer"))?;
        if l.role == Role::Leader && me.leader == Some(leader) && me.applied_index >= l.commit_index
        {
            Ok(())
        } else {
            Err(format!("leader {l:?}\npeer {id} {me:?}"))
        }
    });
}

#[test]
fn a_member_that_missed_the_new_leaders_arrival_hears_it_and_the_cluster_survives() {
    let _serial = one_at_a_time();
    missed_arrival("heal-missed", None);
}

#[test]
fn with_a_cluster_secret_too() {
    let _serial = one_at_a_time();
    let dir = common::TempDir::new("heal-secret");
    let secret = Secret::generate().unwrap();
    let key = dir.0.join("key");
    secret.write(&key).unwrap();
    missed_arrival("heal-missed-secret", Some((key, secret)));
}

/// Case 1 of issue #22, optionally with every peer and client holding `secret` (at `key`).
fn missed_arrival(name: &str, secret: Option<(PathBuf, Secret)>) {
    let keys = secret.map(|(key, s)| {
        let k = Keys::new(&s, raft::config::DEFAULT_CLUSTER).unwrap();
        (key, Arc::new(k))
    });
    let authenticated = keys.is_some();
    *KEYS.lock().unwrap() = keys;
    let mut cluster = Cluster::start_configured(name, 3, with_secret);
    let mut peers = cluster.addresses();
    poll_until(Duration::from_secs(10), "no leader", || {
        (1..=3)
            .find(|&id| status(&peers, id).is_some_and(|s| s.role == Role::Leader))
            .ok_or_else(|| "none yet".to_string())
    });
    let mut c = client(&peers, Duration::from_secs(5));
    for i in 0..5 {
        c.append(&format!("before {i}")).expect("append");
    }

    // Peer 3 is away while peer 4 joins, becomes a voter and takes over, and peer 1 leaves.
    cluster.kill_peer(3);
    let port = free_ports(1)[0];
    let contacts: BTreeMap<u64, u16> = [(1, peers[&1].port()), (2, peers[&2].port())].into();
    cluster.start_joining(4, port, &contacts, with_secret);
    let up: BTreeMap<NodeId, SocketAddr> = [(1, peers[&1]), (2, peers[&2])].into();
    change(
        &up,
        ConfChange::AddLearner {
            id: 4,
            address: format!("127.0.0.1:{port}"),
        },
    );
    peers.insert(4, addr(port));
    let leader = (1..=2)
        .find(|&id| status(&peers, id).is_some_and(|s| s.role == Role::Leader))
        .expect("a leader among 1 and 2");
    caught_up(&mut cluster, &peers, 4, leader, Duration::from_secs(15));
    change(&up, ConfChange::Promote { id: 4 });
    let with4: BTreeMap<NodeId, SocketAddr> = [1, 2, 4].map(|id| (id, peers[&id])).into();
    let (now, _) = client(&with4, Duration::from_secs(10))
        .transfer_leader(Some(4))
        .expect("transfer to 4");
    assert_eq!(now, 4);
    change(&with4, ConfChange::Remove { id: 1 });
    let mut one = cluster.peers.remove(&1).unwrap();
    wait_with_deadline(&mut one, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("peer 1 did not exit:\n{}", tail(&cluster.log_path(1))));

    // Peer 3 comes back knowing only {1, 2, 3}: it must hear 4 and catch up.
    cluster.start_peer(3);
    caught_up(&mut cluster, &peers, 3, 4, Duration::from_secs(10));
    if authenticated {
        assert!(
            cluster.log_text(1).contains("datagrams are authenticated"),
            "{}",
            tail(&cluster.log_path(1))
        );
    }
    assert!(
        cluster.log_text(3).contains("learned node 4's address"),
        "{}",
        tail(&cluster.log_path(3))
    );

    // Peer 2 dies: {3, 4} is a majority of {2, 3, 4} and must elect a leader and commit.
    cluster.kill_peer(2);
    let rest: BTreeMap<NodeId, SocketAddr> = [3, 4].map(|id| (id, peers[&id])).into();
    let mut c = client(&rest, Duration::from_secs(10));
    let appended = c.append("after peer 2 died").expect("{3, 4} commit");
    assert!(appended.index > 0);
    cluster.check_alive();
    for id in [3, 4] {
        let log = cluster.log_text(id);
        assert!(
            !log.contains("ERROR"),
            "peer {id} logged an error:\n{}",
            tail(&cluster.log_path(id))
        );
    }
}

#[test]
fn a_joining_peer_that_knows_only_followers_catches_up_through_the_leader() {
    let _serial = one_at_a_time();
    *KEYS.lock().unwrap() = None;
    let mut cluster = Cluster::start("heal-join", 3);
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(10));
    let mut peers = cluster.addresses();
    let followers: BTreeMap<u64, u16> = peers
        .iter()
        .filter(|&(&id, _)| id != leader)
        .map(|(&id, a)| (id, a.port()))
        .collect();
    let port = free_ports(1)[0];
    cluster.start_joining(4, port, &followers, |_| {});
    change(
        &peers,
        ConfChange::AddLearner {
            id: 4,
            address: format!("127.0.0.1:{port}"),
        },
    );
    peers.insert(4, addr(port));
    caught_up(&mut cluster, &peers, 4, leader, Duration::from_secs(10));
    change(&peers, ConfChange::Promote { id: 4 });
    // The joiner answered the leader all along: it never had to complain of a missing address.
    let log = cluster.log_text(4);
    assert!(
        !log.contains("ERROR") && !log.contains("no known address"),
        "{}",
        tail(&cluster.log_path(4))
    );
    match status(&peers, 4) {
        Some(s) => assert_eq!(s.leader, Some(leader), "{s:?}"),
        None => panic!("peer 4 does not answer"),
    }
}

#[test]
fn a_joining_peer_no_leader_reaches_says_what_to_do_and_keeps_waiting() {
    let _serial = one_at_a_time();
    *KEYS.lock().unwrap() = None;
    let mut cluster = Cluster::start("heal-lonely", 1);
    // Its only contact point is a port nobody listens on: no member will ever reach it until
    // it is added.
    let ports = free_ports(2);
    let contacts: BTreeMap<u64, u16> = [(7, ports[0])].into();
    cluster.start_joining(9, ports[1], &contacts, |_| {});
    poll_until(Duration::from_secs(15), "no reminder", || {
        cluster.check_alive();
        let log = cluster.log_text(9);
        if log.contains("still joining after")
            && log.contains("none of its contact points [7] answered")
            && log.contains("client add-learner 9 127.0.0.1:")
        {
            Ok(())
        } else {
            Err(tail(&cluster.log_path(9)))
        }
    });
    assert!(!cluster.data_dir(9).join("cluster").exists());
}
