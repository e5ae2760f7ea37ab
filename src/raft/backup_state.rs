//! What a backup (`client snapshot save`) holds besides the committed records: the client
//! sessions, the users and the configuration in force at one applied index. The leader copies them when a
//! save asks and serves the copy in pages, so that a save sees one table while the live one
//! moves on. A copy describes committed entries only, so it stays true whoever leads later.

use super::configurations::Configurations;
use super::log::RaftLog;
use super::message::ClientResult;
use super::snapshot::SessionRecord;
use super::state_machine::StateMachine;
use super::types::{Index, Term};
use super::users::UserRecord;
use super::Membership;
use std::collections::VecDeque;

/// Copies kept at once (saves running side by side). Beyond it the oldest goes, and a save
/// still reading it is answered with a new copy, from which it starts its sessions again.
pub const MAX_COPIES: usize = 4;
/// Bytes one session takes in a reply at most (every number at its widest), for paging.
const SESSION_BYTES: usize = 160;
/// Bytes one user takes in a reply at most (the longest name, every number at its widest).
const USER_BYTES: usize = 128 + super::users::MAX_USER_NAME;

/// The sessions, users and configuration as of applied index `index` (of term `term`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    pub index: Index,
    pub term: Term,
    /// The configuration in force at `index` and the index of the entry that made it.
    pub membership: Membership,
    pub config_index: Index,
    /// Least recently used first, as the state machine lists them.
    pub sessions: Vec<SessionRecord>,
    /// By name, as the state machine keeps them (never a key: peers derive those).
    pub users: Vec<UserRecord>,
}

impl Copy {
    /// The state as of the state machine's applied index.
    pub fn of(sm: &StateMachine, configs: &Configurations, log: &RaftLog) -> Copy {
        let index = sm.applied;
        let (membership, (config_index, _)) = configs.at(index);
        Copy {
            index,
            // 0 when unknown: the saving client takes the term from the record at `index`.
            term: log.term_at(index).unwrap_or(0),
            membership: membership.clone(),
            config_index,
            sessions: sm.sessions(),
            users: sm.users().records(),
        }
    }
}

/// The copies a leader is serving, newest last.
#[derive(Debug, Default)]
pub struct BackupCopies {
    copies: VecDeque<Copy>,
}

