//! What `client watch` shows: one row per peer from a round of `status` answers, commits per
//! second, and a running list of events found by comparing each round with the one before
//! (elections, leader changes, peers going silent and coming back). Plain data and text, so
//! the same frame is drawn in a terminal or printed by `--once`.

use raft::client::PeerStatus;
use raft::raft::{Index, MemberRole, NodeId, Role, StatusInfo};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Events kept for the list under the table.
pub const MAX_EVENTS: usize = 200;

/// The view's state across refreshes.
#[derive(Default)]
pub struct Watch {
    /// The previous round: when, and each peer's answer (None: silent).
    last: Option<(Instant, BTreeMap<NodeId, Option<StatusInfo>>)>,
    /// The leader and term last reported as an event.
    leader: Option<(NodeId, u64)>,
    /// Commit index growth per second, from the highest commit index seen in two rounds.
    pub commits_per_sec: f64,
    /// Newest last, each with the time since the view started.
    pub events: VecDeque<String>,
    started: Option<Instant>,
    peers: Vec<PeerStatus>,
    /// The newest configuration index any peer reported.
    config_index: Option<Index>,
}

impl Watch {
    /// Takes one round of `status` answers taken at `now`.
    pub fn update(&mut self, now: Instant, peers: Vec<PeerStatus>) {
        let started = *self.started.get_or_insert(now);
        let stamp = format_elapsed(now.duration_since(started));
        let round: BTreeMap<NodeId, Option<StatusInfo>> =
            peers.iter().map(|p| (p.id, p.info.clone())).collect();
        let mut events = Vec::new();
        if let Some((then, before)) = &self.last {
            for (id, info) in &round {
                let was = before.get(id).cloned().flatten();
                match (&was, info) {
                    (Some(_), None) => events.push(format!("peer {id} stopped answering")),
                    (None, Some(_)) if before.contains_key(id) => {
                        events.push(format!("peer {id} answers again"))
                    }
                    (Some(w), Some(i)) if i.elections_started > w.elections_started => {
                        events.push(format!("peer {id} started an election (term {})", i.term))
                    }
                    _ => {}
                }
            }
            let commit = |r: &BTreeMap<NodeId, Option<StatusInfo>>| {
                r.values()
                    .flatten()
                    .map(|i| i.commit_index)
                    .max()
                    .unwrap_or(0)
            };
            let secs = now.duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                let grown = commit(&round).saturating_sub(commit(before));
                self.commits_per_sec = grown as f64 / secs;
            }
        }
        // Membership changes: the newest configuration any peer has, once it moves.
        let newest = round
            .values()
            .flatten()
            .filter(|i| !i.members.is_empty())
            .max_by_key(|i| i.config_index);
        if let Some(info) = newest {
            if self
                .config_index
                .is_some_and(|seen| info.config_index > seen)
            {
                let members: Vec<String> = info
                    .members
                    .iter()
                    .map(|m| match m.role {
                        MemberRole::Voter => m.id.to_string(),
                        MemberRole::Learner => format!("{} (learner)", m.id),
                    })
                    .collect();
                events.push(format!(
                    "configuration at index {}: {}",
                    info.config_index,
                    members.join(", ")
                ));
            }
            if self
                .config_index
                .is_none_or(|seen| info.config_index > seen)
            {
                self.config_index = Some(info.config_index);
            }
        }
        if let Some(leader) = leader_of(&round) {
            if self.leader != Some(leader) {
                let what = match self.leader {
                    None => format!("peer {} leads in term {}", leader.0, leader.1),
                    Some((old, _)) if old == leader.0 => {
                        format!("peer {} leads again, term {}", leader.0, leader.1)
                    }
                    Some((old, _)) => format!(
                        "leader change: peer {} leads in term {} (was peer {old})",
                        leader.0, leader.1
                    ),
                };
                events.push(what);
                self.leader = Some(leader);
            }
        }
        for e in events {
            self.events.push_back(format!("{stamp}  {e}"));
            while self.events.len() > MAX_EVENTS {
                self.events.pop_front();
            }
        }
        self.last = Some((now, round));
        self.peers = peers;
    }

    /// One frame as lines of text, fitting `height` lines (the newest events last).
    pub fn render(&self, title: &str, height: usize) -> Vec<String> {
        let leader_view: BTreeMap<NodeId, (u64, Option<u64>, u64)> = self
            .peers
            .iter()
            .filter_map(|p| p.info.as_ref())
            .filter(|i| i.role == Role::Leader)
            .flat_map(|i| {
                i.followers
                    .iter()
                    .map(|f| (f.id, (f.lag, f.last_contact_ms, f.last_contact_ticks)))
            })
            .collect();
        let mut lines =
            vec![
                format!(
                    "{title}   commits/s {:.0}   (q or Ctrl-C quits)",
                    self.commits_per_sec
                ),
                String::new(),
                format!(
                "{:>4}  {:<21}  {:<12}  {:>5}  {:>6}  {:>9}  {:>9}  {:>9}  {:>7}  {:>8}  answers",
                "id", "address", "role", "term", "leader", "last", "commit", "applied", "lag",
                "contact"
            ),
            ];
        for p in &self.peers {
            let (lag, contact) = match leader_view.get(&p.id) {
                Some(&(lag, ms, ticks)) => (
                    lag.to_string(),
                    ms.map_or(format!("{ticks}t"), |ms| format!("{ms}ms")),
                ),
                None => ("-".into(), "-".into()),
            };
            lines.push(match &p.info {
                Some(i) => format!(
                    "{:>4}  {:<21}  {:<12}  {:>5}  {:>6}  {:>9}  {:>9}  {:>9}  {:>7}  {:>8}  yes",
                    p.id,
                    p.address.to_string(),
                    role_name(i),
                    i.term,
                    i.leader.map_or("-".into(), |l| l.to_string()),
                    i.last_index,
                    i.commit_index,
                    i.applied_index,
                    lag,
                    contact
                ),
                None => format!(
                    "{:>4}  {:<21}  {:<12}  {:>5}  {:>6}  {:>9}  {:>9}  {:>9}  {:>7}  {:>8}  no",
                    p.id,
                    p.address.to_string(),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    lag,
                    contact
                ),
            });
        }
        lines.push(String::new());
        lines.push("events".into());
        let room = height.saturating_sub(lines.len()).max(1);
        let skip = self.events.len().saturating_sub(room);
        lines.extend(self.events.iter().skip(skip).cloned());
        lines
    }
}

