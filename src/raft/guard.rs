//! The quorum guard (as etcd's `--strict-reconfig-check`): the leader refuses a membership
//! change after which the voters it has heard from within the last election timeout would not
//! be a majority of the new configuration's voters. Such a change may be accepted, but its
//! configuration is in force as soon as it is appended (thesis §4.1), so the cluster stops
//! until enough of the silent voters come back: removing a live voter while another is down
//! leaves one live voter of two. The client's `--force` skips the check.

use super::membership::{ConfChange, Membership};
use super::types::NodeId;

/// Ends every refusal by the guard, so that a client can tell it from other refusals (and
/// offer to force the change).
pub const FORCE_HINT: &str = "--force skips this check";

/// Whether `reason` is a refusal by the guard.
pub fn is_guard_refusal(reason: &str) -> bool {
    reason.ends_with(FORCE_HINT)
}

/// Refuses `change`, which makes configuration `next`, unless the voters of `next` for which
/// `heard` holds (the leader counts itself) form a majority of them, as
/// [`Membership::has_quorum`] decides. The reason names the voters not heard from.
pub fn check(
    change: &ConfChange,
    next: &Membership,
    heard: impl Fn(NodeId) -> bool,
) -> Result<(), String> {
    if next.has_quorum(&heard) {
        return Ok(());
    }
    let voters = next.voter_ids().count();
    let names: Vec<String> = next
        .voter_ids()
        .filter(|&id| !heard(id))
        .map(|id| id.to_string())
        .collect();
    let silent = match names.len() {
        1 => format!("node {}", names[0]),
        _ => format!("nodes {}", names.join(", ")),
    };
    Err(format!(
        "{} would leave {} of {voters} voters heard from within the election timeout (not heard from: {silent}); a majority of the new configuration must be live; {FORCE_HINT}",
        describe(change),
        voters - names.len(),
    ))
}

/// The change, as the start of a sentence.
fn describe(change: &ConfChange) -> String {
    match change {
        ConfChange::AddLearner { id, .. } => format!("adding learner {id}"),
        ConfChange::Rejoin { id, .. } => format!("adding node {id} back as a learner"),
        ConfChange::Promote { id } => format!("promoting node {id}"),
        ConfChange::Remove { id } => format!("removing node {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_needs_a_majority_of_the_new_voters_heard_from() {
        let three = Membership::voters(&[1, 2, 3]);
        let live = |id: NodeId| id != 3;
        // Removing a live voter while 3 is silent: 1 of {1, 3}.
        let remove_2 = ConfChange::Remove { id: 2 };
        let next = three.apply(&remove_2).unwrap();
        let reason = check(&remove_2, &next, live).unwrap_err();
        assert_eq!(
            reason,
            "removing node 2 would leave 1 of 2 voters heard from within the election timeout (not heard from: node 3); a majority of the new configuration must be live; --force skips this check"
        );
        assert!(is_guard_refusal(&reason));
        // Removing the silent one: 2 of {1, 2}.
        let remove_3 = ConfChange::Remove { id: 3 };
        assert_eq!(
            check(&remove_3, &three.apply(&remove_3).unwrap(), live),
            Ok(())
        );
        // Two silent of five: adding and promoting learner 6 leaves 4 of 6, a majority;
        // three silent: 3 of 6 is none.
        let five = Membership::voters(&[1, 2, 3, 4, 5]);
        let add_6 = ConfChange::AddLearner {
            id: 6,
            address: "h:1".into(),
        };
        let grown = five.apply(&add_6).unwrap();
        let promote = ConfChange::Promote { id: 6 };
        let promoted = grown.apply(&promote).unwrap();
        let live = |id: NodeId| id != 4 && id != 5;
        assert_eq!(check(&add_6, &grown, live), Ok(()));
        assert_eq!(check(&promote, &promoted, live), Ok(()));
        let reason = check(&promote, &promoted, |id| id <= 2 || id == 6).unwrap_err();
        assert!(
            reason.starts_with("promoting node 6 would leave 3 of 6 voters"),
            "{reason}"
        );
        assert!(
            reason.contains("(not heard from: nodes 3, 4, 5)"),
            "{reason}"
        );
        // A silent learner counts for nothing.
        let add_7 = ConfChange::AddLearner {
            id: 7,
            address: "h:2".into(),
        };
        let next = three.apply(&add_6).unwrap().apply(&add_7).unwrap();
        assert_eq!(check(&add_7, &next, |id| id <= 2), Ok(()));
        assert!(check(&add_7, &next, |id| id == 1).is_err());
        assert!(!is_guard_refusal("node 9 is not a member"));
    }
}
