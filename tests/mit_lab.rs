//! The MIT 6.5840 Raft lab scenarios (3A-3C), by name, on the deterministic simulator.
//! Every scenario also runs the simulator's per-event safety checks.

mod sim;

use raft::raft::{Index, NodeId};
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
    for seed in seeds(50) {
        let mut s = Sim::new(seed, SimConfig::reliable(7));
        s.wait_for_leader(2_000 * MS);
        for _ in 0..10 {
            let ids = s.ids.clone();
            let down: Vec<NodeId> = (0..3).map(|_| s.rng.pick(&ids)).collect();
            for &d in &down {
                s.disconnect(d);
            }
            // At least four of seven remain connected: they must (re)elect a leader.
            s.wait_for_leader(5_000 * MS);
            for &d in &down {
                s.connect(d);
            }
        }
        s.wait_for_leader(5_000 * MS);
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
    // A leader and one follower stranded with 50 uncommitted entries; the majority commits
    // 50 of its own; repeated, then everyone must converge quickly on the majority's log.
    for seed in seeds(30) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        one(&mut s, "start", 5);
        let leader1 = s.stable_leader().unwrap();
        let o = others(&s, leader1);
        s.partition(&[leader1, o[0]], &o[1..]);
        for k in 0..50 {
            s.propose_once(leader1, &format!("lost{k}"));
        }
        s.run_for(500 * MS);
        let majority: Vec<NodeId> = o[1..].to_vec();
        s.wait_for_leader(3_000 * MS);
        let clients: Vec<usize> = (0..50).map(|_| s.add_client()).collect();
        let l2 = s.stable_leader().unwrap();
        assert!(majority.contains(&l2));
        for (k, &c) in clients.iter().enumerate() {
            s.clients[c].target_node(l2);
            s.client_append(c, &format!("kept{k}"));
        }
        assert!(s.run_until(5_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c))));
        // Now cut the new leader's side down to a minority too, and strand more entries.
        let other = *majority.iter().find(|&&i| i != l2).unwrap();
        s.heal();
        s.partition(
            &[l2, other],
            &others(&s, l2)
                .into_iter()
                .filter(|&i| i != other)
                .collect::<Vec<_>>(),
        );
        for k in 0..50 {
            s.propose_once(l2, &format!("lost2-{k}"));
        }
        s.run_for(500 * MS);
        s.heal();
        for id in s.ids.clone() {
            s.connect(id);
        }
        one(&mut s, "end", 5);
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
        assert!(
            election <= 30,
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
    for seed in seeds(100) {
        figure8(seed, SimConfig::reliable(5), 40);
    }
}

#[test]
fn figure_8_unreliable_3c() {
    for seed in seeds(100) {
        figure8(seed, SimConfig::unreliable(5), 40);
    }
}

/// Leaders crash at random moments, often right after taking an entry; a majority is always
/// eventually up. Afterwards everything must converge on one committed log.
fn figure8(seed: u64, cfg: SimConfig, rounds: usize) {
    let mut s = Sim::new(seed, cfg);
    one(&mut s, "start", 1);
    let mut up = s.ids.len();
    for k in 0..rounds {
        let leaders = s.leaders();
        for &l in &leaders {
            s.propose_once(l, &format!("f{k}"));
        }
        let pause = if s.rng.chance(0.1) {
            s.rng.range(0, 500) * MS
        } else {
            s.rng.range(0, 13) * MS
        };
        s.run_for(pause);
        if let Some(&l) = leaders.first() {
            if s.is_up(l) {
                s.crash(l);
                up -= 1;
            }
        }
        if up < 3 {
            let down: Vec<NodeId> = s.ids.iter().copied().filter(|&i| !s.is_up(i)).collect();
            let pick = s.rng.pick(&down);
            s.restart(pick);
            up += 1;
        }
    }
    s.cfg.drop = 0.0;
    s.cfg.duplicate = 0.0;
    for id in s.ids.clone() {
        s.restart(id);
    }
    one(&mut s, "end", 5);
    s.check_client_history();
}

#[test]
fn unreliable_agree_3c() {
    for seed in seeds(100) {
        let mut s = Sim::new(seed, SimConfig::unreliable(5));
        let clients: Vec<usize> = (0..50).map(|_| s.add_client()).collect();
        for (k, &c) in clients.iter().enumerate() {
            s.client_append(c, &format!("u{k}"));
        }
        let ok = s.run_until(20_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
        assert!(ok, "seed {seed}: not all agreed");
        s.check_client_history();
    }
}

#[test]
fn reliable_churn_3c() {
    for seed in seeds(100) {
        churn(seed, SimConfig::reliable(5));
    }
}

#[test]
fn unreliable_churn_3c() {
    for seed in seeds(100) {
        churn(seed, SimConfig::unreliable(5));
    }
}

/// Nodes crash, restart, disconnect and reconnect at random while clients append.
fn churn(seed: u64, cfg: SimConfig) {
    let mut s = Sim::new(seed, cfg);
    let clients: Vec<usize> = (0..3).map(|_| s.add_client()).collect();
    let mut value = 0;
    for _ in 0..20 {
        for &c in &clients {
            if !s.client_busy(c) {
                value += 1;
                s.client_append(c, &format!("c{value}"));
            }
        }
        let id = s.rng.pick(&s.ids.clone());
        match s.rng.range(0, 5) {
            0 => s.disconnect(id),
            1 => s.connect(id),
            2 => s.crash(id),
            3 => s.restart(id),
            _ => {}
        }
        let live = s.ids.iter().filter(|&&i| s.is_up(i)).count();
        if live < 3 {
            for i in s.ids.clone() {
                s.restart(i);
            }
        }
        let pause = s.rng.range(0, 700) * MS;
        s.run_for(pause);
    }
    s.cfg.drop = 0.0;
    s.cfg.duplicate = 0.0;
    s.heal();
    for id in s.ids.clone() {
        s.restart(id);
    }
    if !s.run_until(20_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c))) {
        s.fail("churn: clients did not finish");
    }
    let last = one(&mut s, "end", 5);
    assert!(s.run_until(2_000 * MS, |s| s.n_committed(last) == 5));
    s.check_client_history();
}
