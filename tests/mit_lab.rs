//! The MIT 6.5840 Raft lab scenarios (3A-3C), by name, on the deterministic simulator.
//! Every scenario also runs the simulator's per-event safety checks.

mod sim;

use raft::raft::{Index, NodeId, Payload, Role};
use sim::{seeds, Sim, SimConfig, MS};

/// The lab's `one()`: submit `data` through a retrying client and wait until it is committed
/// on at least `expected` nodes. Returns its index.
fn one(s: &mut Sim, data: &str, expected: usize) -> Index {
    let c = s.add_client();
    s.client_append(c, data);
    if !s.run_until(10_000 * MS, |s| !s.client_busy(c)) {
        s.fail(&format!("one({data:?}) not acknowledged"));
    }
    let Some(sim::Op::Append { index, .. }) = s.clients[c].done.last().cloned() else {
        s.fail("expected an append");
    };
    if !s.run_until(2_000 * MS, |s| s.n_committed(index) >= expected) {
        s.fail(&format!(
            "one({data:?}) committed on {} < {expected} nodes",
            s.n_committed(index)
        ));
    }
    index
}

fn others(s: &Sim, id: NodeId) -> Vec<NodeId> {
    s.ids.iter().copied().filter(|&i| i != id).collect()
}

#[test]
fn initial_election_3a() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let term = s.node(leader).unwrap().term();
        assert!(term >= 1);
        s.run_for(2_000 * MS);
        assert_eq!(
            s.node(leader).unwrap().term(),
            term,
            "seed {seed}: term changed"
        );
    }
}

#[test]
fn re_election_3a() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let l1 = s.wait_for_leader(2_000 * MS);
        s.disconnect(l1);
        let elected = s.run_until(3_000 * MS, |s| s.stable_leader().is_some_and(|l| l != l1));
        assert!(elected, "seed {seed}: no new leader");
        let l2 = s.stable_leader().unwrap();
        // The old leader rejoining does not disturb the new one.
        s.connect(l1);
        s.run_for(1_000 * MS);
        assert_eq!(s.stable_leader(), Some(l2), "seed {seed}");
        // No quorum, no leader: once check quorum has had time to depose l2 (two minimum
        // election timeouts), none of the three, each alone, may be leader.
        let o = others(&s, l2);
        s.disconnect(l2);
        s.disconnect(o[0]);
        let all = s.ids.clone();
        s.assert_no_leader_among(&all, 400 * MS, 2_000 * MS);
        s.connect(o[0]);
        s.wait_for_leader(3_000 * MS);
        s.connect(l2);
        s.wait_for_leader(3_000 * MS);
    }
}

#[test]
fn many_elections_3a() {
    // Ten rounds of three (not necessarily distinct) nodes of seven disconnected: the four or
    // more still connected must have a leader. Every other round the leader is among the
    // three, so a new one must be elected among the connected (the old one, cut off, still
    // believes it leads until check quorum deposes it, and is not counted), in a later term.
    const ROUNDS: usize = 10;
    for seed in seeds(50) {
        let mut s = Sim::new(seed, SimConfig::reliable(7));
        let mut leader = s.wait_for_leader(2_000 * MS);
        let (start, mut re_elections) = (s.now, 0);
        for round in 0..ROUNDS {
            let ids = s.ids.clone();
            let mut down: Vec<NodeId> = (0..3).map(|_| s.rng.pick(&ids)).collect();
            if round % 2 == 0 {
                down[0] = leader;
            }
            for &d in &down {
                s.disconnect(d);
            }
            let connected: Vec<NodeId> =
                ids.iter().copied().filter(|i| !down.contains(i)).collect();
            let term = s.node(leader).unwrap().term();
            let new = s.wait_for_leader_among(&connected, 5_000 * MS);
            if down.contains(&leader) {
                assert_ne!(new, leader, "seed {seed}: round {round}");
                let new_term = s.node(new).unwrap().term();
                assert!(
                    new_term > term,
                    "seed {seed}: round {round}: new leader {new} in term {new_term}, the old one's was {term}"
                );
                re_elections += 1;
            }
            for &d in &down {
                s.connect(d);
            }
            leader = s.wait_for_leader(5_000 * MS);
        }
        assert!(
            re_elections >= ROUNDS / 2,
            "seed {seed}: only {re_elections} re-elections"
        );
        println!(
            "seed {seed}: {re_elections} re-elections in {} ms of virtual time, last term {}",
            (s.now - start) / MS,
            s.node(leader).unwrap().term()
        );
    }
}

