//! Authenticated datagrams on real peer processes (issue 12): the forged-AppendEntries attack
//! has no effect, forged and replayed client requests and replies are ignored, a peer with the
//! wrong key cannot join, a client with the wrong key hears nothing and says why, a rolling key
//! rotation under a stream of appends loses nothing, bad secret files stop a peer at start-up,
//! and a million random, mutated and validly-MACed junk datagrams neither crash a peer nor stop
//! the cluster committing.

mod common;

use common::*;
use raft::auth::{self, ClientAuth, Header, Keys, Kind, Secret};
use raft::client::{Client, ClientError, PeerStatus};
use raft::config::PeerConfig;
use raft::raft::rng::Rng;
use raft::raft::{
    Body, ClientOp, ClientReply, ClientRequest, ClientResult, Datagram, Entry, LogRecord, Message,
    NodeId, Payload, Role, Term,
};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A cluster of `n` peers; each peer reads its own key file (so a test can rotate them one at a
/// time), all holding `secret`. With `secret` None, no peer has a secret_file.
fn start(name: &str, n: usize, secret: Option<&Secret>) -> Cluster {
    let dir = TempDir::new(name);
    let ports = free_ports(n);
    let mut configs = BTreeMap::new();
    for id in 1..=n as u64 {
        let mut config = config_json(&dir.0, &ports, id);
        if let Some(secret) = secret {
            let key_file = key_file(&dir.0, id);
            secret.write(&key_file).unwrap();
            config["secret_file"] = key_file.to_str().unwrap().into();
        }
        let path = dir.0.join(format!("peer{id}.json"));
        write_json(&path, &config);
        configs.insert(id, path);
    }
    let mut cluster = Cluster {
        peers: BTreeMap::new(),
        configs,
        dir,
        acked: Default::default(),
    };
    for id in 1..=n as u64 {
        cluster.start_peer(id);
    }
    cluster
}

fn key_file(dir: &Path, id: NodeId) -> PathBuf {
    dir.join(format!("peer{id}.key"))
}

fn config(cluster: &Cluster, id: NodeId) -> PeerConfig {
    PeerConfig::load(&cluster.configs[&id]).unwrap()
}

/// A client of every peer with the keys of peer `id`'s secret file (as it is now).
fn client_as(cluster: &Cluster, id: NodeId, timeout: Duration) -> Client {
    Client::from_config(&config(cluster, id), timeout).unwrap()
}

/// A client with the given keys (None: unauthenticated) of the given peers.
fn client_with(
    cluster: &Cluster,
    peers: &[NodeId],
    keys: Option<Arc<Keys>>,
    timeout: Duration,
) -> Client {
    let all = config(cluster, 1).addresses().unwrap();
    let peers = peers.iter().map(|id| (*id, all[id])).collect();
    Client::with_keys(peers, timeout, keys).unwrap()
}

fn keys_of(secret: &Secret) -> Arc<Keys> {
    Arc::new(Keys::new(secret, raft::config::DEFAULT_CLUSTER).unwrap())
}

/// Polls status until exactly one peer leads and every peer answers; returns the leader.
fn wait_for_leader(cluster: &mut Cluster, client: &mut Client, within: Duration) -> (NodeId, Term) {
    poll_until(within, "no single leader", || {
        cluster.check_alive();
        let status = client.status();
        match leaders_of(&status)[..] {
            [one] if status.iter().all(|s| s.answered) => Ok(one),
            _ => Err(format!("{status:#?}")),
        }
    })
}

fn info(status: &[PeerStatus], id: NodeId) -> &raft::raft::StatusInfo {
    status
        .iter()
        .find(|s| s.id == id)
        .and_then(|s| s.info.as_ref())
        .unwrap_or_else(|| panic!("peer {id} did not answer: {status:#?}"))
}

/// Waits until every peer has the same last and commit index; returns the status.
fn wait_until_converged(cluster: &mut Cluster, client: &mut Client) -> Vec<PeerStatus> {
    poll_until(Duration::from_secs(10), "peers did not converge", || {
        cluster.check_alive();
        let status = client.status();
        let infos: Vec<_> = status.iter().filter_map(|s| s.info.as_ref()).collect();
        let last = infos.first().map_or(0, |i| i.last_index);
        if infos.len() == status.len()
            && infos
                .iter()
                .all(|i| i.last_index == last && i.commit_index == last)
        {
            Ok(status)
        } else {
            Err(format!("{status:#?}"))
        }
    })
}

/// The AppendEntries the attacker sent to `follower`: from the leader in its term, one
/// entry `FORGED` after the leader's last entry, and `leader_commit` one past the leader's.
/// The cluster ID on the wire: in every plain datagram, so any watcher knows it.
fn cluster_id(cluster: &Cluster) -> u64 {
    raft::cluster::ClusterFile::load(&config(cluster, 1).data_dir)
        .unwrap()
        .expect("peer 1's cluster file")
        .id
}

fn forged_append_entries(
    cluster: u64,
    leader: NodeId,
    follower: NodeId,
    term: Term,
    last: &LogRecord,
) -> Vec<u8> {
    Datagram::Peer(Message {
        cluster,
        from: leader,
        to: follower,
        term,
        body: Body::AppendEntries {
            prev_log_index: last.index,
            prev_log_term: last.term,
            entries: vec![Entry {
                index: last.index + 1,
                term,
                payload: Payload::Data {
                    client: 0xF0F0_F0F0,
                    seq: 1,
                    data: "FORGED".into(),
                },
            }],
            leader_commit: last.index + 1,
            read_seq: 0,
        },
        reply_at: None,
    })
    .encode()
    .unwrap()
}

/// Appends a few entries, and returns (leader, term, the last committed record).
fn settle_with_appends(cluster: &mut Cluster, client: &mut Client) -> (NodeId, Term, LogRecord) {
    let (leader, term) = wait_for_leader(cluster, client, Duration::from_secs(10));
    for i in 0..3 {
        client.append(&format!("genuine-{i}")).unwrap();
    }
    wait_until_converged(cluster, client);
    let log = client.query().unwrap();
    (leader, term, log.last().unwrap().clone())
}

// Raft assumes honest peers (§5): a follower believes any AppendEntries from the leader of its
// term. Without authentication one datagram makes followers commit an entry no client wrote.
// This control shows the attack below is real, so that its failing there is the MAC's doing.
#[test]
fn without_a_secret_a_forged_append_entries_is_committed_by_followers() {
    let _serial = one_at_a_time();
    let mut cluster = start("auth-control", 3, None);
    let mut client = client_with(&cluster, &[1, 2, 3], None, Duration::from_secs(5));
    let (leader, term, last) = settle_with_appends(&mut cluster, &mut client);
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addresses = config(&cluster, 1).addresses().unwrap();
    let followers: Vec<NodeId> = (1..=3).filter(|&id| id != leader).collect();
    for &f in &followers {
        let bytes = forged_append_entries(cluster_id(&cluster), leader, f, term, &last);
        attacker.send_to(&bytes, addresses[&f]).unwrap();
    }
    let status = poll_until(Duration::from_secs(5), "the forgery took", || {
        let status = client.status();
        let taken = followers
            .iter()
            .all(|&f| info(&status, f).commit_index == last.index + 1);
        if taken {
            Ok(status)
        } else {
            Err(format!("{status:#?}"))
        }
    });
    assert!(info(&status, leader).commit_index <= last.index);
}

// The attack: against a running three-peer cluster, one UDP datagram to each follower,
// an AppendEntries claiming to come from the leader in the current term, carrying one entry
// `FORGED` and `leader_commit` one past the leader's. With a secret, nothing happens: no entry
// appears, and no commit index moves past the leader's. Sent as the original attacker sent it
// (plain JSON), sealed with a wrong key, and sealed with a wrong key under the cluster's real
// key id and every header field right (as an attacker who watched the traffic could).
#[test]
fn a_forged_append_entries_has_no_effect() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let mut cluster = start("auth-forged-ae", 3, Some(&secret));
    let mut client = client_as(&cluster, 1, Duration::from_secs(5));
    let (leader, term, last) = settle_with_appends(&mut cluster, &mut client);
    let addresses = config(&cluster, 1).addresses().unwrap();
    let followers: Vec<NodeId> = (1..=3).filter(|&id| id != leader).collect();
    let before = client.status();

    // What an attacker can see on the wire: the real key id, the peers' epochs. A session of
    // our own (with the real key) learns the epochs the way any client does.
    let real = keys_of(&secret);
    let mut spy = ClientAuth::new(Arc::clone(&real), 1..=3).unwrap();
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    learn_epochs(&mut spy, &probe, &addresses);
    let wrong = Keys::random(raft::config::DEFAULT_CLUSTER).unwrap();

    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for &f in &followers {
        let json = forged_append_entries(cluster_id(&cluster), leader, f, term, &last);
        let header = Header {
            kind: Kind::Peer,
            key_id: 0,
            sender: leader,
            sender_epoch: auth::fresh_epoch(),
            recipient: f,
            recipient_epoch: spy.peer_epoch(f),
            counter: 1_000_000,
            sent: auth::now_micros(),
        };
        let mut sealed_wrong = auth::with_room(&json);
        auth::seal(&wrong, 0, &header, &mut sealed_wrong);
        let mut real_id = sealed_wrong.clone();
        real_id[4..8].copy_from_slice(&real.ids()[0].to_le_bytes());
        for bytes in [json.clone(), sealed_wrong, real_id] {
            attacker.send_to(&bytes, addresses[&f]).unwrap();
        }
    }
    // Nothing answers the attacker, and nothing moves.
    let mut buf = [0u8; 65_536];
    assert!(
        attacker.recv_from(&mut buf).is_err(),
        "a peer answered a forged datagram"
    );
    // Every forged datagram has been dropped (counted) before we look for effects.
    let after = poll_until(Duration::from_secs(5), "the forgeries counted", || {
        let status = client.status();
        let counted = followers.iter().all(|&f| {
            status
                .iter()
                .any(|s| s.id == f && s.info.as_ref().is_some_and(|i| i.auth_failures >= 3))
        });
        if counted {
            Ok(status)
        } else {
            Err(format!("{status:#?}"))
        }
    });
    for &f in &followers {
        let (b, a) = (info(&before, f), info(&after, f));
        assert_eq!(
            (a.last_index, a.commit_index),
            (b.last_index, b.commit_index),
            "follower {f} moved"
        );
        assert!(a.commit_index <= info(&after, leader).commit_index);
        assert!(
            a.auth_failures >= 3,
            "follower {f} counted {} auth failures",
            a.auth_failures
        );
    }
    let log = client.query().unwrap();
    assert!(
        log.iter().all(|r| r.data.as_deref() != Some("FORGED")),
        "{log:?}"
    );
    assert_eq!(log.len() as u64, last.index);
    // And the cluster still works.
    let a = client.append("after the attack").unwrap();
    assert_eq!(a.index, last.index + 1);
    assert!(
        cluster
            .log_text(followers[0])
            .contains("failed authentication")
            || cluster.log_text(followers[0]).contains("unauthenticated")
    );
}

