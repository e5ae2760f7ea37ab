//! UDP forwarding proxies, one per directed peer-to-peer link, where network faults happen.
//!
//! Peer `i`'s config gives, as the address of peer `j`, the address of the proxy for link
//! `i → j`; that proxy forwards what it receives to `j`'s real port. Peers answer each other by
//! node ID through their configs, never to a datagram's source address, so `j`'s reply to `i`
//! goes through the `j → i` proxy: every direction of every link can be cut, slowed, thinned
//! or doubled on its own. Clients talk to peers directly.
//!
//! Each proxy is one thread with one socket. It applies its link's current [`Rules`] to every
//! datagram as it arrives: a cut or a loss drops it; a duplication sends it twice; a delay holds
//! it in a queue until it is due, so delays drawn at random reorder datagrams.

use crate::run::Rng;
use raft::raft::{NodeId, MAX_DATAGRAM};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a proxy waits for a datagram before it looks at its queue and the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// What a link does to the datagrams it carries. The default forwards everything at once.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rules {
    /// Drop everything.
    pub cut: bool,
    /// Probability of dropping a datagram.
    pub loss: f64,
    /// Probability of sending a datagram twice.
    pub dup: f64,
    /// Each copy is held for a uniformly random time in this range, in milliseconds.
    pub delay_ms: (u64, u64),
}

/// What a link has done so far.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub delayed: AtomicU64,
}

/// Totals over all links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub forwarded: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub delayed: u64,
}

struct Link {
    addr: SocketAddr,
    rules: Arc<Mutex<Rules>>,
    stats: Arc<LinkStats>,
    thread: Option<JoinHandle<()>>,
}

/// All the link proxies of a cluster.
pub struct Network {
    links: BTreeMap<(NodeId, NodeId), Link>,
    stop: Arc<AtomicBool>,
}

