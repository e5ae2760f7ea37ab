//! The administrator: one-server membership changes, retried as a client retries them, and
//! the node slots that start and stop with them.

use super::*;

impl Sim {
    // ---- membership -----------------------------------------------------------------------------

    pub fn admin_busy(&self) -> bool {
        self.admin.is_some()
    }

    /// The administrator gives up on the change in progress (its entry may still commit).
    pub fn admin_abandon(&mut self) {
        self.admin = None;
    }

    /// Asks for `change` and runs until it is answered; returns the answer.
    pub fn change_members_and_wait(&mut self, change: ConfChange, within: Time) -> ClientResult {
        self.change_members(change.clone());
        if !self.run_until(within, |s| !s.admin_busy()) {
            self.fail(&format!("{change:?} not answered in time"));
        }
        self.admin_done.last().unwrap().1.clone()
    }

    /// Asks for one membership change as `client` does: to the leader if one is known, retried
    /// (Busy, NotLeader, timeouts) until it is committed or refused.
    pub fn change_members(&mut self, change: ConfChange) {
        assert!(self.admin.is_none(), "one membership change at a time");
        self.stats.config_requests += 1;
        let target = match self.leaders().first() {
            Some(&l) => l,
            None => self.rng.pick(&self.ids.clone()),
        };
        self.admin = Some(AdminOp {
            change,
            target,
            request_id: 0,
            since: self.now,
            retry_same: false,
        });
        self.admin_send();
    }

    /// A random one-server change toward `cfg.nodes` voters, from the committed configuration:
    /// a learner is promoted (or removed if its node is gone); above `cfg.nodes` voters a
    /// member is removed (the leader as often as not); otherwise a node joins as a learner,
    /// given some members as contact points: a fresh one, or now and then a removed one
    /// started over on an empty disk and added back explicitly ([`ConfChange::Rejoin`]); or,
    /// now and then, a member is removed first. So over a run members are added, promoted,
    /// removed, replaced and re-added, mostly between `cfg.nodes` and one more voter.
    pub fn random_membership_change(&mut self) {
        if self.admin.is_some() {
            return;
        }
        let m = self.committed_config();
        let voters: Vec<NodeId> = m.voter_ids().collect();
        let learner = m
            .members
            .iter()
            .find(|x| x.role == MemberRole::Learner)
            .map(|x| x.id);
        let n = self.cfg.nodes;
        let change = if let Some(id) = learner {
            if self.ids.contains(&id) && self.rng.chance(0.8) {
                ConfChange::Promote { id }
            } else {
                ConfChange::Remove { id }
            }
        } else if voters.len() > n || (voters.len() == n && self.rng.chance(0.1)) {
            let leader = self.leaders().first().copied().filter(|l| m.is_voter(*l));
            let id = match leader {
                Some(l) if self.rng.chance(0.5) => l,
                _ => self.rng.pick(&voters),
            };
            ConfChange::Remove { id }
        } else {
            let contacts = self.random_contacts();
            let rejoinable: Vec<NodeId> = self
                .retired
                .iter()
                .copied()
                .filter(|&r| !m.contains(r) && self.now >= self.retired_at[&r] + self.quiet())
                .collect();
            // Started over a while ago: added back now.
            let waiting: Vec<NodeId> = self
                .awaiting_rejoin
                .iter()
                .filter(|&(_, &since)| self.now >= since + self.quiet())
                .map(|(&id, _)| id)
                .collect();
            if !waiting.is_empty() {
                let id = self.rng.pick(&waiting);
                self.awaiting_rejoin.remove(&id);
                ConfChange::Rejoin {
                    id,
                    address: address_of(id),
                }
            } else if self.cfg.rejoins && !rejoinable.is_empty() && self.rng.chance(0.3) {
                // As an operator does: start the peer over first, add it back later.
                let id = self.rng.pick(&rejoinable);
                self.respawn(id, &contacts);
                self.awaiting_rejoin.insert(id, self.now);
                return;
            } else {
                let id = self.spawn_with_contacts(&contacts);
                ConfChange::AddLearner {
                    id,
                    address: address_of(id),
                }
            }
        };
        self.change_members(change);
    }

