//! Membership scenarios (thesis ch. 4) and leadership transfer under faults (thesis §3.10), on
//! the deterministic simulator, whose invariants are computed against the configurations in
//! force (see `tests/sim/mod.rs`). The randomized runs with membership changes are in
//! `tests/simulation.rs`.
//!
//! Issue #22 ("membership that never wedges"): nodes know only the addresses the real shell
//! would, and learn a sender's from its message (`SimConfig::learn_addresses`); the two cases
//! of the issue pass with learning and wedge without it, and removed nodes rejoin on an empty
//! disk.

mod sim;

use raft::raft::{ClientResult, ConfChange, NodeId, Role};
use sim::{seeds, Op, Sim, SimConfig, Time, MS};

fn address(id: NodeId) -> String {
    format!("10.0.0.{id}:7000")
}

/// Starts a fresh node and adds it as a learner; returns its ID.
fn add_learner(s: &mut Sim) -> NodeId {
    let id = s.spawn();
    let change = ConfChange::AddLearner {
        id,
        address: address(id),
    };
    let r = s.change_members_and_wait(change, 5_000 * MS);
    if !matches!(r, ClientResult::Configured { .. }) {
        s.fail(&format!("adding learner {id}: {r:?}"));
    }
    id
}

/// Runs until `id` has everything the leader has.
fn catch_up(s: &mut Sim, id: NodeId) {
    let ok = s.run_until(3_000 * MS, |s| {
        let leader = s.stable_leader().and_then(|l| s.node(l));
        let node = s.node(id);
        leader.zip(node).is_some_and(|(l, n)| {
            n.log().last_index() == l.log().last_index() && n.commit_index() == l.commit_index()
        })
    });
    if !ok {
        s.fail(&format!("node {id} did not catch up"));
    }
}

#[test]
fn learners_never_vote() {
    // Thesis §4.2.1: learners receive the log but count in no quorum and never campaign. With
    // one voter of three left beside two up-to-date learners, no leader may ever be elected
    // (the simulator also fails any campaign by a learner and any leader whose voters' grants
    // are not a majority of its configuration); once a second voter returns, one is.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let learners = [add_learner(&mut s), add_learner(&mut s)];
        for &l in &learners {
            catch_up(&mut s, l);
        }
        let voters: Vec<NodeId> = s.initial.clone();
        let survivor = *voters.iter().find(|&&v| v != leader).unwrap();
        let gone: Vec<NodeId> = voters.iter().copied().filter(|&v| v != survivor).collect();
        for &v in &gone {
            s.crash(v);
        }
        let live = [survivor, learners[0], learners[1]];
        s.assert_no_leader_among(&live, 400 * MS, 3_000 * MS);
        for &l in &learners {
            let n = s.node(l).unwrap();
            assert_eq!(n.role(), Role::Follower, "seed {seed}: learner {l}");
        }
        s.restart(gone[0]);
        let new = s.wait_for_leader(3_000 * MS);
        assert!(!learners.contains(&new), "seed {seed}: learner {new} leads");
    }
}

