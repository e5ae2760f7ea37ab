//! The client library: finds the leader, retries within one deadline, and keeps appends
//! exactly-once by reusing the same `(client, seq)` on every retry.
//!
//! Each operation has one overall deadline (the client's `timeout`). Within it the client
//! sends to the peer it believes is the leader, or else to the peers in turn; it waits 50 ms
//! for an answer, doubling up to 500 ms per attempt, never past the deadline. A
//! `NotLeader { leader: Some(id) }` answer is followed at once; `NotLeader { leader: None }`
//! moves on to the next peer after a short pause. Every attempt carries a fresh request `id`;
//! answers to other operations are stale and ignored.
//!
//! Outcomes: `Ok` and [`ClientError::Refused`] are definite. [`ClientError::Timeout`] means no
//! answer arrived in time, so an append may or may not have been committed. After such an
//! unknown outcome, appending the same data again reuses the same `seq`, so the server applies
//! it at most once; appending different data takes a fresh `seq`, so it can never be mistaken
//! for the earlier one.
//!
//! `(client, seq)` is only as unique as the client ID, so IDs are drawn from the operating
//! system's randomness: two clients started at the same instant, even with the same PID in two
//! containers, draw the same ID with probability 2^-64.
//!
//! The cluster's membership can change (Raft thesis ch. 4), so the peers a client knows are an
//! address book, seeded with the peers it was made with. A client that follows the cluster
//! ([`Client::from_config`], or [`Client::follow_cluster`]) adds to it from every membership
//! answer (`members`, `status`, a committed change), so a config naming one current member is
//! enough: a redirect to a leader whose address it lacks makes it ask the redirecting peer for
//! the members first. Peers outside the newest configuration it has seen (removed ones, which
//! stop answering) leave its round robin but stay reachable by redirect. Membership changes
//! answered `Busy` are retried until the deadline ([`Client::change_members`]); one the leader
//! refuses because too few of the new voters are live (the quorum guard) can be forced.
//!
//! With the cluster's keys ([`Client::from_config`] reads them from the config's
//! `secret_file`), every request is sealed for the peer it goes to and every reply must be
//! sealed by a configured peer *to this client's session* ([`crate::auth`]); anything else,
//! including a forged or replayed reply, is dropped before it is decoded, and the request ID
//! inside it must still match an attempt of the current operation. A peer's first answer may
//! be a notice of its epoch (it restarted, or we are new to it): the request is then resent at
//! once. A client whose key the peers do not hold hears nothing; its timeout says that a key
//! mismatch is the likely cause.

mod users;
pub use users::UserRemoved;

use crate::auth::{self, ClientAuth, Credential, FromPeer, Keys};
use crate::config::PeerConfig;
use crate::raft::guard;
use crate::raft::rng::splitmix64;
use crate::raft::{
    check_entry_data, ClientId, ClientOp, ClientReply, ClientRequest, ClientResult, ConfChange,
    Datagram, Index, LogRecord, Member, MemberInfo, NodeId, StatusInfo, Term, UserOp, MAX_DATAGRAM,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The first per-attempt wait; doubled after every attempt without an answer.
pub const FIRST_WAIT: Duration = Duration::from_millis(50);
/// The longest per-attempt wait.
pub const MAX_WAIT: Duration = Duration::from_millis(500);
/// The longest [`Client::status`] waits for answers, whatever the client's timeout.
pub const STATUS_WAIT: Duration = Duration::from_secs(1);
/// Resends of one attempt after a peer's notice of its epoch (normally one is needed).
const MAX_RESENDS: u32 = 3;
/// The first pause before retrying a membership change answered `Busy`; doubled up to
/// [`MAX_WAIT`].
pub const BUSY_PAUSE: Duration = Duration::from_millis(50);
/// A `Busy` change is retried only while more than this is left of the deadline, and the
/// pause before it leaves this much: a last attempt cut short by the deadline would leave its
/// outcome unknown, where giving up after a `Busy` answer is a definite "nothing changed".
pub const BUSY_MARGIN: Duration = Duration::from_millis(200);

/// Why an operation did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// A definite refusal: the request was not and will not be carried out as sent.
    Refused(String),
    /// No answer within the deadline: the outcome is unknown.
    Timeout(String),
    /// A local socket error, or a peer broke the protocol.
    Io(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Refused(reason) => write!(f, "refused: {reason}"),
            ClientError::Timeout(what) => write!(f, "{what}"),
            ClientError::Io(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// Whether this is the leader's quorum guard refusing a membership change (too few of the
    /// new configuration's voters heard from lately): forcing it may be offered.
    pub fn is_guard_refusal(&self) -> bool {
        matches!(self, ClientError::Refused(reason) if guard::is_guard_refusal(reason))
    }
}

/// A committed append: where it landed, and which peer said so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub index: Index,
    pub term: Term,
    pub peer: NodeId,
}

/// One peer's answer to [`Client::status`]; `info` is `None` when it did not answer in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: NodeId,
    pub address: SocketAddr,
    pub answered: bool,
    pub info: Option<StatusInfo>,
}

/// A committed membership change ([`Client::change_members`]): the configuration entry's index
/// and term, the configuration it made, and the peer (the leader) that said so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configured {
    pub index: Index,
    pub term: Term,
    pub members: Vec<Member>,
    pub peer: NodeId,
}

/// The configuration as the leader sees it ([`Client::members`]): every member with its match
/// index and lag behind the leader's last index (absent for a member it has no progress for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    pub leader: NodeId,
    /// The index of the configuration's entry; 0 for the bootstrap configuration.
    pub config_index: Index,
    /// Whether that entry is known committed on the leader.
    pub committed: bool,
    pub members: Vec<MemberInfo>,
}

/// An append whose outcome is unknown (it timed out); retried with the same `seq` if the
/// caller appends the same data again.
#[derive(Clone, Debug)]
struct Pending {
    seq: u64,
    data: String,
}

/// A synchronous client of one cluster, over one UDP socket.
pub struct Client {
    socket: UdpSocket,
    /// The address book: every peer this client can send to. Seeded by its maker; when
    /// following, grown and corrected from membership answers, never shrunk.
    peers: BTreeMap<NodeId, SocketAddr>,
    /// The peers' IDs in round-robin order: those of `current` when known, else all of
    /// `peers`. Never empty.
    order: Vec<NodeId>,
    /// Whether to learn the cluster's members from its answers ([`Client::follow_cluster`]).
    follow: bool,
    /// The newest configuration seen while following: its entry's index and member IDs.
    current: Option<(Index, BTreeSet<NodeId>)>,
    /// Position in `order` of the next peer to try when the leader is unknown.
    cursor: usize,
    timeout: Duration,
    client_id: ClientId,
    /// The `seq` the next new append takes. Starts at 1.
    next_seq: u64,
    pending: Option<Pending>,
    leader: Option<NodeId>,
    /// The `id` the next request datagram takes.
    next_request_id: u64,
    /// The peer that gave the last successful answer.
    last_peer: Option<NodeId>,
    buf: Vec<u8>,
    /// Sealing and opening with the cluster's keys; `None`: plain JSON datagrams.
    auth: Option<ClientAuth>,
    /// Reused for every request sent.
    out: Vec<u8>,
    /// Whether any peer has answered this client (authentically) since it was made.
    heard_any: bool,
    /// The user and credential file this client seals with, for its errors; `None`: the
    /// operator's keys (or none).
    user: Option<String>,
}

