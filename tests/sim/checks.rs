//! Running the world and looking at it: Raft's safety properties, checked after every event
//! (incrementally; in full with `SIM_PARANOID=1`), and what a test may observe.

use super::*;

impl Sim {
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

    /// Processes `n` events, or fewer if `within` passes first.
    pub fn run_events_within(&mut self, n: u64, within: Time) {
        let end = self.now + within;
        for _ in 0..n {
            if self.events.first_key_value().is_none_or(|(k, _)| k.0 > end) {
                self.now = end;
                return;
            }
            self.step();
        }
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

    /// Every live node of `among` that believes it is leader, whatever its term.
    pub fn leaders_among(&self, among: &[NodeId]) -> Vec<NodeId> {
        among
            .iter()
            .copied()
            .filter(|&i| self.node(i).is_some_and(|n| n.role() == Role::Leader))
            .collect()
    }

    /// A leader that a majority of live nodes follow in its term (a settled cluster), among
    /// the nodes not cut off by [`Sim::disconnect`] (as the MIT lab's `checkOneLeader` looks
    /// only at connected servers: a disconnected leader is not a leader the cluster has).
    pub fn stable_leader(&self) -> Option<NodeId> {
        if self.disconnected.is_empty() {
            let leader = *self.leaders().first()?;
            let quorum = self.node(leader)?.membership().quorum();
            return (self.followers_of(leader, &self.ids) >= quorum).then_some(leader);
        }
        let connected: Vec<NodeId> = self
            .ids
            .iter()
            .copied()
            .filter(|&i| self.is_connected(i))
            .collect();
        self.stable_leader_among(&connected)
    }

    /// A leader among `among` (of the highest term any of them leads in) that a majority of
    /// the voters of its configuration follow in its term, counting only those of `among`.
    pub fn stable_leader_among(&self, among: &[NodeId]) -> Option<NodeId> {
        let leader = self
            .leaders_among(among)
            .into_iter()
            .max_by_key(|&l| self.node(l).map(|n| n.term()))?;
        let quorum = self.node(leader)?.membership().quorum();
        (self.followers_of(leader, among) >= quorum).then_some(leader)
    }

    /// The voters of `leader`'s configuration among `among` that follow it in its term, itself
    /// included.
    fn followers_of(&self, leader: NodeId, among: &[NodeId]) -> usize {
        let Some(node) = self.node(leader) else {
            return 0;
        };
        let term = node.term();
        node.membership()
            .voter_ids()
            .filter(|v| among.contains(v))
            .filter(|&v| {
                self.node(v)
                    .is_some_and(|n| n.term() == term && n.leader() == Some(leader))
            })
            .count()
    }

    pub fn wait_for_leader(&mut self, within: Time) -> NodeId {
        if !self.run_until(within, |s| s.stable_leader().is_some()) {
            self.fail("no leader elected in time");
        }
        self.stable_leader().unwrap()
    }

    /// Runs until some node of `among` leads a majority of its configuration's voters from
    /// within `among`; returns it.
    pub fn wait_for_leader_among(&mut self, among: &[NodeId], within: Time) -> NodeId {
        if !self.run_until(within, |s| s.stable_leader_among(among).is_some()) {
            self.fail(&format!("no leader elected among {among:?} in time"));
        }
        self.stable_leader_among(among).unwrap()
    }

    /// Lets a minority settle for `settle` (a stale leader steps down by check quorum within
    /// two minimum election timeouts), then runs for `during`, failing if any live node of
    /// `minority` is Leader at any moment of it.
    pub fn assert_no_leader_among(&mut self, minority: &[NodeId], settle: Time, during: Time) {
        self.run_for(settle);
        if self.run_until(during, |s| !s.leaders_among(minority).is_empty()) {
            self.fail(&format!(
                "node {:?} is leader without a majority",
                self.leaders_among(minority)
            ));
        }
    }

    /// The longest committed prefix any node knows, as (index, term, payload) entries.
    pub fn committed_log(&self) -> Vec<Entry> {
        self.committed.values().map(|(e, _)| e.clone()).collect()
    }

    /// How many live nodes have committed `index`.
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

    /// How many terms have had a leader.
    pub fn elections(&self) -> usize {
        self.leader_of_term.len()
    }

    /// Appends acknowledged to clients so far.
    pub fn acked_appends(&self) -> usize {
        self.clients
            .iter()
            .map(|c| {
                c.done
                    .iter()
                    .filter(|o| matches!(o, Op::Append { .. }))
                    .count()
            })
            .sum()
    }

    pub fn answered_queries(&self) -> usize {
        self.clients
            .iter()
            .map(|c| {
                c.done
                    .iter()
                    .filter(|o| matches!(o, Op::Query { .. }))
                    .count()
            })
            .sum()
    }

    pub fn refused_appends(&self) -> usize {
        self.clients
            .iter()
            .map(|c| {
                c.done
                    .iter()
                    .filter(|o| matches!(o, Op::Refused { .. }))
                    .count()
            })
            .sum()
    }

    pub fn client_retries(&self) -> u64 {
        self.clients.iter().map(|c| c.retries).sum()
    }

    // ---- invariants --------------------------------------------------------------------------

    /// The latest committed configuration.
    pub fn committed_config(&self) -> Membership {
        self.committed_configs.values().next_back().unwrap().clone()
    }

    pub(super) fn bootstrap(&self, id: NodeId) -> Membership {
        if self.joined.contains(&id) {
            Membership::default()
        } else {
            Membership::voters(&self.initial)
        }
    }

    /// Checks made when leader `id` of `term` writes a configuration entry at `index`
    /// (`before`: the entries it writes with it, ahead of it): Ongaro's rule (an entry of its
    /// term is committed), at most one uncommitted configuration, and one server changed.
    pub(super) fn leader_appends_config(
        &self,
        id: NodeId,
        term: Term,
        index: Index,
        m: &Membership,
        before: &[Entry],
    ) {
        let node = self.nodes[&id].as_ref().unwrap();
        let commit = node.commit_index();
        if node.log().term_at(commit) != Some(term) {
            self.fail(&format!(
                "leader {id} of term {term} appends configuration {index} before committing an \
                 entry of its term (commit {commit}): Ongaro's rule"
            ));
        }
        let disk = &self.disks[&id].entries;
        let (prev_index, prev) = before
            .iter()
            .rev()
            .chain(disk.iter().rev())
            .find_map(|e| match &e.payload {
                Payload::Config(m) => Some((e.index, m.clone())),
                _ => None,
            })
            .unwrap_or_else(|| match &self.disks[&id].snapshot {
                // The WAL was compacted: the configuration in force at the snapshot's index.
                Some((s, _)) => (s.config_at.0, s.membership.clone()),
                None => (0, self.bootstrap(id)),
            });
        if prev_index > commit {
            self.fail(&format!(
                "leader {id} of term {term} appends configuration {index} while {prev_index} is \
                 uncommitted (commit {commit})"
            ));
        }
        if member_changes(&prev, m) > 1 {
            self.fail(&format!(
                "leader {id} of term {term} changes more than one server at {index}: {} (at \
                 {prev_index}) -> {} (in force: {} at {})",
                prev.describe(),
                m.describe(),
                node.membership().describe(),
                node.config_index()
            ));
        }
    }

    /// A leader's commit index moved: the entry there must be on the disks of a majority of
    /// the voters of its configuration (learners count for nothing). Also for a leader that
    /// has just stepped down on committing its own removal.
    pub(super) fn leader_commit_check(&mut self, id: NodeId) {
        let Some(node) = self.nodes[&id].as_ref() else {
            return;
        };
        let commit = node.commit_index();
        if commit <= self.leader_commit_checked.get(&id).copied().unwrap_or(0) {
            return;
        }
        self.leader_commit_checked.insert(id, commit);
        let term = node.term();
        let leading = node.role() == Role::Leader
            || (node.removed() && self.was_leader.get(&id) == Some(&term));
        if !leading {
            return;
        }
        let m = node.membership();
        let Some(&h) = self.prefix[&id].get(commit as usize - 1) else {
            self.fail(&format!(
                "leader {id} of term {term} committed {commit}, beyond its durable log"
            ));
        };
        let holders: Vec<NodeId> = m
            .voter_ids()
            .filter(|v| self.prefix.get(v).and_then(|p| p.get(commit as usize - 1)) == Some(&h))
            .collect();
        if holders.len() < m.quorum() {
            self.fail(&format!(
                "leader {id} of term {term} committed {commit}, stored only on voters \
                 {holders:?} of its configuration {}",
                m.describe()
            ));
        }
    }

    /// Raft's safety properties (Figure 3), checked after every event that touched `id`:
    /// O(1) per event plus the work of what changed, so that long runs stay cheap.
    pub(super) fn check(&mut self, id: NodeId) {
        let Some(node) = self.nodes[&id].as_ref() else {
            return;
        };
        self.checks += 1;
        let (term, commit, role) = (node.term(), node.commit_index(), node.role());
        let last_index = node.log().last_index();
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
        if commit > last_index {
            self.fail(&format!(
                "node {id}: commit {commit} beyond its last index {last_index}"
            ));
        }
        if node.applied_index() != commit {
            self.fail(&format!(
                "node {id}: applied {} != commit {commit}",
                node.applied_index()
            ));
        }
        // Once a Ready is carried out, the log in memory is the log on disk (so checks made on
        // what was written hold for what the node uses). Cheap always, in full now and then.
        let d = &self.disks[&id];
        if d.base != node.log().base() {
            self.fail(&format!(
                "node {id}: log in memory starts after {:?}, its WAL after {:?}",
                node.log().base(),
                d.base
            ));
        }
        if d.store.len() as Index != node.applied_index() {
            self.fail(&format!(
                "node {id}: applied {} but its store holds {} records",
                node.applied_index(),
                d.store.len()
            ));
        }
        let disk = &d.entries;
        let full = self.paranoid || self.checks.is_multiple_of(512);
        if d.last_index() != last_index
            || disk.last() != node.log().entries().last()
            || (full && disk[..] != node.log().entries()[..])
        {
            let base = d.base.0;
            let at = (0..disk.len().min(node.log().entries().len()))
                .find(|&k| disk[k] != node.log().entries()[k])
                .map_or(String::new(), |k| {
                    format!(", first difference at {}", base + k as Index + 1)
                });
            self.fail(&format!(
                "node {id}: log in memory (last {last_index}) is not its durable log (last {}){at}",
                d.last_index()
            ));
        }
        // One vote per term (§5.2), across restarts: the vote is durable once the Ready that
        // changed it is carried out, and no node may then vote for anyone else in that term.
        if let Some(v) = node.vote() {
            if let Some(&before) = self.votes.get(&(term, id)) {
                if before != v {
                    self.fail(&format!(
                        "node {id} voted for {before} and then {v} in term {term}"
                    ));
                }
            } else {
                self.votes.insert((term, id), v);
            }
        }
        // Learners, joining and removed servers never campaign (thesis §4.2.1).
        if matches!(role, Role::Candidate | Role::PreCandidate)
            && (!node.membership().is_voter(id) || node.removed())
        {
            self.fail(&format!(
                "node {id} campaigns in term {term} but is no voter of {}",
                node.membership().describe()
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
        // Only indices not yet checked in this node's life.
        let from = self.checked_commit[&id] + 1;
        for index in from..=commit {
            let node = self.nodes[&id].as_ref().unwrap();
            if index <= node.log().base().0 {
                // Compacted: the store's record stands for the entry.
                let r = &self.disks[&id].store[index as usize - 1];
                match self.committed.get(&index) {
                    Some((e, _)) if record_matches(r, e) => {}
                    other => self.fail(&format!(
                        "node {id} holds {r:?} at compacted index {index}; committed there: \
                         {other:?}"
                    )),
                }
                continue;
            }
            let entry = node
                .log()
                .get(index)
                .expect("committed entry present")
                .clone();
            self.check_committed(id, term, entry);
        }
        self.checked_commit.insert(id, commit.max(from - 1));
        self.check_store(id);
        if role == Role::Leader && self.was_leader.get(&id) != Some(&term) {
            self.was_leader.insert(id, term);
            self.new_leader(id, term);
        }
        if role == Role::Leader {
            self.leader_append_only(id, term);
            self.match_indices_are_sound(id, term);
        } else {
            self.leader_tail.remove(&id);
        }
        if self.paranoid {
            self.full_check(id);
        }
    }

    /// State Machine Safety: `entry`, committed by node `id` in `term`, is what every node
    /// committed at its index.
    pub(super) fn check_committed(&mut self, id: NodeId, term: Term, entry: Entry) {
        let index = entry.index;
        match self.committed.get(&index) {
            Some((e, _)) if *e != entry => self.fail(&format!(
                "node {id} committed {entry:?} at {index}, another committed {e:?}"
            )),
            Some(_) => {}
            None => self.newly_committed(id, term, entry),
        }
    }

    /// State Machine Safety on the applied history: every store's records agree with every
    /// other's (duplicates included) and with the committed entries. Incremental: each
    /// record is checked once per content.
    pub(super) fn check_store(&mut self, id: NodeId) {
        let from = self.store_checked.get(&id).copied().unwrap_or(0);
        let store = &self.disks[&id].store;
        for (k, r) in store.iter().enumerate().skip(from) {
            match self.committed.get(&(k as Index + 1)) {
                Some((e, _)) if r.index == k as Index + 1 && record_matches(r, e) => {}
                other => self.fail(&format!(
                    "node {id}'s store holds {r:?} at {}; committed there: {other:?}",
                    k + 1
                )),
            }
            match self.applied_records.get(k) {
                Some(first) if first != r => self.fail(&format!(
                    "node {id}'s store holds {r:?} at {}, another's {first:?}",
                    k + 1
                )),
                Some(_) => {}
                None => self.applied_records.push(r.clone()),
            }
        }
        let len = store.len();
        self.store_checked.insert(id, len);
    }

    /// A committed index seen for the first time (that it is durable on a majority of the
    /// committing leader's voters is checked in `leader_commit_check`). Committed
    /// configurations form a chain of one-server changes (thesis §4.2), so the majorities of
    /// any two consecutive ones overlap.
    pub(super) fn newly_committed(&mut self, id: NodeId, term: Term, entry: Entry) {
        let index = entry.index;
        if let Payload::Config(m) = &entry.payload {
            let prev = self.committed_config();
            if member_changes(&prev, m) > 1 {
                self.fail(&format!(
                    "node {id} committed configuration {index} {} after {}: more than one \
                     server changed",
                    m.describe(),
                    prev.describe()
                ));
            }
            self.committed_configs.insert(index, m.clone());
        }
        let top = self.committed_by_term.entry(term).or_default();
        *top = (*top).max(index);
        if index != self.committed_prefix.len() as Index + 1 {
            self.fail(&format!(
                "node {id} committed {index}, but only 1..={} were seen committed",
                self.committed_prefix.len()
            ));
        }
        let h = chain(
            self.committed_prefix.last().copied().unwrap_or(0),
            entry_hash(&entry),
        );
        self.committed_prefix.push(h);
        self.committed.insert(index, (entry, term));
    }

    /// Checks made once when `id` becomes leader of `term`.
    pub(super) fn new_leader(&mut self, id: NodeId, term: Term) {
        // A leader was granted votes by a majority of the voters of its configuration in its
        // term, itself included; a learner's grant counts for nothing.
        let node = self.nodes[&id].as_ref().unwrap();
        let m = node.membership();
        let mut granted = self.grants.get(&(term, id)).cloned().unwrap_or_default();
        if node.vote() == Some(id) {
            granted.insert(id);
        }
        let voters: BTreeSet<NodeId> = granted.into_iter().filter(|&v| m.is_voter(v)).collect();
        if !m.is_voter(id) || voters.len() < m.quorum() {
            self.fail(&format!(
                "node {id} became leader of term {term} with votes from only the voters \
                 {voters:?} of {}",
                m.describe()
            ));
        }
        // Leader Completeness: a leader has every entry committed in an earlier term. By Log
        // Matching (checked on every write) it suffices to check the last such entry.
        let top = self
            .committed_by_term
            .range(..term)
            .map(|(_, &i)| i)
            .max()
            .unwrap_or(0);
        if top > 0 {
            let (entry, _) = &self.committed[&top];
            let held = if top <= node.log().base().0 {
                self.disks[&id]
                    .store
                    .get(top as usize - 1)
                    .is_some_and(|r| record_matches(r, entry))
            } else {
                node.log().get(top) == Some(entry)
            };
            if !held {
                self.fail(&format!(
                    "leader {id} of term {term} lacks committed entry {top} ({entry:?})"
                ));
            }
        }
    }

    /// Leader Append-Only in memory: while leader of the same term, the last index never falls
    /// and the entry at the last index seen stays the same. (Rewrites show up on disk as a
    /// leader's write that is not an append, checked in `persist`.)
    pub(super) fn leader_append_only(&mut self, id: NodeId, term: Term) {
        let log = self.nodes[&id].as_ref().unwrap().log();
        let (last, base) = (log.last_index(), log.base().0);
        if let Some(&(t, before, h)) = self.leader_tail.get(&id) {
            // (An entry compacted since was committed, and checked as such.)
            let changed =
                last < before || (before > base && log.get(before).map(entry_hash) != Some(h));
            if t == term && changed {
                self.fail(&format!(
                    "Leader Append-Only: leader {id} of term {term} changed its log at or below \
                     index {before} (last now {last})"
                ));
            }
        }
        let h = log.get(last).map_or(0, entry_hash);
        self.leader_tail.insert(id, (term, last, h));
        if self.paranoid {
            let entries = log.entries().to_vec();
            if let Some((t, before)) = self.leader_log.get(&id) {
                let shorter = before.last().is_some_and(|e| e.index > last);
                let changed = before
                    .iter()
                    .any(|e| e.index > base && log.get(e.index) != Some(e));
                if *t == term && (shorter || changed) {
                    self.fail(&format!(
                        "Leader Append-Only (full check): leader {id} of term {term} changed its log"
                    ));
                }
            }
            self.leader_log.insert(id, (term, entries));
        }
    }

    /// What a leader counts towards commitment is real: a follower's match index never falls
    /// within the leader's term (no follower here loses what it acknowledged), and the
    /// follower's durable log agrees with the leader's up to it, unless a newer term has since
    /// reached the follower's disk.
    pub(super) fn match_indices_are_sound(&mut self, id: NodeId, term: Term) {
        let node = self.nodes[&id].as_ref().unwrap();
        let info = node.status();
        for f in &info.followers {
            let m = f.match_index;
            if !node.membership().contains(f.id) {
                // A removed server the leader still tells of its removal counts towards no
                // quorum, and if it is added back (`--rejoin`, on an empty disk) the leader
                // starts its progress afresh: its match index may then fall within the term.
                self.match_seen.remove(&(id, f.id));
                // Started over on an empty disk: what it acknowledged in its earlier life is
                // gone, as the leader will learn.
                if self.respawned.contains(&f.id) {
                    continue;
                }
            } else if let Some(&(t, before)) = self.match_seen.get(&(id, f.id)) {
                if t == term && m < before {
                    self.fail(&format!(
                        "leader {id} of term {term}: match index of follower {} fell from \
                         {before} to {m}",
                        f.id
                    ));
                }
            }
            self.match_seen.insert((id, f.id), (term, m));
            if m == 0 || self.disks[&f.id].hard_state.term > term {
                continue;
            }
            let mine = self.prefix[&id].get(m as usize - 1);
            let theirs = self.prefix[&f.id].get(m as usize - 1);
            if mine.is_none() || mine != theirs {
                self.fail(&format!(
                    "leader {id} of term {term} counts follower {} as matching up to {m}, but \
                     its durable log ({} entries) does not agree with the leader's ({})",
                    f.id,
                    self.prefix[&f.id].len(),
                    info.last_index
                ));
            }
        }
    }

    /// The checks the incremental ones stand for, in full: every committed index of the node,
    /// every earlier-term committed entry in a leader's log, Log Matching against every other
    /// live node. Quadratic; only with `SIM_PARANOID`.
    pub(super) fn full_check(&self, id: NodeId) {
        let node = self.nodes[&id].as_ref().unwrap();
        let base = node.log().base().0;
        let store = &self.disks[&id].store;
        // Compacted entries: the store's records stand for them.
        let holds = |index: Index, entry: &Entry| {
            if index <= base {
                store
                    .get(index as usize - 1)
                    .is_some_and(|r| record_matches(r, entry))
            } else {
                node.log().get(index) == Some(entry)
            }
        };
        for index in 1..=node.commit_index() {
            let entry = self.committed.get(&index).map(|c| &c.0);
            if !entry.is_some_and(|e| holds(index, e)) {
                self.fail(&format!(
                    "full check: node {id} committed at {index}, not {entry:?}"
                ));
            }
        }
        if node.role() == Role::Leader {
            for (index, (entry, seen_in)) in &self.committed {
                if *seen_in < node.term() && !holds(*index, entry) {
                    self.fail(&format!(
                        "full check: leader {id} of term {} lacks committed entry {index}",
                        node.term()
                    ));
                }
            }
        }
        let mine = node.log().entries();
        for (other_id, other) in &self.nodes {
            let Some(other) = other else { continue };
            if *other_id == id {
                continue;
            }
            // Only the indices both logs still hold (above both bases).
            let theirs = other.log().entries();
            let (lo, hi) = (
                base.max(other.log().base().0),
                node.log().last_index().min(other.log().last_index()),
            );
            let at = |log: &[Entry], b: Index, i: Index| log[(i - b - 1) as usize].clone();
            let other_base = other.log().base().0;
            if let Some(k) = (lo + 1..=hi)
                .rev()
                .find(|&i| at(mine, base, i).term == at(theirs, other_base, i).term)
            {
                if (lo + 1..=k).any(|i| at(mine, base, i) != at(theirs, other_base, i)) {
                    self.fail(&format!(
                        "full check: Log Matching between nodes {id} and {other_id} at {k}"
                    ));
                }
            }
        }
    }
}