impl BackupCopies {
    /// Page `from..` of the copy at `at`; when `at` is None or that copy is no longer held,
    /// page 0 of a new copy made by `now`. The reply names the copy's index and the page's
    /// start, so a client can tell which it got. A page fits in `budget` bytes.
    pub fn page(
        &mut self,
        at: Option<Index>,
        from: u64,
        budget: usize,
        now: impl FnOnce() -> Copy,
    ) -> ClientResult {
        let held = at.and_then(|a| self.copies.iter().position(|c| c.index == a));
        let (copy, from) = match held {
            Some(i) => (&self.copies[i], from),
            None => {
                let fresh = now();
                // Two saves asking at the same applied index share one copy.
                self.copies.retain(|c| c.index != fresh.index);
                self.copies.push_back(fresh);
                if self.copies.len() > MAX_COPIES {
                    self.copies.pop_front();
                }
                (self.copies.back().expect("just pushed"), 0)
            }
        };
        // Positions run over the sessions, then the users.
        let (sessions, total) = (copy.sessions.len(), copy.sessions.len() + copy.users.len());
        let cost = |at: usize| {
            if at < sessions {
                SESSION_BYTES
            } else {
                USER_BYTES
            }
        };
        let mut room = budget.saturating_sub(copy.membership.encoded_len());
        let start = (from as usize).min(total);
        let mut end = start;
        while end < total && (end == start || cost(end) <= room) {
            room = room.saturating_sub(cost(end));
            end += 1;
        }
        // A copy stays after its last page (a retry of that page must find it) until newer
        // ones push it out.
        ClientResult::BackupState {
            index: copy.index,
            term: copy.term,
            config_index: copy.config_index,
            members: copy.membership.members.clone(),
            from: start as u64,
            sessions: copy.sessions[start.min(sessions)..end.min(sessions)].to_vec(),
            users: copy.users[start.max(sessions) - sessions..end.max(sessions) - sessions]
                .to_vec(),
            next: (end < total).then_some(end as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::users::{UserRole, MAX_USER_NAME};

    fn copy(index: Index, sessions: u64) -> Copy {
        with_users(index, sessions, 0)
    }

    fn with_users(index: Index, sessions: u64, users: u64) -> Copy {
        Copy {
            index,
            term: 2,
            membership: Membership::voters(&[1, 2, 3]),
            config_index: 0,
            sessions: (1..=sessions)
                .map(|i| SessionRecord {
                    client: u64::MAX - i,
                    seq: u64::MAX,
                    index: u64::MAX - i,
                    term: u64::MAX,
                    data_hash: u64::MAX,
                })
                .collect(),
            users: (1..=users)
                .map(|i| UserRecord {
                    name: format!("{i:0>width$}", width = MAX_USER_NAME),
                    role: UserRole::Admin,
                    index: u64::MAX - i,
                    term: u64::MAX,
                    nonce: u64::MAX,
                })
                .collect(),
        }
    }

    /// A page's copy index, start, and count of sessions and users together, and `next`.
    fn page(result: ClientResult) -> (Index, u64, usize, Option<u64>) {
        match result {
            ClientResult::BackupState {
                index,
                from,
                sessions,
                users,
                next,
                ..
            } => (index, from, sessions.len() + users.len(), next),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_copy_is_served_in_pages_that_fit_while_the_live_table_moves_on() {
        let mut copies = BackupCopies::default();
        let budget = 60_000;
        let (index, from, n, next) = page(copies.page(None, 0, budget, || copy(10, 1_000)));
        assert_eq!((index, from), (10, 0));
        let mut got = n;
        let mut next = next;
        while let Some(at) = next {
            // Later pages come from the copy, not from a newer moment.
            let p = page(copies.page(Some(10), at, budget, || copy(20, 5)));
            assert_eq!((p.0, p.1), (10, at));
            got += p.2;
            next = p.3;
        }
        assert_eq!(got, 1_000);
        // Every page fits the budget with the widest numbers.
        let widest = copies.page(Some(10), 0, budget, || unreachable!());
        assert!(serde_json::to_vec(&widest).unwrap().len() <= budget);
    }

    #[test]
    fn a_copy_no_longer_held_is_answered_with_a_new_one_from_its_start() {
        let mut copies = BackupCopies::default();
        page(copies.page(None, 0, 60_000, || copy(10, 3)));
        for i in 0..MAX_COPIES as u64 {
            page(copies.page(None, 0, 60_000, || copy(11 + i, 3)));
        }
        let (index, from, n, next) = page(copies.page(Some(10), 2, 60_000, || copy(30, 3)));
        assert_eq!((index, from, n, next), (30, 0, 3, None));
        // An empty table is one page.
        let (_, _, n, next) = page(copies.page(None, 0, 60_000, || copy(31, 0)));
        assert_eq!((n, next), (0, None));
    }

    #[test]
    fn users_are_paged_after_the_sessions_within_the_budget() {
        let mut copies = BackupCopies::default();
        let budget = 60_000;
        let (mut sessions, mut users) = (Vec::new(), Vec::new());
        let mut next = Some(0);
        let mut pages = 0;
        while let Some(at) = next {
            let result = copies.page(Some(10), at, budget, || with_users(10, 700, 600));
            assert!(serde_json::to_vec(&result).unwrap().len() <= budget);
            let ClientResult::BackupState {
                from,
                sessions: s,
                users: u,
                next: n,
                ..
            } = result
            else {
                panic!("{result:?}");
            };
            assert_eq!(from, at);
            assert!(
                u.is_empty() || sessions.len() + s.len() == 700,
                "users after sessions"
            );
            sessions.extend(s);
            users.extend(u);
            next = n;
            pages += 1;
        }
        assert_eq!((sessions.len(), users.len()), (700, 600));
        assert!(pages > 2, "{pages} pages");
        assert_eq!(users, with_users(10, 0, 600).users);
    }
}
