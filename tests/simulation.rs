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
        s.run_for(3_000 * MS);
        assert_eq!(s.stable_leader(), None, "seed {seed}");
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
