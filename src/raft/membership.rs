//! Cluster membership (Raft thesis chapter 4): who the voters and learners are, with their
//! addresses, and the one place that decides whether a set of acknowledgements is a quorum, so
//! that elections, commitment, ReadIndex confirmation and check-quorum all agree.
//!
//! Changes are one server at a time (thesis §4.2): any two majorities of configurations that
//! differ by one voter overlap, so no joint configuration is needed. A configuration takes
//! effect as soon as it is in a server's log, committed or not (§4.1); [`Configurations`]
//! remembers every configuration entry in the log so that truncating an uncommitted one
//! reverts to the one before it.

use super::types::{data_hash, escaped_len, NodeId, ENTRY_OVERHEAD, MAX_ENTRY_ESCAPED};
use serde::{Deserialize, Serialize};

/// Whether a member counts toward quorums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    /// Votes, and counts toward commitment and read confirmation.
    Voter,
    /// Receives the log but counts in no quorum and never campaigns (thesis §4.2.1).
    Learner,
}

impl MemberRole {
    pub fn name(self) -> &'static str {
        match self {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        }
    }
}

/// One member: its node ID, where peers reach it (`host:port`), and its role.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub address: String,
    pub role: MemberRole,
}

/// A configuration: the members, sorted by ID, each ID at most once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub members: Vec<Member>,
}

/// One change to a configuration, as a client asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChange {
    /// Add `id` at `address` as a learner.
    AddLearner { id: NodeId, address: String },
    /// Add a removed member's ID back as a learner: its peer starts over on an empty data
    /// directory. Explicit, so that a late retry of an old `AddLearner` never re-adds a
    /// removed member by accident (IDs are otherwise never reused, as in etcd).
    Rejoin { id: NodeId, address: String },
    /// Make learner `id` a voter.
    Promote { id: NodeId },
    /// Remove voter or learner `id`.
    Remove { id: NodeId },
}

impl ConfChange {
    /// The member the change is about.
    pub fn id(&self) -> NodeId {
        match self {
            ConfChange::AddLearner { id, .. }
            | ConfChange::Rejoin { id, .. }
            | ConfChange::Promote { id }
            | ConfChange::Remove { id } => *id,
        }
    }
}

impl Membership {
    /// Voters with no known addresses: for tests and the simulator, which route by ID.
    pub fn voters(ids: &[NodeId]) -> Membership {
        Membership::new(
            ids.iter()
                .map(|&id| Member {
                    id,
                    address: String::new(),
                    role: MemberRole::Voter,
                })
                .collect(),
        )
    }

    /// A configuration of `members`, sorted by ID.
    pub fn new(mut members: Vec<Member>) -> Membership {
        members.sort();
        members.dedup_by_key(|m| m.id);
        Membership { members }
    }

    pub fn get(&self, id: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.get(id).is_some()
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.get(id).is_some_and(|m| m.role == MemberRole::Voter)
    }

