//! Membership on real processes: a peer started with `--join` is added as a learner, catches
//! up, is promoted; a removed peer exits 0 and the rest keeps committing. And peers whose
//! config files disagree on the initial members never form a cluster.

mod common;

use common::{
    config_json, free_ports, one_at_a_time, poll_until, tail, wait_with_deadline, write_json,
    Cluster, TempDir, PEER,
};
use raft::client::Client;
use raft::cluster::ClusterFile;
use raft::config::PeerConfig;
use raft::raft::{
    ClientOp, ClientReply, ClientRequest, ClientResult, ConfChange, Datagram, Member, MemberRole,
    NodeId, Role, StatusInfo,
};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One request to one peer, plain JSON: its answer, or `None` if none came within `wait`.
fn ask(addr: SocketAddr, op: &ClientOp, wait: Duration) -> Option<ClientResult> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let id = (nanos ^ rand_bits(&socket)) >> 1;
    let request = Datagram::Request(ClientRequest { id, op: op.clone() });
    socket.send_to(&request.encode().unwrap(), addr).ok()?;
    let deadline = Instant::now() + wait;
    let mut buf = vec![0; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        if let Ok(Datagram::Reply(ClientReply {
            id: got, result, ..
        })) = Datagram::decode(&buf[..n])
        {
            if got == id {
                return Some(result);
            }
        }
    }
}

/// Some bits that differ between sockets (the ephemeral port), so request IDs do.
fn rand_bits(socket: &UdpSocket) -> u64 {
    u64::from(socket.local_addr().unwrap().port()) << 16
}

fn status(addr: SocketAddr) -> Option<StatusInfo> {
    match ask(addr, &ClientOp::Status, Duration::from_millis(300))? {
        ClientResult::Status(info) => Some(info),
        _ => None,
    }
}

/// Asks for `change` through the client library, which follows redirects and retries
/// `Busy` answers until `within`; panics on a refusal or at the deadline.
fn change_members(
    peers: &BTreeMap<NodeId, SocketAddr>,
    change: ConfChange,
    within: Duration,
) -> Vec<Member> {
    let mut client = Client::new(peers.clone(), within).unwrap();
    client.follow_cluster(true);
    match client.change_members(change.clone(), false) {
        Ok(configured) => configured.members,
        Err(e) => panic!("{change:?}: {e}"),
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn a_joining_peer_is_added_caught_up_and_promoted_and_a_removed_peer_exits_0() {
    let _serial = one_at_a_time();
    let mut cluster = Cluster::start("join", 3);
    let (first_leader, _) = cluster.wait_for_leader(Duration::from_secs(10));
    let mut peers: BTreeMap<NodeId, SocketAddr> = cluster.addresses();
    let mut client = cluster.lib_client(Duration::from_secs(5));
    for i in 0..20 {
        client.append(&format!("before{i}")).expect("append");
    }

    // Peer 4: its other_peers are the three members, its contact points.
    let port = free_ports(1)[0];
    let ports: Vec<u16> = (1..=3).map(|id| peers[&id].port()).chain([port]).collect();
    let json = config_json(&cluster.dir.0, &ports, 4);
    let config4 = cluster.dir.0.join("peer4.json");
    write_json(&config4, &json);
    cluster.configs.insert(4, config4.clone());
    cluster.start_peer_with(4, &["--join"]);

    let members = change_members(
        &peers,
        ConfChange::AddLearner {
            id: 4,
            address: format!("127.0.0.1:{port}"),
        },
        Duration::from_secs(10),
    );
    assert!(
        members
            .iter()
            .any(|m| m.id == 4 && m.role == MemberRole::Learner),
        "{members:?}"
    );
    peers.insert(4, addr(port));

    // It catches up: its applied index reaches the leader's commit index.
    poll_until(Duration::from_secs(10), "peer 4 did not catch up", || {
        cluster.check_alive();
        let leader = peers
            .values()
            .filter_map(|&a| status(a))
            .find(|s| s.role == Role::Leader)
            .ok_or("no leader")?;
        let four = status(addr(port)).ok_or("peer 4 does not answer")?;
        if four.applied_index >= leader.commit_index && four.config_index > 0 {
            Ok(())
        } else {
            Err(format!("leader {leader:?}\npeer 4 {four:?}"))
        }
    });
    // It adopted the cluster's ID, and recorded it.
    let dir4 = PeerConfig::load(&config4).unwrap().data_dir;
    let file4 = ClusterFile::load(&dir4)
        .unwrap()
        .expect("peer 4's cluster file");
    let file1 = ClusterFile::load(&cluster.data_dir(1)).unwrap().unwrap();
    assert_eq!(file4.id, file1.id);
    assert!(file4.joined && !file1.joined);

    let members = change_members(
        &peers,
        ConfChange::Promote { id: 4 },
        Duration::from_secs(10),
    );
    assert!(
        members
            .iter()
            .any(|m| m.id == 4 && m.role == MemberRole::Voter),
        "{members:?}"
    );
    for i in 0..10 {
        client.append(&format!("four voters {i}")).expect("append");
    }

    // Remove a follower of the original three: it exits 0 once it learns of it.
    let removed = (1..=3).find(|&id| id != first_leader).unwrap();
    let members = change_members(
        &peers,
        ConfChange::Remove { id: removed },
        Duration::from_secs(10),
    );
    assert!(members.iter().all(|m| m.id != removed), "{members:?}");
    let mut child = cluster.peers.remove(&removed).unwrap();
    let exit = wait_with_deadline(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "removed peer {removed} still runs; its log ends:\n{}",
            tail(&cluster.log_path(removed))
        )
    });
    assert!(
        exit.success(),
        "removed peer {removed} exited with {exit}; its log ends:\n{}",
        tail(&cluster.log_path(removed))
    );
    assert!(cluster
        .log_text(removed)
        .contains("removed from the cluster"));

    // The rest (three voters, peer 4 among them) keeps committing.
    peers.remove(&removed);
    let mut rest = Client::new(peers.clone(), Duration::from_secs(5)).unwrap();
    for i in 0..10 {
        rest.append(&format!("after removal {i}"))
            .expect("the remaining members commit");
    }
    cluster.check_alive();
    for (&id, &a) in &peers {
        let s = status(a).unwrap_or_else(|| panic!("peer {id} does not answer"));
        assert!(
            s.members.iter().all(|m| m.id != removed) && s.members.len() == 3,
            "peer {id}: {s:?}"
        );
    }
}