#[test]
fn basic_agree_3b() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        s.wait_for_leader(2_000 * MS);
        let mut prev = one(&mut s, "agree1", 3);
        for k in 2..=3 {
            let index = one(&mut s, &format!("agree{k}"), 3);
            assert_eq!(index, prev + 1, "seed {seed}: index skipped");
            prev = index;
        }
        s.check_client_history();
    }
}

#[test]
fn fail_agree_3b() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        one(&mut s, "101", 3);
        let follower = others(&s, leader)[0];
        s.disconnect(follower);
        for v in ["102", "103", "104", "105"] {
            one(&mut s, v, 2);
        }
        s.connect(follower);
        one(&mut s, "106", 3);
        one(&mut s, "107", 3);
        s.check_client_history();
    }
}

#[test]
fn fail_no_agree_3b() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        let leader = s.wait_for_leader(2_000 * MS);
        one(&mut s, "10", 5);
        let o = others(&s, leader);
        for &f in &o[..3] {
            s.disconnect(f);
        }
        let index = s.propose_once(leader, "20");
        s.run_for(2_000 * MS);
        assert_eq!(
            s.n_committed(index),
            0,
            "seed {seed}: committed without majority"
        );
        for &f in &o[..3] {
            s.connect(f);
        }
        s.wait_for_leader(3_000 * MS);
        one(&mut s, "30", 5);
        s.check_client_history();
    }
}

#[test]
fn concurrent_starts_3b() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let term = s.node(leader).unwrap().term();
        let clients: Vec<usize> = (0..5).map(|_| s.add_client()).collect();
        for (k, &c) in clients.iter().enumerate() {
            s.clients[c].target_node(leader);
            s.client_append(c, &format!("cs{k}"));
        }
        let ok = s.run_until(2_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
        assert!(ok, "seed {seed}");
        assert_eq!(
            s.node(leader).unwrap().term(),
            term,
            "seed {seed}: term changed"
        );
        s.check_client_history();
    }
}

#[test]
fn rejoin_3b() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        one(&mut s, "101", 3);
        let l1 = s.stable_leader().unwrap();
        s.disconnect(l1);
        // The old leader takes entries it cannot commit.
        for v in ["102", "103", "104"] {
            s.propose_once(l1, v);
        }
        s.wait_for_leader(3_000 * MS);
        one(&mut s, "103b", 2);
        let l2 = s.stable_leader().unwrap();
        s.disconnect(l2);
        s.connect(l1);
        one(&mut s, "104b", 2);
        s.connect(l2);
        one(&mut s, "105", 3);
        s.check_client_history();
    }
}

