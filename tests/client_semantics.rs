//! What clients are promised, on real processes: a retried append is applied once however
//! often the leader changes under it; a long log comes back whole through paged queries; and
//! `status` agrees on one leader.
//!
//! On failure the temp dir (configs, data dirs, each peer's log) is kept and its path printed.

mod common;

use common::{check_log, join_workers, json_lines, query_log, spawn_workers, Cluster, Rng};
use raft::raft::MAX_DATAGRAM;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ELECTION_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn retried_appends_through_leader_changes_are_applied_once() {
    let _serial = common::one_at_a_time();
    let started = Instant::now();
    let mut rng = Rng::from_env("retried_appends_through_leader_changes_are_applied_once");
    let mut cluster = Cluster::start("semantics-retries", 3);
    cluster.wait_for_leader(ELECTION_WITHIN);

    // A timeout shorter than an election, so appends time out while the leader is down and
    // are retried (same data, so same client and seq) on the next leader.
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_millis(150);
    let workers = spawn_workers(&cluster, "r", 3, timeout, usize::MAX, usize::MAX, &stop);
    for round in 0..6 {
        std::thread::sleep(rng.millis(200, 600));
        let (leader, term) = cluster.wait_for_leader(ELECTION_WITHIN);
        let down = rng.millis(0, 300);
        eprintln!("round {round}: SIGKILL leader {leader} (term {term}), restart after {down:?}");
        cluster.kill_peer(leader);
        std::thread::sleep(down);
        cluster.start_peer(leader);
    }
    cluster.wait_for_leader(ELECTION_WITHIN);
    // Stop the clients once they are acknowledged again with everyone up.
    let acked = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(acked, 30, Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let appends = join_workers(workers);

    cluster.wait_until_converged(Duration::from_secs(10));
    let records = query_log(&cluster, Duration::from_secs(10));
    let duplicates = check_log(&records, &appends);
    eprintln!(
        "{} acknowledged ({} of them after a timed-out attempt), {} unknown, {} timeouts, \
         {duplicates} duplicate slots, log of {} entries; {:?}",
        appends.acked.len(),
        appends.acked_after_retry,
        appends.unknown.len(),
        appends.timeouts,
        records.len(),
        started.elapsed()
    );
    assert!(
        appends.acked.len() >= 100,
        "only {} appends acknowledged",
        appends.acked.len()
    );
    // Each worker retries until acknowledged, so at most its last append (cut off by the end
    // of the run) is left unknown.
    assert!(appends.unknown.len() <= 3, "{:?}", appends.unknown);
    // The claim is about retries: the leader kills must really have made attempts time out,
    // and some appends must have been acknowledged only on a retry.
    assert!(appends.timeouts > 0, "no append attempt timed out");
    assert!(
        appends.acked_after_retry > 0,
        "no append was acknowledged after a timed-out attempt"
    );
}

#[test]
fn a_query_of_5000_entries_pages_correctly() {
    let _serial = common::one_at_a_time();
    let started = Instant::now();
    let mut cluster = Cluster::start("semantics-query", 3);
    cluster.wait_for_leader(ELECTION_WITHIN);

    // Data long enough that the log is several datagrams' worth: paging is not optional.
    let stop = Arc::new(AtomicBool::new(false));
    let prefix = "page-test-entry-with-some-padding";
    let workers = spawn_workers(&cluster, prefix, 4, Duration::from_secs(5), 5, 1250, &stop);
    let appends = join_workers(workers);
    assert!(appends.unknown.is_empty(), "{:?}", appends.unknown);
    assert_eq!(appends.acked.len(), 5000);
    let appended = started.elapsed();

    let records = query_log(&cluster, Duration::from_secs(10));
    assert!(records.len() >= 5000, "{} records", records.len());
    check_log(&records, &appends);
    let data: BTreeSet<&str> = records.iter().filter_map(|r| r.data.as_deref()).collect();
    assert!(
        appends.sent.iter().all(|d| data.contains(d.as_str())),
        "every appended data is in the log"
    );
    let bytes: usize = data.iter().map(|d| d.len()).sum();
    assert!(
        bytes > 3 * MAX_DATAGRAM,
        "the log's data ({bytes} bytes) should span several datagrams"
    );

    // The client binary prints the same log as JSON lines and exits 0.
    let out = cluster.client(&["--timeout-ms", "10000", "query"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let lines = json_lines(&out.stdout);
    // A leader change in between would add a noop at the end; nothing else may differ.
    assert!(
        lines.len() >= records.len(),
        "{} lines, {} records",
        lines.len(),
        records.len()
    );
    for (line, record) in lines.iter().zip(&records) {
        let want: Value = serde_json::to_value(record).unwrap();
        assert_eq!(line, &want, "the binary and the library disagree");
    }
    for extra in &lines[records.len()..] {
        assert_eq!(extra["kind"], "noop", "only a noop can follow: {extra}");
    }
    eprintln!(
        "5000 appends in {appended:?}; {} entries, {bytes} bytes of data, queried both ways; {:?}",
        records.len(),
        started.elapsed()
    );
}

/// One `client status` run: (exit code, its JSON lines).
fn status_lines(cluster: &Cluster) -> (Option<i32>, Vec<Value>) {
    let out = cluster.client(&["--timeout-ms", "500", "status"]);
    (out.status.code(), json_lines(&out.stdout))
}

/// Whether the answering peers agree: exactly one says it is leader, every one names it as
/// leader and is in its term; and exactly the peers in `up` answered. Returns (leader, term).
fn agreement(lines: &[Value], up: &BTreeSet<u64>) -> Option<(u64, u64)> {
    let answered: BTreeSet<u64> = lines
        .iter()
        .filter(|l| l["answered"] == true)
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    if &answered != up {
        return None;
    }
    let answers: Vec<&Value> = lines.iter().filter(|l| l["answered"] == true).collect();
    let leaders: Vec<&&Value> = answers.iter().filter(|l| l["role"] == "leader").collect();
    let [leader] = leaders[..] else {
        return None;
    };
    let (id, term) = (leader["id"].as_u64()?, leader["term"].as_u64()?);
    answers
        .iter()
        .all(|l| l["leader"].as_u64() == Some(id) && l["term"].as_u64() == Some(term))
        .then_some((id, term))
}

/// Polls `client status` until the peers in `up` agree on one leader.
fn wait_for_agreement(cluster: &mut Cluster, up: &BTreeSet<u64>) -> (u64, u64) {
    let what = format!("peers {up:?} did not agree on one leader");
    let (code, lines, agreed) = common::poll_until(ELECTION_WITHIN, &what, || {
        cluster.check_alive();
        let (code, lines) = status_lines(cluster);
        assert_eq!(lines.len(), 3, "one line per peer: {lines:?}");
        match agreement(&lines, up) {
            Some(agreed) => Ok((code, lines, agreed)),
            None => Err(lines
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join("\n")),
        }
    });
    assert_eq!(code, Some(0), "status exits 0 when peers answer: {lines:?}");
    for l in &lines {
        let id = l["id"].as_u64().unwrap();
        if !up.contains(&id) {
            assert!(
                l.get("role").is_none(),
                "a peer that is down has no role: {l}"
            );
        }
    }
    agreed
}

#[test]
fn status_shows_exactly_one_leader() {
    let _serial = common::one_at_a_time();
    let started = Instant::now();
    let mut cluster = Cluster::start("semantics-status", 3);
    let all: BTreeSet<u64> = (1..=3).collect();
    let (leader, term) = wait_for_agreement(&mut cluster, &all);

    // Without the leader, the other two agree on a new one in a later term.
    cluster.kill_peer(leader);
    let rest: BTreeSet<u64> = all.iter().copied().filter(|&id| id != leader).collect();
    let (next, next_term) = wait_for_agreement(&mut cluster, &rest);
    assert_ne!(next, leader);
    assert!(next_term > term, "term {next_term} after term {term}");

    // The old leader comes back as a follower of the new one: pre-vote keeps it from
    // disturbing a leader the others still hear from, so leader and term stay the same.
    cluster.start_peer(leader);
    let (last, last_term) = wait_for_agreement(&mut cluster, &all);
    assert_eq!(
        (last, last_term),
        (next, next_term),
        "the restarted old leader {leader} displaced leader {next}"
    );
    eprintln!(
        "leader {leader} (term {term}), then {next} (term {next_term}), then {last} (term \
         {last_term}); {:?}",
        started.elapsed()
    );
}
