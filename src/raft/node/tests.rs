use super::*;

fn cfg(id: NodeId, peers: &[NodeId]) -> Config {
    Config {
        id,
        membership: Membership::voters(&[&[id][..], peers].concat()),
        election_ticks: (10, 20),
        heartbeat_ticks: 2,
        max_inflight: 4,
        vote_floor: 0,
        vote_floor_term: 0,
        started_over: (0, 0),
        seed: 1,
    }
}

fn entry(index: Index, term: Term) -> Entry {
    Entry {
        index,
        term,
        payload: Payload::Noop,
    }
}

/// A peer message as the tests of this module and its children build them.
pub(super) fn msg(from: NodeId, to: NodeId, term: Term, body: Body) -> Message {
    Message {
        cluster: 0,
        from,
        to,
        term,
        body,
        reply_at: None,
    }
}

/// Carries out a Ready as the shell would and returns it.
fn flush(n: &mut Node) -> Ready {
    let rd = n.ready();
    n.advance();
    rd
}

/// Makes node 1 of {1,2,3} leader by answering its pre-vote and vote requests.
fn elect(n: &mut Node) {
    while n.role() != Role::PreCandidate {
        n.tick();
    }
    flush(n);
    n.step(msg(
        2,
        1,
        n.term() + 1,
        Body::PreVoteResponse { granted: true },
    ));
    assert_eq!(n.role(), Role::Candidate);
    flush(n);
    n.step(msg(
        2,
        1,
        n.term(),
        Body::RequestVoteResponse { granted: true },
    ));
    assert_eq!(n.role(), Role::Leader);
    flush(n);
}

fn accepted(match_index: Index) -> Body {
    Body::AppendEntriesResponse {
        read_seq: 0,
        result: AppendResult::Accepted { match_index },
    }
}

#[test]
fn leader_commits_only_entries_of_its_own_term() {
    // Raft §5.4.2, Figure 8 (c): the new leader (term 4) has replicated the term-2 entry
    // at index 2 to a majority, but it must not count that: a later leader could still
    // overwrite it. Only its own term's entry commits it, indirectly.
    let hs = HardState {
        term: 3,
        vote: None,
        commit: 1,
    };
    let mut n = Node::new(cfg(1, &[2, 3]), hs, vec![entry(1, 1), entry(2, 2)]);
    elect(&mut n);
    assert_eq!(n.term(), 4);
    assert_eq!(n.log().last_index(), 3, "leader appended its no-op");
    n.step(msg(2, 1, 4, accepted(2)));
    flush(&mut n);
    assert_eq!(
        n.commit_index(),
        1,
        "old-term entry committed by counting replicas"
    );
    n.step(msg(2, 1, 4, accepted(3)));
    flush(&mut n);
    assert_eq!(n.commit_index(), 3);
}

#[test]
fn a_vote_is_durable_before_it_is_sent() {
    // Figure 2: votedFor is persistent state, written before answering.
    let vote_request = |last_log_index| Body::RequestVote {
        last_log_index,
        last_log_term: 1,
    };
    let mut n = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    n.step(msg(2, 1, 1, vote_request(0)));
    let rd = flush(&mut n);
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((1, Some(2))));
    assert!(!rd.send_before_persist);
    let granted = |g| Body::RequestVoteResponse { granted: g };
    assert_eq!(rd.messages[0].body, granted(true));
    // §5.2: one vote per term, however up to date the second candidate is.
    n.step(msg(3, 1, 1, vote_request(5)));
    let rd = flush(&mut n);
    assert_eq!(rd.messages[0].body, granted(false));
}

#[test]
fn a_leader_replicates_while_writing_and_answers_once_committed() {
    // §10.2.1: the leader may send new entries before writing them itself; the client
    // hears back only once the entry is committed.
    let mut n = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut n);
    let append = ClientRequest {
        id: 1,
        op: ClientOp::Append {
            client: 9,
            seq: 1,
            data: "x".into(),
        },
    };
    n.request("127.0.0.1:9".parse().unwrap(), append);
    let rd = flush(&mut n);
    assert!(rd.send_before_persist);
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.replies.is_empty());
    n.step(msg(2, 1, 1, accepted(2)));
    let rd = flush(&mut n);
    assert_eq!(n.commit_index(), 2);
    let result = &rd.replies[0].1.result;
    assert_eq!(result, &ClientResult::Appended { index: 2, term: 1 });
}

