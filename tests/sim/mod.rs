//! A deterministic cluster simulator for the Raft core: N cores in one process over a seeded,
//! virtual-time network that drops, duplicates, reorders, delays and partitions datagrams, with
//! crash-restart from durable state and retrying clients. Raft's safety properties are checked
//! after every event; a failure panics with the seed, and `SIM_SEED=<seed>` reruns that seed.

#![allow(dead_code)]

use raft::raft::{
    ClientId, ClientOp, ClientReply, ClientRequest, ClientResult, Config, Entry, HardState, Index,
    LogRecord, Message, Node, NodeId, Ready, ReplyTo, Role, Term,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Virtual microseconds.
pub type Time = u64;
pub const MS: Time = 1_000;

pub use raft::raft::rng::Rng;

/// Knobs of the simulated world.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub tick: Time,
    pub election_ticks: (u64, u64),
    pub heartbeat_ticks: u64,
    pub max_inflight: usize,
    /// Probability that a datagram is lost / delivered twice.
    pub drop: f64,
    pub duplicate: f64,
    /// One-way delay, uniform in this range (random delays reorder datagrams).
    pub delay: (Time, Time),
    /// Probability, per Ready, that the node crashes while carrying it out.
    pub crash_in_ready: f64,
    /// How long a client waits for an answer before retrying elsewhere.
    pub client_retry: Time,
}

impl SimConfig {
    pub fn reliable(nodes: usize) -> SimConfig {
        SimConfig {
            nodes,
            tick: 10 * MS,
            election_ticks: (15, 30),
            heartbeat_ticks: 5,
            max_inflight: 8,
            drop: 0.0,
            duplicate: 0.0,
            delay: (100, 2 * MS),
            crash_in_ready: 0.0,
            client_retry: 100 * MS,
        }
    }
    pub fn unreliable(nodes: usize) -> SimConfig {
        SimConfig {
            drop: 0.1,
            duplicate: 0.05,
            delay: (100, 20 * MS),
            ..SimConfig::reliable(nodes)
        }
    }
}

/// What survives a crash: whatever a Ready persisted (the shell fsyncs each one).
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
}

impl Disk {
    fn persist(&mut self, rd: &Ready) {
        if let Some(hs) = rd.hard_state {
            self.hard_state = hs;
        }
        if let Some(first) = rd.entries.first() {
            self.entries.truncate(first.index as usize - 1);
            self.entries.extend_from_slice(&rd.entries);
        }
    }
}

#[derive(Clone, Debug)]
enum Event {
    Deliver(Message),
    Tick(NodeId),
    Request(NodeId, ReplyTo, ClientRequest),
    Reply(ReplyTo, ClientReply),
    ClientTimer(usize, u64),
}

/// One completed client operation, for checking what clients saw.
#[derive(Clone, Debug)]
pub enum Op {
    Append {
        data: String,
        index: Index,
        invoked: Time,
        returned: Time,
    },
    Query {
        log: Vec<LogRecord>,
        invoked: Time,
        returned: Time,
        /// The node that answered the last page.
        peer: NodeId,
    },
}

#[derive(Clone, Debug)]
enum Pending {
    Append {
        seq: u64,
        data: String,
    },
    Query {
        pages: Vec<LogRecord>,
        read_index: Option<Index>,
        start: Index,
    },
}

/// A client that retries with the same (client, seq) until it gets a definite answer.
#[derive(Clone, Debug)]
pub struct SimClient {
    pub id: ClientId,
    seq: u64,
    target: NodeId,
    pending: Option<(Pending, Time)>,
    request_id: u64,
    pub done: Vec<Op>,
}

impl SimClient {
    /// Sends this client's next attempt to `id`.
    pub fn target_node(&mut self, id: NodeId) {
        self.target = id;
    }
}

