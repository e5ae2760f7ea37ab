//! The UDP side of a peer: one socket; a receiver loop that turns datagrams into inbox items and
//! drops everything else with rate-limited warnings; and the send side, which addresses peers by
//! node ID through the [`Directory`] (addresses from the configuration in force) and clients by
//! the source address of their request.
//!
//! What is accepted is decided by one pure function, [`classify`], so the rules are testable
//! without sockets:
//! - a datagram over [`MAX_DATAGRAM`] bytes, or one that does not decode, is dropped;
//! - a peer [`Message`] must carry this peer's cluster ID (else it is dropped as
//!   `wrong_cluster`), come `from` a member of a configuration it knows ([`Accept`], which the
//!   node thread updates as the configuration in the log changes) and be addressed `to` it;
//! - a client [`ClientRequest`] is accepted from anyone and answered at its source address;
//! - a [`ClientReply`] is dropped: peers send replies, they never take them.
//!
//! With a cluster secret (the config's `secret_file`), every datagram is sealed in the envelope
//! of [`crate::auth`]: the receiver verifies its MAC, its recipient and its freshness (a replay
//! window per sender) in [`classify_sealed`], before any JSON is decoded, and drops what fails
//! without answering it (counted: `auth_failures` in `status`, reasons `auth` and `replay` in
//! the metrics). Sending seals peer messages for their recipient and replies for the client
//! session that asked. Without a secret, datagrams are plain JSON, as the original's were.
//!
//! Accepted peer messages and client requests go to separate queues ([`Queues`]). The receiver
//! never blocks: when the client queue is full it sheds the request (clients retry), so that
//! client load can never cost the cluster a peer message, nor stall the socket behind it.

use crate::auth::{self, Admitted, Dest, Gate, PeerAuth, Refused};
use crate::config::PeerConfig;
use crate::metrics::Metrics;
use crate::raft::membership::check_address;
use crate::raft::{
    ClientReply, ClientRequest, ClientResult, Datagram, Message, NodeId, ReplyTo, MAX_DATAGRAM,
};
use crossbeam_channel::{Sender, TrySendError};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The receive buffer. It is larger than any UDP payload (65,507 bytes), so a datagram is never
/// cut short: an oversized one arrives whole and is rejected, not truncated into garbage.
pub const RECV_BUFFER: usize = 65_536;
/// How long the receiver thread waits for a datagram before it checks for shutdown.
pub const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// At most one warning line per kind of problem per interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// A datagram that passed [`classify`], ready for the node thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    Peer(Message),
    Client(ReplyTo, ClientRequest),
}

/// Why a datagram was dropped; each reason has its own warning rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Oversized,
    Malformed,
    UnknownSender,
    WrongRecipient,
    Reply,
    /// A client request that found the client queue full: shed, so peers keep their share.
    ClientQueueFull,
    /// A peer message that found the peer queue full: the node thread is far behind.
    PeerQueueFull,
    /// A missing or wrong tag, a key this peer does not hold, or one of the wrong side: never answered.
    Unauthenticated,
    /// An authentic datagram seen before (replayed or duplicated), from an older incarnation
    /// of its sender, or addressed to another peer.
    Replay,
    /// An authentic datagram bound to an earlier incarnation of this peer: replayed, or sent
    /// before its sender learned that we restarted (it is told).
    Stale,
    /// A peer message stamped with another cluster's ID: its sender was bootstrapped from
    /// other initial members or another cluster name.
    WrongCluster,
    /// An authentic datagram whose sender epoch is far ahead of this peer's clock.
    Ahead,
    /// An authentic client request sent too long ago by this peer's clock.
    Expired,
    /// Sealed with a key of the wrong side: a client's or user's key on peer traffic, or a
    /// peer key on a request.
    WrongSide,
    /// An authentic request its sender's role does not allow: answered with a refusal.
    Denied,
}

impl DropReason {
    const COUNT: usize = 15;

    /// The `reason` label of `raft_datagrams_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Oversized => "oversized",
            DropReason::Malformed => "malformed",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::WrongRecipient => "wrong_recipient",
            DropReason::Reply => "reply",
            DropReason::ClientQueueFull => "client_queue_full",
            DropReason::PeerQueueFull => "peer_queue_full",
            DropReason::Unauthenticated => "auth",
            DropReason::Replay => "replay",
            DropReason::Stale => "stale",
            DropReason::WrongCluster => "wrong_cluster",
            DropReason::Ahead => "ahead",
            DropReason::Expired => "expired",
            DropReason::WrongSide => "wrong_side",
            DropReason::Denied => "denied",
        }
    }

    /// What was dropped, in the singular and the plural.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            DropReason::Oversized => ("an oversized datagram", "oversized datagrams"),
            DropReason::Malformed => ("a malformed datagram", "malformed datagrams"),
            DropReason::UnknownSender => (
                "a peer message from an unknown node",
                "peer messages from unknown nodes",
            ),
            DropReason::WrongRecipient => (
                "a peer message for another node",
                "peer messages for other nodes",
            ),
            DropReason::Reply => ("a client reply", "client replies"),
            DropReason::ClientQueueFull => (
                "a client request",
                "client requests (the client queue was full)",
            ),
            DropReason::PeerQueueFull => {
                ("a peer message", "peer messages (the peer queue was full)")
            }
            DropReason::Unauthenticated => (
                "an unauthenticated datagram",
                "datagrams that failed authentication",
            ),
            DropReason::Replay => ("a replayed datagram", "replayed or duplicated datagrams"),
            DropReason::Stale => (
                "a datagram for an earlier incarnation of this peer",
                "datagrams for an earlier incarnation of this peer",
            ),
            DropReason::WrongCluster => (
                "a peer message from another cluster",
                "peer messages from other clusters",
            ),
            DropReason::Ahead => (
                "a datagram from an epoch far ahead of this clock",
                "datagrams from epochs far ahead of this clock",
            ),
            DropReason::Expired => ("an expired request", "expired requests"),
            DropReason::WrongSide => (
                "a datagram sealed with a key of the wrong side",
                "datagrams sealed with a key of the wrong side",
            ),
            DropReason::Denied => (
                "a request its role does not allow (refused)",
                "requests their roles do not allow (refused)",
            ),
        }
    }
}

/// A dropped datagram: the reason, and a detail for the log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub reason: DropReason,
    pub detail: String,
}

fn dropped(reason: DropReason, detail: String) -> Dropped {
    Dropped { reason, detail }
}

/// Whom a peer takes messages from, and under which cluster ID. The node thread updates it as
/// configurations change ([`Directory`]); the receiver checks every peer message against it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accept {
    /// Nodes whose messages are taken: members of the configurations this peer knows, and
    /// those it still talks to. Never this node itself.
    pub senders: BTreeSet<NodeId>,
    /// A joining peer with no configuration yet takes messages from any node.
    pub any_sender: bool,
    /// The cluster ID every peer message must carry; 0 while a joining peer has none yet
    /// (then any is taken, and the node thread adopts the first AppendEntries' one).
    pub cluster: u64,
    /// Our bootstrap membership and cluster name, for the wrong-cluster warning.
    pub bootstrap: String,
}

impl Accept {
    /// Messages from `senders` only, with no cluster ID check (as before cluster IDs).
    pub fn only(senders: impl IntoIterator<Item = NodeId>) -> Accept {
        Accept {
            senders: senders.into_iter().collect(),
            ..Accept::default()
        }
    }

    fn knows(&self, id: NodeId) -> bool {
        self.any_sender || self.senders.contains(&id)
    }

