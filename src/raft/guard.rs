//! The quorum guard (as etcd's `--strict-reconfig-check`): the leader refuses a membership
//! change after which the voters it has heard from within the last election timeout would not
//! be a majority of the new configuration's voters. Such a change may be accepted, but its
//! configuration is in force as soon as it is appended (thesis §4.1), so the cluster stops
//! until enough of the silent voters come back: removing a live voter while another is down
//! leaves one live voter of two. The client's `--force` skips the check.
//!
//! A leader that took over (or a member added) less than an election timeout ago may not have
//! heard from a live voter yet: if counting those voters would make a majority, the change is
//! answered Busy (the client retries) until they answer or the timeout passes. So a change
//! made right after an election is not refused for nothing, and a voter that is down counts
//! as down however recent the election.

use super::membership::{ConfChange, Membership};
use super::progress::Progress;
use super::types::NodeId;

/// Ends every refusal by the guard, so that a client can tell it from other refusals (and
/// offer to force the change).
pub const FORCE_HINT: &str = "--force skips this check";

/// Whether `reason` is a refusal by the guard.
pub fn is_guard_refusal(reason: &str) -> bool {
    reason.ends_with(FORCE_HINT)
}

/// What the leader knows of a voter being live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact {
    /// Heard from within the last election timeout (the leader itself, always).
    Live,
    /// Not heard from yet, but this leader has tracked it for less than an election timeout
    /// (it took over, or the member was just added): it may well be live.
    Unknown,
    /// Not heard from within the last election timeout.
    Silent,
}

/// A follower's [`Contact`], from its progress (`None`: not tracked) and the election
/// timeout in ticks.
pub fn contact(progress: Option<&Progress>, timeout: u64) -> Contact {
    match progress {
        Some(p) if p.heard_within(timeout) => Contact::Live,
        Some(p) if !p.heard && p.last_contact_ticks < timeout => Contact::Unknown,
        _ => Contact::Silent,
    }
}

/// The guard's answer to a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Allowed once the voters this leader has not heard from yet answer, which takes less
    /// than an election timeout if they are live; refused otherwise. Ask again.
    TooSoon(String),
    /// Refused: the reason names the voters not heard from, and ends with [`FORCE_HINT`].
    Refused(String),
}

/// Judges `change`, which makes configuration `next`: allowed if the voters of `next` that
/// are [`Contact::Live`] form a majority of them, as [`Membership::has_quorum`] decides; too
/// soon to tell if they would with the [`Contact::Unknown`] ones; refused otherwise.
pub fn check(
    change: &ConfChange,
    next: &Membership,
    contact: impl Fn(NodeId) -> Contact,
) -> Verdict {
    if next.has_quorum(|id| contact(id) == Contact::Live) {
        return Verdict::Allowed;
    }
    let voters_with = |want: &dyn Fn(Contact) -> bool| -> Vec<NodeId> {
        next.voter_ids().filter(|&id| want(contact(id))).collect()
    };
    if next.has_quorum(|id| contact(id) != Contact::Silent) {
        let unknown = voters_with(&|c| c == Contact::Unknown);
        return Verdict::TooSoon(format!(
            "{} waits to hear from {}, not heard from since this leader took over less than an election timeout ago",
            describe(change),
            nodes(&unknown)
        ));
    }
    let voters = next.voter_ids().count();
    let not_heard = voters_with(&|c| c != Contact::Live);
    Verdict::Refused(format!(
        "{} would leave {} of {voters} voters heard from within the election timeout (not heard from: {}); a majority of the new configuration must be live; {FORCE_HINT}",
        describe(change),
        voters - not_heard.len(),
        nodes(&not_heard)
    ))
}