#[test]
fn forged_or_corrupt_messages_are_dropped_not_obeyed() {
    // A leader with a committed log, and a follower of it.
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    assert_eq!(leader.commit_index(), 1);
    let hs = HardState {
        term: 1,
        vote: Some(1),
        commit: 1,
    };
    let mut follower = Node::new(cfg(2, &[1, 3]), hs, vec![entry(1, 1)]);
    let append = |prev: Index, entries: Vec<Entry>| Body::AppendEntries {
        prev_log_index: prev,
        prev_log_term: 0,
        entries,
        leader_commit: 0,
        read_seq: 0,
    };
    let forged = [
        msg(1, 2, 1, append(0, vec![entry(5, 1)])),  // gap
        msg(1, 2, 2, append(0, vec![entry(1, 2)])),  // rewrites a committed entry
        msg(1, 2, 1, append(1, vec![entry(2, 50)])), // entry from a future term
        msg(1, 2, u64::MAX, append(1, vec![])),      // absurd term
        // lengths whose sum overflows (a debug-build panic once)
        msg(
            1,
            2,
            1,
            Body::InstallSnapshot {
                snapshot: SnapshotId {
                    index: 5,
                    term: 1,
                    records_len: u64::MAX,
                    meta_len: 10,
                    ..SnapshotId::default()
                },
                offset: 20,
                data: String::new(),
                crc: 0,
            },
        ),
    ];
    for m in forged {
        follower.step(m);
        flush(&mut follower);
    }
    assert_eq!(follower.term(), 1);
    assert_eq!(follower.log().entries(), &[entry(1, 1)]);
    let rejected = |prev| Body::AppendEntriesResponse {
        read_seq: 0,
        result: AppendResult::Rejected {
            prev_log_index: prev,
            hint_index: prev,
            hint_term: 0,
        },
    };
    for m in [
        msg(2, 1, 1, accepted(1000)),
        msg(3, 1, 1, accepted(u64::MAX)),
        msg(2, 1, 1, rejected(1000)),
    ] {
        leader.step(m);
        flush(&mut leader);
    }
    for _ in 0..10 {
        leader.tick();
        flush(&mut leader);
    }
    assert_eq!(
        leader.commit_index(),
        1,
        "forged acks must not commit anything"
    );
    assert_eq!(leader.role(), Role::Leader);
}

#[test]
fn a_follower_that_lost_its_log_is_replicated_to_again() {
    // Outside Raft's fault model (a wiped data dir), but it must not wedge replication.
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    let mut wiped = Node::new(cfg(2, &[1, 3]), HardState::default(), vec![]);
    // Let the leader's heartbeats and the wiped follower's answers flow a while.
    for _ in 0..20 {
        leader.tick();
        for m in flush(&mut leader).messages {
            if m.to == 2 {
                wiped.step(m);
                for answer in flush(&mut wiped).messages {
                    leader.step(answer);
                    flush(&mut leader);
                }
            }
        }
    }
    assert_eq!(wiped.log().last_index(), leader.log().last_index());
}

fn append_req(id: u64, client: ClientId, seq: u64, data: &str) -> ClientRequest {
    ClientRequest {
        id,
        op: ClientOp::Append {
            client,
            seq,
            data: data.into(),
        },
    }
}

fn client_addr() -> ReplyTo {
    "127.0.0.1:9".parse().unwrap()
}

#[test]
fn a_stale_term_rejection_does_not_move_a_follower_backwards() {
    // Node 1 led term 1 with entries 1-3 on node 2, then was re-elected in term 2. Node 2,
    // already in term 2, answers a delayed term-1 heartbeat; that answer reaches node 1 as
    // leader of term 2 and must not be taken as node 2 losing its log.
    let hs = HardState {
        term: 1,
        vote: Some(1),
        commit: 3,
    };
    let log = vec![entry(1, 1), entry(2, 1), entry(3, 1)];
    let mut leader = Node::new(cfg(1, &[2, 3]), hs, log.clone());
    elect(&mut leader);
    assert_eq!(leader.term(), 2);
    leader.step(msg(2, 1, 2, accepted(3)));
    flush(&mut leader);
    assert_eq!(leader.progress[&2].match_index, 3);

    let hs = HardState {
        term: 2,
        vote: Some(1),
        commit: 3,
    };
    let mut follower = Node::new(cfg(2, &[1, 3]), hs, log);
    let stale_heartbeat = Body::AppendEntries {
        prev_log_index: 3,
        prev_log_term: 1,
        entries: vec![],
        leader_commit: 3,
        read_seq: 0,
    };
    follower.step(msg(1, 2, 1, stale_heartbeat));
    let answers = flush(&mut follower).messages;
    assert_eq!(answers.len(), 1, "a stale leader is told the newer term");
    assert_eq!(answers[0].term, 2);
    for m in answers {
        leader.step(m);
        flush(&mut leader);
    }
    assert_eq!(leader.role(), Role::Leader);
    assert_eq!(
        leader.progress[&2].match_index, 3,
        "match index went backwards on a stale answer"
    );
}

