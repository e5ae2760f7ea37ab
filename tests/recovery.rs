//! `peer --force-new-cluster` on real processes: two of three peers are lost with their data
//! under a stream of appends; the third, restarted with the flag, leads alone with every append
//! acknowledged before the loss at its index; `scripts/add-peer.sh` grows it back to three (one
//! lost ID added back on an empty data dir, one new ID).

mod common;

use common::{free_ports, script, Cluster, StopScripts, TempDir};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn force_new_cluster_recovers_a_lost_majority_and_grows_back() {
    let _one = common::one_at_a_time();
    let dir = TempDir::new("force-new-cluster");
    let home = dir.0.clone();
    std::fs::create_dir_all(home.join("peers")).unwrap();
    let ports = free_ports(4);
    let mut configs = BTreeMap::new();
    for id in 1..=3u64 {
        let path = home.join(format!("peers/peer{id}.json"));
        common::write_json(&path, &common::config_json(&home, &ports[..3], id));
        configs.insert(id, path);
    }
    let _stop = StopScripts(home.clone());
    let mut cluster = Cluster::start_in(dir, configs);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));

    // The two followers are lost for good, with their data, while appends stream in. Every
    // append acknowledged is on the leader (it commits nothing it does not hold).
    let stop = Arc::new(AtomicBool::new(false));
    let workers = common::spawn_workers(
        &cluster,
        "before",
        2,
        Duration::from_millis(500),
        2,
        usize::MAX,
        &stop,
    );
    cluster.wait_for_acks(0, 100, Duration::from_secs(20));
    for lost in (1..=3).filter(|&id| id != leader) {
        cluster.kill_peer(lost);
        std::fs::remove_dir_all(cluster.data_dir(lost)).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let appends = common::join_workers(workers);
    assert!(appends.acked.len() >= 100, "{} acked", appends.acked.len());

    cluster.stop_peer(leader);
    cluster.start_peer_with(leader, &["--force-new-cluster"]);
    let back = cluster.wait_for_one_leader(Duration::from_secs(10));
    assert_eq!(back, leader);
    let log = cluster.log_text(leader);
    assert!(
        log.contains("--force-new-cluster: making node"),
        "no loud warning in\n{log}"
    );
    let records = common::query_log(&cluster, Duration::from_secs(10));
    for (data, &index) in &appends.acked {
        let at = &records[index as usize - 1];
        assert_eq!(at.data.as_deref(), Some(data.as_str()), "at {index}");
    }
    let members = cluster.client_ok(&["members"]);
    assert_eq!(members.len(), 1, "{members:?}");
    cluster.client_ok(&["append", "alone"]);

    // A second start with the flag changes nothing more.
    cluster.stop_peer(leader);
    cluster.start_peer_with(leader, &["--force-new-cluster"]);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    assert!(cluster.log_text(leader).contains("already the only voter"));

    // Grow back to three with the usual script: one lost peer started over on an empty data
    // dir under its old ID (added back with --rejoin), and one new ID.
    let via = format!("peers/peer{leader}.json");
    let rejoining = (1..=3).find(|&id| id != leader).unwrap();
    for (id, port) in [(rejoining, ports[rejoining as usize - 1]), (4, ports[3])] {
        let out = script(
            &home,
            "add-peer.sh",
            &[&id.to_string(), "--port", &port.to_string()],
            &[("RAFT_CLIENT_CONFIG", &via)],
        );
        assert!(
            out.status.success(),
            "add-peer.sh {id}: {}",
            common::describe(&out)
        );
        if id == rejoining {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("add-learner --rejoin"), "{text}");
        }
    }
    let members = cluster.client_ok(&["members"]);
    let voters: Vec<u64> = members
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    let mut want = vec![leader, rejoining, 4];
    want.sort_unstable();
    assert_eq!(voters, want, "{members:?}");
    cluster.client_ok(&["append", "three again"]);
    let records = common::query_log(&cluster, Duration::from_secs(10));
    for (data, &index) in &appends.acked {
        assert_eq!(
            records[index as usize - 1].data.as_deref(),
            Some(data.as_str())
        );
    }
}
