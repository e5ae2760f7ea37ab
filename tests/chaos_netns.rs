//! `chaos --netns`: a short mixed run with every peer in a network namespace of its own, and
//! partitions made on their links, snapshots every 50 entries, must come out linearizable with
//! some acknowledged operations, faults and snapshots, and leave no namespace behind. Where
//! namespaces cannot be made (not root, no iproute2), it says why and passes, and where no packet
//! filter works (nft or iptables) it says that one-way cuts were left out; under CI both fail.

mod common;

use common::missing_tool;
use std::process::Command;

/// Names and addresses of this test's own, apart from a `chaos --netns` run by hand.
const PREFIX: &str = "rctst";
const SUBNET: &str = "10.213.12";

/// The text of every `peer*.log` under `dir`, at any depth.
fn peer_logs(dir: &std::path::Path) -> Vec<String> {
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            logs.extend(peer_logs(&path));
        } else if name.starts_with("peer") && name.ends_with(".log") {
            logs.push(std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    logs
}

#[test]
fn a_short_mixed_run_in_network_namespaces_is_linearizable() {
    let dir = std::env::temp_dir().join(format!("raft-chaos-netns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args([
            "--netns",
            "--netns-prefix",
            PREFIX,
            "--netns-subnet",
            SUBNET,
        ])
        .args([
            "--nodes",
            "3",
            "--duration",
            "15",
            "--faults",
            "mixed",
            "--seed",
            "2",
            "--snapshot-entries",
            "50",
        ])
        .arg("--out")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let explain = format!(
        "exit {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status.code()
    );
    if let Some(why) = stderr
        .lines()
        .find(|l| l.contains("network namespaces cannot be used here"))
    {
        assert_eq!(out.status.code(), Some(3), "{explain}");
        missing_tool(
            "`ip netns` (root, iproute2)",
            why.trim_start_matches("error: "),
        );
        return;
    }

    let summary = stdout.lines().last().unwrap_or("");
    assert_eq!(out.status.code(), Some(0), "{explain}");
    assert!(summary.starts_with("valid=true "), "{explain}");

    // Without a packet filter the run makes two-way partitions only, and its report says so.
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .map(|path| std::fs::read_to_string(path).expect("read the run's report"))
        .unwrap_or_else(|| panic!("no report: line\n{explain}"));
    if let Some(note) = report
        .lines()
        .find(|l| l.contains("no working packet filter"))
    {
        missing_tool(
            "a packet filter (nft)",
            &format!("one-way cuts left out: {}", note.trim()),
        );
    }

    let field = |key: &str| {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in {summary:?}"))
    };
    let ok: u64 = field("ok").parse().expect("ok=N");
    assert!(ok >= 100, "too few acknowledged operations: {summary}");
    // `faults=crash:1,partition:2`: every kind a --netns run may inject, none it may not.
    let faults: Vec<(&str, u64)> = field("faults")
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, n)| (k, n.parse().expect("kind:N")))
        .collect();
    assert!(
        faults.iter().map(|(_, n)| n).sum::<u64>() >= 2,
        "too few faults: {summary}"
    );
    for (kind, _) in &faults {
        assert!(
            ["crash", "killall", "pause", "partition"].contains(kind),
            "{kind} in a --netns run: {summary}"
        );
    }

    // The peers took snapshots (every 50 entries) under those faults.
    let snapshots = peer_logs(&dir)
        .iter()
        .map(|log| log.matches("snapshot at").count())
        .sum::<usize>();
    assert!(snapshots >= 3, "{snapshots} snapshots in the peers' logs");

    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&namespaces.stdout)
        .lines()
        .filter(|l| l.starts_with(PREFIX))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
