//! Durability on real processes: peers are SIGKILLed (one at a time, or all at once) while
//! clients append, and restarted on the same data dirs; nothing acknowledged may be lost or
//! applied twice. Also: a data dir is never shared or adopted, and a damaged WAL is refused
//! while a torn tail is repaired.
//!
//! The clients are the client library, in-process. Fault schedules come from a seeded
//! generator whose seed is printed; `E2E_SEED=<seed>` replays the same choices. On failure the
//! temp dir (configs, data dirs, each peer's log) is kept and its path printed.

mod common;

use common::{
    check_log, config_json, free_ports, join_workers, query_log, run_peer_expecting_exit,
    spawn_workers, write_json, Appends, Cluster, Rng,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an append waits for an answer before its outcome is unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
const ELECTION_WITHIN: Duration = Duration::from_secs(10);

/// Appends `count` entries from `workers` threads and requires every one acknowledged.
fn append_acked(cluster: &Cluster, prefix: &str, workers: usize, count: usize) -> Appends {
    let stop = Arc::new(AtomicBool::new(false));
    let per_worker = count.div_ceil(workers);
    // Generous retries: with every peer up, each append must end acknowledged.
    let handles = spawn_workers(
        cluster,
        prefix,
        workers,
        CLIENT_TIMEOUT,
        5,
        per_worker,
        &stop,
    );
    let appends = join_workers(handles);
    assert!(
        appends.unknown.is_empty(),
        "with all peers up, appends went unanswered: {:?}",
        appends.unknown
    );
    assert_eq!(appends.acked.len(), per_worker * workers);
    appends
}

/// What a peer read back from its data dir at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Restored {
    term: u64,
    vote: Option<u64>,
    last_index: u64,
}

