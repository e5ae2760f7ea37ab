//! Membership changes (thesis ch. 4) on small clusters of cores wired by hand: learners,
//! promotion, removal (of the leader too), Ongaro's rule, truncation and idempotent retries.

use super::*;
use crate::raft::guard;
use crate::raft::membership::MemberRole;
use crate::raft::node::tests::msg;
use std::collections::BTreeSet;

fn config(id: NodeId, membership: Membership) -> Config {
    Config {
        id,
        membership,
        election_ticks: (10, 20),
        heartbeat_ticks: 2,
        max_inflight: 4,
        vote_floor: 0,
        vote_floor_term: 0,
        started_over: (0, 0),
        seed: 1,
    }
}

fn address(id: NodeId) -> String {
    format!("10.0.0.{id}:7000")
}

fn add(id: NodeId) -> ConfChange {
    ConfChange::AddLearner {
        id,
        address: address(id),
    }
}

fn client() -> ReplyTo {
    "127.0.0.1:9".parse().unwrap()
}

fn is_busy(r: &Option<ClientResult>) -> bool {
    matches!(r, Some(ClientResult::Busy { .. }))
}

fn is_configured(r: &Option<ClientResult>) -> bool {
    matches!(r, Some(ClientResult::Configured { .. }))
}

fn refused_for(r: &Option<ClientResult>, why: &str) -> bool {
    matches!(r, Some(ClientResult::Refused { reason }) if reason.contains(why))
}

/// Which messages the network loses.
type Loss = Box<dyn Fn(&Message) -> bool>;

/// Cores exchanging messages instantly, with nodes taken down and links cut by hand.
struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    /// Receive nothing; what they would send is lost.
    down: BTreeSet<NodeId>,
    /// Messages for which this holds are lost.
    lose: Option<Loss>,
    replies: Vec<ClientReply>,
    delivered: Vec<Message>,
    request_id: u64,
}

impl Cluster {
    fn new(voters: &[NodeId]) -> Cluster {
        let nodes = voters
            .iter()
            .map(|&id| {
                let n = Node::new(
                    config(id, Membership::voters(voters)),
                    HardState::default(),
                    vec![],
                );
                (id, n)
            })
            .collect();
        Cluster {
            nodes,
            down: BTreeSet::new(),
            lose: None,
            replies: Vec::new(),
            delivered: Vec::new(),
            request_id: 0,
        }
    }

    /// A joining server: empty disk, empty bootstrap configuration (§4.1).
    fn join(&mut self, id: NodeId) {
        let n = Node::new(
            config(id, Membership::default()),
            HardState::default(),
            vec![],
        );
        self.nodes.insert(id, n);
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[&id]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Carries out every Ready and delivers every message until none is left.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut queue = Vec::new();
            for (id, n) in self.nodes.iter_mut() {
                let rd = n.ready();
                n.advance();
                if !self.down.contains(id) {
                    queue.extend(rd.messages);
                    self.replies.extend(rd.replies.into_iter().map(|(_, r)| r));
                }
            }
            if queue.is_empty() {
                return;
            }
            for m in queue {
                let lost = self.down.contains(&m.to) || self.lose.as_ref().is_some_and(|f| f(&m));
                if let Some(n) = self.nodes.get_mut(&m.to).filter(|_| !lost) {
                    self.delivered.push(m.clone());
                    n.step(m);
                }
            }
        }
        panic!("messages never settled");
    }

    /// Ticks every node that is up `n` times, settling after each.
    fn tick(&mut self, n: usize) {
        for _ in 0..n {
            for (id, node) in self.nodes.iter_mut() {
                if !self.down.contains(id) {
                    node.tick();
                }
            }
            self.settle();
        }
    }

    /// Node `id` times out (alone) and campaigns.
    fn campaign(&mut self, id: NodeId) {
        self.settle();
        // The others have not heard from a leader for a minimum election timeout, so they
        // grant pre-votes (thesis §9.6).
        for n in self.nodes.values_mut() {
            n.election_elapsed = n.cfg.election_ticks.0;
        }
        let n = self.node_mut(id);
        for _ in 0..100 {
            if n.role() == Role::PreCandidate {
                break;
            }
            n.tick();
        }
        assert_eq!(n.role(), Role::PreCandidate, "node {id} did not campaign");
        self.settle();
    }

    fn elect(&mut self, id: NodeId) {
        self.campaign(id);
        assert_eq!(self.node(id).role(), Role::Leader, "node {id} not elected");
    }

    /// Sends a client request to `id`; returns its request ID.
    fn send(&mut self, id: NodeId, op: ClientOp) -> u64 {
        self.request_id += 1;
        let req = ClientRequest {
            id: self.request_id,
            op,
        };
        self.node_mut(id).request(client(), req);
        self.settle();
        self.request_id
    }

    /// The answer to request `rid`, if any yet.
    fn answer(&self, rid: u64) -> Option<ClientResult> {
        self.replies
            .iter()
            .rev()
            .find(|r| r.id == rid)
            .map(|r| r.result.clone())
    }

    fn change(&mut self, id: NodeId, change: ConfChange) -> Option<ClientResult> {
        let rid = self.send(
            id,
            ClientOp::ChangeMembers {
                change,
                force: false,
            },
        );
        self.answer(rid)
    }

    fn append(&mut self, id: NodeId, seq: u64) -> u64 {
        let op = ClientOp::Append {
            client: 7,
            seq,
            data: format!("x{seq}"),
        };
        self.send(id, op)
    }
}

