//! `client user add|remove|list`: the users of the replicated state ([`crate::raft::users`]),
//! managed by admins. An add answers with the new user's credential, which only the
//! answering peer (holding the cluster secret) can derive.

use super::*;
use crate::auth::Credential;
use crate::raft::{UserInfo, UserRole};

/// A committed user removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRemoved {
    pub user: String,
    pub index: Index,
    pub term: Term,
}

impl Client {
    /// Adds user `name` with `role` (or replaces it: the old credential stops working), and
    /// returns its credential once the entry commits. A retry after a timeout carries the
    /// same nonce, so it is answered with the same user, not a second one.
    pub fn user_add(&mut self, name: &str, role: UserRole) -> Result<Credential, ClientError> {
        crate::raft::users::check_user_name(name).map_err(ClientError::Refused)?;
        if !self.authenticated() {
            return Err(ClientError::Refused(
                "users need a secured cluster: this client's config names no secret_file (nor do the peers', if they answer it)".into(),
            ));
        }
        let deadline = Instant::now() + self.timeout;
        let op = ClientOp::Users(UserOp::Add {
            name: name.to_string(),
            role,
            nonce: os_random_u64()?,
        });
        match self.call_while_busy(&op, deadline)? {
            (_, ClientResult::UserAdded { key, .. }) if key.0.is_empty() => {
                Err(ClientError::Refused(
                    "the cluster runs without a secret_file, so users have no keys; give the peers a secret_file first".into(),
                ))
            }
            (peer, ClientResult::UserAdded { user, role, key, .. }) => {
                Credential::parse(&format!(
                    "{{\"user\":{},\"role\":\"{role}\",\"key\":\"{}\"}}",
                    serde_json::to_string(&user).unwrap_or_default(),
                    key.0
                ))
                .map_err(|e| ClientError::Io(format!("peer {peer} sent a bad credential: {e}")))
            }
            (peer, other) => unreachable!("filtered reply {other:?} from peer {peer}"),
        }
    }

    /// Removes user `name`; its credential is refused by each peer as the removal applies
    /// there.
    pub fn user_remove(&mut self, name: &str) -> Result<UserRemoved, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let op = ClientOp::Users(UserOp::Remove {
            name: name.to_string(),
        });
        match self.call_while_busy(&op, deadline)? {
            (_, ClientResult::UserRemoved { user, index, term }) => {
                Ok(UserRemoved { user, index, term })
            }
            (peer, other) => unreachable!("filtered reply {other:?} from peer {peer}"),
        }
    }

    /// Every user and its role, as the leader has them.
    pub fn user_list(&mut self) -> Result<Vec<UserInfo>, ClientError> {
        let deadline = Instant::now() + self.timeout;
        match self.call_while_busy(&ClientOp::Users(UserOp::List), deadline)? {
            (_, ClientResult::Users { users }) => Ok(users),
            (peer, other) => unreachable!("filtered reply {other:?} from peer {peer}"),
        }
    }

    /// [`Client::call`], retrying a `Busy` answer until the deadline.
    fn call_while_busy(
        &mut self,
        op: &ClientOp,
        deadline: Instant,
    ) -> Result<(NodeId, ClientResult), ClientError> {
        let mut pause = BUSY_PAUSE;
        loop {
            match self.call(op, deadline) {
                Ok((peer, ClientResult::Busy { reason })) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left <= BUSY_MARGIN {
                        return Err(ClientError::Refused(format!(
                            "not done within {} ms; peer {peer} answered: {reason}",
                            self.timeout.as_millis()
                        )));
                    }
                    std::thread::sleep(pause.min(left - BUSY_MARGIN));
                    pause = (pause * 2).min(MAX_WAIT);
                }
                Err(ClientError::Timeout(what)) if !matches!(op, ClientOp::Users(UserOp::List)) => {
                    return Err(ClientError::Timeout(format!("{what} (outcome unknown)")))
                }
                other => return other,
            }
        }
    }
}