    /// A peer of our own cluster we have no configuration for yet (it joined while we were
    /// away, or we are joining through other members): taken when the message carries its
    /// address, which the node thread then learns. With a cluster secret, only an authentic
    /// datagram gets this far.
    fn introduces(&self, msg: &Message) -> bool {
        msg.reply_at.is_some() && (self.cluster != 0 && msg.cluster == self.cluster || probes(msg))
    }
}

/// A joining peer, with no cluster yet, asks a contact point which cluster it is in.
fn probes(msg: &Message) -> bool {
    msg.cluster == 0 && msg.body == crate::raft::Body::ClusterProbe
}

/// The checks every decoded peer message passes: its cluster, its sender, its recipient.
fn check_peer(msg: Message, me: NodeId, accept: &Accept) -> Result<Inbound, Dropped> {
    if accept.cluster != 0 && msg.cluster != accept.cluster && !probes(&msg) {
        Err(dropped(
            DropReason::WrongCluster,
            format!(
                "node {} is in cluster {:016x}, this peer (node {me}) in cluster {:016x}: the peers were bootstrapped from different initial members or cluster names (ours: {}); a peer that should join this cluster needs an empty data_dir and --join",
                msg.from, msg.cluster, accept.cluster, accept.bootstrap
            ),
        ))
    } else if msg.from == me || !(accept.knows(msg.from) || accept.introduces(&msg)) {
        Err(dropped(
            DropReason::UnknownSender,
            format!("node {} is not a configured peer", msg.from),
        ))
    } else if msg.to != me {
        Err(dropped(
            DropReason::WrongRecipient,
            format!(
                "addressed to node {} by node {}; this is node {me}",
                msg.to, msg.from
            ),
        ))
    } else {
        Ok(Inbound::Peer(msg))
    }
}

/// Decides what to do with `bytes`, received from `src` by node `me`, which takes peer
/// messages as `accept` says. Never panics, whatever the bytes.
pub fn classify(
    bytes: &[u8],
    src: SocketAddr,
    me: NodeId,
    accept: &Accept,
) -> Result<Inbound, Dropped> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(dropped(
            DropReason::Oversized,
            format!("{} bytes, the limit is {MAX_DATAGRAM}", bytes.len()),
        ));
    }
    if bytes.first() == Some(&auth::MAGIC) {
        return Err(dropped(
            DropReason::Malformed,
            "an authenticated (sealed) datagram, but this peer has no secret_file: its sender has the cluster secret and this peer does not".into(),
        ));
    }
    match Datagram::decode(bytes) {
        Err(e) => {
            let detail = e.strip_prefix("malformed datagram: ").unwrap_or(&e);
            Err(dropped(DropReason::Malformed, detail.to_string()))
        }
        Ok(Datagram::Peer(msg)) => check_peer(msg, me, accept),
        Ok(Datagram::Request(req)) => Ok(Inbound::Client(src, req)),
        Ok(Datagram::Reply(reply)) => Err(dropped(
            DropReason::Reply,
            format!(
                "peers take none (id {}, from node {})",
                reply.id, reply.from
            ),
        )),
    }
}

/// Like [`classify`], for a peer with a cluster secret: `gate` opens the envelope (MAC,
/// recipient, freshness) before the JSON inside is decoded, and the JSON must agree with the
/// envelope (a peer message's `from` is the node that sealed it). `Ok(None)` for a notice,
/// which the gate has handled. Never panics, whatever the bytes.
pub fn classify_sealed(
    gate: &mut Gate,
    bytes: &[u8],
    src: SocketAddr,
    me: NodeId,
    accept: &Accept,
    now: Instant,
) -> Result<Option<Inbound>, Dropped> {
    if bytes.len() > MAX_DATAGRAM + auth::OVERHEAD {
        return Err(dropped(
            DropReason::Oversized,
            format!(
                "{} bytes, the limit is {}",
                bytes.len(),
                MAX_DATAGRAM + auth::OVERHEAD
            ),
        ));
    }
    let refused = match gate.admit(bytes, src, now) {
        Ok(admitted) => Ok(admitted),
        // Answered with a notice; nothing for the core, and nothing wrong.
        Err(Refused::Handshake) => return Ok(None),
        Err(r) => Err(r),
    };
    let admitted = refused.map_err(|r| match r {
        Refused::Auth(e @ auth::AuthError::WrongSide(_)) => {
            dropped(DropReason::WrongSide, e.to_string())
        }
        Refused::Auth(e) => dropped(DropReason::Unauthenticated, e.to_string()),
        Refused::Replay {
            why: why @ (auth::Replay::Ahead | auth::Replay::Expired),
            sender,
        } => {
            let reason = match why {
                auth::Replay::Ahead => DropReason::Ahead,
                _ => DropReason::Expired,
            };
            dropped(reason, format!("{why}, from {sender}"))
        }
        Refused::Replay {
            why: auth::Replay::StaleRecipient,
            sender,
        } => dropped(
            DropReason::Stale,
            format!("{}, from {sender}", auth::Replay::StaleRecipient),
        ),
        Refused::Replay { why, sender } => {
            dropped(DropReason::Replay, format!("{why}, from {sender}"))
        }
        Refused::Handshake => unreachable!("handled above"),
        Refused::Misdirected(why) => dropped(DropReason::UnknownSender, why),
        Refused::NotTaken(kind) => dropped(
            DropReason::Reply,
            format!("a sealed {kind:?}: peers take none"),
        ),
    })?;
    let malformed = |e: String| {
        let detail = e.strip_prefix("malformed datagram: ").unwrap_or(&e);
        dropped(DropReason::Malformed, format!("authentic, but {detail}"))
    };
    match admitted {
        Admitted::Notice { .. } => Ok(None),
        Admitted::Peer { from, body } => match Datagram::decode(body).map_err(malformed)? {
            Datagram::Peer(msg) if msg.from == from && msg.to == me => {
                check_peer(msg, me, accept).map(Some)
            }
            Datagram::Peer(msg) => Err(dropped(
                DropReason::WrongRecipient,
                format!(
                    "sealed by node {from} for node {me}, but from node {} to node {}",
                    msg.from, msg.to
                ),
            )),
            _ => Err(malformed(format!(
                "sealed by node {from} as a peer message, but not one"
            ))),
        },
        Admitted::Request { body, role, .. } => match Datagram::decode(body).map_err(malformed)? {
            Datagram::Request(req) => match crate::raft::permit(role, &req.op) {
                Ok(()) => Ok(Some(Inbound::Client(src, req))),
                Err(reason) => Err(deny(gate, src, me, req.id, reason)),
            },
            _ => Err(malformed("sealed as a client request, but not one".into())),
        },
    }
}

/// Answers request `id` from `src`, which its sender's role does not allow, with a refusal
/// (queued with the gate's notices: the core never sees the request).
fn deny(gate: &mut Gate, src: SocketAddr, me: NodeId, id: u64, reason: String) -> Dropped {
    let reply = Datagram::Reply(ClientReply {
        id,
        from: me,
        result: ClientResult::Refused {
            reason: reason.clone(),
        },
    });
    let mut buf = Vec::new();
    if encode_into(&mut buf, auth::HEADER_LEN, &reply).is_ok() {
        gate.queue_reply(src, buf);
    }
    dropped(DropReason::Denied, format!("request {id}: {reason}"))
}