/// What [`Client::recv_until`] hands back.
enum Incoming {
    Reply(ClientReply),
    /// Peer `id` told us its epoch: resend to it what it dropped.
    Notice(NodeId),
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.client_id)
            .field("next_seq", &self.next_seq)
            .field("leader", &self.leader)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the cluster a peer config describes: every peer's address, and the keys
    /// of its `secret_file`, if any. It follows the cluster ([`Client::follow_cluster`]), so
    /// the config needs to name only one current member. Errors (an unreadable or unsafe secret file, say) name the
    /// config and the file.
    pub fn from_config(config: &PeerConfig, timeout: Duration) -> Result<Client, String> {
        let peers = config.addresses()?;
        let keys = config.keys()?;
        let mut client = Client::with_keys(peers, timeout, keys).map_err(|e| e.to_string())?;
        client.follow_cluster(true);
        Ok(client)
    }

    /// A client of the cluster a peer config describes that authenticates as the user of
    /// `credential` (read from `file`): its key seals the requests, and the peers allow what
    /// the user's role allows. The config's `secret_file` is not read.
    pub fn from_credential(
        config: &PeerConfig,
        timeout: Duration,
        credential: &Credential,
        file: &std::path::Path,
    ) -> Result<Client, String> {
        let peers = config.addresses()?;
        let keys = Some(Arc::new(Keys::for_user(credential)));
        let mut client = Client::with_keys(peers, timeout, keys).map_err(|e| e.to_string())?;
        client.follow_cluster(true);
        client.user = Some(format!(
            "user {} (credential file {})",
            credential.user,
            file.display()
        ));
        Ok(client)
    }

    /// Binds an ephemeral UDP socket (on loopback if every peer is on loopback) and picks a
    /// random client ID. `timeout` is the deadline of each operation. Datagrams are plain
    /// JSON; [`Client::with_keys`] or [`Client::from_config`] make an authenticated client.
    pub fn new(
        peers: BTreeMap<NodeId, SocketAddr>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Client::with_keys(peers, timeout, None)
    }

    /// Like [`Client::new`], sealing requests with `keys` (and taking only replies sealed to
    /// this client) when given.
    pub fn with_keys(
        peers: BTreeMap<NodeId, SocketAddr>,
        timeout: Duration,
        keys: Option<Arc<Keys>>,
    ) -> Result<Client, ClientError> {
        if peers.is_empty() {
            return Err(ClientError::Io("no peers to contact".into()));
        }
        let all_v6 = peers.values().all(|a| a.is_ipv6());
        let all_loopback = peers.values().all(|a| a.ip().is_loopback());
        let local: SocketAddr = match (all_v6, all_loopback) {
            (false, true) => (Ipv4Addr::LOCALHOST, 0).into(),
            (false, false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            (true, true) => (Ipv6Addr::LOCALHOST, 0).into(),
            (true, false) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)
            .map_err(|e| ClientError::Io(format!("cannot bind a UDP socket on {local}: {e}")))?;
        let order = peers.keys().copied().collect();
        let auth = match keys {
            Some(keys) => {
                Some(ClientAuth::new(keys, peers.keys().copied()).map_err(ClientError::Io)?)
            }
            None => None,
        };
        Ok(Client {
            socket,
            peers,
            order,
            follow: false,
            current: None,
            cursor: 0,
            timeout,
            client_id: os_random_u64()?,
            next_seq: 1,
            pending: None,
            leader: None,
            // Random, so that answers meant for an earlier process on the same port never match.
            next_request_id: os_random_u64()? >> 1,
            last_peer: None,
            buf: vec![0; MAX_DATAGRAM + auth::OVERHEAD + 1],
            auth,
            out: Vec::new(),
            heard_any: false,
            user: None,
        })
    }

    /// Whether to learn peers from the cluster's membership answers (off for [`Client::new`]
    /// and [`Client::with_keys`], on for [`Client::from_config`]). Off, the client talks only
    /// to the peers it was made with, so one made with a single peer is pinned to it.
    pub fn follow_cluster(&mut self, follow: bool) {
        self.follow = follow;
    }

    /// The deadline of each operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the deadline of each operation from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Every peer this client can send to, by ID: the address book (see [`Client::follow_cluster`]).
    pub fn peers(&self) -> &BTreeMap<NodeId, SocketAddr> {
        &self.peers
    }

    /// Whether this client seals its requests (it has the cluster's keys).
    pub fn authenticated(&self) -> bool {
        self.auth.is_some()
    }

    /// This client's identity for exactly-once appends.
    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// The `seq` the next new append will carry.
    pub fn next_seq(&self) -> u64 {
        self.pending.as_ref().map_or(self.next_seq, |p| p.seq)
    }

    /// The peer this client currently believes is the leader.
    pub fn leader_hint(&self) -> Option<NodeId> {
        self.leader
    }

    /// The peer that gave the last successful answer (for a query: the last page's).
    pub fn last_peer(&self) -> Option<NodeId> {
        self.last_peer
    }

    /// The local address of this client's socket.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.socket
            .local_addr()
            .map_err(|e| ClientError::Io(format!("local address: {e}")))
    }

    /// Appends `data` to the replicated log, exactly once however often it is retried.
    /// Oversized data is refused without sending anything.
    pub fn append(&mut self, data: &str) -> Result<Appended, ClientError> {
        check_entry_data(data).map_err(ClientError::Refused)?;
        let seq = match &self.pending {
            Some(p) if p.data == data => p.seq,
            _ => {
                // A different append: the unknown one keeps its seq, this one takes a new one.
                if self.pending.take().is_some() {
                    self.next_seq += 1;
                }
                self.next_seq
            }
        };
        let op = ClientOp::Append {
            client: self.client_id,
            seq,
            data: data.to_string(),
        };
        let deadline = Instant::now() + self.timeout;
        match self.call(&op, deadline) {
            Ok((peer, ClientResult::Appended { index, term })) => {
                self.pending = None;
                self.next_seq = seq + 1;
                Ok(Appended { index, term, peer })
            }
            Ok((peer, other)) => unreachable!("filtered reply {other:?} from peer {peer}"),
            Err(ClientError::Refused(reason)) => {
                self.pending = None;
                self.next_seq = seq + 1;
                Err(ClientError::Refused(reason))
            }
            Err(e) => {
                self.pending = Some(Pending {
                    seq,
                    data: data.to_string(),
                });
                Err(match e {
                    ClientError::Timeout(what) => {
                        ClientError::Timeout(format!("{what} (outcome unknown)"))
                    }
                    other => other,
                })
            }
        }
    }

    /// Reads the whole committed log, linearizably: the first page fixes a read index, later
    /// pages (from whichever peer is leader then) pass it back. One deadline covers all pages.
    pub fn query(&mut self) -> Result<Vec<LogRecord>, ClientError> {
        self.query_from(1, None)
    }

    /// Reads committed entries `start, start + 1, …`, at most `limit` of them (`None`: all up to
    /// the read index), linearizably: the first page is a ReadIndex read that fixes the read
    /// index, later pages pass it back. The entries returned have consecutive indices from
    /// `start`; none if `start` is past the read index. One deadline covers all pages.
    /// `start` 0 is refused, and `limit` 0 answered empty, without sending anything.
    pub fn query_from(
        &mut self,
        start: Index,
        limit: Option<usize>,
    ) -> Result<Vec<LogRecord>, ClientError> {
        if start == 0 {
            return Err(ClientError::Refused(
                "query from index 0: log indices start at 1".into(),
            ));
        }
        let deadline = Instant::now() + self.timeout;
        let limit = limit.unwrap_or(usize::MAX);
        let mut records: Vec<LogRecord> = Vec::new();
        let mut start = start;
        let mut read_index: Option<Index> = None;
        while records.len() < limit {
            let op = ClientOp::Query { start, read_index };
            let (peer, result) = self.call(&op, deadline)?;
            let ClientResult::Entries {
                entries,
                read_index: page_read_index,
                next,
            } = result
            else {
                unreachable!("filtered reply {result:?} from peer {peer}");
            };
            if let Some(fixed) = read_index {
                if page_read_index != fixed {
                    return Err(ClientError::Io(format!(
                        "peer {peer} answered for read index {page_read_index}, not {fixed}"
                    )));
                }
            }
            for (i, e) in entries.iter().enumerate() {
                let want = start + i as Index;
                if e.index != want || e.index > page_read_index {
                    return Err(ClientError::Io(format!(
                        "peer {peer} sent entry {} where entry {want} (at most {page_read_index}) was due",
                        e.index
                    )));
                }
            }
            let page_end = start + entries.len() as Index;
            let room = limit - records.len();
            records.extend(entries.into_iter().take(room));
            match next {
                None => break,
                Some(n) if n == page_end && n > start && n <= page_read_index => {
                    start = n;
                    read_index = Some(page_read_index);
                }
                Some(n) => {
                    return Err(ClientError::Io(format!(
                        "peer {peer} sent entries {start}..{page_end} with next {n} (read index {page_read_index})"
                    )))
                }
            }
        }
        Ok(records)
    }

    /// Hands leadership to `target`, or to the most up-to-date voter (Raft thesis §3.10), and
    /// returns the new leader and its term once it leads. Without a target, the leader seen
    /// first is named as the one to move away from, so a retry that reaches the new leader
    /// does not move leadership again.
    pub fn transfer_leader(
        &mut self,
        target: Option<NodeId>,
    ) -> Result<(NodeId, Term), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let away_from = match target {
            Some(_) => None,
            None => {
                self.status();
                self.leader
            }
        };
        let op = ClientOp::TransferLeader { target, away_from };
        match self.call(&op, deadline)? {
            (_, ClientResult::Transferred { leader, term }) => {
                if self.peers.contains_key(&leader) {
                    self.leader = Some(leader);
                }
                Ok((leader, term))
            }
            (peer, other) => unreachable!("filtered reply {other:?} from peer {peer}"),
        }
    }

    /// The configuration as the leader sees it, with each member's match index and lag. Any
    /// peer answers with its own view; a follower's names the leader, which is asked next (its
    /// address learned from that answer when following). `Timeout` if no leader answered by
    /// the deadline; it then says which view it had.
    pub fn members(&mut self) -> Result<Members, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut seen: Option<String> = None;
        loop {
            let (peer, result) = match self.call(&ClientOp::Members, deadline) {
                Ok(answer) => answer,
                Err(ClientError::Timeout(what)) => {
                    return Err(ClientError::Timeout(match seen {
                        Some(view) => format!("{what} from the leader; {view}"),
                        None => what,
                    }))
                }
                Err(e) => return Err(e),
            };
            let ClientResult::Members {
                leader,
                config_index,
                committed,
                members,
            } = result
            else {
                unreachable!("filtered reply {result:?} from peer {peer}");
            };
            let from_leader = leader == Some(peer);
            self.learn(
                config_index,
                committed || from_leader,
                members.iter().map(|m| (m.id, m.address.as_str())),
            );
            if from_leader {
                // Only a peer we have an address for (a reply may name any ID).
                if self.peers.contains_key(&peer) {
                    self.leader = Some(peer);
                }
                return Ok(Members {
                    leader: peer,
                    config_index,
                    committed,
                    members,
                });
            }
            let ids: Vec<String> = members.iter().map(|m| m.id.to_string()).collect();
            seen = Some(format!(
                "the last view was peer {peer}'s: members [{}] at config index {config_index}, leader {}",
                ids.join(", "),
                leader.map_or("unknown".to_string(), |l| l.to_string())
            ));
            match leader {
                Some(l) if l != peer && self.peers.contains_key(&l) => self.leader = Some(l),
                _ => {
                    self.forget_leader(peer);
                    pause_until(short_pause(), deadline);
                }
            }
        }
    }

    /// Changes the membership by one server (Raft thesis §4.2) and returns once the change is
    /// committed. `Busy` answers (a learner still catching up, a new leader yet to commit in
    /// its term) are retried until the deadline; if the last answer was still `Busy`, the
    /// result is `Refused` with its reason (nothing was changed). A change already in effect
    /// is answered as done, so retrying after a `Timeout` (outcome unknown) is safe.
    ///
    /// The leader refuses a change after which fewer than a majority of the new
    /// configuration's voters would be ones it has heard from lately (the quorum guard; such a
    /// refusal is told apart by [`ClientError::is_guard_refusal`]); `force` skips that check, and only it.
    pub fn change_members(
        &mut self,
        change: ConfChange,
        force: bool,
    ) -> Result<Configured, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let op = ClientOp::ChangeMembers { change, force };
        let mut pause = BUSY_PAUSE;
        loop {
            match self.call(&op, deadline) {
                Ok((
                    peer,
                    ClientResult::Configured {
                        index,
                        term,
                        members,
                    },
                )) => {
                    self.learn(
                        index,
                        true,
                        members.iter().map(|m| (m.id, m.address.as_str())),
                    );
                    return Ok(Configured {
                        index,
                        term,
                        members,
                        peer,
                    });
                }
                Ok((peer, ClientResult::Busy { reason })) => {
                    log::debug!("peer {peer} is busy: {reason}");
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left <= BUSY_MARGIN {
                        return Err(ClientError::Refused(format!(
                            "not done within {} ms, nothing changed; peer {peer} answered: {reason}",
                            self.timeout.as_millis()
                        )));
                    }
                    std::thread::sleep(pause.min(left - BUSY_MARGIN));
                    pause = (pause * 2).min(MAX_WAIT);
                }
                Ok((peer, other)) => unreachable!("filtered reply {other:?} from peer {peer}"),
                Err(ClientError::Timeout(what)) => {
                    return Err(ClientError::Timeout(format!("{what} (outcome unknown)")))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks every peer for its status once, in parallel, and waits up to
    /// min(timeout, [`STATUS_WAIT`]) for the answers. One entry per peer, in ID order.
    pub fn status(&mut self) -> Vec<PeerStatus> {
        let deadline = Instant::now() + self.timeout.min(STATUS_WAIT);
        let mut by_request: BTreeMap<u64, NodeId> = BTreeMap::new();
        let mut infos: BTreeMap<NodeId, StatusInfo> = BTreeMap::new();
        let mut resends: BTreeMap<NodeId, u32> = BTreeMap::new();
        let peers: Vec<(NodeId, SocketAddr)> = self.peers.iter().map(|(&i, &a)| (i, a)).collect();
        for &(id, _) in &peers {
            let request_id = self.fresh_request_id();
            if self.send(request_id, &ClientOp::Status, id).is_ok() {
                by_request.insert(request_id, id);
            }
        }
        while infos.len() < by_request.len() {
            let reply = match self.recv_until(deadline) {
                None => break,
                Some(Incoming::Reply(reply)) => reply,
                Some(Incoming::Notice(peer)) => {
                    let n = resends.entry(peer).or_default();
                    let asked = by_request.iter().find(|(_, &p)| p == peer);
                    if let (true, Some((&request_id, _))) = (*n < MAX_RESENDS, asked) {
                        *n += 1;
                        let _ = self.send(request_id, &ClientOp::Status, peer);
                    }
                    continue;
                }
            };
            let Some(&peer) = by_request.get(&reply.id) else {
                continue;
            };
            if let ClientResult::Status(info) = reply.result {
                self.learn(
                    info.config_index,
                    info.role == crate::raft::Role::Leader,
                    info.members.iter().map(|m| (m.id, m.address.as_str())),
                );
                infos.insert(peer, info);
                // Members just learned are asked in this same round.
                let asked: BTreeSet<NodeId> = by_request.values().copied().collect();
                let new: Vec<NodeId> = self
                    .peers
                    .keys()
                    .copied()
                    .filter(|id| !asked.contains(id))
                    .collect();
                for id in new {
                    let request_id = self.fresh_request_id();
                    if self.send(request_id, &ClientOp::Status, id).is_ok() {
                        by_request.insert(request_id, id);
                    }
                }
            }
        }
        let peers: Vec<(NodeId, SocketAddr)> = self.peers.iter().map(|(&i, &a)| (i, a)).collect();
        if let Some(auth) = &mut self.auth {
            for &(id, _) in &peers {
                if !infos.contains_key(&id) {
                    auth.forget(id);
                }
            }
        }
        let leaders: Vec<NodeId> = infos
            .values()
            .filter(|i| i.role == crate::raft::Role::Leader)
            .map(|i| i.id)
            .collect();
        if let [only] = leaders[..] {
            if self.peers.contains_key(&only) {
                self.leader = Some(only);
            }
        }
        peers
            .into_iter()
            .map(|(id, address)| {
                let info = infos.remove(&id);
                PeerStatus {
                    id,
                    address,
                    answered: info.is_some(),
                    info,
                }
            })
            .collect()
    }

    /// Sends `op` until a peer gives an answer that fits it, or the deadline passes.
    /// Returns the answering peer and its answer; a `Refused` answer becomes an error.
    ///
    /// Every attempt has a fresh request ID. A definite answer to an earlier attempt of this
    /// same operation is as good as one to the latest (it answers the very same request);
    /// a `NotLeader` answer counts only for the latest attempt; anything else is stale.
    pub(crate) fn call(
        &mut self,
        op: &ClientOp,
        deadline: Instant,
    ) -> Result<(NodeId, ClientResult), ClientError> {
        let mut wait = FIRST_WAIT;
        // Redirects followed in a row without pausing; bounded so that two peers naming each
        // other cannot make us spin.
        let mut redirects = 0;
        let first_id = self.next_request_id;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(format!(
                    "no answer within {} ms{}",
                    self.timeout.as_millis(),
                    self.silence_hint()
                )));
            }
            let target = self.pick_target();
            let addr = self.peers[&target];
            let request_id = self.fresh_request_id();
            let mut resends = 0;
            match self.send(request_id, op, target) {
                Ok(()) => {}
                Err(ClientError::Io(e)) => {
                    // One unreachable peer is no reason to give up on the others.
                    log::debug!("peer {target}: {e}");
                    self.forget_leader(target);
                    pause_until(short_pause(), deadline);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let attempt_deadline = (now + wait).min(deadline);
            let answer = loop {
                let reply = match self.recv_until(attempt_deadline) {
                    None => break None,
                    Some(Incoming::Reply(reply)) => reply,
                    Some(Incoming::Notice(peer)) => {
                        // The peer dropped the request (it did not know this session, or we
                        // did not know its epoch) and told us why: send it again, now sealed
                        // for its epoch.
                        if peer == target && resends < MAX_RESENDS {
                            resends += 1;
                            let _ = self.send(request_id, op, target);
                        }
                        continue;
                    }
                };
                let latest = reply.id == request_id;
                let earlier = reply.id.wrapping_sub(first_id) < request_id.wrapping_sub(first_id);
                let definite = !matches!(reply.result, ClientResult::NotLeader { .. });
                if !(latest || (earlier && definite)) {
                    log::debug!("ignoring stale reply {} from peer {}", reply.id, reply.from);
                    continue;
                }
                if !fits(op, &reply.result) {
                    log::warn!(
                        "ignoring reply from peer {} that does not answer {op:?}: {:?}",
                        reply.from,
                        reply.result
                    );
                    continue;
                }
                break Some(reply);
            };
            let Some(reply) = answer else {
                log::debug!("no answer from peer {target} at {addr} within {wait:?}");
                self.forget_leader(target);
                if let Some(auth) = &mut self.auth {
                    // It may have restarted, or with other keys: start over with it.
                    auth.forget(target);
                }
                wait = (wait * 2).min(MAX_WAIT);
                continue;
            };
            if let ClientResult::NotLeader { leader: Some(l) } = reply.result {
                if self.follow && l != target && !self.peers.contains_key(&l) {
                    log::debug!(
                        "peer {target} redirects to peer {l}, whose address is unknown: asking peer {target} for the members"
                    );
                    self.discover(target, wait, deadline);
                }
            }
            match reply.result {
                ClientResult::NotLeader { leader: Some(l) }
                    if l != target && self.peers.contains_key(&l) =>
                {
                    log::debug!("peer {target} redirects to peer {l}");
                    self.leader = Some(l);
                    redirects += 1;
                    if redirects > self.peers.len() {
                        redirects = 0;
                        pause_until(short_pause(), deadline);
                    }
                }
                ClientResult::NotLeader { leader } => {
                    log::debug!("peer {target} is not the leader (hint {leader:?})");
                    self.forget_leader(target);
                    redirects = 0;
                    pause_until(short_pause(), deadline);
                }
                ClientResult::Refused { reason } => {
                    self.last_peer = Some(reply.from);
                    return Err(ClientError::Refused(reason));
                }
                result => {
                    // Only the leader answers appends, queries, transfers and membership
                    // changes; any peer answers `Members`.
                    let any_peer = matches!(result, ClientResult::Members { .. });
                    if !any_peer && self.peers.contains_key(&reply.from) {
                        self.leader = Some(reply.from);
                    }
                    self.last_peer = Some(reply.from);
                    return Ok((reply.from, result));
                }
            }
        }
    }

    /// Asks peer `from`, which has just answered, for the members, to learn addresses (of a
    /// leader it named); waits at most `wait`, not past `deadline`. Whether it answered.
    fn discover(&mut self, from: NodeId, wait: Duration, deadline: Instant) -> bool {
        let op = ClientOp::Members;
        let request_id = self.fresh_request_id();
        if self.send(request_id, &op, from).is_err() {
            return false;
        }
        let until = (Instant::now() + wait).min(deadline);
        let mut resends = 0;
        loop {
            match self.recv_until(until) {
                None => return false,
                Some(Incoming::Notice(peer)) => {
                    if peer == from && resends < MAX_RESENDS {
                        resends += 1;
                        let _ = self.send(request_id, &op, from);
                    }
                }
                Some(Incoming::Reply(reply)) if reply.id == request_id => {
                    let ClientResult::Members {
                        leader,
                        config_index,
                        committed,
                        members,
                    } = reply.result
                    else {
                        return false;
                    };
                    self.learn(
                        config_index,
                        committed || leader == Some(reply.from),
                        members.iter().map(|m| (m.id, m.address.as_str())),
                    );
                    return true;
                }
                Some(Incoming::Reply(reply)) => {
                    log::debug!("ignoring reply {} from peer {}", reply.id, reply.from)
                }
            }
        }
    }

    /// Takes a configuration a peer reported (`config_index` its entry; `authoritative` if it
    /// is the leader's or committed): adds or corrects members' addresses, and if it is the
    /// newest seen, its members become the round robin. Nothing unless following.
    fn learn<'a>(
        &mut self,
        config_index: Index,
        authoritative: bool,
        members: impl IntoIterator<Item = (NodeId, &'a str)>,
    ) {
        if !self.follow {
            return;
        }
        let mut ids = BTreeSet::new();
        for (id, address) in members {
            ids.insert(id);
            if address.is_empty() {
                continue;
            }
            match crate::config::resolve_address(address) {
                Ok(addr) => {
                    if self.peers.insert(id, addr) != Some(addr) {
                        log::debug!("peer {id} is at {addr} ({address})");
                    }
                }
                Err(e) => log::debug!("member {id}: {e}"),
            }
        }
        if ids.is_empty() {
            return;
        }
        let newer = self
            .current
            .as_ref()
            .is_none_or(|(seen, _)| config_index >= *seen || authoritative);
        if newer {
            self.current = Some((config_index, ids));
        }
        let mut order: Vec<NodeId> = self.current.as_ref().map_or(Vec::new(), |(_, ids)| {
            ids.iter()
                .copied()
                .filter(|id| self.peers.contains_key(id))
                .collect()
        });
        if order.is_empty() {
            order = self.peers.keys().copied().collect();
        }
        // The round robin goes on from the peer it would have tried next.
        let next = self.order[self.cursor % self.order.len()];
        self.cursor = order.iter().position(|&p| p >= next).unwrap_or(0);
        self.order = order;
    }

    /// The known leader, or else the next peer in round-robin order.
    fn pick_target(&mut self) -> NodeId {
        if let Some(l) = self.leader.filter(|l| self.peers.contains_key(l)) {
            return l;
        }
        let id = self.order[self.cursor % self.order.len()];
        self.cursor = (self.cursor + 1) % self.order.len();
        id
    }

    /// `id` did not answer as leader: stop preferring it, and make the round robin continue
    /// after it rather than start over.
    fn forget_leader(&mut self, id: NodeId) {
        if self.leader == Some(id) {
            self.leader = None;
            if let Some(pos) = self.order.iter().position(|&p| p == id) {
                self.cursor = (pos + 1) % self.order.len();
            }
        }
    }

    fn fresh_request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        id
    }

    /// What a timeout adds when no peer has ever answered this client: the likely causes.
    fn silence_hint(&self) -> String {
        if self.heard_any {
            return String::new();
        }
        if let Some(user) = &self.user {
            format!("; no peer has answered this client at all: if the peers are running, they do not accept {user}: the user is unknown or was removed, or its key is wrong (peers drop such requests without answering)")
        } else if self.auth.is_some() {
            "; no peer has answered this client at all: if the peers are running, a key mismatch is the likely cause (this config's secret_file or cluster name differs from the peers'; a peer silently drops what is sealed with a key it does not hold)".to_string()
        } else {
            "; no peer has answered this client at all: are the peers running? If they have a secret_file, this client's config must name it too".to_string()
        }
    }

    /// Sends request `id` for `op` to peer `to`: sealed for it with the cluster's keys if this
    /// client has them (one datagram per key while `to`'s epoch is unknown), plain JSON if not.
    fn send(&mut self, id: u64, op: &ClientOp, to: NodeId) -> Result<(), ClientError> {
        let addr = self.peers[&to];
        let datagram = Datagram::Request(ClientRequest { id, op: op.clone() });
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        if self.auth.is_some() {
            out.resize(auth::HEADER_LEN, 0);
        }
        let room = out.len();
        serde_json::to_writer(&mut out, &datagram)
            .map_err(|e| ClientError::Refused(format!("encode: {e}")))?;
        if out.len() - room > MAX_DATAGRAM {
            return Err(ClientError::Refused(format!(
                "datagram of {} bytes exceeds the {MAX_DATAGRAM}-byte limit",
                out.len() - room
            )));
        }
        let socket = &self.socket;
        let send = |bytes: &[u8]| {
            socket
                .send_to(bytes, addr)
                .map(|_| ())
                .map_err(|e| ClientError::Io(format!("send to {addr}: {e}")))
        };
        let result = match &mut self.auth {
            None => send(&out),
            Some(auth) => auth.seal_request(to, &mut out, send),
        };
        self.out = out;
        result
    }

    /// The next client reply (or notice) to arrive before `until`, skipping anything else:
    /// with keys, anything not sealed by a configured peer to this client's session.
    fn recv_until(&mut self, until: Instant) -> Option<Incoming> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Err(e) = self.socket.set_read_timeout(Some(left)) {
                log::warn!("set_read_timeout: {e}");
                std::thread::sleep(left);
                return None;
            }
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    let bytes = &self.buf[..n];
                    let (body, sealed_by) = match &mut self.auth {
                        None => (bytes, None),
                        Some(auth) => match auth.open(bytes) {
                            Ok(FromPeer::Reply { from, body }) => (body, Some(from)),
                            Ok(FromPeer::Notice { from }) => {
                                self.heard_any = true;
                                return Some(Incoming::Notice(from));
                            }
                            Err(e) => {
                                log::debug!("dropping a datagram from {from}: {e:?}");
                                continue;
                            }
                        },
                    };
                    match Datagram::decode(body) {
                        Ok(Datagram::Reply(reply))
                            if sealed_by.is_none_or(|peer| peer == reply.from) =>
                        {
                            self.heard_any = true;
                            return Some(Incoming::Reply(reply));
                        }
                        Ok(other) => {
                            log::debug!("ignoring a non-reply datagram from {from}: {other:?}")
                        }
                        Err(e) => log::debug!("ignoring a datagram from {from}: {e}"),
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // e.g. ICMP port unreachable reported on the socket: not an answer.
                    log::debug!("recv: {e}");
                    std::thread::sleep(Duration::from_millis(1).min(left));
                }
            }
        }
    }
}

