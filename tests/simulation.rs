//! Scenario and randomized tests of the Raft core on the deterministic simulator.
//! Each scenario is named after the claim it shows and cites the paper.

mod sim;

use raft::raft::{Index, NodeId, Role};
use sim::{
    random_seeds, run_seeds, seeds, CrashPoint, Sim, SimConfig, CRASH_POINTS, MS,
    SNAPSHOT_CRASH_POINTS,
};
use std::collections::BTreeMap;

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
fn leadership_moves_to_the_named_node_under_load_and_loses_nothing() {
    // Thesis §3.10: the leader catches the target up and sends it TimeoutNow; the target wins
    // at once. Busy clients keep appending across 20 transfers; every acknowledged append
    // survives, and an unnamed transfer moves leadership somewhere else.
    for n in [3, 5] {
        for seed in seeds(10) {
            let mut s = Sim::new(seed, SimConfig::reliable(n));
            let mut leader = s.wait_for_leader(2_000 * MS);
            let clients: Vec<usize> = (0..4).map(|_| s.add_client()).collect();
            for &c in &clients {
                s.keep_busy(c, 0.8);
            }
            for k in 0..20 {
                let pause = s.rng.range(0, 100) * MS;
                s.run_for(pause);
                let others: Vec<NodeId> = s.ids.iter().copied().filter(|&i| i != leader).collect();
                let target = (k % 2 == 0).then(|| s.rng.pick(&others));
                s.transfer_leader(target);
                let moved = s.run_until(1_000 * MS, |s| {
                    s.stable_leader()
                        .is_some_and(|l| l != leader && target.is_none_or(|t| t == l))
                });
                if !moved {
                    s.fail(&format!(
                        "leadership did not move from {leader} to {target:?}"
                    ));
                }
                leader = s.stable_leader().unwrap();
            }
            s.stop_clients();
            let ok = s.run_until(5_000 * MS, |s| clients.iter().all(|&c| !s.client_busy(c)));
            assert!(ok, "seed {seed}: client operations did not finish");
            assert!(
                s.acked_appends() >= 100,
                "seed {seed}: {} acked",
                s.acked_appends()
            );
            s.check_client_history();
        }
    }
}