    /// Longer than any datagram stays in the network (a long delay at most): a removed node
    /// is started over only after this, so that no message of its earlier life reaches the
    /// new one, and added back (`Rejoin`) only this long after it started over, so that no
    /// message its leader sent to its earlier life (telling it of its removal, with a commit
    /// index not held back) reaches the new one once it replays the log, as with a real
    /// operator's pace. (With a cluster secret, the real peer drops such a datagram anyway:
    /// it is sealed for the earlier incarnation's epoch.)
    fn quiet(&self) -> Time {
        self.cfg.long_delay_range.1 + self.cfg.delay.1
    }

    /// Starts removed node `id` (retired) over on an empty disk, as an operator does before
    /// re-adding it with `add-learner --rejoin`: a joining node again, with `contacts` as its
    /// contact points. What the invariants recorded of its earlier life stays, except what
    /// its wiped disk takes back (its term and votes: it may vote again in a term it voted
    /// in before, which is safe only because its removal committed first).
    pub fn respawn(&mut self, id: NodeId, contacts: &[NodeId]) {
        assert!(self.retired.contains(&id), "node {id} is not retired");
        self.stats.respawns += 1;
        self.retired.remove(&id);
        self.retired_at.remove(&id);
        self.respawned.insert(id);
        self.ids.push(id);
        self.joined.insert(id);
        self.disks.insert(id, Disk::default());
        // A new, empty filesystem.
        self.real.remove(&id);
        self.in_flight.remove(&id);
        self.prefix.insert(id, Vec::new());
        self.store_checked.insert(id, 0);
        self.last_term.remove(&id);
        self.was_leader.remove(&id);
        self.votes.retain(|&(_, voter), _| voter != id);
        self.match_seen.retain(|&(_, follower), _| follower != id);
        self.json_peers.insert(id, contacts.to_vec());
        self.start(id);
        // Its earlier life's tick may still be pending: it goes on ticking the new one.
        let ticking = self
            .events
            .values()
            .any(|e| matches!(e, Event::Tick(t) if *t == id));
        if !ticking {
            let phase = self.rng.range(0, self.cfg.tick - 1);
            self.schedule(phase, Event::Tick(id));
        }
    }

    /// [`Sim::respawn`]s removed node `id` and asks for it back as a learner
    /// ([`ConfChange::Rejoin`]), answered later ([`Sim::admin_done`]).
    pub fn rejoin(&mut self, id: NodeId, contacts: &[NodeId]) {
        self.respawn(id, contacts);
        self.change_members(ConfChange::Rejoin {
            id,
            address: address_of(id),
        });
    }

    /// Restarts down node `id` with a JSON whose `other_peers` are `peers` (kept for later
    /// restarts, as a file is): its address book starts from that list, its `cluster` file
    /// and its log, whatever the cluster has become since.
    pub fn restart_with_peers(&mut self, id: NodeId, peers: &[NodeId]) {
        if self.is_up(id) || self.retired.contains(&id) {
            return;
        }
        let peers = peers.iter().copied().filter(|&p| p != id).collect();
        self.json_peers.insert(id, peers);
        self.stats.old_config_restarts += 1;
        self.restart(id);
    }

    /// [`Sim::restart_with_peers`] with the members of a configuration committed at some
    /// point of the run (the bootstrap one included), at random: a JSON never updated.
    pub fn restart_with_old_config(&mut self, id: NodeId) {
        let at: Vec<Index> = self.committed_configs.keys().copied().collect();
        let at = self.rng.pick(&at);
        let peers: Vec<NodeId> = self.committed_configs[&at].ids().collect();
        self.restart_with_peers(id, &peers);
    }

    /// Stops the nodes whose removal committed and that have not stopped by themselves (they
    /// missed the news, as an operator would stop them).
    pub fn decommission(&mut self) {
        let m = self.committed_config();
        for id in self.decommission.clone() {
            if !m.contains(id) {
                self.retire(id);
            }
        }
    }

