//! The HTTP endpoint of `metrics_addr` on live peers: abuse cannot crash, block or slow a peer
//! (a huge `Content-Length`, hundreds of stalled connections, a request that never ends), a
//! scrape still answers within a second, SIGTERM still ends the peer within a second; every
//! `raft_datagrams_dropped_total{reason}` series is there from the start; and `/healthz` and
//! `/readyz` through the loss of a leader (and a majority) and back.

mod common;

use common::{wait_with_deadline, Cluster, TempDir};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Gives every config a `metrics_addr` on a free port; returns them by node ID.
fn with_metrics(configs: &BTreeMap<u64, std::path::PathBuf>) -> BTreeMap<u64, SocketAddr> {
    let mut addrs = BTreeMap::new();
    for (&id, path) in configs {
        let addr = common::free_tcp_addr();
        set_metrics_addr(path, addr);
        addrs.insert(id, addr);
    }
    addrs
}

fn set_metrics_addr(path: &Path, addr: SocketAddr) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["metrics_addr"] = addr.to_string().into();
    common::write_json(path, &json);
}

/// `GET path`: the status code and body, or why there was none within 2 s.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((code, body.to_string()))
}

fn cluster_with_metrics(name: &str, n: usize) -> (Cluster, BTreeMap<u64, SocketAddr>) {
    let dir = TempDir::new(name);
    let configs = common::write_configs(&dir.0, n);
    let addrs = with_metrics(&configs);
    (Cluster::start_in(dir, configs), addrs)
}

#[test]
fn the_metrics_endpoint_cannot_be_used_against_the_peer() {
    let _one = common::one_at_a_time();
    let (mut cluster, addrs) = cluster_with_metrics("http-abuse", 1);
    let addr = addrs[&1];
    cluster.wait_for_one_leader(Duration::from_secs(10));
    let (code, body) = get(addr, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    for reason in [
        "oversized",
        "malformed",
        "unknown_sender",
        "wrong_recipient",
        "reply",
        "client_queue_full",
        "peer_queue_full",
        "auth",
        "replay",
        "stale",
        "wrong_cluster",
    ] {
        let line = format!("raft_datagrams_dropped_total{{reason=\"{reason}\"}} 0");
        assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
    }

    // tiny_http 0.12 allocated this much to discard the body, and aborted.
    for request in [
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\nabc",
        "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\nabc",
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
    // 200 connections that send a header line and stall.
    let stalled: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    // A request that never ends: header lines as long as the server takes them.
    let stop = Arc::new(AtomicBool::new(false));
    let endless = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(b"X-More: yes\r\n").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    for _ in 0..5 {
        let started = Instant::now();
        let (code, body) = get(addr, "/metrics").expect("a scrape under abuse");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("raft_term"), "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a scrape took {:?} under abuse",
            started.elapsed()
        );
    }
    // The peer still serves clients.
    cluster.client_ok(&["append", "still here"]);
    cluster.check_alive();

    // SIGTERM ends the peer within a second, stalled connections and all.
    let mut child = cluster.peers.remove(&1).unwrap();
    let more: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = wait_with_deadline(&mut child, Duration::from_secs(1));
    let took = started.elapsed();
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    stop.store(true, Ordering::Relaxed);
    endless.join().unwrap();
    drop((stalled, more));
    let exited = exited.unwrap_or_else(|| {
        panic!(
            "the peer still ran 1 s after SIGTERM; its log ends:\n{}",
            common::tail(&cluster.log_path(1))
        )
    });
    assert!(exited.success(), "exited with {exited} after {took:?}");
}

type Answer = Result<(u16, String), String>;

fn code(addr: SocketAddr, path: &str) -> Result<u16, String> {
    get(addr, path).map(|(code, _)| code)
}

#[test]
fn probes_follow_the_loss_of_a_leader_and_its_return() {
    let _one = common::one_at_a_time();
    let (mut cluster, addrs) = cluster_with_metrics("probes", 3);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));
    cluster.client_ok(&["append", "before"]);
    let all_ready = |cluster: &Cluster| {
        common::poll_until(Duration::from_secs(10), "every peer ready", || {
            let answers: Vec<(u64, Answer)> = addrs
                .iter()
                .filter(|(id, _)| cluster.peers.contains_key(id))
                .map(|(&id, &a)| (id, get(a, "/readyz")))
                .collect();
            if answers
                .iter()
                .all(|(_, a)| matches!(a, Ok((200, body)) if body.starts_with("ready")))
            {
                Ok(())
            } else {
                Err(format!("{answers:?}"))
            }
        })
    };
    all_ready(&cluster);
    for &a in addrs.values() {
        assert_eq!(code(a, "/healthz"), Ok(200));
    }

    // The leader and one follower go: the survivor has no leader to hear from.
    let survivor = (1..=3).find(|&id| id != leader).unwrap();
    let other = (1..=3).find(|&id| id != leader && id != survivor).unwrap();
    cluster.kill_peer(leader);
    cluster.kill_peer(other);
    let lost = Instant::now();
    let reason = common::poll_until(
        Duration::from_secs(2),
        "/readyz 503 on the survivor",
        || match get(addrs[&survivor], "/readyz") {
            Ok((503, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(lost.elapsed() < Duration::from_secs(2));
    assert_eq!(reason.lines().count(), 1, "{reason:?}");
    assert!(
        reason.contains("leader") || reason.contains("no leader"),
        "{reason}"
    );
    // It stays unready without a majority, and alive all along.
    common::holds_for(
        Duration::from_millis(500),
        "the survivor unready and alive",
        || match (
            code(addrs[&survivor], "/readyz"),
            code(addrs[&survivor], "/healthz"),
        ) {
            (Ok(503), Ok(200)) => Ok(()),
            other => Err(format!("/readyz, /healthz: {other:?}")),
        },
    );

    // And back.
    cluster.start_peer(leader);
    cluster.start_peer(other);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    all_ready(&cluster);
    assert_eq!(code(addrs[&survivor], "/healthz"), Ok(200));
}
