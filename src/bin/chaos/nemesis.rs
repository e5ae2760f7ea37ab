//! The nemesis: a seeded schedule of faults, one round at a time. Each round waits a quiet gap,
//! starts a fault (in `mixed` mode sometimes with bad network weather on top), holds it, then
//! heals what it did and records the fault with its start and end times.

use crate::cluster::{leader_of, Cluster};
use crate::history::FaultEvent;
use crate::netns::Netns;
use crate::proxy::Network;
use crate::run::{Rng, Shared};
use raft::client::{Client, ClientError};
use raft::raft::{ConfChange, MemberRole, NodeId};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// kill -9 a minority (the leader half of the time) and restart it on the same data.
    Crash,
    /// kill -9 every peer at once, then restart them all.
    KillAll,
    /// SIGSTOP a minority (usually the leader), later SIGCONT.
    Pause,
    /// Cut links in the proxies: isolate the leader, majority/minority, a bridge node,
    /// one-way cuts.
    Partition,
    /// Drop datagrams at random on every link.
    Loss,
    /// Send datagrams twice at random on every link.
    Dup,
    /// Hold datagrams for a random time on every link, which reorders them.
    Delay,
    /// Remove a random member (the leader sometimes) and add it back as a new member on an
    /// empty data directory (learner, then voter); or transfer leadership.
    Membership,
}