#[test]
fn a_late_rejection_in_the_same_term_does_not_move_a_follower_backwards() {
    // A probe at index 2 that node 2 refused (it had only entry 1) arrives late, duplicated,
    // after node 2 has caught up: only a refusal of a request sent after the leader learned
    // the match index may count as a wiped follower.
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.request(client_addr(), append_req(1, 9, 1, "x"));
    flush(&mut leader);
    leader.step(msg(2, 1, 1, accepted(2)));
    flush(&mut leader);
    assert_eq!(leader.progress[&2].match_index, 2);
    let late = Body::AppendEntriesResponse {
        read_seq: 0,
        result: AppendResult::Rejected {
            prev_log_index: 2,
            hint_index: 2,
            hint_term: 0,
        },
    };
    leader.step(msg(2, 1, 1, late));
    flush(&mut leader);
    assert_eq!(leader.progress[&2].match_index, 2);
}

#[test]
fn a_deposed_leader_is_told_the_new_term_even_if_its_entries_conflict() {
    // Node 2 has committed entry 2 of term 3. The leader of term 2 still sends its own,
    // uncommitted entry 2: that conflict must not hide the newer term from it.
    let hs = HardState {
        term: 3,
        vote: None,
        commit: 2,
    };
    let mut follower = Node::new(cfg(2, &[1, 3]), hs, vec![entry(1, 1), entry(2, 3)]);
    let old = Body::AppendEntries {
        prev_log_index: 1,
        prev_log_term: 1,
        entries: vec![entry(2, 2)],
        leader_commit: 1,
        read_seq: 0,
    };
    follower.step(msg(1, 2, 2, old));
    let answers = flush(&mut follower).messages;
    assert_eq!(answers.len(), 1, "no answer to a deposed leader");
    assert_eq!((answers[0].to, answers[0].term), (1, 3));
    assert_eq!(follower.log().entries(), &[entry(1, 1), entry(2, 3)]);

    let mut deposed = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut deposed);
    deposed.step(answers[0].clone());
    assert_eq!((deposed.role(), deposed.term()), (Role::Follower, 3));
}

#[test]
fn an_echo_of_a_read_seq_never_sent_confirms_no_read() {
    // Thesis §6.4: a read is served only after a majority answers a round sent after it.
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    let query = ClientRequest {
        id: 5,
        op: ClientOp::Query {
            start: 1,
            read_index: None,
        },
    };
    leader.request(client_addr(), query);
    flush(&mut leader);
    let forged = Body::AppendEntriesResponse {
        read_seq: leader.read_seq + 1000,
        result: AppendResult::Accepted { match_index: 1 },
    };
    leader.step(msg(2, 1, 1, forged));
    assert!(
        flush(&mut leader).replies.is_empty(),
        "read served unconfirmed"
    );
    let genuine = Body::AppendEntriesResponse {
        read_seq: leader.read_seq,
        result: AppendResult::Accepted { match_index: 1 },
    };
    leader.step(msg(2, 1, 1, genuine));
    let replies = flush(&mut leader).replies;
    assert!(matches!(replies[0].1.result, ClientResult::Entries { .. }));
}

#[test]
fn a_rejection_at_index_0_is_dropped_not_taken_as_a_match() {
    // Every log matches at index 0, so no follower rejects there. Taken as "the follower
    // lost its log", index 0 used to underflow into a match index the follower never
    // acknowledged, committing entries held by no majority.
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    for seq in 1..=3 {
        leader.request(client_addr(), append_req(seq, 9, seq, "x"));
        flush(&mut leader);
    }
    for _ in 0..3 {
        leader.tick();
        flush(&mut leader);
    }
    assert_eq!(leader.log().last_index(), 4);
    let forged = Body::AppendEntriesResponse {
        read_seq: leader.read_seq,
        result: AppendResult::Rejected {
            prev_log_index: 0,
            hint_index: 5,
            hint_term: 0,
        },
    };
    leader.step(msg(2, 1, 1, forged));
    flush(&mut leader);
    assert_eq!(leader.commit_index(), 1, "nothing new was acknowledged");
    assert_eq!(leader.status().followers[0].match_index, 1);
}