#[test]
fn a_learner_gets_the_log_but_its_acknowledgements_commit_nothing_and_its_votes_elect_no_one() {
    // Thesis §4.2.1: a learner (non-voting member) catches up without counting in any quorum.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    assert!(is_configured(&c.change(1, add(4))));
    c.tick(2);
    assert_eq!(c.node(4).log().entries(), c.node(1).log().entries());
    assert_eq!(
        c.node(4).membership().get(4).unwrap().role,
        MemberRole::Learner
    );
    // With both other voters down, the learner's acknowledgement commits nothing.
    c.down.extend([2, 3]);
    let commit = c.node(1).commit_index();
    c.append(1, 1);
    let last = c.node(1).log().last_index();
    assert_eq!(
        c.node(1).progress[&4].match_index,
        last,
        "the learner has it"
    );
    assert_eq!(
        c.node(1).commit_index(),
        commit,
        "a learner's ack committed"
    );
    // The learner never campaigns, however long it hears nothing.
    c.down = BTreeSet::from([1, 2, 3]);
    let term = c.node(4).term();
    c.tick(100);
    assert_eq!((c.node(4).role(), c.node(4).term()), (Role::Follower, term));
    // A candidate counts no learner's grant: 2 needs 3, whatever 4 says.
    c.down.clear();
    let n2 = c.node_mut(2);
    while n2.role() != Role::PreCandidate {
        n2.tick();
    }
    let t = n2.term();
    n2.step(msg(4, 2, t + 1, Body::PreVoteResponse { granted: true }));
    assert_eq!(
        n2.role(),
        Role::PreCandidate,
        "a learner's pre-vote counted"
    );
    n2.step(msg(3, 2, t + 1, Body::PreVoteResponse { granted: true }));
    assert_eq!(n2.role(), Role::Candidate);
    n2.step(msg(
        4,
        2,
        t + 1,
        Body::RequestVoteResponse { granted: true },
    ));
    assert_eq!(n2.role(), Role::Candidate, "a learner's vote counted");
    n2.step(msg(
        3,
        2,
        t + 1,
        Body::RequestVoteResponse { granted: true },
    ));
    assert_eq!(n2.role(), Role::Leader);
}

#[test]
fn a_learner_is_promoted_only_once_it_has_caught_up() {
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    c.down.insert(4);
    assert!(is_configured(&c.change(1, add(4))));
    // Never heard from: it may not even be running.
    let r = c.change(1, ConfChange::Promote { id: 4 });
    assert!(
        is_busy(&r),
        "a learner never heard from was promoted: {r:?}"
    );
    // Far behind.
    c.down.remove(&4);
    c.tick(2);
    c.node_mut(1).progress.get_mut(&4).unwrap().match_index = 1;
    for seq in 1..=PROMOTE_MAX_LAG + 1 {
        c.node_mut(1).request(
            client(),
            ClientRequest {
                id: 0,
                op: ClientOp::Append {
                    client: 7,
                    seq,
                    data: "y".into(),
                },
            },
        );
    }
    let lag = c.node(1).log().last_index() - 1;
    assert!(lag > PROMOTE_MAX_LAG);
    let leader = c.node_mut(1);
    let rid = 99;
    leader.change_members(
        Waiter {
            reply_to: client(),
            id: rid,
        },
        ConfChange::Promote { id: 4 },
        false,
    );
    c.settle();
    assert!(is_busy(&c.answer(rid)), "promoted {lag} entries behind");
    // Silent for an election timeout.
    c.down.insert(4);
    c.tick(21);
    assert!(is_busy(&c.change(1, ConfChange::Promote { id: 4 })));
    // Caught up and answering: promoted.
    c.down.remove(&4);
    c.tick(2);
    assert_eq!(c.node(4).log().last_index(), c.node(1).log().last_index());
    assert!(is_configured(&c.change(1, ConfChange::Promote { id: 4 })));
    assert!(c.node(1).membership().is_voter(4));
    c.tick(2);
    assert!(c.node(4).membership().is_voter(4));
}

#[test]
fn a_change_while_another_is_uncommitted_is_held_off_and_a_retry_waits_for_its_entry() {
    // Thesis §4.2 / Ongaro 2015: at most one uncommitted configuration; another change is
    // answered Busy (the one in progress may be committed already, unknown to a new leader).
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    c.down.extend([2, 3]);
    let first = c.send(
        1,
        ClientOp::ChangeMembers {
            change: add(4),
            force: false,
        },
    );
    assert_eq!(c.answer(first), None, "answered before it committed");
    assert!(
        c.node(1).membership().contains(4),
        "in force once in the log"
    );
    let in_progress = |r: &Option<ClientResult>| matches!(r, Some(ClientResult::Busy { reason }) if reason.contains("in progress"));
    let r = c.change(1, add(5));
    assert!(in_progress(&r), "{r:?}");
    let r = c.change(1, ConfChange::Remove { id: 3 });
    assert!(in_progress(&r), "{r:?}");
    // A retry of the same change waits for the same entry and is the one answered.
    let retry = c.send(
        1,
        ClientOp::ChangeMembers {
            change: add(4),
            force: false,
        },
    );
    c.down.clear();
    c.tick(2);
    assert!(is_configured(&c.answer(retry)));
    assert_eq!(c.node(1).log().entries().len(), 2, "one entry for both");
    // Changes already in effect are answered as done at once.
    assert!(is_configured(&c.change(1, add(4))));
    assert!(is_configured(&c.change(1, ConfChange::Promote { id: 2 })));
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 4 })));
    c.tick(2);
    let before = c.node(1).log().last_index();
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 4 })));
    assert_eq!(
        c.node(1).log().last_index(),
        before,
        "a retried removal appended"
    );
    let r = c.change(1, ConfChange::Remove { id: 9 });
    assert!(refused_for(&r, "not a member"), "{r:?}");
}

#[test]
fn a_new_leader_is_busy_until_an_entry_of_its_term_commits() {
    // Ongaro, raft-dev 2015: a leader appends a configuration only after committing an entry
    // of its own term.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.down.insert(1);
    // Node 2 wins, but hears no acknowledgement of its no-op.
    c.lose = Some(Box::new(|m| {
        matches!(m.body, Body::AppendEntriesResponse { .. }) && m.to == 2
    }));
    c.elect(2);
    let r = c.change(2, ConfChange::Remove { id: 1 });
    assert!(is_busy(&r), "{r:?}");
    c.lose = None;
    c.tick(2);
    assert!(c.node(2).commit_index() == c.node(2).log().last_index());
    assert!(is_configured(&c.change(2, ConfChange::Remove { id: 1 })));
}

