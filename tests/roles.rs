//! Users and roles on real peer processes (issue 23): the role matrix (every subcommand by
//! every role: exit codes and messages, checked by the peer however the client presents
//! itself), bad credential files refused with errors naming the file or the user, a removed
//! user's appends refused within 2 s under a stream of appends without restarting anything,
//! users kept across a restart and carried by a snapshot install, and no key in logs, the
//! WAL, snapshots or `query`.

mod common;

use common::*;
use raft::auth::{Credential, Secret};
use raft::client::Client;
use raft::config::PeerConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_bench");
/// As tests/snapshot_e2e.rs asks for snapshots.
const SNAPSHOT_ENTRIES: u64 = 2_000;
const SNAPSHOT_TRAILING: u64 = 200;

/// A secured cluster of three (one secret file each, all holding the same key) that takes
/// snapshots as the other end-to-end tests do; peer 1 also serves metrics.
fn start(name: &str) -> (Cluster, SocketAddr) {
    let dir = TempDir::new(name);
    let ports = free_ports(3);
    let secret = Secret::generate().unwrap();
    let metrics = common::free_tcp_addr();
    let mut configs = BTreeMap::new();
    for id in 1..=3u64 {
        let mut config = config_json(&dir.0, &ports, id);
        let key = dir.0.join(format!("peer{id}.key"));
        secret.write(&key).unwrap();
        config["secret_file"] = key.to_str().unwrap().into();
        config["snapshot_entries"] = SNAPSHOT_ENTRIES.into();
        config["snapshot_trailing"] = SNAPSHOT_TRAILING.into();
        if id == 1 {
            config["metrics_addr"] = metrics.to_string().into();
        }
        let path = dir.0.join(format!("peer{id}.json"));
        write_json(&path, &config);
        configs.insert(id, path);
    }
    let mut cluster = Cluster::start_in(dir, configs);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    (cluster, metrics)
}