/// Whether a datagram is a client request, judged from its first bytes only, so that a
/// receiver under overload can shed it before paying to verify or decode it.
fn looks_like_request(bytes: &[u8]) -> bool {
    bytes.starts_with(REQUEST_PREFIX)
        || (bytes.len() > 2 && bytes[0] == auth::MAGIC && bytes[2] == auth::Kind::Request as u8)
}

/// Allows one event per interval and counts the events it suppressed in between.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(interval: Duration) -> RateLimiter {
        RateLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Records an event at `now`. `Some(n)` means "report it", `n` being the events suppressed
    /// since the last report; `None` means it was counted and suppressed.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Called without an event: `Some(n)` when `n > 0` events were suppressed and a report is
    /// due, so that a burst that ends is still counted in the log. Counts as a report.
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) >= self.interval);
        if self.suppressed > 0 && due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            None
        }
    }
}

/// Warning lines for dropped datagrams, at most one per [`DropReason`] per interval.
#[derive(Clone, Debug)]
pub struct DropLog {
    limiters: [RateLimiter; DropReason::COUNT],
}

impl DropLog {
    pub fn new(interval: Duration) -> DropLog {
        DropLog {
            limiters: std::array::from_fn(|_| RateLimiter::new(interval)),
        }
    }

    /// Records a drop; returns the line to log, if one is due.
    pub fn note(&mut self, now: Instant, src: SocketAddr, d: &Dropped) -> Option<String> {
        let suppressed = self.limiters[d.reason as usize].allow(now)?;
        let what = d.reason.describe().0;
        let mut line = format!("dropped {what} (source {src}): {}", d.detail);
        if suppressed > 0 {
            line += &format!(" (and {suppressed} more since the last report)");
        }
        Some(line)
    }

    /// The summary lines due for drops that were suppressed and not yet reported.
    pub fn flush(&mut self, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        for (limiter, reason) in self.limiters.iter_mut().zip(ALL_REASONS) {
            if let Some(n) = limiter.flush(now) {
                let what = reason.describe().1;
                lines.push(format!("dropped {n} more {what} since the last report"));
            }
        }
        lines
    }
}

const ALL_REASONS: [DropReason; DropReason::COUNT] = [
    DropReason::Oversized,
    DropReason::Malformed,
    DropReason::UnknownSender,
    DropReason::WrongRecipient,
    DropReason::Reply,
    DropReason::ClientQueueFull,
    DropReason::PeerQueueFull,
    DropReason::Unauthenticated,
    DropReason::Replay,
    DropReason::Stale,
    DropReason::WrongCluster,
    DropReason::Ahead,
    DropReason::Expired,
    DropReason::WrongSide,
    DropReason::Denied,
];

/// A rate-limited log line for one kind of problem.
#[derive(Clone, Debug)]
struct Throttled(RateLimiter);

impl Throttled {
    fn new() -> Throttled {
        Throttled(RateLimiter::new(WARN_INTERVAL))
    }

    fn log(&mut self, level: log::Level, line: impl FnOnce() -> String) {
        if let Some(n) = self.0.allow(Instant::now()) {
            if n > 0 {
                log::log!(level, "{} (and {n} more since the last report)", line());
            } else {
                log::log!(level, "{}", line());
            }
        }
    }
}

/// Binds this peer's socket. Returns the send side, for the node thread, and the receive side,
/// for the receiver thread; both share the one socket. Loads the cluster secret first, if the
/// config names one: a bad secret file stops the peer before it binds anything.
pub fn bind(config: &PeerConfig) -> Result<(Transport, Listener), String> {
    let keys = config.keys().map_err(|e| format!("{}: {e}", config.name))?;
    let local = resolve_address(&format!("{}:{}", config.host, config.port))
        .map_err(|e| format!("{}: field `host`: {e}", config.name))?;
    if keys.is_none() && !config.insecure && !local.ip().is_loopback() {
        return Err(format!(
            "{}: no `secret_file` in the config, and this peer's address {local} is not a loopback address: anyone who can reach it could write to the log and read it. Name a `secret_file` (scripts/start-cluster.sh makes one), or set \"insecure\": true to run unauthenticated anyway",
            config.name
        ));
    }
    // Other peers' addresses are best effort: one that does not resolve now may later, and
    // the configuration in the log may not even list it any more.
    let mut addresses = BTreeMap::new();
    for p in &config.other_peers {
        match resolve_address(&format!("{}:{}", p.host, p.port)) {
            Ok(addr) => {
                addresses.insert(p.node_id, addr);
            }
            Err(e) => log::warn!("{}: peer {}: {e}", config.name, p.node_id),
        }
    }
    let directory = Arc::new(RwLock::new(Directory {
        accept: Accept::only(config.peer_ids()),
        addresses,
    }));
    let socket = UdpSocket::bind(local).map_err(|e| bind_error(&config.name, local, &e))?;
    socket
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| format!("{}: cannot set a read timeout on {local}: {e}", config.name))?;
    enlarge_buffers(&socket);
    let auth = match keys {
        Some(keys) => {
            let ids: Vec<String> = keys.ids().iter().map(|id| format!("{id:08x}")).collect();
            log::info!(
                "{}: datagrams are authenticated (cluster {:?}, key {}{})",
                config.name,
                config.cluster,
                ids[0],
                ids.get(1).map_or(String::new(), |p| format!(
                    ", previous key {p} also accepted"
                ))
            );
            Some(Arc::new(PeerAuth::new(
                keys,
                config.node_id,
                config.peer_ids(),
            )))
        }
        None => {
            log::warn!(
                "{}: no secret_file in the config{}: datagrams are NOT authenticated or encrypted, and anyone who can reach {local} can write to the log and read it; see docs/security.md",
                config.name,
                if config.insecure { " (\"insecure\": true)" } else { "" }
            );
            None
        }
    };
    let socket = Arc::new(socket);
    let metrics = Arc::new(Metrics::new());
    metrics.declare_drop_reasons(ALL_REASONS.iter().map(|r| r.label()));
    let transport = Transport {
        socket: Arc::clone(&socket),
        me: config.node_id,
        directory: Arc::clone(&directory),
        unknown_destination: Throttled::new(),
        encode_failed: Throttled::new(),
        send_failed: Throttled::new(),
        metrics: Arc::clone(&metrics),
        auth: auth.clone(),
        buf: Vec::new(),
        reply_at: reply_address(config),
    };
    let listener = Listener {
        socket,
        me: config.node_id,
        directory,
        drops: DropLog::new(WARN_INTERVAL),
        recv_failed: Throttled::new(),
        stats: ReceiveStats::default(),
        metrics,
        gate: auth.map(Gate::new),
    };
    Ok((transport, listener))
}

pub use crate::config::resolve_address;

/// The address this peer stamps on its messages: `host:port` of its config, unless the host is
/// a wildcard (other hosts cannot reach `0.0.0.0`) or the address is not one a configuration
/// could hold.
fn reply_address(config: &PeerConfig) -> Option<String> {
    let address = format!("{}:{}", config.host, config.port);
    let wildcard = config
        .host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    if wildcard || check_address(&address).is_err() {
        log::warn!(
            "{}: peers that have no address for this peer cannot learn it: {address} is not an address they could reach",
            config.name
        );
        return None;
    }
    Some(address)
}

/// What the node thread and the receiver share about other peers: where each is, and whom to
/// take messages from. The node thread rewrites it when the configuration changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    pub accept: Accept,
    /// Where to send to each peer, by node ID: never a datagram's source address.
    pub addresses: BTreeMap<NodeId, SocketAddr>,
}