#[test]
fn a_removed_follower_learns_of_it_and_takes_no_further_part() {
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 3 })));
    assert_eq!(c.node(1).contacts(), vec![2, 3], "3 is still told");
    c.tick(2);
    assert!(c.node(3).removed(), "node 3 did not learn it was removed");
    // The leader stops sending to it an election timeout after the removal committed.
    c.tick(20);
    assert_eq!(c.node(1).contacts(), vec![2]);
    assert!(!c.node(1).progress.contains_key(&3));
    // It answers nothing, and never campaigns.
    let n3 = c.node_mut(3);
    let term = n3.term();
    n3.step(msg(
        2,
        3,
        term + 1,
        Body::RequestVote {
            last_log_index: 9,
            last_log_term: 9,
        },
    ));
    for _ in 0..100 {
        n3.tick();
    }
    let rd = n3.ready();
    n3.advance();
    assert!(rd.messages.is_empty());
    assert_eq!(n3.term(), term);
    // The two remaining voters commit on their own.
    c.down.insert(3);
    let rid = c.append(1, 1);
    assert!(matches!(c.answer(rid), Some(ClientResult::Appended { .. })));
}

#[test]
fn a_removed_leader_steps_down_once_its_removal_commits_and_hands_over_with_timeout_now() {
    // Thesis §4.2.2.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.down.insert(2);
    let rid = c.send(
        1,
        ClientOp::ChangeMembers {
            change: ConfChange::Remove { id: 1 },
            force: false,
        },
    );
    // Configuration {2, 3}: node 3's acknowledgement alone is no majority, and the leader
    // does not count itself.
    assert_eq!(c.answer(rid), None);
    assert_eq!(c.node(1).role(), Role::Leader);
    let rid2 = c.append(1, 1);
    assert_eq!(
        c.answer(rid2),
        None,
        "committed without a majority of {{2, 3}}"
    );
    c.down.clear();
    c.tick(2);
    assert!(is_configured(&c.answer(rid)));
    assert!(c.node(1).removed());
    assert_ne!(c.node(1).role(), Role::Leader);
    let handover = c
        .delivered
        .iter()
        .find(|m| m.from == 1 && m.body == Body::TimeoutNow)
        .expect("TimeoutNow sent");
    let heir = handover.to;
    assert_eq!(c.node(heir).role(), Role::Leader);
    assert_eq!(c.node(heir).term(), 2, "one election, at once");
    let rid3 = c.append(heir, 2);
    assert!(matches!(
        c.answer(rid3),
        Some(ClientResult::Appended { .. })
    ));
}

#[test]
fn truncating_an_uncommitted_configuration_reverts_to_the_previous_one() {
    // Thesis §4.1: a server uses the latest configuration in its log, committed or not.
    let mut f = Node::new(
        config(2, Membership::voters(&[1, 2, 3])),
        HardState::default(),
        vec![],
    );
    let grown = Membership::voters(&[1, 2, 3]).apply(&add(4)).unwrap();
    f.step(msg(
        1,
        2,
        1,
        append(
            (0, 0),
            vec![
                e(1, 1, Payload::Noop),
                e(2, 1, Payload::Config(grown.clone())),
            ],
            1,
        ),
    ));
    f.ready();
    f.advance();
    assert_eq!(f.membership(), &grown);
    assert_eq!(
        (f.config_index(), f.committed_membership()),
        (2, &Membership::voters(&[1, 2, 3]))
    );
    // The leader of term 2 never had it: its entry 2 replaces the configuration.
    f.step(msg(
        3,
        2,
        2,
        append((1, 1), vec![e(2, 2, Payload::Noop)], 2),
    ));
    f.ready();
    f.advance();
    assert_eq!(f.membership(), &Membership::voters(&[1, 2, 3]));
    assert_eq!(f.config_index(), 0);
}

/// The raft-dev post "bug in single-server membership changes" (Ongaro, July 2015), rebuilt
/// with a learner promotion as the added server (our one-server "add" is learner, then
/// promote). Four servers {1,2,3,4}; leader 1 (term 1) promotes 5, making C = {1..5}, stored
/// only on 1 and 5. Node 2 wins term 2 with 2, 3, 4 under the old configuration and removes 1,
/// C' = {2,3,4}, committed by 2 and 3. Node 1 then wins term 3 with 1, 4, 5 under C (4's log
/// ends in term 1 and is shorter) and commits C's entry over C': two majorities, {2,3} of C'
/// and {1,4,5} of C, with no server in common, and two different entries committed at one
/// index. With the rule, 2 cannot append C' before an entry of term 2 commits, which needs
/// 3 of {1,2,3,4}, so 4 holds term 2 and never votes for 1.
fn ongaro_2015(with_the_rule: bool) -> Cluster {
    let mut c = Cluster::new(&[1, 2, 3, 4]);
    c.elect(1);
    c.join(5);
    assert!(is_configured(&c.change(1, add(5))));
    c.tick(2);
    c.down.extend([2, 3, 4]);
    assert_eq!(c.change(1, ConfChange::Promote { id: 5 }), None);
    let promoted = c.node(1).log().last_index();
    // Node 1 (with 5) is cut off; 2, 3 and 4 elect node 2 under the configuration they have.
    c.down = BTreeSet::from([1, 5]);
    // 4 votes for 2 but receives none of its entries.
    c.lose = Some(Box::new(|m| {
        matches!(m.body, Body::AppendEntries { .. }) && m.from == 2 && m.to == 4
    }));
    c.elect(2);
    let removal = ConfChange::Remove { id: 1 };
    if with_the_rule {
        // Only 3 has the no-op: 2 of the 4 voters, no commit, so no change yet.
        let r = c.change(2, removal.clone());
        assert!(is_busy(&r), "{r:?}");
        c.lose = None;
        c.tick(2);
        let r = c.change(2, removal);
        assert!(is_configured(&r), "{r:?}");
    } else {
        // A leader without the rule appends the removal at once.
        let next = c.node(2).membership().apply(&removal).unwrap();
        c.node_mut(2).append_entry(Payload::Config(next));
        c.down.insert(4);
        c.settle();
        c.tick(1);
    }
    let removed_at = c.node(2).config_index();
    assert!(
        c.node(2).commit_index() >= removed_at,
        "the removal did not commit"
    );
    // Now 1, 4 and 5 can talk, 2 and 3 cannot.
    c.down = BTreeSet::from([2, 3]);
    c.lose = None;
    c.tick(60);
    assert!(promoted <= removed_at);
    c
}

