//! End to end on real processes: three `peer` processes on loopback, driven by the `client`
//! binary exactly as a user would, through its JSON output and exit codes.
//!
//! On failure the temp dir (configs, data, each peer's stderr) is kept and its path printed.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PEER: &str = env!("CARGO_BIN_EXE_peer");
const CLIENT: &str = env!("CARGO_BIN_EXE_client");

/// A fresh directory, removed when the test passes and kept (and printed) when it fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!("raft-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Ports that were free a moment ago: bound together, so distinct, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect()
}

/// Writes one config per peer (IDs 1..=n) into `dir`; returns their paths by ID.
fn write_configs(dir: &Path, n: usize) -> BTreeMap<u64, PathBuf> {
    let ports = free_ports(n);
    let mut configs = BTreeMap::new();
    for (i, &port) in ports.iter().enumerate() {
        let id = i as u64 + 1;
        let others: Vec<Value> = ports
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(j, &p)| serde_json::json!({"node_ID": j + 1, "host": "127.0.0.1", "port": p}))
            .collect();
        let config = serde_json::json!({
            "name": format!("peer{id}"),
            "node_ID": id,
            "host": "127.0.0.1",
            "port": port,
            "other_peers": others,
            "data_dir": dir.join(format!("data-peer{id}")),
            "election_timeout_ms": [150, 300],
            "heartbeat_ms": 50,
        });
        let path = dir.join(format!("peer{id}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        configs.insert(id, path);
    }
    configs
}

/// A running cluster; dropping it kills every peer process it started.
struct Cluster {
    peers: BTreeMap<u64, Child>,
    configs: BTreeMap<u64, PathBuf>,
    dir: TempDir,
}

impl Cluster {
    fn start(name: &str, n: usize) -> Cluster {
        let dir = TempDir::new(name);
        let configs = write_configs(&dir.0, n);
        let mut cluster = Cluster {
            peers: BTreeMap::new(),
            configs,
            dir,
        };
        for id in 1..=n as u64 {
            cluster.start_peer(id);
        }
        cluster
    }

    fn start_peer(&mut self, id: u64) {
        let log = File::create(self.log_path(id)).unwrap();
        let child = Command::new(PEER)
            .arg("-p")
            .arg(&self.configs[&id])
            .current_dir(&self.dir.0)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PEER}: {e}"));
        self.peers.insert(id, child);
    }

    fn kill_peer(&mut self, id: u64) {
        let mut child = self.peers.remove(&id).expect("peer is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.0.join(format!("peer{id}.stderr"))
    }

    /// Panics if a peer we did not kill has exited.
    fn check_alive(&mut self) {
        for (id, child) in &mut self.peers {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "peer {id} exited with {status}; its stderr ends:\n{}",
                    tail(&self.dir.0.join(format!("peer{id}.stderr")))
                );
            }
        }
    }

    /// Runs the client binary with the first config.
    fn client(&self, args: &[&str]) -> Output {
        Command::new(CLIENT)
            .arg("-p")
            .arg(&self.configs[&1])
            .args(args)
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The peers that say they are leader, as (id, term), from one `client status`.
    fn leaders(&self) -> (Vec<(u64, u64)>, String) {
        let out = self.client(&["--timeout-ms", "500", "status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let leaders = json_lines(&out.stdout)
            .iter()
            .filter(|l| l["answered"] == true && l["role"] == "leader")
            .map(|l| (l["id"].as_u64().unwrap(), l["term"].as_u64().unwrap()))
            .collect();
        (leaders, text)
    }

    /// Polls `client status` until exactly one peer says it is leader.
    fn wait_for_one_leader(&mut self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive();
            let (leaders, text) = self.leaders();
            if let [(id, _)] = leaders[..] {
                return id;
            }
            if Instant::now() >= deadline {
                panic!("no single leader within {within:?}; last status:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.peers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last lines of a file, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What `client append` told us: acknowledged at an index, or outcome unknown (exit 2).
enum Outcome {
    Acked(u64),
    Unknown,
}

fn append(cluster: &Cluster, text: &str) -> Outcome {
    let out = cluster.client(&["--timeout-ms", "5000", "append", text]);
    match out.status.code() {
        Some(0) => {
            let lines = json_lines(&out.stdout);
            assert_eq!(lines.len(), 1, "{}", describe(&out));
            let line = &lines[0];
            assert_eq!(line["data"], text, "{}", describe(&out));
            assert!(line["term"].as_u64().unwrap() >= 1, "{}", describe(&out));
            let index = line["index"].as_u64().expect("index");
            assert!(index >= 1, "{}", describe(&out));
            Outcome::Acked(index)
        }
        Some(2) => Outcome::Unknown,
        _ => panic!("append {text:?} failed: {}", describe(&out)),
    }
}

#[test]
fn appends_survive_the_leader_being_killed() {
    let mut cluster = Cluster::start("e2e-failover", 3);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));

    // Acknowledged (index, text), and texts whose outcome is unknown.
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    for i in 0..5 {
        let text = format!("before-{i}");
        match append(&cluster, &text) {
            Outcome::Acked(index) => acked.push((index, text)),
            Outcome::Unknown => panic!("append {text:?} got no answer with a stable leader"),
        }
    }
    let indices: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert!(
        indices.windows(2).all(|w| w[0] < w[1]),
        "sequential appends land in order: {indices:?}"
    );

    cluster.kill_peer(leader);

    // Keep appending; each must be acknowledged within a few seconds of trying. A timed-out
    // attempt may or may not have landed, so the retry carries a new text.
    for i in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut attempt = 0;
        loop {
            let text = format!("after-{i}-{attempt}");
            match append(&cluster, &text) {
                Outcome::Acked(index) => {
                    acked.push((index, text));
                    break;
                }
                Outcome::Unknown => unknown.push(text),
            }
            cluster.check_alive();
            assert!(
                Instant::now() < deadline,
                "no append acknowledged within 10 s of the leader (peer {leader}) being killed"
            );
            attempt += 1;
        }
    }

    let out = cluster.client(&["--timeout-ms", "5000", "query"]);
    assert_eq!(out.status.code(), Some(0), "query: {}", describe(&out));
    let records = json_lines(&out.stdout);
    let indices: Vec<u64> = records
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=records.len() as u64).collect();
    assert_eq!(indices, expected, "indices run 1, 2, 3... without gaps");
    for r in &records {
        assert!(
            r["data"].is_string() || r["kind"].is_string(),
            "an entry has data or a kind: {r}"
        );
    }
    let data: Vec<&str> = records.iter().filter_map(|r| r["data"].as_str()).collect();
    for (index, text) in &acked {
        let at = &records[*index as usize - 1];
        assert_eq!(at["data"], text.as_str(), "entry {index} holds {text:?}");
        let copies = data.iter().filter(|d| *d == text).count();
        assert_eq!(copies, 1, "{text:?} is in the log exactly once");
    }
    for text in &unknown {
        let copies = data.iter().filter(|d| *d == text).count();
        assert!(copies <= 1, "{text:?} is in the log at most once");
    }
    let acked_indices: BTreeSet<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(
        acked_indices.len(),
        acked.len(),
        "no two appends share an index"
    );
}

#[test]
fn client_exit_codes_with_the_cluster_down() {
    let dir = TempDir::new("e2e-down");
    let configs = write_configs(&dir.0, 3);
    let client = |args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(CLIENT)
            .arg("-p")
            .arg(&configs[&1])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out, started.elapsed())
    };

    let (out, elapsed) = client(&["--timeout-ms", "300", "append", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(elapsed < Duration::from_millis(1000), "took {elapsed:?}");
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no answer within 300 ms"), "{stderr}");

    let (out, _) = client(&["--timeout-ms", "300", "query"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    let (out, elapsed) = client(&["--timeout-ms", "300", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(elapsed < Duration::from_millis(1000), "took {elapsed:?}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["answered"] == false && l.get("role").is_none()));

    // Refused before anything is sent: definite, so exit 1, and fast.
    let big = "a".repeat(20_000);
    let (out, elapsed) = client(&["--timeout-ms", "300", "append", &big]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(elapsed < Duration::from_millis(300), "took {elapsed:?}");

    // Usage and config errors exit 1; --help exits 0.
    let (out, _) = client(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let (out, _) = client(&["append"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let (out, _) = client(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let missing = dir.0.join("missing.json");
    let out = Command::new(CLIENT)
        .arg("-p")
        .arg(&missing)
        .arg("query")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}
