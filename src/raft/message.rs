//! Wire types: what peers say to each other, and what clients and peers say to each other.
//! Every datagram is one JSON-encoded [`Datagram`] of at most [`MAX_DATAGRAM`] bytes.

use super::membership::{ConfChange, Member, MemberRole, Membership};
use super::snapshot::{SessionRecord, SnapshotId};
use super::types::*;
use super::users::{denied, UserChange, UserInfo, UserOp, UserRecord, UserRole};
use serde::{Deserialize, Serialize};

/// One slot of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: Index,
    pub term: Term,
    pub payload: Payload,
}

/// What an entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The empty entry a new leader appends so that earlier entries commit (§5.4.2, §8).
    Noop,
    /// A client's append; `(client, seq)` identifies it for exactly-once application.
    Data {
        client: ClientId,
        seq: u64,
        data: String,
    },
    /// A configuration (thesis §4.1): in force on a server as soon as it is in its log.
    Config(Membership),
    /// A change to the users ([`super::users`]): names and roles, never a key.
    User(UserChange),
}

impl Entry {
    /// An upper bound on this entry's size inside a JSON datagram.
    pub fn encoded_len(&self) -> usize {
        ENTRY_OVERHEAD
            + match &self.payload {
                Payload::Noop => 0,
                Payload::Data { data, .. } => escaped_len(data),
                Payload::Config(m) => m.encoded_len(),
                Payload::User(u) => u.encoded_len(),
            }
    }
}

/// Checks a client entry against the size limits; the error is shown to the client as is.
pub fn check_entry_data(data: &str) -> Result<(), String> {
    if data.len() > MAX_ENTRY_DATA {
        return Err(format!(
            "entry is {} bytes; the limit is {} bytes of UTF-8",
            data.len(),
            MAX_ENTRY_DATA
        ));
    }
    let escaped = escaped_len(data);
    if escaped > MAX_ENTRY_ESCAPED {
        return Err(format!(
            "entry is {escaped} bytes once JSON-escaped (too many control characters); the limit is {MAX_ENTRY_ESCAPED}"
        ));
    }
    Ok(())
}

/// A message between peers. `from` is trusted only after the receiver checks it is a known
/// peer; replies go to the address the config gives for `from`, never the datagram's source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The cluster ID (see [`Membership::cluster_id`]): stamped and checked by the shell, so
    /// that a peer of another cluster is never heard. The core leaves it 0.
    #[serde(default)]
    pub cluster: u64,
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's current term (for PreVote: the term it would campaign in).
    pub term: Term,
    pub body: Body,
    /// The sender's own address (`host:port`), stamped by the shell like `cluster`: a peer
    /// that has no address for the sender (it missed the configuration that added it, or it
    /// is joining through other members) learns it here, so it can answer. The core leaves
    /// it empty and never reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Thesis §9.6: would you vote for me in `term`? Changes no one's term or vote.
    PreVote {
        last_log_index: Index,
        last_log_term: Term,
    },
    PreVoteResponse {
        granted: bool,
    },
    /// §5.2 RequestVote RPC.
    RequestVote {
        last_log_index: Index,
        last_log_term: Term,
    },
    RequestVoteResponse {
        granted: bool,
    },
    /// §5.3 AppendEntries RPC; with no entries it is a heartbeat. `read_seq` is echoed back so
    /// the leader can confirm its leadership for reads (thesis §6.4).
    AppendEntries {
        prev_log_index: Index,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: Index,
        read_seq: u64,
    },
    AppendEntriesResponse {
        read_seq: u64,
        result: AppendResult,
    },
    /// Thesis §5.3 InstallSnapshot, one chunk: `data` is the bytes `[offset, offset + n)` of
    /// `snapshot`'s stream in base64, and `crc` their CRC-32.
    InstallSnapshot {
        snapshot: SnapshotId,
        offset: u64,
        data: String,
        crc: u32,
    },
    /// The receiver holds `[0, have)` of the stream of the snapshot at `snapshot_index`, or,
    /// with `done`, has installed it (or already had everything it covers).
    InstallSnapshotResponse {
        snapshot_index: Index,
        have: u64,
        done: bool,
    },
    /// Thesis §3.10: the leader hands over leadership; the receiver campaigns at once, without
    /// pre-vote. Sent only once the receiver's log matches the leader's.
    TimeoutNow,
    /// From a peer joining on an empty data dir to one of its contact points: which cluster
    /// are you in? Answered by the shell, never seen by the core.
    ClusterProbe,
    /// The answer: the message's `cluster` is the contact point's cluster ID, which the joining
    /// peer then accepts from a leader's AppendEntries.
    ClusterProbeAnswer,
}

