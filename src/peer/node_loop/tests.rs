use super::*;
use crate::metrics::Metrics;
use crate::raft::{Body, ClientOp, ClientResult, Payload};
use crossbeam_channel::Sender;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

thread_local! {
    /// Set by a test before `run_loop`: the fake storage's `full_for`.
    static FULL_FOR: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Set by a test before `run_loop`: the fake storage's `install_full_for`.
    static INSTALL_FULL_FOR: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A log of what the loop did, shared by the fakes.
type Events = Rc<RefCell<Vec<String>>>;

/// Called by the fake core with each request's id, so a test can act in the middle of a
/// batch (queue a peer message, ask for shutdown).
type Hook = Box<dyn FnMut(u64)>;

/// A core that turns each client request into one entry, one message and one reply, all in
/// the next `Ready`, and counts steps.
struct FakeCore {
    events: Events,
    pending: Ready,
    send_before_persist: bool,
    hook: Option<Hook>,
}

impl Core for FakeCore {
    fn tick(&mut self) {
        self.events.borrow_mut().push("tick".into());
    }
    fn step(&mut self, msg: Message) {
        self.events.borrow_mut().push(format!("step {}", msg.from));
    }
    fn request(&mut self, reply_to: ReplyTo, req: ClientRequest) {
        self.events.borrow_mut().push(format!("request {}", req.id));
        if let Some(hook) = &mut self.hook {
            hook(req.id);
        }
        let index = self.pending.entries.len() as u64 + 1;
        self.pending.hard_state = Some(HardState {
            term: 1,
            vote: Some(1),
            commit: 0,
        });
        self.pending.entries.push(Entry {
            index,
            term: 1,
            payload: Payload::Noop,
        });
        self.pending.messages.push(message(1, 2));
        self.pending.send_before_persist = self.send_before_persist;
        self.pending.replies.push((
            reply_to,
            ClientReply {
                id: req.id,
                from: 1,
                result: ClientResult::Appended { index, term: 1 },
            },
        ));
    }
    fn ready(&mut self) -> Ready {
        let rd = std::mem::take(&mut self.pending);
        let label = if rd.is_empty() {
            "ready (empty)"
        } else {
            "ready"
        };
        self.events.borrow_mut().push(label.into());
        rd
    }
    fn advance(&mut self) {
        self.events.borrow_mut().push("advance".into());
    }
}

struct FakeStorage {
    events: Events,
    fail: bool,
    /// Persists that fail for lack of space before one goes through.
    full_for: u32,
    full: bool,
    /// After-advance rounds that fail with an install waiting for space.
    install_full_for: u32,
}

impl Durable for FakeStorage {
    fn persist(&mut self, hs: Option<&HardState>, entries: &[Entry]) -> Result<(), String> {
        self.events
            .borrow_mut()
            .push(format!("persist {} {}", hs.is_some(), entries.len()));
        if self.full_for > 0 {
            self.full_for -= 1;
            self.full = true;
            return Err("no space left on device".into());
        }
        self.full = false;
        if self.fail {
            Err("disk on fire".into())
        } else {
            Ok(())
        }
    }
    fn full(&self) -> Option<String> {
        self.full.then(|| "no space left on device".into())
    }
    fn install_pending(&self) -> bool {
        self.install_full_for > 0
    }
    fn after_advance(
        &mut self,
        rd: AfterAdvance,
        _core: &mut impl Core,
        _out: &mut impl Outbox,
    ) -> Result<(), String> {
        let applied = rd.applied.len();
        if self.install_full_for > 0 {
            self.events.borrow_mut().push("install waits".into());
            self.install_full_for -= 1;
            if self.install_full_for == 0 {
                return Ok(());
            }
            return Err("no space left on device".into());
        }
        if applied > 0 {
            self.events.borrow_mut().push(format!("apply {applied}"));
        }
        Ok(())
    }
}

struct FakeOut(Events);

impl Outbox for FakeOut {
    fn send_peer(&mut self, msg: Message) {
        self.0.borrow_mut().push(format!("send {}", msg.to));
    }
    fn send_reply(&mut self, _to: ReplyTo, reply: ClientReply) {
        self.0.borrow_mut().push(format!("reply {}", reply.id));
    }
}

fn message(from: NodeId, to: NodeId) -> Message {
    Message {
        cluster: 0,
        from,
        to,
        term: 1,
        body: Body::PreVoteResponse { granted: true },
        reply_at: None,
    }
}

fn request(id: u64) -> Inbox {
    Inbox::Client(
        "127.0.0.1:9".parse().unwrap(),
        ClientRequest {
            id,
            op: ClientOp::Status,
        },
    )
}

/// The node loop's two queues (unbounded), with their send sides.
fn queues() -> (Sender<Inbox>, Sender<Inbox>, Inboxes) {
    let (peers_tx, peers_rx) = crossbeam_channel::unbounded();
    let (clients_tx, clients_rx) = crossbeam_channel::unbounded();
    (peers_tx, clients_tx, Inboxes::new(peers_rx, clients_rx))
}

/// Queues `item` where the receiver or the timer would put it.
fn queue(peers: &Sender<Inbox>, clients: &Sender<Inbox>, item: Inbox) {
    match item {
        Inbox::Client(..) => clients.send(item).unwrap(),
        _ => peers.send(item).unwrap(),
    }
}

/// Runs the node loop over `items`, then Shutdown, and returns what it did. The Shutdown
/// goes last in the client queue, so that it is taken after everything else (in a peer it
/// comes through the peer queue, and is taken before any queued client request).
fn run_loop(
    items: Vec<Inbox>,
    send_before_persist: bool,
    fail: bool,
) -> (Result<(), String>, Vec<String>) {
    let (peers, clients, inbox) = queues();
    for item in items {
        queue(&peers, &clients, item);
    }
    clients.send(Inbox::Shutdown).unwrap();
    run_inbox(inbox, send_before_persist, fail, None)
}

/// Runs the node loop with fakes on `inbox` until it ends; returns what it did.
fn run_inbox(
    inbox: Inboxes,
    send_before_persist: bool,
    fail: bool,
    hook: Option<Hook>,
) -> (Result<(), String>, Vec<String>) {
    let events = Events::default();
    let core = FakeCore {
        events: events.clone(),
        pending: Ready::default(),
        send_before_persist,
        hook,
    };
    let storage = FakeStorage {
        events: events.clone(),
        fail,
        full_for: FULL_FOR.with(|f| f.take()),
        full: false,
        install_full_for: INSTALL_FULL_FOR.with(|f| f.take()),
    };
    let mut inst = Instruments::new(Arc::new(Metrics::new()), Duration::from_millis(10));
    let result = node_loop(
        core,
        storage,
        FakeOut(events.clone()),
        inbox,
        &mut inst,
        &mut None,
    );
    let events = events.borrow().clone();
    (result, events)
}

#[test]
fn persist_comes_before_send_and_advance_before_reply() {
    let (result, events) = run_loop(vec![request(7)], false, false);
    assert_eq!(result, Ok(()));
    assert_eq!(
        events,
        [
            "request 7",
            "ready",
            "persist true 1",
            "send 2",
            "advance",
            "reply 7",
            "ready (empty)",
            "advance"
        ]
    );
}

#[test]
fn messages_marked_safe_are_sent_before_persisting() {
    let (_, events) = run_loop(vec![request(7)], true, false);
    assert_eq!(
        events[1..6],
        ["ready", "send 2", "persist true 1", "advance", "reply 7"]
    );
}

#[test]
fn queued_requests_share_one_ready_and_one_fsync() {
    let items: Vec<Inbox> = (0..100)
        .map(request)
        .chain([Inbox::Tick, Inbox::Peer(message(3, 1))])
        .collect();
    let (_, events) = run_loop(items, false, false);
    let count = |prefix: &str| events.iter().filter(|e| e.starts_with(prefix)).count();
    assert_eq!(count("request"), 100);
    assert_eq!(count("tick"), 1);
    assert_eq!(count("step 3"), 1);
    assert_eq!(count("persist"), 1, "{events:?}");
    assert_eq!(events[102..104], ["ready", "persist true 100"]);
    assert_eq!(count("reply"), 100);
}

#[test]
fn a_storage_error_stops_the_loop_before_anything_is_sent() {
    let (result, events) = run_loop(vec![request(7), request(8)], false, true);
    assert_eq!(result, Err("storage failed: disk on fire".into()));
    assert_eq!(events.last().unwrap(), "persist true 2");
    assert!(!events
        .iter()
        .any(|e| e.starts_with("send") || e.starts_with("reply") || e == "advance"));
}

#[test]
fn shutdown_carries_out_the_batch_before_it_and_ignores_the_rest() {
    let (peers, clients, inbox) = queues();
    for id in 1..=3 {
        clients.send(request(id)).unwrap();
    }
    // Shutdown arrives while request 2 is being stepped; request 3 is still queued.
    let hook: Hook = Box::new(move |id| {
        if id == 2 {
            peers.send(Inbox::Shutdown).unwrap();
        }
    });
    let (result, events) = run_inbox(inbox, false, false, Some(hook));
    assert_eq!(result, Ok(()));
    assert!(events.contains(&"reply 1".to_string()), "{events:?}");
    assert!(events.contains(&"reply 2".to_string()), "{events:?}");
    assert!(!events.contains(&"request 3".to_string()), "{events:?}");
}

#[test]
fn the_loop_ends_with_an_error_if_its_inbox_closes() {
    let (peers, clients, inbox) = queues();
    drop((peers, clients));
    assert!(run_inbox(inbox, false, false, None).0.is_err());
}

#[test]
fn ticks_go_on_after_the_client_queue_closes() {
    let (peers, clients, inbox) = queues();
    drop(clients);
    for item in [Inbox::Tick, Inbox::Tick, Inbox::Shutdown] {
        peers.send(item).unwrap();
    }
    let (result, events) = run_inbox(inbox, false, false, None);
    assert_eq!(result, Ok(()));
    assert_eq!(events.iter().filter(|e| *e == "tick").count(), 2);
}

#[test]
fn peer_messages_and_ticks_are_stepped_before_queued_client_requests() {
    // A backlog of client requests, then a follower's answer and a tick: the answer and
    // the tick must not wait behind the backlog, and the first batch must end after
    // MAX_CLIENT_BATCH requests, so its Ready (heartbeats, replication) leaves soon.
    let (peers, clients, inbox) = queues();
    for id in 0..3 * MAX_CLIENT_BATCH as u64 {
        clients.send(request(id)).unwrap();
    }
    peers.send(Inbox::Peer(message(3, 1))).unwrap();
    peers.send(Inbox::Tick).unwrap();
    clients.send(Inbox::Shutdown).unwrap();
    let (_, events) = run_inbox(inbox, false, false, None);
    assert_eq!(events[..3], ["step 3", "tick", "request 0"], "{events:?}");
    let first_ready = events.iter().position(|e| e == "ready").unwrap();
    assert_eq!(first_ready, 2 + MAX_CLIENT_BATCH, "{:?}", &events[..8]);
}

#[test]
fn ticks_queued_during_a_stall_reach_the_core_a_few_at_a_time() {
    // 200 ms of ticks piled up while the node thread sat in a slow fsync. Stepped at once,
    // they would let a leader's check quorum, or a follower's election timer, fire before
    // anyone could send or answer anything.
    let (peers, clients, inbox) = queues();
    for _ in 0..20 {
        peers.send(Inbox::Tick).unwrap();
    }
    peers.send(Inbox::Peer(message(2, 1))).unwrap();
    clients.send(request(1)).unwrap();
    clients.send(Inbox::Shutdown).unwrap();
    let (_, events) = run_inbox(inbox, false, false, None);
    let ticks = events.iter().filter(|e| *e == "tick").count();
    assert_eq!(ticks, MAX_TICKS_PER_BATCH, "{events:?}");
    assert!(events.contains(&"step 2".to_string()), "{events:?}");
}

#[test]
fn a_peer_message_arriving_during_a_client_batch_is_stepped_in_that_batch() {
    let (peers, clients, inbox) = queues();
    for id in 0..2 * MAX_CLIENT_BATCH as u64 {
        clients.send(request(id)).unwrap();
    }
    clients.send(Inbox::Shutdown).unwrap();
    let hook: Hook = Box::new(move |id| {
        if id == 10 {
            peers.send(Inbox::Peer(message(2, 1))).unwrap();
            peers.send(Inbox::Tick).unwrap();
        }
    });
    let (_, events) = run_inbox(inbox, false, false, Some(hook));
    // Taken right after the request during which it arrived, ahead of the queued ones.
    assert_eq!(
        events[10..14],
        ["request 10", "step 2", "tick", "request 11"],
        "{events:?}"
    );
}

/// Runs the loop on request 7, during which request 8 and a shutdown arrive (while the disk
/// is full, request 8 is dropped: the fake core has no status to give).
fn request_7_then_8_and_shutdown_while_it_is_carried_out() -> (Result<(), String>, Vec<String>) {
    let (peers, clients, inbox) = queues();
    clients.send(request(7)).unwrap();
    let hook: Hook = Box::new(move |id| {
        if id == 7 {
            clients.send(request(8)).unwrap();
            peers.send(Inbox::Shutdown).unwrap();
        }
    });
    run_inbox(inbox, false, false, Some(hook))
}

#[test]
fn a_full_disk_holds_the_batch_answers_nothing_of_it_and_writes_it_again() {
    FULL_FOR.with(|f| f.set(2));
    let (result, events) = request_7_then_8_and_shutdown_while_it_is_carried_out();
    let persists: Vec<_> = events.iter().filter(|e| e.starts_with("persist")).collect();
    assert_eq!(persists, ["persist true 1"; 3], "{events:?}");
    let written = events
        .iter()
        .rposition(|e| e.starts_with("persist"))
        .unwrap();
    let first = events
        .iter()
        .position(|e| e.starts_with("persist"))
        .unwrap();
    // Nothing of the batch leaves before it is written; the waiting peer drops client
    // requests (clients time out and try another peer).
    assert!(!events[..written]
        .iter()
        .any(|e| e == "send 2" || e == "reply 7" || e == "advance"));
    assert!(first < written, "{events:?}");
    assert!(!events.contains(&"reply 8".to_string()), "{events:?}");
    assert_eq!(
        events[written + 1..written + 4],
        ["send 2", "advance", "reply 7"]
    );
    // The shutdown came with the batch: the loop ends once it is written.
    assert_eq!(result, Ok(()));
}

#[test]
fn an_install_waiting_for_space_holds_the_loop_until_it_goes_through() {
    INSTALL_FULL_FOR.with(|f| f.set(3));
    // Request 8 arrives while the install waits: dropped, as while a batch waits for space.
    let (result, events) = request_7_then_8_and_shutdown_while_it_is_carried_out();
    let waits = events.iter().filter(|e| *e == "install waits").count();
    assert_eq!(waits, 3, "tried until it went through: {events:?}");
    assert!(!events.contains(&"reply 8".to_string()), "{events:?}");
    assert_eq!(result, Ok(()), "the peer never exits for it: {events:?}");
}

#[test]
fn a_leader_with_a_full_disk_hands_over_to_its_most_up_to_date_voter() {
    let status: StatusInfo = serde_json::from_value(serde_json::json!({
        "id": 1, "role": "leader", "term": 7, "leader": 1,
        "last_index": 100, "commit_index": 90, "applied_index": 90,
        "members": [
            {"id": 1, "address": "a:1", "role": "voter"},
            {"id": 2, "address": "a:2", "role": "voter"},
            {"id": 3, "address": "a:3", "role": "voter"},
            {"id": 4, "address": "a:4", "role": "learner"}
        ],
        "followers": [
            {"id": 2, "match_index": 80, "lag": 20, "last_contact_ticks": 0},
            {"id": 3, "match_index": 95, "lag": 5, "last_contact_ticks": 0},
            {"id": 4, "match_index": 100, "lag": 0, "last_contact_ticks": 0}
        ]
    }))
    .unwrap();
    let msg = hand_over(&status).expect("a leader hands over");
    assert_eq!((msg.from, msg.to, msg.term), (1, 3, 7));
    assert!(matches!(msg.body, Body::TimeoutNow));
    let follower = StatusInfo {
        role: raft::Role::Follower,
        ..status
    };
    assert!(hand_over(&follower).is_none());
}