/// Whether `result` is a possible answer to `op`. Anything else is a confused peer.
fn fits(op: &ClientOp, result: &ClientResult) -> bool {
    match result {
        ClientResult::NotLeader { .. } | ClientResult::Refused { .. } => true,
        ClientResult::Members { .. } => matches!(op, ClientOp::Members),
        ClientResult::Configured { .. } => matches!(op, ClientOp::ChangeMembers { .. }),
        ClientResult::Busy { .. } => {
            matches!(op, ClientOp::ChangeMembers { .. } | ClientOp::Users(_))
        }
        ClientResult::Appended { .. } => matches!(op, ClientOp::Append { .. }),
        ClientResult::Entries { .. } => {
            matches!(op, ClientOp::Query { .. } | ClientOp::Backup { .. })
        }
        ClientResult::BackupState { .. } => matches!(op, ClientOp::BackupState { .. }),
        ClientResult::Status(_) => matches!(op, ClientOp::Status),
        ClientResult::Transferred { .. } => matches!(op, ClientOp::TransferLeader { .. }),
        ClientResult::UserAdded { .. } => matches!(op, ClientOp::Users(UserOp::Add { .. })),
        ClientResult::UserRemoved { .. } => matches!(op, ClientOp::Users(UserOp::Remove { .. })),
        ClientResult::Users { .. } => matches!(op, ClientOp::Users(UserOp::List)),
    }
}