/// Parses the last start-up line of a peer's log:
/// `... restored term T, vote V, commit C, last index N; ...` with V as `None` or `Some(id)`.
fn restored(log: &str) -> Option<Restored> {
    let line = log.lines().rev().find(|l| l.contains("restored term "))?;
    let after = |key: &str| -> Option<&str> { Some(&line[line.find(key)? + key.len()..]) };
    let number = |text: &str| -> Option<u64> {
        let digits: String = text.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let vote = after(", vote ")?;
    let vote = if vote.starts_with("None") {
        None
    } else {
        Some(number(vote.strip_prefix("Some(")?)?)
    };
    Some(Restored {
        term: number(after("restored term ")?)?,
        vote,
        last_index: number(after("last index ")?)?,
    })
}

/// Waits for the start-up line a peer writes to its log after `offset`.
fn wait_for_restored(cluster: &Cluster, id: u64, offset: usize) -> Restored {
    let what = format!("peer {id} never logged what it restored");
    common::poll_until(Duration::from_secs(5), &what, || {
        let log = cluster.log_text(id);
        restored(&log[offset..]).ok_or(log)
    })
}

#[test]
fn kill_9_of_random_peers_never_loses_an_acknowledged_append() {
    let _serial = common::one_at_a_time();
    let started = Instant::now();
    let mut rng = Rng::from_env("kill_9_of_random_peers_never_loses_an_acknowledged_append");
    let mut cluster = Cluster::start("durability-kill9", 3);
    cluster.wait_for_leader(ELECTION_WITHIN);

    // Two patient clients (a few seconds, retried: nearly always acknowledged) and one
    // impatient one (a quarter second, never retried: its appends around a failover end
    // unknown, and it moves on to new data with a new seq).
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = spawn_workers(&cluster, "patient", 2, CLIENT_TIMEOUT, 3, usize::MAX, &stop);
    workers.extend(spawn_workers(
        &cluster,
        "impatient",
        1,
        Duration::from_millis(250),
        1,
        usize::MAX,
        &stop,
    ));
    let mut status_client = cluster.lib_client(Duration::from_millis(300));
    let mut schedule = Vec::new();
    for round in 0..8 {
        std::thread::sleep(rng.millis(300, 1000));
        cluster.check_alive();
        // The leader half of the time; otherwise one of the others.
        let leader = common::leaders_of(&status_client.status());
        let victim = match leader[..] {
            [(id, _)] if rng.coin() => id,
            [(id, _)] => [1, 2, 3]
                .into_iter()
                .filter(|&p| p != id)
                .nth(rng.below(2) as usize)
                .unwrap(),
            _ => 1 + rng.below(3),
        };
        let was_leader = leader.iter().any(|&(id, _)| id == victim);
        let down = rng.millis(0, 500);
        eprintln!(
            "round {round}: SIGKILL peer {victim}{}, restart after {down:?}",
            if was_leader { " (leader)" } else { "" }
        );
        schedule.push((victim, was_leader, down));
        cluster.kill_peer(victim);
        std::thread::sleep(down);
        cluster.start_peer(victim);
    }
    // Stop the clients once they are acknowledged again with everyone up.
    let acked = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(acked, 30, Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let mut appends = join_workers(workers);

    cluster.wait_for_leader(ELECTION_WITHIN);
    // The cluster still takes appends after all that.
    let after = append_acked(&cluster, "after", 1, 5);
    appends.merge(after);
    let last = cluster.wait_until_converged(Duration::from_secs(10));
    let records = query_log(&cluster, Duration::from_secs(10));
    assert!(
        records.len() as u64 >= last,
        "the query returned {} entries but every peer has {last} committed",
        records.len()
    );
    let duplicates = check_log(&records, &appends);
    let unknown_in_log = appends
        .unknown
        .iter()
        .filter(|d| {
            records
                .iter()
                .any(|r| r.data.as_deref() == Some(d.as_str()))
        })
        .count();
    eprintln!(
        "{} acknowledged, {} unknown ({unknown_in_log} of them in the log), {} timeouts, \
         {} acknowledged after a retry, {} duplicate slots, log of {} entries; \
         leader killed {} of 8 times; {:?}",
        appends.acked.len(),
        appends.unknown.len(),
        appends.timeouts,
        appends.acked_after_retry,
        duplicates,
        records.len(),
        schedule.iter().filter(|s| s.1).count(),
        started.elapsed()
    );
    assert!(
        appends.acked.len() >= 100,
        "only {} appends were acknowledged in the whole run",
        appends.acked.len()
    );
}

#[test]
fn kill_9_of_all_peers_at_once_then_restart_loses_nothing() {
    let _serial = common::one_at_a_time();
    let started = Instant::now();
    let mut cluster = Cluster::start("durability-killall", 3);
    cluster.wait_for_leader(ELECTION_WITHIN);

    let mut appends = append_acked(&cluster, "before", 3, 300);
    check_log(&query_log(&cluster, Duration::from_secs(10)), &appends);
    for round in 0..2 {
        // Mid-stream: some appends are in flight when everything dies.
        let stop = Arc::new(AtomicBool::new(false));
        let acked = cluster.acked.load(Ordering::Relaxed);
        let workers = spawn_workers(
            &cluster,
            &format!("r{round}"),
            2,
            Duration::from_secs(1),
            1,
            usize::MAX,
            &stop,
        );
        cluster.wait_for_acks(acked, 50, Duration::from_secs(10));
        cluster.kill_all();
        stop.store(true, Ordering::Relaxed);
        let in_flight = join_workers(workers);
        eprintln!(
            "round {round}: killed all peers with {} appends acknowledged and {} unknown in the \
             last stream",
            in_flight.acked.len(),
            in_flight.unknown.len()
        );
        appends.merge(in_flight);

        for id in 1..=3 {
            cluster.start_peer(id);
        }
        cluster.wait_for_leader(ELECTION_WITHIN);
        let records = query_log(&cluster, Duration::from_secs(10));
        check_log(&records, &appends);
        let max_acked = appends.acked.values().copied().max().unwrap();
        assert!(records.len() as u64 >= max_acked);

        appends.merge(append_acked(&cluster, &format!("after{round}"), 3, 60));
        check_log(&query_log(&cluster, Duration::from_secs(10)), &appends);
    }
    cluster.wait_until_converged(Duration::from_secs(10));
    eprintln!(
        "{} acknowledged in all; {:?}",
        appends.acked.len(),
        started.elapsed()
    );
}

#[test]
fn a_restarted_peer_keeps_term_vote_and_log() {
    let _serial = common::one_at_a_time();
    let mut cluster = Cluster::start("durability-restart", 3);
    cluster.wait_for_leader(ELECTION_WITHIN);
    let mut appends = append_acked(&cluster, "a", 2, 100);
    let mut client = cluster.lib_client(Duration::from_millis(500));

    // Each follower in turn: SIGKILL, restart, and compare; until both followers were restarted
    // under one leader and term (a leader change in between starts the pair again).
    let mut restarts = Vec::new();
    let mut vote_checked = false;
    for turn in 0..6 {
        let max_acked = appends.acked.values().copied().max().unwrap();
        let last = cluster.wait_until_converged(Duration::from_secs(10));
        let status = client.status();
        let [(leader, term)] = common::leaders_of(&status)[..] else {
            panic!("not one leader: {status:#?}");
        };
        let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
        let follower = followers[turn % 2];
        let before = status
            .into_iter()
            .find(|s| s.id == follower)
            .and_then(|s| s.info)
            .expect("the follower answers status");

        cluster.kill_peer(follower);
        let offset = cluster.log_text(follower).len();
        cluster.start_peer(follower);
        // What it read back from its own data dir, before hearing from anyone.
        let got = wait_for_restored(&cluster, follower, offset);
        eprintln!("peer {follower} (leader {leader}, term {term}) restored {got:?}; before the kill: {before:?}");
        assert!(
            got.term >= before.term,
            "peer {follower} restored term {}, below its term {} before the kill",
            got.term,
            before.term
        );
        assert!(
            got.last_index >= max_acked && got.last_index >= before.last_index,
            "peer {follower} restored a log of {} entries; it had {} and {max_acked} were \
             acknowledged",
            got.last_index,
            before.last_index
        );
        if let Some(v) = got.vote {
            assert!(
                (1..=3).contains(&v),
                "peer {follower} restored a vote for {v}"
            );
        }

        // And it rejoins: same log length as the others, term not below the old one.
        let rejoined = cluster.wait_until_converged(Duration::from_secs(10));
        assert!(rejoined >= last);
        let after = client
            .status()
            .into_iter()
            .find(|s| s.id == follower)
            .and_then(|s| s.info)
            .expect("the restarted follower answers status");
        assert!(after.term >= before.term, "{after:?} vs {before:?}");
        assert_eq!(after.last_index, rejoined);
        restarts.push((leader, term, follower, got));

        appends.merge(append_acked(&cluster, &format!("b{turn}"), 1, 20));

        // The leader of term T won a vote of one of its two followers in T (Raft §5.2). Once
        // both were restarted under that same leader and term, and both came back in T, at
        // least one of them must have restored that vote.
        if let [.., (l0, t0, f0, r0), (l1, t1, f1, r1)] = &restarts[..] {
            if l0 == l1 && t0 == t1 && f0 != f1 && r0.term == *t0 && r1.term == *t1 {
                assert!(
                    r0.vote == Some(*l0) || r1.vote == Some(*l0),
                    "leader {l0} of term {t0} was elected, yet neither follower restored a \
                     vote for it: {r0:?}, {r1:?}"
                );
                vote_checked = true;
                break;
            }
        }
    }
    assert!(
        vote_checked,
        "no two followers were restarted under one leader and term: {restarts:?}"
    );
    check_log(&query_log(&cluster, Duration::from_secs(10)), &appends);
}

#[test]
fn a_data_dir_in_use_or_of_another_node_is_refused() {
    let _serial = common::one_at_a_time();
    let mut cluster = Cluster::start("durability-refused", 3);
    cluster.wait_for_leader(ELECTION_WITHIN);
    let dir = cluster.dir.0.clone();
    let within = Duration::from_secs(5);
    let cluster_config = |id: u64| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&cluster.configs[&id]).unwrap()).unwrap()
    };

    // Peer 1's config and data dir, on another port: the lock stops it.
    let [spare] = free_ports(1)[..] else {
        unreachable!()
    };
    let mut twin = cluster_config(1);
    twin["port"] = spare.into();
    let twin_path = dir.join("twin.json");
    write_json(&twin_path, &twin);
    let (code, out) = run_peer_expecting_exit(&dir, &twin_path, within);
    assert_ne!(code, Some(0), "a second peer on data dir in use: {out}");
    assert!(
        out.contains("in use") && out.contains("LOCK"),
        "the refusal names the lock: {out}"
    );
    assert!(
        out.contains("data-peer1"),
        "the refusal names the dir: {out}"
    );

    // A node 7 pointed at peer 2's data dir: the owner check stops it.
    let [spare] = free_ports(1)[..] else {
        unreachable!()
    };
    let mut stranger = cluster_config(2);
    stranger["node_ID"] = 7.into();
    stranger["port"] = spare.into();
    let stranger_path = dir.join("stranger.json");
    write_json(&stranger_path, &stranger);
    cluster.stop_peer(2);
    let (code, out) = run_peer_expecting_exit(&dir, &stranger_path, within);
    assert_eq!(code, Some(1), "node 7 on node 2's data dir: {out}");
    assert!(
        out.contains("node 2") && out.contains("node 7"),
        "the refusal names both IDs: {out}"
    );
    cluster.start_peer(2);

    // A port that is in use (peer 3's), with a fresh data dir.
    let ports: Vec<u16> = cluster
        .addresses()
        .values()
        .map(|a| a.port())
        .collect::<Vec<_>>();
    let mut squatter = config_json(&dir, &ports, 3);
    squatter["data_dir"] = dir.join("data-squatter").to_string_lossy().as_ref().into();
    let squatter_path = dir.join("squatter.json");
    write_json(&squatter_path, &squatter);
    let (code, out) = run_peer_expecting_exit(&dir, &squatter_path, within);
    assert_eq!(code, Some(1), "a peer on a port in use: {out}");
    assert!(
        out.contains("in use") && out.contains(&ports[2].to_string()),
        "the refusal names the address and says it is in use: {out}"
    );

    // A malformed config.
    let broken_path = dir.join("broken.json");
    std::fs::write(&broken_path, "{ \"name\": \"peer1\", \"node_ID\": ").unwrap();
    let (code, out) = run_peer_expecting_exit(&dir, &broken_path, within);
    assert_eq!(code, Some(1), "a malformed config: {out}");
    let first_error = out
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line: {out}"));
    assert!(
        first_error.starts_with("error: config ") && first_error.contains("broken.json"),
        "the error names the config file: {out}"
    );

    // None of this disturbed the cluster.
    cluster.wait_until_converged(Duration::from_secs(10));
    let appends = append_acked(&cluster, "still", 1, 3);
    check_log(&query_log(&cluster, Duration::from_secs(10)), &appends);
}