/// Reads a shared directory, whatever a panicking writer left (it is replaced whole).
fn read(directory: &RwLock<Directory>) -> std::sync::RwLockReadGuard<'_, Directory> {
    directory.read().unwrap_or_else(|p| p.into_inner())
}

/// Socket buffer size asked for; the kernel caps it (net.core.rmem_max / wmem_max).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Asks for large socket buffers: with hundreds of requests in flight, the default (~200 KiB)
/// overflows and drops datagrams, which then cost a retry timeout; a peer's socket also holds
/// its peer traffic, which the kernel drops as readily as a client's when the buffer is full.
/// Best effort: a smaller buffer costs speed, so it is logged once at info.
pub fn enlarge_buffers(socket: &UdpSocket) {
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s.set_recv_buffer_size(SOCKET_BUFFER) {
        log::debug!("cannot enlarge the receive buffer: {e}");
    }
    // Linux reports twice what it grants (it counts its bookkeeping).
    if let Ok(got) = s.recv_buffer_size() {
        if got < SOCKET_BUFFER {
            log::info!(
                "the UDP receive buffer is {got} bytes, not the {SOCKET_BUFFER} asked for (raise net.core.rmem_max): bursts may lose datagrams"
            );
        }
    }
    if let Err(e) = s.set_send_buffer_size(SOCKET_BUFFER) {
        log::debug!("cannot enlarge the send buffer: {e}");
    }
}

fn bind_error(name: &str, addr: SocketAddr, e: &io::Error) -> String {
    let why = match e.kind() {
        io::ErrorKind::AddrInUse => "address in use (is another peer running?)".to_string(),
        io::ErrorKind::AddrNotAvailable => {
            "address not available on this host (check `host` in the config)".to_string()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need privileges)".to_string()
        }
        _ => e.to_string(),
    };
    format!("{name}: cannot bind {addr}: {why}")
}

/// The send side of the socket, owned by the node thread. Sending never panics: a message that
/// cannot be encoded or sent is logged (rate-limited) and dropped, as the network might have.
#[derive(Debug)]
pub struct Transport {
    socket: Arc<UdpSocket>,
    me: NodeId,
    /// Shared with the listener; updated by [`Transport::set_directory`].
    directory: Arc<RwLock<Directory>>,
    unknown_destination: Throttled,
    encode_failed: Throttled,
    send_failed: Throttled,
    metrics: Arc<Metrics>,
    /// The cluster secret's state, shared with the listener; `None`: plain JSON datagrams.
    auth: Option<Arc<PeerAuth>>,
    /// Reused for every datagram sent: room for the envelope's header, then the JSON.
    buf: Vec<u8>,
    /// Our own address as other peers reach it (`host:port` of our config), stamped on every
    /// peer message so that a peer without an address for us can answer.
    reply_at: Option<String>,
}

impl Transport {
    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The metrics this transport counts datagrams in, shared with its listener.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The cluster secret's state, if datagrams are authenticated.
    pub fn auth(&self) -> Option<&Arc<PeerAuth>> {
        self.auth.as_ref()
    }

    /// The routing state in force (shared with the listener).
    pub fn directory(&self) -> Directory {
        read(&self.directory).clone()
    }

    /// Replaces the routing state, for this side and the listener's; with authentication, new
    /// peers get a link (all members share the cluster secret).
    pub fn set_directory(&mut self, directory: Directory) {
        if let Some(auth) = &self.auth {
            for &id in directory
                .accept
                .senders
                .iter()
                .chain(directory.addresses.keys())
            {
                auth.add_peer(id);
            }
            auth.set_open(directory.accept.any_sender);
        }
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = directory;
    }

    /// Sends a peer message, stamped with our cluster ID, to the address the configuration
    /// (or, failing it, older knowledge) gives for `msg.to`.
    pub fn send_peer(&mut self, mut msg: Message) {
        let to = msg.to;
        let (addr, cluster) = {
            let d = read(&self.directory);
            (d.addresses.get(&to).copied(), d.accept.cluster)
        };
        msg.cluster = cluster;
        msg.reply_at.clone_from(&self.reply_at);
        let addr = match addr {
            Some(addr) if to != self.me => addr,
            _ => {
                let me = self.me;
                // A member whose address we have not learned yet (it will be, from its own
                // next message): a warning, not an error, since it heals by itself.
                self.unknown_destination.log(log::Level::Warn, || {
                    format!(
                        "not sending a message to node {to}: no known address for it (node {me})"
                    )
                });
                return;
            }
        };
        let mut buf = std::mem::take(&mut self.buf);
        let room = if self.auth.is_some() {
            auth::HEADER_LEN
        } else {
            0
        };
        match encode_into(&mut buf, room, &Datagram::Peer(msg)) {
            Ok(()) => match &self.auth {
                None => send_datagram(
                    &self.socket,
                    &self.metrics,
                    &mut self.send_failed,
                    &buf,
                    addr,
                ),
                Some(auth) => {
                    let (socket, metrics, failed) =
                        (&self.socket, &self.metrics, &mut self.send_failed);
                    if let Err(e) = auth.seal_to_peer(to, &mut buf, |bytes| {
                        send_datagram(socket, metrics, failed, bytes, addr)
                    }) {
                        self.encode_failed.log(log::Level::Error, || {
                            format!("not sending to node {to}: {e}")
                        });
                    }
                }
            },
            Err(e) => self.encode_failed.log(log::Level::Error, || {
                format!("not sending to node {to}: {e}")
            }),
        }
        self.buf = buf;
    }

    /// Sends a client reply to the client's source address. A reply too large for a datagram is
    /// replaced by a `Refused` with the same id, so the client hears something instead of
    /// waiting for its timeout.
    ///
    /// With a cluster secret, the reply is sealed to the client session whose authenticated
    /// request last came from `to`, with the key that request used; a `Status` answer carries
    /// this peer's count of datagrams that failed authentication.
    pub fn send_reply(&mut self, to: ReplyTo, mut reply: ClientReply) {
        if let (ClientResult::Status(info), Some(auth)) = (&mut reply.result, &self.auth) {
            info.auth_failures = auth.stats.auth_failures.load(Ordering::Relaxed);
        }
        if let (ClientResult::UserAdded { .. }, Some(auth)) = (&reply.result, &self.auth) {
            auth::fill_credential(auth.keys(), &mut reply.result);
        }
        let (id, from) = (reply.id, reply.from);
        let mut buf = std::mem::take(&mut self.buf);
        let room = if self.auth.is_some() {
            auth::HEADER_LEN
        } else {
            0
        };
        if let Err(e) = encode_into(&mut buf, room, &Datagram::Reply(reply)) {
            self.encode_failed.log(log::Level::Error, || {
                format!("reply {id} to client {to} does not encode: {e}")
            });
            let refusal = Datagram::Reply(ClientReply {
                id,
                from,
                result: ClientResult::Refused {
                    reason: format!("the peer could not encode its reply: {e}"),
                },
            });
            if encode_into(&mut buf, room, &refusal).is_err() {
                self.buf = buf;
                return;
            }
        }
        let sealed = match &self.auth {
            None => Ok(()),
            Some(auth) => auth.seal_reply(to, &mut buf),
        };
        match sealed {
            Ok(()) => send_datagram(&self.socket, &self.metrics, &mut self.send_failed, &buf, to),
            Err(e) => self.encode_failed.log(log::Level::Warn, || {
                format!("not answering request {id} of client {to}: {e}")
            }),
        }
        self.buf = buf;
    }
}

