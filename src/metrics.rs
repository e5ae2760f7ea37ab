//! Prometheus metrics of one peer, served at `GET /metrics` with the probes `GET /healthz` and
//! `GET /readyz` by the hardened synchronous server of [`crate::http`] (no async runtime). The
//! node thread and the receiver update the metrics with atomic operations; the HTTP thread only
//! reads them.

use crate::http::{Handler, Response, Server};
use crate::probes::Probes;
use crate::raft::{MemberRole, Role, StatusInfo};
use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FollowerLabel {
    pub follower: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric a peer exports. Cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    term: Gauge,
    is_leader: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    config_index: Gauge,
    voters: Gauge,
    learners: Gauge,
    leader_changes: Counter,
    elections_started: Counter,
    follower_match_index: Family<FollowerLabel, Gauge>,
    follower_lag: Family<FollowerLabel, Gauge>,
    /// Followers currently in the families above, so that a deposed leader's rows go away.
    followers: Mutex<BTreeSet<u64>>,
    pub fsync_duration: Histogram,
    pub commit_latency: Histogram,
    pub entries_per_fsync: Histogram,
    pub datagrams_received: Counter,
    pub datagrams_sent: Counter,
    datagrams_dropped: Family<ReasonLabel, Counter>,
    storage_errors: Family<OpLabel, Counter>,
    /// What `/healthz` and `/readyz` report.
    pub probes: Probes,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            config_index: Gauge::default(),
            voters: Gauge::default(),
            learners: Gauge::default(),
            leader_changes: Counter::default(),
            elections_started: Counter::default(),
            follower_match_index: Family::default(),
            follower_lag: Family::default(),
            followers: Mutex::new(BTreeSet::new()),
            // 20 µs .. ~0.33 s
            fsync_duration: Histogram::new(exponential_buckets(20e-6, 2.0, 15)),
            // 50 µs .. ~1.6 s
            commit_latency: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            // 1 .. 16,384
            entries_per_fsync: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            datagrams_received: Counter::default(),
            datagrams_sent: Counter::default(),
            datagrams_dropped: Family::default(),
            storage_errors: Family::default(),
            probes: Probes::new(),
        };
        let r = &mut m.registry;
        r.register("raft_term", "The current term", m.term.clone());
        r.register(
            "raft_is_leader",
            "1 if this peer is the leader, else 0",
            m.is_leader.clone(),
        );
        r.register(
            "raft_commit_index",
            "Highest log index known to be committed",
            m.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "Highest log index applied to the state machine",
            m.applied_index.clone(),
        );
        r.register(
            "raft_last_log_index",
            "Index of the last entry in this peer's log",
            m.last_log_index.clone(),
        );
        r.register(
            "raft_config_index",
            "Index of the configuration entry in force (0: the bootstrap membership)",
            m.config_index.clone(),
        );
        r.register(
            "raft_voters",
            "Voters in the configuration in force",
            m.voters.clone(),
        );
        r.register(
            "raft_learners",
            "Learners in the configuration in force",
            m.learners.clone(),
        );
        // The text encoder adds the `_total` suffix to counters.
        r.register(
            "raft_leader_changes",
            "Times this peer saw leadership change hands (a new leader or term)",
            m.leader_changes.clone(),
        );
        r.register(
            "raft_elections_started",
            "Elections this peer started as a candidate",
            m.elections_started.clone(),
        );
        r.register(
            "raft_follower_match_index",
            "On the leader: the highest index known to be replicated on each follower",
            m.follower_match_index.clone(),
        );
        r.register(
            "raft_follower_lag_entries",
            "On the leader: entries each follower lacks",
            m.follower_lag.clone(),
        );
        r.register(
            "raft_fsync_duration_seconds",
            "Time of each write and fdatasync of the log",
            m.fsync_duration.clone(),
        );
        r.register(
            "raft_commit_latency_seconds",
            "Time from receiving a client append to answering it committed",
            m.commit_latency.clone(),
        );
        r.register(
            "raft_entries_per_fsync",
            "Log entries made durable by each fdatasync (group commit)",
            m.entries_per_fsync.clone(),
        );
        r.register(
            "raft_datagrams_received",
            "UDP datagrams received",
            m.datagrams_received.clone(),
        );
        r.register(
            "raft_datagrams_sent",
            "UDP datagrams sent",
            m.datagrams_sent.clone(),
        );
        r.register(
            "raft_datagrams_dropped",
            "UDP datagrams dropped, by reason",
            m.datagrams_dropped.clone(),
        );
        r.register(
            "raft_storage_errors",
            "Storage operations that failed, by what failed (a full disk included)",
            m.storage_errors.clone(),
        );
        m
    }

    /// Takes the core's view after a batch of steps.
    pub fn observe_status(&self, s: &StatusInfo) {
        self.term.set(s.term as i64);
        self.is_leader.set(i64::from(s.role == Role::Leader));
        self.commit_index.set(s.commit_index as i64);
        self.applied_index.set(s.applied_index as i64);
        self.last_log_index.set(s.last_index as i64);
        self.config_index.set(s.config_index as i64);
        let voters = s
            .members
            .iter()
            .filter(|m| m.role == MemberRole::Voter)
            .count();
        self.voters.set(voters as i64);
        self.learners.set((s.members.len() - voters) as i64);
        // The core's counters only grow; the metric follows them.
        let grow = |c: &Counter, to: u64| {
            let now = c.get();
            if to > now {
                c.inc_by(to - now);
            }
        };
        grow(&self.leader_changes, s.leader_changes);
        grow(&self.elections_started, s.elections_started);
        let mut shown = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let current: BTreeSet<u64> = s.followers.iter().map(|f| f.id).collect();
        for gone in shown.difference(&current) {
            let label = FollowerLabel {
                follower: gone.to_string(),
            };
            self.follower_match_index.remove(&label);
            self.follower_lag.remove(&label);
        }
        for f in &s.followers {
            let label = FollowerLabel {
                follower: f.id.to_string(),
            };
            self.follower_match_index
                .get_or_create(&label)
                .set(f.match_index as i64);
            self.follower_lag.get_or_create(&label).set(f.lag as i64);
        }
        *shown = current;
    }

    /// Exports a `raft_datagrams_dropped_total` series at 0 for each of `reasons`, so that a
    /// rate or an alert on any of them works before the first drop.
    pub fn declare_drop_reasons<'a>(&self, reasons: impl IntoIterator<Item = &'a str>) {
        for reason in reasons {
            self.dropped(reason, 0);
        }
    }

    /// A storage operation failed (`op`: `wal_write`, `store_write`, `snapshot`, `wal_rotate`,
    /// `snapshot_install`).
    pub fn storage_error(&self, op: &str) {
        let op = op.to_string();
        self.storage_errors.get_or_create(&OpLabel { op }).inc();
    }

    /// Counts `n` datagrams dropped for `reason` (a short, fixed word).
    pub fn dropped(&self, reason: &str, n: u64) {
        self.datagrams_dropped
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }

    /// The exposition in the Prometheus text format (version 0.0.4), which every Prometheus
    /// and `promtool check metrics` read.
    pub fn encode(&self) -> String {
        let mut open_metrics = String::new();
        text::encode(&mut open_metrics, &self.registry).expect("writing to a String cannot fail");
        to_prometheus_text(&open_metrics)
    }
}

