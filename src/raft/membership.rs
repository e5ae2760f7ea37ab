//! Cluster membership (Raft thesis chapter 4): who the voters and learners are, with their
//! addresses, and the one place that decides whether a set of acknowledgements is a quorum, so
//! that elections, commitment, ReadIndex confirmation and check-quorum all agree.
//!
//! Changes are one server at a time (thesis §4.2): any two majorities of configurations that
//! differ by one voter overlap, so no joint configuration is needed. A configuration takes
//! effect as soon as it is in a server's log, committed or not (§4.1); [`Configurations`]
//! remembers every configuration entry in the log so that truncating an uncommitted one
//! reverts to the one before it.

use super::message::{
    escaped_len, Entry, Index, NodeId, Payload, Term, ENTRY_OVERHEAD, MAX_ENTRY_ESCAPED,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

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
        crate::state_machine::data_hash(&text)
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

/// Every configuration a server knows: the bootstrap one (in force before any configuration
/// entry) and one per configuration entry in its log, by index. The latest is in force (§4.1).
#[derive(Clone, Debug)]
pub struct Configurations {
    base: Membership,
    /// Index and term of the entry that made `base` (0, 0 for the bootstrap configuration);
    /// after a compaction or an installed snapshot, the latest configuration at or below it.
    base_at: (Index, Term),
    /// (index, term, configuration) of each configuration entry in the log, by index.
    entries: Vec<(Index, Term, Membership)>,
    /// IDs of members of configurations compacted away that `base` no longer has: removed
    /// servers, remembered so that a late retry of an old `AddLearner` never re-adds one
    /// (and a retried `Remove` is answered as done) after their entries are gone.
    removed: BTreeSet<NodeId>,
    /// Configuration entries up to here are folded into `base` and `removed` (a compaction or
    /// a snapshot); a late copy of one must not count again (the log may still hold some of
    /// them: it keeps trailing entries before a snapshot).
    folded: Index,
}

impl Configurations {
    /// From the bootstrap configuration and the log as restored.
    pub fn restore(base: Membership, log: &[Entry]) -> Configurations {
        Configurations::restore_after(base, (0, 0), 0, &[], log)
    }

    /// From the configuration in force at a snapshot at index `through` (made by the entry at
    /// `base_at`), the servers removed before it, and the log after it.
    pub fn restore_after(
        base: Membership,
        base_at: (Index, Term),
        through: Index,
        removed: &[NodeId],
        log: &[Entry],
    ) -> Configurations {
        let mut c = Configurations {
            base,
            base_at,
            entries: Vec::new(),
            removed: removed.iter().copied().collect(),
            folded: through,
        };
        c.appended(log);
        c
    }

    /// The configuration in force at `index` and the (index, term) of the entry that made it.
    pub fn at(&self, index: Index) -> (&Membership, (Index, Term)) {
        self.entries
            .iter()
            .rev()
            .find(|(i, _, _)| *i <= index)
            .map_or((&self.base, self.base_at), |(i, t, m)| (m, (*i, *t)))
    }

    /// The log up to `through` is compacted: the configuration in force there becomes the base.
    pub fn compact(&mut self, through: Index) {
        self.removed = self.removed_at(through).into_iter().collect();
        let (m, at) = self.at(through);
        let (m, at) = (m.clone(), at);
        self.base = m;
        self.base_at = at;
        self.entries.retain(|(i, _, _)| *i > through);
        self.folded = self.folded.max(through);
    }

    /// Servers that were members of a configuration up to `index` but are not in the one in
    /// force there: what a snapshot at `index` must remember (see `removed`).
    pub fn removed_at(&self, index: Index) -> Vec<NodeId> {
        let in_force = self.at(index).0;
        let earlier = self
            .entries
            .iter()
            .take_while(|(i, _, _)| *i <= index)
            .flat_map(|(_, _, m)| m.members.iter().map(|x| x.id));
        let ids: BTreeSet<NodeId> = self
            .removed
            .iter()
            .copied()
            .chain(self.base.members.iter().map(|x| x.id))
            .chain(earlier)
            .filter(|&id| !in_force.contains(id))
            .collect();
        ids.into_iter().collect()
    }

    /// The configuration in force: the latest in the log, committed or not.
    pub fn latest(&self) -> &Membership {
        self.entries.last().map_or(&self.base, |(_, _, m)| m)
    }

    /// Index of the latest configuration entry; 0 for the bootstrap configuration.
    pub fn latest_index(&self) -> Index {
        self.entries.last().map_or(self.base_at.0, |(i, _, _)| *i)
    }

    /// Term of the latest configuration entry (0 for the bootstrap configuration): with its
    /// index, it names the entry, even after a truncation put another at the same index.
    pub fn latest_term(&self) -> Term {
        self.entries.last().map_or(self.base_at.1, |(_, t, _)| *t)
    }

    /// The configuration in force once the log is committed up to `commit`.
    pub fn committed(&self, commit: Index) -> &Membership {
        self.at(commit).0
    }

    /// Index of the configuration entry in force once the log is committed up to `commit`
    /// (0: the bootstrap configuration).
    pub fn committed_index(&self, commit: Index) -> Index {
        self.at(commit).1 .0
    }

    /// Whether `id` is or was a member of any configuration known here.
    pub fn ever_member(&self, id: NodeId) -> bool {
        self.removed.contains(&id)
            || self.base.contains(id)
            || self.entries.iter().any(|(_, _, m)| m.contains(id))
    }

    /// Records configuration entries among `entries`, just stored in the log. Entries that
    /// were already there (a duplicated or late AppendEntries) change nothing; a truncated
    /// suffix is dropped by [`Configurations::retain_in_log`] first, not here, so that a stale
    /// prefix of the log never hides a later configuration. Entries already folded by a
    /// compaction or snapshot are skipped.
    pub fn appended(&mut self, entries: &[Entry]) {
        for e in entries.iter().filter(|e| e.index > self.folded) {
            if let Payload::Config(m) = &e.payload {
                self.entries.retain(|(i, _, _)| *i != e.index);
                let at = self.entries.partition_point(|(i, _, _)| *i < e.index);
                self.entries.insert(at, (e.index, e.term, m.clone()));
            }
        }
    }

    /// Forgets configuration entries that are no longer in the log: `term_at` gives the log's
    /// term at an index, and an entry whose (index, term) is gone was truncated (§5.3).
    pub fn retain_in_log(&mut self, term_at: impl Fn(Index) -> Option<Term>) {
        let base = self.base_at.0;
        self.entries
            .retain(|(i, t, _)| *i <= base || term_at(*i) == Some(*t));
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
    fn a_configuration_always_fits_one_datagram() {
        let add = |id: NodeId, address: String| ConfChange::AddLearner { id, address };
        let m = Membership::voters(&[1]);
        let long = format!("{}:1", "h".repeat(60_000));
        assert!(m.apply(&add(2, long)).unwrap_err().contains("limit"));
        // Learners with the longest addresses, until refused: every configuration accepted
        // still fits.
        let mut m = m;
        for id in 2.. {
            let address = format!("{}{id}:1", "h".repeat(MAX_ADDRESS_LEN - 8));
            match m.apply(&add(id, address)) {
                Ok(next) => m = next,
                Err(e) => {
                    assert!(e.contains("datagram"), "{e}");
                    break;
                }
            }
        }
        let entry = Entry {
            index: u64::MAX,
            term: u64::MAX,
            payload: Payload::Config(m.clone()),
        };
        let datagram = crate::raft::message::Message {
            cluster: u64::MAX,
            from: u64::MAX,
            to: u64::MAX,
            term: u64::MAX,
            body: crate::raft::message::Body::AppendEntries {
                prev_log_index: u64::MAX,
                prev_log_term: u64::MAX,
                entries: vec![entry],
                leader_commit: u64::MAX,
                read_seq: u64::MAX,
            },
        };
        let bytes = serde_json::to_vec(&datagram).unwrap();
        assert!(m.members.len() > 50, "{} members", m.members.len());
        assert!(
            bytes.len() <= crate::raft::message::MAX_DATAGRAM,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn the_latest_configuration_is_in_force_and_truncation_reverts_it() {
        let base = Membership::voters(&[1, 2, 3]);
        let config = |index, term, ids: &[NodeId]| Entry {
            index,
            term,
            payload: Payload::Config(Membership::voters(ids)),
        };
        let noop = |index, term| Entry {
            index,
            term,
            payload: Payload::Noop,
        };
        let mut log = vec![noop(1, 1), config(2, 1, &[1, 2, 3, 4]), noop(3, 1)];
        let mut c = Configurations::restore(base.clone(), &log);
        assert_eq!(c.latest(), &Membership::voters(&[1, 2, 3, 4]));
        assert_eq!(c.latest_index(), 2);
        assert_eq!(c.committed(1), &base);
        assert!(c.ever_member(4) && !c.ever_member(5));
        // A new leader of term 2 overwrites index 2 with another entry.
        log.truncate(1);
        log.push(noop(2, 2));
        c.retain_in_log(|i| log.get(i as usize - 1).map(|e| e.term));
        assert_eq!(c.latest(), &base);
        let more = [config(3, 2, &[1, 2]), noop(4, 2), config(5, 2, &[1, 2, 5])];
        c.appended(&more);
        assert_eq!(c.latest(), &Membership::voters(&[1, 2, 5]));
        // A duplicate of an earlier AppendEntries re-delivers the entry at 3.
        c.appended(&more[..1]);
        assert_eq!(
            c.latest_index(),
            5,
            "a duplicate must not drop later configurations"
        );
    }

    #[test]
    fn entries_stored_again_do_not_hide_a_later_configuration() {
        // A late AppendEntries carries a prefix of the log, with an older configuration.
        let config = |index, ids: &[NodeId]| Entry {
            index,
            term: 1,
            payload: Payload::Config(Membership::voters(ids)),
        };
        let log = vec![config(1, &[1, 2, 3, 4]), config(2, &[1, 2, 3])];
        let mut c = Configurations::restore(Membership::voters(&[1, 2, 3]), &log);
        c.appended(&log[..1]);
        assert_eq!(c.latest(), &Membership::voters(&[1, 2, 3]));
        assert_eq!(c.latest_index(), 2);
    }

    #[test]
    fn removed_servers_are_remembered_across_compaction_and_snapshots() {
        let config = |index, ids: &[NodeId]| Entry {
            index,
            term: 1,
            payload: Payload::Config(Membership::voters(ids)),
        };
        // 4 joins and leaves, 5 joins; then the log is compacted past all of it.
        let log = vec![
            config(1, &[1, 2, 3, 4]),
            config(2, &[1, 2, 3]),
            config(3, &[1, 2, 3, 5]),
        ];
        let mut c = Configurations::restore(Membership::voters(&[1, 2, 3]), &log);
        assert_eq!(c.removed_at(1), Vec::<NodeId>::new());
        assert_eq!(c.removed_at(2), vec![4]);
        c.compact(3);
        assert!(c.ever_member(4) && c.ever_member(5) && !c.ever_member(6));
        assert_eq!(c.removed_at(3), vec![4]);
        // A snapshot at 3 carries it to a server that restores from it.
        let restored =
            Configurations::restore_after(c.latest().clone(), (3, 1), 3, &c.removed_at(3), &[]);
        assert!(restored.ever_member(4));
        // Added back (an explicit rejoin), 4 is a member, not a removed one.
        c.appended(&[config(4, &[1, 2, 3, 4, 5])]);
        assert_eq!(c.removed_at(4), Vec::<NodeId>::new());
        c.compact(4);
        assert_eq!(c.removed_at(4), Vec::<NodeId>::new());
        assert!(c.ever_member(4));
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
