//! What the node loop measures for operators: commit latency, fsync time, entries per fsync.

use crate::metrics::Metrics;
use crate::probes::LeaderContact;
use crate::raft::{Body, ClientOp, ClientReply, ClientRequest, ClientResult, Message, ReplyTo};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Client appends whose arrival time is kept for the commit-latency histogram, at most; past
/// this (answers lost to retries on other peers) the table starts over.
pub(super) const MAX_ARRIVALS: usize = 65_536;

/// What the node loop measures for operators.
pub(super) struct Instruments {
    pub(super) metrics: Arc<Metrics>,
    /// How long a core tick is, to show the leader's last contact with followers in ms.
    tick: Duration,
    /// When each client append not yet answered was stepped, by (client address, request ID).
    arrivals: HashMap<(ReplyTo, u64), Instant>,
    /// Whether a full disk stopped this peer's storage (shown by `status` as `disk_full`).
    pub(super) disk_full: bool,
}

impl Instruments {
    pub(super) fn new(metrics: Arc<Metrics>, tick: Duration) -> Instruments {
        Instruments {
            metrics,
            tick,
            arrivals: HashMap::new(),
            disk_full: false,
        }
    }

    pub(super) fn arrived(&mut self, from: ReplyTo, req: &ClientRequest) {
        if matches!(req.op, ClientOp::Append { .. }) {
            if self.arrivals.len() >= MAX_ARRIVALS {
                self.arrivals.clear();
            }
            self.arrivals.insert((from, req.id), Instant::now());
        }
    }

    /// Measures an answer on its way out, and fills in what only the shell knows.
    pub(super) fn answering(&mut self, to: ReplyTo, reply: &mut ClientReply) {
        if let Some(arrived) = self.arrivals.remove(&(to, reply.id)) {
            if let ClientResult::Appended { .. } = reply.result {
                self.metrics
                    .commit_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
        }
        if let ClientResult::Status(info) = &mut reply.result {
            info.disk_full = self.disk_full;
            let tick_ms = self.tick.as_millis() as u64;
            for f in &mut info.followers {
                f.last_contact_ms = Some(f.last_contact_ticks * tick_ms);
            }
        }
    }

    /// Notes an AppendEntries or InstallSnapshot (only a leader sends them) for `/readyz`.
    pub(super) fn heard(&self, msg: &Message) {
        let commit = match &msg.body {
            Body::AppendEntries { leader_commit, .. } => Some(*leader_commit),
            Body::InstallSnapshot { .. } => None,
            _ => return,
        };
        self.metrics.probes.heard(LeaderContact {
            from: msg.from,
            term: msg.term,
            commit,
            at: Instant::now(),
        });
    }

    pub(super) fn persisted(&self, took: Duration, entries: usize) {
        self.metrics.fsync_duration.observe(took.as_secs_f64());
        if entries > 0 {
            self.metrics.entries_per_fsync.observe(entries as f64);
        }
    }
}