#[test]
fn ongaro_2015_single_server_change_bug_without_the_rule_commits_conflicting_configurations() {
    let c = ongaro_2015(false);
    let (n1, n2) = (c.node(1), c.node(2));
    assert_eq!(n1.role(), Role::Leader, "node 1 was not re-elected");
    let conflict = (1..=n1.commit_index().min(n2.commit_index()))
        .find(|&i| n1.log().get(i) != n2.log().get(i));
    assert!(
        conflict.is_some(),
        "no conflicting commitment without the rule"
    );
    let (c1, c2) = (n1.committed_membership(), n2.committed_membership());
    let voters = |m: &Membership| m.voter_ids().collect::<BTreeSet<_>>();
    assert_eq!(voters(c1), BTreeSet::from([1, 2, 3, 4, 5]));
    assert_eq!(voters(c2), BTreeSet::from([2, 3, 4]));
}

#[test]
fn ongaro_2015_single_server_change_bug_cannot_happen_with_the_rule() {
    let c = ongaro_2015(true);
    for id in [1, 4, 5] {
        assert_ne!(
            c.node(id).role(),
            Role::Leader,
            "node {id} leads with a minority"
        );
    }
    let (n1, n2) = (c.node(1), c.node(2));
    for i in 1..=n1.commit_index().min(n2.commit_index()) {
        assert_eq!(n1.log().get(i), n2.log().get(i), "conflict at {i}");
    }
}

#[test]
fn a_late_append_entries_with_an_older_configuration_does_not_revert_a_follower() {
    // Thesis §4.1: the latest configuration in the log is in force. A duplicated or delayed
    // AppendEntries carrying a prefix of the log stores nothing new and must not make an
    // earlier configuration look like the latest.
    let mut f = Node::new(
        config(2, Membership::voters(&[1, 2, 3])),
        HardState::default(),
        vec![],
    );
    let with_4 = Membership::voters(&[1, 2, 3]).apply(&add(4)).unwrap();
    let voter_4 = with_4.apply(&ConfChange::Promote { id: 4 }).unwrap();
    let entries = vec![
        Entry {
            index: 1,
            term: 1,
            payload: Payload::Config(with_4),
        },
        Entry {
            index: 2,
            term: 1,
            payload: Payload::Config(voter_4.clone()),
        },
    ];
    let append = |entries: Vec<Entry>| Body::AppendEntries {
        prev_log_index: 0,
        prev_log_term: 0,
        entries,
        leader_commit: 0,
        read_seq: 0,
    };
    f.step(msg(1, 2, 1, append(entries.clone())));
    f.ready();
    f.advance();
    f.step(msg(1, 2, 1, append(entries[..1].to_vec())));
    f.ready();
    f.advance();
    assert_eq!(f.log().last_index(), 2);
    assert_eq!(f.membership(), &voter_4, "an older configuration took over");
    assert_eq!(f.config_index(), 2);
}

#[test]
fn a_removed_id_is_added_again_only_when_asked_for_explicitly() {
    // A removed server ignores everything from then on; a late duplicate of the request that
    // once added it must not add it back as a member that will never answer.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    assert!(is_configured(&c.change(1, add(4))));
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 4 })));
    c.tick(2);
    assert!(c.node(4).removed());
    let r = c.change(1, add(4));
    assert!(refused_for(&r, "was removed"), "{r:?}");
    assert!(!c.node(1).membership().contains(4));
    // Asked for explicitly, with its peer started over on an empty data dir, it comes back.
    c.join(4);
    let rejoin = ConfChange::Rejoin {
        id: 4,
        address: address(4),
    };
    assert!(is_configured(&c.change(1, rejoin)));
    c.tick(2);
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).log().last_index(), c.node(1).log().last_index());
    assert!(is_configured(&c.change(1, ConfChange::Promote { id: 4 })));
    assert!(c.node(1).membership().is_voter(4));
}

#[test]
fn a_learner_that_no_longer_hears_a_leader_grants_pre_votes() {
    // Node 4 is a learner in its log but a voter in a newer configuration it has not received
    // yet; once the leader is silent for an election timeout, it must grant an up-to-date
    // candidate's pre-vote (thesis §9.6), whose configuration counts it (found by the
    // simulator: a cluster without a leader stayed so for good).
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    assert!(is_configured(&c.change(1, add(4))));
    c.tick(2);
    assert_eq!(c.node(4).leader(), Some(1));
    let n4 = c.node_mut(4);
    for _ in 0..25 {
        n4.tick();
    }
    let (term, last) = (n4.term(), n4.log().last_index());
    n4.step(msg(
        2,
        4,
        term + 1,
        Body::PreVote {
            last_log_index: last,
            last_log_term: term,
        },
    ));
    let rd = n4.ready();
    n4.advance();
    assert_eq!(rd.messages[0].body, Body::PreVoteResponse { granted: true });
}

// ---- the quorum guard -------------------------------------------------------------------