#[test]
fn a_leader_re_elected_later_is_not_misled_by_answers_to_its_old_appends() {
    // Raft §5.1: an answer from an older term says nothing about the current one. The leader's
    // appends to one follower are delayed by seconds; leadership moves away and back (two
    // transfers), and the follower answers the old appends with its newer term. The leader
    // must not take them as rejections: its match index for the follower never falls (checked
    // after every event) and the follower keeps up.
    for seed in seeds(20) {
        let mut s = Sim::new(seed, SimConfig::reliable(3));
        let leader = s.wait_for_leader(2_000 * MS);
        let o: Vec<NodeId> = s.ids.iter().copied().filter(|&i| i != leader).collect();
        let (slow, other) = (o[0], o[1]);
        let c = s.add_client();
        s.clients[c].target_node(leader);
        append(&mut s, c, "before", 2_000 * MS);
        s.slow_link(leader, slow, 1_500 * MS);
        s.keep_busy(c, 1.0);
        s.run_for(100 * MS);
        for target in [other, leader] {
            s.transfer_leader(Some(target));
            if !s.run_until(1_000 * MS, |s| s.stable_leader() == Some(target)) {
                s.fail(&format!("leadership did not move to {target}"));
            }
        }
        s.slow_link(leader, slow, 0);
        let term = s.node(leader).unwrap().term();
        // The delayed appends of the first term arrive during this second.
        s.run_for(2_000 * MS);
        assert_eq!(s.stable_leader(), Some(leader), "seed {seed}");
        assert_eq!(s.node(leader).unwrap().term(), term, "seed {seed}");
        s.stop_clients();
        assert!(
            s.run_until(2_000 * MS, |s| !s.client_busy(c)),
            "seed {seed}"
        );
        let last = s.node(leader).unwrap().log().last_index();
        let caught_up = s.run_until(1_000 * MS, |s| {
            s.node(slow).unwrap().log().last_index() == last
        });
        assert!(caught_up, "seed {seed}: the slow follower fell behind");
        s.check_client_history();
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

/// What one randomized run did; every run must show a minimum of each.
#[derive(Clone, Debug, Default)]
struct Counts {
    acked: usize,
    refused: usize,
    queries: usize,
    elections: usize,
    crashes: u64,
    crashes_in_ready: BTreeMap<CrashPoint, u64>,
    pauses: u64,
    received_late: u64,
    transfers: u64,
    long_delayed: u64,
    faults: u64,
    retries: u64,
    events: u64,
    virtual_ms: u64,
    config_changes: u64,
    config_refused: u64,
    removed_stopped: u64,
    snapshots: u64,
    compactions: u64,
    chunks_sent: u64,
    installs: u64,
    store_reads: u64,
    rejoins: u64,
    old_config_restarts: u64,
    unaddressed: u64,
    learned: u64,
    power_cuts: u64,
    wal_rotations: u64,
    disk: sim::DiskStats,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.acked += o.acked;
        self.refused += o.refused;
        self.queries += o.queries;
        self.elections += o.elections;
        self.crashes += o.crashes;
        for (p, n) in &o.crashes_in_ready {
            *self.crashes_in_ready.entry(*p).or_default() += n;
        }
        self.pauses += o.pauses;
        self.received_late += o.received_late;
        self.transfers += o.transfers;
        self.long_delayed += o.long_delayed;
        self.faults += o.faults;
        self.retries += o.retries;
        self.events += o.events;
        self.virtual_ms += o.virtual_ms;
        self.config_changes += o.config_changes;
        self.config_refused += o.config_refused;
        self.removed_stopped += o.removed_stopped;
        self.snapshots += o.snapshots;
        self.compactions += o.compactions;
        self.chunks_sent += o.chunks_sent;
        self.installs += o.installs;
        self.store_reads += o.store_reads;
        self.rejoins += o.rejoins;
        self.old_config_restarts += o.old_config_restarts;
        self.unaddressed += o.unaddressed;
        self.learned += o.learned;
        self.power_cuts += o.power_cuts;
        self.wal_rotations += o.wal_rotations;
        self.disk.add(&o.disk);
    }
}

/// Virtual time of the faulty part of a randomized run, and of each of its epochs.
const CHAOS_TIME: u64 = 30_000 * MS;
const EPOCH: u64 = 2_000 * MS;
/// A randomized run that has not yet shown the minimum of activity by the end of its time goes
/// on with more epochs, up to this many times its time.
const EXTRA_TIME_FACTOR: u64 = 3;
/// Every randomized run must show at least this much, or it proved nothing. (Over 2,000 seeds
/// at 3 and at 5 nodes, the fewest seen were 94 acknowledged appends, 18 elections and 17
/// crashes; over 20,000, one 3-node seed acknowledged only 37 appends, through harsh network
/// epochs with 21 elections and 24 crashes, on the core before membership as well as after.)
const MIN_ACKED: usize = 25;
const MIN_ELECTIONS: usize = 8;
const MIN_CRASHES: u64 = 8;
/// The minima (acknowledged appends, elections, crashes, membership changes committed) of a
/// randomized run with membership changes, which is shorter. Well below the fewest seen (a
/// seed among 8,000 had only 3 crashes), so that they catch a run where nothing happens, not
/// an unlucky schedule; over many seeds, [`MEMBERSHIP_CHANGES_PER_RUN`] and
/// [`MEMBERSHIP_ACKED_PER_RUN`] ask for more. A 3-node run can spend most of its time with
/// two voters (one removed, its replacement still a learner), when a fault on either stops
/// every commit: seed 1795780000010928 acknowledged 6 appends in 15 virtual seconds that way
/// (healthy at the end, no client left waiting).
const MEMBERSHIP_MINIMA: (usize, usize, u64, u64) = (5, 3, 2, 1);
/// Acknowledged appends per run with membership changes, on average over 200 seeds or more
/// (230 seen at 3 nodes, 260 at 5).
const MEMBERSHIP_ACKED_PER_RUN: u64 = 100;
/// Membership changes committed per run, on average over 200 seeds or more (7.9 seen).
const MEMBERSHIP_CHANGES_PER_RUN: u64 = 4;
/// Virtual time of the faulty part of a randomized run with membership changes: shorter, so
/// that the two such tests cost CI about a minute at 2,000 seeds (measured: 70 s of CPU for
/// both, 2,000 seeds each; the fewest per run were 21 acknowledged appends, 4 elections, 4
/// crashes and 2 membership changes committed).
const MEMBERSHIP_CHAOS_TIME: u64 = 14_000 * MS;

/// Whether randomized runs with membership changes re-add removed nodes (`SIM_REJOINS=1` or
/// `0`; by default [`REJOINS_IN_RANDOM_RUNS`]).
fn rejoins_in_random_runs() -> bool {
    std::env::var("SIM_REJOINS").map_or(REJOINS_IN_RANDOM_RUNS, |v| v.trim() != "0")
}

/// On (`SIM_REJOINS=0` turns them off). Each bug a rejoin found, with the fix: a node started
/// over and added back stopped as removed, replaying an old removal under a leader that had
/// lost the entry adding it back (seed 1796870000008637), fixed by ignoring removals up to its
/// first vote floor (`removed_an_earlier_server`, unit test
/// `a_peer_started_over_never_takes_a_removal_its_cluster_had_at_first_contact_for_its_own`);
/// a node started over on an empty disk could vote before it had caught up (seed
/// 1796820000007090, Leader Completeness), fixed by the vote floor
/// (`src/raft/node/started_over.rs`; scenario test
/// `a_node_started_over_gives_no_vote_before_its_log_reaches_the_vote_floor` in
/// tests/membership.rs, which fails without it), and the floor itself wedged an election
/// (seed 1796870000009341), fixed by letting a node below it vote for a candidate at least as
/// up to date as the floor. Earlier: a rejoiner took a late AppendEntries' held-back commit
/// index as the leader's (seed 1796800000000376); a Rejoin issued at once let a datagram sent
/// to the earlier life reach the new one (seed 1796810000001688).
const REJOINS_IN_RANDOM_RUNS: bool = true;

/// One randomized run: clients append and query back to back (two of them sharing an ID) over
/// a network whose loss, duplication, delay and share of datagrams 0.2-2 s late change every
/// epoch, while faults strike after a random number of events: crashes (also part-way through
/// a Ready, at every kind of point), restarts, SIGSTOP-like pauses whose buffered datagrams
/// arrive on resume, partitions, one-way cuts and leadership transfers. Safety is checked after
/// every event; after healing, every client operation must finish, a new append must commit
/// everywhere, and what clients saw must agree with the committed log (each acknowledged append
/// exactly once at its index, no stale reads).
///
/// With `membership`, configuration changes (thesis ch. 4) join the faults: a fresh node joins
/// as a learner (given some members as contact points), a learner is promoted, a member (the
/// leader as often as not) is removed, so members are replaced over the run; a removed node
/// now and then rejoins on an empty disk (see [`REJOINS_IN_RANDOM_RUNS`]); each change is
/// retried as a client does until committed. Restarts then now and then give a node a JSON
/// listing the members of an old configuration: every node knows only the addresses of its
/// JSON, its `cluster` file and its configurations, and learns the others from the messages
/// they send it.
///
/// With `snapshots`, nodes take snapshots every so many entries (thesis ch. 5), followers that
/// fall behind the leaders' compacted logs catch up by InstallSnapshot in chunks, and crashes
/// also strike between a snapshot's durability and telling the core.
fn chaos_run(
    seed: u64,
    nodes: usize,
    membership: bool,
    snapshots: Option<(u64, u64)>,
    chaos_time: u64,
) -> Counts {
    let mut cfg = SimConfig::unreliable(nodes);
    cfg.rejoins = rejoins_in_random_runs();
    if snapshots.is_some() {
        cfg.snapshot_every = snapshots;
    }
    let mut s = Sim::new(seed, cfg);
    let clients: Vec<usize> = (0..6).map(|_| s.add_client()).collect();
    // Two of them drew the same ID: neither may ever be acknowledged with the other's entry.
    s.share_client_id(clients[5], clients[4]);
    for &c in &clients {
        s.keep_busy(c, 0.8);
    }
    let (min_acked, min_elections, min_crashes, min_changes) = if membership {
        MEMBERSHIP_MINIMA
    } else {
        (MIN_ACKED, MIN_ELECTIONS, MIN_CRASHES, 0)
    };
    let enough = |s: &Sim| {
        s.acked_appends() >= min_acked
            && s.elections() >= min_elections
            && s.stats.crashes >= min_crashes
            && s.stats.config_changes >= min_changes
            && (snapshots.is_none()
                || (s.stats.snapshots >= MIN_SNAPSHOTS && s.stats.compactions > 0))
    };
    let mut epochs = Vec::new();
    // A schedule harsh enough to leave too little done by the end gets more epochs rather
    // than failing the activity check below (seed 1795789828921191 acknowledged 24 appends in
    // 30 s of epochs with a quarter of datagrams lost and a majority down or cut off most of
    // the time); the check still fails a run where nothing can happen.
    while s.now < chaos_time || (!enough(&s) && s.now < chaos_time * EXTRA_TIME_FACTOR) {
        // Each epoch draws its own network and fault rate, so that every run sees calm and
        // storm: on a uniformly harsh network too little would commit to prove much.
        s.cfg.drop = s.rng.pick(&[0.0, 0.05, 0.1, 0.25]);
        s.cfg.duplicate = s.rng.pick(&[0.0, 0.05, 0.2]);
        s.cfg.delay.1 = s.rng.pick(&[2, 20, 50]) * MS;
        s.cfg.long_delay = s.rng.pick(&[0.0, 0.0, 0.01, 0.05, 0.2]);
        s.cfg.crash_in_ready = s.rng.pick(&[0.0, 0.001, 0.003]);
        if snapshots.is_some() {
            s.cfg.crash_in_snapshot = s.rng.pick(&[0.0, 0.02, 0.1]);
        }
        let gap = s.rng.pick(&[100, 300, 1_000]);
        epochs.push(format!(
            "drop {} dup {} delay ≤{}ms long {} crash/ready {} events/fault ~{gap}",
            s.cfg.drop,
            s.cfg.duplicate,
            s.cfg.delay.1 / MS,
            s.cfg.long_delay,
            s.cfg.crash_in_ready
        ));
        let (end, acked) = (s.now + EPOCH, s.acked_appends());
        while s.now < end {
            // A random number of events, but not much virtual time: with most nodes down few
            // events happen, and the next fault (perhaps a restart) should not wait for them.
            let k = s.rng.range(1, 2 * gap);
            s.run_events_within(k, 500 * MS);
            random_fault(&mut s, membership);
        }
        let last = epochs.last_mut().unwrap();
        *last += &format!(": {} acked", s.acked_appends() - acked);
        // Leaders fall regularly, so that every run sees elections and crashes.
        s.decommission();
        for d in s.down_nodes() {
            s.restart(d);
        }
        for p in s.paused_nodes() {
            s.resume(p);
        }
        s.heal();
        s.run_until(3_000 * MS, |s| s.stable_leader().is_some());
        if membership {
            // A change in calm weather too, so that every run commits some.
            s.random_membership_change();
            s.run_until(500 * MS, |s| !s.admin_busy());
        }
        for l in s.leaders() {
            s.crash(l);
        }
    }
    let flavour_text = epochs.join("; ");
    // Heal everything; every client operation must then finish.
    s.end_disk_faults();
    s.stop_clients();
    s.cfg.crash_in_ready = 0.0;
    s.cfg.crash_in_snapshot = 0.0;
    s.cfg.drop = 0.0;
    s.cfg.duplicate = 0.0;
    s.cfg.long_delay = 0.0;
    s.heal();
    for p in s.paused_nodes() {
        s.resume(p);
    }
    for id in s.ids.clone() {
        s.restart(id);
    }
    if !s.run_until(60_000 * MS, |s| {
        !s.admin_busy() && clients.iter().all(|&c| !s.client_busy(c))
    }) {
        s.fail("client operations did not finish after healing");
    }
    // Nodes whose removal committed stop; the others all hold the final append.
    s.retire_non_members();
    let leader = s.wait_for_leader(10_000 * MS);
    let c = s.add_client();
    s.clients[c].target_node(leader);
    let index = append(&mut s, c, "final", 10_000 * MS);
    if !s.run_until(5_000 * MS, |s| s.n_committed(index) == s.ids.len()) {
        s.fail("the final append did not commit on every node");
    }
    s.check_client_history();
    let counts = Counts {
        acked: s.acked_appends(),
        refused: s.refused_appends(),
        queries: s.answered_queries(),
        elections: s.elections(),
        crashes: s.stats.crashes,
        crashes_in_ready: s.stats.crashes_in_ready.clone(),
        pauses: s.stats.pauses,
        received_late: s.stats.received_late,
        transfers: s.stats.transfers,
        long_delayed: s.stats.long_delayed,
        faults: s.stats.faults,
        retries: s.client_retries(),
        events: s.stats.events,
        virtual_ms: s.now / MS,
        config_changes: s.stats.config_changes,
        config_refused: s.stats.config_refused,
        removed_stopped: s.stats.removed_stopped,
        snapshots: s.stats.snapshots,
        compactions: s.stats.compactions,
        chunks_sent: s.stats.chunks_sent,
        installs: s.stats.installs,
        store_reads: s.stats.store_reads,
        rejoins: s.stats.rejoins,
        old_config_restarts: s.stats.old_config_restarts,
        unaddressed: s.stats.unaddressed,
        learned: s.stats.learned,
        power_cuts: s.stats.power_cuts,
        wal_rotations: s.stats.wal_rotations,
        disk: s.stats.disk.clone(),
    };
    if std::env::var("SIM_SEED").is_ok() || std::env::var("SIM_VERBOSE").is_ok() {
        println!("seed {seed} ({flavour_text}): {counts:?}");
    }
    if !enough(&s) {
        s.fail(&format!(
            "too little happened to prove anything ({flavour_text}): {counts:?}"
        ));
    }
    counts
}

/// One fault: a disk fault now and then ([`DISK_FAULT_SHARE`]), else, chosen uniformly, a crash (of anyone, or of the leader), restarts (of one node
/// that is down, with membership now and then with an old configuration's peers in its JSON,
/// or all), a SIGSTOP
/// pause or a resume, an isolated node, a minority cut off (possibly with the leader), a
/// one-way cut, a leadership transfer (to a given node or the leader's choice), or healing the
/// network; with `membership`, also a membership change (if none is in progress).
fn random_fault(s: &mut Sim, membership: bool) {
    s.stats.faults += 1;
    if s.disk_faults_on() && s.rng.chance(DISK_FAULT_SHARE) {
        s.random_disk_fault();
        return;
    }
    let ids = s.ids.clone();
    let nodes = ids.len();
    let id = s.rng.pick(&ids);
    match s.rng.range(0, if membership { 15 } else { 13 }) {
        14 | 15 => s.random_membership_change(),
        0 => s.crash(id),
        1 => {
            for l in s.leaders() {
                s.crash(l);
            }
        }
        2 | 3 => {
            let down = s.down_nodes();
            if !down.is_empty() {
                let d = s.rng.pick(&down);
                if membership && s.rng.chance(0.3) {
                    s.restart_with_old_config(d);
                } else {
                    s.restart(d);
                }
            }
        }
        4 => {
            for d in s.down_nodes() {
                s.restart(d);
            }
        }
        5 => s.pause(id),
        6 => {
            let paused = s.paused_nodes();
            if !paused.is_empty() {
                let p = s.rng.pick(&paused);
                s.resume(p);
            }
        }
        7 => s.isolate(id),
        // With membership changes, as few as one node may be left to cut off from nobody.
        8 if nodes >= 2 => {
            let mut rest = ids.clone();
            s.rng.shuffle(&mut rest);
            let k = s.rng.range(1, (nodes / 2) as u64) as usize;
            let minority: Vec<NodeId> = rest.drain(..k).collect();
            s.partition(&minority, &rest);
        }
        9 => {
            // With a single node left (membership changes can leave one) there is no minority.
            if let Some(&l) = s.leaders().first().filter(|_| nodes >= 2) {
                // The leader keeps only a minority.
                let mut rest: Vec<NodeId> = ids.iter().copied().filter(|&i| i != l).collect();
                s.rng.shuffle(&mut rest);
                let k = s.rng.range(0, (nodes / 2 - 1) as u64) as usize;
                let mut minority: Vec<NodeId> = rest.drain(..k).collect();
                minority.push(l);
                s.partition(&minority, &rest);
            }
        }
        10 => {
            let to = s.rng.pick(&ids);
            if to != id {
                s.cut_one_way(id, to);
            }
        }
        11 => {
            let target = s.rng.chance(0.5).then_some(id);
            s.transfer_leader(target);
        }
        _ => s.heal(),
    }
}

/// The share of random faults that are disk faults (tests/sim/faults.rs: a disk full for a
/// while, a failed fsync, a failed write), with `SIM_DISK_FAULTS` not `0`.
const DISK_FAULT_SHARE: f64 = 0.07;

/// Snapshots taken per randomized run with snapshots, at least (every node takes one every
/// few dozen entries applied, and runs acknowledge hundreds).
const MIN_SNAPSHOTS: u64 = 5;
/// Snapshots installed per randomized run with snapshots, on average over 200 seeds or more:
/// followers down or cut off while the others compact must catch up that way.
const INSTALLS_PER_RUN: u64 = 1;

/// Runs the randomized seeds at `nodes` nodes and prints what they did in all.
fn chaos_test(nodes: usize, default_seeds: u64, membership: bool) {
    chaos_test_with(nodes, random_seeds(default_seeds), membership, None);
}

fn chaos_test_with(nodes: usize, list: Vec<u64>, membership: bool, snapshots: Option<(u64, u64)>) {
    let started = std::time::Instant::now();
    let time = if membership {
        MEMBERSHIP_CHAOS_TIME
    } else {
        CHAOS_TIME
    };
    let results = run_seeds(&list, |seed| {
        chaos_run(seed, nodes, membership, snapshots, time)
    });
    let mut total = Counts::default();
    for (_, c) in &results {
        total.add(c);
    }
    let min = |f: fn(&Counts) -> u64| results.iter().map(|(_, c)| f(c)).min().unwrap_or(0);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds passed ({nodes} nodes) in {secs:.1} s ({:.1} seeds/s): {total:?}; per run at \
         least {} acked, {} elections, {} crashes, {} membership changes",
        results.len(),
        results.len() as f64 / secs,
        min(|c| c.acked as u64),
        min(|c| c.elections as u64),
        min(|c| c.crashes),
        min(|c| c.config_changes),
    );
    let d = &total.disk;
    println!(
        "disk faults: {} full-disk episodes, {} batches held ({} written once space was back, \
         {} retries, {} TimeoutNows, {} items dropped meanwhile), {} installs waited ({} went \
         through), {} round trips with a store behind ({} retried once space was back, {} caught up, {} reads \
         refused); exits on \
         a failed fsync {}, on a failed write {}",
        d.full_episodes,
        d.held_batches,
        d.written_after_space,
        d.full_retries,
        d.hand_overs,
        d.dropped_while_full,
        d.installs_waited,
        d.installs_after_space,
        d.store_behind,
        d.store_retries,
        d.stores_caught_up,
        d.reads_refused,
        d.fsync_exits,
        d.write_exits,
    );
    if snapshots.is_some() {
        println!(
            "snapshots: {} taken, {} compactions, {} chunks sent, {} installed, {} store reads; \
             per run at least {} taken, {} installed",
            total.snapshots,
            total.compactions,
            total.chunks_sent,
            total.installs,
            total.store_reads,
            min(|c| c.snapshots),
            min(|c| c.installs),
        );
        // An average: a single seed (a rerun) may install none.
        assert!(
            results.len() < 200 || total.installs >= INSTALLS_PER_RUN * results.len() as u64,
            "only {} snapshots installed in {} runs",
            total.installs,
            results.len()
        );
    }
    // Over enough seeds, ID collisions and every kind of crash point in a Ready must have been
    // exercised.
    if results.len() >= 200 {
        if membership {
            assert!(
                total.removed_stopped > 0,
                "no removed node stopped on its own"
            );
            assert!(
                total.old_config_restarts > 0,
                "no node restarted with an old configuration"
            );
            assert!(
                total.rejoins > 0 || !rejoins_in_random_runs(),
                "no removed node rejoined"
            );
            assert!(
                total.config_changes >= MEMBERSHIP_CHANGES_PER_RUN * results.len() as u64,
                "only {} membership changes committed in {} runs",
                total.config_changes,
                results.len()
            );
            assert!(
                total.acked as u64 >= MEMBERSHIP_ACKED_PER_RUN * results.len() as u64,
                "only {} appends acknowledged in {} runs",
                total.acked,
                results.len()
            );
        }
        assert!(
            total.refused > 0,
            "no append of clients sharing an ID was refused"
        );
        // Half the kills are power cuts of the real storage (tests/sim/disk.rs), and every
        // crash inside a Ready's round trip is one: at least a quarter of all crashes.
        assert!(
            total.power_cuts * 4 >= total.crashes,
            "only {} of {} crashes were power cuts",
            total.power_cuts,
            total.crashes
        );
        if snapshots.is_some() {
            assert!(total.wal_rotations > 0, "no real WAL started a new segment");
            for p in SNAPSHOT_CRASH_POINTS {
                assert!(
                    total.crashes_in_ready.get(&p).copied().unwrap_or(0) > 0,
                    "no run crashed at {p:?}"
                );
            }
        }
        for p in CRASH_POINTS {
            assert!(
                total.crashes_in_ready.get(&p).copied().unwrap_or(0) > 0,
                "no run crashed at {p:?}"
            );
        }
        // Disk faults, unless turned off: each kind must have struck and been carried out.
        if sim::disk_faults_enabled() {
            let d = &total.disk;
            assert!(d.full_episodes > 0, "no disk filled");
            assert!(d.held_batches > 0, "no batch waited for space");
            assert!(
                d.written_after_space > 0,
                "no batch was written once space was back"
            );
            if snapshots.is_some() {
                assert!(
                    d.stores_caught_up > 0,
                    "no store a full disk left behind caught up"
                );
            }
            assert!(d.fsync_exits > 0, "no node exited on a failed fsync");
            assert!(d.write_exits > 0, "no node exited on a failed write");
        }
    }
}