impl Body {
    /// The message type's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Body::PreVote { .. } => "PreVote",
            Body::PreVoteResponse { .. } => "PreVoteResponse",
            Body::RequestVote { .. } => "RequestVote",
            Body::RequestVoteResponse { .. } => "RequestVoteResponse",
            Body::AppendEntries { .. } => "AppendEntries",
            Body::AppendEntriesResponse { .. } => "AppendEntriesResponse",
            Body::InstallSnapshot { .. } => "InstallSnapshot",
            Body::InstallSnapshotResponse { .. } => "InstallSnapshotResponse",
            Body::TimeoutNow => "TimeoutNow",
            Body::ClusterProbe => "ClusterProbe",
            Body::ClusterProbeAnswer => "ClusterProbeAnswer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendResult {
    /// The follower's log matches the leader's up to and including `match_index`.
    Accepted { match_index: Index },
    /// The consistency check failed at `prev_log_index`. Fast backtracking hint: if the follower
    /// has an entry there, `hint_term` is its term and `hint_index` the first index of that term
    /// in its log; otherwise `hint_term` is 0 and `hint_index` is its last index + 1.
    Rejected {
        prev_log_index: Index,
        hint_index: Index,
        hint_term: Term,
    },
    /// The request's term is older than the follower's (carried in the message's term): says
    /// nothing about the log, so a sender re-elected in the newer term ignores it.
    StaleTerm,
}

/// A client's request; `id` is echoed in the reply so the client can match them up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    pub id: u64,
    pub op: ClientOp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientOp {
    /// Append `data` once, however often the same `(client, seq)` is retried.
    Append {
        client: ClientId,
        seq: u64,
        data: String,
    },
    /// Read the committed log from `start`. The first page (`read_index: None`) is linearizable
    /// (ReadIndex, thesis §6.4) and fixes the read index; later pages pass it back.
    Query {
        start: Index,
        read_index: Option<Index>,
    },
    /// Read the committed log for a backup (`client snapshot save`): answered exactly as
    /// `Query`, a distinct request so that it can be allowed to admins only.
    Backup {
        start: Index,
        read_index: Option<Index>,
    },
    /// The client sessions and configuration a backup holds beside the records, as of an
    /// applied index ([`super::backup_state`]): `at: None` asks for a copy of now, later pages
    /// pass its index back; `from` counts the sessions already received. Leader only.
    BackupState { at: Option<Index>, from: u64 },
    /// Report this peer's view of the cluster.
    Status,
    /// Hand leadership to `target`, or to the most up-to-date voter (thesis §3.10). With no
    /// target, `away_from` names the leader the client saw, so that a retry reaching the new
    /// leader does not move leadership again.
    TransferLeader {
        target: Option<NodeId>,
        away_from: Option<NodeId>,
    },
    /// The configuration as this peer sees it (any peer answers; the leader adds progress).
    Members,
    /// Change the membership by one server (thesis §4.2); answered once the change commits.
    /// `force` skips the quorum guard ([`crate::raft::guard`]); a request without the field
    /// (an older client) is checked.
    ChangeMembers {
        change: ConfChange,
        #[serde(default)]
        force: bool,
    },
    /// Add, remove or list users (admins only); an add or remove is answered once it commits.
    Users(UserOp),
}

/// The least role `op` needs, and what a refusal says the role cannot do.
pub fn required(op: &ClientOp) -> (UserRole, &'static str) {
    match op {
        ClientOp::Query { .. } | ClientOp::Status | ClientOp::Members => (UserRole::Read, "read"),
        ClientOp::Append { .. } => (UserRole::Write, "append"),
        ClientOp::Backup { .. } | ClientOp::BackupState { .. } => (UserRole::Admin, "take backups"),
        ClientOp::TransferLeader { .. } => (UserRole::Admin, "transfer leadership"),
        ClientOp::ChangeMembers { .. } => (UserRole::Admin, "change membership"),
        ClientOp::Users(_) => (UserRole::Admin, "manage users"),
    }
}