/// Refused by the quorum guard, naming `silent` as not heard from.
fn refused_by_guard(r: &Option<ClientResult>, silent: &str) -> bool {
    matches!(r, Some(ClientResult::Refused { reason })
        if guard::is_guard_refusal(reason) && reason.contains(&format!("(not heard from: {silent})")))
}

impl Cluster {
    /// [`Cluster::change`] with `force`: the quorum guard is skipped.
    fn force(&mut self, id: NodeId, change: ConfChange) -> Option<ClientResult> {
        let rid = self.send(
            id,
            ClientOp::ChangeMembers {
                change,
                force: true,
            },
        );
        self.answer(rid)
    }

    /// The leader has not heard from `id` for `ticks` (without the ticks passing, so that its
    /// check quorum does not run meanwhile).
    fn silent_for(&mut self, leader: NodeId, id: NodeId, ticks: u64) {
        self.node_mut(leader)
            .progress
            .get_mut(&id)
            .unwrap()
            .last_contact_ticks = ticks;
    }
}

#[test]
fn removing_a_live_voter_while_another_is_silent_is_refused_and_removing_the_silent_one_is_not() {
    // The bug: with 3 of {1, 2, 3} down, removing 2 left {1, 3} with one live voter.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.down.insert(3);
    // An election timeout (at most 20 ticks) without an answer from 3.
    c.tick(19);
    assert!(c.node(1).progress[&3].heard_within(20));
    c.tick(1);
    assert!(!c.node(1).progress[&3].heard_within(20));
    let before = c.node(1).log().last_index();
    assert_eq!(c.node(1).role(), Role::Leader, "2 keeps 1 leading");
    let r = c.change(1, ConfChange::Remove { id: 2 });
    assert!(refused_by_guard(&r, "node 3"), "{r:?}");
    let Some(ClientResult::Refused { reason }) = &r else {
        unreachable!()
    };
    assert_eq!(
        reason,
        "removing node 2 would leave 1 of 2 voters heard from within the election timeout (not heard from: node 3); a majority of the new configuration must be live; --force skips this check"
    );
    assert!(c.node(1).membership().contains(2), "nothing changed");
    assert_eq!(c.node(1).log().last_index(), before, "nothing appended");
    // A learner changes no voter: 2 of {1, 2, 3} are live.
    c.join(4);
    assert!(is_configured(&c.change(1, add(4))));
    // Removing the dead voter leaves {1, 2}, both live.
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 3 })));
    assert_eq!(
        c.node(1).membership().voter_ids().collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn a_new_leader_waits_to_hear_from_a_follower_before_counting_it_live_or_silent() {
    // A new leader has heard from no follower yet. One that has not answered it is not live,
    // however recent the election; until an election timeout has passed without an answer it
    // may be, so the change is answered Busy (the client retries), then refused.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.down.insert(3);
    c.elect(1);
    assert_eq!(c.node(1).progress[&3].last_contact_ticks, 0);
    let waits = |r: &Option<ClientResult>| matches!(r, Some(ClientResult::Busy { reason }) if reason.contains("waits to hear from node 3"));
    let r = c.change(1, ConfChange::Remove { id: 2 });
    assert!(waits(&r), "{r:?}");
    c.tick(19);
    let r = c.change(1, ConfChange::Remove { id: 2 });
    assert!(waits(&r), "{r:?}");
    c.tick(1);
    let r = c.change(1, ConfChange::Remove { id: 2 });
    assert!(refused_by_guard(&r, "node 3"), "{r:?}");
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 3 })));
}

#[test]
fn a_promotion_is_refused_when_too_few_of_the_new_voters_are_live_and_force_skips_the_check() {
    // Promoting learner 4 makes 4 voters, 3 needed. A leader that still hears a majority of
    // its voters always has one of the new ones, but between the guard's election timeout
    // and its next check quorum it may not: 2 and 3 silent for a timeout.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    assert!(is_configured(&c.change(1, add(4))));
    c.tick(2);
    c.silent_for(1, 2, 20);
    c.silent_for(1, 3, 20);
    let promote = ConfChange::Promote { id: 4 };
    let r = c.change(1, promote.clone());
    assert!(refused_by_guard(&r, "nodes 2, 3"), "{r:?}");
    assert!(!c.node(1).membership().is_voter(4));
    // One of them answered within the timeout: 3 of 4.
    c.silent_for(1, 2, 19);
    assert!(is_configured(&c.change(1, promote.clone())));
    // Already in effect: answered as done, whoever is silent now.
    c.silent_for(1, 2, 20);
    c.silent_for(1, 3, 20);
    assert!(is_configured(&c.change(1, promote)));
    // Forced: removing 1 would leave 2 silent voters of {2, 3, 4}. (They are up, so the
    // removal commits.)
    let remove = ConfChange::Remove { id: 1 };
    let r = c.change(1, remove.clone());
    assert!(refused_by_guard(&r, "nodes 2, 3"), "{r:?}");
    assert!(is_configured(&c.force(1, remove)));
    assert!(c.node(1).removed());
}

#[test]
fn a_forced_removal_waits_for_the_silent_voter_and_a_retry_is_answered_as_done() {
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.down.insert(3);
    c.tick(20);
    let remove_2 = ConfChange::Remove { id: 2 };
    assert!(refused_by_guard(&c.change(1, remove_2.clone()), "node 3"));
    // Forced: appended, in force at once, and it cannot commit without 3.
    let rid = c.send(
        1,
        ClientOp::ChangeMembers {
            change: remove_2.clone(),
            force: true,
        },
    );
    assert_eq!(c.answer(rid), None);
    assert!(!c.node(1).membership().contains(2));
    // A retry without force is not refused: it waits for the same entry. Another change is
    // held off as before, not refused.
    let retry = c.send(
        1,
        ClientOp::ChangeMembers {
            change: remove_2,
            force: false,
        },
    );
    assert_eq!(c.answer(retry), None);
    let r = c.change(1, ConfChange::Remove { id: 3 });
    assert!(
        matches!(&r, Some(ClientResult::Busy { reason }) if reason.contains("in progress")),
        "{r:?}"
    );
    // 3 comes back: the removal commits, and both requests are answered.
    c.down.remove(&3);
    c.tick(2);
    assert!(is_configured(&c.answer(retry)), "{:?}", c.answer(retry));
    assert_eq!(
        c.node(1)
            .committed_membership()
            .voter_ids()
            .collect::<Vec<_>>(),
        vec![1, 3]
    );
}