#[test]
fn a_corrupt_wal_is_refused_and_a_torn_tail_is_repaired() {
    let _serial = common::one_at_a_time();
    let mut cluster = Cluster::start("durability-corrupt", 3);
    let (leader, _) = cluster.wait_for_leader(ELECTION_WITHIN);
    let appends = append_acked(&cluster, "w", 2, 200);
    let last = cluster.wait_until_converged(Duration::from_secs(10));

    let victim = if leader == 3 { 2 } else { 3 };
    cluster.stop_peer(victim);
    let wal = cluster.data_dir(victim).join("wal");
    // Its frames, without the zeros the segment was preallocated with.
    let mut original = std::fs::read(&wal).unwrap();
    original.truncate(common::wal_frames_end(&original));
    assert!(original.len() > 1000, "wal of {} bytes", original.len());

    // A flipped byte in the middle: damage after a sync, not a torn write.
    let middle = original.len() / 2;
    let mut damaged = original.clone();
    damaged[middle] ^= 0xff;
    std::fs::write(&wal, &damaged).unwrap();
    let (code, out) = run_peer_expecting_exit(
        &cluster.dir.0,
        &cluster.configs[&victim],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(1), "a peer with a damaged wal: {out}");
    let error = out
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line: {out}"));
    assert!(
        error.contains(&wal.display().to_string()) && error.contains("offset"),
        "the error names the file and an offset: {error}"
    );
    assert_eq!(
        std::fs::read(&wal).unwrap(),
        damaged,
        "a refused wal is left as it was"
    );

    // Restored, plus half a frame at the end: a torn write, cut off with a warning.
    let mut torn = original.clone();
    torn.extend_from_slice(&1000u32.to_le_bytes());
    torn.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    torn.extend_from_slice(&[0xab; 100]);
    std::fs::write(&wal, &torn).unwrap();
    let log_before = cluster.log_text(victim).len();
    cluster.start_peer(victim);
    let converged = cluster.wait_until_converged(Duration::from_secs(10));
    assert!(converged >= last);
    let log = cluster.log_text(victim)[log_before..].to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("torn")),
        "the repair is logged as a warning:\n{log}"
    );
    let restored_last = restored(&log)
        .expect("the peer logs what it restored")
        .last_index;
    assert!(
        restored_last >= last,
        "peer {victim} restored {restored_last} entries of its own; it had {last}"
    );
    assert_eq!(
        std::fs::read(&wal).unwrap()[..original.len()],
        original[..],
        "the repair keeps every complete frame"
    );
    check_log(&query_log(&cluster, Duration::from_secs(10)), &appends);

    // It still serves as a full member: with the other follower down, it forms the majority.
    let other = (1..=3).find(|&id| id != leader && id != victim).unwrap();
    cluster.kill_peer(other);
    let more = append_acked(&cluster, "x", 1, 5);
    let mut all = appends;
    all.merge(more);
    check_log(&query_log(&cluster, Duration::from_secs(10)), &all);
    assert!(
        BTreeSet::from_iter(all.acked.values()).len() == all.acked.len(),
        "no two appends share an index"
    );
}