pub struct Sim {
    pub seed: u64,
    pub cfg: SimConfig,
    pub rng: Rng,
    pub now: Time,
    pub ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Option<Node>>,
    pub disks: BTreeMap<NodeId, Disk>,
    events: BTreeMap<(Time, u64), Event>,
    event_seq: u64,
    /// Directed links that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Nodes cut off by `disconnect`.
    disconnected: BTreeSet<NodeId>,
    /// Nodes frozen in time (like SIGSTOP): no ticks, and what arrives meanwhile is lost.
    paused: BTreeSet<NodeId>,
    pub clients: Vec<SimClient>,
    /// Peer messages handed to the network, by (from, to) and in all.
    pub sent: u64,
    pub sent_by_link: BTreeMap<(NodeId, NodeId), u64>,
    pub restarts: u64,
    // ---- invariant bookkeeping ----
    leader_of_term: BTreeMap<Term, NodeId>,
    /// Committed entries by index: the entry, and the lowest term at which anyone saw it
    /// committed (Leader Completeness applies to leaders of later terms).
    committed: BTreeMap<Index, (Entry, Term)>,
    last_term: BTreeMap<NodeId, Term>,
    last_commit: BTreeMap<NodeId, Index>,
    was_leader: BTreeMap<NodeId, Term>,
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Sim {
        let ids: Vec<NodeId> = (1..=cfg.nodes as NodeId).collect();
        let mut sim = Sim {
            seed,
            rng: Rng::new(seed),
            now: 0,
            nodes: BTreeMap::new(),
            disks: ids.iter().map(|&id| (id, Disk::default())).collect(),
            events: BTreeMap::new(),
            event_seq: 0,
            cut: BTreeSet::new(),
            paused: BTreeSet::new(),
            disconnected: BTreeSet::new(),
            clients: Vec::new(),
            sent: 0,
            sent_by_link: BTreeMap::new(),
            restarts: 0,
            leader_of_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            last_term: BTreeMap::new(),
            last_commit: BTreeMap::new(),
            was_leader: BTreeMap::new(),
            ids,
            cfg,
        };
        for id in sim.ids.clone() {
            sim.start(id);
            let phase = sim.rng.range(0, sim.cfg.tick - 1);
            sim.schedule(phase, Event::Tick(id));
        }
        sim
    }

    fn core_config(&self, id: NodeId) -> Config {
        Config {
            id,
            peers: self.ids.iter().copied().filter(|&p| p != id).collect(),
            election_ticks: self.cfg.election_ticks,
            heartbeat_ticks: self.cfg.heartbeat_ticks,
            max_inflight: self.cfg.max_inflight,
            seed: self
                .seed
                .wrapping_mul(31)
                .wrapping_add(id * 7919 + self.restarts),
        }
    }

    fn start(&mut self, id: NodeId) {
        let disk = self.disks[&id].clone();
        let node = Node::new(self.core_config(id), disk.hard_state, disk.entries);
        self.last_commit.insert(id, node.commit_index());
        self.nodes.insert(id, Some(node));
    }