#[test]
fn retries_of_an_uncommitted_append_keep_one_waiter_and_get_one_answer() {
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    for attempt in 1..=50 {
        leader.request(client_addr(), append_req(attempt, 9, 1, "x"));
        flush(&mut leader);
    }
    assert_eq!(leader.log().last_index(), 2, "one entry for all retries");
    assert_eq!(leader.waiters.len(), 1);
    leader.step(msg(2, 1, 1, accepted(2)));
    let replies = flush(&mut leader).replies;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].1.id, 50, "the latest attempt is answered");
}

#[test]
fn a_client_id_collision_is_refused_not_acknowledged_as_anothers_write() {
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    let refused = |rd: Ready| {
        rd.replies.iter().any(|(_, r)| {
            matches!(&r.result, ClientResult::Refused { reason } if reason.contains("client ID collision"))
        })
    };
    // Two clients drew ID 9; both send their first append.
    leader.request(client_addr(), append_req(1, 9, 1, "mine"));
    flush(&mut leader);
    leader.request(client_addr(), append_req(2, 9, 1, "theirs"));
    assert!(
        refused(flush(&mut leader)),
        "collision with a pending entry"
    );
    leader.step(msg(2, 1, 1, accepted(2)));
    let rd = flush(&mut leader);
    let appended = ClientResult::Appended { index: 2, term: 1 };
    assert_eq!(rd.replies.len(), 1);
    assert_eq!(rd.replies[0].1.result, appended);
    leader.request(client_addr(), append_req(3, 9, 1, "theirs"));
    assert!(
        refused(flush(&mut leader)),
        "collision with an applied entry"
    );
    leader.request(client_addr(), append_req(4, 9, 1, "mine"));
    assert_eq!(flush(&mut leader).replies[0].1.result, appended);
}

#[test]
fn a_late_refusal_does_not_cancel_a_granted_vote() {
    // Five voters: node 2 grants, then its answer to an earlier request (a refusal) arrives;
    // with node 3's grant that is a majority.
    let mut n = Node::new(cfg(1, &[2, 3, 4, 5]), HardState::default(), vec![]);
    while n.role() != Role::PreCandidate {
        n.tick();
    }
    flush(&mut n);
    for voter in [2, 3] {
        n.step(msg(voter, 1, 1, Body::PreVoteResponse { granted: true }));
    }
    assert_eq!(n.role(), Role::Candidate);
    flush(&mut n);
    let vote = |g| Body::RequestVoteResponse { granted: g };
    n.step(msg(2, 1, 1, vote(true)));
    n.step(msg(2, 1, 1, vote(false)));
    n.step(msg(3, 1, 1, vote(true)));
    assert_eq!(n.role(), Role::Leader);
}

/// Delivers every message among `nodes` (indexed by ID - 1) until none is left, returning
/// the client replies they produced.
fn exchange(nodes: &mut [Node]) -> Vec<ClientReply> {
    let mut replies = Vec::new();
    let mut queue: Vec<Message> = Vec::new();
    for n in nodes.iter_mut() {
        let rd = flush(n);
        queue.extend(rd.messages);
        replies.extend(rd.replies.into_iter().map(|(_, r)| r));
    }
    replies.extend(deliver(nodes, queue));
    replies
}

/// Delivers `queue` and everything it causes among `nodes`; returns the client replies.
fn deliver(nodes: &mut [Node], mut queue: Vec<Message>) -> Vec<ClientReply> {
    let mut replies = Vec::new();
    while let Some(m) = queue.pop() {
        let n = &mut nodes[m.to as usize - 1];
        n.step(m);
        let rd = flush(n);
        queue.extend(rd.messages);
        replies.extend(rd.replies.into_iter().map(|(_, r)| r));
    }
    replies
}

fn transfer_req(id: u64, target: Option<NodeId>) -> ClientRequest {
    ClientRequest {
        id,
        op: ClientOp::TransferLeader {
            target,
            away_from: None,
        },
    }
}