#[test]
fn backup_3b() {
    // A leader and one follower take 50 entries they cannot commit; the other three commit
    // 50 of their own. Then that group's leader is cut off with one follower and takes 50 more.
    // Then the first leader, its follower (both with 50 stale entries) and the one node of the
    // second group that has the 50 committed entries form a majority: they must replace the
    // stale entries and commit 50 more. Finally everyone converges.
    for seed in seeds(30) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        one(&mut s, "start", 5);
        let leader1 = s.stable_leader().unwrap();
        let ring = |k: u64| (leader1 - 1 + k) % 5 + 1;
        for k in 2..5 {
            s.disconnect(ring(k));
        }
        for k in 0..50 {
            s.propose_once(leader1, &format!("lost1-{k}"));
        }
        s.run_for(150 * MS);
        s.disconnect(ring(0));
        s.disconnect(ring(1));
        for k in 2..5 {
            s.connect(ring(k));
        }
        for k in 0..50 {
            one(&mut s, &format!("kept1-{k}"), 3);
        }
        let leader2 = s.stable_leader().unwrap();
        let mut other = ring(2);
        if leader2 == other {
            other = leader2 % 5 + 1;
        }
        s.disconnect(other);
        for k in 0..50 {
            s.propose_once(leader2, &format!("lost2-{k}"));
        }
        s.run_for(150 * MS);
        for id in s.ids.clone() {
            s.disconnect(id);
        }
        s.connect(ring(0));
        s.connect(ring(1));
        s.connect(other);
        let mut last = 0;
        for k in 0..50 {
            last = one(&mut s, &format!("kept2-{k}"), 3);
        }
        // `one` saw three nodes commit it: the only three connected.
        let group = [ring(0), ring(1), other];
        assert!(
            group
                .iter()
                .all(|&i| s.node(i).unwrap().commit_index() >= last),
            "seed {seed}: the old leader's group did not commit over its stale log"
        );
        for id in s.ids.clone() {
            s.connect(id);
        }
        let end = one(&mut s, "end", 5);
        assert!(
            s.run_until(2_000 * MS, |s| s.n_committed(end) == 5),
            "seed {seed}"
        );
        s.check_client_history();
        let log = s.committed_log();
        for lost in ["lost1-", "lost2-"] {
            assert!(
                !log.iter().any(|e| matches!(&e.payload,
                    Payload::Data { data, .. } if data.starts_with(lost))),
                "seed {seed}: an entry no majority stored was committed"
            );
        }
    }
}

#[test]
fn rpc_bytes_3b() {
    // Each command goes to each follower about once: the bytes sent to followers are close to
    // (n - 1) x the commands' bytes, and all peer traffic within the lab's bound.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let mut index = one(&mut s, "99", 3);
        let leader = s.stable_leader().unwrap();
        s.count_bytes = true;
        let mut sent = 0;
        for _ in 0..10 {
            let cmd: String = (0..5000)
                .map(|_| (b'a' + s.rng.below(26) as u8) as char)
                .collect();
            let x = one(&mut s, &cmd, 3);
            assert_eq!(x, index + 1, "seed {seed}: index skipped");
            index = x;
            sent += cmd.len() as u64;
        }
        assert_eq!(
            s.stable_leader(),
            Some(leader),
            "seed {seed}: leader changed"
        );
        let to_followers: u64 = s
            .bytes_by_link
            .iter()
            .filter(|((from, _), _)| *from == leader)
            .map(|(_, b)| b)
            .sum();
        let total: u64 = s.bytes_by_link.values().sum();
        assert!(
            (2 * sent..=2 * sent + 50_000).contains(&to_followers),
            "seed {seed}: {to_followers} bytes to followers for {sent} bytes of commands"
        );
        assert!(
            total <= 3 * sent + 50_000,
            "seed {seed}: {total} bytes in all for {sent} bytes of commands"
        );
    }
}

#[test]
fn follower_failure_3b() {
    // Agreement continues without one follower; without both, nothing commits.
    for seed in seeds(50) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        one(&mut s, "101", 3);
        let leader1 = s.stable_leader().unwrap();
        s.disconnect(others(&s, leader1)[0]);
        one(&mut s, "102", 2);
        s.run_for(300 * MS);
        one(&mut s, "103", 2);
        let leader2 = s.stable_leader().unwrap();
        for f in others(&s, leader2) {
            s.disconnect(f);
        }
        assert_eq!(s.node(leader2).unwrap().role(), Role::Leader, "seed {seed}");
        let before = s.node(leader2).unwrap().log().last_index();
        let index = s.propose_once(leader2, "104");
        assert_eq!(
            index,
            before + 1,
            "seed {seed}: the leader did not take the command"
        );
        s.run_for(600 * MS);
        assert_eq!(
            s.n_committed(index),
            0,
            "seed {seed}: committed without a majority"
        );
        s.check_client_history();
    }
}

#[test]
fn leader_failure_3b() {
    // Without the leader the others agree; without the new leader too, nothing commits,
    // whoever is handed the command.
    for seed in seeds(50) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        one(&mut s, "101", 3);
        let leader1 = s.stable_leader().unwrap();
        s.disconnect(leader1);
        one(&mut s, "102", 2);
        s.run_for(300 * MS);
        one(&mut s, "103", 2);
        let leader2 = s.stable_leader().unwrap();
        s.disconnect(leader2);
        let committed = s.max_commit();
        for id in s.ids.clone() {
            s.propose_once(id, "104");
        }
        s.run_for(600 * MS);
        assert_eq!(
            s.max_commit(),
            committed,
            "seed {seed}: committed without a majority"
        );
        s.check_client_history();
    }
}