/// Asks every peer for its status through `spy` until it knows every peer's epoch.
fn learn_epochs(
    spy: &mut ClientAuth,
    socket: &UdpSocket,
    addresses: &BTreeMap<NodeId, SocketAddr>,
) {
    let mut buf = vec![0u8; 65_536];
    poll_until(Duration::from_secs(5), "epochs not learned", || {
        for (&id, &addr) in addresses {
            let json = Datagram::Request(ClientRequest {
                id: 1,
                op: ClientOp::Status,
            })
            .encode()
            .unwrap();
            let mut out = auth::with_room(&json);
            spy.seal_request::<std::io::Error>(id, &mut out, |b| {
                socket.send_to(b, addr).map(|_| ())
            })
            .unwrap();
        }
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            let _ = spy.open(&buf[..n]);
        }
        if addresses.keys().all(|&id| spy.peer_epoch(id) != 0) {
            Ok(())
        } else {
            Err("some peers' epochs unknown".to_string())
        }
    });
}

/// A UDP relay between one client and one peer that records what passes and can drop the
/// peer's replies or answer the client with forgeries instead: a man in the middle.
struct Tap {
    addr: SocketAddr,
    /// Datagrams from the client, as sent.
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Datagrams from the peer, as sent.
    replies: Arc<Mutex<Vec<Vec<u8>>>>,
    /// 0 relay replies; 1 drop them; 2 drop them and send the client forged replies.
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    fn start(upstream: SocketAddr, forge: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static) -> Tap {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let replies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let mode = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, replies, mode, stop) = (
                requests.clone(),
                replies.clone(),
                mode.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut client: Option<SocketAddr> = None;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let bytes = buf[..n].to_vec();
                    if from == upstream {
                        replies.lock().unwrap().push(bytes.clone());
                        if let (0, Some(c)) = (mode.load(Ordering::Relaxed), client) {
                            let _ = socket.send_to(&bytes, c);
                        }
                    } else {
                        client = Some(from);
                        requests.lock().unwrap().push(bytes.clone());
                        let _ = socket.send_to(&bytes, upstream);
                        if mode.load(Ordering::Relaxed) == 2 {
                            for forged in forge(&bytes) {
                                let _ = socket.send_to(&forged, from);
                            }
                        }
                    }
                }
            })
        };
        Tap {
            addr,
            requests,
            replies,
            mode,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The JSON body of a sealed datagram, unverified (what an eavesdropper reads).
fn body_of(sealed: &[u8]) -> &[u8] {
    &sealed[auth::HEADER_LEN..sealed.len() - auth::MAC_LEN]
}

fn header_of(sealed: &[u8]) -> (u64, u64, u64) {
    let u = |at: usize| u64::from_le_bytes(sealed[at..at + 8].try_into().unwrap());
    (u(8), u(16), u(40)) // sender, sender epoch, counter
}

// Client requests: forged ones (no MAC, a wrong MAC) are dropped unanswered, and genuine ones
// captured on the wire and sent again, to the same peer or another, have no effect. Replies:
// a forged reply (no MAC, a wrong key) or a captured genuine one cannot make a client report
// success; it times out instead, the outcome unknown, and then succeeds once replies flow.
#[test]
fn forged_and_replayed_client_requests_and_replies_are_ignored() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let mut cluster = start("auth-client-forgery", 3, Some(&secret));
    let keys = keys_of(&secret);
    let mut watcher = client_as(&cluster, 1, Duration::from_secs(5));
    let (leader, term) = wait_for_leader(&mut cluster, &mut watcher, Duration::from_secs(10));
    let addresses = config(&cluster, 1).addresses().unwrap();

    // The forgeries a man in the middle makes for each request it sees: a plain JSON
    // `Appended` with the request's ID, the same sealed with a wrong key, and every genuine
    // reply captured so far.
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let wrong = Keys::random(raft::config::DEFAULT_CLUSTER).unwrap();
    let forge = {
        let captured = captured.clone();
        let wrong = wrong.clone();
        move |request: &[u8]| {
            // The body is encrypted: the request's ID cannot be read, so guess the first few.
            let ids: Vec<u64> = match Datagram::decode(body_of(request)) {
                Ok(Datagram::Request(req)) => vec![req.id],
                _ => (0..8).collect(),
            };
            let (session, epoch, _) = header_of(request);
            let mut out = Vec::new();
            for id in ids {
                let reply = Datagram::Reply(ClientReply {
                    id,
                    from: leader,
                    result: ClientResult::Appended { index: 999, term },
                })
                .encode()
                .unwrap();
                let mut sealed = auth::with_room(&reply);
                let header = Header {
                    kind: Kind::Reply,
                    key_id: 0,
                    sender: leader,
                    sender_epoch: 1,
                    recipient: session,
                    recipient_epoch: epoch,
                    counter: 1,
                    sent: auth::now_micros(),
                };
                auth::seal(&wrong, 0, &header, &mut sealed);
                out.extend([reply, sealed]);
            }
            out.extend(captured.lock().unwrap().iter().cloned());
            out
        }
    };
    let tap = Tap::start(addresses[&leader], forge);
    let mut client = Client::with_keys(
        BTreeMap::from([(leader, tap.addr)]),
        Duration::from_millis(1500),
        Some(Arc::clone(&keys)),
    )
    .unwrap();
    let first = client.append("genuine").unwrap();
    let log_len = |w: &mut Client| w.query().unwrap().len();
    let len = log_len(&mut watcher);
    assert_eq!(len as u64, first.index);

    // Replay every request the tap saw, to the leader and to the other peers, from a socket
    // of our own (whose address a peer would answer, were it fooled) and from the tap's.
    let replayer = UdpSocket::bind("127.0.0.1:0").unwrap();
    replayer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let requests = tap.requests.lock().unwrap().clone();
    assert!(!requests.is_empty());
    for bytes in &requests {
        for addr in addresses.values() {
            replayer.send_to(bytes, addr).unwrap();
        }
    }
    // Forged requests: an append in plain JSON, and one sealed with a wrong key.
    let forged = Datagram::Request(ClientRequest {
        id: 7,
        op: ClientOp::Append {
            client: 42,
            seq: 1,
            data: "FORGED".into(),
        },
    })
    .encode()
    .unwrap();
    let mut forged_sealed = auth::with_room(&forged);
    let header = Header {
        kind: Kind::Request,
        key_id: 0,
        sender: 42,
        sender_epoch: auth::fresh_epoch(),
        recipient: leader,
        recipient_epoch: 0,
        counter: 1,
        sent: auth::now_micros(),
    };
    auth::seal(&wrong, 0, &header, &mut forged_sealed);
    for bytes in [&forged, &forged_sealed] {
        replayer.send_to(bytes, addresses[&leader]).unwrap();
    }
    // Nothing but a notice ("stale: here is my epoch", which a replayed request whose
    // recipient epoch was not yet the peer's may draw, no bigger than the request) comes back.
    let mut buf = [0u8; 65_536];
    while let Ok((n, from)) = replayer.recv_from(&mut buf) {
        if n == auth::OVERHEAD + 8 && buf[2] == Kind::NoticeToClient as u8 {
            continue;
        }
        panic!(
            "{from} answered a replayed or forged request with {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    assert_eq!(
        log_len(&mut watcher),
        len,
        "a replayed or forged request wrote"
    );

    // Forged and replayed replies: the genuine ones are withheld, and the client must not
    // report success on the strength of the forgeries.
    captured
        .lock()
        .unwrap()
        .extend(tap.replies.lock().unwrap().iter().cloned());
    tap.mode.store(2, Ordering::Relaxed);
    match client.append("second") {
        Err(ClientError::Timeout(what)) => assert!(what.contains("outcome unknown"), "{what}"),
        other => panic!("a forged or replayed reply was believed: {other:?}"),
    }
    // Replies flow again: the retry (same client, same seq) is answered with the real index.
    tap.mode.store(0, Ordering::Relaxed);
    let second = client.append("second").unwrap();
    assert!(
        second.index > first.index && second.index < 999,
        "{second:?}"
    );
    let log = watcher.query().unwrap();
    let seconds = log
        .iter()
        .filter(|r| r.data.as_deref() == Some("second"))
        .count();
    assert_eq!(seconds, 1, "{log:?}");
    assert!(log.iter().all(|r| r.data.as_deref() != Some("FORGED")));
}

// A peer whose secret file holds another key cannot join: the others drop everything it sends
// (counting it) and it drops everything they send. The other two elect a leader among
// themselves and commit; it never receives an entry, and its elections do not disturb them.
#[test]
fn a_peer_with_the_wrong_key_cannot_join() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let dir = TempDir::new("auth-wrong-key-peer");
    let mut cluster = {
        // Start with peer 3 stopped, give it another key, then start it.
        let mut c = start_without_peer(dir, &secret, 3);
        Secret::generate()
            .unwrap()
            .write(&key_file(&c.dir.0, 3))
            .unwrap();
        c.start_peer(3);
        c
    };
    let keys = keys_of(&secret);
    let mut good = client_with(
        &cluster,
        &[1, 2],
        Some(Arc::clone(&keys)),
        Duration::from_secs(5),
    );
    let (leader, term) = wait_for_leader(&mut cluster, &mut good, Duration::from_secs(10));
    for i in 0..20 {
        good.append(&format!("entry-{i}")).unwrap();
    }
    // Peer 3 tries to be elected, again and again: wait until peers 1 and 2 have each dropped
    // several of its datagrams (it campaigns every 150-300 ms).
    let status = poll_until(Duration::from_secs(10), "peer 3 campaigned", || {
        let status = good.status();
        let dropped = [1, 2].iter().all(|&id| {
            status
                .iter()
                .any(|s| s.id == id && s.info.as_ref().is_some_and(|i| i.auth_failures >= 6))
        });
        if dropped {
            Ok(status)
        } else {
            Err(format!("{status:#?}"))
        }
    });
    cluster.check_alive();
    assert_eq!(
        leaders_of(&status),
        vec![(leader, term)],
        "leadership was disturbed"
    );
    for id in [1, 2] {
        assert!(
            info(&status, id).auth_failures > 0,
            "peer {id} counted no auth failures: {status:#?}"
        );
    }
    // Peer 3, asked with its own key, has nothing.
    let mut own = client_as(&cluster, 3, Duration::from_secs(2));
    let mine = own.status();
    let three = mine.iter().find(|s| s.id == 3).unwrap();
    let three = three.info.as_ref().expect("peer 3 answers its own key");
    assert_eq!((three.last_index, three.commit_index), (0, 0), "{three:?}");
    assert_ne!(three.role, Role::Leader);
    assert!(three.auth_failures > 0);
    let text = cluster.log_text(3);
    assert!(
        text.contains("does not hold"),
        "peer 3's log does not say why"
    );
}

