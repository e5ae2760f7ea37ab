//! `client snapshot save` and `peer --restore` on real processes: a backup taken under a
//! stream of appends holds everything acknowledged before it started, and restores into three
//! fresh data dirs as a new cluster with the same records at the same indices; a corrupt or
//! truncated backup, and a non-empty data dir, are refused with nothing written. A backup
//! carries the client sessions and the configuration: a retry, to the restored cluster, of an
//! append made before the backup is answered from its session, not applied again. It carries
//! the users too (never their keys): a credential saved before the backup works, with its
//! role, against a cluster restored with the same secret and cluster name.

mod common;

use common::{Cluster, TempDir, PEER};
use raft::raft::{
    ClientId, ClientOp, ClientReply, ClientRequest, ClientResult, Datagram, Index, LogRecord,
};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The backup's records, read back with every check.
fn backup_records(file: &Path) -> Vec<LogRecord> {
    let mut records = Vec::new();
    raft::backup::read(file, |page| {
        records.extend_from_slice(page);
        Ok(())
    })
    .unwrap();
    records
}

fn save(cluster: &Cluster, file: &Path) -> serde_json::Value {
    let lines = cluster.client_ok(&["snapshot", "save", file.to_str().unwrap()]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines[0].clone()
}

/// `peer -p config --restore file` that is expected to refuse: its exit code and output.
fn refused_restore(config: &Path, file: &Path) -> (Option<i32>, String) {
    let out: Output = Command::new(PEER)
        .arg("-p")
        .arg(config)
        .arg("--restore")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn cluster_file(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("cluster")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cluster_id"].as_str().unwrap().to_string()
}

#[test]
fn a_backup_under_appends_restores_as_a_new_cluster_index_for_index() {
    let _one = common::one_at_a_time();
    let mut cluster = Cluster::start("backup", 3);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = common::spawn_workers(
        &cluster,
        "w",
        2,
        Duration::from_secs(2),
        3,
        usize::MAX,
        &stop,
    );
    cluster.wait_for_acks(0, 200, Duration::from_secs(20));
    // Acknowledged before the save starts: the backup must hold it (linearizable).
    let marker = cluster.client_ok(&["append", "before the save"]);
    let marker_index = marker[0]["index"].as_u64().unwrap();
    let file = cluster.dir.0.join("backup.raft");
    let saved = save(&cluster, &file);
    let acked_during = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(acked_during, 50, Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let appends = common::join_workers(workers);

    let index = saved["index"].as_u64().unwrap();
    assert!(
        index >= marker_index,
        "{saved} misses the append at {marker_index}"
    );
    assert_eq!(saved["file"], file.to_str().unwrap());
    assert_eq!(
        saved["bytes"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    let backed_up = backup_records(&file);
    assert_eq!(backed_up.len() as u64, index);
    let verified = raft::backup::read(&file, |_| Ok(())).unwrap();
    let recorded = verified
        .configuration
        .expect("a version 2 backup records its members");
    let ids: Vec<u64> = recorded.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    // Two append workers and the marker's client, at least, have sessions.
    assert!(verified.sessions.len() >= 3, "{:?}", verified.sessions);
    assert_eq!(saved["term"].as_u64(), backed_up.last().map(|r| r.term));
    let original = common::query_log(&cluster, Duration::from_secs(10));
    assert!(
        original.len() as u64 > index,
        "appends went on during the save"
    );
    assert_eq!(backed_up[..], original[..index as usize]);
    for (data, &at) in &appends.acked {
        if at <= index {
            assert_eq!(
                backed_up[at as usize - 1].data.as_deref(),
                Some(data.as_str())
            );
        }
    }
    let old_id = cluster_file(&cluster.data_dir(1));
    cluster.kill_all();

    // Three fresh data dirs, each restored from the same file: a new cluster.
    let dir = TempDir::new("restored");
    let configs = common::write_configs(&dir.0, 3);
    let mut restored = Cluster {
        peers: Default::default(),
        configs,
        dir,
        acked: Default::default(),
    };
    let file_arg = file.to_str().unwrap();
    for id in 1..=3 {
        restored.start_peer_with(id, &["--restore", file_arg]);
    }
    restored.wait_for_one_leader(Duration::from_secs(10));
    let after = restored.client_ok(&["append", "after the restore"]);
    let after = after[0]["index"].as_u64().unwrap();
    assert!(after > index, "{after:?}");
    let log = common::query_log(&restored, Duration::from_secs(10));
    assert_eq!(log[..index as usize], backed_up[..]);
    let ids: Vec<String> = (1..=3)
        .map(|id| cluster_file(&restored.data_dir(id)))
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_ne!(ids[0], old_id, "a restore makes a new cluster");
    // Restarted, the peers are an ordinary cluster (the flag is only for the first start).
    for id in 1..=3 {
        restored.stop_peer(id);
    }
    for id in 1..=3 {
        restored.start_peer(id);
    }
    restored.wait_for_one_leader(Duration::from_secs(10));
    let log = common::query_log(&restored, Duration::from_secs(10));
    assert_eq!(log[..index as usize], backed_up[..]);
    assert_eq!(
        log[after as usize - 1].data.as_deref(),
        Some("after the restore")
    );

    // It grows like any cluster: a new peer catches up from the restored snapshot.
    let port = common::free_ports(1)[0];
    let contacts = restored.ports();
    restored.start_joining(4, port, &contacts, |_| {});
    restored.client_ok(&["add-learner", "4", &format!("127.0.0.1:{port}")]);
    restored.client_ok(&["--timeout-ms", "20000", "promote", "4"]);
    common::poll_until(Duration::from_secs(10), "peer 4 caught up", || {
        let lines = restored.client_ok(&["status"]);
        let four = lines.iter().find(|l| l["id"] == 4 && l["answered"] == true);
        match four.and_then(|l| l["applied_index"].as_u64()) {
            Some(applied) if applied > after => Ok(()),
            _ => Err(format!("{lines:?}")),
        }
    });
    // Without peer 1, peer 4's vote counts: the log reads the same through the new majority.
    restored.kill_peer(1);
    let lines = restored.client_ok(&["query"]);
    let log: Vec<LogRecord> = lines
        .into_iter()
        .map(|l| serde_json::from_value(l).unwrap())
        .collect();
    assert_eq!(log[..index as usize], backed_up[..]);
}

#[test]
fn damaged_backups_and_non_empty_data_dirs_are_refused_with_nothing_written() {
    let _one = common::one_at_a_time();
    let mut cluster = Cluster::start("backup-refused", 1);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    for i in 0..30 {
        cluster.client_ok(&["append", &format!("entry {i}")]);
    }
    let file = cluster.dir.0.join("good.raft");
    save(&cluster, &file);
    cluster.kill_all();
    let good = std::fs::read(&file).unwrap();

    let dir = TempDir::new("restore-refused");
    let config: PathBuf = common::write_configs(&dir.0, 1)[&1].clone();
    let data_dir = dir.0.join("data-peer1");
    let mut corrupt = good.clone();
    let at = good.len() * 2 / 3;
    corrupt[at] = if corrupt[at] == b'7' { b'8' } else { b'7' };
    let cases: [(&str, &[u8], &str); 3] = [
        ("corrupt.raft", &corrupt, "corrupt"),
        ("truncated.raft", &good[..good.len() - 100], "truncated"),
        ("empty.raft", b"", "not a backup"),
    ];
    for (name, bytes, why) in cases {
        let bad = dir.0.join(name);
        std::fs::write(&bad, bytes).unwrap();
        let (code, text) = refused_restore(&config, &bad);
        assert_eq!(code, Some(1), "{name}: {text}");
        assert!(text.contains(why), "{name}: {text}");
        assert!(text.contains("nothing was written"), "{name}: {text}");
        assert!(!data_dir.exists(), "{name}: the data dir was created");
    }

    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("keep-me"), "x").unwrap();
    let (code, text) = refused_restore(&config, &file);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not empty"), "{text}");
    let left: Vec<_> = std::fs::read_dir(&data_dir).unwrap().collect();
    assert_eq!(left.len(), 1, "the data dir was touched");
    // Nothing half-built was left beside it either.
    let beside: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restoring"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
}

/// Sends `Append { client, seq, data }` as a client process would, to each peer in turn, until
/// one answers it as the leader: the index and term it names.
fn raw_append(
    peers: &[SocketAddr],
    client: ClientId,
    seq: u64,
    data: &str,
) -> Result<(Index, u64), String> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0; 65_536];
    let mut id = u64::from(socket.local_addr().unwrap().port()) << 32;
    for to in peers.iter().cycle() {
        if Instant::now() >= deadline {
            break;
        }
        id += 1;
        let op = ClientOp::Append {
            client,
            seq,
            data: data.into(),
        };
        let request = Datagram::Request(ClientRequest { id, op });
        socket.send_to(&request.encode().unwrap(), to).unwrap();
        let wait = Instant::now() + Duration::from_millis(500);
        while let Some(left) = wait.checked_duration_since(Instant::now()) {
            socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, _)) = socket.recv_from(&mut buf) else {
                break;
            };
            match Datagram::decode(&buf[..n]) {
                Ok(Datagram::Reply(ClientReply {
                    id: got, result, ..
                })) if got == id => match result {
                    ClientResult::Appended { index, term } => return Ok((index, term)),
                    ClientResult::NotLeader { .. } => break,
                    other => return Err(format!("{other:?}")),
                },
                _ => {}
            }
        }
    }
    Err(format!(
        "no leader answered append {client}/{seq} within 10 s"
    ))
}

