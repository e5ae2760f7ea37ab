//! The node thread's loop: take a batch from the inboxes, step the core, and carry out each
//! `Ready` in the order that keeps Raft safe (persist, send, advance, reply, then the store).

use super::instruments::Instruments;
use super::routes::{Routes, Routing};
use super::Inbox;
use crate::raft::{
    self, ClientReply, ClientRequest, Entry, HardState, Index, Message, Node, NodeId, Ready,
    ReplyTo, StatusInfo,
};
use crate::raft::{ChunkRead, ChunkWrite, LogRecord, SnapshotId, SnapshotState, StoreRead, Term};
use crate::raft::{ClientOp, ClientResult};
use crate::transport::{self, Directory, RateLimiter, Transport};
use crossbeam_channel::{never, select, Receiver};
use std::time::{Duration, Instant};

/// Peer-queue items stepped into the core before its `Ready` is carried out.
pub const MAX_BATCH: usize = 4096;
/// Client requests stepped into the core before its `Ready` is carried out. Large enough that
/// an fsync is shared by hundreds of appends, small enough that one batch (stepping, sending,
/// one fsync, and the replies) takes a few milliseconds, far below an election timeout.
pub const MAX_CLIENT_BATCH: usize = 512;
/// Ticks stepped into the core per batch; more that are queued are skipped. After the node
/// thread stalls (a slow fsync, descheduled), the ticks queued meanwhile would otherwise reach
/// the core all at once: a leader would conclude it had lost its followers (check quorum) and
/// followers that their leader was gone, before either had a chance to send or hear anything.
/// Skipping them makes time in the core run slow during the stall, as Go's tickers do for
/// etcd: elections are delayed, never made unsafe.
pub const MAX_TICKS_PER_BATCH: usize = 2;
/// A batch (stepping, fsync, sending) that takes this long is logged with where the time went,
/// as is one that skips this many ticks (the one after a stall).
pub const SLOW_BATCH: Duration = Duration::from_millis(50);
const SKIPPED_TICKS_TO_LOG: usize = 5;

/// What the node loop needs from the core; [`Node`] in production, fakes in the tests (and a
/// wrapper in the simulator, which runs the real after-advance code).
pub trait Core {
    fn tick(&mut self);
    fn step(&mut self, msg: Message);
    fn request(&mut self, reply_to: ReplyTo, req: ClientRequest);
    fn ready(&mut self) -> Ready;
    fn advance(&mut self);
    /// The core's view, for metrics.
    fn status(&self) -> Option<StatusInfo> {
        None
    }
    /// What routing needs to know of the configurations; `None` in fakes.
    fn routing(&self) -> Option<Routing> {
        None
    }
    /// Changes whenever [`Core::routing`] may have: checked every batch, so that the
    /// configurations are copied only when they change.
    fn routing_key(&self) -> Option<raft::node::RoutingKey> {
        None
    }
    /// See [`Node::set_vote_floor`].
    fn set_vote_floor(&mut self, _floor: Index, _term: Term) {}
    fn vote_floor(&self) -> Index {
        0
    }
    /// A committed configuration removed this node: the peer stops.
    fn removed(&self) -> bool {
        false
    }
    /// The users of the replicated state; `None` in fakes.
    fn users(&self) -> Option<&raft::users::Users> {
        None
    }
    fn id(&self) -> NodeId {
        0
    }
    fn applied_index(&self) -> Index {
        0
    }
    fn hard_state(&self) -> HardState {
        HardState::default()
    }
    /// The log's last index and term.
    fn last(&self) -> (Index, Term) {
        (0, 0)
    }
    fn snapshot_state(&self) -> Option<SnapshotState> {
        None
    }
    fn snapshot_taken(&mut self, _id: SnapshotId, _trailing: u64) -> Option<(Index, Term)> {
        None
    }
    /// The entries the latest `snapshot_taken` dropped, to be freed elsewhere.
    fn take_compacted(&mut self) -> Vec<Entry> {
        Vec::new()
    }
    fn snapshot_chunk_stored(&mut self, _leader: NodeId, _index: Index, _have: u64) {}
    fn install_snapshot(&mut self, _leader: NodeId, _state: SnapshotState, _id: SnapshotId) {}
}

