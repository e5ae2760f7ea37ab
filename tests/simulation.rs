//! Scenario and randomized tests of the Raft core on the deterministic simulator.
//! Each scenario is named after the claim it shows and cites the paper.

mod sim;

use raft::raft::{Index, Role};
use sim::{seeds, Sim, SimConfig, MS};

/// Appends `data` through client `c` and runs until it is acknowledged.
fn append(s: &mut Sim, c: usize, data: &str, within: u64) -> Index {
    s.client_append(c, data);
    if !s.run_until(within, |s| !s.client_busy(c)) {
        s.fail(&format!("append {data:?} not acknowledged in time"));
    }
    match s.clients[c].done.last() {
        Some(sim::Op::Append { index, .. }) => *index,
        other => s.fail(&format!("expected an append, got {other:?}")),
    }
}

#[test]
fn initial_election_elects_exactly_one_leader() {
    // Raft §5.2
    for n in [3, 5] {
        for seed in seeds(20) {
            let mut s = Sim::new(seed, SimConfig::reliable(n));
            let leader = s.wait_for_leader(2_000 * MS);
            let term = s.node(leader).unwrap().term();
            // Without failures the leader keeps its term: heartbeats suppress elections.
            s.run_for(2_000 * MS);
            assert_eq!(s.stable_leader(), Some(leader), "seed {seed}");
            assert_eq!(s.node(leader).unwrap().term(), term, "seed {seed}");
        }
    }
}

#[test]
fn reelection_after_the_leader_is_cut_off() {
    // Raft §5.2: followers that stop hearing from the leader elect a new one.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let old = s.wait_for_leader(2_000 * MS);
        s.isolate(old);
        let ok = s.run_until(2_000 * MS, |s| s.stable_leader().is_some_and(|l| l != old));
        assert!(ok, "seed {seed}: no new leader");
        // The old leader steps down once it cannot reach a majority (check quorum).
        s.run_for(1_000 * MS);
        assert_ne!(s.node(old).unwrap().role(), Role::Leader, "seed {seed}");
        // Rejoining does not disturb the new leader (pre-vote) and the old one follows it.
        let new = s.stable_leader().unwrap();
        s.heal();
        s.run_for(1_000 * MS);
        assert_eq!(s.stable_leader(), Some(new), "seed {seed}");
        assert_eq!(s.node(old).unwrap().leader(), Some(new), "seed {seed}");
    }
}

#[test]
fn no_leader_without_a_majority() {
    // Raft §5.2: a candidate needs votes from a majority.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        let leader = s.wait_for_leader(2_000 * MS);
        let others: Vec<u64> = s.ids.iter().copied().filter(|&i| i != leader).collect();
        s.crash(others[0]);
        s.crash(others[1]);
        s.crash(others[2]);
        // The old leader may believe it leads until check quorum deposes it (within two
        // minimum election timeouts); after that, neither live node may be leader, ever.
        let live = [leader, others[3]];
        s.assert_no_leader_among(&live, 2 * 150 * MS + 100 * MS, 3_000 * MS);
        let c = s.add_client();
        s.client_append(c, "lost?");
        s.run_for(1_000 * MS);
        assert!(
            s.client_busy(c),
            "seed {seed}: append acknowledged without a majority"
        );
        s.restart(others[0]);
        s.run_until(3_000 * MS, |s| !s.client_busy(c));
        assert!(
            !s.client_busy(c),
            "seed {seed}: append not done after majority returned"
        );
        s.check_client_history();
    }
}

#[test]
fn many_concurrent_appends_agree() {
    // Raft §5.3: every acknowledged append is committed at the same index everywhere.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        s.wait_for_leader(2_000 * MS);
        let clients: Vec<usize> = (0..20).map(|_| s.add_client()).collect();
        for (k, &c) in clients.iter().enumerate() {
            s.client_append(c, &format!("v{k}"));
        }
        let ok = s.run_until(3_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
        assert!(ok, "seed {seed}: not all acknowledged");
        s.run_for(500 * MS);
        for id in s.ids.clone() {
            assert_eq!(
                s.node(id).unwrap().commit_index(),
                s.max_commit(),
                "seed {seed}"
            );
        }
        s.check_client_history();
    }
}

#[test]
fn a_partitioned_old_leaders_uncommitted_entries_are_replaced() {
    // Raft §5.3, §5.4.1: entries a deposed leader could not commit are overwritten.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let old = s.wait_for_leader(2_000 * MS);
        let c = s.add_client();
        let first = append(&mut s, c, "before", 2_000 * MS);
        s.isolate(old);
        // The old leader takes appends it can never commit.
        let stranded = s.add_client();
        s.clients[stranded].target_node(old);
        s.client_append(stranded, "stranded");
        s.run_until(2_000 * MS, |s| s.stable_leader().is_some_and(|l| l != old));
        let new = s.stable_leader().unwrap();
        s.clients[c].target_node(new);
        let after = append(&mut s, c, "after", 2_000 * MS);
        assert!(after > first);
        s.heal();
        let ok = s.run_until(2_000 * MS, |s| s.node(old).unwrap().commit_index() >= after);
        assert!(ok, "seed {seed}: old leader did not catch up");
        let log = s.node(old).unwrap().log().entries().to_vec();
        assert_eq!(
            &log[..after as usize],
            &s.committed_log()[..after as usize],
            "seed {seed}"
        );
        s.check_client_history();
    }
}