fn three_nodes_led_by_1() -> Vec<Node> {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let peers: Vec<NodeId> = (1..=3).filter(|&p| p != id).collect();
            Node::new(cfg(id, &peers), HardState::default(), vec![])
        })
        .collect();
    while nodes[0].role() != Role::PreCandidate {
        nodes[0].tick();
    }
    exchange(&mut nodes);
    assert_eq!(nodes[0].role(), Role::Leader);
    nodes
}

#[test]
fn leadership_transfer_hands_over_to_the_target_and_answers_once_it_leads() {
    // Thesis §3.10: catch the target up, TimeoutNow, the target campaigns at once.
    let mut nodes = three_nodes_led_by_1();
    nodes[0].request(client_addr(), transfer_req(7, Some(2)));
    let replies = exchange(&mut nodes);
    assert_eq!(nodes[1].role(), Role::Leader);
    assert_eq!(nodes[0].role(), Role::Follower);
    let term = nodes[1].term();
    assert_eq!(term, 2, "one election, without pre-vote");
    let answer = replies
        .iter()
        .find(|r| r.id == 7)
        .expect("the transfer is answered");
    assert_eq!(answer.result, ClientResult::Transferred { leader: 2, term });
}

#[test]
fn timeout_now_from_anyone_but_the_leader_is_ignored() {
    let mut nodes = three_nodes_led_by_1();
    let term = nodes[0].term();
    nodes[1].step(msg(3, 2, term, Body::TimeoutNow));
    flush(&mut nodes[1]);
    assert_eq!(nodes[1].role(), Role::Follower);
    assert_eq!(nodes[1].term(), term, "no election");
    nodes[1].step(msg(1, 2, term, Body::TimeoutNow));
    flush(&mut nodes[1]);
    assert_eq!(nodes[1].role(), Role::Candidate, "the leader's is obeyed");
    // A follower that knows no leader (restarted) takes it from whoever sends it.
    let (hs, log) = (nodes[2].hard_state(), nodes[2].log().entries().to_vec());
    let mut restarted = Node::new(cfg(3, &[1, 2]), hs, log);
    restarted.step(msg(1, 3, term, Body::TimeoutNow));
    assert_eq!(restarted.role(), Role::Candidate);
}

#[test]
fn appends_wait_during_a_transfer_and_go_to_the_new_leader() {
    let mut nodes = three_nodes_led_by_1();
    // Node 2 has not received entry 2 yet: TimeoutNow must wait for it.
    nodes[0].request(client_addr(), append_req(6, 9, 1, "before"));
    let mut queue = flush(&mut nodes[0]).messages;
    nodes[0].request(client_addr(), transfer_req(7, Some(2)));
    let rd = flush(&mut nodes[0]);
    assert!(
        !rd.messages.iter().any(|m| m.body == Body::TimeoutNow),
        "TimeoutNow before the target caught up"
    );
    queue.extend(rd.messages);
    let last = nodes[0].log().last_index();
    nodes[0].request(client_addr(), append_req(8, 9, 2, "held"));
    queue.extend(flush(&mut nodes[0]).messages);
    assert_eq!(
        nodes[0].log().last_index(),
        last,
        "an append during a transfer"
    );
    let replies = deliver(&mut nodes, queue);
    let held = replies
        .iter()
        .find(|r| r.id == 8)
        .expect("held append answered");
    assert_eq!(held.result, ClientResult::NotLeader { leader: Some(2) });
    assert_eq!(nodes[1].role(), Role::Leader);
    assert_eq!(
        nodes[1].log().get(2).map(|e| e.term),
        Some(1),
        "entry 2 kept"
    );
}

#[test]
fn a_transfer_to_a_silent_target_is_abandoned_and_held_appends_proceed() {
    let mut leader = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
    elect(&mut leader);
    leader.step(msg(2, 1, 1, accepted(1)));
    flush(&mut leader);
    leader.request(client_addr(), transfer_req(7, Some(3)));
    flush(&mut leader);
    leader.request(client_addr(), append_req(8, 9, 1, "held"));
    flush(&mut leader);
    assert_eq!(leader.log().last_index(), 1);
    let mut replies = Vec::new();
    for _ in 0..25 {
        leader.tick();
        // Node 2 keeps the leader in contact with a majority.
        leader.step(msg(2, 1, 1, accepted(leader.log().last_index())));
        replies.extend(flush(&mut leader).replies);
    }
    assert_eq!(leader.role(), Role::Leader);
    let abandoned = replies.iter().find(|(_, r)| r.id == 7).expect("answered");
    assert!(
        matches!(&abandoned.1.result, ClientResult::Refused { reason } if reason.contains("abandoned")),
        "{:?}",
        abandoned.1.result
    );
    assert_eq!(leader.log().last_index(), 2, "the held append was proposed");
    let appended = replies.iter().find(|(_, r)| r.id == 8).expect("answered");
    assert_eq!(
        appended.1.result,
        ClientResult::Appended { index: 2, term: 1 }
    );
}