impl Core for Node {
    fn tick(&mut self) {
        Node::tick(self)
    }
    fn step(&mut self, msg: Message) {
        Node::step(self, msg)
    }
    fn request(&mut self, reply_to: ReplyTo, req: ClientRequest) {
        Node::request(self, reply_to, req)
    }
    fn ready(&mut self) -> Ready {
        Node::ready(self)
    }
    fn advance(&mut self) {
        Node::advance(self)
    }
    fn status(&self) -> Option<StatusInfo> {
        Some(Node::status(self))
    }
    fn routing(&self) -> Option<Routing> {
        Some(Routing {
            config_index: self.config_index(),
            latest: self.membership().clone(),
            committed: self.committed_membership().clone(),
            contacts: self.contacts(),
            removed: self.removed_contacts(),
        })
    }
    fn routing_key(&self) -> Option<raft::node::RoutingKey> {
        Some(Node::routing_key(self))
    }
    fn users(&self) -> Option<&raft::users::Users> {
        Some(self.state_machine().users())
    }
    fn removed(&self) -> bool {
        Node::removed(self)
    }
    fn set_vote_floor(&mut self, floor: Index, term: Term) {
        Node::set_vote_floor(self, floor, term)
    }
    fn vote_floor(&self) -> Index {
        Node::vote_floor(self)
    }
    fn id(&self) -> NodeId {
        Node::id(self)
    }
    fn applied_index(&self) -> Index {
        Node::applied_index(self)
    }
    fn hard_state(&self) -> HardState {
        Node::hard_state(self)
    }
    fn last(&self) -> (Index, Term) {
        (self.log().last_index(), self.log().last_term())
    }
    fn snapshot_state(&self) -> Option<SnapshotState> {
        Some(Node::snapshot_state(self))
    }
    fn snapshot_taken(&mut self, id: SnapshotId, trailing: u64) -> Option<(Index, Term)> {
        Node::snapshot_taken(self, id, trailing)
    }
    fn take_compacted(&mut self) -> Vec<Entry> {
        Node::take_compacted(self)
    }
    fn snapshot_chunk_stored(&mut self, leader: NodeId, index: Index, have: u64) {
        Node::snapshot_chunk_stored(self, leader, index, have)
    }
    fn install_snapshot(&mut self, leader: NodeId, state: SnapshotState, id: SnapshotId) {
        Node::install_snapshot(self, leader, state, id)
    }
}

/// The core's configurations as routing sees them; routing is recomputed when this changes.
/// The parts of a `Ready` carried out after `advance`: the applied log and snapshots.
#[derive(Default)]
pub struct AfterAdvance {
    pub applied: Vec<LogRecord>,
    pub store_reads: Vec<StoreRead>,
    pub chunk_reads: Vec<ChunkRead>,
    pub chunk_writes: Vec<ChunkWrite>,
}

/// What the node loop needs from storage.
pub trait Durable {
    fn persist(&mut self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), String>;
    /// What a full disk stopped, if anything: after a failed persist, the loop then waits for
    /// space and writes the same batch again, acknowledging nothing meanwhile.
    fn full(&self) -> Option<String> {
        None
    }
    /// Whether the last failed `persist` failed for lack of space, so that the loop waits and
    /// writes the same batch again; any other error ends the loop.
    fn persist_waits_for_space(&self) -> bool {
        self.full().is_some()
    }
    /// Whether a snapshot install waits for space: after a failed `after_advance`, the loop
    /// then waits and calls it again (with nothing new) until the install goes through.
    fn install_pending(&self) -> bool {
        false
    }
    /// Storage errors since the last call, by what failed (for the metrics).
    fn take_errors(&mut self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Appends applied records to the store, serves reads from it, sends and stages snapshot
    /// chunks, and takes a snapshot when one is due. Nothing in fakes.
    fn after_advance(
        &mut self,
        _rd: AfterAdvance,
        _core: &mut impl Core,
        _out: &mut impl Outbox,
    ) -> Result<(), String> {
        Ok(())
    }
}
/// What the node loop needs from the network.
pub trait Outbox {
    fn send_peer(&mut self, msg: Message);
    fn send_reply(&mut self, to: ReplyTo, reply: ClientReply);
    /// Routes by `directory` from now on (it is shared with the receiver).
    fn route(&mut self, _directory: Directory) {}
    /// Takes these users' keys from now on (the receiver opens their requests with them).
    fn set_users(&mut self, _users: &[raft::UserRecord]) {}
}

impl Outbox for Transport {
    fn send_peer(&mut self, msg: Message) {
        Transport::send_peer(self, msg)
    }
    fn send_reply(&mut self, to: ReplyTo, reply: ClientReply) {
        Transport::send_reply(self, to, reply)
    }
    fn route(&mut self, directory: Directory) {
        self.set_directory(directory)
    }
    fn set_users(&mut self, users: &[raft::UserRecord]) {
        if let Some(auth) = self.auth() {
            auth.set_users(users);
        }
    }
}

/// The node thread's two queues: peer messages, ticks and shutdown in one, client requests in
/// the other. The peer queue is always looked at first.
pub(super) struct Inboxes {
    peers: Receiver<Inbox>,
    clients: Receiver<Inbox>,
}

impl Inboxes {
    pub(super) fn new(peers: Receiver<Inbox>, clients: Receiver<Inbox>) -> Inboxes {
        Inboxes { peers, clients }
    }