#[test]
fn ongaro_2015_single_server_change_bug() {
    // The raft-dev post "bug in single-server membership changes" (Ongaro, July 2015), on
    // four servers, with our add (learner, then promote) as the added server, and our rule:
    // a leader appends a configuration only once an entry of its term is committed.
    //
    // Leader L1 promotes learner 5, C = {1..5}; the entry reaches only L1 and 5 (cut off from
    // the rest). The other three elect L2 under the old configuration; one of them, S4, votes
    // but receives L2's entries only 100 ms late. Without the rule L2 would remove L1 at once and
    // commit C' = {L2, S3, S4} with S3 alone, after which L1 wins the next term with 5 and S4
    // (whose log still ends in L1's term) under C, and commits over C': two disjoint
    // majorities. (The core unit test `ongaro_2015_single_server_change_bug_without_the_rule_
    // commits_conflicting_configurations` bypasses the rule and shows exactly that.) With the
    // rule, L2 answers Busy until its no-op commits, which needs S4; then S4 never votes for
    // L1, no leader arises among {L1, 5, S4}, and every configuration committed is one server
    // from the one before (checked by the simulator on every commit).
    let mut rule_held_back = 0;
    let list = seeds(10);
    for &seed in &list {
        let mut s = Sim::new(seed, SimConfig::reliable(4));
        let l1 = s.wait_for_leader(2_000 * MS);
        let five = add_learner(&mut s);
        catch_up(&mut s, five);
        let others: Vec<NodeId> = s.initial.iter().copied().filter(|&i| i != l1).collect();
        // Whatever the others send S4 arrives 100 ms late: it can vote in time, but L2's no-op
        // cannot commit before then.
        let s4 = others[0];
        for &x in &others[1..] {
            s.slow_link(x, s4, 100 * MS);
        }
        s.partition(&[l1, five], &others);
        s.change_members(ConfChange::Promote { id: five });
        s.run_for(300 * MS);
        assert!(
            s.node(l1).unwrap().membership().is_voter(five),
            "seed {seed}: promotion not in L1's log"
        );
        s.admin_abandon();
        let ok = s.run_until(5_000 * MS, |s| s.leaders_among(&others).len() == 1);
        assert!(ok, "seed {seed}: no leader among {others:?}");
        let l2 = s.leaders_among(&others)[0];
        if l2 == s4 {
            continue; // S4 won; not the scenario
        }
        let s3 = *others[1..].iter().find(|&&x| x != l2).unwrap();
        let busy = s.stats.config_busy;
        s.change_members(ConfChange::Remove { id: l1 });
        s.run_for(50 * MS);
        // That L2 appends no configuration before an entry of its term commits is checked by
        // the simulator on every write; here, count the seeds where it had to say Busy.
        // S4 hears from L2 again: the no-op commits, then the removal.
        for &x in &others[1..] {
            s.slow_link(x, s4, 0);
        }
        if !s.run_until(3_000 * MS, |s| !s.admin_busy()) {
            s.fail("removal of L1 not answered");
        }
        if s.stats.config_busy > busy {
            rule_held_back += 1;
        }
        let r = s.admin_done.last().unwrap().1.clone();
        assert!(
            matches!(r, ClientResult::Configured { .. }),
            "seed {seed}: {r:?}"
        );
        // L1, 5 and S4 together: S4 holds L2's term, so L1 cannot win under C.
        s.heal();
        s.partition(&[l1, five, s4], &[l2, s3]);
        s.assert_no_leader_among(&[l1, five, s4], 400 * MS, 3_000 * MS);
        s.heal();
        s.wait_for_leader(3_000 * MS);
    }
    println!(
        "the rule held back L2's change in {rule_held_back} of {} seeds",
        list.len()
    );
    if list.len() >= 10 {
        assert!(rule_held_back > 0, "the rule was never exercised");
    }
}

#[test]
fn transfer_under_message_loss() {
    // Thesis §3.10 with a quarter of all datagrams lost: a transfer request, the catch-up or
    // TimeoutNow may be lost; retried, leadership reaches the named node, and no append that
    // was acknowledged is lost meanwhile.
    for seed in seeds(10) {
        let mut cfg = SimConfig::unreliable(5);
        cfg.drop = 0.25;
        let mut s = Sim::new(seed, cfg);
        s.wait_for_leader(5_000 * MS);
        let clients: Vec<usize> = (0..3).map(|_| s.add_client()).collect();
        for &c in &clients {
            s.keep_busy(c, 0.8);
        }
        for _ in 0..5 {
            let leader = s.wait_for_leader(5_000 * MS);
            let others: Vec<NodeId> = s.ids.iter().copied().filter(|&i| i != leader).collect();
            let target = s.rng.pick(&others);
            let mut attempts = 0;
            while s.stable_leader() != Some(target) {
                attempts += 1;
                if attempts > 20 {
                    s.fail(&format!("leadership never reached {target}"));
                }
                s.transfer_leader(Some(target));
                s.run_until(500 * MS, |s| s.stable_leader() == Some(target));
            }
        }
        s.stop_clients();
        s.cfg.drop = 0.0;
        let ok = s.run_until(10_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
        assert!(ok, "seed {seed}: client operations did not finish");
        assert!(s.acked_appends() > 0, "seed {seed}: nothing acknowledged");
        s.check_client_history();
    }
}

#[test]
fn transfer_to_a_target_that_dies() {
    // Thesis §3.10: a transfer whose target crashes (before or after TimeoutNow) is abandoned
    // after an election timeout; appends held meanwhile go on, and a leader serves clients
    // again without the target.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let c = s.add_client();
        s.keep_busy(c, 1.0);
        s.run_for(100 * MS);
        let target = *s.ids.iter().find(|&&i| i != leader).unwrap();
        s.transfer_leader(Some(target));
        // Dies at once, or a few milliseconds later (TimeoutNow may have gone out).
        let after = s.rng.range(0, 5) * MS;
        s.run_for(after);
        s.crash(target);
        let acked = s.acked_appends();
        let ok = s.run_until(3_000 * MS, |s| {
            s.stable_leader().is_some_and(|l| l != target) && s.acked_appends() > acked + 10
        });
        assert!(ok, "seed {seed}: no progress after the target died");
        s.stop_clients();
        s.restart(target);
        let ok = s.run_until(3_000 * MS, |s| !s.client_busy(c));
        assert!(
            ok,
            "seed {seed}: the client's last operation did not finish"
        );
        s.check_client_history();
    }
}