/// Like [`start`] with a secret, but leaves peer `stopped` not started.
fn start_without_peer(dir: TempDir, secret: &Secret, stopped: NodeId) -> Cluster {
    let ports = free_ports(3);
    let mut configs = BTreeMap::new();
    for id in 1..=3u64 {
        let mut config = config_json(&dir.0, &ports, id);
        let key = key_file(&dir.0, id);
        secret.write(&key).unwrap();
        config["secret_file"] = key.to_str().unwrap().into();
        let path = dir.0.join(format!("peer{id}.json"));
        write_json(&path, &config);
        configs.insert(id, path);
    }
    let mut cluster = Cluster {
        peers: BTreeMap::new(),
        configs,
        dir,
        acked: Default::default(),
    };
    for id in (1..=3).filter(|&id| id != stopped) {
        cluster.start_peer(id);
    }
    cluster
}

// A client whose key the peers do not hold gets no answer (a peer never answers a datagram
// whose MAC fails) and says that a key mismatch is the likely cause.
#[test]
fn a_client_with_the_wrong_key_gets_no_answer_and_is_told_why() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let mut cluster = start("auth-wrong-key-client", 3, Some(&secret));
    let mut good = client_as(&cluster, 1, Duration::from_secs(5));
    wait_for_leader(&mut cluster, &mut good, Duration::from_secs(10));
    let wrong = Arc::new(Keys::random(raft::config::DEFAULT_CLUSTER).unwrap());
    let mut client = client_with(
        &cluster,
        &[1, 2, 3],
        Some(wrong),
        Duration::from_millis(500),
    );
    match client.append("x") {
        Err(ClientError::Timeout(what)) => assert!(what.contains("key mismatch"), "{what}"),
        other => panic!("{other:?}"),
    }
    assert!(client.status().iter().all(|s| !s.answered));
    // A client without any key is not answered either.
    let mut plain = client_with(&cluster, &[1, 2, 3], None, Duration::from_millis(500));
    match plain.append("x") {
        Err(ClientError::Timeout(what)) => assert!(what.contains("secret_file"), "{what}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        good.query()
            .unwrap()
            .iter()
            .filter(|r| r.data.is_some())
            .count(),
        0
    );
}