    /// The next item before `deadline`, from the peer queue if both have one.
    fn next_before(&mut self, deadline: Instant) -> Option<Inbox> {
        if let Ok(item) = self.peers.try_recv() {
            return Some(item);
        }
        if let Ok(item) = self.clients.try_recv() {
            return Some(item);
        }
        select! {
            recv(self.peers) -> item => item.ok(),
            recv(self.clients) -> item => item.ok(),
            default(deadline.saturating_duration_since(Instant::now())) => None,
        }
    }

    /// Blocks for the next item, from the peer queue if both have one. `None` once the peer
    /// queue is closed (the receiver and timer threads are both gone).
    fn next(&mut self) -> Option<Inbox> {
        if let Ok(item) = self.peers.try_recv() {
            return Some(item);
        }
        if let Ok(item) = self.clients.try_recv() {
            return Some(item);
        }
        select! {
            recv(self.peers) -> item => item.ok(),
            recv(self.clients) -> item => match item {
                Ok(item) => Some(item),
                Err(_) => {
                    // No more clients; the ticks go on. Stop selecting a closed channel.
                    self.clients = never();
                    self.peers.recv().ok()
                }
            },
        }
    }
}

/// The node thread: step a batch (the peer queue first, then at most [`MAX_CLIENT_BATCH`]
/// client requests, taking any peer item that arrives meanwhile first), carry out the core's
/// `Ready`s, repeat. Returns `Ok` on shutdown, `Err` on a storage failure (after which nothing
/// more is sent).
pub(super) fn node_loop(
    mut core: impl Core,
    mut storage: impl Durable,
    mut out: impl Outbox,
    mut inbox: Inboxes,
    inst: &mut Instruments,
    routes: &mut Option<Routes>,
) -> Result<(), String> {
    let mut slow = RateLimiter::new(transport::WARN_INTERVAL);
    follow_configuration(&core, &mut out, routes);
    let mut users_seen = None;
    follow_users(&core, &mut out, &mut users_seen);
    loop {
        let Some(first) = inbox.next() else {
            return Err("the receiver and timer threads stopped unexpectedly".into());
        };
        let mut batch = Batch::default();
        let started = Instant::now();
        let mut shutdown = batch.feed(&mut core, first, inst, routes)?;
        while !shutdown {
            if batch.peers < MAX_BATCH {
                if let Ok(item) = inbox.peers.try_recv() {
                    shutdown = batch.feed(&mut core, item, inst, routes)?;
                    continue;
                }
            }
            if batch.clients >= MAX_CLIENT_BATCH {
                break;
            }
            let Ok(item) = inbox.clients.try_recv() else {
                break;
            };
            shutdown = batch.feed(&mut core, item, inst, routes)?;
        }
        if routes.as_ref().is_some_and(|r| r.seen.is_none()) {
            // A joining peer just adopted its cluster: its answers must carry the ID.
            follow_configuration(&core, &mut out, routes);
        }
        let stepped = started.elapsed();
        let mut persisting = Duration::ZERO;
        loop {
            let rd = core.ready();
            let empty = rd.is_empty();
            let carried = carry_out(rd, &mut core, &mut storage, &mut out, inst, &mut inbox);
            for op in storage.take_errors() {
                inst.metrics.storage_error(op);
            }
            persisting += carried?;
            if empty {
                break;
            }
        }
        inst.disk_full = storage.full().is_some();
        let mut status = core.status();
        if let Some(status) = &mut status {
            status.disk_full = inst.disk_full;
            inst.metrics.observe_status(status);
        }
        inst.metrics.probes.turned_over(status.as_ref());
        follow_configuration(&core, &mut out, routes);
        if let Some(r) = routes.as_mut() {
            r.vote_floor_reached(core.vote_floor());
            for msg in r.probe_messages(Instant::now()) {
                out.send_peer(msg);
            }
        }
        follow_users(&core, &mut out, &mut users_seen);
        if core.removed() {
            let routing = core.routing();
            log::info!(
                "removed from the cluster by the configuration at index {} ({}); exiting",
                routing.as_ref().map_or(0, |r| r.config_index),
                routing.map_or_else(String::new, |r| r.committed.describe())
            );
            return Ok(());
        }
        let took = started.elapsed();
        let behind = batch.skipped_ticks >= SKIPPED_TICKS_TO_LOG;
        if took >= SLOW_BATCH || behind {
            if let Some(suppressed) = slow.allow(Instant::now()) {
                let more = if suppressed > 0 {
                    format!(" ({suppressed} more since the last report)")
                } else {
                    String::new()
                };
                log::warn!(
                    "batch of {} peer items ({} ticks stepped, {} skipped) and {} client requests took {} ms: stepping {} ms, persisting {} ms, sending {} ms{more}",
                    batch.peers,
                    batch.ticks,
                    batch.skipped_ticks,
                    batch.clients,
                    took.as_millis(),
                    stepped.as_millis(),
                    persisting.as_millis(),
                    took.saturating_sub(stepped + persisting).as_millis(),
                );
            }
        }
        if shutdown {
            return Ok(());
        }
    }
}

/// Points the transport and receiver at the configuration in force, if it changed.
pub(super) fn follow_configuration(
    core: &impl Core,
    out: &mut impl Outbox,
    routes: &mut Option<Routes>,
) {
    let Some(routes) = routes.as_mut() else {
        return;
    };
    let key = core.routing_key();
    if routes.seen.is_some() && key.is_some() && routes.seen_key == key {
        return;
    }
    let Some(routing) = core.routing() else {
        return;
    };
    routes.seen_key = key;
    if let Some(directory) = routes.update(routing) {
        out.route(directory);
    }
}

/// Hands the receiver the users' keys whenever the users changed (`seen`: the version it
/// has), so a removal takes effect on this peer in the batch that applies it.
fn follow_users(core: &impl Core, out: &mut impl Outbox, seen: &mut Option<Index>) {
    let Some(users) = core.users() else {
        return;
    };
    if *seen == Some(users.version()) {
        return;
    }
    *seen = Some(users.version());
    log::info!(
        "{} users in force (as of index {})",
        users.len(),
        users.version()
    );
    out.set_users(&users.records());
}

/// What one turn of the node loop stepped.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// Items from the peer queue: messages, ticks (stepped or skipped), shutdown.
    peers: usize,
    clients: usize,
    ticks: usize,
    skipped_ticks: usize,
}

