//! `client query --from N --limit K` and `client follow` on real processes: a page from the
//! middle of the log, and a follower that prints every entry exactly once, in order, across
//! the leader being killed; it ends with exit 0 on SIGTERM and on a closed stdout.

mod common;

use common::{describe, json_lines, one_at_a_time, tail, wait_with_deadline, Cluster, CLIENT};
use raft::client::{Client, ClientError};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Appends `text`, retrying the same text (so the same request) after a timeout until
/// `within` has passed; panics on a refusal or at the deadline.
fn append(client: &mut Client, text: &str, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        match client.append(text) {
            Ok(a) => return a.index,
            Err(ClientError::Timeout(e)) if Instant::now() < deadline => {
                eprintln!("append {text:?}: {e}; retrying");
            }
            Err(e) => panic!("append {text:?} failed: {e}"),
        }
    }
}

/// A `client` process (`args` name the subcommand, `follow`), killed when dropped; its lines
/// arrive on `lines`.
struct Follower {
    child: Child,
    lines: Receiver<String>,
    stderr: PathBuf,
}

impl Follower {
    fn start(cluster: &Cluster, name: &str, args: &[&str]) -> Follower {
        let stderr = cluster.dir.0.join(format!("{name}.stderr"));
        let mut child = Command::new(CLIENT)
            .arg("-p")
            .arg(&cluster.configs[&1])
            .args(args)
            .current_dir(&cluster.dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CLIENT}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            lines: rx,
            stderr,
        }
    }

    /// The next line, or None once `deadline` has passed or stdout closed.
    fn next_line(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left).ok()
    }

    fn stderr(&self) -> String {
        tail(&self.stderr)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

#[test]
fn query_from_with_a_limit_prints_exactly_that_page() {
    let _serial = one_at_a_time();
    let mut cluster = Cluster::start("query-from", 3);
    cluster.wait_for_leader(Duration::from_secs(10));
    let mut client = cluster.lib_client(Duration::from_secs(5));
    for i in 1..=20 {
        append(&mut client, &format!("entry-{i}"), Duration::from_secs(20));
    }
    let whole = cluster.client(&["query"]);
    assert_eq!(whole.status.code(), Some(0), "{}", describe(&whole));
    let whole = json_lines(&whole.stdout);
    assert!(whole.len() >= 21, "{whole:?}");

    let out = cluster.client(&["query", "--from", "5", "--limit", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let page = json_lines(&out.stdout);
    let indices: Vec<u64> = page.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [5, 6, 7], "{}", describe(&out));
    assert_eq!(page[..], whole[4..7], "the same lines as the whole query");

    // Without a limit: everything from N on.
    let out = cluster.client(&["query", "--from", "18"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        json_lines(&out.stdout)[..],
        whole[17..],
        "{}",
        describe(&out)
    );

    // Past the read index: nothing, and done.
    let out = cluster.client(&["query", "--from", "1000", "--limit", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));

    // Usage errors.
    for args in [
        &["query", "--from", "0"][..],
        &["query", "--from", "x"],
        &["query", "--from", "-3"],
        &["query", "--limit", "0"],
        &["query", "--limit", "many"],
        &["follow", "--from", "0"],
        &["follow", "--from", "one"],
    ] {
        let out = cluster.client(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", describe(&out));
    }

    // follow --timeout-ms: answered reads keep it going, however long nothing new commits;
    // once no peer answers for that long, exit 2.
    let mut idle = Follower::start(
        &cluster,
        "follow-idle",
        &["--timeout-ms", "300", "follow", "--from", "1000"],
    );
    let still = wait_with_deadline(&mut idle.child, Duration::from_millis(1500));
    assert_eq!(
        still,
        None,
        "exited while peers answered: {}",
        idle.stderr()
    );
    cluster.kill_all();
    let status = wait_with_deadline(&mut idle.child, Duration::from_secs(5))
        .expect("follow --timeout-ms 300 still running 5 s after the cluster died");
    assert_eq!(status.code(), Some(2), "{}", idle.stderr());
    assert!(idle.next_line(Instant::now()).is_none(), "printed nothing");
}

#[test]
fn follow_prints_every_entry_once_in_order_across_a_leader_kill() {
    let _serial = one_at_a_time();
    let mut cluster = Cluster::start("follow", 3);
    cluster.wait_for_leader(Duration::from_secs(10));
    let mut client = cluster.lib_client(Duration::from_secs(5));
    let mut sent: Vec<String> = Vec::new();
    for i in 1..=20 {
        sent.push(format!("before-{i}"));
        append(&mut client, &sent[sent.len() - 1], Duration::from_secs(20));
    }

    let follower = Follower::start(&cluster, "follow", &["follow", "--from", "1"]);
    let mut records: Vec<Value> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    // Reads lines until every text in `want` has been printed, or fails at the deadline.
    let mut read_until = |want: &[String], within: Duration, what: &str| {
        let deadline = Instant::now() + within;
        while !want.iter().all(|t| seen.contains(t)) {
            let Some(line) = follower.next_line(deadline) else {
                panic!(
                    "{what}: within {within:?}, follow printed {} lines, missing {:?}; its stderr:\n{}",
                    records.len(),
                    want.iter().filter(|t| !seen.contains(*t)).collect::<Vec<_>>(),
                    follower.stderr()
                );
            };
            let record: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
            let index = record["index"].as_u64().expect("index");
            assert_eq!(
                index,
                records.len() as u64 + 1,
                "indices run 1, 2, 3, … once each; line {line}"
            );
            if let Some(data) = record["data"].as_str() {
                assert!(seen.insert(data.to_string()), "{data:?} printed twice");
            } else {
                assert!(record["kind"].is_string(), "no data and no kind: {line}");
            }
            records.push(record);
        }
    };
    read_until(&sent, Duration::from_secs(20), "the first 20 entries");

    for i in 1..=30 {
        sent.push(format!("during-{i}"));
        append(&mut client, &sent[sent.len() - 1], Duration::from_secs(20));
    }
    let (leader, term) = cluster.wait_for_leader(Duration::from_secs(10));
    cluster.kill_peer(leader);
    for i in 1..=10 {
        sent.push(format!("after-kill-{i}"));
        append(&mut client, &sent[sent.len() - 1], Duration::from_secs(20));
    }
    assert_eq!(sent.len(), 60);
    read_until(
        &sent,
        Duration::from_secs(30),
        &format!("all 60 entries (leader {leader} of term {term} killed)"),
    );
    assert!(
        records.iter().any(|r| r["term"].as_u64() > Some(term)),
        "entries of a later leader's term were printed"
    );

    // SIGTERM ends it quietly with exit 0.
    let mut follower = follower;
    terminate(follower.child.id());
    let status = wait_with_deadline(&mut follower.child, Duration::from_secs(5))
        .expect("follow did not exit within 5 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", follower.stderr());
    assert!(
        !follower.stderr().contains("panicked"),
        "{}",
        follower.stderr()
    );

    // A closed stdout ends it with exit 0 without a panic, even with nothing more to print:
    // it follows from the last entry, and nothing is appended after the reader goes.
    let last = append(&mut client, "before-close", Duration::from_secs(20));
    let stderr = cluster.dir.0.join("follow-closed.stderr");
    let mut child = Command::new(CLIENT)
        .arg("-p")
        .arg(&cluster.configs[&1])
        .args(["follow", "--from", &last.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        // The reader goes back with the line, so that dropping it closes the pipe.
        let _ = tx.send((read.map(|_| line), stdout));
    });
    let first = rx.recv_timeout(Duration::from_secs(10));
    let Ok((Ok(line), stdout)) = first else {
        let _ = child.kill();
        panic!(
            "follow --from {last} printed no line; stderr:\n{}",
            tail(&stderr)
        );
    };
    assert!(line.starts_with(&format!("{{\"index\":{last},")), "{line}");
    drop(stdout);
    let status = wait_with_deadline(&mut child, Duration::from_secs(10));
    let _ = child.kill();
    let status = status.expect("follow did not exit within 10 s of its stdout closing");
    assert_eq!(status.code(), Some(0), "{}", tail(&stderr));
    assert!(!tail(&stderr).contains("panicked"), "{}", tail(&stderr));
}