// ---- removal and rejoining (issue #22) ---------------------------------------------------

fn rejoin(id: NodeId) -> ConfChange {
    ConfChange::Rejoin {
        id,
        address: address(id),
    }
}

impl Cluster {
    /// Node 4 is added as a learner, catches up, is removed and learns it; then its peer
    /// starts over on an empty data dir (not yet added back). Returns the removal's index.
    fn remove_4_and_start_it_over(&mut self) -> Index {
        self.join(4);
        assert!(is_configured(&self.change(1, add(4))));
        self.tick(2);
        assert!(is_configured(&self.change(1, ConfChange::Remove { id: 4 })));
        let removal = self.node(1).config_index();
        self.tick(2);
        assert!(self.node(4).removed());
        self.join(4);
        removal
    }

    /// Sends `change` to `id` without waiting for its answer; returns the request ID.
    fn start_change(&mut self, id: NodeId, change: ConfChange) -> u64 {
        self.send(
            id,
            ClientOp::ChangeMembers {
                change,
                force: false,
            },
        )
    }

    /// Appends `seq` with 16,000 bytes of data: three fill most of an AppendEntries.
    fn append_big(&mut self, id: NodeId, seq: u64) -> u64 {
        let op = ClientOp::Append {
            client: 7,
            seq,
            data: "y".repeat(16_000),
        };
        self.send(id, op)
    }
}

#[test]
fn a_member_added_back_does_not_take_its_old_removal_for_its_own_while_the_rejoin_is_uncommitted() {
    // Node 4 replays the log from the leader, its removal included, committed, and then the
    // entry adding it back, which only the leader and 4 have: 4 must not exit.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.remove_4_and_start_it_over();
    c.down.extend([2, 3]);
    let rid = c.start_change(1, rejoin(4));
    let rejoin_at = c.node(1).config_index();
    assert_eq!(c.answer(rid), None, "committed without 2 or 3");
    c.tick(4);
    assert_eq!(
        c.node(4).log().last_index(),
        rejoin_at,
        "4 replayed the log"
    );
    assert!(
        !c.node(4).removed(),
        "4 took its old removal for its own while the rejoin was uncommitted"
    );
    c.down.clear();
    c.tick(4);
    assert!(is_configured(&c.answer(rid)));
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).log().entries(), c.node(1).log().entries());
    assert_eq!(c.node(4).commit_index(), c.node(1).commit_index());
    assert!(is_configured(&c.change(1, ConfChange::Promote { id: 4 })));
}

#[test]
fn a_member_added_back_does_not_take_its_old_removal_for_its_own_before_it_has_the_rejoin() {
    // The log after 4's removal fills more than one AppendEntries, and the entry adding it
    // back is not yet committed: the first AppendEntries ends at the leader's commit index,
    // which covers the removal, before the rejoin. Holding 4 to what its own log shows would
    // not do: only the leader knows that the rejoin follows.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    let removal = c.remove_4_and_start_it_over();
    for seq in 1..=3 {
        c.append_big(1, seq);
    }
    let commit = c.node(1).commit_index();
    c.down.extend([2, 3]);
    c.append_big(1, 4);
    let rid = c.start_change(1, rejoin(4));
    let rejoin_at = c.node(1).config_index();
    assert_eq!(rejoin_at, commit + 2);
    c.tick(4);
    // The scenario happened: an AppendEntries to 4 ended at the commit index, between the
    // removal and the rejoin.
    let ends = |m: &Message| match &m.body {
        Body::AppendEntries { entries, .. } => entries.last().map(|e| e.index),
        _ => None,
    };
    assert!(
        c.delivered
            .iter()
            .any(|m| m.to == 4 && ends(m) == Some(commit)),
        "no AppendEntries ended at {commit}"
    );
    assert!(removal < commit);
    assert!(
        !c.node(4).removed(),
        "4 took its old removal for its own before it had the rejoin"
    );
    assert_eq!(c.node(4).log().last_index(), rejoin_at);
    assert!(
        c.node(4).commit_index() < removal,
        "4 was told a commit index covering its removal"
    );
    c.down.clear();
    c.tick(4);
    assert!(is_configured(&c.answer(rid)));
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).commit_index(), c.node(1).commit_index());
}

#[test]
fn a_member_added_back_does_not_take_its_old_removal_for_its_own_from_a_new_leader_whose_commit_lags(
) {
    // 1 commits the rejoin with 2's acknowledgement and goes down before anyone hears that it
    // committed. 2 leads, and until an entry of its term commits, its commit index covers 4's
    // removal but not the rejoin.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.remove_4_and_start_it_over();
    let next = c.node(1).log().last_index() + 1;
    c.down.insert(3);
    c.lose = Some(Box::new(move |m| match &m.body {
        Body::AppendEntries { leader_commit, .. } => {
            m.from == 1 && (m.to == 4 || *leader_commit >= next)
        }
        _ => false,
    }));
    let rid = c.start_change(1, rejoin(4));
    assert_eq!(c.node(1).config_index(), next);
    assert!(is_configured(&c.answer(rid)), "1 committed it with 2");
    assert!(c.node(2).commit_index() < next && c.node(2).log().last_index() == next);
    assert_eq!(c.node(4).log().last_index(), 0, "4 heard nothing from 1");
    // 2 wins with 3; 3's acknowledgements are lost, so 2's commit index stays behind.
    c.down = BTreeSet::from([1]);
    c.lose = Some(Box::new(|m| {
        matches!(m.body, Body::AppendEntriesResponse { .. }) && m.from == 3 && m.to == 2
    }));
    c.elect(2);
    c.tick(4);
    assert!(
        c.node(2).commit_index() < next,
        "2's commit index caught up"
    );
    assert!(c.node(4).log().last_index() > next, "4 replayed 2's log");
    assert!(
        !c.node(4).removed(),
        "4 took its old removal for its own from a leader whose commit index lags"
    );
    c.lose = None;
    c.tick(4);
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).commit_index(), c.node(2).commit_index());
    assert!(is_configured(&c.change(2, ConfChange::Promote { id: 4 })));
}