#[test]
fn count_3b() {
    // Message counts, as datagrams (a request and its answer count as two).
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        s.wait_for_leader(2_000 * MS);
        let election = s.sent;
        // The lab's bound is 30 RPCs, in datagrams (request and answer) 60. A first round that
        // splits the vote costs a second pre-vote and vote round: 35 datagrams were seen once
        // (seed 1796616490601371) against the 30 this test asked before, which only the
        // quietest elections meet.
        assert!(
            election <= 2 * 30,
            "seed {seed}: {election} datagrams to elect a leader"
        );
        s.run_for(100 * MS);
        let before = s.sent;
        for k in 0..10 {
            one(&mut s, &format!("count{k}"), 3);
        }
        let agreements = s.sent - before;
        // The lab's bound, (iterations + 1 + 3) RPCs per server, in datagrams (request and
        // answer): AppendEntries per agreement plus the heartbeats that carry the commit index.
        let bound = 2 * (10 + 1 + 3) * 3;
        assert!(
            agreements <= bound,
            "seed {seed}: {agreements} datagrams for 10 agreements (bound {bound})"
        );
        let before = s.sent;
        s.run_for(1_000 * MS);
        let idle = s.sent - before;
        // Heartbeats every 50 ms to two followers, answered: about 80 per second.
        assert!(
            idle <= 90,
            "seed {seed}: {idle} datagrams while idle for 1 s"
        );
    }
}

#[test]
fn persist1_3c() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        one(&mut s, "11", 3);
        for id in s.ids.clone() {
            s.crash(id);
        }
        for id in s.ids.clone() {
            s.restart(id);
        }
        one(&mut s, "12", 3);
        let leader = s.stable_leader().unwrap();
        s.crash(leader);
        s.restart(leader);
        one(&mut s, "13", 3);
        let leader = s.stable_leader().unwrap();
        s.crash(leader);
        one(&mut s, "14", 2);
        s.restart(leader);
        let i4 = one(&mut s, "15", 3);
        assert!(s.run_until(2_000 * MS, |s| s.n_committed(i4) == 3));
        s.check_client_history();
    }
}

#[test]
fn persist2_3c() {
    for seed in seeds(50) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        let mut k = 0;
        for _ in 0..5 {
            k += 1;
            one(&mut s, &format!("p{k}"), 5);
            let leader = s.stable_leader().unwrap();
            let o = others(&s, leader);
            s.crash(o[0]);
            s.crash(o[1]);
            k += 1;
            one(&mut s, &format!("p{k}"), 3);
            s.crash(leader);
            s.crash(o[2]);
            s.crash(o[3]);
            s.restart(o[0]);
            s.restart(o[1]);
            s.run_for(200 * MS);
            s.restart(o[2]);
            k += 1;
            one(&mut s, &format!("p{k}"), 3);
            s.restart(o[3]);
            s.restart(leader);
        }
        one(&mut s, "final", 5);
        s.check_client_history();
    }
}

#[test]
fn persist3_3c() {
    // A leader crashes after appending but before its entry is committed.
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        one(&mut s, "101", 3);
        let leader = s.stable_leader().unwrap();
        let o = others(&s, leader);
        s.disconnect(o[1]);
        one(&mut s, "102", 2);
        s.crash(o[0]);
        s.crash(leader);
        s.connect(o[1]);
        s.restart(o[0]);
        one(&mut s, "103", 2);
        s.restart(leader);
        one(&mut s, "104", 3);
        s.check_client_history();
    }
}

#[test]
fn figure_8_3c() {
    for seed in seeds(20) {
        figure8(seed, false);
    }
}

#[test]
fn figure_8_unreliable_3c() {
    for seed in seeds(20) {
        figure8(seed, true);
    }
}