// ---- addresses (issue #22) ----------------------------------------------------------------------

/// Asks for `change` and requires it committed.
fn change(s: &mut Sim, change: ConfChange) {
    let r = s.change_members_and_wait(change.clone(), 5_000 * MS);
    if !matches!(r, ClientResult::Configured { .. }) {
        s.fail(&format!("{change:?}: {r:?}"));
    }
}

/// Hands leadership to `target` (retrying the request) and waits until it leads.
fn move_leadership(s: &mut Sim, target: NodeId) {
    for _ in 0..20 {
        if s.stable_leader() == Some(target) {
            return;
        }
        s.transfer_leader(Some(target));
        s.run_until(500 * MS, |s| s.stable_leader() == Some(target));
    }
    s.fail(&format!("leadership never reached {target}"));
}

/// Whether `id` is up and holds what leader `leader` holds, following it.
fn caught_up_with(s: &Sim, id: NodeId, leader: NodeId) -> bool {
    let (Some(n), Some(l)) = (s.node(id), s.node(leader)) else {
        return false;
    };
    l.role() == Role::Leader
        && n.leader() == Some(leader)
        && n.log().last_index() == l.log().last_index()
        && n.commit_index() == l.commit_index()
}

/// A client append through `via`, acknowledged and committed on every node of `on` in time.
fn append_commits(s: &mut Sim, via: NodeId, data: &str, on: &[NodeId], within: Time) -> bool {
    let c = s.add_client();
    s.clients[c].target_node(via);
    s.client_append(c, data);
    let start = s.now;
    if !s.run_until(within, |s| !s.client_busy(c)) {
        return false;
    }
    let Some(Op::Append { index, .. }) = s.clients[c].done.last().cloned() else {
        s.fail("expected an append");
    };
    let rest = within.saturating_sub(s.now - start);
    s.run_until(rest, |s| {
        on.iter()
            .all(|&i| s.node(i).is_some_and(|n| n.commit_index() >= index))
    })
}

/// How long a restarted or joining node may take to catch up from a leader, and a pair of
/// nodes to elect one: a few election timeouts.
const BOUND: Time = 2_000 * MS;

/// Issue #22, case 1, on three nodes: peer 3 is down while peer 4 joins (a learner, then
/// promoted), peer 1 is removed and leadership moves to 4. Peer 3 restarts: its JSON and its
/// log know no address for 4. Returns the simulator at that point.
fn case_1_until_3_restarts(seed: u64, learn: bool) -> Sim {
    let mut cfg = SimConfig::reliable(3);
    cfg.learn_addresses = learn;
    let mut s = Sim::new(seed, cfg);
    s.wait_for_leader(2_000 * MS);
    s.crash(3);
    let four = s.spawn_with_contacts(&[1, 2]);
    assert_eq!(four, 4);
    change(
        &mut s,
        ConfChange::AddLearner {
            id: 4,
            address: address(4),
        },
    );
    catch_up(&mut s, 4);
    change(&mut s, ConfChange::Promote { id: 4 });
    change(&mut s, ConfChange::Remove { id: 1 });
    s.decommission();
    move_leadership(&mut s, 4);
    s.restart(3);
    assert!(
        !s.knows(3, 4),
        "seed {seed}: restarted peer 3 knows 4 already"
    );
    s
}