#[test]
fn a_member_added_back_does_not_take_its_old_removal_for_its_own_from_a_late_append_entries() {
    // Found by the simulator (5 nodes with rejoins, seed 1796800000000376): 4 replays the log
    // from an AppendEntries that ends between its removal and the committed rejoin, carrying
    // the leader's whole commit index, so 4 commits past its removal; then a late copy of an
    // AppendEntries sent before the rejoin committed arrives, its commit index held back to
    // before the removal. Its commit index is not 4's: it says nothing of what 4 committed.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    let removal = c.remove_4_and_start_it_over();
    c.down.insert(4);
    c.append(1, 1);
    assert!(is_configured(&c.change(1, rejoin(4))));
    let (rejoin_at, commit) = (c.node(1).config_index(), c.node(1).commit_index());
    assert!(commit >= rejoin_at && rejoin_at > removal + 1);
    let leader = c.node(1);
    let term = leader.term();
    let replay = Body::AppendEntries {
        prev_log_index: 0,
        prev_log_term: 0,
        entries: leader.log().entries()[..=removal as usize].to_vec(),
        leader_commit: commit,
        read_seq: 0,
    };
    let late = Body::AppendEntries {
        prev_log_index: removal - 1,
        prev_log_term: leader.log().term_at(removal - 1).unwrap(),
        entries: vec![],
        leader_commit: removal - 1,
        read_seq: 0,
    };
    let four = c.node_mut(4);
    four.step(msg(1, 4, term, replay));
    assert_eq!(
        four.commit_index(),
        removal + 1,
        "4 committed past its removal"
    );
    four.step(msg(1, 4, term, late));
    assert!(
        !four.removed(),
        "4 took its old removal for its own from a late AppendEntries"
    );
    c.down.clear();
    c.tick(4);
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).commit_index(), c.node(1).commit_index());
}

#[test]
fn a_member_added_back_whose_rejoin_is_lost_waits_to_be_added_again() {
    // The rejoin reaches only 1 and 4; 1 goes down, and 2, which never had it, leads and
    // tells 4 (a removed member to it) of the old removal, truncating the rejoin from 4's
    // log. That removal is still not 4's own: it waits, as a peer started over does, and the
    // operator's retry adds it back.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.remove_4_and_start_it_over();
    c.down.extend([2, 3]);
    let rid = c.start_change(1, rejoin(4));
    c.tick(2);
    assert!(c.node(4).membership().contains(4));
    assert_eq!(c.answer(rid), None);
    c.down = BTreeSet::from([1]);
    c.elect(2);
    c.tick(4);
    assert!(
        !c.node(4).membership().contains(4),
        "the rejoin was truncated"
    );
    assert_eq!(c.node(4).log().entries(), c.node(2).log().entries());
    assert!(
        !c.node(4).removed(),
        "4 took its old removal for its own once the rejoin was truncated"
    );
    // The retry, on the new leader.
    assert!(is_configured(&c.change(2, rejoin(4))));
    c.tick(2);
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).log().entries(), c.node(2).log().entries());
    assert!(is_configured(&c.change(2, ConfChange::Promote { id: 4 })));
}

/// Log entry `index` of `term`, for AppendEntries written by hand.
fn e(index: Index, term: Term, payload: Payload) -> Entry {
    Entry {
        index,
        term,
        payload,
    }
}

/// An AppendEntries written by hand: after `prev`, `entries`, with commit index `commit`.
fn append(prev: (Index, Term), entries: Vec<Entry>, commit: Index) -> Body {
    Body::AppendEntries {
        prev_log_index: prev.0,
        prev_log_term: prev.1,
        entries,
        leader_commit: commit,
        read_seq: 0,
    }
}

/// Node 1 of `term` sends `body` to `n` (node 4), which carries out what it returns.
fn step(n: &mut Node, term: Term, body: Body) {
    n.step(msg(1, 4, term, body));
    n.ready();
    n.advance();
}

#[test]
fn a_follower_decides_on_its_removal_from_its_whole_log_and_what_it_saw_truncated() {
    // By hand, as a leader that does not hold back its commit index (an older version)
    // would send it: a member added back (at 4) with its removal (at 3) committed and the
    // rejoin not is not removed; removed again later (at 6), it is; and a rejoin truncated
    // away does not make the removal before it its own.
    let voters = Membership::voters(&[1, 2, 3]);
    let with_4 = voters.apply(&add(4)).unwrap();
    let entries = |term| {
        vec![
            e(1, 1, Payload::Noop),
            e(2, 1, Payload::Config(with_4.clone())),
            e(3, 1, Payload::Config(voters.clone())),
            e(4, term, Payload::Config(with_4.clone())),
        ]
    };
    let fresh = || {
        Node::new(
            config(4, Membership::default()),
            HardState::default(),
            vec![],
        )
    };
    let mut n = fresh();
    step(&mut n, 1, append((0, 0), entries(1), 3));
    assert_eq!(n.commit_index(), 3);
    assert!(!n.removed(), "removed while the rejoin was uncommitted");
    step(&mut n, 1, append((4, 1), vec![e(5, 1, Payload::Noop)], 5));
    assert!(!n.removed());
    step(
        &mut n,
        1,
        append((5, 1), vec![e(6, 1, Payload::Config(voters.clone()))], 6),
    );
    assert!(
        n.removed(),
        "removed again and not added back, it must stop"
    );
    // The rejoin at 4 (term 1) is truncated by a leader of term 2 that never had it.
    let mut n = fresh();
    step(&mut n, 1, append((0, 0), entries(1), 3));
    step(&mut n, 2, append((3, 1), vec![e(4, 2, Payload::Noop)], 4));
    assert!(!n.membership().contains(4), "truncated");
    assert!(
        !n.removed(),
        "a truncated rejoin made the removal before it ours"
    );
    // Never added back: the removal is its own.
    let mut n = fresh();
    step(&mut n, 1, append((0, 0), entries(1)[..3].to_vec(), 3));
    assert!(n.removed());
}