/// Runs the client with peer 1's config, as the user of credential `cred` (or the
/// operator), with a short time limit.
fn client_as(cluster: &Cluster, cred: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(CLIENT);
    cmd.arg("-p").arg(&cluster.configs[&1]);
    if let Some(cred) = cred {
        cmd.arg("--cred").arg(cred);
    }
    cmd.args(args)
        .current_dir(&cluster.dir.0)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Adds a user as the operator; returns its credential's JSON line and the file it was
/// saved to (mode 0600).
fn add_user(cluster: &Cluster, name: &str, role: &str) -> (Value, PathBuf) {
    let out = client_as(cluster, None, &["user", "add", name, "--role", role]);
    assert_eq!(out.status.code(), Some(0), "user add: {}", describe(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    let fields: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, ["key", "role", "user"], "{line}");
    assert_eq!(
        (line["user"].as_str(), line["role"].as_str()),
        (Some(name), Some(role))
    );
    assert_eq!(line["key"].as_str().unwrap().len(), 64);
    let file = cluster.dir.0.join(format!("{name}.cred"));
    write_private(&file, stdout.as_bytes());
    (line, file)
}

fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `GET /metrics` on peer 1.
fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn dropped(body: &str, reason: &str) -> Option<u64> {
    let prefix = format!("raft_datagrams_dropped_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// Every subcommand (as arguments) with the least role it needs and what a refusal says
/// that role cannot do; run in this order by each role.
fn matrix(cluster: &Cluster, learner_port: u16) -> Vec<(Vec<String>, usize, &'static str)> {
    let backup = cluster.dir.0.join("backup.bin");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let learner = format!("127.0.0.1:{learner_port}");
    vec![
        (s(&["query"]), 0, ""),
        (s(&["status"]), 0, ""),
        (s(&["members"]), 0, ""),
        (s(&["watch", "--once"]), 0, ""),
        (s(&["append", "hello"]), 1, "append"),
        (s(&["add-learner", "9", &learner]), 2, "change membership"),
        (
            s(&["promote", "9", "--timeout-ms", "300"]),
            2,
            "change membership",
        ),
        (s(&["remove", "9"]), 2, "change membership"),
        (s(&["transfer-leader"]), 2, "transfer leadership"),
        (
            s(&["snapshot", "save", backup.to_str().unwrap()]),
            2,
            "take backups",
        ),
        (s(&["user", "list"]), 2, "manage users"),
        (
            s(&["user", "add", "temp", "--role", "read"]),
            2,
            "manage users",
        ),
        (s(&["user", "remove", "temp"]), 2, "manage users"),
    ]
}

#[test]
fn roles_allow_what_they_say_and_the_peer_decides() {
    let _one = one_at_a_time();
    let (cluster, metrics_addr) = start("roles-matrix");
    let roles = ["read", "write", "admin"];
    let mut creds = BTreeMap::new();
    let mut keys = Vec::new();
    for role in roles {
        let (line, file) = add_user(&cluster, &format!("u-{role}"), role);
        keys.push(line["key"].as_str().unwrap().to_string());
        creds.insert(role, file);
    }
    let listed = client_as(&cluster, None, &["user", "list"]);
    assert_eq!(listed.status.code(), Some(0), "{}", describe(&listed));
    let lines = json_lines(&listed.stdout);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l.get("key").is_none() && l["user"].is_string()));

    let learner_port = free_ports(1)[0];
    for (level, role) in roles.iter().enumerate() {
        for (args, least, what) in matrix(&cluster, learner_port) {
            let mut argv: Vec<&str> = vec!["--timeout-ms", "3000"];
            argv.extend(args.iter().map(String::as_str));
            let out = client_as(&cluster, Some(&creds[role]), &argv);
            let err = stderr(&out);
            if level >= least {
                // Allowed: done, or refused for another reason (promoting a learner that
                // never runs), never for the role.
                assert!(
                    !err.contains("permission denied"),
                    "{role} {args:?}: {}",
                    describe(&out)
                );
                let expected = if args[0] == "promote" { 1 } else { 0 };
                assert_eq!(
                    out.status.code(),
                    Some(expected),
                    "{role} {args:?}: {}",
                    describe(&out)
                );
            } else {
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{role} {args:?}: {}",
                    describe(&out)
                );
                let said = format!("error: permission denied: role {role} cannot {what}");
                assert!(
                    err.contains(&said),
                    "{role} {args:?}: want {said:?}, got {}",
                    describe(&out)
                );
            }
        }
        // `follow` is a read: every role gets the log.
        let mut follow = Command::new(CLIENT)
            .arg("-p")
            .arg(&cluster.configs[&1])
            .arg("--cred")
            .arg(&creds[role])
            .arg("follow")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(follow.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        follow.kill().unwrap();
        follow.wait().unwrap();
        assert!(
            first.starts_with("{\"index\":1"),
            "{role} follow: {first:?}"
        );
    }

    // The peer checks the role, not the client: a credential file that claims admin for a
    // read user's key is refused as what it is.
    let reader: Value =
        serde_json::from_str(&std::fs::read_to_string(&creds["read"]).unwrap()).unwrap();
    let liar = cluster.dir.0.join("liar.cred");
    let mut claimed = reader.clone();
    claimed["role"] = "admin".into();
    write_private(&liar, claimed.to_string().as_bytes());
    let out = client_as(&cluster, Some(&liar), &["transfer-leader"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("permission denied: role read cannot transfer leadership"),
        "{}",
        describe(&out)
    );
    // And the menu honours the role before it sends anything.
    let mut menu = Command::new(CLIENT)
        .arg("-p")
        .arg(&cluster.configs[&1])
        .arg("--cred")
        .arg(&creds["read"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    menu.stdin
        .take()
        .unwrap()
        .write_all(b"2\n5\n1\n3\n")
        .unwrap();
    let out = menu.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(
        err.contains("permission denied: role read cannot append"),
        "{err}"
    );
    assert!(
        err.contains("permission denied: role read cannot transfer leadership"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("committed entries"));

    // Refusals are counted; the new drop reasons are exported from the start.
    let body = metrics(metrics_addr);
    for reason in ["ahead", "expired", "wrong_side", "denied", "auth", "replay"] {
        assert!(
            dropped(&body, reason).is_some(),
            "no {reason} series in\n{body}"
        );
    }

    // No key anywhere: not in query, logs or any file of the data dirs.
    let query = client_as(&cluster, None, &["query"]);
    let text = String::from_utf8_lossy(&query.stdout).into_owned();
    assert!(text.contains("\"kind\":\"user\""), "{text}");
    no_key_anywhere(&cluster, &keys, &[text]);
}

/// None of `keys` (hex, as credentials hold them), nor their bytes, is in `texts`, a peer's
/// log or any file under a data dir (WAL, store, snapshots).
fn no_key_anywhere(cluster: &Cluster, keys: &[String], texts: &[String]) {
    let mut files = Vec::new();
    for id in 1..=3 {
        files.push(cluster.log_path(id));
        let mut dirs = vec![cluster.data_dir(id)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    files.push(p);
                }
            }
        }
    }
    for key in keys {
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        for t in texts {
            assert!(!t.contains(key.as_str()), "a key in output");
        }
        for f in &files {
            let bytes = std::fs::read(f).unwrap_or_default();
            let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            assert!(
                !has(key.as_bytes()) && !has(&raw),
                "a user's key in {}",
                f.display()
            );
        }
    }
}

#[test]
fn bad_credentials_are_refused_naming_the_file_or_the_user() {
    let _one = one_at_a_time();
    let (cluster, metrics_addr) = start("roles-bad-creds");
    let (good, good_file) = add_user(&cluster, "ann", "write");
    let dir = &cluster.dir.0;

    let open = dir.join("open.cred");
    std::fs::write(&open, good.to_string()).unwrap();
    let malformed = dir.join("malformed.cred");
    write_private(&malformed, b"{\"user\":\"ann\",\"role\":\"write\"}");
    let missing = dir.join("missing.cred");
    for (file, says) in [
        (&open, "is accessible by others (mode 0644)"),
        (&malformed, "not a credential"),
        (&missing, "does not exist"),
    ] {
        let out = client_as(&cluster, Some(file), &["status"]);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let want = format!("credential file {}: ", file.display());
        let err = stderr(&out);
        assert!(
            err.contains(&want) && err.contains(says),
            "{}",
            describe(&out)
        );
    }

    // Unknown user, wrong key: well-formed, but no peer opens them; they hear nothing and
    // say whom the peers do not accept.
    let mut ghost = good.clone();
    ghost["user"] = "ghost".into();
    let random = Secret::generate().unwrap().keys()[0];
    ghost["key"] = random
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into();
    let ghost_file = dir.join("ghost.cred");
    write_private(&ghost_file, ghost.to_string().as_bytes());
    let mut wrong = good.clone();
    let k = wrong["key"].as_str().unwrap().to_string();
    wrong["key"] = format!("{}{}", if &k[..1] == "0" { "1" } else { "0" }, &k[1..]).into();
    let wrong_file = dir.join("wrong.cred");
    write_private(&wrong_file, wrong.to_string().as_bytes());
    let before = dropped(&metrics(metrics_addr), "auth").unwrap();
    for (file, user) in [(&ghost_file, "ghost"), (&wrong_file, "ann")] {
        let out = client_as(
            &cluster,
            Some(file),
            &["--timeout-ms", "500", "append", "x"],
        );
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        let want = format!("user {user} (credential file {})", file.display());
        assert!(stderr(&out).contains(&want), "{}", describe(&out));
    }
    let after = dropped(&metrics(metrics_addr), "auth").unwrap();
    assert!(after > before, "auth drops {before} -> {after}");
    // The genuine one still works.
    let out = client_as(&cluster, Some(&good_file), &["append", "fine"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_removed_user_is_refused_within_two_seconds_under_appends() {
    let _one = one_at_a_time();
    let (cluster, _) = start("roles-revoke");
    let (_, file) = add_user(&cluster, "streamer", "write");
    let config = PeerConfig::load(&cluster.configs[&1]).unwrap();
    let credential = Credential::load(&file).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let writer = {
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
        let mut client =
            Client::from_credential(&config, Duration::from_millis(300), &credential, &file)
                .unwrap();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if client.append(&format!("s{n}")).is_ok() {
                    acked.lock().unwrap().push(Instant::now());
                }
            }
        })
    };
    // An activity floor before the removal.
    poll_until(
        Duration::from_secs(10),
        "20 appends before the removal",
        || match acked.lock().unwrap().len() {
            n if n >= 20 => Ok(()),
            n => Err(format!("{n} acknowledged")),
        },
    );
    let out = client_as(&cluster, None, &["user", "remove", "streamer"]);
    let removed = Instant::now();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // Watched until well past the 2 s: nothing acknowledged later than that.
    holds_for(
        Duration::from_secs(3),
        "no append acknowledged more than 2 s after the removal",
        || {
            let late: Vec<_> = acked
                .lock()
                .unwrap()
                .iter()
                .filter(|&&t| t > removed + Duration::from_secs(2))
                .map(|t| t.duration_since(removed))
                .collect();
            match late.is_empty() {
                true => Ok(()),
                false => Err(format!("acknowledged after the removal: {late:?}")),
            }
        },
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let last = acked.lock().unwrap().last().copied();
    assert!(
        last.is_none_or(|t| t <= removed + Duration::from_secs(2)),
        "an append acknowledged {:?} after the removal",
        last.map(|t| t.duration_since(removed))
    );
    let out = client_as(
        &cluster,
        Some(&file),
        &["--timeout-ms", "500", "append", "x"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // The others' requests go on (nothing was restarted).
    let out = client_as(&cluster, None, &["append", "still"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// Whether every peer answers `status` sealed with `cred` (each opens it with its own table).
fn every_peer_knows(cluster: &Cluster, cred: &Path) -> Result<(), String> {
    let out = client_as(cluster, Some(cred), &["--timeout-ms", "1000", "status"]);
    let lines = json_lines(&out.stdout);
    let answered = lines.iter().filter(|l| l["answered"] == true).count();
    if answered == 3 {
        Ok(())
    } else {
        Err(describe(&out))
    }
}

#[test]
fn users_survive_a_restart_and_a_snapshot_install() {
    let _one = one_at_a_time();
    let (mut cluster, _) = start("roles-durable");
    let (_, early) = add_user(&cluster, "early", "read");
    poll_until(Duration::from_secs(5), "every peer knows early", || {
        every_peer_knows(&cluster, &early)
    });

    // Peer 3 misses a user and enough appends that the leader compacts past it.
    let leader = cluster.wait_for_one_leader(Duration::from_secs(5));
    let away = if leader == 3 { 2 } else { 3 };
    cluster.kill_peer(away);
    let (_, late) = add_user(&cluster, "late", "read");
    let mut appended = 0;
    while appended < SNAPSHOT_ENTRIES + 2 * SNAPSHOT_TRAILING {
        let out = Command::new(BENCH)
            .arg("-p")
            .arg(&cluster.configs[&1])
            .args(["--clients", "32", "--duration", "1"])
            .current_dir(&cluster.dir.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "bench: {}", describe(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: Value =
            serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap())
                .unwrap();
        appended += last["ops"].as_u64().unwrap();
    }
    cluster.start_peer(away);
    poll_until(Duration::from_secs(20), "the snapshot installed", || {
        let log = cluster.log_text(away);
        if log.contains("installed snapshot") {
            Ok(())
        } else {
            Err(tail(&cluster.log_path(away)))
        }
    });
    poll_until(Duration::from_secs(5), "every peer knows late", || {
        every_peer_knows(&cluster, &late)
    });

    // One more, after the snapshots: only in the WAL. All down, all up: the users come back
    // from snapshots and the WAL.
    let (_, fresh) = add_user(&cluster, "fresh", "write");
    cluster.kill_all();
    for id in 1..=3 {
        cluster.start_peer(id);
    }
    cluster.wait_for_one_leader(Duration::from_secs(10));
    for cred in [&early, &late, &fresh] {
        poll_until(Duration::from_secs(5), "users after a restart", || {
            every_peer_knows(&cluster, cred)
        });
    }
    let listed = client_as(&cluster, Some(&early), &["user", "list"]);
    assert_eq!(listed.status.code(), Some(1), "{}", describe(&listed));
}