/// Turns the OpenMetrics text the registry writes into the Prometheus text format: a counter's
/// HELP and TYPE lines name its samples (`x_total`), and there is no `# EOF`.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: BTreeSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The HTTP server of `metrics_addr`; stops when dropped.
pub struct MetricsServer {
    server: Server,
    pub addr: SocketAddr,
}

impl MetricsServer {
    /// Serves `metrics` at `http://addr/metrics` and its probes at `/healthz` and `/readyz`.
    /// A port in use is a clear error.
    pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<MetricsServer, String> {
        let handler: Handler = Box::new(move |path| answer(&metrics, path));
        let server = Server::start(addr, "metrics", handler)?;
        let addr = server.addr;
        log::info!(
            "serving Prometheus metrics at http://{addr}/metrics, probes at /healthz and /readyz"
        );
        Ok(MetricsServer { server, addr })
    }
}

impl MetricsServer {
    /// Stops serving (also done on drop); returns within a fraction of a second.
    pub fn stop(self) {
        drop(self.server);
    }
}

fn answer(metrics: &Metrics, path: &str) -> Response {
    let probe = |result: Result<String, String>| match result {
        Ok(line) => Response::text(200, format!("{line}\n")),
        Err(line) => Response::text(503, format!("{line}\n")),
    };
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.encode(),
        },
        "/healthz" => probe(metrics.probes.health()),
        "/readyz" => probe(metrics.probes.readiness()),
        _ => Response::text(
            404,
            "not found; metrics are at /metrics, probes at /healthz and /readyz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::FollowerInfo;
    use std::io::{Read, Write};

    fn status(role: Role, followers: &[(u64, u64, u64)]) -> StatusInfo {
        StatusInfo {
            members: [
                (1, MemberRole::Voter),
                (2, MemberRole::Voter),
                (3, MemberRole::Learner),
            ]
            .into_iter()
            .map(|(id, role)| crate::raft::Member {
                id,
                address: format!("127.0.0.1:{}", 9000 + id),
                role,
            })
            .collect(),
            config_index: 6,
            snapshot_index: 0,
            first_index: 1,
            id: 1,
            role,
            term: 4,
            leader: Some(1),
            last_index: 10,
            commit_index: 9,
            applied_index: 8,
            elections_started: 2,
            leader_changes: 3,
            auth_failures: 0,
            disk_full: false,
            followers: followers
                .iter()
                .map(|&(id, m, lag)| FollowerInfo {
                    id,
                    match_index: m,
                    lag,
                    last_contact_ticks: 0,
                    last_contact_ms: None,
                })
                .collect(),
        }
    }

    fn scrape(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    #[test]
    fn a_scrape_shows_the_core_view_and_a_deposed_leaders_followers_go_away() {
        let m = Arc::new(Metrics::new());
        m.observe_status(&status(Role::Leader, &[(2, 10, 0), (3, 7, 3)]));
        m.datagrams_received.inc_by(5);
        m.dropped("malformed", 2);
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), Arc::clone(&m)).unwrap();
        let body = scrape(server.addr, "/metrics");
        for line in [
            "raft_term 4",
            "raft_is_leader 1",
            "raft_commit_index 9",
            "raft_leader_changes_total 3",
            "raft_elections_started_total 2",
            "raft_follower_lag_entries{follower=\"3\"} 3",
            "raft_follower_match_index{follower=\"2\"} 10",
            "raft_datagrams_received_total 5",
            "raft_datagrams_dropped_total{reason=\"malformed\"} 2",
            "raft_config_index 6",
            "raft_voters 2",
            "raft_learners 1",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
        }
        m.observe_status(&status(Role::Follower, &[]));
        let body = scrape(server.addr, "/metrics");
        assert!(body.contains("raft_is_leader 0"), "{body}");
        assert!(!body.contains("follower=\"3\""), "{body}");
        assert!(scrape(server.addr, "/other").contains("404"));
    }

    #[test]
    fn a_metrics_port_in_use_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = MetricsServer::start(addr, Arc::new(Metrics::new()))
            .err()
            .expect("port in use");
        assert!(err.contains(&addr.to_string()), "{err}");
    }
}
