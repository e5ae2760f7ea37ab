//! A peer started over on an empty data dir (`--join`, or added back with `--rejoin`) has lost
//! its votes and its log, yet a member whose log ends before this ID's removal still counts it
//! as a voter: it must not vote until its log holds everything committed when its cluster
//! first reached it. That is the case once its log has reached the leader's last index at
//! first contact (the vote floor), whatever later leaders truncate: they remove only
//! uncommitted entries (Leader Completeness, §5.4).

use super::*;

impl Node {
    /// The shell adopted its cluster from an AppendEntries (and made `floor` durable first):
    /// no vote or pre-vote until the log reaches it.
    pub fn set_vote_floor(&mut self, floor: Index) {
        self.vote_floor = floor;
        self.reached_vote_floor();
    }

    /// The index the log must reach before this node votes; 0 once it has (or never had one).
    pub fn vote_floor(&self) -> Index {
        self.vote_floor
    }

    /// Whether this node may grant a vote or pre-vote: clears the floor once the log has
    /// reached it, for good.
    pub(super) fn reached_vote_floor(&mut self) -> bool {
        if self.vote_floor != 0 && self.log.last_index() >= self.vote_floor {
            info!(
                "node {}: log reached index {}, where it stood when the cluster first reached this peer: it votes from now on",
                self.cfg.id, self.vote_floor
            );
            self.vote_floor = 0;
        }
        self.vote_floor == 0
    }

    /// A vote or pre-vote refused for the floor, logged at debug level.
    pub(super) fn below_vote_floor(&self, candidate: NodeId) {
        debug!(
            "node {}: no vote for {}: started over on an empty data dir, log at {} of {}",
            self.cfg.id,
            candidate,
            self.log.last_index(),
            self.vote_floor
        );
    }
}

/// The vote floor an AppendEntries that first reaches a peer started over sets: as far as the
/// leader's log reached then (`prev_log_index` is the leader's last index for a follower it
/// has not heard from), or its commit index if larger.
pub fn vote_floor_from(prev_log_index: Index, entries: usize, leader_commit: Index) -> Index {
    (prev_log_index + entries as Index).max(leader_commit)
}
