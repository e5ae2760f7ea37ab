//! A real full disk: a follower's data directory on a small tmpfs fills up under load; the
//! other two keep committing (also under `bench`), the full peer stays up and says `disk_full`, and once the tmpfs
//! grows it catches up with no restart. Needs root and tmpfs (fails under `CI` without them).

mod common;

use common::*;
use raft::config::PeerConfig;
use serde_json::Value;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The peer whose data directory is on the tmpfs.
const FULL: u64 = 3;

/// Lazily unmounts the tmpfs (the peer may still hold files there).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(dir: &Path, options: &str) -> Result<(), String> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Peer `id`'s line of `client status`, if it answered.
fn status_of(cluster: &Cluster, id: u64) -> Option<Value> {
    let out = cluster.client(&["status"]);
    json_lines(&out.stdout)
        .into_iter()
        .find(|l| l["id"] == id && l.get("role").is_some())
}

/// Three peers, peer [`FULL`]'s data directory on a 6 MiB tmpfs (unmounted when the guard
/// drops); `None` once `missing_tool` has judged a machine that cannot mount one.
fn cluster_with_a_small_disk(name: &str) -> Option<(Cluster, Unmount, PathBuf)> {
    let mounted: RefCell<Result<PathBuf, String>> = RefCell::new(Err("not mounted".into()));
    let cluster = Cluster::start_configured(name, 3, |path| {
        let config = PeerConfig::load(path).unwrap();
        if config.node_id != FULL {
            return;
        }
        std::fs::create_dir_all(&config.data_dir).unwrap();
        *mounted.borrow_mut() = mount(&config.data_dir, "size=6m").map(|()| config.data_dir);
    });
    match mounted.into_inner() {
        Ok(dir) => Some((cluster, Unmount(dir.clone()), dir)),
        Err(why) => {
            missing_tool("root and tmpfs", &format!("cannot mount a tmpfs: {why}"));
            None
        }
    }
}

