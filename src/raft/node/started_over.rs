//! A peer started over on an empty data dir (`--join`, or added back with `--rejoin`) has lost
//! its votes and its log, yet a member whose log ends before this ID's removal still counts it
//! as a voter: it must not vote until its log holds everything committed when its cluster
//! first reached it. That is the case once its log has reached the leader's last index at
//! first contact (the vote floor), whatever later leaders truncate: they remove only
//! uncommitted entries (Leader Completeness, §5.4).
//!
//! Nor is it the server its log's old configurations list: a removal of its ID that the
//! leader had in its log at first contact removed an earlier server, and replaying it must not
//! stop this one, whether or not the entry adding it back is in its log yet (a leader that
//! lost that entry tells it the real commit index, as it tells any removed member).

use super::*;

impl Node {
    /// The shell adopted its cluster from an AppendEntries of `term` (and made the floor
    /// durable first): no vote, pre-vote or campaign until the log reaches `floor`.
    pub fn set_vote_floor(&mut self, floor: Index, term: Term) {
        self.vote_floor = (floor, term);
        self.started_over = (floor, term);
        self.reached_vote_floor();
    }

    /// The index the log must reach before this node votes; 0 once it has (or never had one).
    pub fn vote_floor(&self) -> Index {
        self.vote_floor.0
    }

    /// Whether this node may grant a vote or pre-vote, or stand: clears the floor for good
    /// once the log has reached its index, or holds an entry of a later term than the
    /// AppendEntries that set it: a leader of such a term held every entry committed before
    /// it (§5.4) and appended its own after them, and our log matches its log up to there. So
    /// a later leader that truncated the tail the floor counted cannot wedge it.
    pub(super) fn reached_vote_floor(&mut self) -> bool {
        let (floor, term) = self.vote_floor;
        if floor != 0 && (self.log.last_index() >= floor || self.log.last_term() > term) {
            info!(
                "node {}: log at {} (term {}) holds all its cluster had committed when it first reached this peer (up to index {floor}, term {term}): it votes from now on",
                self.cfg.id,
                self.log.last_index(),
                self.log.last_term()
            );
            self.vote_floor = (0, 0);
        }
        self.vote_floor.0 == 0
    }

    /// Whether the floor lets this node vote for a candidate whose log ends at (`index`,
    /// `term`): once reached, always; below it, only for a candidate whose log is at least as up
    /// to date as the floor's point, so holds all that was committed when the cluster first
    /// reached us (a last entry of a later term, or of that term at or past the floor). A
    /// promoted node that is still catching up must not withhold its vote from an up-to-date
    /// candidate, or a cluster that needs it could never elect anyone.
    pub(super) fn vote_floor_allows(&mut self, index: Index, term: Term) -> bool {
        let (floor, floor_term) = self.vote_floor;
        self.reached_vote_floor() || term > floor_term || (term == floor_term && index >= floor)
    }

    /// Whether the configuration entry `removal` (index, term; (0, 0) if folded into a
    /// snapshot) removed an earlier server with our ID: this one started over after it. Its
    /// leader at first contact had every committed entry (§5.4) up to where its log stood, so
    /// a removal at or before that point, of no later term, came before this server.
    pub(super) fn removed_an_earlier_server(&self, removal: (Index, Term)) -> bool {
        let (at, term) = self.started_over;
        at != 0 && removal.0 <= at && removal.1 <= term
    }

    /// A vote or pre-vote refused for the floor, logged at debug level.
    pub(super) fn below_vote_floor(&self, candidate: NodeId) {
        debug!(
            "node {}: no vote for {}: started over on an empty data dir, log at {} of {}",
            self.cfg.id,
            candidate,
            self.log.last_index(),
            self.vote_floor.0
        );
    }
}

/// The vote floor an AppendEntries that first reaches a peer started over sets: as far as the
/// leader's log reached then (`prev_log_index` is the leader's last index for a follower it
/// has not heard from), or its commit index if larger.
pub fn vote_floor_from(prev_log_index: Index, entries: usize, leader_commit: Index) -> Index {
    (prev_log_index + entries as Index).max(leader_commit)
}