#[test]
fn case_1_a_restarted_peer_follows_a_leader_it_had_no_address_for() {
    // Issue #22, case 1: the restarted peer 3 takes 4's AppendEntries, learning its address
    // from them, and answers; so it catches up from 4 within a bound. Then, with 2 stopped,
    // {3, 4} is a majority of {2, 3, 4} that can talk: it has a leader, and an append commits.
    // (`case_1_without_learning_addresses_no_leader_is_ever_elected` is the same run with a
    // shell that drops messages from senders it has no address for: it wedges.)
    for seed in seeds(10) {
        let mut s = case_1_until_3_restarts(seed, true);
        let start = s.now;
        if !s.run_until(BOUND, |s| caught_up_with(s, 3, 4)) {
            s.fail("peer 3 did not catch up from leader 4");
        }
        let took = s.now - start;
        assert!(s.knows(3, 4), "seed {seed}");
        s.crash(2);
        // Past check quorum (two minimum election timeouts), a leader of {3, 4} leads both.
        s.run_for(500 * MS);
        if !s.run_until(BOUND, |s| s.stable_leader_among(&[3, 4]).is_some()) {
            s.fail("no leader among {3, 4}");
        }
        let leader = s.stable_leader_among(&[3, 4]).unwrap();
        if !append_commits(&mut s, leader, "after case 1", &[3, 4], BOUND) {
            s.fail("no append committed on {3, 4}");
        }
        println!(
            "seed {seed}: 3 caught up from 4 in {} ms; leader of {{3, 4}}: {leader}",
            took / MS
        );
    }
}

#[test]
fn case_1_without_learning_addresses_no_leader_is_ever_elected() {
    // The bug of issue #22, case 1, as the real shell had it: 3 drops 4's AppendEntries (no
    // address for the sender) and could not answer them anyway; it never catches up; with 2
    // stopped, 4 loses its quorum and neither 3 nor 4 is ever elected.
    for seed in seeds(5) {
        let mut s = case_1_until_3_restarts(seed, false);
        if s.run_until(BOUND, |s| caught_up_with(s, 3, 4)) {
            s.fail("peer 3 caught up from 4 without knowing its address");
        }
        assert!(s.stats.unknown_sender > 0, "seed {seed}");
        s.crash(2);
        s.assert_no_leader_among(&[3, 4], 500 * MS, 3 * BOUND);
    }
}

/// Issue #22, case 2: a node joins with only followers as contact points. Returns whether it
/// caught up from the leader within [`BOUND`].
fn case_2(seed: u64, learn: bool) -> (Sim, bool) {
    let mut cfg = SimConfig::reliable(3);
    cfg.learn_addresses = learn;
    let mut s = Sim::new(seed, cfg);
    let leader = s.wait_for_leader(2_000 * MS);
    let followers: Vec<NodeId> = s.ids.iter().copied().filter(|&i| i != leader).collect();
    let id = s.spawn_with_contacts(&followers);
    change(
        &mut s,
        ConfChange::AddLearner {
            id,
            address: address(id),
        },
    );
    let ok = s.run_until(BOUND, |s| caught_up_with(s, id, leader));
    (s, ok)
}

#[test]
fn case_2_a_node_whose_contact_points_are_followers_catches_up_through_the_leader() {
    // The leader's AppendEntries carry its address: the joining node answers them.
    for seed in seeds(10) {
        let (s, ok) = case_2(seed, true);
        if !ok {
            s.fail("the joining node did not catch up");
        }
    }
}

#[test]
fn case_2_without_learning_addresses_the_joining_node_never_catches_up() {
    // A joining node takes messages from anyone, but without the sender's address it cannot
    // answer the leader, which it knows only once it holds a configuration from it.
    for seed in seeds(5) {
        let (s, ok) = case_2(seed, false);
        if ok {
            s.fail("the joining node caught up without knowing the leader's address");
        }
        assert!(s.stats.unaddressed > 0, "seed {seed}");
    }
}