// The client binary reads the secret from the same config, and with the wrong key exits 2
// naming a key mismatch as the likely cause.
#[test]
fn the_client_binary_uses_the_secret_and_names_a_key_mismatch() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let mut cluster = start("auth-client-binary", 3, Some(&secret));
    let mut good = client_as(&cluster, 1, Duration::from_secs(5));
    wait_for_leader(&mut cluster, &mut good, Duration::from_secs(10));
    let out = cluster.client(&["append", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // Peer 1's key file now holds another key (the peers keep the one they started with).
    Secret::generate()
        .unwrap()
        .write(&key_file(&cluster.dir.0, 1))
        .unwrap();
    let out = cluster.client(&["--timeout-ms", "500", "append", "hello"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("key mismatch"), "{stderr}");
}

// A secret file that is missing, readable by others, too short or not hex stops the peer at
// start-up with a line naming the file; a peer without a secret_file warns that it is open.
#[test]
fn bad_secret_files_stop_the_peer_at_start_up() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("auth-bad-secret");
    let ports = free_ports(3);
    let key = dir.0.join("cluster.key");
    let mut config = config_json(&dir.0, &ports, 1);
    config["secret_file"] = key.to_str().unwrap().into();
    let path = dir.0.join("peer1.json");
    write_json(&path, &config);
    let check = |what: &str, want: &[&str]| {
        let (code, text) = run_peer_expecting_exit(&dir.0, &path, Duration::from_secs(10));
        assert_eq!(code, Some(1), "{what}: {text}");
        for w in want {
            assert!(text.contains(w), "{what}: wanted {w:?} in {text}");
        }
    };
    check("missing", &["cluster.key", "does not exist"]);
    Secret::generate().unwrap().write(&key).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        check("readable by others", &["cluster.key", "0644", "chmod 600"]);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(&key, "0123456789abcdef\n").unwrap();
    check("too short", &["cluster.key", "too short"]);
    std::fs::write(&key, "zz".repeat(32)).unwrap();
    check("not hex", &["cluster.key", "hex"]);
    #[cfg(unix)]
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        Secret::generate().unwrap().write(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o000)).unwrap();
        check("unreadable", &["cluster.key", "permission denied"]);
    }

    // Without a secret_file: it runs, and says once that anyone can write to its log.
    let mut open = start("auth-no-secret", 3, None);
    let mut client = client_with(&open, &[1, 2, 3], None, Duration::from_secs(5));
    wait_for_leader(&mut open, &mut client, Duration::from_secs(10));
    let text = open.log_text(1);
    assert_eq!(text.matches("NOT authenticated").count(), 1, "{text}");
    assert!(text.contains("anyone who can reach"), "{text}");
}