#[test]
fn a_follower_whose_disk_fills_stays_up_and_catches_up_once_it_grows() {
    let _serial = one_at_a_time();
    let Some((mut cluster, _unmount, dir)) = cluster_with_a_small_disk("disk_full") else {
        return;
    };
    let mut leader = cluster.wait_for_one_leader(Duration::from_secs(10));
    if leader == FULL {
        cluster.client_ok(&["transfer-leader", "1"]);
        leader = 1;
    }
    let (stop, workers) = start_appends(&cluster, "df");

    poll_until(
        Duration::from_secs(90),
        "peer 3 reports a full disk",
        || match status_of(&cluster, FULL) {
            Some(s) if s["disk_full"] == true => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    cluster.check_alive();
    // The other two commit without it, under the workers' appends and under `bench`.
    let before = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(before, 500, Duration::from_secs(30));
    let (ops, errors) = bench(&cluster, 3);
    assert!(ops >= 100, "bench committed only {ops} appends");
    assert_eq!(errors, 0, "bench saw appends fail");
    assert_eq!(status_of(&cluster, FULL).unwrap()["disk_full"], true);
    cluster.check_alive();
    assert!(
        cluster.log_text(FULL).contains("disk full"),
        "no error line for the full disk"
    );

    grow_and_catch_up(&mut cluster, &dir, leader, &stop, workers);
}

/// Eight append workers that go on until `stop` is set, each retrying a timed-out append up
/// to 20 times (2 s each): enough to fill the 6 MiB tmpfs within the tests' deadlines.
fn start_appends(
    cluster: &Cluster,
    prefix: &str,
) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<Appends>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_workers(
        cluster,
        prefix,
        8,
        Duration::from_secs(2),
        20,
        usize::MAX,
        &stop,
    );
    (stop, workers)
}

/// Grows the tmpfs, stops the appends, waits for peer [`FULL`] to leave `disk_full` and
/// apply what leader `leader` committed, and checks the log against what was acknowledged.
fn grow_and_catch_up(
    cluster: &mut Cluster,
    dir: &Path,
    leader: u64,
    stop: &AtomicBool,
    workers: Vec<std::thread::JoinHandle<Appends>>,
) {
    let grown = Command::new("mount")
        .args(["-o", "remount,size=512m"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(grown.success(), "cannot grow the tmpfs");
    stop.store(true, Ordering::Relaxed);
    let appends = join_workers(workers);
    let commit = status_of(cluster, leader).unwrap()["commit_index"]
        .as_u64()
        .unwrap();
    poll_until(
        Duration::from_secs(60),
        "peer 3 catches up",
        || match status_of(cluster, FULL) {
            Some(s) if s["disk_full"] == false && s["applied_index"].as_u64() >= Some(commit) => {
                Ok(())
            }
            other => Err(format!("commit {commit}; peer 3: {other:?}")),
        },
    );
    cluster.check_alive();
    let mut records = query_log(cluster, Duration::from_secs(10));
    // `bench`'s appends all carry the same BENCH_SIZE bytes and it checks their answers
    // itself: here they only fill indices, like no-ops.
    let bench_data = "x".repeat(BENCH_SIZE);
    for r in records.iter_mut() {
        if r.data.as_deref() == Some(bench_data.as_str()) {
            r.data = None;
            r.kind = Some("noop".into());
        }
    }
    check_log(&records, &appends);
}

#[test]
fn a_leader_whose_disk_fills_hands_over_and_catches_up_once_it_grows() {
    let _serial = one_at_a_time();
    let Some((mut cluster, _unmount, dir)) = cluster_with_a_small_disk("disk_full_leader") else {
        return;
    };
    cluster.wait_for_one_leader(Duration::from_secs(10));
    poll_until(Duration::from_secs(20), "peer 3 leads", || {
        if cluster.wait_for_one_leader(Duration::from_secs(5)) == FULL {
            return Ok(());
        }
        let out = cluster.client(&["transfer-leader", &FULL.to_string()]);
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let (stop, workers) = start_appends(&cluster, "dfl");
    poll_until(
        Duration::from_secs(90),
        "peer 3 reports a full disk and another peer leads",
        || {
            let leader = leader_of_highest_term(&cluster);
            match status_of(&cluster, FULL) {
                Some(s) if s["disk_full"] == true && leader.is_some_and(|l| l != FULL) => Ok(()),
                other => Err(format!("leader {leader:?}; peer 3: {other:?}")),
            }
        },
    );
    cluster.check_alive();
    let before = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(before, 500, Duration::from_secs(30));
    let leader = leader_of_highest_term(&cluster).expect("a leader");
    grow_and_catch_up(&mut cluster, &dir, leader, &stop, workers);
}

/// The bytes of each of `bench`'s appends.
const BENCH_SIZE: usize = 64;

/// Runs `bench` against the cluster for `seconds`: the appends it committed and those that
/// failed, from its JSON line.
fn bench(cluster: &Cluster, seconds: u64) -> (u64, u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("-p")
        .arg(&cluster.configs[&1])
        .args(["--clients", "16", "--duration", &seconds.to_string()])
        .args(["--size", &BENCH_SIZE.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line from bench: {stdout}"));
    let last: Value = serde_json::from_str(line).unwrap();
    (
        last["ops"].as_u64().unwrap(),
        last["errors"].as_u64().unwrap(),
    )
}

/// The leader of the highest term in `client status`: peer [`FULL`] goes on reporting its
/// last status (leader of its term) while it waits for space.
fn leader_of_highest_term(cluster: &Cluster) -> Option<u64> {
    json_lines(&cluster.client(&["status"]).stdout)
        .iter()
        .filter(|l| l["role"] == "leader")
        .max_by_key(|l| l["term"].as_u64())
        .and_then(|l| l["id"].as_u64())
}