/// Encodes `d` as JSON into `buf` after `room` zero bytes (for an envelope's header); fails
/// if the JSON would not fit one datagram.
fn encode_into(buf: &mut Vec<u8>, room: usize, d: &Datagram) -> Result<(), String> {
    buf.clear();
    buf.resize(room, 0);
    serde_json::to_writer(&mut *buf, d).map_err(|e| format!("encode: {e}"))?;
    let len = buf.len() - room;
    if len > MAX_DATAGRAM {
        return Err(format!(
            "datagram of {len} bytes exceeds the {MAX_DATAGRAM}-byte limit"
        ));
    }
    Ok(())
}

/// Sends one datagram, counting it; a failure is logged (rate-limited) and otherwise ignored,
/// as a loss in the network would be.
fn send_datagram(
    socket: &UdpSocket,
    metrics: &Metrics,
    failed: &mut Throttled,
    bytes: &[u8],
    addr: SocketAddr,
) {
    match socket.send_to(bytes, addr) {
        Ok(_) => {
            metrics.datagrams_sent.inc();
        }
        Err(e) => failed.log(log::Level::Warn, || format!("send to {addr} failed: {e}")),
    }
}

/// Where the receiver hands what it accepts: peer messages and client requests each to their
/// own bounded queue, so that however full the client queue, a peer message still gets in.
#[derive(Debug)]
pub struct Queues<T> {
    pub peers: Sender<T>,
    pub clients: Sender<T>,
}

/// What a receiver did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Peer messages queued for the node thread.
    pub peer_messages: u64,
    /// Client requests queued for the node thread.
    pub client_requests: u64,
    /// Client requests dropped because the client queue was full.
    pub clients_shed: u64,
    /// Peer messages dropped because the peer queue was full.
    pub peers_dropped: u64,
    /// Datagrams that [`classify`] (or [`classify_sealed`]) rejected.
    pub rejected: u64,
    /// Sealed datagrams handled without the core: notices (a peer's epoch, for us), and first
    /// datagrams from senders that did not know our epoch yet (answered with a notice).
    pub handshakes: u64,
}

/// The receive side of the socket, run by the receiver thread.
#[derive(Debug)]
pub struct Listener {
    socket: Arc<UdpSocket>,
    me: NodeId,
    /// Whom to take peer messages from, and where notices to peers go (their configured
    /// addresses); shared with the transport, which updates it.
    directory: Arc<RwLock<Directory>>,
    drops: DropLog,
    recv_failed: Throttled,
    stats: ReceiveStats,
    metrics: Arc<Metrics>,
    /// Opens sealed datagrams; `None` without a cluster secret.
    gate: Option<Gate>,
}

/// How every client request datagram our own encoder makes begins; see [`Listener::run`].
const REQUEST_PREFIX: &[u8] = b"{\"Request\":";