#[test]
fn peers_whose_files_disagree_on_the_initial_members_never_form_a_cluster() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("join-disagree");
    let ports = free_ports(3);
    // Peer 1 thinks the cluster is {1, 2}; peer 2 thinks it is {1, 2, 3} (3 never runs).
    let one = config_json(&dir.0, &ports[..2], 1);
    let two = config_json(&dir.0, &ports, 2);
    let mut children = Vec::new();
    for (id, json) in [(1, one), (2, two)] {
        let path = dir.0.join(format!("peer{id}.json"));
        write_json(&path, &json);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.0.join(format!("peer{id}.stderr")))
            .unwrap();
        let child = Command::new(PEER)
            .arg("-p")
            .arg(&path)
            .current_dir(&dir.0)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        children.push(Killed(child));
    }
    let log_of = |id: u64| std::fs::read_to_string(dir.0.join(format!("peer{id}.stderr")));
    let mut leaders = Vec::new();
    // Both must warn about the other's cluster (they campaign, and hear each other); while
    // waiting, neither may ever lead.
    poll_until(
        Duration::from_secs(10),
        "no wrong-cluster warning from both peers",
        || {
            for id in [1, 2] {
                if let Some(s) = status(addr(ports[id - 1])) {
                    if s.role == Role::Leader {
                        leaders.push(s);
                    }
                }
            }
            let texts: Vec<String> = [1, 2].map(|id| log_of(id).unwrap_or_default()).into();
            let warned = |t: &String| {
                t.contains("from another cluster")
                    && t.contains("different initial members or cluster names")
            };
            if texts.iter().all(warned) {
                Ok(())
            } else {
                Err(texts.join("\n----\n"))
            }
        },
    );
    // A little longer, for a leader to appear if it could: several election timeouts.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for id in [1, 2] {
            if let Some(s) = status(addr(ports[id - 1])) {
                if s.role == Role::Leader {
                    leaders.push(s);
                }
            }
        }
    }
    assert!(leaders.is_empty(), "a leader was elected: {leaders:?}");
    for child in &mut children {
        assert!(child.0.try_wait().unwrap().is_none(), "a peer exited");
    }
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A leader of another cluster that reaches a joining peer (here: told to add its address) is
/// never taken for its own: the joiner adopts only a cluster ID its contact points answered
/// with, and joins its own cluster once that one adds it.
#[test]
fn a_joining_peer_never_adopts_another_cluster_that_reaches_it() {
    let _serial = one_at_a_time();
    let mut ours = Cluster::start("join-ours", 1);
    // Another cluster name: the same initial member IDs would otherwise give the same ID.
    let mut other = Cluster::start_configured("join-other", 1, |path| {
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        config["cluster"] = "other".into();
        write_json(path, &config);
    });
    let ports = free_ports(1);
    let contacts: BTreeMap<u64, u16> = [(1, ours.ports()[&1])].into();
    ours.start_joining(9, ports[0], &contacts, |_| {});
    let address = format!("127.0.0.1:{}", ports[0]);
    other.client_ok(&["add-learner", "9", &address]);
    let joined = ours.data_dir(9).join("cluster");
    common::holds_for(Duration::from_secs(2), "no cluster file", || {
        ours.check_alive();
        match joined.exists() {
            false => Ok(()),
            true => Err(format!(
                "the joiner wrote {}; its log ends:\n{}",
                joined.display(),
                tail(&ours.log_path(9))
            )),
        }
    });
    ours.client_ok(&["add-learner", "9", &address]);
    let ours_id = ClusterFile::load(&ours.data_dir(1)).unwrap().unwrap().id;
    poll_until(
        Duration::from_secs(10),
        "joined its own cluster",
        || match ClusterFile::load(&ours.data_dir(9)) {
            Ok(Some(file)) if file.id == ours_id => Ok(()),
            Ok(Some(file)) => panic!("adopted cluster {:016x}, not ours", file.id),
            _ => Err(tail(&ours.log_path(9))),
        },
    );
    other.check_alive();
}