#[test]
fn a_removed_node_rejoins_on_an_empty_disk_and_counts_again() {
    // `add-learner --rejoin`: a removed member's ID comes back, its peer started over on an
    // empty data dir with some members as contact points. It replays its own earlier removal
    // while it catches up, and must not take it for its own; promoted, it is needed for a
    // quorum once another voter stops, and an append commits with it.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        s.wait_for_leader(2_000 * MS);
        let ids = s.ids.clone();
        let gone = s.rng.pick(&ids);
        change(&mut s, ConfChange::Remove { id: gone });
        s.run_until(BOUND, |s| s.retired.contains(&gone));
        s.decommission();
        // The operator's pace: no datagram of its earlier life is still on its way (an
        // acknowledgement from it would otherwise count for the new one, whose disk is empty).
        s.run_for(100 * MS);
        s.wait_for_leader(BOUND);
        let contacts = s.random_contacts();
        s.rejoin(gone, &contacts);
        if !s.run_until(5_000 * MS, |s| !s.admin_busy()) {
            s.fail("rejoin not answered");
        }
        let r = s.admin_done.last().unwrap().1.clone();
        assert!(
            matches!(r, ClientResult::Configured { .. }),
            "seed {seed}: {r:?}"
        );
        catch_up(&mut s, gone);
        change(&mut s, ConfChange::Promote { id: gone });
        let leader = s.wait_for_leader(BOUND);
        let other = *s.ids.iter().find(|&&i| i != gone && i != leader).unwrap();
        s.crash(other);
        if !append_commits(
            &mut s,
            leader,
            "with the rejoined node",
            &[gone, leader],
            BOUND,
        ) {
            s.fail("no append committed with the rejoined node");
        }
        assert_eq!(s.stats.rejoins, 1, "seed {seed}");
    }
}

#[test]
fn a_rejoining_node_does_not_take_its_rejoin_for_a_removal_before_it_commits() {
    // Found by the randomized runs with rejoins: a node started over to rejoin gets the log
    // up to and including its Rejoin entry, with a leader commit index just below it (the
    // leader's other voter acknowledges slowly, so the entry is not committed yet). It has
    // applied a configuration that listed it (from its earlier life: it "was a member"), its
    // commit index equals the leader's, and the committed configuration lacks it: it must
    // not decide that it was removed.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let others: Vec<NodeId> = s.ids.iter().copied().filter(|&i| i != leader).collect();
        let (gone, other) = (others[0], others[1]);
        // A configuration entry that lists `gone`, before the one that removes it.
        let learner = add_learner(&mut s);
        change(&mut s, ConfChange::Remove { id: learner });
        change(&mut s, ConfChange::Remove { id: gone });
        s.run_until(BOUND, |s| s.retired.contains(&gone));
        s.decommission();
        s.run_for(100 * MS);
        s.slow_link(leader, other, 200 * MS);
        s.rejoin(gone, &[leader]);
        if !s.run_until(5_000 * MS, |s| !s.admin_busy()) {
            s.fail("rejoin not answered");
        }
        s.slow_link(leader, other, 0);
        catch_up(&mut s, gone);
        assert!(s.is_up(gone), "seed {seed}");
    }
}

