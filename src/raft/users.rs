//! Users and their roles, kept in the replicated state (as etcd keeps users and roles): an
//! admin's `user add` or `user remove` is a log entry, so every peer applies the same changes
//! in the same order, and the table survives restarts, snapshots and installs with the rest
//! of the state.
//!
//! No key is ever in here, nor in the log: a user's key is derived by each peer's shell from
//! the cluster secret and the index and term of the entry that added the user (see
//! `crate::auth::users`), so the log, the WAL and snapshots hold only names and roles. The
//! core only decides who may do what (`permit`, beside the requests in `message`).

use super::types::{Index, Term};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most users a cluster keeps; an add beyond it is refused.
pub const MAX_USERS: usize = 10_000;
/// Longest user name, in bytes.
pub const MAX_USER_NAME: usize = 64;

/// What a user may do. Each role may do everything the one before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    /// Query, follow, status, members, watch.
    Read,
    /// Also append.
    Write,
    /// Also change membership, transfer leadership, manage users and take backups.
    Admin,
}

impl UserRole {
    /// The role's name, as the command line and the JSON lines spell it.
    pub fn name(self) -> &'static str {
        match self {
            UserRole::Read => "read",
            UserRole::Write => "write",
            UserRole::Admin => "admin",
        }
    }

    /// Parses `read`, `write` or `admin`.
    pub fn parse(text: &str) -> Result<UserRole, String> {
        match text {
            "read" => Ok(UserRole::Read),
            "write" => Ok(UserRole::Write),
            "admin" => Ok(UserRole::Admin),
            other => Err(format!(
                "unknown role {other:?}: a role is read, write or admin"
            )),
        }
    }
}

impl std::fmt::Display for UserRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The refusal of `what` to `role`: `permission denied: role read cannot append`.
pub fn denied(role: UserRole, what: &str) -> String {
    format!("permission denied: role {role} cannot {what}")
}

/// Checks a user name: 1 to [`MAX_USER_NAME`] letters, digits, `.`, `_`, `-` or `@`,
/// starting with a letter or digit (so that it is safe in a file name and a log line).
pub fn check_user_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if name.is_empty() || name.len() > MAX_USER_NAME {
        return Err(format!(
            "a user name has 1 to {MAX_USER_NAME} characters, not {}",
            name.len()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(ok) {
        return Err(format!(
            "user name {name:?}: use letters, digits, '.', '_', '-' or '@', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// A change to the users, as a log entry carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserChange {
    /// Adds `name` with `role`, or replaces it (a new credential; the old one stops working).
    /// `nonce` is the client's, the same on every retry of one `user add`: a second entry
    /// with the user's current nonce is a retry and changes nothing.
    Add {
        name: String,
        role: UserRole,
        nonce: u64,
    },
    /// Removes `name`: its credential stops working on each peer as this entry applies there.
    Remove { name: String },
}

impl UserChange {
    /// An upper bound on this change's size in a JSON datagram.
    pub fn encoded_len(&self) -> usize {
        let name = match self {
            UserChange::Add { name, .. } | UserChange::Remove { name } => name,
        };
        64 + 2 * name.len()
    }
}

/// What a client asks of the users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserOp {
    Add {
        name: String,
        role: UserRole,
        nonce: u64,
    },
    Remove {
        name: String,
    },
    List,
}

/// One user in the replicated state: its role and the entry that added it (from which the
/// peers derive its key). Never a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub role: UserRole,
    pub index: Index,
    pub term: Term,
    pub nonce: u64,
}

/// One line of `client user list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub user: String,
    pub role: UserRole,
}

/// What applying a [`UserChange`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserApplied {
    /// The user as it now is (for a retried add, as the first add made it).
    Added(UserRecord),
    Removed {
        name: String,
    },
    /// Nothing changed, for this reason.
    Refused(String),
}

/// The users, by name. Changes only by [`Users::apply`], in log order, on every peer alike.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Users {
    by_name: BTreeMap<String, UserRecord>,
    /// The index of the entry that last changed the users, or of the snapshot they were
    /// restored from: it only grows, so the shell can tell cheaply when to rebuild its keys.
    changed_at: Index,
}

impl Users {
    /// Applies the committed change at `index` (term `term`).
    pub fn apply(&mut self, index: Index, term: Term, change: &UserChange) -> UserApplied {
        match change {
            UserChange::Add { name, role, nonce } => {
                if let Some(r) = self.by_name.get(name) {
                    if r.nonce == *nonce {
                        return UserApplied::Added(r.clone());
                    }
                }
                if let Err(e) = check_user_name(name) {
                    return UserApplied::Refused(e);
                }
                if self.by_name.len() >= MAX_USERS && !self.by_name.contains_key(name) {
                    return UserApplied::Refused(format!("{MAX_USERS} users already"));
                }
                let record = UserRecord {
                    name: name.clone(),
                    role: *role,
                    index,
                    term,
                    nonce: *nonce,
                };
                self.by_name.insert(name.clone(), record.clone());
                self.changed_at = index;
                UserApplied::Added(record)
            }
            UserChange::Remove { name } => {
                if self.by_name.remove(name).is_some() {
                    self.changed_at = index;
                }
                UserApplied::Removed { name: name.clone() }
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&UserRecord> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Grows whenever the users change (also by a restore from a snapshot).
    pub fn version(&self) -> Index {
        self.changed_at
    }

    /// Every user, by name: what a snapshot keeps.
    pub fn records(&self) -> Vec<UserRecord> {
        self.by_name.values().cloned().collect()
    }

    /// `client user list`: names and roles, never more.
    pub fn list(&self) -> Vec<UserInfo> {
        self.by_name
            .values()
            .map(|r| UserInfo {
                user: r.name.clone(),
                role: r.role,
            })
            .collect()
    }

    /// The users a snapshot at `index` kept.
    pub fn restore(records: &[UserRecord], index: Index) -> Users {
        Users {
            by_name: records
                .iter()
                .map(|r| (r.name.clone(), r.clone()))
                .collect(),
            changed_at: index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(name: &str, role: UserRole, nonce: u64) -> UserChange {
        UserChange::Add {
            name: name.into(),
            role,
            nonce,
        }
    }

    #[test]
    fn a_retried_add_changes_nothing_and_a_new_one_replaces() {
        let mut users = Users::default();
        let first = users.apply(3, 1, &add("ann", UserRole::Read, 7));
        let v = users.version();
        assert_eq!(users.apply(5, 1, &add("ann", UserRole::Read, 7)), first);
        assert_eq!(users.version(), v, "a retry is no change");
        let UserApplied::Added(r) = users.apply(9, 2, &add("ann", UserRole::Write, 8)) else {
            panic!("replaced");
        };
        assert_eq!((r.index, r.term, r.role), (9, 2, UserRole::Write));
        users.apply(10, 2, &UserChange::Remove { name: "ann".into() });
        assert!(users.is_empty());
        let back = Users::restore(&users.records(), 99);
        assert_eq!(back.records(), users.records());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(MAX_USER_NAME + 1)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
        for good in ["ann", "bob.smith", "ci-bot_2", "a@b"] {
            assert!(check_user_name(good).is_ok(), "{good:?}");
        }
    }
}