impl Listener {
    /// Receives until `stop` is set or a queue is closed, handing each accepted datagram to
    /// its queue in `queues`, and returns what it did. It never blocks on a queue: a client
    /// request that finds the client queue full is shed (counted, with a rate-limited warning),
    /// and a peer message that finds the peer queue full is dropped as the network might have.
    pub fn run<T: From<Inbound>>(
        mut self,
        queues: Queues<T>,
        stop: Arc<AtomicBool>,
    ) -> ReceiveStats {
        let mut buf = vec![0u8; RECV_BUFFER];
        while !stop.load(Ordering::Relaxed) {
            let received = self.socket.recv_from(&mut buf);
            let now = Instant::now();
            for line in self.drops.flush(now) {
                log::warn!("{line}");
            }
            let (len, src) = match received {
                Ok(r) => r,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted
                    // Some platforms report an ICMP "port unreachable" from an earlier send here.
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionRefused => continue,
                    _ => {
                        self.recv_failed
                            .log(log::Level::Warn, || format!("receive failed: {e}"));
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                },
            };
            self.metrics.datagrams_received.inc();
            let bytes = &buf[..len];
            // Under overload, shed a request before paying to decode it: the time this thread
            // saves is time it spends draining the socket, where peer datagrams wait too.
            if queues.clients.is_full() && looks_like_request(bytes) {
                self.shed(now, src, queues.clients.capacity());
                continue;
            }
            let classified = match &mut self.gate {
                None => classify(bytes, src, self.me, &read(&self.directory).accept).map(Some),
                Some(gate) => {
                    let c = {
                        let directory = read(&self.directory);
                        classify_sealed(gate, bytes, src, self.me, &directory.accept, now)
                    };
                    // Takes the directory's lock again: the guard above is gone.
                    self.send_outgoing();
                    c
                }
            };
            let (queue, item) = match classified {
                Ok(Some(item @ Inbound::Peer(_))) => (&queues.peers, item),
                Ok(Some(item @ Inbound::Client(..))) => (&queues.clients, item),
                Ok(None) => {
                    self.stats.handshakes += 1;
                    continue;
                }
                Err(d) => {
                    self.stats.rejected += 1;
                    self.warn(now, src, &d);
                    continue;
                }
            };
            let is_peer = matches!(item, Inbound::Peer(_));
            match queue.try_send(T::from(item)) {
                Ok(()) if is_peer => self.stats.peer_messages += 1,
                Ok(()) => self.stats.client_requests += 1,
                Err(TrySendError::Full(_)) if is_peer => {
                    self.stats.peers_dropped += 1;
                    let detail = format!(
                        "the peer queue is full ({} queued); the node thread is not keeping up",
                        queue.len()
                    );
                    self.warn(now, src, &dropped(DropReason::PeerQueueFull, detail));
                }
                Err(TrySendError::Full(_)) => self.shed(now, src, queue.capacity()),
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
        let s = self.stats;
        log::info!(
            "receiver stopped: {} peer messages and {} client requests queued; {} client requests shed, {} peer messages dropped, {} datagrams rejected",
            s.peer_messages,
            s.client_requests,
            s.clients_shed,
            s.peers_dropped,
            s.rejected
        );
        s
    }

    /// Sends the notices (and resends) the gate queued.
    fn send_outgoing(&mut self) {
        let Some(gate) = &mut self.gate else {
            return;
        };
        for (dest, bytes) in gate.take_outgoing() {
            let addr = match dest {
                Dest::Addr(addr) => addr,
                Dest::Peer(id) => match read(&self.directory).addresses.get(&id) {
                    Some(&addr) => addr,
                    None => continue,
                },
                Dest::PeerOr(id, src) => read(&self.directory)
                    .addresses
                    .get(&id)
                    .copied()
                    .unwrap_or(src),
            };
            send_datagram(
                &self.socket,
                &self.metrics,
                &mut self.recv_failed,
                &bytes,
                addr,
            );
        }
    }

    /// Sheds a client request because the client queue is full.
    fn shed(&mut self, now: Instant, src: SocketAddr, capacity: Option<usize>) {
        self.stats.clients_shed += 1;
        let detail = format!(
            "the client queue is full ({} queued); shedding client load so that peer traffic keeps flowing",
            capacity.unwrap_or(0)
        );
        self.warn(now, src, &dropped(DropReason::ClientQueueFull, detail));
    }

    fn warn(&mut self, now: Instant, src: SocketAddr, d: &Dropped) {
        self.metrics.dropped(d.reason.label(), 1);
        if let Some(line) = self.drops.note(now, src, d) {
            log::warn!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{AppendResult, Body, ClientOp};

    fn src() -> SocketAddr {
        "127.0.0.1:4000".parse().unwrap()
    }

    fn peers() -> Accept {
        Accept::only([2, 3])
    }

    fn message(from: NodeId, to: NodeId) -> Message {
        Message {
            cluster: 0,
            from,
            to,
            term: 3,
            body: Body::AppendEntriesResponse {
                read_seq: 7,
                result: AppendResult::Accepted { match_index: 5 },
            },
            reply_at: None,
        }
    }

    fn encoded(d: Datagram) -> Vec<u8> {
        d.encode().unwrap()
    }

    fn reason(bytes: &[u8]) -> DropReason {
        classify(bytes, src(), 1, &peers()).unwrap_err().reason
    }

    #[test]
    fn message_from_a_configured_peer_to_this_node_is_accepted() {
        let m = message(2, 1);
        let got = classify(&encoded(Datagram::Peer(m.clone())), src(), 1, &peers());
        assert_eq!(got, Ok(Inbound::Peer(m)));
    }

    #[test]
    fn message_from_an_unknown_sender_is_dropped() {
        assert_eq!(
            reason(&encoded(Datagram::Peer(message(9, 1)))),
            DropReason::UnknownSender
        );
        // A node is not its own peer: a message claiming to be from ourselves is a forgery.
        assert_eq!(
            reason(&encoded(Datagram::Peer(message(1, 1)))),
            DropReason::UnknownSender
        );
    }

    #[test]
    fn an_unknown_peer_of_our_cluster_is_heard_when_it_says_where_it_is() {
        let accept = Accept {
            cluster: 7,
            ..peers()
        };
        let introduced = Message {
            cluster: 7,
            reply_at: Some("127.0.0.1:3003".into()),
            ..message(4, 1)
        };
        let got = classify(
            &encoded(Datagram::Peer(introduced.clone())),
            src(),
            1,
            &accept,
        );
        assert_eq!(got, Ok(Inbound::Peer(introduced.clone())));
        // Without its address it could not be answered; of another cluster, or while this
        // peer has no cluster ID to compare with, it is not ours to hear.
        let cases = [
            (
                Message {
                    reply_at: None,
                    ..introduced.clone()
                },
                &accept,
            ),
            (
                Message {
                    cluster: 8,
                    ..introduced.clone()
                },
                &accept,
            ),
            (introduced.clone(), &peers()),
        ];
        for (m, accept) in cases {
            let got = classify(&encoded(Datagram::Peer(m.clone())), src(), 1, accept);
            assert!(got.is_err(), "{m:?} was taken");
        }
    }

    #[test]
    fn message_addressed_to_another_node_is_dropped() {
        assert_eq!(
            reason(&encoded(Datagram::Peer(message(2, 3)))),
            DropReason::WrongRecipient
        );
    }

    #[test]
    fn client_request_is_accepted_from_anyone_and_answered_at_its_source() {
        let req = ClientRequest {
            id: 42,
            op: ClientOp::Status,
        };
        let client: SocketAddr = "10.1.2.3:55555".parse().unwrap();
        let got = classify(
            &encoded(Datagram::Request(req.clone())),
            client,
            1,
            &peers(),
        );
        assert_eq!(got, Ok(Inbound::Client(client, req)));
    }

    #[test]
    fn client_reply_is_dropped() {
        let reply = ClientReply {
            id: 1,
            from: 2,
            result: ClientResult::NotLeader { leader: None },
        };
        assert_eq!(reason(&encoded(Datagram::Reply(reply))), DropReason::Reply);
    }

    #[test]
    fn oversized_datagram_is_dropped_before_decoding() {
        // Valid JSON, but one byte too many.
        let mut bytes = encoded(Datagram::Peer(message(2, 1)));
        bytes.resize(MAX_DATAGRAM + 1, b' ');
        assert_eq!(reason(&bytes), DropReason::Oversized);
        // Exactly at the limit is fine.
        bytes.truncate(MAX_DATAGRAM);
        assert!(classify(&bytes, src(), 1, &peers()).is_ok());
        assert_eq!(reason(&vec![b'x'; RECV_BUFFER]), DropReason::Oversized);
    }

    #[test]
    fn garbage_is_dropped_without_panicking() {
        let good = encoded(Datagram::Peer(message(2, 1)));
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            b"null".to_vec(),
            b"{}".to_vec(),
            b"{\"Peer\":{}}".to_vec(),
            b"{\"Peer\":{\"from\":-1,\"to\":1,\"term\":1,\"body\":null}}".to_vec(),
            vec![0xff; 100],
            // A pickle's opening bytes: the original project's wire format, never ours.
            vec![0x80, 0x04, 0x95, 0x00],
        ];
        // Every prefix of a valid datagram, and every single-byte corruption of it.
        for n in 0..good.len() {
            cases.push(good[..n].to_vec());
            let mut flipped = good.clone();
            flipped[n] ^= 0x55;
            cases.push(flipped);
        }
        for bytes in cases {
            // Corruptions inside a number may still decode; all that matters is no panic and
            // that anything accepted passed the sender and recipient checks.
            match classify(&bytes, src(), 1, &peers()) {
                Ok(Inbound::Peer(m)) => assert!(peers().senders.contains(&m.from) && m.to == 1),
                Ok(Inbound::Client(..)) => {}
                Err(d) => assert_ne!(d.reason, DropReason::Oversized),
            }
        }
        assert_eq!(reason(b"not json"), DropReason::Malformed);
    }

    #[test]
    fn a_message_from_another_cluster_is_dropped_naming_both_clusters() {
        let ours = Accept {
            cluster: 0xaaaa,
            bootstrap: "bootstrapped with [1@h:1, 2@h:2, 3@h:3]".into(),
            ..peers()
        };
        let mut m = message(2, 1);
        m.cluster = 0xbbbb;
        let d = classify(&encoded(Datagram::Peer(m.clone())), src(), 1, &ours).unwrap_err();
        assert_eq!(d.reason, DropReason::WrongCluster);
        assert_eq!(d.reason.label(), "wrong_cluster");
        for part in [
            "000000000000aaaa",
            "000000000000bbbb",
            "different initial members or cluster names",
            "[1@h:1, 2@h:2, 3@h:3]",
        ] {
            assert!(d.detail.contains(part), "{part:?} not in {}", d.detail);
        }
        // Checked before the sender: a stranger from another cluster is named as such.
        m.from = 9;
        let d = classify(&encoded(Datagram::Peer(m.clone())), src(), 1, &ours).unwrap_err();
        assert_eq!(d.reason, DropReason::WrongCluster);
        m.from = 2;
        m.cluster = 0xaaaa;
        let got = classify(&encoded(Datagram::Peer(m.clone())), src(), 1, &ours);
        assert_eq!(got, Ok(Inbound::Peer(m.clone())));
        // A joining peer knows no cluster and no members yet: it takes any, from anyone.
        let joining = Accept {
            any_sender: true,
            ..Accept::default()
        };
        m.from = 9;
        m.cluster = 0xbbbb;
        let got = classify(&encoded(Datagram::Peer(m.clone())), src(), 1, &joining);
        assert_eq!(got, Ok(Inbound::Peer(m)));
        // Never a message claiming to be from ourselves.
        let d = classify(&encoded(Datagram::Peer(message(1, 1))), src(), 1, &joining);
        assert_eq!(d.unwrap_err().reason, DropReason::UnknownSender);
    }

    #[test]
    fn the_wrong_cluster_warning_is_rate_limited() {
        let t0 = Instant::now();
        let mut log = DropLog::new(Duration::from_secs(1));
        let d = dropped(DropReason::WrongCluster, "x".into());
        let line = log.note(t0, src(), &d).unwrap();
        assert!(line.contains("from another cluster"), "{line}");
        assert!(log.note(t0, src(), &d).is_none());
        let lines = log.flush(t0 + Duration::from_secs(1));
        assert_eq!(
            lines,
            ["dropped 1 more peer messages from other clusters since the last report"]
        );
    }

    #[test]
    fn rate_limiter_allows_one_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = RateLimiter::new(Duration::from_secs(1));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 + ms(1)), None);
        assert_eq!(r.allow(t0 + ms(500)), None);
        assert_eq!(r.allow(t0 + ms(999)), None);
        assert_eq!(r.allow(t0 + ms(1000)), Some(3));
        assert_eq!(r.allow(t0 + ms(1500)), None);
        // A flush before the interval reports nothing; after it, the suppressed count.
        assert_eq!(r.flush(t0 + ms(1999)), None);
        assert_eq!(r.flush(t0 + ms(2000)), Some(1));
        assert_eq!(r.flush(t0 + ms(5000)), None, "nothing left to report");
        // The flush counted as a report: the next event is allowed only after the interval.
        assert_eq!(r.allow(t0 + ms(2500)), None);
        assert_eq!(r.allow(t0 + ms(3000)), Some(1));
    }