#[test]
fn a_peer_started_over_never_takes_a_removal_its_cluster_had_at_first_contact_for_its_own() {
    // Found by the simulator (seed 1796870000008637): the rejoin reached 4 only partly before
    // its leader died; the next leader never had it, took 4 for the removed member and told
    // it the real commit index, which covered the old removal. By hand: the cluster's log
    // reached index 3 (term 1), with 4's removal, when it first reached the new 4.
    let voters = Membership::voters(&[1, 2, 3]);
    let with_4 = voters.apply(&add(4)).unwrap();
    let started_over = || {
        let mut n = Node::new(
            config(4, Membership::default()),
            HardState::default(),
            vec![],
        );
        n.set_vote_floor(3, 1);
        n
    };
    let old = vec![
        e(1, 1, Payload::Noop),
        e(2, 1, Payload::Config(with_4.clone())),
        e(3, 1, Payload::Config(voters.clone())),
    ];
    let mut n = started_over();
    step(&mut n, 2, append((0, 0), old.clone(), 3));
    assert_eq!(n.commit_index(), 3);
    assert!(!n.removed(), "the removal of an earlier 4 stopped this one");
    // Added back (at 4), then removed again (at 5): that removal is this server's own.
    step(
        &mut n,
        2,
        append((3, 1), vec![e(4, 2, Payload::Config(with_4.clone()))], 4),
    );
    assert!(!n.removed());
    step(
        &mut n,
        2,
        append((4, 2), vec![e(5, 2, Payload::Config(voters.clone()))], 5),
    );
    assert!(n.removed(), "removed after it was added back, it must stop");
    // The same after a restart: the shell hands the floor back in the config.
    let mut cfg = config(4, Membership::default());
    cfg.started_over = (3, 1);
    let mut n = Node::new(cfg, HardState::default(), vec![]);
    step(&mut n, 2, append((0, 0), old.clone(), 3));
    assert!(!n.removed(), "after a restart");
    // A removal at or below the floor's index but of a later term came after first contact.
    let mut n = started_over();
    let later = vec![
        e(1, 1, Payload::Noop),
        e(2, 2, Payload::Config(with_4.clone())),
        e(3, 2, Payload::Config(voters.clone())),
    ];
    step(&mut n, 2, append((0, 0), later, 3));
    assert!(
        n.removed(),
        "a removal of a later term is this server's own"
    );
}

#[test]
fn a_removed_member_that_missed_its_removal_learns_it_from_the_next_leader() {
    // 1 removes 5 while 5 is cut off, and loses leadership before 5 hears of it: 2, the new
    // leader, tells 5.
    let mut c = Cluster::new(&[1, 2, 3, 4, 5]);
    c.elect(1);
    c.down.insert(5);
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 5 })));
    c.tick(2);
    c.down = BTreeSet::from([1, 5]);
    c.elect(2);
    assert!(c.node(2).contacts().contains(&5), "2 does not tell 5");
    c.down.remove(&5);
    c.tick(4);
    assert!(c.node(5).removed(), "5 never learned that it was removed");
    // 2 stops telling it an election timeout after it acknowledged.
    c.tick(20);
    assert!(!c.node(2).contacts().contains(&5));
    assert!(!c.node(2).progress.contains_key(&5));
    // 1 too, once back.
    c.down.clear();
    c.tick(4);
    assert!(!c.node(1).removed() && c.node(1).leader() == Some(2));
    // A member that never answers is dropped after ten election timeouts.
    c.down.insert(4);
    assert!(is_configured(&c.change(2, ConfChange::Remove { id: 4 })));
    c.campaign(3);
    assert_eq!(c.node(3).role(), Role::Leader);
    assert!(c.node(3).contacts().contains(&4));
    c.tick(10 * 20 + 1);
    assert!(!c.node(3).contacts().contains(&4));
}

#[test]
fn a_peer_started_over_under_a_removed_id_is_not_told_of_the_old_removal() {
    // 4 is removed while down and never hears of it; its peer starts over on an empty data
    // dir, to be added back. The leader, still telling the old 4, must not make the new one
    // replay the removal and exit before the operator adds it back; nor must a new leader.
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect(1);
    c.join(4);
    assert!(is_configured(&c.change(1, add(4))));
    c.tick(2);
    c.down.insert(4);
    assert!(is_configured(&c.change(1, ConfChange::Remove { id: 4 })));
    c.join(4);
    c.down.clear();
    c.tick(4);
    assert!(
        !c.node(4).removed(),
        "the old leader's news killed the new 4"
    );
    assert!(!c.node(1).contacts().contains(&4));
    c.campaign(2);
    c.tick(4);
    assert!(
        !c.node(4).removed(),
        "the new leader's news killed the new 4"
    );
    assert_eq!(c.node(4).log().last_index(), 0);
    assert!(is_configured(&c.change(2, rejoin(4))));
    c.tick(2);
    assert!(!c.node(4).removed());
    assert_eq!(c.node(4).log().entries(), c.node(2).log().entries());
}