#[test]
fn a_follower_far_behind_catches_up_in_few_round_trips() {
    // Raft §5.3 with fast backtracking: a follower 1,000 entries behind, with a conflicting
    // suffix of its own, needs a handful of rejections, not one per entry.
    for seed in seeds(5) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let behind = *s.ids.iter().find(|&&i| i != leader).unwrap();
        s.isolate(behind);
        let clients: Vec<usize> = (0..50).map(|_| s.add_client()).collect();
        for round in 0..20 {
            for &c in &clients {
                s.clients[c].target_node(leader);
                s.client_append(c, &format!("e{round}-{c}"));
            }
            let ok = s.run_until(5_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
            assert!(ok, "seed {seed}: appends stalled");
        }
        let target = s.node(leader).unwrap().log().last_index();
        assert!(target >= 1_000);
        let before = s.sent_by_link.get(&(leader, behind)).copied().unwrap_or(0);
        s.heal();
        let start = s.now;
        let ok = s.run_until(5_000 * MS, |s| {
            s.node(behind).unwrap().log().last_index() >= target
        });
        assert!(ok, "seed {seed}: follower did not catch up");
        let messages = s.sent_by_link[&(leader, behind)] - before;
        // ~1,000 small entries fit in a few datagrams; allow for heartbeats meanwhile.
        assert!(
            messages <= 20,
            "seed {seed}: {messages} AppendEntries to catch up"
        );
        assert!(
            s.now - start <= 500 * MS,
            "seed {seed}: took {}µs",
            s.now - start
        );
    }
}

#[test]
fn leader_commits_only_entries_of_its_own_term_figure_8() {
    // Raft §5.4.2, Figure 8: leaders crash after replicating an entry to a minority; a later
    // leader must not count replicas of an old-term entry. Randomized over many seeds with
    // crashes and restarts, the simulator's State Machine Safety check catches any violation.
    for seed in seeds(30) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        let c = s.add_client();
        for round in 0..30 {
            if let Some(l) = s.stable_leader() {
                s.clients[c].target_node(l);
                if !s.client_busy(c) {
                    s.client_append(c, &format!("f8-{round}"));
                }
            }
            let pause = if s.rng.chance(0.5) {
                13 * MS
            } else {
                s.rng.range(0, 500) * MS
            };
            s.run_for(pause);
            if let Some(l) = s.leaders().first().copied() {
                s.crash(l);
            }
            let up = s.ids.iter().filter(|&&i| s.is_up(i)).count();
            if up < 3 {
                let down: Vec<u64> = s.ids.iter().copied().filter(|&i| !s.is_up(i)).collect();
                let pick = s.rng.pick(&down);
                s.restart(pick);
            }
        }
        for id in s.ids.clone() {
            s.restart(id);
        }
        s.wait_for_leader(5_000 * MS);
        let c2 = s.add_client();
        let l = s.stable_leader().unwrap();
        s.clients[c2].target_node(l);
        append(&mut s, c2, "final", 5_000 * MS);
        s.check_client_history();
    }
}