    #[test]
    fn drop_log_limits_each_reason_separately() {
        let t0 = Instant::now();
        let mut log = DropLog::new(Duration::from_secs(1));
        let garbage = dropped(DropReason::Malformed, "x".into());
        let stranger = dropped(DropReason::UnknownSender, "y".into());
        assert!(log.note(t0, src(), &garbage).is_some());
        assert!(log.note(t0, src(), &stranger).is_some());
        for _ in 0..1000 {
            assert!(log.note(t0, src(), &garbage).is_none());
        }
        let line = log
            .note(t0 + Duration::from_secs(1), src(), &garbage)
            .unwrap();
        assert!(line.contains("and 1000 more"), "{line}");
        assert!(line.contains("malformed"), "{line}");
        assert!(log.note(t0, src(), &stranger).is_none());
        let lines = log.flush(t0 + Duration::from_secs(2));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(
            lines[0],
            "dropped 1 more peer messages from unknown nodes since the last report"
        );
    }

    fn config_for(port: u16, others: &[(NodeId, u16)]) -> PeerConfig {
        let mut c = PeerConfig::parse(
            r#"{"name":"peer1","node_ID":1,"host":"127.0.0.1","port":1,"other_peers":[]}"#,
        )
        .unwrap();
        c.port = port;
        c.other_peers = others
            .iter()
            .map(|&(node_id, port)| crate::config::PeerAddr {
                node_id,
                host: "127.0.0.1".into(),
                port,
            })
            .collect();
        c
    }

    fn free_socket() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    #[test]
    fn binding_a_port_in_use_says_so() {
        let taken = free_socket();
        let port = taken.local_addr().unwrap().port();
        let err = bind(&config_for(port, &[])).unwrap_err();
        assert_eq!(
            err,
            format!(
                "peer1: cannot bind 127.0.0.1:{port}: address in use (is another peer running?)"
            )
        );
    }

    #[test]
    fn peers_are_sent_to_their_configured_address_and_clients_to_their_source() {
        let peer2 = free_socket();
        let client = free_socket();
        let p2 = peer2.local_addr().unwrap().port();
        let (mut transport, _listener) = bind(&config_for(0, &[(2, p2)])).unwrap();
        let mut buf = vec![0; RECV_BUFFER];

        transport.send_peer(message(1, 2));
        let (n, _) = peer2.recv_from(&mut buf).unwrap();
        assert_eq!(
            Datagram::decode(&buf[..n]),
            Ok(Datagram::Peer(message(1, 2)))
        );

        // Unknown destinations and ourselves are refused without a panic.
        transport.send_peer(message(1, 9));
        transport.send_peer(message(1, 1));

        let reply = ClientReply {
            id: 5,
            from: 1,
            result: ClientResult::NotLeader { leader: Some(2) },
        };
        transport.send_reply(client.local_addr().unwrap(), reply.clone());
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(Datagram::decode(&buf[..n]), Ok(Datagram::Reply(reply)));
        assert_eq!(from, transport.local_addr().unwrap());
    }

    #[test]
    fn a_reply_too_large_for_a_datagram_becomes_a_refusal() {
        let client = free_socket();
        let (mut transport, _listener) = bind(&config_for(0, &[])).unwrap();
        let huge = ClientReply {
            id: 8,
            from: 1,
            result: ClientResult::Refused {
                reason: "x".repeat(MAX_DATAGRAM),
            },
        };
        transport.send_reply(client.local_addr().unwrap(), huge);
        let mut buf = vec![0; RECV_BUFFER];
        let (n, _) = client.recv_from(&mut buf).unwrap();
        match Datagram::decode(&buf[..n]) {
            Ok(Datagram::Reply(ClientReply {
                id: 8,
                result: ClientResult::Refused { reason },
                ..
            })) => assert!(reason.contains("exceeds"), "{reason}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A listener on its own thread with queues of the given capacities, which the test
    /// drains itself (or leaves full).
    struct Running {
        addr: SocketAddr,
        peers: crossbeam_channel::Receiver<Inbound>,
        clients: crossbeam_channel::Receiver<Inbound>,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<ReceiveStats>,
    }

    impl Running {
        fn start(
            others: &[(NodeId, u16)],
            peer_capacity: usize,
            client_capacity: usize,
        ) -> Running {
            let (_, running) =
                Running::start_config(&config_for(0, others), peer_capacity, client_capacity);
            running
        }

        /// A listener on its own thread for `config`; returns the send side too.
        fn start_config(
            config: &PeerConfig,
            peer_capacity: usize,
            client_capacity: usize,
        ) -> (Transport, Running) {
            let (transport, listener) = bind(config).unwrap();
            let (peers_tx, peers) = crossbeam_channel::bounded(peer_capacity);
            let (clients_tx, clients) = crossbeam_channel::bounded(client_capacity);
            let stop = Arc::new(AtomicBool::new(false));
            let queues = Queues {
                peers: peers_tx,
                clients: clients_tx,
            };
            let thread = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || listener.run(queues, stop))
            };
            let running = Running {
                addr: transport.local_addr().unwrap(),
                peers,
                clients,
                stop,
                thread,
            };
            (transport, running)
        }

        fn stop(self) -> ReceiveStats {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().unwrap()
        }
    }

    fn status_request(id: u64) -> Vec<u8> {
        encoded(Datagram::Request(ClientRequest {
            id,
            op: ClientOp::Status,
        }))
    }

    #[test]
    fn listener_delivers_only_accepted_datagrams_and_stops_on_request() {
        let peer2 = free_socket();
        let p2 = peer2.local_addr().unwrap().port();
        let r = Running::start(&[(2, p2)], 16, 16);
        peer2.send_to(b"garbage", r.addr).unwrap();
        peer2
            .send_to(&encoded(Datagram::Peer(message(3, 1))), r.addr)
            .unwrap(); // node 3 is not configured here
        peer2
            .send_to(&encoded(Datagram::Peer(message(2, 1))), r.addr)
            .unwrap();
        let got = r.peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, Inbound::Peer(message(2, 1)));
        assert!(r.peers.try_recv().is_err());
        assert!(r.clients.try_recv().is_err());
        let stats = r.stop();
        assert_eq!((stats.peer_messages, stats.rejected), (1, 2), "{stats:?}");
    }

