//! `client user add NAME --role ROLE`, `client user list`, `client user remove NAME`: the
//! cluster's users (admins only; the peers check). `add` prints the new user's credential as
//! one JSON line, `{"user":"NAME","role":"ROLE","key":"..."}`, which the user saves to a file
//! only they can read (`chmod 600`) and passes with `client --cred FILE`.

use argh::FromArgs;
use raft::client::{Client, ClientError};
use raft::raft::UserRole;
use serde::Serialize;

#[derive(FromArgs)]
/// Manage the cluster's users and their roles (admin): read may query, follow, status,
/// members and watch; write may also append; admin may also change membership, transfer
/// leadership, manage users and take backups.
#[argh(subcommand, name = "user")]
pub struct UserArgs {
    #[argh(subcommand)]
    pub command: UserCommand,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub enum UserCommand {
    Add(AddArgs),
    List(ListArgs),
    Remove(RemoveArgs),
}

#[derive(FromArgs)]
/// Add user NAME with a role (or replace it: its old credential stops working); prints its
/// credential, {"user":"NAME","role":"ROLE","key":"..."}, to save in a file of mode 0600.
#[argh(subcommand, name = "add")]
pub struct AddArgs {
    /// the user's name: letters, digits, '.', '_', '-', '@'
    #[argh(positional)]
    pub name: String,
    /// read, write or admin
    #[argh(option, from_str_fn(parse_role))]
    pub role: UserRole,
}

#[derive(FromArgs)]
/// Print each user and its role, one JSON line each (never a key).
#[argh(subcommand, name = "list")]
pub struct ListArgs {}

#[derive(FromArgs)]
/// Remove user NAME: every peer refuses its credential as the removal commits.
#[argh(subcommand, name = "remove")]
pub struct RemoveArgs {
    /// the user's name
    #[argh(positional)]
    pub name: String,
}

fn parse_role(text: &str) -> Result<UserRole, String> {
    UserRole::parse(text)
}

/// What `user remove` prints.
#[derive(Serialize)]
struct RemovedLine {
    user: String,
    removed: bool,
    index: u64,
    term: u64,
}

/// Runs a `user` subcommand; the lines to print, or the error.
pub fn run(client: &mut Client, args: UserArgs) -> Result<Vec<String>, ClientError> {
    match args.command {
        UserCommand::Add(a) => Ok(vec![client.user_add(&a.name, a.role)?.to_json()]),
        UserCommand::List(_) => Ok(client.user_list()?.iter().map(line).collect()),
        UserCommand::Remove(r) => {
            let removed = client.user_remove(&r.name)?;
            Ok(vec![line(&RemovedLine {
                user: removed.user,
                removed: true,
                index: removed.index,
                term: removed.term,
            })])
        }
    }
}

fn line<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}
