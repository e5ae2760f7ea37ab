//! End to end on real processes: three `peer` processes on loopback, driven by the `client`
//! binary exactly as a user would, through its JSON output and exit codes.
//!
//! On failure the temp dir (configs, data, each peer's stderr) is kept and its path printed.

mod common;

use common::{describe, json_lines, write_configs, Cluster, TempDir, CLIENT};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What `client append` told us: acknowledged at an index, or outcome unknown (exit 2).
enum Outcome {
    Acked(u64),
    Unknown,
}

fn append(cluster: &Cluster, text: &str) -> Outcome {
    let out = cluster.client(&["--timeout-ms", "5000", "append", text]);
    match out.status.code() {
        Some(0) => {
            let lines = json_lines(&out.stdout);
            assert_eq!(lines.len(), 1, "{}", describe(&out));
            let line = &lines[0];
            assert_eq!(line["data"], text, "{}", describe(&out));
            assert!(line["term"].as_u64().unwrap() >= 1, "{}", describe(&out));
            let index = line["index"].as_u64().expect("index");
            assert!(index >= 1, "{}", describe(&out));
            Outcome::Acked(index)
        }
        Some(2) => Outcome::Unknown,
        _ => panic!("append {text:?} failed: {}", describe(&out)),
    }
}

#[test]
fn appends_survive_the_leader_being_killed() {
    let mut cluster = Cluster::start("e2e-failover", 3);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));

    // Acknowledged (index, text), and texts whose outcome is unknown.
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    for i in 0..5 {
        let text = format!("before-{i}");
        match append(&cluster, &text) {
            Outcome::Acked(index) => acked.push((index, text)),
            Outcome::Unknown => panic!("append {text:?} got no answer with a stable leader"),
        }
    }
    let indices: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert!(
        indices.windows(2).all(|w| w[0] < w[1]),
        "sequential appends land in order: {indices:?}"
    );

    cluster.kill_peer(leader);

    // Keep appending; each must be acknowledged within a few seconds of trying. A timed-out
    // attempt may or may not have landed, so the retry carries a new text.
    for i in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut attempt = 0;
        loop {
            let text = format!("after-{i}-{attempt}");
            match append(&cluster, &text) {
                Outcome::Acked(index) => {
                    acked.push((index, text));
                    break;
                }
                Outcome::Unknown => unknown.push(text),
            }
            cluster.check_alive();
            assert!(
                Instant::now() < deadline,
                "no append acknowledged within 10 s of the leader (peer {leader}) being killed"
            );
            attempt += 1;
        }
    }

    let out = cluster.client(&["--timeout-ms", "5000", "query"]);
    assert_eq!(out.status.code(), Some(0), "query: {}", describe(&out));
    let records = json_lines(&out.stdout);
    let indices: Vec<u64> = records
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=records.len() as u64).collect();
    assert_eq!(indices, expected, "indices run 1, 2, 3... without gaps");
    for r in &records {
        assert!(
            r["data"].is_string() || r["kind"].is_string(),
            "an entry has data or a kind: {r}"
        );
    }
    let data: Vec<&str> = records.iter().filter_map(|r| r["data"].as_str()).collect();
    for (index, text) in &acked {
        let at = &records[*index as usize - 1];
        assert_eq!(at["data"], text.as_str(), "entry {index} holds {text:?}");
        let copies = data.iter().filter(|d| *d == text).count();
        assert_eq!(copies, 1, "{text:?} is in the log exactly once");
    }
    for text in &unknown {
        let copies = data.iter().filter(|d| *d == text).count();
        assert!(copies <= 1, "{text:?} is in the log at most once");
    }
    let acked_indices: BTreeSet<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(
        acked_indices.len(),
        acked.len(),
        "no two appends share an index"
    );
}

#[test]
fn client_exit_codes_with_the_cluster_down() {
    let dir = TempDir::new("e2e-down");
    let configs = write_configs(&dir.0, 3);
    let client = |args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(CLIENT)
            .arg("-p")
            .arg(&configs[&1])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out, started.elapsed())
    };

    let (out, elapsed) = client(&["--timeout-ms", "300", "append", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(elapsed < Duration::from_millis(1000), "took {elapsed:?}");
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no answer within 300 ms"), "{stderr}");

    let (out, _) = client(&["--timeout-ms", "300", "query"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    let (out, elapsed) = client(&["--timeout-ms", "300", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(elapsed < Duration::from_millis(1000), "took {elapsed:?}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["answered"] == false && l.get("role").is_none()));

    // Refused before anything is sent: definite, so exit 1, and fast.
    let big = "a".repeat(20_000);
    let (out, elapsed) = client(&["--timeout-ms", "300", "append", &big]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(elapsed < Duration::from_millis(300), "took {elapsed:?}");

    // Usage and config errors exit 1; --help exits 0.
    let (out, _) = client(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let (out, _) = client(&["append"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let (out, _) = client(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let missing = dir.0.join("missing.json");
    let out = Command::new(CLIENT)
        .arg("-p")
        .arg(&missing)
        .arg("query")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}