    pub fn voter_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .filter(|m| m.role == MemberRole::Voter)
            .map(|m| m.id)
    }

    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().map(|m| m.id)
    }

    /// Votes needed for a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voter_ids().count() / 2 + 1
    }

    /// Whether the voters for which `yes` holds form a majority. An empty voter set has no
    /// quorum: a server that knows no voters must not decide anything.
    pub fn has_quorum(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        let voters = self.voter_ids().count();
        voters > 0 && self.voter_ids().filter(|&id| yes(id)).count() > voters / 2
    }

    /// The highest value that a majority of voters has reached: with `matched` the match
    /// index, the index stored on a majority (§5.3); with read sequence numbers, the highest
    /// read round a majority confirmed (thesis §6.4). 0 with no voters.
    pub fn quorum_value(&self, matched: impl Fn(NodeId) -> u64) -> u64 {
        let mut values: Vec<u64> = self.voter_ids().map(matched).collect();
        if values.is_empty() {
            return 0;
        }
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[values.len() / 2]
    }

    /// The configuration after `change`, or why it is invalid (unknown ID, ID in use, a change
    /// that would leave no voter). A change that is already in effect is not an error: the
    /// caller answers it as done, so that a retried request is idempotent.
    pub fn apply(&self, change: &ConfChange) -> Result<Membership, String> {
        let mut members = self.members.clone();
        match change {
            ConfChange::AddLearner { id, address } | ConfChange::Rejoin { id, address } => {
                if *id == 0 {
                    return Err("node ID 0 is not valid".into());
                }
                if let Err(e) = check_address(address) {
                    return Err(format!("address {address:?} for node {id}: {e}"));
                }
                if let Some(m) = self.get(*id) {
                    return Err(format!(
                        "node ID {id} is in use: a {} at {}",
                        m.role.name(),
                        m.address
                    ));
                }
                if let Some(m) = self.members.iter().find(|m| m.address == *address) {
                    return Err(format!(
                        "address {address} is in use by node {} ({})",
                        m.id,
                        m.role.name()
                    ));
                }
                members.push(Member {
                    id: *id,
                    address: address.clone(),
                    role: MemberRole::Learner,
                });
            }
            ConfChange::Promote { id } => match members.iter_mut().find(|m| m.id == *id) {
                None => return Err(format!("node {id} is not a member")),
                Some(m) => m.role = MemberRole::Voter,
            },
            ConfChange::Remove { id } => {
                if !self.contains(*id) {
                    return Err(format!("node {id} is not a member"));
                }
                members.retain(|m| m.id != *id);
                if !members.iter().any(|m| m.role == MemberRole::Voter) {
                    return Err(format!("removing node {id} would leave no voter"));
                }
            }
        }
        // The configuration entry must fit one AppendEntries datagram, as a client's entry
        // must: one that does not could never be replicated.
        let next = Membership::new(members);
        if ENTRY_OVERHEAD + next.encoded_len() > MAX_ENTRY_ESCAPED {
            return Err(format!(
                "a configuration of {} members would not fit one datagram",
                next.members.len()
            ));
        }
        Ok(next)
    }

    /// An upper bound on this configuration's size inside a JSON datagram.
    pub fn encoded_len(&self) -> usize {
        self.members
            .iter()
            .map(|m| ENTRY_OVERHEAD + escaped_len(&m.address))
            .sum()
    }

    /// Whether `change` is already in effect in this configuration.
    pub fn has_applied(&self, change: &ConfChange) -> bool {
        match change {
            ConfChange::AddLearner { id, address } | ConfChange::Rejoin { id, address } => self
                .get(*id)
                .is_some_and(|m| m.address == *address && m.role == MemberRole::Learner),
            ConfChange::Promote { id } => self.is_voter(*id),
            ConfChange::Remove { id } => !self.contains(*id),
        }
    }

    /// Members as `id@address(role)`, for logs and errors.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .members
            .iter()
            .map(|m| match m.role {
                MemberRole::Voter => format!("{}@{}", m.id, m.address),
                MemberRole::Learner => format!("{}@{} (learner)", m.id, m.address),
            })
            .collect();
        format!("[{}]", parts.join(", "))
    }

    /// A fingerprint of this configuration under a cluster name: peers bootstrapped from the
    /// same initial members and name compute the same ID, and any disagreement (a member, a
    /// role, the name) gives another one. Addresses are left out: they are each peer's view
    /// (behind a NAT or a test proxy, two peers reach a third at different addresses).
    /// FNV-1a over a canonical text form.
    pub fn cluster_id(&self, name: &str) -> u64 {
        let mut text = format!("{name}\n");
        for m in &self.members {
            text.push_str(&format!("{} {}\n", m.id, m.role.name()));
        }
        data_hash(&text)
    }
}

/// The longest address accepted: a DNS name (253 bytes at most), a colon and a port.
pub const MAX_ADDRESS_LEN: usize = 253 + 6;