pub const ALL_FAULTS: [FaultKind; 8] = [
    FaultKind::Crash,
    FaultKind::KillAll,
    FaultKind::Pause,
    FaultKind::Partition,
    FaultKind::Loss,
    FaultKind::Dup,
    FaultKind::Delay,
    FaultKind::Membership,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::KillAll => "killall",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Loss => "loss",
            FaultKind::Dup => "dup",
            FaultKind::Delay => "delay",
            FaultKind::Membership => "membership",
        }
    }

    /// Parses `crash|killall|pause|partition|loss|dup|delay|membership|mixed|none`,
    /// comma-separated.
    /// With `netns`, `mixed` leaves out the faults that need the proxies, and naming one of
    /// them is an error.
    pub fn parse_list(s: &str, netns: bool) -> Result<Vec<FaultKind>, String> {
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim) {
            match word {
                "mixed" => out.extend(ALL_FAULTS.iter().filter(|k| !(netns && k.needs_proxies()))),
                "none" => {}
                w => {
                    let kind = *ALL_FAULTS.iter().find(|k| k.name() == w).ok_or_else(|| {
                        format!(
                            "unknown fault {w:?}: expected crash, killall, pause, partition, loss, dup, delay, membership, mixed or none"
                        )
                    })?;
                    if netns && kind.needs_proxies() {
                        return Err(format!(
                            "fault {w:?} is not available with --netns: it acts on single datagrams, which only the proxies can do, or restarts peers with --join, which the namespace script does not; use crash, killall, pause, partition or mixed"
                        ));
                    }
                    out.push(kind);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn is_weather(self) -> bool {
        matches!(self, FaultKind::Loss | FaultKind::Dup | FaultKind::Delay)
    }

    /// Faults not available with `--netns`: those the link proxies make, datagram by
    /// datagram, and membership changes (the namespace script cannot start a peer with
    /// `--join`).
    pub fn needs_proxies(self) -> bool {
        self.is_weather() || self == FaultKind::Membership
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where partitions are made.
#[derive(Clone)]
pub enum Links {
    /// In the proxy of every directed link.
    Proxies(Arc<Network>),
    /// On the peers' own links in their namespaces: a link down, or a packet filter.
    Netns(Arc<Netns>),
}

impl Links {
    /// Lifts every partition (and, on the proxies, any loss, duplication or delay).
    pub fn heal(&self) -> Result<(), String> {
        match self {
            Links::Proxies(network) => {
                network.heal();
                Ok(())
            }
            Links::Netns(netns) => netns.heal(),
        }
    }

    fn proxies(&self, kind: FaultKind) -> Result<&Network, String> {
        match self {
            Links::Proxies(network) => Ok(network),
            Links::Netns(_) => Err(format!(
                "{kind} needs the proxies, which a --netns run has not"
            )),
        }
    }
}

/// What the nemesis needs to reach.
pub struct Nemesis {
    pub kinds: Vec<FaultKind>,
    pub cluster: Arc<Mutex<Cluster>>,
    pub links: Links,
    pub shared: Arc<Shared>,
    pub rng: Rng,
    /// Asks the peers who leads.
    pub status: Client,
    /// Asks for membership changes and transfers: a longer deadline than `status`.
    pub admin: Client,
    /// Add loss, dup or delay on top of another fault in some rounds (mixed mode).
    pub combine: bool,
}

/// A fault being held, and how to undo it.
struct Active {
    kind: FaultKind,
    detail: String,
    killed: Vec<NodeId>,
    paused: Vec<NodeId>,
    /// A member whose removal was asked for, and its address, to add it back on healing.
    removed: Option<(NodeId, String)>,
}

impl Nemesis {
    /// Runs rounds until the run stops; the last fault is healed before returning. Errors only
    /// when a peer cannot be restarted.
    pub fn run(mut self) -> Result<(), String> {
        if self.kinds.is_empty() {
            return Ok(());
        }
        let first = self.rng.range(1000, 2000);
        self.sleep(first);
        while !self.shared.stopping() {
            let mut round = Vec::new();
            let kind = self.kinds[self.rng.below(self.kinds.len() as u64) as usize];
            let start = self.shared.now_us();
            round.push(self.inflict(kind)?);
            if self.combine && !kind.is_weather() && self.rng.chance(0.3) {
                let weather =
                    [FaultKind::Loss, FaultKind::Dup, FaultKind::Delay][self.rng.below(3) as usize];
                round.push(self.inflict(weather)?);
            }
            let what: Vec<String> = round
                .iter()
                .map(|a| format!("{}: {}", a.kind, a.detail))
                .collect();
            log::info!("nemesis: {}", what.join(" + "));
            *self.shared.fault.lock().expect("fault lock") = what.join(" + ");
            let hold = match kind {
                FaultKind::KillAll => self.rng.range(300, 2000),
                _ => self.rng.range(1000, 5000),
            };
            self.sleep(hold);
            for a in &round {
                self.heal(a)?;
            }
            let end = self.shared.now_us();
            self.shared.fault.lock().expect("fault lock").clear();
            let mut faults = self.shared.faults.lock().expect("faults lock");
            for a in round {
                faults.push(FaultEvent {
                    fault: a.kind.name().to_string(),
                    detail: a.detail,
                    start,
                    end,
                });
            }
            drop(faults);
            let gap = self.rng.range(500, 2500);
            self.sleep(gap);
        }
        Ok(())
    }

    /// Sleeps `ms` milliseconds, or less if the run stops.
    fn sleep(&self, ms: u64) {
        let mut left = ms;
        while left > 0 && !self.shared.stopping() {
            let step = left.min(50);
            std::thread::sleep(Duration::from_millis(step));
            left -= step;
        }
    }

    fn leader(&mut self) -> Option<NodeId> {
        leader_of(&self.status.status())
    }

    /// Up to `count` distinct nodes, the leader first if `leader_first` and one is known.
    fn victims(&mut self, count: usize, leader_first: bool) -> Vec<NodeId> {
        let mut ids = self.cluster.lock().expect("cluster lock").ids();
        self.rng.shuffle(&mut ids);
        if leader_first {
            if let Some(l) = self.leader() {
                ids.retain(|&i| i != l);
                ids.insert(0, l);
            }
        }
        ids.truncate(count);
        ids
    }

    fn minority(&self) -> usize {
        (self.cluster.lock().expect("cluster lock").peers.len() - 1) / 2
    }

    fn inflict(&mut self, kind: FaultKind) -> Result<Active, String> {
        let mut a = Active {
            kind,
            detail: String::new(),
            killed: Vec::new(),
            paused: Vec::new(),
            removed: None,
        };
        match kind {
            FaultKind::Crash => {
                let count = 1 + self.rng.below(self.minority() as u64) as usize;
                let leader_first = self.rng.chance(0.5);
                let victims = self.victims(count, leader_first);
                let mut cluster = self.cluster.lock().expect("cluster lock");
                for &v in &victims {
                    cluster.kill(v)?;
                }
                a.detail = format!(
                    "kill -9 {}{}",
                    ids(&victims),
                    if leader_first { " (leader first)" } else { "" }
                );
                a.killed = victims;
            }
            FaultKind::KillAll => {
                let mut cluster = self.cluster.lock().expect("cluster lock");
                let all = cluster.ids();
                for &v in &all {
                    cluster.kill(v)?;
                }
                a.detail = format!("kill -9 all of {}", ids(&all));
                a.killed = all;
            }
            FaultKind::Pause => {
                let count = 1 + self.rng.below(self.minority() as u64) as usize;
                let leader_first = self.rng.chance(0.7);
                let victims = self.victims(count, leader_first);
                let mut cluster = self.cluster.lock().expect("cluster lock");
                // A peer that exited on its own cannot be paused; that is noted elsewhere.
                let paused: Vec<NodeId> = victims
                    .into_iter()
                    .filter(|&v| cluster.pause(v).is_ok())
                    .collect();
                a.detail = format!(
                    "SIGSTOP {}{}",
                    ids(&paused),
                    if leader_first { " (leader first)" } else { "" }
                );
                a.paused = paused;
            }
            FaultKind::Partition => {
                a.detail = match self.links.clone() {
                    Links::Proxies(network) => self.partition(&network),
                    Links::Netns(netns) => self.partition_links(&netns)?,
                }
            }
            FaultKind::Loss => {
                let p = self.rng.range(10, 50) as f64 / 100.0;
                self.links.proxies(kind)?.update_all(|r| r.loss = p);
                a.detail = format!("drop {:.0}% of datagrams on every link", p * 100.0);
            }
            FaultKind::Dup => {
                let p = self.rng.range(20, 60) as f64 / 100.0;
                self.links.proxies(kind)?.update_all(|r| r.dup = p);
                a.detail = format!("send {:.0}% of datagrams twice on every link", p * 100.0);
            }
            FaultKind::Membership if self.rng.chance(0.35) => {
                a.detail = match self.admin.transfer_leader(None) {
                    Ok((leader, _)) => format!("transfer leadership: node {leader} leads"),
                    Err(e) => format!("transfer leadership: {e}"),
                };
            }
            FaultKind::Membership => {
                let leader_first = self.rng.chance(0.3);
                let victim = self.victims(1, leader_first)[0];
                a.detail = self.remove(victim, &mut a.removed)?;
            }
            FaultKind::Delay => {
                let hi = self.rng.range(10, 150);
                self.links
                    .proxies(kind)?
                    .update_all(|r| r.delay_ms = (0, hi));
                a.detail = format!("delay every datagram by 0-{hi} ms (reordering)");
            }
        }
        Ok(a)
    }

    /// Cuts links in the proxies in one of six shapes; returns what it did.
    fn partition(&mut self, net: &Network) -> String {
        let mut nodes = self.cluster.lock().expect("cluster lock").ids();
        self.rng.shuffle(&mut nodes);
        let leader = self.leader().unwrap_or(nodes[0]);
        let others: Vec<NodeId> = nodes.iter().copied().filter(|&n| n != leader).collect();
        match self.rng.below(6) {
            0 => {
                net.partition(&[vec![leader], others.clone()]);
                format!("isolate leader: {} | {}", ids(&[leader]), ids(&others))
            }
            1 => {
                let small = 1 + self.rng.below(self.minority() as u64) as usize;
                let (minority, majority) = nodes.split_at(small);
                net.partition(&[minority.to_vec(), majority.to_vec()]);
                format!("minority {} | majority {}", ids(minority), ids(majority))
            }
            2 => {
                // The bridge talks to both sides; the sides cannot talk to each other.
                let bridge = nodes[0];
                let rest = &nodes[1..];
                let (left, right) = rest.split_at(rest.len() / 2);
                for &l in left {
                    for &r in right {
                        net.cut(l, r);
                        net.cut(r, l);
                    }
                }
                format!("bridge {}: {} | {}", bridge, ids(left), ids(right))
            }
            3 => {
                for &o in &others {
                    net.cut(leader, o);
                }
                format!("one-way: leader {leader} cannot send, can receive")
            }
            4 => {
                for &o in &others {
                    net.cut(o, leader);
                }
                format!("one-way: leader {leader} can send, cannot receive")
            }
            _ => {
                let mut cut = Vec::new();
                for &from in &nodes {
                    for &to in &nodes {
                        if from != to && self.rng.chance(0.3) {
                            net.cut(from, to);
                            cut.push(format!("{from}->{to}"));
                        }
                    }
                }
                cut.sort();
                format!("one-way cuts: {}", cut.join(","))
            }
        }
    }

    /// Cuts the peers' links in one of five shapes (two where no packet filter works, as
    /// one-way cuts need one); returns what it did. A cut peer is cut off from the clients
    /// too, and the shapes are per peer, not per pair: there is no bridge node here.
    fn partition_links(&mut self, netns: &Netns) -> Result<String, String> {
        let mut nodes = self.cluster.lock().expect("cluster lock").ids();
        self.rng.shuffle(&mut nodes);
        let leader = self.leader().unwrap_or(nodes[0]);
        let others: Vec<NodeId> = nodes.iter().copied().filter(|&n| n != leader).collect();
        let shapes = if netns.one_way { 5 } else { 2 };
        Ok(match self.rng.below(shapes) {
            0 => {
                netns.cut(leader)?;
                format!(
                    "isolate leader: {} | {} (link down)",
                    ids(&[leader]),
                    ids(&others)
                )
            }
            1 => {
                let small = 1 + self.rng.below(self.minority() as u64) as usize;
                let (minority, majority) = nodes.split_at(small);
                netns.split(minority)?;
                format!(
                    "minority {} | majority {} (each of the minority's links down)",
                    ids(minority),
                    ids(majority)
                )
            }
            2 => {
                netns.cut_out(leader)?;
                format!("one-way: leader {leader} cannot send, can receive")
            }
            3 => {
                netns.cut_in(leader)?;
                format!("one-way: leader {leader} can send, cannot receive")
            }
            _ => {
                let mut cut = Vec::new();
                for &n in &nodes {
                    if self.rng.chance(0.3) {
                        cut.push((n, self.rng.chance(0.5)));
                    }
                }
                if cut.is_empty() {
                    cut.push((nodes[0], self.rng.chance(0.5)));
                }
                cut.sort();
                let mut what = Vec::new();
                for &(n, inbound) in &cut {
                    if inbound {
                        netns.cut_in(n)?;
                        what.push(format!("{n} cannot receive"));
                    } else {
                        netns.cut_out(n)?;
                        what.push(format!("{n} cannot send"));
                    }
                }
                format!("one-way cuts: {}", what.join(", "))
            }
        })
    }

    fn heal(&mut self, a: &Active) -> Result<(), String> {
        match a.kind {
            FaultKind::Partition | FaultKind::Loss | FaultKind::Dup | FaultKind::Delay => {
                self.links.heal()?
            }
            FaultKind::Membership => {
                if let Some((id, address)) = &a.removed {
                    self.add_back(*id, address)?;
                }
            }
            FaultKind::Crash | FaultKind::KillAll | FaultKind::Pause => {
                let mut cluster = self.cluster.lock().expect("cluster lock");
                for &v in &a.paused {
                    cluster.resume(v)?;
                }
                for &v in &a.killed {
                    cluster.start(v)?;
                }
            }
        }
        self.shared.fault_rounds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Nemesis {
    /// Asks for the removal of `id`; on an answer other than a definite refusal, `removed`
    /// records it (with its address) to be added back on healing. Returns what it did.
    fn remove(
        &mut self,
        id: NodeId,
        removed: &mut Option<(NodeId, String)>,
    ) -> Result<String, String> {
        let address = match self.admin.members() {
            Ok(m) => m
                .members
                .into_iter()
                .find(|m| m.id == id)
                .map(|m| m.address),
            Err(e) => return Ok(format!("remove {id}: cannot list the members: {e}")),
        };
        let Some(address) = address else {
            return Ok(format!("remove {id}: not a member"));
        };
        self.cluster
            .lock()
            .expect("cluster lock")
            .mark_removed(id, true)?;
        let outcome = match self.admin.change_members(ConfChange::Remove { id }, false) {
            Ok(_) => "committed".to_string(),
            Err(ClientError::Refused(reason)) => {
                self.cluster
                    .lock()
                    .expect("cluster lock")
                    .mark_removed(id, false)?;
                return Ok(format!("remove {id}: refused: {reason}"));
            }
            Err(e) => format!("outcome unknown: {e}"),
        };
        *removed = Some((id, address.clone()));
        Ok(format!("remove {id} at {address}: {outcome}"))
    }

    /// Adds removed member `id` back, as a new member on an empty data directory: started
    /// with `--join`, added as a learner at `address`, promoted once caught up. Retries for
    /// up to a minute, even while the run stops (the final checks expect every member back);
    /// a member whose removal never took effect is left as it is.
    fn add_back(&mut self, id: NodeId, address: &str) -> Result<(), String> {
        let mut rejoined = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let members = match self.admin.members() {
                Ok(m) => m.members,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            match members.iter().find(|m| m.id == id).map(|m| m.role) {
                Some(MemberRole::Voter) if !rejoined => {
                    // The removal did not happen (its outcome was unknown).
                    self.cluster
                        .lock()
                        .expect("cluster lock")
                        .mark_removed(id, false)?;
                    return Ok(());
                }
                Some(MemberRole::Voter) => {
                    log::info!("nemesis: node {id} is a voter again");
                    return Ok(());
                }
                Some(MemberRole::Learner) => {
                    if let Err(e) = self.admin.change_members(ConfChange::Promote { id }, false) {
                        log::info!("nemesis: promoting {id} again: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                None => {
                    if !rejoined {
                        let mut cluster = self.cluster.lock().expect("cluster lock");
                        cluster.rejoin(id, Duration::from_secs(5))?;
                        rejoined = true;
                    }
                    let change = ConfChange::Rejoin {
                        id,
                        address: address.to_string(),
                    };
                    if let Err(e) = self.admin.change_members(change, false) {
                        log::info!("nemesis: adding {id} again: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
        Err(format!(
            "node {id} could not be added back within a minute of its removal"
        ))
    }
}

/// `[1,3]`.
pub fn ids(nodes: &[NodeId]) -> String {
    let v: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    format!("[{}]", v.join(","))
}