impl Batch {
    /// Feeds one inbox item to the core (a tick only if fewer than [`MAX_TICKS_PER_BATCH`]
    /// were; a peer message only if `routes` admits it); true if it asks the loop to stop. An
    /// error (the `cluster` file could not be written) stops the loop.
    fn feed(
        &mut self,
        core: &mut impl Core,
        item: Inbox,
        inst: &mut Instruments,
        routes: &mut Option<Routes>,
    ) -> Result<bool, String> {
        match item {
            Inbox::Client(reply_to, req) => {
                self.clients += 1;
                inst.arrived(reply_to, &req);
                core.request(reply_to, req);
                return Ok(false);
            }
            Inbox::Peer(msg) => {
                let admitted = match routes {
                    Some(r) => r.admit(&msg)?,
                    None => true,
                };
                if admitted {
                    if let Some((floor, term)) =
                        routes.as_mut().and_then(Routes::take_adopted_floor)
                    {
                        core.set_vote_floor(floor, term);
                    }
                    inst.heard(&msg);
                    core.step(msg);
                }
            }
            Inbox::Tick if self.ticks < MAX_TICKS_PER_BATCH => {
                self.ticks += 1;
                core.tick();
                if let Some(r) = routes {
                    r.still_joining(Instant::now());
                }
            }
            Inbox::Tick => self.skipped_ticks += 1,
            Inbox::Shutdown => {
                self.peers += 1;
                return Ok(true);
            }
        }
        self.peers += 1;
        Ok(false)
    }
}