/// Figure 8 as the lab runs it, 1,000 iterations (and at least 50 elections): every live node
/// is handed a command, time passes (usually under 13 ms, sometimes up to 500 ms), and the
/// leader that took it crashes (reliable) or, half the time, is disconnected (unreliable; long
/// reordering from iteration 200 on); a majority is brought back whenever fewer than three
/// remain. Then all must agree.
fn figure8(seed: u64, unreliable: bool) {
    let cfg = if unreliable {
        SimConfig::unreliable(5)
    } else {
        SimConfig::reliable(5)
    };
    let mut s = Sim::new(seed, cfg);
    one(&mut s, "start", 1);
    let mut up = s.ids.len();
    // The lab's 1,000 iterations, and more if needed for 50 elections: with long reordering
    // an election can take seconds.
    let mut k = 0;
    while k < 1_000 || (s.elections() < 50 && k < 10_000) {
        k += 1;
        if unreliable && k == 200 {
            s.cfg.long_delay = 0.2;
        }
        let mut leader = None;
        for id in s.ids.clone() {
            let lead = s.node(id).is_some_and(|n| n.role() == Role::Leader);
            s.propose_once(id, &format!("f{k}.{id}"));
            if lead && s.is_connected(id) {
                leader = Some(id);
            }
        }
        let pause = if s.rng.chance(0.1) {
            s.rng.range(0, 500) * MS
        } else {
            s.rng.range(0, 13) * MS
        };
        s.run_for(pause);
        if let Some(l) = leader {
            if !unreliable {
                s.crash(l);
                up -= 1;
            } else if s.rng.chance(0.5) {
                s.disconnect(l);
                up -= 1;
            }
        }
        if up < 3 {
            let pick = s.rng.pick(&s.ids.clone());
            if !unreliable && !s.is_up(pick) {
                s.restart(pick);
                up += 1;
            } else if unreliable && !s.is_connected(pick) {
                s.connect(pick);
                up += 1;
            }
        }
    }
    for id in s.ids.clone() {
        s.restart(id);
        s.connect(id);
    }
    let end = one(&mut s, "end", 5);
    assert!(
        s.run_until(10_000 * MS, |s| s.n_committed(end) == 5),
        "seed {seed}"
    );
    s.check_client_history();
    println!(
        "seed {seed}: {} leaders elected, {} crashes, {} datagrams long-delayed, log of {}",
        s.elections(),
        s.stats.crashes,
        s.stats.long_delayed,
        end
    );
    assert!(
        s.elections() >= 50,
        "seed {seed}: only {} leaders elected",
        s.elections()
    );
}

#[test]
fn unreliable_agree_3c() {
    // 49 rounds of four concurrent appends and one awaited one (245 in all) over a lossy
    // network; then, reliable again, all five must hold every one of them.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::unreliable(5));
        let mut clients = Vec::new();
        for round in 1..50 {
            for j in 0..4 {
                let c = s.add_client();
                s.client_append(c, &format!("u{round}.{j}"));
                clients.push(c);
            }
            one(&mut s, &format!("u{round}"), 1);
        }
        s.cfg.drop = 0.0;
        s.cfg.duplicate = 0.0;
        let ok = s.run_until(20_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
        assert!(ok, "seed {seed}: not all agreed");
        let last = one(&mut s, "100", 5);
        assert_eq!(s.acked_appends(), 246, "seed {seed}");
        assert!(
            s.run_until(2_000 * MS, |s| s.n_committed(last) == 5),
            "seed {seed}"
        );
        s.check_client_history();
    }
}

#[test]
fn reliable_churn_3c() {
    churn_seeds(SimConfig::reliable(5));
}

#[test]
fn unreliable_churn_3c() {
    churn_seeds(SimConfig::unreliable(5));
}

/// Runs [`churn`] over the seeds. A seed may see the cluster down most of the time and little
/// acknowledged, so the minimum of activity is asked of the seeds together.
fn churn_seeds(cfg: SimConfig) {
    let list = seeds(20);
    let acked: usize = list.iter().map(|&seed| churn(seed, cfg.clone())).sum();
    println!("{acked} appends acknowledged over {} seeds", list.len());
    assert!(
        acked >= 20 * list.len() || list.len() < 10,
        "only {acked} appends acknowledged over {} seeds",
        list.len()
    );
}

