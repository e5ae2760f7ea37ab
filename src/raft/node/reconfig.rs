//! Membership changes on the leader (thesis §4.2, one server at a time): checking a request,
//! appending the configuration entry, keeping the followers' progress in step with it, and
//! what happens once it commits (a removed leader steps down, removed members are told).

use super::*;
use crate::raft::guard;
use crate::raft::membership::Member;

/// A learner is promoted only once its match index is within this many entries of the
/// leader's last index (as etcd judges a learner ready), and it answered within an election
/// timeout: a voter that is far behind would stall commitment until it caught up.
pub const PROMOTE_MAX_LAG: Index = 1024;

impl Node {
    /// `client members`: the configuration in force here; the leader adds each follower's
    /// match index and lag.
    pub(super) fn members_info(&self) -> ClientResult {
        let last = self.log.last_index();
        let members = self
            .membership()
            .members
            .iter()
            .map(|m| {
                let progress = if self.role != Role::Leader {
                    None
                } else if m.id == self.cfg.id {
                    Some(last)
                } else {
                    self.progress.get(&m.id).map(|p| p.match_index)
                };
                MemberInfo {
                    id: m.id,
                    address: m.address.clone(),
                    role: m.role,
                    match_index: progress,
                    lag: progress.map(|p| last.saturating_sub(p)),
                }
            })
            .collect();
        ClientResult::Members {
            leader: self.leader,
            config_index: self.config_index(),
            committed: self.config_index() <= self.log.commit,
            members,
        }
    }

    /// Starts a membership change, or answers why not. A change already in effect is answered
    /// as done (or waits for its entry to commit), so a retried request is idempotent. Last of
    /// all, unless `force`, the quorum guard ([`guard::check`]): refused, or Busy while it
    /// waits to hear from voters this leader has not heard from yet.
    pub(super) fn change_members(&mut self, waiter: Waiter, change: ConfChange, force: bool) {
        let refuse = |reason: String| ClientResult::Refused { reason };
        let busy = |reason: String| ClientResult::Busy { reason };
        let latest_index = self.config_index();
        if let ConfChange::Remove { id } = change {
            if !self.configs.ever_member(id) {
                return self.reply(waiter, refuse(format!("node {id} is not a member")));
            }
        }
        // A removed server takes no further part (it ignores everything), so its ID comes
        // back only when asked for explicitly (`Rejoin`, with a peer started over on an empty
        // data dir); this keeps a late duplicate of an old request from re-adding it.
        if let ConfChange::AddLearner { id, .. } = change {
            if !self.membership().contains(id) && self.configs.ever_member(id) {
                let reason = format!(
                    "node {id} was removed from the cluster; join with a new ID, or add it back explicitly (client add-learner --rejoin) with its peer started over on an empty data dir"
                );
                return self.reply(waiter, refuse(reason));
            }
        }
        if self.membership().has_applied(&change) {
            if latest_index > self.log.commit {
                self.waiters.insert(latest_index, waiter);
            } else {
                let done = ClientResult::Configured {
                    index: latest_index,
                    term: self.log.term_at(latest_index).unwrap_or(0),
                    members: self.membership().members.clone(),
                };
                self.reply(waiter, done);
            }
            return;
        }
        // At most one uncommitted configuration (thesis §4.2). Not a refusal: it may be
        // committed already without this leader knowing yet (one it inherited), and the
        // change can go ahead once it is.
        if latest_index > self.log.commit {
            let reason = format!(
                "a configuration change is in progress (index {latest_index}, not yet committed)"
            );
            return self.reply(waiter, busy(reason));
        }
        // Ongaro, raft-dev 2015: a leader may append a configuration only once an entry of its
        // own term is committed, or a change of a deposed leader could still commit beside it.
        if self.log.term_at(self.log.commit) != Some(self.term) {
            let reason = "the leader has not yet committed an entry of its term".to_string();
            return self.reply(waiter, busy(reason));
        }
        if let Some(t) = &self.transfer {
            let reason = format!("a leadership transfer to node {} is in progress", t.target);
            return self.reply(waiter, busy(reason));
        }
        let next = match self.membership().apply(&change) {
            Ok(next) => next,
            Err(reason) => return self.reply(waiter, refuse(reason)),
        };
        if let ConfChange::Promote { id } = change {
            let p = &self.progress[&id];
            let lag = self.log.last_index().saturating_sub(p.match_index);
            // A match index of 0 means it has acknowledged nothing to this leader: it may
            // not even be running.
            if p.match_index == 0
                || lag > PROMOTE_MAX_LAG
                || p.last_contact_ticks >= self.cfg.election_ticks.1
            {
                let reason = format!(
                    "learner {id} has not caught up: {lag} entries behind (match index {}), last heard {} ticks ago",
                    p.match_index, p.last_contact_ticks
                );
                return self.reply(waiter, busy(reason));
            }
        }
        let (me, timeout) = (self.cfg.id, self.cfg.election_ticks.1);
        let progress = &self.progress;
        let contact = |id| {
            if id == me {
                guard::Contact::Live
            } else {
                guard::contact(progress.get(&id), timeout)
            }
        };
        match guard::check(&change, &next, contact) {
            guard::Verdict::Allowed => {}
            guard::Verdict::TooSoon(reason) if !force => return self.reply(waiter, busy(reason)),
            guard::Verdict::Refused(reason) if !force => {
                info!("node {me}: refusing {change:?}: {reason}");
                return self.reply(waiter, refuse(reason));
            }
            guard::Verdict::TooSoon(reason) | guard::Verdict::Refused(reason) => {
                warn!("node {me}: {change:?} forced past the quorum guard: {reason}");
            }
        }
        info!(
            "node {}: configuration change {change:?} in term {}: {}",
            self.cfg.id,
            self.term,
            next.describe()
        );
        let index = self.append_entry(Payload::Config(next));
        self.waiters.insert(index, waiter);
        self.replicate_now = true;
    }