#[cfg(unix)]
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Restarts peer `id` (SIGTERM, then start) and waits until it has caught up with the leader's
/// commit index as it was before the restart.
fn restart_and_catch_up(cluster: &mut Cluster, watcher: &mut Client, id: NodeId) {
    let status = watcher.status();
    let commit = status
        .iter()
        .filter_map(|s| s.info.as_ref())
        .map(|i| i.commit_index)
        .max()
        .unwrap_or(0);
    cluster.stop_peer(id);
    cluster.start_peer(id);
    poll_until(
        Duration::from_secs(10),
        "the restarted peer caught up",
        || {
            cluster.check_alive();
            let status = watcher.status();
            let leaders = leaders_of(&status);
            match status
                .iter()
                .find(|s| s.id == id)
                .and_then(|s| s.info.as_ref())
            {
                Some(i) if i.commit_index >= commit && leaders.len() == 1 => Ok(()),
                _ => Err(format!("{status:#?}")),
            }
        },
    );
}

// Key rotation without downtime, as the README describes it: write "new key, old key" to every
// peer's secret file and restart the peers one at a time; then write "new key" alone and
// restart them one at a time again. Appends stream throughout, from a client with the old key
// (until the second round, which retires that key) and one with the new file; every
// acknowledged append is in the final log once, none is lost, and none fails.
#[test]
fn a_rolling_key_rotation_under_a_stream_of_appends_loses_nothing() {
    let _serial = one_at_a_time();
    let old = Secret::generate().unwrap();
    let mut cluster = start("auth-rotation", 3, Some(&old));
    let new_key = Secret::generate().unwrap().keys()[0];
    let rotating = Secret::new(vec![new_key, old.keys()[0]]).unwrap();
    let rotated = Secret::new(vec![new_key]).unwrap();
    let mut watcher = client_with(
        &cluster,
        &[1, 2, 3],
        Some(keys_of(&rotating)),
        Duration::from_millis(500),
    );
    wait_for_leader(&mut cluster, &mut watcher, Duration::from_secs(10));

    let acked = Arc::clone(&cluster.acked);
    let spawn = |name: &str, keys: Arc<Keys>, stop: &Arc<AtomicBool>| {
        let client = client_with(&cluster, &[1, 2, 3], Some(keys), Duration::from_secs(3));
        let (stop, acked, prefix) = (Arc::clone(stop), Arc::clone(&acked), name.to_string());
        std::thread::spawn(move || append_worker(client, &prefix, 5, usize::MAX, &stop, &acked))
    };
    let stop_old = Arc::new(AtomicBool::new(false));
    let stop_new = Arc::new(AtomicBool::new(false));
    let old_writer = spawn("old", keys_of(&old), &stop_old);
    let new_writer = spawn("new", keys_of(&rotating), &stop_new);
    cluster.wait_for_acks(0, 20, Duration::from_secs(10));

    // Round 1: every peer gets the new key, and keeps accepting the old one.
    for id in 1..=3 {
        rotating.write(&key_file(&cluster.dir.0, id)).unwrap();
        restart_and_catch_up(&mut cluster, &mut watcher, id);
        let since = cluster.acked.load(Ordering::Relaxed);
        cluster.wait_for_acks(since, 20, Duration::from_secs(10));
    }
    // The old key's last client stops; round 2 retires the old key.
    stop_old.store(true, Ordering::Relaxed);
    let mut appends = old_writer.join().unwrap();
    for id in 1..=3 {
        rotated.write(&key_file(&cluster.dir.0, id)).unwrap();
        restart_and_catch_up(&mut cluster, &mut watcher, id);
        let since = cluster.acked.load(Ordering::Relaxed);
        cluster.wait_for_acks(since, 20, Duration::from_secs(10));
    }
    stop_new.store(true, Ordering::Relaxed);
    appends.merge(new_writer.join().unwrap());

    // The old key opens nothing now.
    let mut stale = client_with(
        &cluster,
        &[1, 2, 3],
        Some(keys_of(&old)),
        Duration::from_millis(500),
    );
    assert!(matches!(
        stale.append("with the old key"),
        Err(ClientError::Timeout(_))
    ));
    let mut reader = client_with(
        &cluster,
        &[1, 2, 3],
        Some(keys_of(&rotated)),
        Duration::from_secs(5),
    );
    let log = reader.query().unwrap();
    check_log(&log, &appends);
    assert!(
        appends.unknown.is_empty(),
        "appends whose outcome stayed unknown: {:?}",
        appends.unknown
    );
    eprintln!(
        "rotation: {} appends acknowledged, {} timeouts retried, log of {} entries",
        appends.acked.len(),
        appends.timeouts,
        log.len()
    );
    assert!(appends.acked.len() >= 100, "{}", appends.acked.len());
}

