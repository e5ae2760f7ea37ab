//! Membership changes on the leader (thesis §4.2, one server at a time): checking a request,
//! appending the configuration entry, keeping the followers' progress in step with it, and
//! what happens once it commits (a removed leader steps down, removed members are told).

use super::*;
use crate::raft::guard;

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
    /// it, and it was a member. Called only when our commit index is as new as the leader's
    /// (a leader's own, or a follower's that has every entry the leader says is committed):
    /// a member added back after a removal (`Rejoin`) replays its earlier removal while it
    /// catches up, and must not take that for its own.
    pub(super) fn note_removal(&mut self) {
        let me = self.cfg.id;
        let committed = self.configs.committed(self.log.commit);
        if self.removed || !self.was_member || committed.contains(me) {
            return;
        }
        self.removed = true;
        info!(
            "node {me}: removed from the cluster by the configuration at index {} {}; taking no further part",
            self.configs.committed_index(self.log.commit),
            committed.describe()
        );
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
