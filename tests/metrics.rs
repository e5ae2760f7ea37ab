//! Prometheus metrics scraped from a live three-peer cluster: the exposition passes
//! `promtool check metrics` (where Debian's prometheus package is installed, as in CI), and the
//! numbers move the way the cluster did (appends in the indices, a leader change in the counters).

mod common;

use common::{describe, missing_tool, write_configs, Cluster, TempDir};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(head.to_string());
    }
    Ok(body.to_string())
}

/// The value of the sample named exactly `name` (labels included), if present.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn promtool(body: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            missing_tool(
                "promtool",
                &format!(
                    "cannot run promtool ({e}; Debian's prometheus package): exposition not linted"
                ),
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}",
        describe(&out)
    );
}

#[test]
fn metrics_follow_appends_and_a_leader_change_and_pass_promtool() {
    let dir = TempDir::new("metrics");
    let configs = write_configs(&dir.0, 3);
    let mut metrics_addrs: BTreeMap<u64, SocketAddr> = BTreeMap::new();
    for (&id, path) in &configs {
        let addr = common::free_tcp_addr();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        json["metrics_addr"] = addr.to_string().into();
        common::write_json(path, &json);
        metrics_addrs.insert(id, addr);
    }
    let mut cluster = Cluster::start_in(dir, configs);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));
    for i in 0..20 {
        let out = cluster.client(&["append", &format!("m{i}")]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    }
    // Followers learn the commit index with the next heartbeat; wait for it.
    let scrapes = common::poll_until(Duration::from_secs(5), "commit index in metrics", || {
        let s: BTreeMap<u64, String> = metrics_addrs
            .iter()
            .map(|(&id, &a)| scrape(a).map(|b| (id, b)))
            .collect::<Result<_, _>>()?;
        let all = s
            .values()
            .all(|b| sample(b, "raft_commit_index").unwrap_or(0.0) >= 21.0);
        if all {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    let lead = &scrapes[&leader];
    promtool(lead);
    promtool(&scrapes[&(leader % 3 + 1)]);
    assert_eq!(sample(lead, "raft_is_leader"), Some(1.0), "{lead}");
    assert!(sample(lead, "raft_last_log_index").unwrap() >= 21.0);
    for id in (1..=3).filter(|&id| id != leader) {
        assert_eq!(sample(&scrapes[&id], "raft_is_leader"), Some(0.0));
        let m = sample(
            lead,
            &format!("raft_follower_match_index{{follower=\"{id}\"}}"),
        );
        assert!(m.unwrap_or(0.0) >= 21.0, "{lead}");
        assert!(sample(
            lead,
            &format!("raft_follower_lag_entries{{follower=\"{id}\"}}")
        )
        .is_some());
    }
    assert!(
        sample(lead, "raft_commit_latency_seconds_count").unwrap() >= 20.0,
        "{lead}"
    );
    assert!(sample(lead, "raft_fsync_duration_seconds_count").unwrap() >= 1.0);
    assert!(sample(lead, "raft_entries_per_fsync_count").unwrap() >= 1.0);
    assert!(sample(lead, "raft_datagrams_received_total").unwrap() >= 20.0);
    assert!(sample(lead, "raft_datagrams_sent_total").unwrap() >= 20.0);
    let term = sample(lead, "raft_term").unwrap();

    cluster.kill_peer(leader);
    let new = cluster.wait_for_one_leader(Duration::from_secs(10));
    let body = scrape(metrics_addrs[&new]).unwrap();
    assert_eq!(sample(&body, "raft_is_leader"), Some(1.0), "{body}");
    assert!(sample(&body, "raft_term").unwrap() > term, "{body}");
    assert!(
        sample(&body, "raft_leader_changes_total").unwrap() >= 2.0,
        "{body}"
    );
    assert!(
        sample(&body, "raft_elections_started_total").unwrap() >= 1.0,
        "{body}"
    );
    assert!(
        sample(
            &body,
            &format!("raft_follower_match_index{{follower=\"{leader}\"}}")
        )
        .is_some(),
        "the dead peer still has a row on the new leader: {body}"
    );
}