/// The datagram kinds the fuzzer sends, for the summary.
#[derive(Default, Debug)]
struct FuzzCounts {
    random: u64,
    mutated_sealed: u64,
    plain_json: u64,
    maced_garbage: u64,
}

// A million random and mutated datagrams at all peers, a third of them sealed with the
// cluster's real (test) key around garbage: no peer panics or stops, and the cluster keeps
// committing, during the flood and after it.
#[test]
fn a_million_junk_datagrams_neither_crash_a_peer_nor_stop_the_cluster() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let mut cluster = start("auth-fuzz", 3, Some(&secret));
    let keys = keys_of(&secret);
    let mut watcher = client_as(&cluster, 1, Duration::from_secs(5));
    wait_for_leader(&mut cluster, &mut watcher, Duration::from_secs(10));
    let addresses = config(&cluster, 1).addresses().unwrap();
    let total: u64 = std::env::var("AUTH_FUZZ_DATAGRAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = client_as(&cluster, 1, Duration::from_secs(3));
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&cluster.acked));
        std::thread::spawn(move || append_worker(client, "w", 10, usize::MAX, &stop, &acked))
    };
    cluster.wait_for_acks(0, 10, Duration::from_secs(10));

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut spy = ClientAuth::new(Arc::clone(&keys), 1..=3).unwrap();
    learn_epochs(&mut spy, &socket, &addresses);
    socket.set_nonblocking(true).unwrap();
    let mut rng = Rng::new(auth::fresh_epoch());
    let mut counts = FuzzCounts::default();
    let templates: Vec<Vec<u8>> = junk_json();
    let started = Instant::now();
    let acked_before = cluster.acked.load(Ordering::Relaxed);
    let ids: Vec<NodeId> = addresses.keys().copied().collect();
    let mut drain = vec![0u8; 65_536];
    // ~100,000 datagrams a second: as fast as the peers can look at them, not so fast that
    // the kernel drops most before they are read.
    let per_ms = 100;
    let mut sent = 0u64;
    while sent < total {
        let tick = Instant::now();
        for _ in 0..per_ms {
            let to = ids[rng.below(ids.len() as u64) as usize];
            let bytes = fuzz_datagram(&mut rng, &keys, &spy, to, &templates, &mut counts);
            let _ = socket.send_to(&bytes, addresses[&to]);
            sent += 1;
        }
        // Answers to the validly sealed status requests among the junk: read and dropped.
        while socket.recv_from(&mut drain).is_ok() {}
        let left = Duration::from_millis(1).saturating_sub(tick.elapsed());
        std::thread::sleep(left);
        if sent.is_multiple_of(100_000) {
            cluster.check_alive();
        }
    }
    let flood = started.elapsed();
    let acked_during = cluster.acked.load(Ordering::Relaxed) - acked_before;
    cluster.check_alive();
    // After the flood: more appends go through.
    let since = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(since, 50, Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let mut appends = writer.join().unwrap();
    // The one well-formed append among the junk, sealed with the real key, is a key holder's
    // legitimate request: it may be in the log (once).
    appends.sent.insert(FUZZ_APPEND.to_string());
    cluster.check_alive();
    let status = watcher.status();
    let log = watcher.query().unwrap();
    check_log(&log, &appends);
    let failures: u64 = status
        .iter()
        .filter_map(|s| s.info.as_ref())
        .map(|i| i.auth_failures)
        .sum();
    eprintln!(
        "fuzz: {sent} datagrams in {:.1} s ({counts:?}); {acked_during} appends acknowledged during the flood; peers counted {failures} auth failures",
        flood.as_secs_f64()
    );
    assert!(acked_during > 0, "nothing committed during the flood");
    assert!(failures > 0);
}