    #[test]
    fn peer_messages_get_through_while_the_client_queue_is_full() {
        let peer2 = free_socket();
        let p2 = peer2.local_addr().unwrap().port();
        let r = Running::start(&[(2, p2)], 16, 4);
        // Nobody drains the client queue: 4 requests fill it, the next 96 must be shed, and
        // the peer messages sent among and after them must all arrive.
        let client = free_socket();
        for id in 0..100 {
            client.send_to(&status_request(id), r.addr).unwrap();
            if id % 25 == 0 {
                peer2
                    .send_to(&encoded(Datagram::Peer(message(2, 1))), r.addr)
                    .unwrap();
            }
        }
        peer2
            .send_to(&encoded(Datagram::Peer(message(2, 1))), r.addr)
            .unwrap();
        for n in 0..5 {
            let got = r.peers.recv_timeout(Duration::from_secs(5));
            assert_eq!(got, Ok(Inbound::Peer(message(2, 1))), "peer message {n}");
        }
        // Loopback keeps the order of the sends, so the last peer message was handled after
        // every request: the counts are final.
        let queued: Vec<Inbound> = r.clients.try_iter().collect();
        let stats = r.stop();
        assert_eq!(queued.len(), 4);
        assert_eq!(
            (
                stats.peer_messages,
                stats.client_requests,
                stats.clients_shed
            ),
            (5, 4, 96),
            "{stats:?}"
        );
        assert_eq!(stats.peers_dropped, 0);
    }

    #[test]
    fn a_full_peer_queue_drops_without_blocking_the_receiver() {
        let peer2 = free_socket();
        let p2 = peer2.local_addr().unwrap().port();
        let r = Running::start(&[(2, p2)], 2, 4);
        for _ in 0..5 {
            peer2
                .send_to(&encoded(Datagram::Peer(message(2, 1))), r.addr)
                .unwrap();
        }
        // The receiver is still reading: a client request sent after the flood is queued.
        let client = free_socket();
        client.send_to(&status_request(9), r.addr).unwrap();
        let got = r.clients.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(
            got,
            Inbound::Client(_, ClientRequest { id: 9, .. })
        ));
        let stats = r.stop();
        assert_eq!(
            (stats.peer_messages, stats.peers_dropped),
            (2, 3),
            "{stats:?}"
        );
    }

    #[test]
    fn the_shed_prefix_is_how_requests_are_encoded() {
        assert!(status_request(1).starts_with(REQUEST_PREFIX));
        assert!(!encoded(Datagram::Peer(message(2, 1))).starts_with(REQUEST_PREFIX));
        assert!(looks_like_request(&status_request(1)));
        let mut sealed = auth::with_room(&status_request(1));
        let keys = auth::Keys::random("test").unwrap();
        let header = auth::Header {
            kind: auth::Kind::Request,
            key_id: 0,
            sender: 1,
            sender_epoch: 1,
            recipient: 1,
            recipient_epoch: 1,
            counter: 1,
            sent: auth::now_micros(),
        };
        auth::seal(&keys, 0, &header, &mut sealed);
        assert!(looks_like_request(&sealed));
    }

    /// A config of node 1 whose peer 2 listens on `p2`, with a fresh secret file in a fresh
    /// directory (returned, to be removed).
    fn sealed_config(p2: u16) -> (PeerConfig, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "raft-transport-auth-{}-{}",
            std::process::id(),
            auth::fresh_epoch()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("cluster.key");
        auth::Secret::generate().unwrap().write(&key).unwrap();
        let mut config = config_for(0, &[(2, p2)]);
        config.secret_file = Some(key);
        (config, dir)
    }

    #[test]
    fn with_a_secret_only_sealed_datagrams_get_in_and_forgeries_get_no_answer() {
        let peer2 = free_socket();
        let p2 = peer2.local_addr().unwrap().port();
        let (config, dir) = sealed_config(p2);
        let (mut transport, r) = Running::start_config(&config, 16, 16);
        let mut buf = vec![0; RECV_BUFFER];
        // Node 2's side of the conversation, with the same secret.
        let keys = config.keys().unwrap().unwrap();
        let two = Arc::new(PeerAuth::new(Arc::clone(&keys), 2, [1]));
        let mut gate2 = Gate::new(Arc::clone(&two));

        // Plain JSON, as the original sends it, and the same sealed with a wrong key: dropped,
        // and never answered.
        let plain = encoded(Datagram::Peer(message(2, 1)));
        peer2.send_to(&plain, r.addr).unwrap();
        let wrong = auth::Keys::random(&config.cluster).unwrap();
        let forger = PeerAuth::new(Arc::new(wrong), 2, [1]);
        let mut sealed = auth::with_room(&plain);
        forger
            .seal_to_peer(1, &mut sealed, |b| {
                peer2.send_to(b, r.addr).unwrap();
            })
            .unwrap();

        // Sealed with the secret: node 2 does not know node 1's epoch yet, so node 1 answers
        // with a notice (to node 2's configured address), and node 2 resends.
        let mut sealed = auth::with_room(&plain);
        two.seal_to_peer(1, &mut sealed, |b| {
            peer2.send_to(b, r.addr).unwrap();
        })
        .unwrap();
        let (n, _) = peer2.recv_from(&mut buf).unwrap();
        let now = Instant::now();
        assert_eq!(
            gate2.admit(&buf[..n], r.addr, now),
            Ok(Admitted::Notice { from: 1 }),
            "the first answer is the notice: the forgeries got nothing"
        );
        for (dest, bytes) in gate2.take_outgoing() {
            assert_eq!(dest, Dest::Peer(1));
            peer2.send_to(&bytes, r.addr).unwrap();
        }
        let got = r.peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, Inbound::Peer(message(2, 1)));

        // Node 1 seals what it sends; node 2 opens it.
        transport.send_peer(message(1, 2));
        let (n, _) = peer2.recv_from(&mut buf).unwrap();
        match gate2.admit(&buf[..n], r.addr, Instant::now()) {
            Ok(Admitted::Peer { from: 1, body }) => {
                assert_eq!(Datagram::decode(body), Ok(Datagram::Peer(message(1, 2))))
            }
            other => panic!("{other:?}"),
        }
        // A reply to a client that never sent an authenticated request is not sent at all.
        let client = free_socket();
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        transport.send_reply(
            client.local_addr().unwrap(),
            ClientReply {
                id: 1,
                from: 1,
                result: ClientResult::NotLeader { leader: None },
            },
        );
        assert!(client.recv_from(&mut buf).is_err());

        let stats = r.stop();
        assert_eq!(
            (stats.peer_messages, stats.rejected, stats.handshakes),
            (1, 2, 1),
            "plain and wrong key rejected, the first sealed one a handshake: {stats:?}"
        );
        assert!(peer2
            .set_read_timeout(Some(Duration::from_millis(100)))
            .is_ok());
        assert!(peer2.recv_from(&mut buf).is_err(), "nothing else came back");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_a_secret_a_sealed_datagram_is_dropped_as_malformed() {
        let keys = auth::Keys::random("raft").unwrap();
        let mut sealed = auth::with_room(&encoded(Datagram::Peer(message(2, 1))));
        let header = auth::Header {
            kind: auth::Kind::Peer,
            key_id: 0,
            sender: 2,
            sender_epoch: 1,
            recipient: 1,
            recipient_epoch: 0,
            counter: 1,
            sent: auth::now_micros(),
        };
        auth::seal(&keys, 0, &header, &mut sealed);
        assert_eq!(reason(&sealed), DropReason::Malformed);
    }
}
