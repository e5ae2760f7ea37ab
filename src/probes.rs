//! Liveness and readiness of a peer, as `GET /healthz` and `GET /readyz` report them
//! (Kubernetes conventions). The node thread records what it saw after each turn of its loop;
//! the HTTP thread judges against the clock when asked, so a node thread that stops turning
//! over is seen as such without its help.

use crate::raft::{Index, NodeId, Role, StatusInfo, Term};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `/healthz` fails once the node thread has not completed a loop for this long. The timer
/// queues a tick every few milliseconds, so a healthy loop turns over far more often.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(2);
/// `/readyz` fails while this peer's applied index is more than this many entries behind its
/// leader's commit index (it is catching up, or installing a snapshot).
pub const READY_MAX_LAG: Index = 1_000;

/// The latest AppendEntries or InstallSnapshot this peer took: only a leader sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderContact {
    pub from: NodeId,
    pub term: Term,
    /// The leader's commit index as the message gave it (None for a snapshot chunk).
    pub commit: Option<Index>,
    pub at: Instant,
}

/// What the node thread last saw, for readiness.
#[derive(Clone, Copy, Debug, Default)]
struct View {
    role: Option<Role>,
    term: Term,
    leader: Option<NodeId>,
    /// When this peer last heard from `leader` (now, on the leader itself).
    heard: Option<Instant>,
    leader_commit: Index,
    applied: Index,
    /// A full disk stopped this peer's storage: it acknowledges nothing meanwhile.
    disk_full: bool,
}

/// Shared between the node thread (writer) and the HTTP thread (reader).
#[derive(Debug)]
pub struct Probes {
    epoch: Instant,
    /// Milliseconds from `epoch` to the end of the node thread's latest loop, plus one (0: none).
    last_loop: AtomicU64,
    /// The shortest election timeout, in milliseconds: a leader not heard from for longer
    /// may be gone (a follower may start an election then).
    election_timeout_ms: AtomicU64,
    view: Mutex<View>,
    /// The latest contact from a leader, kept between loops.
    contact: Mutex<Option<LeaderContact>>,
}

impl Default for Probes {
    fn default() -> Probes {
        Probes::new()
    }
}

impl Probes {
    pub fn new() -> Probes {
        Probes {
            epoch: Instant::now(),
            last_loop: AtomicU64::new(0),
            election_timeout_ms: AtomicU64::new(300),
            view: Mutex::new(View::default()),
            contact: Mutex::new(None),
        }
    }

    pub fn set_election_timeout(&self, timeout: Duration) {
        self.election_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The node thread took an AppendEntries or InstallSnapshot from a leader.
    pub fn heard(&self, contact: LeaderContact) {
        *self.contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(contact);
    }

    /// The node thread completed a loop, after which the core's view is `status`.
    pub fn turned_over(&self, status: Option<&StatusInfo>) {
        let now = Instant::now();
        let ms = now.duration_since(self.epoch).as_millis() as u64;
        self.last_loop.store(ms + 1, Ordering::Relaxed);
        let Some(s) = status else {
            return;
        };
        let contact = *self.contact.lock().unwrap_or_else(|p| p.into_inner());
        let mut view = View {
            role: Some(s.role),
            term: s.term,
            leader: s.leader,
            heard: None,
            leader_commit: s.commit_index,
            applied: s.applied_index,
            disk_full: s.disk_full,
        };
        if s.role == Role::Leader {
            view.leader = Some(s.id);
            view.heard = Some(now);
        } else if let Some(c) = contact.filter(|c| Some(c.from) == s.leader && c.term == s.term) {
            view.heard = Some(c.at);
            view.leader_commit = view.leader_commit.max(c.commit.unwrap_or(0));
        }
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// `Ok` while the node thread completed a loop within [`LIVENESS_WINDOW`]; else why not.
    pub fn health(&self) -> Result<String, String> {
        let last = self.last_loop.load(Ordering::Relaxed);
        if last == 0 {
            return Err("the node thread has not completed a loop yet".into());
        }
        let since = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last - 1));
        if since > LIVENESS_WINDOW {
            return Err(format!(
                "the node thread has not completed a loop for {} ms",
                since.as_millis()
            ));
        }
        Ok(format!(
            "ok: the node thread completed a loop {} ms ago",
            since.as_millis()
        ))
    }

