//! User requests on the leader ([`crate::raft::users`]): an add or remove is an entry,
//! answered once it applies; a list is a ReadIndex read of the applied users.

use super::*;
use crate::raft::users::{check_user_name, UserChange, UserOp, MAX_USERS};

impl Node {
    /// `client user add|remove|list`, on the leader (the caller checked the role).
    pub(super) fn users_request(&mut self, waiter: Waiter, op: UserOp) {
        let refuse = |reason: String| ClientResult::Refused { reason };
        let users = self.sm.users();
        let change = match op {
            // A linearizable read (ReadIndex): a leader deposed a moment ago never answers.
            UserOp::List => return self.read(waiter, ReadOf::Users),
            UserOp::Add { name, role, nonce } => {
                if let Err(reason) = check_user_name(&name) {
                    return self.reply(waiter, refuse(reason));
                }
                if let Some(r) = users.get(&name).filter(|r| r.nonce == nonce) {
                    // A retry of an add that has applied.
                    let result = ClientResult::UserAdded {
                        user: r.name.clone(),
                        role: r.role,
                        index: r.index,
                        term: r.term,
                        key: CredentialKey::default(),
                    };
                    return self.reply(waiter, result);
                }
                if users.len() >= MAX_USERS && users.get(&name).is_none() {
                    return self.reply(waiter, refuse(format!("{MAX_USERS} users already")));
                }
                UserChange::Add { name, role, nonce }
            }
            UserOp::Remove { name } => {
                if users.get(&name).is_none() {
                    return self.reply(waiter, refuse(format!("no user {name:?}")));
                }
                UserChange::Remove { name }
            }
        };
        let index = self.append_entry(Payload::User(change));
        self.waiters.insert(index, waiter);
        self.replicate_now = true;
    }

    /// The answer to whoever waits on the user change at `index`, once it applied.
    pub(super) fn user_result(
        &self,
        index: Index,
        term: Term,
        change: &UserChange,
    ) -> ClientResult {
        match change {
            UserChange::Add { name, nonce, .. } => match self.sm.users().get(name) {
                Some(r) if r.nonce == *nonce => ClientResult::UserAdded {
                    user: r.name.clone(),
                    role: r.role,
                    index: r.index,
                    term: r.term,
                    key: CredentialKey::default(),
                },
                _ => ClientResult::Refused {
                    reason: format!("user {name:?} was not added"),
                },
            },
            UserChange::Remove { name } => ClientResult::UserRemoved {
                user: name.clone(),
                index,
                term,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::users::UserRole;

    fn leader() -> Node {
        let cfg = Config {
            id: 1,
            membership: Membership::voters(&[1]),
            election_ticks: (10, 20),
            heartbeat_ticks: 2,
            max_inflight: 4,
            vote_floor: 0,
            vote_floor_term: 0,
            started_over: (0, 0),
            seed: 1,
        };
        let mut n = Node::new(cfg, HardState::default(), Vec::new());
        for _ in 0..100 {
            n.tick();
            n.ready();
            n.advance();
            if n.role() == Role::Leader && n.applied_index() == n.log.last_index() {
                return n;
            }
        }
        panic!("no leader");
    }

    /// Sends `op` and carries out Readys until it is answered.
    fn ask(n: &mut Node, op: UserOp) -> ClientResult {
        n.request(
            "127.0.0.1:9".parse().unwrap(),
            ClientRequest {
                id: 7,
                op: ClientOp::Users(op),
            },
        );
        for _ in 0..10 {
            let rd = n.ready();
            n.advance();
            if let Some((_, reply)) = rd.replies.into_iter().next() {
                return reply.result;
            }
        }
        panic!("not answered");
    }

    fn add(name: &str, role: UserRole, nonce: u64) -> UserOp {
        UserOp::Add {
            name: name.into(),
            role,
            nonce,
        }
    }

    #[test]
    fn users_are_added_listed_removed_and_kept_by_a_snapshot() {
        let mut n = leader();
        let ClientResult::UserAdded { index, .. } = ask(&mut n, add("ann", UserRole::Read, 1))
        else {
            panic!("not added");
        };
        // A retry (same nonce) is the same user, not a new one.
        assert!(matches!(
            ask(&mut n, add("ann", UserRole::Read, 1)),
            ClientResult::UserAdded { index: i, .. } if i == index
        ));
        ask(&mut n, add("bob", UserRole::Admin, 2));
        let ClientResult::Users { users } = ask(&mut n, UserOp::List) else {
            panic!("no list");
        };
        assert_eq!(users.len(), 2);
        let state = n.snapshot_state();
        assert_eq!(state.users.len(), 2);
        assert_eq!(StateMachine::from_snapshot(&state).users(), n.sm.users());
        assert!(matches!(
            ask(&mut n, UserOp::Remove { name: "ann".into() }),
            ClientResult::UserRemoved { .. }
        ));
        assert!(matches!(
            ask(&mut n, UserOp::Remove { name: "ann".into() }),
            ClientResult::Refused { .. }
        ));
        assert!(matches!(
            ask(&mut n, add("no such/name", UserRole::Read, 3)),
            ClientResult::Refused { .. }
        ));
        assert_eq!(n.sm.users().len(), 1);
    }
}