#[test]
fn a_retry_after_restore_is_answered_from_its_session_not_applied_twice() {
    let _one = common::one_at_a_time();
    let mut cluster = Cluster::start("backup-sessions", 1);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    let peers: Vec<SocketAddr> = cluster.addresses().into_values().collect();
    let (a, b): (ClientId, ClientId) = (0x5e55_0001, 0x5e55_0002);
    let first = raw_append(&peers, a, 1, "made once").unwrap();
    cluster.client_ok(&["append", "someone else's"]);
    let second = raw_append(&peers, b, 7, "made once too").unwrap();
    cluster.client_ok(&["append", "after both"]);
    let file = cluster.dir.0.join("sessions.raft");
    let saved = save(&cluster, &file);
    let index = saved["index"].as_u64().unwrap();
    let verified = raft::backup::read(&file, |_| Ok(())).unwrap();
    let session = |client| verified.sessions.iter().find(|s| s.client == client);
    assert_eq!(session(a).map(|s| (s.seq, s.index)), Some((1, first.0)));
    assert_eq!(session(b).map(|s| (s.seq, s.index)), Some((7, second.0)));
    let ids: Vec<u64> = verified
        .configuration
        .unwrap()
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [1]);
    cluster.kill_all();

    let dir = TempDir::new("restored-sessions");
    let configs = common::write_configs(&dir.0, 1);
    let mut restored = Cluster {
        peers: Default::default(),
        configs,
        dir,
        acked: Default::default(),
    };
    restored.start_peer_with(1, &["--restore", file.to_str().unwrap()]);
    restored.wait_for_one_leader(Duration::from_secs(10));
    let log = restored.log_text(1);
    let sessions = format!("{} client sessions", verified.sessions.len());
    assert!(
        log.contains("recorded members") && log.contains(&sessions),
        "{log}"
    );
    let peers: Vec<SocketAddr> = restored.addresses().into_values().collect();
    // Retries of appends made before the backup: the original answers, nothing appended.
    assert_eq!(raw_append(&peers, a, 1, "made once"), Ok(first));
    assert_eq!(raw_append(&peers, b, 7, "made once too"), Ok(second));
    let fresh = raw_append(&peers, a, 2, "a new one").unwrap();
    assert!(fresh.0 > index, "{fresh:?} after {index}");
    let log = common::query_log(&restored, Duration::from_secs(10));
    let after: Vec<&LogRecord> = log[index as usize..]
        .iter()
        .filter(|r| r.data.is_some())
        .collect();
    assert_eq!(after.len(), 1, "only the new append was applied: {after:?}");
    assert!(
        log.iter().all(|r| r.kind.as_deref() != Some("duplicate")),
        "a retry became an entry: {log:?}"
    );
}

