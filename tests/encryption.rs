//! Encrypted datagrams on real peer processes (issue 23): a capture of every UDP datagram on the
//! loopback interface to or from a secured cluster, while a client appends text and reads it
//! back, holds neither that text nor any of the protocol's JSON.

mod common;

use common::*;
use raft::auth::{Secret, MAGIC};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Records the UDP payloads to or from `ports` seen on the loopback interface, through a raw
/// packet socket (root only), until `stop`.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// None if a raw socket cannot be opened (not root).
    fn start(ports: BTreeSet<u16>) -> Option<Capture> {
        // SAFETY: plain socket calls on a descriptor this function owns; the address passed to
        // bind is a fully initialized sockaddr_ll of the size given.
        let fd = unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            if fd < 0 {
                return None;
            }
            let lo = libc::if_nametoindex(c"lo".as_ptr());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = lo as i32;
            let bound = libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            let timed = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            if lo == 0 || bound != 0 || timed != 0 {
                libc::close(fd);
                return None;
            }
            fd
        };
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut frame = vec![0u8; 70_000];
            while !halt.load(Ordering::Relaxed) {
                // SAFETY: `frame` is a live buffer of the length given.
                let n = unsafe {
                    libc::recv(fd, frame.as_mut_ptr() as *mut libc::c_void, frame.len(), 0)
                };
                if n <= 0 {
                    continue;
                }
                if let Some(payload) = udp_payload(&frame[..n as usize], &ports) {
                    seen.push(payload.to_vec());
                }
            }
            // SAFETY: closing the descriptor opened above, once.
            unsafe { libc::close(fd) };
            seen
        });
        Some(Capture {
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The UDP payload of an Ethernet frame carrying IPv4 to or from one of `ports`.
fn udp_payload<'a>(frame: &'a [u8], ports: &BTreeSet<u16>) -> Option<&'a [u8]> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 17 {
        return None;
    }
    let udp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
    let port = |at: usize| Some(u16::from_be_bytes([*udp.get(at)?, *udp.get(at + 1)?]));
    let (from, to) = (port(0)?, port(2)?);
    let len = usize::from(port(4)?);
    if !ports.contains(&from) && !ports.contains(&to) {
        return None;
    }
    udp.get(8..len.max(8))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_capture_of_a_secured_cluster_shows_no_appended_text_and_no_json() {
    let _serial = one_at_a_time();
    let secret = Secret::generate().unwrap();
    let mut cluster = Cluster::start_configured("encryption-capture", 3, |path| {
        let key = path.with_extension("key");
        secret.write(&key).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        config["secret_file"] = key.to_str().unwrap().into();
        write_json(path, &config);
    });
    let ports: BTreeSet<u16> = cluster.ports().values().copied().collect();
    let Some(capture) = Capture::start(ports) else {
        missing_tool(
            "root",
            "capturing loopback traffic needs a raw packet socket (root)",
        );
        return;
    };
    let config = raft::config::PeerConfig::load(&cluster.configs[&1]).unwrap();
    let mut client =
        raft::client::Client::from_config(&config, Duration::from_millis(300)).unwrap();
    poll_until(Duration::from_secs(10), "no single leader", || {
        cluster.check_alive();
        let status = client.status();
        match leaders_of(&status)[..] {
            [_] => Ok(()),
            _ => Err(format!("{status:#?}")),
        }
    });
    let text = format!("CAPTURED-TEXT-{}", std::process::id());
    for i in 0..5 {
        cluster.client_ok(&["append", &format!("{text}-{i}")]);
    }
    let log = cluster.client_ok(&["query"]);
    assert!(log.iter().any(|e| e.to_string().contains(&text)), "{log:?}");
    let seen = capture.finish();
    cluster.kill_all();

    // An activity floor: requests, replies and the peers' own traffic all went by.
    assert!(seen.len() >= 30, "only {} datagrams captured", seen.len());
    // Marks of five bytes or more: shorter ones turn up in ciphertext by chance.
    let json_marks: [&[u8]; 10] = [
        b"{\"Request",
        b"{\"Reply",
        b"{\"Peer",
        b"\"term\"",
        b"Append",
        b"Request",
        b"Reply",
        b"entries",
        b"leader",
        b"CAPTURED",
    ];
    for d in &seen {
        assert_eq!(d.first(), Some(&MAGIC), "an unsealed datagram: {d:?}");
        for mark in json_marks {
            assert!(
                !contains(d, mark),
                "{:?} is readable in a captured datagram",
                String::from_utf8_lossy(mark)
            );
        }
    }
}

#[test]
fn a_peer_off_loopback_refuses_to_start_without_a_secret_unless_insecure() {
    let dir = TempDir::new("encryption-open-door");
    let ports = free_ports(3);
    let mut config = config_json(&dir.0, &ports, 1);
    // The wildcard address: reachable from every interface, not a loopback address.
    config["host"] = "0.0.0.0".into();
    let path = dir.0.join("peer1.json");
    write_json(&path, &config);
    let (code, text) = run_peer_expecting_exit(&dir.0, &path, Duration::from_secs(10));
    assert_eq!(code, Some(1), "{text}");
    for want in [
        "`secret_file`",
        "not a loopback address",
        "\"insecure\": true",
    ] {
        assert!(text.contains(want), "wanted {want:?} in {text}");
    }

    // With "insecure": true it starts, and warns.
    config["insecure"] = true.into();
    write_json(&path, &config);
    let log = dir.0.join("insecure.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_peer"))
        .arg("-p")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let warned = poll_until(Duration::from_secs(10), "no warning", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the insecure peer exited with {status}: {text}");
        }
        if text.contains("NOT authenticated") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned.contains("\"insecure\": true"), "{warned}");
}