/// The role column: `learner` for a learner (which is always a follower), else the role.
fn role_name(i: &StatusInfo) -> &'static str {
    let learner = i
        .members
        .iter()
        .any(|m| m.id == i.id && m.role == raft::raft::MemberRole::Learner);
    if learner {
        "learner"
    } else {
        i.role.name()
    }
}

/// The one leader a round agrees on: the highest term in which some peer says it leads.
fn leader_of(round: &BTreeMap<NodeId, Option<StatusInfo>>) -> Option<(NodeId, u64)> {
    round
        .values()
        .flatten()
        .filter(|i| i.role == Role::Leader)
        .map(|i| (i.id, i.term))
        .max_by_key(|&(_, term)| term)
}

fn format_elapsed(d: Duration) -> String {
    let ms = d.as_millis();
    format!(
        "{:>3}:{:02}.{:01}",
        ms / 60_000,
        ms / 1000 % 60,
        ms / 100 % 10
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::raft::FollowerInfo;

    fn peer(id: NodeId, info: Option<(Role, u64, Option<NodeId>, u64)>) -> PeerStatus {
        PeerStatus {
            id,
            address: format!("127.0.0.1:{}", 3000 + id).parse().unwrap(),
            answered: info.is_some(),
            info: info.map(|(role, term, leader, elections)| StatusInfo {
                members: Vec::new(),
                config_index: 0,
                snapshot_index: 0,
                first_index: 1,
                id,
                role,
                term,
                leader,
                last_index: 10,
                commit_index: 10 * term,
                applied_index: 10,
                elections_started: elections,
                leader_changes: term,
                auth_failures: 0,
                disk_full: false,
                followers: if role == Role::Leader {
                    vec![FollowerInfo {
                        id: id % 3 + 1,
                        match_index: 7,
                        lag: 3,
                        last_contact_ticks: 2,
                        last_contact_ms: Some(20),
                    }]
                } else {
                    Vec::new()
                },
            }),
        }
    }

    #[test]
    fn a_leader_change_and_a_silent_peer_become_events_and_the_table_shows_lag() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.update(
            t0,
            vec![
                peer(1, Some((Role::Leader, 1, Some(1), 1))),
                peer(2, Some((Role::Follower, 1, Some(1), 0))),
                peer(3, Some((Role::Follower, 1, Some(1), 0))),
            ],
        );
        w.update(
            t0 + Duration::from_secs(1),
            vec![
                peer(1, None),
                peer(2, Some((Role::Leader, 2, Some(2), 1))),
                peer(3, Some((Role::Follower, 2, Some(2), 0))),
            ],
        );
        let events: Vec<&str> = w.events.iter().map(|e| e[8..].trim_start()).collect();
        assert_eq!(
            events,
            vec![
                "peer 1 leads in term 1",
                "peer 1 stopped answering",
                "peer 2 started an election (term 2)",
                "leader change: peer 2 leads in term 2 (was peer 1)",
            ]
        );
        assert_eq!(w.commits_per_sec, 10.0);
        let frame = w.render("raft", 40).join("\n");
        assert!(frame.contains("leader"), "{frame}");
        let row3 = frame
            .lines()
            .find(|l| l.trim_start().starts_with("3 "))
            .unwrap();
        assert!(row3.contains("20ms") && row3.contains(" 3 "), "{row3}");
        let row1 = frame
            .lines()
            .find(|l| l.trim_start().starts_with("1 "))
            .unwrap();
        assert!(row1.ends_with("no"), "{row1}");
    }

    #[test]
    fn a_learner_is_shown_as_one() {
        use raft::raft::{Member, MemberRole};
        let mut learner = peer(4, Some((Role::Follower, 1, Some(1), 0)));
        let mut voter = peer(2, Some((Role::Follower, 1, Some(1), 0)));
        let members = vec![
            Member {
                id: 2,
                address: "127.0.0.1:3002".into(),
                role: MemberRole::Voter,
            },
            Member {
                id: 4,
                address: "127.0.0.1:3004".into(),
                role: MemberRole::Learner,
            },
        ];
        for p in [&mut learner, &mut voter] {
            p.info.as_mut().unwrap().members = members.clone();
        }
        let mut w = Watch::default();
        w.update(Instant::now(), vec![voter, learner]);
        let frame = w.render("raft", 40);
        let row = |id: &str| {
            frame
                .iter()
                .find(|l| l.trim_start().starts_with(id))
                .unwrap()
        };
        assert!(row("4 ").contains(" learner "), "{frame:?}");
        assert!(row("2 ").contains(" follower "), "{frame:?}");
    }

    #[test]
    fn a_membership_change_becomes_an_event() {
        use raft::raft::Member;
        let member = |id, role| Member {
            id,
            address: format!("127.0.0.1:{}", 3000 + id),
            role,
        };
        let with_config = |mut p: PeerStatus, index, members: Vec<Member>| {
            let info = p.info.as_mut().unwrap();
            info.config_index = index;
            info.members = members;
            p
        };
        let three = vec![
            member(1, MemberRole::Voter),
            member(2, MemberRole::Voter),
            member(3, MemberRole::Voter),
        ];
        let mut four = three.clone();
        four.push(member(4, MemberRole::Learner));
        let t0 = Instant::now();
        let mut w = Watch::default();
        let leader = || peer(1, Some((Role::Leader, 1, Some(1), 1)));
        w.update(t0, vec![with_config(leader(), 0, three.clone())]);
        w.update(t0, vec![with_config(leader(), 0, three)]);
        assert!(w.events.iter().all(|e| !e.contains("configuration")));
        w.update(t0, vec![with_config(leader(), 12, four)]);
        let last = w.events.back().unwrap();
        assert!(
            last.ends_with("configuration at index 12: 1, 2, 3, 4 (learner)"),
            "{last}"
        );
    }
}