impl Network {
    /// Starts a proxy on a fresh loopback port for every ordered pair of peers; `ports` are the
    /// peers' real ports on 127.0.0.1.
    pub fn start(ports: &BTreeMap<NodeId, u16>, seed: u64) -> Result<Network, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut network = Network {
            links: BTreeMap::new(),
            stop: stop.clone(),
        };
        for (&from, _) in ports.iter() {
            for (&to, &port) in ports.iter() {
                if from == to {
                    continue;
                }
                let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                    .map_err(|e| format!("proxy {from}->{to}: cannot bind: {e}"))?;
                let addr = socket
                    .local_addr()
                    .map_err(|e| format!("proxy {from}->{to}: {e}"))?;
                let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let rules = Arc::new(Mutex::new(Rules::default()));
                let stats = Arc::new(LinkStats::default());
                let rng = Rng::new(seed ^ (from << 32) ^ to.wrapping_mul(0x9E37_79B9));
                let thread = {
                    let (rules, stats, stop) = (rules.clone(), stats.clone(), stop.clone());
                    std::thread::Builder::new()
                        .name(format!("proxy-{from}-{to}"))
                        .spawn(move || forward(socket, target, rules, stats, stop, rng))
                        .map_err(|e| format!("proxy {from}->{to}: cannot start thread: {e}"))?
                };
                network.links.insert(
                    (from, to),
                    Link {
                        addr,
                        rules,
                        stats,
                        thread: Some(thread),
                    },
                );
            }
        }
        Ok(network)
    }

    /// The address peer `from` must use for peer `to`.
    pub fn proxy_addr(&self, from: NodeId, to: NodeId) -> SocketAddr {
        self.links[&(from, to)].addr
    }

    /// Changes the rules of link `from → to`.
    pub fn update(&self, from: NodeId, to: NodeId, change: impl FnOnce(&mut Rules)) {
        if let Some(link) = self.links.get(&(from, to)) {
            change(&mut link.rules.lock().expect("rules lock"));
        }
    }

    /// Changes the rules of every link.
    pub fn update_all(&self, change: impl Fn(&mut Rules)) {
        for link in self.links.values() {
            change(&mut link.rules.lock().expect("rules lock"));
        }
    }

    /// Cuts link `from → to` (one way).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.update(from, to, |r| r.cut = true);
    }

    /// Cuts every link between nodes of different groups, both ways.
    pub fn partition(&self, groups: &[Vec<NodeId>]) {
        let group_of = |n: NodeId| groups.iter().position(|g| g.contains(&n));
        for &(from, to) in self.links.keys() {
            if group_of(from) != group_of(to) {
                self.cut(from, to);
            }
        }
    }

    /// Back to forwarding everything at once on every link.
    pub fn heal(&self) {
        self.update_all(|r| *r = Rules::default());
    }

    /// The cut links, as `from->to`.
    #[cfg(test)]
    pub fn cut_links(&self) -> Vec<(NodeId, NodeId)> {
        self.links
            .iter()
            .filter(|(_, l)| l.rules.lock().expect("rules lock").cut)
            .map(|(&k, _)| k)
            .collect()
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for l in self.links.values() {
            let s = &l.stats;
            t.received += s.received.load(Ordering::Relaxed);
            t.forwarded += s.forwarded.load(Ordering::Relaxed);
            t.dropped += s.dropped.load(Ordering::Relaxed);
            t.duplicated += s.duplicated.load(Ordering::Relaxed);
            t.delayed += s.delayed.load(Ordering::Relaxed);
        }
        t
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for link in self.links.values_mut() {
            if let Some(t) = link.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A held datagram: when it is due, an arrival counter (to keep equal times in order), bytes.
type Held = Reverse<(Instant, u64, Vec<u8>)>;

/// The proxy loop of one link.
fn forward(
    socket: UdpSocket,
    target: SocketAddr,
    rules: Arc<Mutex<Rules>>,
    stats: Arc<LinkStats>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut held: BinaryHeap<Held> = BinaryHeap::new();
    let mut arrivals = 0u64;
    let send = |bytes: &[u8]| {
        // The target may be down (crashed or restarting): that is a lost datagram, as on a
        // real network.
        if socket.send_to(bytes, target).is_ok() {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Reverse((_, _, bytes)) = held.pop().expect("peeked");
            send(&bytes);
        }
        let wait = held
            .peek()
            .map_or(IDLE_WAIT, |Reverse((due, _, _))| {
                due.saturating_duration_since(now)
            })
            .clamp(Duration::from_micros(200), IDLE_WAIT);
        if socket.set_read_timeout(Some(wait)).is_err() {
            std::thread::sleep(wait);
            continue;
        }
        let n = match socket.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => {
                // e.g. a port-unreachable report for an earlier send: not a datagram.
                continue;
            }
        };
        stats.received.fetch_add(1, Ordering::Relaxed);
        let r = *rules.lock().expect("rules lock");
        if r.cut || (r.loss > 0.0 && rng.chance(r.loss)) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let copies = if r.dup > 0.0 && rng.chance(r.dup) {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = r.delay_ms;
            let ms = if hi > lo {
                lo + rng.below(hi - lo + 1)
            } else {
                lo
            };
            if ms == 0 {
                send(&buf[..n]);
            } else {
                stats.delayed.fetch_add(1, Ordering::Relaxed);
                arrivals += 1;
                let due = Instant::now() + Duration::from_millis(ms);
                held.push(Reverse((due, arrivals, buf[..n].to_vec())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> (UdpSocket, u16) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let port = s.local_addr().unwrap().port();
        (s, port)
    }

    fn recv_all(s: &UdpSocket) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    #[test]
    fn links_forward_cut_duplicate_and_delay_one_direction_at_a_time() {
        let (s1, p1) = sink();
        let (s2, p2) = sink();
        let net = Network::start(&BTreeMap::from([(1, p1), (2, p2)]), 1).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"a", net.proxy_addr(1, 2)).unwrap();
        assert_eq!(recv_all(&s2), vec![b"a".to_vec()]);

        net.cut(1, 2);
        sender.send_to(b"b", net.proxy_addr(1, 2)).unwrap();
        sender.send_to(b"c", net.proxy_addr(2, 1)).unwrap();
        assert!(recv_all(&s2).is_empty(), "1->2 is cut");
        assert_eq!(recv_all(&s1), vec![b"c".to_vec()], "2->1 still works");
        assert_eq!(net.cut_links(), vec![(1, 2)]);

        net.heal();
        net.update_all(|r| r.dup = 1.0);
        sender.send_to(b"d", net.proxy_addr(1, 2)).unwrap();
        assert_eq!(recv_all(&s2), vec![b"d".to_vec(), b"d".to_vec()]);

        net.heal();
        net.update(1, 2, |r| r.delay_ms = (100, 100));
        let start = Instant::now();
        sender.send_to(b"e", net.proxy_addr(1, 2)).unwrap();
        assert_eq!(recv_all(&s2), vec![b"e".to_vec()]);
        assert!(start.elapsed() >= Duration::from_millis(100));
        let t = net.totals();
        assert_eq!(
            (t.received, t.dropped, t.duplicated, t.delayed),
            (5, 1, 1, 1)
        );
    }

    #[test]
    fn a_partition_cuts_exactly_the_links_between_groups() {
        let ports = BTreeMap::from([(1, 9), (2, 9), (3, 9)]);
        let net = Network::start(&ports, 1).unwrap();
        net.partition(&[vec![1], vec![2, 3]]);
        assert_eq!(net.cut_links(), vec![(1, 2), (1, 3), (2, 1), (3, 1)]);
    }
}
