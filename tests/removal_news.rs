//! Removal news on real processes (issue #22, "membership that never wedges"): a removed peer
//! that was down when it was removed, and stays down until leadership has moved on, still
//! learns of its removal from the new leader and exits 0; a peer started over under a removed
//! ID, waiting to be added back, is not told of the old removal (it would exit) and is added
//! back with `add-learner --rejoin`.

mod common;

use common::{describe, json_lines, poll_until, wait_with_deadline, Cluster};
use std::time::Duration;

/// The members as `client members` prints them: (id, role).
fn members(cluster: &Cluster) -> Vec<(u64, String)> {
    cluster
        .client_ok(&["members"])
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Makes peer `id` the leader.
fn lead(cluster: &Cluster, id: u64) {
    poll_until(Duration::from_secs(15), "the peer leads", || {
        let out = cluster.client(&["--timeout-ms", "3000", "transfer-leader", &id.to_string()]);
        match json_lines(&out.stdout).first() {
            Some(l) if l["leader"].as_u64() == Some(id) => Ok(()),
            _ => Err(describe(&out)),
        }
    });
}

/// Three peers led by 1; peer 3 is killed and removed, and peer 2 takes over: peer 1, which
/// removed 3, no longer leads before 3 could hear of it.
fn remove_3_while_down_then_lead_with_2(name: &str) -> Cluster {
    let mut cluster = Cluster::start(name, 3);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    lead(&cluster, 1);
    cluster.kill_peer(3);
    cluster.client_ok(&["--timeout-ms", "10000", "remove", "3"]);
    lead(&cluster, 2);
    assert_eq!(
        members(&cluster),
        vec![(1, "voter".into()), (2, "voter".into())]
    );
    cluster
}

#[test]
fn a_removed_peer_that_was_down_learns_it_from_the_next_leader_and_exits() {
    let _one = common::one_at_a_time();
    let mut cluster = remove_3_while_down_then_lead_with_2("removal-news");
    // Back on its data dir, which does not have its removal.
    cluster.start_peer(3);
    let mut child = cluster.peers.remove(&3).unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!(
            "removed peer 3 did not exit within 10 s; its log ends:\n{}",
            common::tail(&cluster.log_path(3))
        )
    });
    assert!(status.success(), "removed peer 3 exited with {status}");
    assert!(
        cluster.log_text(3).contains("removed from the cluster"),
        "peer 3 does not say it was removed:\n{}",
        common::tail(&cluster.log_path(3))
    );
    cluster.client_ok(&["append", "after"]);
}

/// Waits until peer `id` has applied as much as peer 1.
fn caught_up(cluster: &Cluster, id: u64) {
    poll_until(Duration::from_secs(10), "the peer catches up", || {
        let lines = cluster.client_ok(&["status"]);
        let applied = |id: u64| {
            lines
                .iter()
                .find(|l| l["id"].as_u64() == Some(id))
                .and_then(|l| l["applied_index"].as_u64())
        };
        match (applied(1), applied(id)) {
            (Some(a), Some(b)) if a == b => Ok(()),
            _ => Err(format!("{lines:?}")),
        }
    });
}

#[test]
fn a_peer_started_over_under_a_removed_id_waits_to_be_added_back() {
    // Peer 4 joins (a configuration entry lists it), is killed and removed, and peer 2 takes
    // over. Started over on an empty data dir, the new peer 4 would replay the entry that
    // added it and then its removal, committed, and exit if the new leader, which still tells
    // the old 4, sent it the log.
    let _one = common::one_at_a_time();
    let mut cluster = Cluster::start("removal-started-over", 3);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    lead(&cluster, 1);
    let contacts = cluster.ports();
    let port4 = common::free_ports(1)[0];
    let address4 = format!("127.0.0.1:{port4}");
    cluster.start_joining(4, port4, &contacts, |_| {});
    cluster.client_ok(&["add-learner", "4", &address4]);
    cluster.client_ok(&["append", "before"]);
    caught_up(&cluster, 4);
    cluster.kill_peer(4);
    cluster.client_ok(&["--timeout-ms", "10000", "remove", "4"]);
    lead(&cluster, 2);
    std::fs::remove_dir_all(cluster.data_dir(4)).unwrap();
    cluster.start_joining(4, port4, &contacts, |_| {});
    // Peer 2 tells the old 4 of its removal: the new one answers with an empty log and is
    // left alone.
    poll_until(
        Duration::from_secs(10),
        "the leader leaves the new peer 4 alone",
        || {
            cluster.check_alive();
            match cluster
                .log_text(2)
                .contains("removed node 4 answers with an empty log")
            {
                true => Ok(()),
                false => Err(common::tail(&cluster.log_path(2))),
            }
        },
    );
    // Peer 4, started over, must not take the old removal for its own meanwhile.
    common::holds_for(Duration::from_millis(500), "peer 4 up", || {
        cluster.check_alive();
        Ok(())
    });
    cluster.client_ok(&["add-learner", "4", &address4, "--rejoin"]);
    cluster.client_ok(&["append", "after"]);
    caught_up(&cluster, 4);
    cluster.check_alive();
    assert!(!cluster.log_text(4).contains("removed from the cluster"));
}