/// Three clients append back to back while, every 150 ms or so (less than an election
/// timeout, so the cluster rarely settles), a node may be disconnected, restarted and
/// reconnected, or crashed; nothing keeps a majority up. Then everything is healed, and every
/// acknowledged append must be in the log all five agree on.
fn churn(seed: u64, cfg: SimConfig) -> usize {
    let mut s = Sim::new(seed, cfg);
    let clients: Vec<usize> = (0..3).map(|_| s.add_client()).collect();
    for &c in &clients {
        s.keep_busy(c, 1.0);
    }
    for _ in 0..50 {
        if s.rng.chance(0.2) {
            let id = s.rng.pick(&s.ids.clone());
            s.disconnect(id);
        }
        if s.rng.chance(0.5) {
            let id = s.rng.pick(&s.ids.clone());
            s.restart(id);
            s.connect(id);
        }
        if s.rng.chance(0.2) {
            let id = s.rng.pick(&s.ids.clone());
            s.crash(id);
        }
        let pause = s.rng.range(100, 200) * MS;
        s.run_for(pause);
    }
    s.run_for(300 * MS);
    s.cfg.drop = 0.0;
    s.cfg.duplicate = 0.0;
    for id in s.ids.clone() {
        s.restart(id);
        s.connect(id);
    }
    s.stop_clients();
    if !s.run_until(20_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c))) {
        s.fail("churn: clients did not finish");
    }
    let last = one(&mut s, "end", 5);
    assert!(s.run_until(2_000 * MS, |s| s.n_committed(last) == 5));
    s.check_client_history();
    let acked = s.acked_appends();
    println!(
        "seed {seed}: {acked} appends acknowledged, {} elections",
        s.elections()
    );
    acked
}

// ---- 3D: log compaction ------------------------------------------------------------------------

/// Snapshots every 10 entries, keeping 3 (the lab's `SnapShotInterval` is 10), on the real
/// storage code: a snapshot streams the store's real records.
const SNAPSHOT_INTERVAL: u64 = 10;

fn snapshot_config(nodes: usize, reliable: bool) -> SimConfig {
    let mut cfg = if reliable {
        SimConfig::reliable(nodes)
    } else {
        SimConfig::unreliable(nodes)
    };
    cfg.snapshot_every = Some((SNAPSHOT_INTERVAL, 3));
    cfg
}

/// The lab's log-size check: with every entry committed, no node keeps much more than a
/// snapshot interval of entries in its log.
fn check_log_size(s: &Sim) {
    for id in s.up_nodes() {
        let log = s.node(id).unwrap().log();
        if log.entries().len() as u64 > 2 * SNAPSHOT_INTERVAL + 10 {
            s.fail(&format!(
                "node {id} keeps {} entries after {:?}: not compacted",
                log.entries().len(),
                log.base()
            ));
        }
    }
}

/// The lab's `snapcommon`: 30 iterations, each sending more than a snapshot interval of
/// commands through the leader while one follower (the victim) is disconnected or crashed; the
/// victim must then catch up, by InstallSnapshot since the others compacted what it lacks.
/// Returns the snapshots installed.
fn snapcommon(seed: u64, disconnect: bool, reliable: bool, crash: bool) -> u64 {
    let mut s = Sim::new(seed, snapshot_config(3, reliable));
    let n = s.ids.len();
    let mut k = 0;
    let data = |k: &mut u64| {
        *k += 1;
        format!("s{k}")
    };
    one(&mut s, &data(&mut k), n);
    for i in 0..30 {
        let leader = s.wait_for_leader(5_000 * MS);
        let victim = others(&s, leader)[i % 2];
        if disconnect {
            s.disconnect(victim);
            one(&mut s, &data(&mut k), n - 1);
        }
        if crash {
            s.crash(victim);
            one(&mut s, &data(&mut k), n - 1);
        }
        // Many commands at once, as the lab's Start() without waiting.
        let sender = s.stable_leader().unwrap_or(leader);
        for _ in 0..=SNAPSHOT_INTERVAL {
            let d = data(&mut k);
            s.propose_once(sender, &d);
        }
        one(&mut s, &data(&mut k), n - 1);
        check_log_size(&s);
        if disconnect {
            s.connect(victim);
            one(&mut s, &data(&mut k), n);
        }
        if crash {
            s.restart(victim);
            one(&mut s, &data(&mut k), n);
        }
        check_log_size(&s);
    }
    s.check_client_history();
    if s.stats.snapshots < 30 {
        s.fail(&format!("only {} snapshots taken", s.stats.snapshots));
    }
    if (disconnect || crash) && s.stats.installs == 0 {
        s.fail("no snapshot was installed");
    }
    s.stats.installs
}