/// A `host:port` with a non-empty host and a port from 1 to 65535, at most
/// [`MAX_ADDRESS_LEN`] bytes.
pub fn check_address(address: &str) -> Result<(), String> {
    if address.len() > MAX_ADDRESS_LEN {
        return Err(format!(
            "{} bytes long; the limit is {MAX_ADDRESS_LEN}",
            address.len()
        ));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_string())?;
    if host.is_empty() {
        return Err("empty host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("port {port:?} must be 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: NodeId, role: MemberRole) -> Member {
        Member {
            id,
            address: format!("127.0.0.1:{}", 9000 + id),
            role,
        }
    }

    #[test]
    fn learners_count_in_no_quorum() {
        let m = Membership::new(vec![
            member(1, MemberRole::Voter),
            member(2, MemberRole::Voter),
            member(3, MemberRole::Voter),
            member(4, MemberRole::Learner),
            member(5, MemberRole::Learner),
        ]);
        assert_eq!(m.quorum(), 2);
        assert!(!m.has_quorum(|id| id == 1 || id >= 4));
        assert!(m.has_quorum(|id| id <= 2));
        // Match indexes: the learners are far ahead, but only voters count.
        assert_eq!(m.quorum_value(|id| [0, 5, 3, 1, 9, 9][id as usize]), 3);
        assert!(!Membership::default().has_quorum(|_| true));
    }

    #[test]
    fn majorities_of_configurations_one_voter_apart_overlap() {
        // Thesis §4.2: the reason single-server changes need no joint consensus, checked
        // exhaustively for up to 6 voters, adding or removing one.
        for n in 1..=6u64 {
            let old: Vec<NodeId> = (1..=n).collect();
            let grown: Vec<NodeId> = (1..=n + 1).collect();
            let shrunk: Vec<NodeId> = (1..n).collect();
            for new in [grown, shrunk] {
                if new.is_empty() {
                    continue;
                }
                let (a, b) = (Membership::voters(&old), Membership::voters(&new));
                let all = 1u64 << (n + 1);
                for x in 0..all {
                    for y in 0..all {
                        let (qa, qb) = (
                            a.has_quorum(|i| x >> i & 1 == 1),
                            b.has_quorum(|i| y >> i & 1 == 1),
                        );
                        if qa && qb {
                            assert_ne!(
                                x & y & !1,
                                0,
                                "{old:?} vs {new:?}: {x:b} and {y:b} disjoint"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn changes_are_checked() {
        let m = Membership::new(vec![
            member(1, MemberRole::Voter),
            member(2, MemberRole::Learner),
        ]);
        let add = |id, address: &str| ConfChange::AddLearner {
            id,
            address: address.into(),
        };
        assert!(m
            .apply(&add(2, "127.0.0.1:1"))
            .unwrap_err()
            .contains("in use"));
        assert!(m
            .apply(&add(3, "127.0.0.1:9001"))
            .unwrap_err()
            .contains("in use by node 1"));
        assert!(m
            .apply(&add(3, "nohost"))
            .unwrap_err()
            .contains("HOST:PORT"));
        assert!(m.apply(&add(3, "h:0")).is_err());
        let grown = m.apply(&add(3, "h:1")).unwrap();
        assert_eq!(grown.get(3).unwrap().role, MemberRole::Learner);
        assert!(grown.has_applied(&add(3, "h:1")));
        assert!(m
            .apply(&ConfChange::Promote { id: 7 })
            .unwrap_err()
            .contains("not a member"));
        assert!(m.apply(&ConfChange::Promote { id: 2 }).unwrap().is_voter(2));
        assert!(m
            .apply(&ConfChange::Remove { id: 1 })
            .unwrap_err()
            .contains("no voter"));
        assert!(m
            .apply(&ConfChange::Remove { id: 9 })
            .unwrap_err()
            .contains("not a member"));
        assert!(!m.apply(&ConfChange::Remove { id: 2 }).unwrap().contains(2));
    }

    #[test]
    fn cluster_ids_differ_when_the_initial_members_or_name_differ_but_not_addresses() {
        let a = Membership::new(vec![
            member(1, MemberRole::Voter),
            member(2, MemberRole::Voter),
        ]);
        let mut b = a.clone();
        b.members[1].address = "127.0.0.1:1".into();
        assert_eq!(a.cluster_id("raft"), b.cluster_id("raft"));
        assert_eq!(
            a.cluster_id("raft"),
            Membership::voters(&[1, 2]).cluster_id("raft")
        );
        assert_ne!(a.cluster_id("raft"), a.cluster_id("other"));
        assert_ne!(
            a.cluster_id("raft"),
            Membership::voters(&[1, 2, 3]).cluster_id("raft")
        );
        assert_ne!(
            a.cluster_id("raft"),
            Membership::voters(&[1, 3]).cluster_id("raft")
        );
    }
}