    /// Stops every node that is not a member of the committed configuration (with no change
    /// in progress): what an operator does before declaring the cluster settled.
    pub fn retire_non_members(&mut self) {
        assert!(self.admin.is_none());
        let m = self.committed_config();
        for id in self.ids.clone() {
            if !m.contains(id) {
                self.retire(id);
            }
        }
    }

    pub(super) fn admin_send(&mut self) {
        let Some(op) = self.admin.as_mut() else {
            return;
        };
        self.admin_request_id += 1;
        op.request_id = self.admin_request_id;
        op.retry_same = false;
        let req = ClientRequest {
            id: op.request_id,
            op: ClientOp::ChangeMembers {
                change: op.change.clone(),
                force: false,
            },
        };
        let (target, request_id) = (op.target, op.request_id);
        let to = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT));
        self.transmit(Event::Request(target, to, req));
        self.schedule(self.cfg.client_retry, Event::AdminTimer(request_id));
    }

    pub(super) fn admin_timeout(&mut self, request_id: u64) {
        let Some(op) = self.admin.as_ref().filter(|op| op.request_id == request_id) else {
            return;
        };
        if !op.retry_same || !self.ids.contains(&op.target) {
            let ids = self.ids.clone();
            let target = self.rng.pick(&ids);
            self.admin.as_mut().unwrap().target = target;
        }
        self.admin_send();
    }

    pub(super) fn admin_reply(&mut self, reply: ClientReply) {
        let Some(op) = self.admin.clone() else {
            return;
        };
        if reply.id != op.request_id {
            return; // stale or duplicated answer
        }
        if self.paranoid || std::env::var("SIM_VERBOSE").is_ok() {
            println!(
                "t={}ms {:?} from node {}: {:?}",
                self.now / MS,
                op.change,
                reply.from,
                reply.result
            );
        }
        match &reply.result {
            ClientResult::Configured { members, .. } => {
                let m = Membership::new(members.clone());
                if !m.has_applied(&op.change) {
                    self.fail(&format!(
                        "{:?} answered as done with {}",
                        op.change,
                        m.describe()
                    ));
                }
                self.stats.config_changes += 1;
                match op.change {
                    ConfChange::Remove { id } => {
                        self.decommission.insert(id);
                    }
                    ConfChange::Rejoin { .. } => self.stats.rejoins += 1,
                    _ => {}
                }
            }
            ClientResult::Refused { .. } => {
                self.stats.config_refused += 1;
                // A node that never joined stops, unless some log already has it.
                if let ConfChange::AddLearner { id, .. } | ConfChange::Rejoin { id, .. } = op.change
                {
                    let known = self
                        .nodes
                        .values()
                        .flatten()
                        .any(|n| n.id() != id && n.membership().contains(id));
                    if !known && self.ids.contains(&id) {
                        self.retire(id);
                    }
                }
            }
            // Not now: the retry timer asks again, of the same leader.
            ClientResult::Busy { .. } => {
                self.stats.config_busy += 1;
                let op = self.admin.as_mut().unwrap();
                op.target = reply.from;
                op.retry_same = true;
                let request_id = op.request_id;
                self.schedule(20 * MS, Event::AdminTimer(request_id));
                return;
            }
            ClientResult::NotLeader { leader } => {
                if let Some(l) = leader.filter(|&l| l != reply.from && self.ids.contains(&l)) {
                    self.admin.as_mut().unwrap().target = l;
                    self.admin_send();
                }
                return;
            }
            other => self.fail(&format!("unexpected answer {other:?} to {:?}", op.change)),
        }
        self.admin = None;
        self.admin_done.push((op.change, reply.result));
    }
}

/// Where peers reach node `id`, in the configurations the administrator makes.
pub fn address_of(id: NodeId) -> String {
    format!("10.0.{}.{}:7000", id / 256, id % 256)
}
