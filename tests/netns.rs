//! Peers on hosts of their own: each peer in its own Linux network namespace with its own
//! address on a bridge, driven by `scripts/netns-cluster.sh`, with faults made by taking a
//! peer's link down rather than by proxies. Needs root and iproute2; where network namespaces
//! cannot be made, the test says why on stdout and does nothing else; under CI it fails instead.

mod common;

use common::missing_tool;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-cluster.sh");
const CLIENT: &str = env!("CARGO_BIN_EXE_client");
const PEER: &str = env!("CARGO_BIN_EXE_peer");
/// Names and addresses of this test's own, so that it never touches a cluster someone runs by
/// hand (which uses the prefix `raft` and 10.213.7.0/24).
const PREFIX: &str = "rtst";
const SUBNET: &str = "10.213.9";

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Why namespaces cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root".into());
    }
    let probe = format!("{PREFIX}probe");
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => return Some(format!("cannot run `ip` (iproute2): {e}")),
        Ok(out) if !out.status.success() => {
            return Some(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

/// A namespaced cluster; `down` runs however the test ends.
struct NetnsCluster {
    dir: PathBuf,
}

impl NetnsCluster {
    fn script(&self, args: &[&str]) -> Output {
        let target = Path::new(PEER).parent().unwrap().parent().unwrap();
        Command::new("bash")
            .arg(SCRIPT)
            .args(args)
            .env("RAFT_NETNS_PREFIX", PREFIX)
            .env("RAFT_NETNS_SUBNET", SUBNET)
            .env("RAFT_NETNS_DIR", &self.dir)
            .env("CARGO_TARGET_DIR", target)
            .output()
            .expect("run netns-cluster.sh")
    }

    fn script_ok(&self, args: &[&str]) -> Output {
        let out = self.script(args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        out
    }

    fn client(&self, args: &[&str]) -> Output {
        Command::new(CLIENT)
            .arg("-p")
            .arg(self.dir.join("peer1.json"))
            .args(args)
            .output()
            .expect("run client")
    }

    fn status(&self) -> BTreeMap<u64, Value> {
        json_lines(&self.client(&["--timeout-ms", "1000", "status"]))
            .into_iter()
            .filter(|s| s["answered"] == true)
            .map(|s| (s["id"].as_u64().unwrap(), s))
            .collect()
    }

    /// The peer that leads, if exactly one answering peer says so.
    fn leader(&self) -> Option<u64> {
        let leaders: Vec<u64> = self
            .status()
            .into_iter()
            .filter(|(_, s)| s["role"] == "leader")
            .map(|(id, _)| id)
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Appends `text`; its index if acknowledged.
    fn append(&self, text: &str, timeout_ms: u64) -> Option<u64> {
        let out = self.client(&["--timeout-ms", &timeout_ms.to_string(), "append", text]);
        match out.status.code() {
            Some(0) => json_lines(&out)[0]["index"].as_u64(),
            Some(2) => None,
            _ => panic!("append {text:?}: {}", describe(&out)),
        }
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

fn poll_until<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `ip` lists that carries our prefix: namespaces, links, the bridge.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let out = Command::new("ip").args(args).output().expect("ip");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.split_whitespace().any(|w| w.starts_with(PREFIX)) {
                found.push(line.to_string());
            }
        }
    }
    found
}

fn leader_cut_off_is_replaced_and_rejoins(n: usize) {
    let dir = std::env::temp_dir().join(format!("raft-netns-{n}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = NetnsCluster { dir: dir.clone() };
    cluster.script(&["down"]); // anything a killed earlier run left
    cluster.script_ok(&["up", &n.to_string()]);
    cluster.script_ok(&["up", &n.to_string()]); // a second `up` is harmless

    // Every peer is on its own address, none on loopback.
    let status = cluster.status();
    assert_eq!(status.len(), n, "every peer answers: {status:?}");
    for (id, s) in &status {
        assert_eq!(s["address"], format!("{SUBNET}.{id}:3000"));
    }

    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 0..5 {
        let text = format!("n{n}-before-{i}");
        let index = cluster
            .append(&text, 5000)
            .expect("append with a stable leader");
        acked.push((index, text));
    }
    let old = cluster.leader().expect("one leader");
    cluster.script_ok(&["cut", &old.to_string()]);
    let cut_at = Instant::now();
    let (index, took) = poll_until(Duration::from_secs(10), || {
        let text = format!("n{n}-after-cut");
        cluster.append(&text, 1000).map(|i| (i, cut_at.elapsed()))
    })
    .expect("the majority side serves appends after the leader is cut off");
    acked.push((index, format!("n{n}-after-cut")));
    println!(
        "{n} peers: leader {old} cut off; the majority acknowledged an append {} ms later",
        took.as_millis()
    );
    let new = poll_until(Duration::from_secs(5), || {
        cluster.leader().filter(|&l| l != old)
    })
    .expect("a new leader on the majority side");
    assert!(
        took < Duration::from_secs(3),
        "the majority took {took:?} to serve an append (election timeout is 150-300 ms)"
    );
    for i in 0..3 {
        let text = format!("n{n}-during-cut-{i}");
        let index = cluster.append(&text, 5000).expect("append during the cut");
        acked.push((index, text));
    }

    cluster.script_ok(&["heal", &old.to_string()]);
    let rejoined = poll_until(Duration::from_secs(10), || {
        let s = cluster.status();
        let (o, l) = (s.get(&old)?, s.get(&new)?);
        let follows = o["role"] == "follower" && o["leader"] == new && o["term"] == l["term"];
        let caught_up = o["commit_index"] == l["commit_index"];
        (follows && caught_up).then_some(())
    });
    assert!(
        rejoined.is_some(),
        "old leader {old} did not rejoin as a follower of {new}: {:?}",
        cluster.status()
    );

    let out = cluster.client(&["--timeout-ms", "5000", "query"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let log = json_lines(&out);
    for (index, text) in &acked {
        let copies = log.iter().filter(|e| e["data"] == text.as_str()).count();
        assert_eq!(copies, 1, "{text:?} appears {copies} times");
        assert_eq!(
            log[*index as usize - 1]["data"],
            text.as_str(),
            "{text:?} not at its acknowledged index {index}"
        );
    }

    cluster.script_ok(&["down"]);
    assert_eq!(leftovers(), Vec::<String>::new(), "down left these behind");
    cluster.script_ok(&["down"]); // and again, with nothing up
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn netns_cluster_survives_its_leader_being_cut_off_at_3_and_5_peers() {
    if let Some(why) = unavailable() {
        missing_tool(
            "`ip netns` (root, iproute2)",
            &format!("network namespaces cannot be used here: {why}"),
        );
        return;
    }
    leader_cut_off_is_replaced_and_rejoins(3);
    leader_cut_off_is_replaced_and_rejoins(5);
}