/// The data of the one valid append among the fuzzer's JSON.
const FUZZ_APPEND: &str = "fuzz \u{fffd}";

/// JSON shapes a peer must survive: truncated, wrong types, huge numbers, other variants.
fn junk_json() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = vec![
        b"{}".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"{\"Peer\":{}}".to_vec(),
        b"{\"Peer\":{\"from\":2,\"to\":1,\"term\":18446744073709551615,\"body\":\"TimeoutNow\"}}".to_vec(),
        b"{\"Request\":{\"id\":1,\"op\":{\"Append\":{\"client\":-1,\"seq\":1,\"data\":1}}}}".to_vec(),
        b"{\"Request\":{\"id\":1,\"op\":{\"Query\":{\"start\":18446744073709551615,\"read_index\":null}}}}".to_vec(),
        b"{\"Reply\":{\"id\":1,\"from\":1,\"result\":{\"NotLeader\":{\"leader\":null}}}}".to_vec(),
        Datagram::Request(ClientRequest {
            id: 1,
            op: ClientOp::Append {
                client: 1,
                seq: 1,
                data: FUZZ_APPEND.into(),
            },
        })
        .encode()
        .unwrap(),
        vec![b'['; 10_000],
    ];
    let status = Datagram::Request(ClientRequest {
        id: 5,
        op: ClientOp::Status,
    })
    .encode()
    .unwrap();
    let cuts: Vec<Vec<u8>> = (1..status.len()).map(|n| status[..n].to_vec()).collect();
    out.extend(cuts);
    out.push(status);
    out
}