/// Carries out one `Ready` in the order that keeps Raft safe: nothing that depends on the new
/// hard state or entries leaves the process before they are durable, except messages the core
/// marks safe to send first (a leader's AppendEntries, Raft §10.2.1). Replies go last, so a
/// client never hears of a state that a crash could still take back. A storage error returns
/// at once: nothing of this `Ready` is sent after it, and the core is not advanced.
pub(super) fn carry_out(
    rd: Ready,
    core: &mut impl Core,
    storage: &mut impl Durable,
    out: &mut impl Outbox,
    inst: &mut Instruments,
    inbox: &mut Inboxes,
) -> Result<Duration, String> {
    let Ready {
        hard_state,
        entries,
        mut messages,
        send_before_persist,
        replies,
        applied,
        store_reads,
        chunk_reads,
        chunk_writes,
    } = rd;
    if send_before_persist {
        for msg in messages.drain(..) {
            out.send_peer(msg);
        }
    }
    let persisting = Instant::now();
    let mut handed_over = false;
    while hard_state.is_some() || !entries.is_empty() {
        match storage.persist(hard_state.as_ref(), &entries) {
            Ok(()) => break,
            Err(e) if !storage.persist_waits_for_space() => {
                return Err(format!("storage failed: {e}"))
            }
            Err(_) => {
                for op in storage.take_errors() {
                    inst.metrics.storage_error(op);
                }
                wait_for_space(core, out, inst, inbox, &mut handed_over)?;
            }
        }
    }
    let persisting = persisting.elapsed();
    if hard_state.is_some() || !entries.is_empty() {
        inst.persisted(persisting, entries.len());
    }
    // Empty here if they were sent before persisting.
    for msg in messages {
        out.send_peer(msg);
    }
    core.advance();
    for (to, mut reply) in replies {
        inst.answering(to, &mut reply);
        out.send_reply(to, reply);
    }
    let mut after = AfterAdvance {
        applied,
        store_reads,
        chunk_reads,
        chunk_writes,
    };
    loop {
        match storage.after_advance(after, core, out) {
            Ok(()) => break,
            Err(e) if !storage.install_pending() => return Err(format!("storage failed: {e}")),
            Err(_) => {
                for op in storage.take_errors() {
                    inst.metrics.storage_error(op);
                }
                wait_for_space(core, out, inst, inbox, &mut handed_over)?;
                // What was left of this round (other chunks) is sent again by the leader.
                after = AfterAdvance::default();
            }
        }
    }
    Ok(persisting)
}
/// How long the node thread waits between attempts to write a batch the disk had no space for.
pub const FULL_RETRY: Duration = Duration::from_millis(200);

/// Waits [`FULL_RETRY`] while a batch cannot be written for lack of space: this peer
/// acknowledges nothing, as if it were down (peer messages, ticks and client requests other
/// than `status` are dropped, so that clients time out and try another peer: a refusal would
/// be definite, and a retried append may be in the batch being held), but answers `status`
/// with `disk_full`, and, if it leads, hands leadership once to its most up-to-date voter
/// (TimeoutNow: that voter campaigns at once, as in a transfer). An error only on shutdown:
/// the batch was not written.
fn wait_for_space(
    core: &mut impl Core,
    out: &mut impl Outbox,
    inst: &mut Instruments,
    inbox: &mut Inboxes,
    handed_over: &mut bool,
) -> Result<(), String> {
    inst.disk_full = true;
    let status = core.status();
    if !*handed_over {
        *handed_over = true;
        if let Some(msg) = status.as_ref().and_then(hand_over) {
            log::warn!(
                "disk full while leading term {}: asking node {} to take over",
                msg.term,
                msg.to
            );
            out.send_peer(msg);
        }
    }
    let deadline = Instant::now() + FULL_RETRY;
    while let Some(item) = inbox.next_before(deadline) {
        let Inbox::Client(reply_to, req) = item else {
            if let Inbox::Shutdown = item {
                return Err(
                    "shutting down while the disk is full: what waited for space was not written"
                        .into(),
                );
            }
            continue;
        };
        let (ClientOp::Status, Some(info)) = (&req.op, &status) else {
            continue;
        };
        let mut reply = ClientReply {
            id: req.id,
            from: core.id(),
            result: ClientResult::Status(info.clone()),
        };
        inst.answering(reply_to, &mut reply);
        out.send_reply(reply_to, reply);
    }
    Ok(())
}

/// The TimeoutNow a leader whose disk is full sends to its most up-to-date voter (public for
/// the simulator, which carries out a full disk as the node loop does).
#[doc(hidden)]
pub fn hand_over(status: &StatusInfo) -> Option<Message> {
    if status.role != raft::Role::Leader {
        return None;
    }
    let voter = |id: NodeId| {
        status
            .members
            .iter()
            .any(|m| m.id == id && m.role == raft::MemberRole::Voter)
    };
    let target = status
        .followers
        .iter()
        .filter(|f| f.id != status.id && voter(f.id))
        .max_by_key(|f| f.match_index)?;
    Some(Message {
        cluster: 0,
        from: status.id,
        to: target.id,
        term: status.term,
        body: raft::Body::TimeoutNow,
        reply_at: None,
    })
}

#[cfg(test)]
mod tests;