/// Whether `role` may carry out `op`; the error is the refusal the client prints.
pub fn permit(role: UserRole, op: &ClientOp) -> Result<(), String> {
    let (least, what) = required(op);
    if role >= least {
        Ok(())
    } else {
        Err(denied(role, what))
    }
}

/// A peer's answer to a [`ClientRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReply {
    pub id: u64,
    /// The peer that answered.
    pub from: NodeId,
    pub result: ClientResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResult {
    /// The append is committed at `index` (also the answer to a retried duplicate).
    Appended {
        index: Index,
        term: Term,
    },
    /// One page of the committed log, entries `start..` up to at most `read_index`.
    /// `next` is the index to ask for next, or None when the page reached `read_index`.
    Entries {
        entries: Vec<LogRecord>,
        read_index: Index,
        next: Option<Index>,
    },
    /// One page of a backup's state as of applied index `index` (of `term`, 0 if unknown):
    /// the configuration in force there (made by the entry at `config_index`) and its client
    /// sessions and users `from..`; `next` is the `from` to ask for next, None after the last page.
    BackupState {
        index: Index,
        term: Term,
        config_index: Index,
        members: Vec<Member>,
        from: u64,
        sessions: Vec<SessionRecord>,
        /// The users (by name), paged after the sessions: `from` counts sessions then users.
        #[serde(default)]
        users: Vec<UserRecord>,
        next: Option<u64>,
    },
    Status(StatusInfo),
    /// Leadership is now with `leader` in `term` (the answer to a transfer).
    Transferred {
        leader: NodeId,
        term: Term,
    },
    /// The configuration in force on the answering peer (`config_index` is its entry, 0 for
    /// the bootstrap one; `committed` whether it is known committed there).
    Members {
        leader: Option<NodeId>,
        config_index: Index,
        committed: bool,
        members: Vec<MemberInfo>,
    },
    /// A membership change is committed at `index`; `members` is the new configuration.
    Configured {
        index: Index,
        term: Term,
        members: Vec<Member>,
    },
    /// Not now, but maybe soon (a learner still catching up, a leader yet to commit an entry
    /// of its term): the client may retry until its deadline. Nothing was changed.
    Busy {
        reason: String,
    },
    /// This peer is not the leader (or could not confirm it still is); try `leader` if known.
    NotLeader {
        leader: Option<NodeId>,
    },
    /// A definite refusal: the request can never succeed as sent.
    Refused {
        reason: String,
    },
    /// `user` has `role` from the entry at `index` on. `key` is the user's credential, filled
    /// in by the answering peer's shell (which holds the cluster secret); empty from the core.
    UserAdded {
        user: String,
        role: UserRole,
        index: Index,
        term: Term,
        #[serde(default)]
        key: CredentialKey,
    },
    /// `user` is removed by the entry at `index`.
    UserRemoved {
        user: String,
        index: Index,
        term: Term,
    },
    /// Every user, by name (never a key).
    Users {
        users: Vec<UserInfo>,
    },
}

/// A user's key in the answer to `user add` (64 hex digits), never shown by `Debug`, so
/// that no log line can print it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CredentialKey(pub String);

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "none"
        } else {
            "redacted"
        })
    }
}

/// One committed log entry as the client prints it: `{"index":N,"term":T,"data":"..."}`;
/// entries without client data have `data: null` and a `kind` (`noop`, `duplicate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub index: Index,
    pub term: Term,
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One member as `client members` prints it; progress only from the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub address: String,
    pub role: MemberRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_index: Option<Index>,
    /// Entries behind the leader's last index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<Index>,
}

/// A peer's view of itself, for `client status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub last_index: Index,
    pub commit_index: Index,
    pub applied_index: Index,
    /// Elections this node has started (as a candidate), since it started.
    #[serde(default)]
    pub elections_started: u64,
    /// Times this node has seen leadership change hands (a new leader or term), since it started.
    #[serde(default)]
    pub leader_changes: u64,
    /// Datagrams this peer dropped for a missing or wrong authentication tag (filled in by the shell).
    #[serde(default)]
    pub auth_failures: u64,
    /// Whether a full disk stopped this peer's storage (filled in by the shell): it
    /// acknowledges nothing until there is space again.
    #[serde(default)]
    pub disk_full: bool,
    /// The configuration in force here, and the index of its entry (0: the bootstrap one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Member>,
    #[serde(default)]
    pub config_index: Index,
    /// Index of the latest snapshot on this peer (0: none), and the first index its log
    /// still holds (entries before it are compacted).
    #[serde(default)]
    pub snapshot_index: Index,
    #[serde(default)]
    pub first_index: Index,
    /// On a leader: its view of every other member, by ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub followers: Vec<FollowerInfo>,
}