fn snapcommon_seeds(disconnect: bool, reliable: bool, crash: bool) {
    let list = seeds(10);
    let installs: u64 = list
        .iter()
        .map(|&seed| snapcommon(seed, disconnect, reliable, crash))
        .sum();
    println!("{installs} snapshots installed over {} seeds", list.len());
}

#[test]
fn snapshot_basic_3d() {
    // With offset 0, seed 7 is the one that found a follower installing the leader's snapshot
    // at 10 after acknowledging entries up to 13, losing 11..=13 (now answered as done).
    snapcommon_seeds(false, true, false);
}

#[test]
fn snapshot_install_3d() {
    snapcommon_seeds(true, true, false);
}

#[test]
fn snapshot_install_unreliable_3d() {
    snapcommon_seeds(true, false, false);
}

#[test]
fn snapshot_install_crash_3d() {
    snapcommon_seeds(false, true, true);
}

#[test]
fn snapshot_install_uncrash_3d() {
    snapcommon_seeds(false, false, true);
}

#[test]
fn snapshot_all_crash_3d() {
    // Every node crashes after some snapshots and restarts from its snapshot and WAL: the log
    // continues where it was.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, snapshot_config(3, true));
        let n = s.ids.len();
        one(&mut s, "start", n);
        for i in 0..5 {
            let count = SNAPSHOT_INTERVAL / 2 + s.rng.range(0, SNAPSHOT_INTERVAL);
            for j in 0..count {
                one(&mut s, &format!("a{i}.{j}"), n);
            }
            let index1 = one(&mut s, &format!("b{i}"), n);
            for id in s.ids.clone() {
                s.crash(id);
            }
            for id in s.ids.clone() {
                s.restart(id);
            }
            let index2 = one(&mut s, &format!("c{i}"), n);
            assert!(index2 > index1, "seed {seed}: {index2} after {index1}");
        }
        s.check_client_history();
        assert!(s.stats.snapshots >= 3 * 3, "seed {seed}: {:?}", s.stats);
    }
}

#[test]
fn snapshot_init_3d() {
    // A restarted node's state comes from its snapshot: the core is restored at the snapshot's
    // index, then applies only what follows it.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, snapshot_config(3, true));
        let n = s.ids.len();
        one(&mut s, "start", n);
        for j in 0..=SNAPSHOT_INTERVAL {
            one(&mut s, &format!("i{j}"), n);
        }
        for round in 0..2 {
            for id in s.ids.clone() {
                s.crash(id);
            }
            for id in s.ids.clone() {
                s.restart(id);
                let snap = s.disks[&id].snapshot_index();
                let node = s.node(id).unwrap();
                assert!(
                    snap >= SNAPSHOT_INTERVAL,
                    "seed {seed}: node {id} has no snapshot"
                );
                assert_eq!(
                    node.snapshot_id().map(|i| i.index),
                    Some(snap),
                    "seed {seed}"
                );
                assert!(node.applied_index() >= snap, "seed {seed}");
                // The real WAL drops compacted entries a segment at a time: those at or
                // below the snapshot that its segments still hold are back in the log (not
                // applied again) until the next snapshot compacts it.
                assert!(
                    node.log().base().0 <= snap && node.log().last_index() >= snap,
                    "seed {seed}: node {id}'s log after {:?} to {} does not continue its \
                     snapshot at {snap}",
                    node.log().base(),
                    node.log().last_index()
                );
            }
            one(&mut s, &format!("after{round}"), n);
        }
        s.check_client_history();
    }
}