/// `n` peer configs in `dir`, each with its own copy of `secret` as its `secret_file`.
fn configs_with_secret(
    dir: &Path,
    n: usize,
    secret: &raft::auth::Secret,
) -> BTreeMap<u64, PathBuf> {
    let configs = common::write_configs(dir, n);
    for (id, path) in &configs {
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let key = dir.join(format!("peer{id}.key"));
        secret.write(&key).unwrap();
        config["secret_file"] = key.to_str().unwrap().into();
        common::write_json(path, &config);
    }
    configs
}

/// Writes `text` to a new file only its owner may read, as a credential file must be.
fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

#[test]
fn a_users_credential_works_with_its_role_on_the_restored_cluster() {
    let _one = common::one_at_a_time();
    let secret = raft::auth::Secret::generate().unwrap();
    let dir = TempDir::new("backup-users");
    let configs = configs_with_secret(&dir.0, 1, &secret);
    let mut cluster = Cluster::start_in(dir, configs);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    let added = cluster.client_ok(&["user", "add", "carol", "--role", "write"]);
    let key = added[0]["key"].as_str().unwrap().to_string();
    let cred = cluster.dir.0.join("carol.cred");
    write_private(&cred, &format!("{}\n", added[0]));
    let cred_arg = cred.to_str().unwrap();
    cluster.client_ok(&["--cred", cred_arg, "append", "by carol before"]);
    let file = cluster.dir.0.join("users.raft");
    let saved = save(&cluster, &file);
    let verified = raft::backup::read(&file, |_| Ok(())).unwrap();
    assert_eq!(verified.header.version, 3);
    let users: Vec<(&str, &str)> = verified
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.role.name()))
        .collect();
    assert_eq!(users, [("carol", "write")]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&key), "the backup holds a user's key");
    cluster.kill_all();

    // Three fresh data dirs with the same secret and cluster name: the same user keys.
    let dir = TempDir::new("restored-users");
    let configs = configs_with_secret(&dir.0, 3, &secret);
    let mut restored = Cluster {
        peers: Default::default(),
        configs,
        dir,
        acked: Default::default(),
    };
    for id in 1..=3 {
        restored.start_peer_with(id, &["--restore", file.to_str().unwrap()]);
    }
    restored.wait_for_one_leader(Duration::from_secs(10));
    assert!(restored.log_text(1).contains("and 1 users"));
    let after = restored.client_ok(&["--cred", cred_arg, "append", "by carol after"]);
    assert!(after[0]["index"].as_u64().unwrap() > saved["index"].as_u64().unwrap());
    // Its role came along: a writer may not manage users.
    let out = restored.client(&["--cred", cred_arg, "user", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    let listed = restored.client_ok(&["user", "list"]);
    assert_eq!(
        listed,
        [serde_json::json!({"user": "carol", "role": "write"})]
    );
}