/// A leader's view of one follower, for `client status`, `client watch` and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerInfo {
    pub id: NodeId,
    pub match_index: Index,
    /// Entries the follower lacks: the leader's last index minus its match index.
    pub lag: Index,
    /// Ticks since the follower last answered the leader.
    pub last_contact_ticks: u64,
    /// The same in milliseconds, filled in by the shell, which knows how long a tick is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    /// The role's name as `status` prints it (the same as its JSON form).
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "precandidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

/// Everything that travels in one UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Datagram {
    Peer(Message),
    Request(ClientRequest),
    Reply(ClientReply),
}

impl Datagram {
    /// Encodes to JSON; errors if the result would not fit one datagram.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let bytes = serde_json::to_vec(self).map_err(|e| format!("encode: {e}"))?;
        if bytes.len() > MAX_DATAGRAM {
            return Err(format!(
                "datagram of {} bytes exceeds the {MAX_DATAGRAM}-byte limit",
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// Decodes a received datagram; never panics on garbage.
    pub fn decode(bytes: &[u8]) -> Result<Datagram, String> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(format!("oversized datagram of {} bytes", bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("malformed datagram: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::membership::MAX_ADDRESS_LEN;

    #[test]
    fn the_widest_append_envelope_fits_the_datagram_overhead() {
        // Every number at its widest, and the longest address a sender stamps: what is left
        // of a datagram after DATAGRAM_OVERHEAD is all the entries may use.
        let msg = Message {
            cluster: u64::MAX,
            from: u64::MAX,
            to: u64::MAX,
            term: u64::MAX,
            body: Body::AppendEntries {
                prev_log_index: u64::MAX,
                prev_log_term: u64::MAX,
                entries: vec![],
                leader_commit: u64::MAX,
                read_seq: u64::MAX,
            },
            reply_at: Some("h".repeat(MAX_ADDRESS_LEN)),
        };
        let bytes = Datagram::Peer(msg).encode().unwrap();
        assert!(
            bytes.len() <= DATAGRAM_OVERHEAD,
            "{} bytes of envelope",
            bytes.len()
        );
    }

    #[test]
    fn the_role_matrix() {
        let ops = [
            ClientOp::Query {
                start: 1,
                read_index: None,
            },
            ClientOp::Status,
            ClientOp::Members,
            ClientOp::Append {
                client: 1,
                seq: 1,
                data: "x".into(),
            },
            ClientOp::Backup {
                start: 1,
                read_index: None,
            },
            ClientOp::TransferLeader {
                target: None,
                away_from: None,
            },
            ClientOp::ChangeMembers {
                change: ConfChange::Remove { id: 2 },
                force: false,
            },
            ClientOp::Users(UserOp::List),
        ];
        // How many of `ops` (in order) each role may do.
        for (role, allowed) in [
            (UserRole::Read, 3),
            (UserRole::Write, 4),
            (UserRole::Admin, ops.len()),
        ] {
            for (i, op) in ops.iter().enumerate() {
                assert_eq!(permit(role, op).is_ok(), i < allowed, "{role} {op:?}");
            }
        }
        assert_eq!(
            permit(UserRole::Read, &ops[3]),
            Err("permission denied: role read cannot append".into())
        );
    }

    #[test]
    fn a_change_from_an_older_client_without_force_is_checked() {
        let old = br#"{"Request":{"id":7,"op":{"ChangeMembers":{"change":{"Remove":{"id":2}}}}}}"#;
        let Ok(Datagram::Request(req)) = Datagram::decode(old) else {
            panic!("an older client's change no longer decodes");
        };
        assert_eq!(
            req.op,
            ClientOp::ChangeMembers {
                change: ConfChange::Remove { id: 2 },
                force: false
            }
        );
        let forced = Datagram::Request(ClientRequest {
            id: 8,
            op: ClientOp::ChangeMembers {
                change: ConfChange::Remove { id: 2 },
                force: true,
            },
        });
        assert_eq!(Datagram::decode(&forced.encode().unwrap()), Ok(forced));
    }
}