/// One junk datagram for peer `to`.
fn fuzz_datagram(
    rng: &mut Rng,
    keys: &Keys,
    spy: &ClientAuth,
    to: NodeId,
    templates: &[Vec<u8>],
    counts: &mut FuzzCounts,
) -> Vec<u8> {
    let pick = |rng: &mut Rng| templates[rng.below(templates.len() as u64) as usize].clone();
    let header = |rng: &mut Rng| {
        let kinds = [
            Kind::Peer,
            Kind::Request,
            Kind::Reply,
            Kind::NoticeToPeer,
            Kind::NoticeToClient,
        ];
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        Header {
            kind,
            key_id: 0,
            // Mostly client sessions; sometimes a peer's ID or an unknown node.
            sender: match rng.below(10) {
                0 => 1 + rng.below(3),
                1 => 99,
                _ => rng.next_u64(),
            },
            // For a real peer's ID, an epoch older than any (an insider impersonating a peer
            // in its current epoch is out of scope: the key is the cluster's).
            sender_epoch: match kind {
                Kind::Request => auth::fresh_epoch(),
                _ => 1 + rng.below(1000),
            },
            recipient: if rng.below(20) == 0 {
                rng.next_u64()
            } else {
                to
            },
            recipient_epoch: if rng.below(20) == 0 {
                rng.next_u64()
            } else {
                spy.peer_epoch(to)
            },
            counter: 1 + rng.below(1 << 20),
            sent: auth::now_micros(),
        }
    };
    match rng.below(10) {
        // Random bytes, sometimes with our magic byte first.
        0..=2 => {
            counts.random += 1;
            let len = rng.below(1500) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if !b.is_empty() && rng.below(2) == 0 {
                b[0] = auth::MAGIC;
            }
            b
        }
        // A validly sealed datagram, then damaged: flipped, cut or extended.
        3 | 4 => {
            counts.mutated_sealed += 1;
            let mut b = auth::with_room(&pick(rng));
            auth::seal(keys, 0, &header(rng), &mut b);
            match rng.below(3) {
                0 => {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] ^= 1 << rng.below(8);
                }
                1 => b.truncate(rng.below(b.len() as u64) as usize),
                _ => b.extend((0..1 + rng.below(40)).map(|_| rng.next_u64() as u8)),
            }
            b
        }
        // Unauthenticated JSON, as the original sends it.
        5 | 6 => {
            counts.plain_json += 1;
            pick(rng)
        }
        // Garbage, sealed with the real key: verifies, then must be refused or survive decoding.
        _ => {
            counts.maced_garbage += 1;
            let body = if rng.below(3) == 0 {
                (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect()
            } else {
                pick(rng)
            };
            let mut b = auth::with_room(&body);
            auth::seal(keys, 0, &header(rng), &mut b);
            b
        }
    }
}
