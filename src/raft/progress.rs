//! The leader's view of one follower (§5.3 nextIndex/matchIndex), plus the flow control that
//! lets it pipeline AppendEntries without buffering without limit for a slow follower.

use super::snapshot::SnapshotSend;
use super::types::Index;
use std::collections::VecDeque;

/// How the leader is currently sending to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// The follower's log position is unknown: one AppendEntries at a time, re-sent each
    /// heartbeat until answered.
    Probe,
    /// The follower is in sync: send optimistically, up to `max_inflight` requests at once.
    Replicate,
    /// The follower needs entries the leader has compacted: it is sent a snapshot, in chunks
    /// (`Progress::sending`), then replication resumes after the snapshot's index.
    Snapshot,
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be replicated on the follower. Never decreases within a term.
    pub match_index: Index,
    /// Index of the next entry to send.
    pub next_index: Index,
    pub state: ProgressState,
    /// Last index of each unacknowledged AppendEntries sent in Replicate state, oldest first.
    pub inflight: VecDeque<Index>,
    /// In Probe state: an AppendEntries is out and unanswered since the last heartbeat.
    pub probe_sent: bool,
    /// Heard from the follower since the last check-quorum round.
    pub recent_active: bool,
    /// Ticks since `match_index` last advanced while requests were in flight.
    pub stall_ticks: u64,
    /// Highest read sequence number the follower has echoed in this term (thesis §6.4).
    pub read_acked: u64,
    /// The leader's read sequence number when `match_index` last changed: only a rejection of
    /// a request sent after that can show the follower lost acknowledged entries.
    pub matched_at_read_seq: u64,
    /// Ticks since the follower last answered, for operators (`client status`, metrics) and
    /// the quorum guard. Until the first answer, counts from when this leader started
    /// tracking the follower (its election, or the member's addition).
    pub last_contact_ticks: u64,
    /// The follower has answered this leader at least once.
    pub heard: bool,
    /// In Snapshot state: the snapshot being streamed.
    pub sending: Option<SnapshotSend>,
}

impl Progress {
    pub fn new(next_index: Index) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            inflight: VecDeque::new(),
            probe_sent: false,
            recent_active: false,
            stall_ticks: 0,
            read_acked: 0,
            matched_at_read_seq: 0,
            last_contact_ticks: 0,
            heard: false,
            sending: None,
        }
    }

    /// The follower answered: heard from just now.
    pub fn heard_from(&mut self) {
        self.recent_active = true;
        self.last_contact_ticks = 0;
        self.heard = true;
    }

    /// Whether the follower has answered this leader within the last `ticks` ticks. One never
    /// heard from has not, however recently the leader took over.
    pub fn heard_within(&self, ticks: u64) -> bool {
        self.heard && self.last_contact_ticks < ticks
    }

    /// The follower confirmed `index`; returns whether that was news.
    pub fn acknowledge(&mut self, index: Index) -> bool {
        while self.inflight.front().is_some_and(|&i| i <= index) {
            self.inflight.pop_front();
        }
        if index <= self.match_index {
            return false;
        }
        self.match_index = index;
        self.next_index = self.next_index.max(index + 1);
        self.stall_ticks = 0;
        if self.state != ProgressState::Replicate {
            self.state = ProgressState::Replicate;
            self.sending = None;
            self.probe_sent = false;
            self.next_index = index + 1;
        }
        true
    }

    /// Streams `snapshot` to a follower that needs entries before the leader's log.
    pub fn send_snapshot(&mut self, snapshot: SnapshotSend) {
        self.state = ProgressState::Snapshot;
        self.inflight.clear();
        self.probe_sent = false;
        self.stall_ticks = 0;
        self.sending = Some(snapshot);
    }

    /// Back to probing from `next_index` (after a rejection or a stalled pipeline).
    pub fn probe_from(&mut self, next_index: Index) {
        self.state = ProgressState::Probe;
        self.sending = None;
        self.next_index = next_index.max(self.match_index + 1);
        self.inflight.clear();
        self.probe_sent = false;
        self.stall_ticks = 0;
    }
}
