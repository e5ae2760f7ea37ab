//! Leadership transfer (Raft thesis §3.10): the leader brings a chosen voter's log up to date,
//! sends it TimeoutNow so that it campaigns at once (no pre-vote, no waiting for its election
//! timer), and holds new appends meanwhile so that none is lost with the old leader's term. The
//! transfer is abandoned if no new leader appears within an election timeout.

use super::membership::Membership;
use super::progress::Progress;
use super::ready::Waiter;
use super::types::{ClientId, NodeId, Term};
use std::collections::BTreeMap;

/// One transfer, from the moment the leader accepts it until a leader of a later term is
/// known (success if it is `target`) or it times out.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub target: NodeId,
    /// The term of the leader that started it; a leader of a later term ends it.
    pub term: Term,
    /// Ticks since it started.
    pub elapsed: u64,
    /// TimeoutNow went out: from now on the target may be campaigning.
    pub timeout_now_sent: bool,
    /// Who asked, answered once the outcome is known.
    pub requester: Waiter,
}

/// An append that arrived during a transfer: answered by whoever leads once it ends.
#[derive(Clone, Debug)]
pub struct HeldAppend {
    pub requester: Waiter,
    pub client: ClientId,
    pub seq: u64,
    pub data: String,
}

/// The voter to hand leadership to when none is named: the most up-to-date voter of
/// `membership` (highest match index), the lowest ID among equals, so the choice is
/// deterministic. Learners and leaving members are never picked.
pub fn pick_target(
    progress: &BTreeMap<NodeId, Progress>,
    membership: &Membership,
) -> Option<NodeId> {
    progress
        .iter()
        .filter(|(&id, _)| membership.is_voter(id))
        .max_by(|a, b| a.1.match_index.cmp(&b.1.match_index).then(b.0.cmp(a.0)))
        .map(|(&id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_up_to_date_voter_is_picked_lowest_id_on_ties() {
        let mut progress = BTreeMap::new();
        for (id, m) in [(2, 5), (3, 9), (4, 9), (5, 1)] {
            let mut p = Progress::new(10);
            p.match_index = m;
            progress.insert(id, p);
        }
        let all = Membership::voters(&[1, 2, 3, 4, 5]);
        assert_eq!(pick_target(&progress, &all), Some(3));
        assert_eq!(pick_target(&BTreeMap::new(), &all), None);
        // A learner is never picked, however up to date.
        let without_3 = Membership::voters(&[1, 2, 4, 5]);
        assert_eq!(pick_target(&progress, &without_3), Some(4));
    }
}
