//! What a linearizable read (thesis §6.4 ReadIndex) answers with, once a majority has
//! confirmed this node still leads and it has applied up to the read index.

use super::*;

/// The subject of a read held until leadership is confirmed.
#[derive(Clone, Debug)]
pub(super) enum ReadOf {
    /// A page of the committed log from `start` (`client query`, `client backup`).
    Log { start: Index },
    /// The users table as applied (`client user list`).
    Users,
}

impl Node {
    /// Answers a confirmed read; the answer reflects at least the log up to `read_index`.
    pub(super) fn answer_read(&mut self, waiter: Waiter, what: ReadOf, read_index: Index) {
        match what {
            ReadOf::Log { start } => self.serve_read(waiter, start, read_index),
            ReadOf::Users => {
                assert!(
                    read_index <= self.sm.applied,
                    "read beyond the applied index"
                );
                let users = self.sm.users().list();
                self.reply(waiter, ClientResult::Users { users });
            }
        }
    }
}