    pub fn fail(&self, what: &str) -> ! {
        let mut dump = String::new();
        for (id, n) in &self.nodes {
            match n {
                Some(n) => dump += &format!("  node {id}: {:?}\n", n.status()),
                None => dump += &format!("  node {id}: down\n"),
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            if let Some((p, since)) = &c.pending {
                dump += &format!("  client {i}: since {since} target {} {p:?}\n", c.target);
            }
        }
        panic!(
            "seed {}: at t={}µs: {what}\n{dump}rerun with SIM_SEED={}",
            self.seed, self.now, self.seed
        );
    }

    // ---- world control ------------------------------------------------------------------------

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes[&id].as_ref()
    }
    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[&id].is_some()
    }
    pub fn crash(&mut self, id: NodeId) {
        self.nodes.insert(id, None);
    }
    pub fn restart(&mut self, id: NodeId) {
        if self.nodes[&id].is_none() {
            self.restarts += 1;
            self.start(id);
        }
    }
    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }
    /// Cuts `id` off from everyone.
    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.ids.iter().copied().filter(|&p| p != id).collect();
        self.partition(&[id], &others);
    }
    /// Cuts `id` off from everyone (MIT lab's "disconnect").
    pub fn disconnect(&mut self, id: NodeId) {
        self.disconnected.insert(id);
        self.isolate(id);
    }
    /// Restores every link of `id` whose other end is not itself disconnected.
    pub fn connect(&mut self, id: NodeId) {
        self.disconnected.remove(&id);
        self.cut.retain(|&(a, b)| a != id && b != id);
        for other in self.disconnected.clone() {
            self.isolate(other);
        }
    }
    pub fn cut_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }
    pub fn heal(&mut self) {
        self.cut.clear();
        self.disconnected.clear();
    }
    pub fn pause(&mut self, id: NodeId) {
        self.paused.insert(id);
    }
    pub fn resume(&mut self, id: NodeId) {
        self.paused.remove(&id);
    }

    fn schedule(&mut self, delay: Time, event: Event) {
        self.event_seq += 1;
        self.events
            .insert((self.now + delay, self.event_seq), event);
    }

    fn send(&mut self, msg: Message) {
        self.sent += 1;
        *self.sent_by_link.entry((msg.from, msg.to)).or_default() += 1;
        if self.cut.contains(&(msg.from, msg.to)) || self.rng.chance(self.cfg.drop) {
            return;
        }
        let copies = if self.rng.chance(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.range(self.cfg.delay.0, self.cfg.delay.1);
            self.schedule(delay, Event::Deliver(msg.clone()));
        }
    }

    /// Client datagrams cross the same lossy network (but no partitions).
    fn send_client(&mut self, event: Event) {
        if self.rng.chance(self.cfg.drop) {
            return;
        }
        let copies = if self.rng.chance(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.range(self.cfg.delay.0, self.cfg.delay.1);
            self.schedule(delay, event.clone());
        }
    }

    // ---- running ------------------------------------------------------------------------------

    /// Processes the next event; returns false if there is none.
    pub fn step(&mut self) -> bool {
        let Some(((time, _), event)) = self.events.pop_first() else {
            return false;
        };
        self.now = time;
        let frozen = |id: &NodeId| self.paused.contains(id);
        match &event {
            Event::Tick(id) if frozen(id) => {
                self.schedule(self.cfg.tick, Event::Tick(*id));
                return true;
            }
            Event::Deliver(Message { to: id, .. }) | Event::Request(id, ..) if frozen(id) => {
                return true;
            }
            _ => {}
        }
        let touched = match event {
            Event::Tick(id) => {
                self.schedule(self.cfg.tick, Event::Tick(id));
                match self.nodes.get_mut(&id).unwrap() {
                    Some(node) => node.tick(),
                    None => return true,
                }
                id
            }
            Event::Deliver(msg) => {
                let id = msg.to;
                match self.nodes.get_mut(&id).unwrap() {
                    Some(node) => node.step(msg),
                    None => return true,
                }
                id
            }
            Event::Request(id, reply_to, req) => {
                match self.nodes.get_mut(&id).unwrap() {
                    Some(node) => node.request(reply_to, req),
                    None => return true,
                }
                id
            }
            Event::Reply(to, reply) => {
                // Port 1 is where fire-and-forget proposals send their (ignored) answers.
                if let Some(c) = (to.port() as usize).checked_sub(40000) {
                    self.client_reply(c, reply);
                }
                return true;
            }
            Event::ClientTimer(c, request_id) => {
                self.client_timeout(c, request_id);
                return true;
            }
        };
        self.process_ready(touched);
        self.check(touched);
        true
    }

    /// Carries out a node's Ready the way the shell does, possibly crashing part-way.
    fn process_ready(&mut self, id: NodeId) {
        loop {
            let Some(node) = self.nodes.get_mut(&id).unwrap().as_mut() else {
                return;
            };
            let rd = node.ready();
            if rd.is_empty() {
                return;
            }
            let crash_at = if self.rng.chance(self.cfg.crash_in_ready) {
                Some(self.rng.range(0, 1))
            } else {
                None
            };
            if rd.send_before_persist {
                for m in rd.messages.iter().cloned() {
                    self.send(m);
                }
            }
            if crash_at == Some(0) {
                // Crashed during the write: an un-fsynced batch is lost whole.
                self.crash(id);
                return;
            }
            self.disks.get_mut(&id).unwrap().persist(&rd);
            if !rd.send_before_persist {
                for m in rd.messages.iter().cloned() {
                    self.send(m);
                }
            }
            if crash_at == Some(1) {
                self.crash(id);
                return;
            }
            self.nodes.get_mut(&id).unwrap().as_mut().unwrap().advance();
            for (to, reply) in rd.replies {
                self.send_client(Event::Reply(to, reply));
            }
        }
    }

    pub fn run_for(&mut self, duration: Time) {
        let end = self.now + duration;
        while self
            .events
            .first_key_value()
            .is_some_and(|(k, _)| k.0 <= end)
        {
            self.step();
        }
        self.now = end;
    }

    /// Runs until `pred` holds, checking after every event; false if `within` passes first.
    pub fn run_until(&mut self, within: Time, mut pred: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + within;
        while !pred(self) {
            if self.events.first_key_value().is_none_or(|(k, _)| k.0 > end) {
                self.now = end;
                return pred(self);
            }
            self.step();
        }
        true
    }

    // ---- observations ------------------------------------------------------------------------

    /// The live leaders of the highest term any live leader has.
    pub fn leaders(&self) -> Vec<NodeId> {
        let live: Vec<&Node> = self.nodes.values().flatten().collect();
        let top = live
            .iter()
            .filter(|n| n.role() == Role::Leader)
            .map(|n| n.term())
            .max();
        live.iter()
            .filter(|n| n.role() == Role::Leader && Some(n.term()) == top)
            .map(|n| n.id())
            .collect()
    }

    /// A leader that a majority of live nodes follow in its term (a settled cluster).
    pub fn stable_leader(&self) -> Option<NodeId> {
        let leader = *self.leaders().first()?;
        let term = self.node(leader)?.term();
        let followers = self
            .nodes
            .values()
            .flatten()
            .filter(|n| n.term() == term && n.leader() == Some(leader))
            .count();
        (followers > self.ids.len() / 2).then_some(leader)
    }

    pub fn wait_for_leader(&mut self, within: Time) -> NodeId {
        if !self.run_until(within, |s| s.stable_leader().is_some()) {
            self.fail("no leader elected in time");
        }
        self.stable_leader().unwrap()
    }

    /// The longest committed prefix any node knows, as (index, term, payload) entries.
    pub fn committed_log(&self) -> Vec<Entry> {
        self.committed.values().map(|(e, _)| e.clone()).collect()
    }

    /// How many live nodes have committed `index`, and the entry's data if any agree.
    pub fn n_committed(&self, index: Index) -> usize {
        self.nodes
            .values()
            .flatten()
            .filter(|n| n.commit_index() >= index)
            .count()
    }

    pub fn max_commit(&self) -> Index {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    // ---- invariants --------------------------------------------------------------------------

    /// Raft's safety properties (Figure 3), checked after every event that touched `id`.
    fn check(&mut self, id: NodeId) {
        let Some(node) = self.nodes[&id].as_ref() else {
            return;
        };
        let (term, commit, role) = (node.term(), node.commit_index(), node.role());
        // Terms never go backwards, across restarts too (they are durable).
        let last = self.last_term.insert(id, term).unwrap_or(0);
        if term < last {
            self.fail(&format!("node {id}: term went back from {last} to {term}"));
        }
        // Commit index never goes backwards within a life.
        let last = self.last_commit.insert(id, commit).unwrap_or(0);
        if commit < last {
            self.fail(&format!(
                "node {id}: commit went back from {last} to {commit}"
            ));
        }
        if node.applied_index() != commit {
            self.fail(&format!(
                "node {id}: applied {} != commit {commit}",
                node.applied_index()
            ));
        }
        // Election Safety: at most one leader per term.
        if role == Role::Leader {
            if let Some(&other) = self.leader_of_term.get(&term) {
                if other != id {
                    self.fail(&format!("two leaders in term {term}: {other} and {id}"));
                }
            }
            self.leader_of_term.insert(term, id);
        }
        // State Machine Safety: every node commits (and applies) the same entry at an index.
        for index in 1..=commit {
            let entry = node.log().get(index).expect("committed entry present");
            match self.committed.get(&index) {
                Some((e, _)) if e != entry => self.fail(&format!(
                    "node {id} committed {entry:?} at {index}, another committed {e:?}"
                )),
                Some(_) => {}
                None => {
                    self.committed.insert(index, (entry.clone(), term));
                }
            }
        }
        // Leader Completeness: a leader has every entry committed in an earlier term.
        if role == Role::Leader && self.was_leader.get(&id) != Some(&term) {
            self.was_leader.insert(id, term);
            for (index, (entry, seen_in)) in &self.committed {
                if *seen_in < term && node.log().get(*index) != Some(entry) {
                    self.fail(&format!(
                        "leader {id} of term {term} lacks committed entry {index} ({entry:?})"
                    ));
                }
            }
        }
        // Log Matching: same index and term means identical logs up to there.
        let mine = node.log().entries();
        for (other_id, other) in &self.nodes {
            let Some(other) = other else { continue };
            if *other_id == id {
                continue;
            }
            let theirs = other.log().entries();
            let n = mine.len().min(theirs.len());
            if let Some(k) = (0..n).rev().find(|&k| mine[k].term == theirs[k].term) {
                if mine[..=k] != theirs[..=k] {
                    let bad = (0..=k).find(|&j| mine[j] != theirs[j]).unwrap();
                    self.fail(&format!(
                        "Log Matching: nodes {id} and {other_id} agree on term at {} but differ at {}",
                        k + 1,
                        bad + 1
                    ));
                }
            }
        }
    }

    // ---- clients -------------------------------------------------------------------------------

    pub fn add_client(&mut self) -> usize {
        let c = self.clients.len();
        let id = self.rng.next_u64();
        let target = self.rng.pick(&self.ids.clone());
        self.clients.push(SimClient {
            id,
            seq: 0,
            target,
            pending: None,
            request_id: 0,
            done: Vec::new(),
        });
        c
    }

    fn client_addr(c: usize) -> ReplyTo {
        SocketAddr::from(([127, 0, 0, 1], 40000 + c as u16))
    }

    /// The lab's `Start()` without a client behind it: hands `data` to node `id` directly, once,
    /// and returns the index it would take if `id` is leader (its last index either way).
    pub fn propose_once(&mut self, id: NodeId, data: &str) -> Index {
        let client = self.rng.next_u64();
        let Some(node) = self.nodes.get_mut(&id).unwrap().as_mut() else {
            return 0;
        };
        let req = ClientRequest {
            id: 0,
            op: ClientOp::Append {
                client,
                seq: 1,
                data: data.to_string(),
            },
        };
        node.request(SocketAddr::from(([127, 0, 0, 1], 1)), req);
        let index = node.log().last_index();
        self.process_ready(id);
        self.check(id);
        index
    }

    pub fn client_busy(&self, c: usize) -> bool {
        self.clients[c].pending.is_some()
    }

    /// Starts an append; the client retries it (same seq) until it is acknowledged.
    pub fn client_append(&mut self, c: usize, data: &str) {
        assert!(!self.client_busy(c), "one operation per client at a time");
        let client = &mut self.clients[c];
        client.seq += 1;
        client.pending = Some((
            Pending::Append {
                seq: client.seq,
                data: data.to_string(),
            },
            self.now,
        ));
        self.client_send(c);
    }

    /// Starts a linearizable query of the whole committed log.
    pub fn client_query(&mut self, c: usize) {
        assert!(!self.client_busy(c), "one operation per client at a time");
        self.clients[c].pending = Some((
            Pending::Query {
                pages: Vec::new(),
                read_index: None,
                start: 1,
            },
            self.now,
        ));
        self.client_send(c);
    }

    fn client_send(&mut self, c: usize) {
        let client = &mut self.clients[c];
        let Some((pending, _)) = &client.pending else {
            return;
        };
        client.request_id += 1;
        let op = match pending {
            Pending::Append { seq, data } => ClientOp::Append {
                client: client.id,
                seq: *seq,
                data: data.clone(),
            },
            Pending::Query {
                read_index, start, ..
            } => ClientOp::Query {
                start: *start,
                read_index: *read_index,
            },
        };
        let req = ClientRequest {
            id: client.request_id,
            op,
        };
        let (target, request_id) = (client.target, client.request_id);
        self.send_client(Event::Request(target, Self::client_addr(c), req));
        let retry = self.cfg.client_retry;
        self.schedule(retry, Event::ClientTimer(c, request_id));
    }

    fn client_timeout(&mut self, c: usize, request_id: u64) {
        if self.clients[c].request_id != request_id || self.clients[c].pending.is_none() {
            return;
        }
        let ids = self.ids.clone();
        self.clients[c].target = self.rng.pick(&ids);
        self.client_send(c);
    }

    fn client_reply(&mut self, c: usize, reply: ClientReply) {
        let now = self.now;
        let client = &mut self.clients[c];
        if reply.id != client.request_id || client.pending.is_none() {
            return; // stale or duplicated answer
        }
        let (pending, invoked) = client.pending.take().unwrap();
        match (pending, reply.result) {
            (Pending::Append { data, .. }, ClientResult::Appended { index, .. }) => {
                client.done.push(Op::Append {
                    data,
                    index,
                    invoked,
                    returned: now,
                });
            }
            (
                Pending::Query { mut pages, .. },
                ClientResult::Entries {
                    entries,
                    read_index,
                    next,
                },
            ) => {
                pages.extend(entries);
                match next {
                    Some(start) => {
                        client.pending = Some((
                            Pending::Query {
                                pages,
                                read_index: Some(read_index),
                                start,
                            },
                            invoked,
                        ));
                        client.target = reply.from;
                        self.client_send(c);
                    }
                    None => client.done.push(Op::Query {
                        log: pages,
                        invoked,
                        returned: now,
                        peer: reply.from,
                    }),
                }
            }
            (pending, ClientResult::NotLeader { leader }) => {
                client.pending = Some((pending, invoked));
                match leader {
                    Some(l) if l != reply.from => {
                        client.target = l;
                        self.client_send(c);
                    }
                    // No leader known: the retry timer tries another node.
                    _ => {}
                }
            }
            (pending, result) => {
                self.fail(&format!(
                    "client {c}: unexpected answer {result:?} to {pending:?}"
                ));
            }
        }
    }

    /// Checks what clients saw against the final committed log: every acknowledged append is
    /// in it exactly once at its acknowledged index, and no query returned a log missing an
    /// append acknowledged before the query began (no stale reads), or anything not committed.
    pub fn check_client_history(&self) {
        let log = self.committed_log();
        let mut seen_data: BTreeMap<&str, Index> = BTreeMap::new();
        for e in &log {
            if let raft::raft::Payload::Data { data, client, seq } = &e.payload {
                let dup = self.node_view_is_duplicate(e.index);
                if !dup {
                    if let Some(prev) = seen_data.insert(data, e.index) {
                        self.fail(&format!(
                            "{data:?} applied twice, at {prev} and {} (client {client:x} seq {seq})",
                            e.index
                        ));
                    }
                }
            }
        }
        let mut acks: Vec<(Time, Index)> = Vec::new();
        for client in &self.clients {
            for op in &client.done {
                if let Op::Append {
                    data,
                    index,
                    returned,
                    ..
                } = op
                {
                    if seen_data.get(data.as_str()) != Some(index) {
                        self.fail(&format!(
                            "acknowledged append {data:?} at {index} is not in the final log there"
                        ));
                    }
                    acks.push((*returned, *index));
                }
            }
        }
        for client in &self.clients {
            for op in &client.done {
                if let Op::Query {
                    log: got, invoked, ..
                } = op
                {
                    for (k, r) in got.iter().enumerate() {
                        let Some(e) = log.get(k) else {
                            self.fail(&format!("query returned uncommitted index {}", r.index));
                        };
                        if r.index != e.index || r.term != e.term {
                            self.fail(&format!("query returned {r:?}, committed was {e:?}"));
                        }
                    }
                    let len = got.len() as Index;
                    if let Some((t, i)) = acks.iter().find(|(t, i)| t < invoked && *i > len) {
                        self.fail(&format!(
                            "stale read: query at {invoked} returned {len} entries, but index {i} was acknowledged at {t}"
                        ));
                    }
                }
            }
        }
    }

    fn node_view_is_duplicate(&self, index: Index) -> bool {
        self.nodes
            .values()
            .flatten()
            .find(|n| n.applied_index() >= index)
            .is_some_and(|n| n.state_machine().is_duplicate(index))
    }
}

/// Seeds for randomized tests: `SIM_SEED` reruns one; `SIM_SEEDS` sets how many (default given).
pub fn seeds(default_count: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED must be a number")];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_count);
    (1..=n).collect()
}
