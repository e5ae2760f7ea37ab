//! The operator scripts on a real cluster, in a directory of their own (`RAFT_HOME`) on free
//! ports and with a cluster secret: `start-cluster.sh`, `add-peer.sh` (join, learner, voter),
//! `restart-peer.sh` (leadership moved away first), `remove-peer.sh` (the peer exits by
//! itself) and `stop-cluster.sh --wipe`.

mod common;

use common::{free_ports, json_lines, script, StopScripts, TempDir, CLIENT};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn ok(home: &Path, name: &str, args: &[&str]) -> String {
    let out = script(home, name, args, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed:\n{text}");
    text
}

/// `client members` through peer `via`'s config: (id, role) pairs.
fn members(home: &Path, via: u64) -> Vec<(u64, String)> {
    let out = Command::new(CLIENT)
        .arg("-p")
        .arg(format!("peers/peer{via}.json"))
        .arg("members")
        .current_dir(home)
        .output()
        .unwrap();
    assert!(out.status.success(), "members: {out:?}");
    json_lines(&out.stdout)
        .iter()
        .map(|m: &Value| {
            (
                m["id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[test]
fn the_scripts_grow_restart_and_shrink_a_cluster() {
    let dir = TempDir::new("scripts");
    let home = dir.0.clone();
    let peers = home.join("peers");
    std::fs::create_dir_all(&peers).unwrap();
    let ports = free_ports(4);
    for id in 1..=3u64 {
        let others: Vec<Value> = (1..=3u64)
            .filter(|&o| o != id)
            .map(|o| serde_json::json!({"node_ID": o, "host": "127.0.0.1", "port": ports[o as usize - 1]}))
            .collect();
        let config = serde_json::json!({
            "name": format!("peer{id}"), "node_ID": id, "host": "127.0.0.1",
            "port": ports[id as usize - 1], "other_peers": others,
            "data_dir": format!("data/peer{id}"), "secret_file": "run/cluster.key",
        });
        common::write_json(&peers.join(format!("peer{id}.json")), &config);
    }
    let _stop = StopScripts(home.clone());

    let started = ok(&home, "start-cluster.sh", &[]);
    assert!(started.contains("leader: "), "{started}");
    assert!(home.join("run/cluster.key").exists());

    let port4 = ports[3].to_string();
    let added = ok(&home, "add-peer.sh", &["4", "--port", &port4]);
    assert!(added.contains("with --join"), "{added}");
    assert!(home.join("peers/peer4.json").exists());
    let roles = members(&home, 1);
    assert!(roles.contains(&(4, "voter".into())), "{roles:?}\n{added}");
    assert_eq!(roles.len(), 4);

    // Restart every peer in turn; the cluster keeps its four voters.
    for id in ["1", "2", "3", "4"] {
        let out = ok(&home, "restart-peer.sh", &[id]);
        assert!(out.contains("is back and caught up"), "{out}");
    }

    let removed = ok(&home, "remove-peer.sh", &["2"]);
    assert!(removed.contains("peer2 (pid"), "{removed}");
    assert!(
        removed.contains("exited"),
        "the removed peer did not exit by itself:\n{removed}"
    );
    let roles = members(&home, 1);
    assert_eq!(
        roles,
        vec![
            (1, "voter".into()),
            (3, "voter".into()),
            (4, "voter".into())
        ]
    );
    let log = std::fs::read_to_string(home.join("run/peer2.log")).unwrap();
    assert!(log.contains("removed from the cluster"), "{log}");

    // A restart of the whole cluster leaves the removed peer out and the added one in.
    ok(&home, "stop-cluster.sh", &[]);
    let again = ok(&home, "start-cluster.sh", &[]);
    assert!(!again.contains("started peer2"), "{again}");
    assert!(again.contains("started peer4"), "{again}");
    assert_eq!(members(&home, 3).len(), 3);

    let wiped = ok(&home, "stop-cluster.sh", &["--wipe"]);
    assert!(wiped.contains("deleted peers/peer4.json"), "{wiped}");
    assert!(!home.join("data").exists());
    assert!(home.join("peers/peer1.json").exists());
}