#[test]
fn a_node_started_over_gives_no_vote_before_its_log_reaches_the_vote_floor() {
    // Found by the randomized runs with rejoins (seed 1796820000007090): `gone`, removed by
    // {leader, stale, learner} and started over, gave its vote to `stale`, whose log ended
    // before the changes that added `learner` and removed `gone` and which therefore still
    // counted `gone` as a voter; `stale` then led without committed entries. Here `gone` is
    // cut off from the cluster just after adopting it (its log still empty), and `stale` can
    // reach only `gone`: no leader may come of it.
    for seed in seeds(10) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let others: Vec<NodeId> = s.ids.iter().copied().filter(|&i| i != leader).collect();
        let (gone, stale) = (others[0], others[1]);
        s.crash(stale);
        let learner = add_learner(&mut s);
        catch_up(&mut s, learner);
        change(&mut s, ConfChange::Promote { id: learner });
        change(&mut s, ConfChange::Remove { id: gone });
        s.run_until(BOUND, |s| s.retired.contains(&gone));
        s.decommission();
        if !append_commits(&mut s, leader, "before the rejoin", &[learner], BOUND) {
            s.fail("no append committed without the stale node");
        }
        s.run_for(100 * MS);
        s.rejoin(gone, &[leader]);
        if !s.run_until(BOUND, |s| s.disks[&gone].adopted) {
            s.fail("the rejoined node never adopted its cluster");
        }
        s.partition(&[gone], &[leader, learner]);
        assert!(
            s.node(gone).unwrap().vote_floor() > 0,
            "seed {seed}: adopted without a vote floor"
        );
        s.partition(&[stale], &[leader, learner]);
        s.restart(stale);
        s.assert_no_leader_among(&[gone, stale], 0, 3 * BOUND);
        s.heal();
        catch_up(&mut s, gone);
        assert_eq!(s.node(gone).unwrap().vote_floor(), 0, "seed {seed}");
        assert_eq!(
            s.disks[&gone].vote_floor.0, 0,
            "seed {seed}: cleared on disk"
        );
    }
}

#[test]
fn members_replaced_while_one_is_down_never_wedge_it() {
    // Issue #22 at random: round after round, a voter is stopped, a fresh node joins (a few
    // members as contact points) and is promoted, another voter (the leader half the time) is
    // removed, and leadership moves to the newcomer half the time; then the stopped voter
    // restarts, with the JSON it had or, now and then, one listing the members of an older
    // configuration. Its JSON, its `cluster` file and its log may name neither the leader nor,
    // after a few rounds, any member: it must still catch up from the leader within a bound,
    // and an append must commit on every member. (With `learn_addresses` off it wedges at
    // once, as in case 1.)
    const ROUNDS: usize = 6;
    let list = seeds(20);
    let mut all_strangers = 0;
    for &seed in &list {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        s.wait_for_leader(2_000 * MS);
        let mut strangers = 0;
        for round in 0..ROUNDS {
            let voters: Vec<NodeId> = s.committed_config().voter_ids().collect();
            let down = s.rng.pick(&voters);
            s.crash(down);
            let new = add_learner(&mut s);
            catch_up(&mut s, new);
            change(&mut s, ConfChange::Promote { id: new });
            let leader = s.wait_for_leader(BOUND);
            let rest: Vec<NodeId> = voters.iter().copied().filter(|&v| v != down).collect();
            let victim = if rest.contains(&leader) && s.rng.chance(0.5) {
                leader
            } else {
                s.rng.pick(&rest)
            };
            change(&mut s, ConfChange::Remove { id: victim });
            s.decommission();
            // Half the time leadership moves to the newcomer, whom `down` has never heard of.
            if s.rng.chance(0.5) {
                move_leadership(&mut s, new);
            }
            let leader = s.wait_for_leader(BOUND);
            if s.rng.chance(0.3) {
                s.restart_with_old_config(down);
            } else {
                s.restart(down);
            }
            if !s.knows(down, leader) {
                strangers += 1;
            }
            if !s.run_until(BOUND, |s| caught_up_with(s, down, leader)) {
                s.fail(&format!(
                    "round {round}: node {down} did not catch up from {leader}"
                ));
            }
            let members: Vec<NodeId> = s.committed_config().ids().collect();
            if !append_commits(&mut s, leader, &format!("round {round}"), &members, BOUND) {
                s.fail(&format!(
                    "round {round}: no append committed on {members:?}"
                ));
            }
        }
        assert_eq!(s.stats.config_changes, 3 * ROUNDS as u64, "seed {seed}");
        assert_eq!(s.acked_appends(), ROUNDS, "seed {seed}");
        println!(
            "seed {seed}: {ROUNDS} rounds; {strangers} restarts knew no address for the leader; \
             {} addresses learned, {} messages unaddressed",
            s.stats.learned, s.stats.unaddressed
        );
        all_strangers += strangers;
    }
    if list.len() >= 10 {
        assert!(
            all_strangers > 0,
            "no restarted node had to learn the leader"
        );
    }
}