#[test]
fn safety_holds_under_random_faults_3_nodes() {
    chaos_test(3, 200, false);
}

#[test]
fn safety_holds_under_random_faults_5_nodes() {
    chaos_test(5, 200, false);
}

#[test]
fn safety_holds_under_random_faults_and_membership_changes_3_nodes() {
    chaos_test(3, 200, true);
}

#[test]
fn safety_holds_under_random_faults_and_membership_changes_5_nodes() {
    chaos_test(5, 200, true);
}

#[test]
fn safety_holds_under_random_faults_with_snapshots_3_nodes() {
    let list = random_seeds(200);
    chaos_test_with(3, list, false, Some((20, 5)));
}

#[test]
fn safety_holds_under_random_faults_with_snapshots_5_nodes() {
    let list = random_seeds(200);
    chaos_test_with(5, list, false, Some((40, 5)));
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

/// Both together: configuration entries compacted into snapshots, servers removed before a
/// snapshot, late copies of entries below a follower's base. This combination found two
/// defects the separate runs did not (a late copy of an old configuration entry below the base
/// becoming the configuration again; a removed server re-added by a late retry once its
/// removal was compacted away).
#[test]
fn safety_holds_under_random_faults_with_membership_changes_and_snapshots_3_nodes() {
    let list = random_seeds(200);
    chaos_test_with(3, list, true, Some((20, 5)));
}

#[test]
fn safety_holds_under_random_faults_with_membership_changes_and_snapshots_5_nodes() {
    let list = random_seeds(200);
    chaos_test_with(5, list, true, Some((40, 5)));
}