/// `node 3`, `nodes 3, 4`.
fn nodes(ids: &[NodeId]) -> String {
    let names: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    match names.len() {
        1 => format!("node {}", names[0]),
        _ => format!("nodes {}", names.join(", ")),
    }
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

    /// Live unless in `silent` or `unknown`.
    fn contacts<'a>(
        silent: &'a [NodeId],
        unknown: &'a [NodeId],
    ) -> impl Fn(NodeId) -> Contact + 'a {
        move |id| {
            if silent.contains(&id) {
                Contact::Silent
            } else if unknown.contains(&id) {
                Contact::Unknown
            } else {
                Contact::Live
            }
        }
    }

    fn refusal(v: Verdict) -> String {
        match v {
            Verdict::Refused(reason) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_change_needs_a_majority_of_the_new_voters_heard_from() {
        let three = Membership::voters(&[1, 2, 3]);
        // Removing a live voter while 3 is silent: 1 of {1, 3}.
        let remove_2 = ConfChange::Remove { id: 2 };
        let next = three.apply(&remove_2).unwrap();
        let reason = refusal(check(&remove_2, &next, contacts(&[3], &[])));
        assert_eq!(
            reason,
            "removing node 2 would leave 1 of 2 voters heard from within the election timeout (not heard from: node 3); a majority of the new configuration must be live; --force skips this check"
        );
        assert!(is_guard_refusal(&reason));
        // Not heard from yet by a new leader: too soon to tell.
        let v = check(&remove_2, &next, contacts(&[], &[3]));
        assert!(
            matches!(&v, Verdict::TooSoon(r) if r.contains("waits to hear from node 3")),
            "{v:?}"
        );
        // Removing the silent one: 2 of {1, 2}.
        let remove_3 = ConfChange::Remove { id: 3 };
        let next = three.apply(&remove_3).unwrap();
        assert_eq!(
            check(&remove_3, &next, contacts(&[3], &[])),
            Verdict::Allowed
        );
        // Two silent of five: adding and promoting learner 6 leaves 4 of 6, a majority;
        // three silent: 3 of 6 is none, and one not heard from yet is named too.
        let five = Membership::voters(&[1, 2, 3, 4, 5]);
        let add_6 = ConfChange::AddLearner {
            id: 6,
            address: "h:1".into(),
        };
        let grown = five.apply(&add_6).unwrap();
        let promote = ConfChange::Promote { id: 6 };
        let promoted = grown.apply(&promote).unwrap();
        assert_eq!(
            check(&add_6, &grown, contacts(&[4, 5], &[])),
            Verdict::Allowed
        );
        assert_eq!(
            check(&promote, &promoted, contacts(&[4, 5], &[])),
            Verdict::Allowed
        );
        let reason = refusal(check(&promote, &promoted, contacts(&[3, 4, 5], &[])));
        assert!(
            reason.starts_with("promoting node 6 would leave 3 of 6 voters"),
            "{reason}"
        );
        assert!(
            reason.contains("(not heard from: nodes 3, 4, 5)"),
            "{reason}"
        );
        let reason = refusal(check(&promote, &promoted, contacts(&[3, 4, 5], &[2])));
        assert!(
            reason.contains("(not heard from: nodes 2, 3, 4, 5)"),
            "{reason}"
        );
        // A silent learner counts for nothing.
        let add_7 = ConfChange::AddLearner {
            id: 7,
            address: "h:2".into(),
        };
        let next = three.apply(&add_6).unwrap().apply(&add_7).unwrap();
        assert_eq!(
            check(&add_7, &next, contacts(&[6, 7], &[])),
            Verdict::Allowed
        );
        assert!(matches!(
            check(&add_7, &next, contacts(&[2, 3], &[])),
            Verdict::Refused(_)
        ));
        assert!(!is_guard_refusal("node 9 is not a member"));
    }

    #[test]
    fn a_follower_is_live_if_heard_within_the_timeout_and_unknown_until_first_heard() {
        let mut p = Progress::new(1);
        assert_eq!(contact(Some(&p), 20), Contact::Unknown);
        p.last_contact_ticks = 20;
        assert_eq!(contact(Some(&p), 20), Contact::Silent);
        p.heard_from();
        assert_eq!(contact(Some(&p), 20), Contact::Live);
        p.last_contact_ticks = 19;
        assert_eq!(contact(Some(&p), 20), Contact::Live);
        p.last_contact_ticks = 20;
        assert_eq!(contact(Some(&p), 20), Contact::Silent);
        assert_eq!(contact(None, 20), Contact::Silent);
    }
}