    /// The leader appended configuration entries: followers' progress follows the new
    /// configuration at once (§4.1); a removed member is kept on as leaving until it can have
    /// learned that its removal committed.
    pub(super) fn sync_progress(&mut self, index: Index) {
        let me = self.cfg.id;
        let next = self.log.last_index();
        let members: Vec<NodeId> = self.membership().ids().filter(|&id| id != me).collect();
        for &id in &members {
            // A member added back while still leaving is a new member (its data may be
            // gone): what it acknowledged before says nothing now.
            if self.leaving.remove(&id).is_some() {
                self.progress.insert(id, Progress::new(next));
            }
            self.progress
                .entry(id)
                .or_insert_with(|| Progress::new(next));
        }
        for id in self.progress.keys().copied().collect::<Vec<_>>() {
            if !members.contains(&id) {
                self.leaving.entry(id).or_insert((index, 0, 0));
            }
        }
    }

    /// Decides whether this node has been removed: a committed configuration no longer lists
    /// it, it was a member, and no later configuration added it back. Called only when our
    /// commit index is as new as the leader's (a leader's own, or a follower's that has every
    /// entry the leader says is committed). A member added back after a removal (`Rejoin`, on
    /// an empty data dir) replays its earlier removal while it catches up, and must not take
    /// that for its own: not while the entry adding it back follows in its log, uncommitted
    /// (or committed, but a new leader's commit index lags), nor once a truncation took that
    /// entry away (it is remembered, see `note_undone_removals`); and a leader never tells it
    /// a commit index covering the removal before it can have that entry (see `commit_for`),
    /// nor, whatever a leader tells it, if the removal came before it started over (see
    /// `started_over.rs`). A server removed and not added back still stops.
    pub(super) fn note_removal(&mut self) {
        let (me, commit) = (self.cfg.id, self.log.commit);
        if self.removed || !self.was_member || self.configs.committed(commit).contains(me) {
            return;
        }
        self.note_undone_removals();
        if let Some(removal) = self.configs.removal_at(me, commit) {
            if self.undone_removals.contains(&removal) || self.removed_an_earlier_server(removal) {
                return;
            }
        }
        self.removed = true;
        info!(
            "node {me}: removed from the cluster by the configuration at index {} {}; taking no further part",
            self.configs.committed_index(commit),
            self.configs.committed(commit).describe()
        );
    }

    /// Remembers the removals of this node that a later configuration in the log undid (it
    /// was added back), before a truncation can take that configuration away: a new leader
    /// that never had it tells this node of the old removal, which is still not its own (it
    /// waits, as a joining peer does, to be added back again).
    pub(super) fn note_undone_removals(&mut self) {
        let undone = self.configs.undone_removals(self.cfg.id);
        self.undone_removals.extend(undone);
    }