/// One randomized run: a lossy, duplicating, reordering network; partitions; crashes (also in
/// the middle of carrying out a Ready); clients appending and querying with retries. Safety is
/// checked after every event; at the end every acknowledged append must be in the log exactly
/// once at its index, and no query may have missed an append acknowledged before it began.
fn chaos_run(seed: u64, nodes: usize) {
    let mut cfg = SimConfig::unreliable(nodes);
    cfg.crash_in_ready = 0.002;
    let mut s = Sim::new(seed, cfg);
    let clients: Vec<usize> = (0..5).map(|_| s.add_client()).collect();
    let mut next_value = 0;
    for _ in 0..40 {
        // Faults.
        match s.rng.range(0, 9) {
            0 => {
                let id = s.rng.pick(&s.ids.clone());
                s.crash(id);
            }
            1 | 2 => {
                for id in s.ids.clone() {
                    s.restart(id);
                }
            }
            3 => {
                let id = s.rng.pick(&s.ids.clone());
                s.isolate(id);
            }
            4 => {
                let mut ids = s.ids.clone();
                let k = s.rng.range(1, (nodes / 2) as u64) as usize;
                let minority: Vec<u64> = (0..k)
                    .map(|_| {
                        let i = s.rng.range(0, ids.len() as u64 - 1) as usize;
                        ids.remove(i)
                    })
                    .collect();
                s.partition(&minority, &ids);
            }
            5 => {
                let (a, b) = (s.rng.pick(&s.ids.clone()), s.rng.pick(&s.ids.clone()));
                if a != b {
                    s.cut_one_way(a, b);
                }
            }
            _ => s.heal(),
        }
        // Client work.
        for &c in &clients {
            if !s.client_busy(c) {
                if s.rng.chance(0.7) {
                    next_value += 1;
                    s.client_append(c, &format!("v{next_value}"));
                } else {
                    s.client_query(c);
                }
            }
        }
        let pause = s.rng.range(10, 400) * MS;
        s.run_for(pause);
    }
    // Heal everything; every client operation must then finish.
    s.cfg.crash_in_ready = 0.0;
    s.heal();
    for id in s.ids.clone() {
        s.restart(id);
    }
    let ok = s.run_until(30_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
    if !ok {
        s.fail("client operations did not finish after healing");
    }
    s.wait_for_leader(5_000 * MS);
    s.check_client_history();
}

#[test]
fn safety_holds_under_random_faults_3_nodes() {
    let list = seeds(300);
    for &seed in &list {
        chaos_run(seed, 3);
    }
    println!("{} seeds passed (3 nodes)", list.len());
}

#[test]
fn safety_holds_under_random_faults_5_nodes() {
    let list = seeds(150);
    for &seed in &list {
        chaos_run(seed + 1_000_000, 5);
    }
    println!("{} seeds passed (5 nodes)", list.len());
}

#[test]
fn a_deposed_leader_that_does_not_know_it_never_serves_a_stale_read() {
    // Thesis §6.4: the leader confirms it is still leader (a majority round after the read
    // arrived) before answering. The old leader is frozen while a new one commits an append,
    // then asked first, before it has heard of the newer term.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let old = s.wait_for_leader(2_000 * MS);
        let c = s.add_client();
        s.clients[c].target_node(old);
        append(&mut s, c, "a", 2_000 * MS);
        // Frozen and deaf, so that it resumes still believing it leads.
        s.freeze(old);
        let ok = s.run_until(3_000 * MS, |s| s.stable_leader().is_some_and(|l| l != old));
        assert!(ok, "seed {seed}: no new leader");
        let new = s.stable_leader().unwrap();
        s.clients[c].target_node(new);
        let acked = append(&mut s, c, "b", 2_000 * MS);
        s.resume(old);
        assert_eq!(s.node(old).unwrap().role(), Role::Leader, "seed {seed}");
        s.clients[c].target_node(old);
        s.client_query(c);
        let ok = s.run_until(3_000 * MS, |s| !s.client_busy(c));
        assert!(ok, "seed {seed}: query unanswered");
        match s.clients[c].done.last() {
            Some(sim::Op::Query { log, .. }) => assert!(
                log.len() as u64 >= acked,
                "seed {seed}: stale read of {} entries after {acked} was acknowledged",
                log.len()
            ),
            other => panic!("seed {seed}: expected a query, got {other:?}"),
        }
        s.check_client_history();
    }
}

#[test]
fn a_leader_cut_off_from_the_majority_never_answers_a_query() {
    // Thesis §6.4: without a majority round the read cannot be confirmed, however long. The
    // query reaches the old leader while it still believes it leads; the client retries
    // elsewhere on its own, and the answer must come from a leader that could confirm.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(5));
        let old = s.wait_for_leader(2_000 * MS);
        let c = s.add_client();
        s.clients[c].target_node(old);
        append(&mut s, c, "before", 2_000 * MS);
        s.isolate(old);
        assert_eq!(s.node(old).unwrap().role(), Role::Leader, "seed {seed}");
        s.client_query(c);
        let ok = s.run_until(5_000 * MS, |s| !s.client_busy(c));
        assert!(ok, "seed {seed}: query never answered");
        match s.clients[c].done.last() {
            Some(sim::Op::Query { peer, log, .. }) => {
                assert_ne!(*peer, old, "seed {seed}: the isolated leader answered");
                assert!(
                    log.len() >= 2,
                    "seed {seed}: query missed an acknowledged append"
                );
            }
            other => panic!("seed {seed}: expected a query, got {other:?}"),
        }
        s.check_client_history();
    }
}

#[test]
fn a_leader_that_can_send_but_not_receive_is_replaced() {
    // Liveness under a one-way cut: check quorum (thesis §6.2) makes the deaf leader step down,
    // and pre-vote lets the others elect a new leader that commits.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let old = s.wait_for_leader(2_000 * MS);
        for id in s.ids.clone() {
            if id != old {
                s.cut_one_way(id, old);
            }
        }
        let ok = s.run_until(3_000 * MS, |s| s.stable_leader().is_some_and(|l| l != old));
        assert!(ok, "seed {seed}: no new leader while the old one is deaf");
        let c = s.add_client();
        let new = s.stable_leader().unwrap();
        s.clients[c].target_node(new);
        append(&mut s, c, "while deaf", 2_000 * MS);
        s.check_client_history();
    }
}