    /// `Ok` while this peer's disk is not full, it knows a leader it heard from within an
    /// election timeout, and it has applied to within [`READY_MAX_LAG`] entries of that
    /// leader's commit index; else a one-line reason.
    pub fn readiness(&self) -> Result<String, String> {
        let v = *self.view.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.election_timeout_ms.load(Ordering::Relaxed);
        let role = v.role.map_or("starting", Role::name);
        if v.disk_full {
            return Err(format!(
                "disk full: storage stopped, nothing is acknowledged until there is space ({role} in term {})",
                v.term
            ));
        }
        let Some(leader) = v.leader else {
            return Err(format!("no leader known ({role} in term {})", v.term));
        };
        let Some(heard) = v.heard else {
            return Err(format!(
                "leader {leader} of term {} not heard from yet",
                v.term
            ));
        };
        let since = heard.elapsed().as_millis() as u64;
        if since > timeout {
            return Err(format!(
                "leader {leader} not heard from for {since} ms (election timeout {timeout} ms)"
            ));
        }
        let behind = v.leader_commit.saturating_sub(v.applied);
        if behind > READY_MAX_LAG {
            return Err(format!(
                "applied index {} is {behind} entries behind leader {leader}'s commit index {}",
                v.applied, v.leader_commit
            ));
        }
        Ok(format!(
            "ready: {role}, leader {leader} in term {}, applied {}, leader commit {}",
            v.term, v.applied, v.leader_commit
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(role: Role, leader: Option<NodeId>, commit: Index, applied: Index) -> StatusInfo {
        StatusInfo {
            id: 1,
            role,
            term: 3,
            leader,
            last_index: commit,
            commit_index: commit,
            applied_index: applied,
            elections_started: 0,
            leader_changes: 0,
            auth_failures: 0,
            disk_full: false,
            members: vec![],
            config_index: 0,
            snapshot_index: 0,
            first_index: 1,
            followers: vec![],
        }
    }

    #[test]
    fn health_needs_a_recent_loop() {
        let p = Probes::new();
        assert!(p.health().is_err());
        p.turned_over(None);
        assert!(p.health().is_ok());
    }

    #[test]
    fn readiness_needs_a_leader_heard_from_and_an_applied_index_close_to_its_commit() {
        let p = Probes::new();
        p.set_election_timeout(Duration::from_millis(200));
        assert!(p.readiness().unwrap_err().contains("no leader"));
        p.turned_over(Some(&status(Role::Leader, Some(1), 10, 10)));
        assert!(p.readiness().is_ok());
        p.turned_over(Some(&status(Role::Follower, Some(2), 10, 10)));
        assert!(p.readiness().unwrap_err().contains("not heard from"));
        let contact = |commit, at| LeaderContact {
            from: 2,
            term: 3,
            commit: Some(commit),
            at,
        };
        p.heard(contact(5_000, Instant::now()));
        p.turned_over(Some(&status(Role::Follower, Some(2), 10, 10)));
        let lag = p.readiness().unwrap_err();
        assert!(lag.contains("4990 entries behind"), "{lag}");
        p.heard(contact(10, Instant::now()));
        p.turned_over(Some(&status(Role::Follower, Some(2), 10, 10)));
        assert!(p.readiness().is_ok());
        let old = Instant::now() - Duration::from_millis(500);
        p.heard(contact(10, old));
        p.turned_over(Some(&status(Role::Follower, Some(2), 10, 10)));
        assert!(p.readiness().unwrap_err().contains("not heard from for"));
    }

    #[test]
    fn a_full_disk_is_not_ready_until_there_is_space() {
        let p = Probes::new();
        let mut full = status(Role::Leader, Some(1), 10, 10);
        full.disk_full = true;
        p.turned_over(Some(&full));
        let why = p.readiness().unwrap_err();
        assert!(why.starts_with("disk full") && !why.contains('\n'), "{why}");
        assert!(p.health().is_ok(), "the node thread still turns over");
        full.disk_full = false;
        p.turned_over(Some(&full));
        assert!(p.readiness().is_ok());
    }
}