#[test]
fn a_transfer_request_is_checked() {
    let mut nodes = three_nodes_led_by_1();
    let result = |nodes: &mut Vec<Node>, req| {
        nodes[0].request(client_addr(), req);
        flush(&mut nodes[0]).replies[0].1.result.clone()
    };
    let refused = |r: &ClientResult, what: &str| matches!(r, ClientResult::Refused { reason } if reason.contains(what));
    let r = result(&mut nodes, transfer_req(1, Some(9)));
    assert!(refused(&r, "not a voter"), "{r:?}");
    let r = result(&mut nodes, transfer_req(2, Some(1)));
    assert_eq!(r, ClientResult::Transferred { leader: 1, term: 1 });
    // A retry that reaches a new leader after it took over moves nothing.
    let away = ClientRequest {
        id: 3,
        op: ClientOp::TransferLeader {
            target: None,
            away_from: Some(3),
        },
    };
    let r = result(&mut nodes, away);
    assert_eq!(r, ClientResult::Transferred { leader: 1, term: 1 });
    nodes[0].request(client_addr(), transfer_req(4, Some(2)));
    flush(&mut nodes[0]);
    let r = result(&mut nodes, transfer_req(5, Some(3)));
    assert!(refused(&r, "in progress"), "{r:?}");
}

#[test]
fn status_counts_elections_and_leader_changes_and_shows_followers_on_the_leader() {
    let mut nodes = three_nodes_led_by_1();
    let s1 = nodes[0].status();
    assert_eq!((s1.elections_started, s1.leader_changes), (1, 1));
    let ids: Vec<NodeId> = s1.followers.iter().map(|f| f.id).collect();
    assert_eq!(ids, vec![2, 3]);
    assert!(s1
        .followers
        .iter()
        .all(|f| f.lag == 0 && f.match_index == 1));
    let s2 = nodes[1].status();
    assert_eq!((s2.elections_started, s2.leader_changes), (0, 1));
    assert!(s2.followers.is_empty(), "only a leader reports followers");
    nodes[0].tick();
    assert_eq!(nodes[0].status().followers[0].last_contact_ticks, 1);

    nodes[0].request(client_addr(), transfer_req(7, Some(2)));
    exchange(&mut nodes);
    let (s1, s2) = (nodes[0].status(), nodes[1].status());
    assert_eq!((s1.elections_started, s1.leader_changes), (1, 2));
    assert_eq!((s2.elections_started, s2.leader_changes), (1, 2));
}