    /// The commit index to tell `to`. A member of our latest configuration is never told one
    /// at which a configuration that removed it is in force, but the index before that
    /// removal (0 if a snapshot folded it away), until the entry adding it back commits: a
    /// member added back replays its removal first, and the entry adding it back may be
    /// beyond what one AppendEntries carries, or not yet committed.
    pub(super) fn commit_for(&self, to: NodeId) -> Index {
        let commit = self.log.commit;
        if !self.membership().contains(to) {
            return commit;
        }
        match self.configs.removal_at(to, commit) {
            Some((removal, _)) => commit.min(removal.saturating_sub(1)),
            None => commit,
        }
    }

    /// Whether to hold back our snapshot at `index` from `to` for now: it would tell `to` a
    /// commit index that [`Node::commit_for`] does not (a member added back, whose removal
    /// the snapshot covers, before the entry adding it back commits).
    pub(super) fn hold_snapshot(&self, to: NodeId, index: Index) -> bool {
        self.commit_for(to) < index
    }

    /// A new leader keeps telling removed members, as the leader that removed them did (see
    /// `tick_leaving`): its predecessor may have lost leadership before they learned that
    /// their removal committed. It knows nothing of what they acknowledged, so it tells every
    /// server removed by a configuration still in its log (not yet folded into a snapshot).
    pub(super) fn tell_removed_members(&mut self) {
        self.leaving.clear();
        let (me, next) = (self.cfg.id, self.log.last_index() + 1);
        for (id, removal) in self.configs.removed_in_log() {
            if id != me {
                self.progress.insert(id, Progress::new(next));
                self.leaving.insert(id, (removal, 0, 0));
            }
        }
    }

    /// The removed members still being told (see [`Node::contacts`]), as the last
    /// configuration in the log that listed them has them: their address.
    pub fn removed_contacts(&self) -> Vec<Member> {
        self.leaving
            .keys()
            .filter_map(|&id| self.configs.last_listing(id).cloned())
            .collect()
    }

    /// A removed member that answers with an empty log is not the server that was removed but
    /// a peer started over on an empty data dir under its ID, to be added back (`Rejoin`):
    /// replaying the log, it would take the old removal for its own and exit. It is no longer
    /// told (true: `from` is forgotten).
    pub(super) fn started_over(
        &mut self,
        from: NodeId,
        hint_index: Index,
        hint_term: Term,
    ) -> bool {
        if !self.leaving.contains_key(&from) || (hint_index, hint_term) != (1, 0) {
            return false;
        }
        info!(
            "node {}: removed node {from} answers with an empty log: started over, no longer told of its removal",
            self.cfg.id
        );
        self.leaving.remove(&from);
        self.progress.remove(&from);
        true
    }

    /// After the commit index moved: once a configuration without this leader commits, it
    /// steps down (thesis §4.2.2), first handing over with TimeoutNow to an up-to-date voter.
    pub(super) fn after_config_commit(&mut self) {
        if self.role == Role::Leader {
            self.note_removal();
        }
        if self.role != Role::Leader || !self.removed {
            return;
        }
        let last = self.log.last_index();
        let heir = transfer::pick_target(&self.progress, self.configs.latest())
            .filter(|id| self.progress[id].match_index == last);
        if let Some(heir) = heir {
            self.send(heir, self.term, Body::TimeoutNow);
        }
        info!(
            "node {}: stepping down in term {}: no longer a member",
            self.cfg.id, self.term
        );
        self.become_follower(self.term, None);
    }

    /// Stops replicating to a removed member an election timeout after it acknowledged the
    /// entry removing it, once that entry committed: every heartbeat after its acknowledgement
    /// carries a commit index covering its removal, so it learns of it (and its process
    /// exits). A member that never acknowledges (dead, or its disk stalls) is dropped after
    /// ten election timeouts.
    pub(super) fn tick_leaving(&mut self) {
        if self.leaving.is_empty() {
            return;
        }
        let (commit, patience) = (self.log.commit, self.cfg.election_ticks.1);
        let mut gone = Vec::new();
        for (&id, (index, waited, since_ack)) in self.leaving.iter_mut() {
            if *index > commit {
                continue;
            }
            *waited += 1;
            if self
                .progress
                .get(&id)
                .is_some_and(|p| p.match_index >= *index)
            {
                *since_ack += 1;
            }
            if *since_ack >= patience || *waited >= 10 * patience {
                gone.push(id);
            }
        }
        for id in gone {
            self.leaving.remove(&id);
            self.progress.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests;