/// Sleeps for `pause`, but not past `deadline`.
fn pause_until(pause: Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    std::thread::sleep(pause.min(left));
}

/// 10-20 ms, jittered so that clients do not move in lockstep.
fn short_pause() -> Duration {
    Duration::from_millis(10 + jitter_u64() % 11)
}

/// A random u64 from the operating system, for identities that must not collide.
fn os_random_u64() -> Result<u64, ClientError> {
    getrandom::u64().map_err(|e| {
        ClientError::Io(format!(
            "cannot draw the client's random IDs from the operating system: {e}"
        ))
    })
}

/// A cheap, predictable u64 (the clock, the process ID and a counter, mixed): for spreading
/// pauses only, never for identities.
fn jitter_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = u64::from(std::process::id());
    splitmix64(nanos ^ pid.rotate_left(32) ^ splitmix64(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Role;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    /// A peer played by a script: for each request it receives, the replies to send back.
    struct FakePeer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        seen: Arc<Mutex<Vec<ClientRequest>>>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakePeer {
        fn start(
            id: NodeId,
            mut script: impl FnMut(&ClientRequest) -> Vec<(u64, ClientResult)> + Send + 'static,
        ) -> FakePeer {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            let addr = socket.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let thread = {
                let (stop, seen) = (stop.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0; MAX_DATAGRAM + 1];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((n, src)) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        let Ok(Datagram::Request(req)) = Datagram::decode(&buf[..n]) else {
                            panic!("fake peer {id} got garbage");
                        };
                        seen.lock().unwrap().push(req.clone());
                        for (reply_id, result) in script(&req) {
                            let reply = Datagram::Reply(ClientReply {
                                id: reply_id,
                                from: id,
                                result,
                            });
                            socket.send_to(&reply.encode().unwrap(), src).unwrap();
                        }
                    }
                })
            };
            FakePeer {
                addr,
                stop,
                seen,
                thread: Some(thread),
            }
        }

        /// A peer that answers every request with the same result.
        fn always(id: NodeId, result: ClientResult) -> FakePeer {
            FakePeer::start(id, move |req| vec![(req.id, result.clone())])
        }

        /// A peer that never answers.
        fn silent(id: NodeId) -> FakePeer {
            FakePeer::start(id, |_| vec![])
        }

        fn requests(&self) -> Vec<ClientRequest> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Drop for FakePeer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                // A panic in the script thread fails the test here, unless already failing.
                if t.join().is_err() && !std::thread::panicking() {
                    panic!("fake peer thread panicked");
                }
            }
        }
    }

    fn client_of(peers: &[(NodeId, &FakePeer)], timeout_ms: u64) -> Client {
        let map = peers.iter().map(|(id, p)| (*id, p.addr)).collect();
        Client::new(map, Duration::from_millis(timeout_ms)).unwrap()
    }

    fn appended(index: Index, term: Term) -> ClientResult {
        ClientResult::Appended { index, term }
    }

    /// The (client, seq, data) of every append request a peer saw.
    fn appends(peer: &FakePeer) -> Vec<(ClientId, u64, String)> {
        peer.requests()
            .into_iter()
            .filter_map(|r| match r.op {
                ClientOp::Append { client, seq, data } => Some((client, seq, data)),
                _ => None,
            })
            .collect()
    }

    fn record(index: Index) -> LogRecord {
        LogRecord {
            index,
            term: 1,
            data: Some(format!("entry {index}")),
            kind: None,
        }
    }

    #[test]
    fn redirect_is_followed_to_the_named_leader() {
        let p1 = FakePeer::always(1, ClientResult::NotLeader { leader: Some(2) });
        let p2 = FakePeer::always(2, appended(7, 3));
        let mut c = client_of(&[(1, &p1), (2, &p2)], 2000);
        let a = c.append("hello").unwrap();
        assert_eq!(
            a,
            Appended {
                index: 7,
                term: 3,
                peer: 2
            }
        );
        assert_eq!(c.leader_hint(), Some(2));
        // The next operation goes straight to the leader.
        c.append("again").unwrap();
        assert_eq!(p1.requests().len(), 1);
        assert_eq!(p2.requests().len(), 2);
    }

    #[test]
    fn redirect_to_an_unknown_id_is_ignored() {
        let p1 = FakePeer::always(1, ClientResult::NotLeader { leader: Some(99) });
        let p2 = FakePeer::always(2, appended(1, 1));
        let mut c = client_of(&[(1, &p1), (2, &p2)], 2000);
        assert_eq!(c.append("x").unwrap().peer, 2);
        assert_eq!(c.leader_hint(), Some(2));
    }

    /// Fake peers' addresses by ID, filled in once they are started, for their scripts to
    /// report in membership answers.
    type Book = Arc<Mutex<BTreeMap<NodeId, String>>>;

    /// Voters `ids` at their addresses in `book`, with progress if `progress`.
    fn voters(book: &Book, ids: &[NodeId], progress: bool) -> Vec<MemberInfo> {
        let book = book.lock().unwrap();
        ids.iter()
            .map(|&id| MemberInfo {
                id,
                address: book[&id].clone(),
                role: crate::raft::MemberRole::Voter,
                match_index: progress.then_some(10 + id),
                lag: progress.then(|| 3u64.saturating_sub(id)),
            })
            .collect()
    }

    /// A `Members` answer naming `leader`, with `members`.
    fn members_answer(leader: Option<NodeId>, members: Vec<MemberInfo>) -> ClientResult {
        ClientResult::Members {
            leader,
            config_index: 3,
            committed: true,
            members,
        }
    }

    #[test]
    fn redirect_to_an_unknown_id_is_followed_once_members_name_it() {
        // The config names peer 1 only; the leader is peer 7, added since.
        let book = Book::default();
        let p7 = FakePeer::start(7, |req| match req.op {
            ClientOp::Members => vec![],
            _ => vec![(req.id, appended(9, 4))],
        });
        let p1 = FakePeer::start(1, {
            let book = book.clone();
            move |req| match req.op {
                ClientOp::Members => vec![(
                    req.id,
                    members_answer(Some(7), voters(&book, &[1, 7], false)),
                )],
                _ => vec![(req.id, ClientResult::NotLeader { leader: Some(7) })],
            }
        });
        book.lock()
            .unwrap()
            .extend([(1, p1.addr.to_string()), (7, p7.addr.to_string())]);
        let mut c = client_of(&[(1, &p1)], 2000);
        c.follow_cluster(true);
        let a = c.append("hello").unwrap();
        assert_eq!((a.index, a.term, a.peer), (9, 4, 7));
        assert_eq!(c.peers().get(&7), Some(&p7.addr));
        assert_eq!(c.leader_hint(), Some(7));
        let asked: Vec<bool> = p1
            .requests()
            .iter()
            .map(|r| r.op == ClientOp::Members)
            .collect();
        assert_eq!(asked, [false, true], "the append, then the members");
        assert_eq!(p7.requests().len(), 1);
    }

    #[test]
    fn a_client_not_following_stays_with_the_peers_it_was_given() {
        let p1 = FakePeer::start(1, |req| match req.op {
            ClientOp::Members => vec![(req.id, members_answer(Some(7), Vec::new()))],
            _ => vec![(req.id, ClientResult::NotLeader { leader: Some(7) })],
        });
        let mut c = client_of(&[(1, &p1)], 300);
        assert!(matches!(c.append("x"), Err(ClientError::Timeout(_))));
        assert!(p1.requests().iter().all(|r| r.op != ClientOp::Members));
        assert_eq!(c.peers().len(), 1);
    }

    #[test]
    fn members_asks_the_leader_and_removed_peers_leave_the_round_robin() {
        // Peer 1 was removed and no longer answers; peer 2 follows peer 3, which the config
        // does not name.
        let book = Book::default();
        let p1 = FakePeer::silent(1);
        let p2 = FakePeer::start(2, {
            let book = book.clone();
            move |req| match req.op {
                ClientOp::Members => vec![(
                    req.id,
                    members_answer(Some(3), voters(&book, &[2, 3], false)),
                )],
                _ => vec![(req.id, ClientResult::NotLeader { leader: Some(3) })],
            }
        });
        let p3 = FakePeer::start(3, {
            let book = book.clone();
            move |req| match req.op {
                ClientOp::Members => vec![(
                    req.id,
                    members_answer(Some(3), voters(&book, &[2, 3], true)),
                )],
                _ => vec![(req.id, appended(13, 2))],
            }
        });
        book.lock()
            .unwrap()
            .extend([(2, p2.addr.to_string()), (3, p3.addr.to_string())]);
        let mut c = client_of(&[(1, &p1), (2, &p2)], 2000);
        c.follow_cluster(true);
        let m = c.members().unwrap();
        assert_eq!((m.leader, m.config_index, m.committed), (3, 3, true));
        let progress: Vec<(NodeId, Option<Index>, Option<Index>)> = m
            .members
            .iter()
            .map(|m| (m.id, m.match_index, m.lag))
            .collect();
        assert_eq!(progress, [(2, Some(12), Some(1)), (3, Some(13), Some(0))]);
        assert_eq!(c.leader_hint(), Some(3));
        assert_eq!(c.order, [2, 3], "peer 1 is out of the round robin");
        assert_eq!(c.peers().len(), 3, "but still in the address book");
        // With the leader gone quiet, the client rotates over the current members only.
        c.leader = None;
        assert_eq!(c.append("x").unwrap().peer, 3);
        assert_eq!(
            p1.requests().len(),
            1,
            "the removed peer was asked only once"
        );
    }

    #[test]
    fn a_members_answer_from_an_unknown_id_naming_itself_leader_does_not_crash_the_client() {
        // The address we know as peer 1 answers as peer 99 (a config mapping an ID to the
        // wrong address, or a forged reply) and names itself leader.
        let p = FakePeer::start(99, |req| match req.op {
            ClientOp::Members => vec![(req.id, members_answer(Some(99), Vec::new()))],
            _ => vec![(req.id, appended(5, 1))],
        });
        let mut c = client_of(&[(1, &p)], 2000);
        assert_eq!(c.members().unwrap().leader, 99);
        assert_eq!(c.leader_hint(), None, "no address for 99");
        c.append("x").unwrap();
    }

    #[test]
    fn status_asks_members_it_learns_in_the_same_round() {
        let book = Book::default();
        let p2 = FakePeer::always(2, ClientResult::Status(status_info(2, Role::Follower)));
        let p1 = FakePeer::start(1, {
            let book = book.clone();
            move |req| {
                let mut info = status_info(1, Role::Leader);
                info.config_index = 5;
                info.members = voters(&book, &[1, 2], false)
                    .into_iter()
                    .map(|m| Member {
                        id: m.id,
                        address: m.address,
                        role: m.role,
                    })
                    .collect();
                info.members[1].role = crate::raft::MemberRole::Learner;
                vec![(req.id, ClientResult::Status(info))]
            }
        });
        book.lock()
            .unwrap()
            .extend([(1, p1.addr.to_string()), (2, p2.addr.to_string())]);
        let mut c = client_of(&[(1, &p1)], 2000);
        c.follow_cluster(true);
        let st = c.status();
        let answered: Vec<(NodeId, bool)> = st.iter().map(|p| (p.id, p.answered)).collect();
        assert_eq!(answered, [(1, true), (2, true)]);
        assert_eq!(st[1].address, p2.addr);
        assert_eq!(p2.requests().len(), 1);
    }

    #[test]
    fn busy_changes_are_retried_until_configured() {
        let mut busy = 3;
        let config = vec![Member {
            id: 1,
            address: String::new(),
            role: crate::raft::MemberRole::Voter,
        }];
        let p1 = FakePeer::start(1, move |req| {
            let result = if busy > 0 {
                busy -= 1;
                ClientResult::Busy {
                    reason: "learner 4 has not caught up: 300 entries behind".into(),
                }
            } else {
                ClientResult::Configured {
                    index: 8,
                    term: 2,
                    members: config.clone(),
                }
            };
            vec![(req.id, result)]
        });
        let mut c = client_of(&[(1, &p1)], 3000);
        let done = c
            .change_members(ConfChange::Promote { id: 4 }, false)
            .unwrap();
        assert_eq!((done.index, done.term, done.peer), (8, 2, 1));
        let sent = p1.requests();
        assert_eq!(sent.len(), 4);
        assert!(sent.iter().all(|r| r.op
            == ClientOp::ChangeMembers {
                change: ConfChange::Promote { id: 4 },
                force: false,
            }));
    }

    #[test]
    fn busy_until_the_deadline_is_refused_with_the_reason() {
        let p1 = FakePeer::always(
            1,
            ClientResult::Busy {
                reason: "learner 4 has not caught up: 5000 entries behind (match index 7)".into(),
            },
        );
        let timeout = Duration::from_millis(800);
        let mut c = client_of(&[(1, &p1)], timeout.as_millis() as u64);
        let started = Instant::now();
        let e = c
            .change_members(ConfChange::Promote { id: 4 }, false)
            .unwrap_err();
        let elapsed = started.elapsed();
        let ClientError::Refused(reason) = &e else {
            panic!("{e:?}");
        };
        assert!(reason.contains("5000 entries behind"), "{reason}");
        assert!(reason.contains("nothing changed"), "{reason}");
        assert!(p1.requests().len() >= 3, "retried");
        assert!(elapsed >= timeout - BUSY_MARGIN, "{elapsed:?}");
        assert!(elapsed < timeout, "{elapsed:?}");
    }

    #[test]
    fn a_guard_refusal_is_told_apart_and_force_is_sent_when_asked() {
        let guard_reason = format!(
            "removing node 2 would leave 1 of 2 voters heard from within the election timeout (not heard from: node 3); a majority of the new configuration must be live; {}",
            guard::FORCE_HINT
        );
        let config = vec![Member {
            id: 1,
            address: String::new(),
            role: crate::raft::MemberRole::Voter,
        }];
        let p1 = FakePeer::start(1, move |req| {
            let result = match &req.op {
                ClientOp::ChangeMembers { force: true, .. } => ClientResult::Configured {
                    index: 9,
                    term: 2,
                    members: config.clone(),
                },
                ClientOp::ChangeMembers { change, .. } if change.id() == 2 => {
                    ClientResult::Refused {
                        reason: guard_reason.clone(),
                    }
                }
                _ => ClientResult::Refused {
                    reason: "node 9 is not a member".into(),
                },
            };
            vec![(req.id, result)]
        });
        let mut c = client_of(&[(1, &p1)], 3000);
        let remove_2 = ConfChange::Remove { id: 2 };
        let e = c.change_members(remove_2.clone(), false).unwrap_err();
        assert!(e.is_guard_refusal(), "{e:?}");
        assert!(e.to_string().contains("not heard from: node 3"), "{e}");
        assert_eq!(p1.requests().len(), 1, "a refusal is not retried");
        let e = c
            .change_members(ConfChange::Remove { id: 9 }, false)
            .unwrap_err();
        assert!(!e.is_guard_refusal(), "{e:?}");
        assert!(!ClientError::Timeout("no answer".into()).is_guard_refusal());
        let done = c.change_members(remove_2.clone(), true).unwrap();
        assert_eq!(done.index, 9);
        assert_eq!(
            p1.requests().last().unwrap().op,
            ClientOp::ChangeMembers {
                change: remove_2,
                force: true
            }
        );
    }

    #[test]
    fn stale_reply_ids_are_ignored() {
        // Before the real answer, answers to requests this client never sent (or sent for
        // another operation): a later ID, an earlier ID, and a NotLeader for a later ID.
        let p1 = FakePeer::start(1, |req| {
            vec![
                (req.id.wrapping_add(1000), appended(99, 9)),
                (req.id.wrapping_sub(1000), appended(98, 9)),
                (
                    req.id.wrapping_add(1),
                    ClientResult::NotLeader { leader: None },
                ),
                (req.id, appended(5, 2)),
            ]
        });
        let mut c = client_of(&[(1, &p1)], 2000);
        let a = c.append("x").unwrap();
        assert_eq!((a.index, a.term), (5, 2));
        // The next operation must not pick up leftovers of the first either.
        let b = c.append("y").unwrap();
        assert_eq!((b.index, b.term), (5, 2));
        assert_eq!(p1.requests().len(), 2, "no retry was needed");
    }

    #[test]
    fn retries_reuse_the_same_seq() {
        // Peer 1 is not the leader and does not know who is; peer 2 loses the first request.
        let p1 = FakePeer::always(1, ClientResult::NotLeader { leader: None });
        let mut dropped = 0;
        let p2 = FakePeer::start(2, move |req| {
            if dropped < 2 {
                dropped += 1;
                vec![]
            } else {
                vec![(req.id, appended(4, 1))]
            }
        });
        let mut c = client_of(&[(1, &p1), (2, &p2)], 3000);
        let id = c.client_id();
        assert_eq!(c.append("once").unwrap().index, 4);
        let mut sent = appends(&p1);
        sent.extend(appends(&p2));
        assert!(sent.len() >= 4, "{sent:?}");
        assert!(
            sent.iter().all(|s| *s == (id, 1, "once".to_string())),
            "{sent:?}"
        );
        let ids: std::collections::BTreeSet<u64> = p1
            .requests()
            .iter()
            .chain(p2.requests().iter())
            .map(|r| r.id)
            .collect();
        assert_eq!(
            ids.len(),
            sent.len(),
            "every attempt has its own request id"
        );
        // A definite outcome advances seq.
        c.append("next").unwrap();
        assert_eq!(appends(&p2).last().unwrap().1, 2);
    }

    #[test]
    fn timeout_returns_without_hanging() {
        let p1 = FakePeer::silent(1);
        let p2 = FakePeer::silent(2);
        // A port nobody listens on.
        let closed = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut peers: BTreeMap<NodeId, SocketAddr> = [(1, p1.addr), (2, p2.addr)].into();
        peers.insert(3, closed);
        let timeout = Duration::from_millis(300);
        let mut c = Client::new(peers, timeout).unwrap();
        let started = Instant::now();
        let e = c.append("lost?").unwrap_err();
        let elapsed = started.elapsed();
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
        assert!(e.to_string().contains("outcome unknown"), "{e}");
        assert!(elapsed >= timeout, "{elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(200),
            "{elapsed:?}"
        );

        let started = Instant::now();
        assert!(matches!(c.query(), Err(ClientError::Timeout(_))));
        assert!(started.elapsed() < timeout + Duration::from_millis(200));

        // Retrying the same data reuses the seq; different data takes a fresh one.
        let _ = c.append("lost?");
        let _ = c.append("other");
        let mut sent = appends(&p1);
        sent.extend(appends(&p2));
        assert!(sent.iter().any(|s| s.1 == 1 && s.2 == "lost?"));
        assert!(
            sent.iter().all(|s| (s.1 == 1) == (s.2 == "lost?")),
            "{sent:?}"
        );
        assert!(sent.iter().any(|s| s.1 == 2 && s.2 == "other"));
    }

    #[test]
    fn query_follows_pages_with_the_read_index() {
        // Page 1 from peer 1, which then loses leadership to peer 2 for the rest.
        let p1 = FakePeer::start(1, |req| match req.op {
            ClientOp::Query {
                start: 1,
                read_index: None,
            } => vec![(
                req.id,
                ClientResult::Entries {
                    entries: vec![record(1), record(2)],
                    read_index: 5,
                    next: Some(3),
                },
            )],
            _ => vec![(req.id, ClientResult::NotLeader { leader: Some(2) })],
        });
        let p2 = FakePeer::start(2, |req| match req.op {
            ClientOp::Query {
                start,
                read_index: Some(5),
            } => {
                let end = (start + 1).min(5);
                vec![(
                    req.id,
                    ClientResult::Entries {
                        entries: (start..=end).map(record).collect(),
                        read_index: 5,
                        next: (end < 5).then_some(end + 1),
                    },
                )]
            }
            _ => vec![(req.id, ClientResult::NotLeader { leader: Some(1) })],
        });
        let mut c = client_of(&[(1, &p1), (2, &p2)], 2000);
        let records = c.query().unwrap();
        assert_eq!(records, (1..=5).map(record).collect::<Vec<_>>());
        assert_eq!(c.last_peer(), Some(2));
        let starts: Vec<(Index, Option<Index>)> = p2
            .requests()
            .into_iter()
            .map(|r| match r.op {
                ClientOp::Query { start, read_index } => (start, read_index),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(starts, vec![(3, Some(5)), (5, Some(5))]);
    }

    /// A leader (ID 1) of a log of `last` entries whose read index is `last`, answering
    /// pages of at most `page` entries.
    fn paging_leader(last: Index, page: Index) -> FakePeer {
        FakePeer::start(1, move |req| match req.op {
            ClientOp::Query { start, read_index } => {
                assert!(read_index.is_none_or(|r| r == last), "{req:?}");
                let end = (start + page - 1).min(last);
                vec![(
                    req.id,
                    ClientResult::Entries {
                        entries: (start..=end).map(record).collect(),
                        read_index: last,
                        next: (end < last).then_some(end + 1),
                    },
                )]
            }
            _ => vec![(req.id, ClientResult::NotLeader { leader: None })],
        })
    }

    /// The (start, read_index) of every query a peer saw.
    fn queries(peer: &FakePeer) -> Vec<(Index, Option<Index>)> {
        peer.requests()
            .into_iter()
            .map(|r| match r.op {
                ClientOp::Query { start, read_index } => (start, read_index),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn query_from_pages_from_start_and_stops_at_the_limit() {
        let p1 = paging_leader(10, 2);
        let mut c = client_of(&[(1, &p1)], 2000);
        let records = c.query_from(3, Some(5)).unwrap();
        assert_eq!(records, (3..=7).map(record).collect::<Vec<_>>());
        // The first page fixes the read index; no page is asked for past the limit.
        assert_eq!(queries(&p1), [(3, None), (5, Some(10)), (7, Some(10))]);

        // Without a limit: everything up to the read index.
        let records = c.query_from(8, None).unwrap();
        assert_eq!(records, (8..=10).map(record).collect::<Vec<_>>());
        assert_eq!(queries(&p1)[3..], [(8, None), (10, Some(10))]);
        // A limit that ends on a page boundary asks for no further page.
        assert_eq!(c.query_from(1, Some(2)).unwrap(), [record(1), record(2)]);
        assert_eq!(queries(&p1)[5..], [(1, None)]);
    }

    #[test]
    fn query_from_past_the_read_index_is_empty() {
        let p1 = paging_leader(10, 4);
        let mut c = client_of(&[(1, &p1)], 2000);
        assert_eq!(c.query_from(11, None).unwrap(), []);
        assert_eq!(c.query_from(500, Some(3)).unwrap(), []);
        assert_eq!(c.query_from(10, Some(3)).unwrap(), [record(10)]);
        assert_eq!(queries(&p1), [(11, None), (500, None), (10, None)]);
        // Index 0 and a limit of 0 are answered without asking.
        assert!(matches!(
            c.query_from(0, None),
            Err(ClientError::Refused(_))
        ));
        assert_eq!(c.query_from(1, Some(0)).unwrap(), []);
        assert_eq!(queries(&p1).len(), 3);
    }

    #[test]
    fn query_rejects_a_page_with_a_gap() {
        let p1 = FakePeer::always(
            1,
            ClientResult::Entries {
                entries: vec![record(1), record(3)],
                read_index: 3,
                next: None,
            },
        );
        let mut c = client_of(&[(1, &p1)], 1000);
        assert!(matches!(c.query(), Err(ClientError::Io(_))));
    }

    #[test]
    fn oversized_append_is_refused_without_sending() {
        let p1 = FakePeer::always(1, appended(1, 1));
        let mut c = client_of(&[(1, &p1)], 1000);
        let e = c.append(&"a".repeat(20_000)).unwrap_err();
        assert!(matches!(e, ClientError::Refused(_)), "{e:?}");
        let e = c.append(&"\u{1}".repeat(8_000)).unwrap_err();
        assert!(matches!(e, ClientError::Refused(_)), "{e:?}");
        c.append("fits").unwrap();
        let sent = appends(&p1);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1, 1, "refusing locally takes no seq");
    }

    #[test]
    fn refused_is_definite_and_advances_seq() {
        let mut first = true;
        let p1 = FakePeer::start(1, move |req| {
            let result = if std::mem::take(&mut first) {
                ClientResult::Refused {
                    reason: "no".into(),
                }
            } else {
                appended(1, 1)
            };
            vec![(req.id, result)]
        });
        let mut c = client_of(&[(1, &p1)], 1000);
        assert_eq!(
            c.append("x").unwrap_err(),
            ClientError::Refused("no".into())
        );
        c.append("x").unwrap();
        let seqs: Vec<u64> = appends(&p1).iter().map(|s| s.1).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    fn status_info(id: NodeId, role: Role) -> StatusInfo {
        StatusInfo {
            members: Vec::new(),
            config_index: 0,
            snapshot_index: 0,
            first_index: 1,
            id,
            role,
            term: 3,
            leader: Some(1),
            last_index: 4,
            commit_index: 4,
            applied_index: 4,
            elections_started: 1,
            leader_changes: 1,
            auth_failures: 0,
            disk_full: false,
            followers: Vec::new(),
        }
    }

    #[test]
    fn status_asks_every_peer_and_waits_at_most_a_second() {
        let info = status_info(1, Role::Leader);
        let p1 = FakePeer::always(1, ClientResult::Status(info.clone()));
        let p2 = FakePeer::silent(2);
        let mut c = client_of(&[(1, &p1), (2, &p2)], 5000);
        let started = Instant::now();
        let st = c.status();
        let elapsed = started.elapsed();
        assert!(
            elapsed < STATUS_WAIT + Duration::from_millis(200),
            "{elapsed:?}"
        );
        assert_eq!(st.len(), 2);
        assert_eq!((st[0].id, st[0].answered), (1, true));
        assert_eq!(st[0].info.as_ref(), Some(&info));
        assert_eq!((st[1].id, st[1].answered, &st[1].info), (2, false, &None));
        assert_eq!(st[1].address, p2.addr);
        assert_eq!(c.leader_hint(), Some(1));
        assert_eq!(p2.requests().len(), 1, "asked once");
    }

    #[test]
    fn definite_answer_to_an_earlier_attempt_is_accepted() {
        // The peer got the first attempt but answers only after the retry, quoting the first
        // attempt's ID (a NotLeader for it, which no longer counts, and then the outcome).
        let mut first = None;
        let p1 = FakePeer::start(1, move |req| match first {
            None => {
                first = Some(req.id);
                vec![]
            }
            Some(id) => vec![
                (id, ClientResult::NotLeader { leader: None }),
                (id, appended(4, 1)),
            ],
        });
        let mut c = client_of(&[(1, &p1)], 2000);
        assert_eq!(c.append("x").unwrap().index, 4);
        assert_eq!(p1.requests().len(), 2);
    }

    #[test]
    fn client_ids_are_distinct() {
        let drawn: BTreeSet<u64> = (0..10_000).map(|_| os_random_u64().unwrap()).collect();
        assert_eq!(drawn.len(), 10_000);
        let p1 = FakePeer::silent(1);
        let clients: Vec<Client> = (0..50).map(|_| client_of(&[(1, &p1)], 100)).collect();
        let ids: BTreeSet<ClientId> = clients.iter().map(|c| c.client_id()).collect();
        assert_eq!(ids.len(), clients.len(), "clients made back to back");
    }

    /// Inverse of [`splitmix64`]: its steps are an addition, two xor-shifts and two
    /// multiplications by odd constants, each invertible modulo 2^64.
    fn unsplitmix64(mut z: u64) -> u64 {
        fn unxorshift(y: u64, shift: u32) -> u64 {
            let mut x = y;
            for _ in 0..64 / shift {
                x = y ^ (x >> shift);
            }
            x
        }
        fn inverse(odd: u64) -> u64 {
            // Newton's iteration doubles the correct low bits each step.
            let mut inv = odd;
            for _ in 0..6 {
                inv = inv.wrapping_mul(2u64.wrapping_sub(odd.wrapping_mul(inv)));
            }
            inv
        }
        z = unxorshift(z, 31).wrapping_mul(inverse(0x94D0_49BB_1331_11EB));
        z = unxorshift(z, 27).wrapping_mul(inverse(0xBF58_476D_1CE4_E5B9));
        unxorshift(z, 30).wrapping_sub(0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn client_ids_are_not_a_function_of_the_clock() {
        for x in [0, 1, 0xDEAD_BEEF, u64::MAX] {
            assert_eq!(unsplitmix64(splitmix64(x)), x);
        }
        // IDs used to be splitmix64(nanos ^ pid.rotate_left(32) ^ splitmix64(counter)): two
        // processes with the same PID (in two containers) drawing in the same nanosecond drew
        // the same ID. Decode IDs that way and check none yields the instant it was drawn at.
        let pid = u64::from(std::process::id()).rotate_left(32);
        let p1 = FakePeer::silent(1);
        for _ in 0..5 {
            let now = || {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            };
            let before = now();
            let id = client_of(&[(1, &p1)], 100).client_id();
            let after = now();
            let mixed = unsplitmix64(id) ^ pid;
            let counter = (0..1u64 << 20)
                .find(|&count| (before..=after).contains(&(mixed ^ splitmix64(count))));
            assert_eq!(counter, None, "client ID {id:#x} decodes to the clock");
        }
    }
}