#[test]
fn a_node_started_over_votes_only_once_its_log_reached_the_vote_floor() {
    // started_over.rs: until its log holds what its cluster had when it first reached it, a
    // node with an empty data dir gives neither votes nor pre-votes to a candidate whose log
    // does not reach the floor's point; from then on it votes as usual, also after a
    // truncation.
    let vote = |last_log_index| Body::RequestVote {
        last_log_index,
        last_log_term: 1,
    };
    let pre_vote = |last_log_index| Body::PreVote {
        last_log_index,
        last_log_term: 1,
    };
    let answer = |n: &mut Node| match flush(n).messages[..] {
        [Message {
            body: Body::RequestVoteResponse { granted } | Body::PreVoteResponse { granted },
            ..
        }] => granted,
        ref other => panic!("expected one answer, got {other:?}"),
    };
    let mut n = Node::new(cfg(2, &[1, 3]), HardState::default(), vec![]);
    n.set_vote_floor(2, 1);
    n.step(msg(3, 2, 1, pre_vote(1)));
    assert!(!answer(&mut n), "a pre-vote below the floor");
    n.step(msg(3, 2, 1, vote(1)));
    assert!(!answer(&mut n), "a vote below the floor");
    let append = |prev, entries| Body::AppendEntries {
        prev_log_index: prev,
        prev_log_term: if prev == 0 { 0 } else { 1 },
        entries,
        leader_commit: 0,
        read_seq: 0,
    };
    n.step(msg(1, 2, 1, append(0, vec![entry(1, 1)])));
    flush(&mut n);
    assert_eq!(n.vote_floor(), 2, "one entry short");
    n.step(msg(3, 2, 2, vote(1)));
    assert!(!answer(&mut n));
    // A candidate whose log reaches the floor's point is up to date enough, even while this
    // node is below it: a promoted node still catching up must not wedge an election.
    n.step(msg(3, 2, 3, pre_vote(2)));
    assert!(answer(&mut n), "a pre-vote for a candidate at the floor");
    n.step(msg(1, 2, 2, append(1, vec![entry(2, 1)])));
    flush(&mut n);
    assert_eq!(n.vote_floor(), 0, "reached");
    // A leader of term 3 replaces entry 2 (never committed): the floor stays reached.
    n.step(msg(1, 2, 3, append(1, vec![entry(2, 3)])));
    flush(&mut n);
    n.step(msg(1, 2, 3, append(0, vec![entry(1, 1)])));
    flush(&mut n);
    let up_to_date = Body::RequestVote {
        last_log_index: 2,
        last_log_term: 3,
    };
    n.step(msg(3, 2, 4, up_to_date));
    assert!(answer(&mut n), "votes once the floor was reached");
    // Restored with a floor its durable log already reaches: none.
    let restored = Node::new(
        Config {
            vote_floor: 1,
            ..cfg(2, &[1, 3])
        },
        HardState::default(),
        vec![entry(1, 1)],
    );
    assert_eq!(restored.vote_floor(), 0);
}

#[test]
fn a_node_below_its_vote_floor_never_stands() {
    // Its log may lack committed entries, and a lagging voter would vote for it.
    let mut n = Node::new(cfg(2, &[1, 3]), HardState::default(), vec![entry(1, 1)]);
    n.set_vote_floor(5, 1);
    for _ in 0..100 {
        n.tick();
        let rd = flush(&mut n);
        assert!(rd.messages.is_empty(), "{:?}", rd.messages);
    }
    n.step(msg(1, 2, 1, Body::TimeoutNow));
    assert_eq!(n.role(), Role::Follower);
    // An entry of a later term than the AppendEntries that set the floor: a leader of that
    // term held everything committed before it, and truncated the rest; the floor is reached.
    let append = Body::AppendEntries {
        prev_log_index: 1,
        prev_log_term: 1,
        entries: vec![entry(2, 2)],
        leader_commit: 0,
        read_seq: 0,
    };
    n.step(msg(1, 2, 2, append));
    flush(&mut n);
    assert_eq!(n.vote_floor(), 0);
    while n.role() == Role::Follower {
        n.tick();
        flush(&mut n);
    }
    assert_eq!(n.role(), Role::PreCandidate);
}

#[test]
fn user_list_waits_for_a_majority_to_confirm_leadership() {
    // A leader cut off from its majority may be deposed already, with users added or removed
    // by its successor: answering from its own table would be a stale read.
    use crate::raft::users::UserOp;
    let list = || ClientRequest {
        id: 6,
        op: ClientOp::Users(UserOp::List),
    };
    let caught_up_leader = || {
        let mut n = Node::new(cfg(1, &[2, 3]), HardState::default(), vec![]);
        elect(&mut n);
        n.step(msg(2, 1, 1, accepted(1)));
        flush(&mut n);
        assert_eq!(n.applied_index(), 1, "an entry of its term applied");
        n
    };
    let mut cut_off = caught_up_leader();
    cut_off.request(client_addr(), list());
    for _ in 0..100 {
        for (_, reply) in flush(&mut cut_off).replies {
            let stale = matches!(reply.result, ClientResult::Users { .. });
            assert!(!stale, "a cut-off leader listed users");
        }
        cut_off.tick();
    }

    let mut leader = caught_up_leader();
    leader.request(client_addr(), list());
    assert!(flush(&mut leader).replies.is_empty(), "listed unconfirmed");
    let echo = Body::AppendEntriesResponse {
        read_seq: leader.read_seq,
        result: AppendResult::Accepted { match_index: 1 },
    };
    leader.step(msg(2, 1, 1, echo));
    let replies = flush(&mut leader).replies;
    assert!(matches!(replies[0].1.result, ClientResult::Users { .. }));
}
