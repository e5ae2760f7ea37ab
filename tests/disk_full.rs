//! A real full disk: a follower's data directory on a small tmpfs fills up under load; the
//! other two keep committing, the full peer stays up and says `disk_full`, and once the tmpfs
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

#[test]
fn a_follower_whose_disk_fills_stays_up_and_catches_up_once_it_grows() {
    let _serial = one_at_a_time();
    let mounted: RefCell<Result<PathBuf, String>> = RefCell::new(Err("not mounted".into()));
    let mut cluster = Cluster::start_configured("disk_full", 3, |path| {
        let config = PeerConfig::load(path).unwrap();
        if config.node_id != FULL {
            return;
        }
        std::fs::create_dir_all(&config.data_dir).unwrap();
        *mounted.borrow_mut() = mount(&config.data_dir, "size=6m").map(|()| config.data_dir);
    });
    let dir = match mounted.into_inner() {
        Ok(dir) => dir,
        Err(why) => {
            return missing_tool("root and tmpfs", &format!("cannot mount a tmpfs: {why}"));
        }
    };
    let _unmount = Unmount(dir.clone());

    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));
    if leader == FULL {
        cluster.client_ok(&["transfer-leader", "1"]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_workers(
        &cluster,
        "df",
        8,
        Duration::from_secs(2),
        20,
        usize::MAX,
        &stop,
    );

    poll_until(
        Duration::from_secs(90),
        "peer 3 reports a full disk",
        || match status_of(&cluster, FULL) {
            Some(s) if s["disk_full"] == true => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    cluster.check_alive();
    // The other two commit without it.
    let before = cluster.acked.load(Ordering::Relaxed);
    cluster.wait_for_acks(before, 500, Duration::from_secs(30));
    cluster.check_alive();
    assert!(
        cluster.log_text(FULL).contains("disk full"),
        "no error line for the full disk"
    );

    let grown = Command::new("mount")
        .args(["-o", "remount,size=512m"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(grown.success(), "cannot grow the tmpfs");
    stop.store(true, Ordering::Relaxed);
    let appends = join_workers(workers);
    let leader_status = status_of(&cluster, 1).unwrap();
    let commit = leader_status["commit_index"].as_u64().unwrap();
    poll_until(
        Duration::from_secs(60),
        "peer 3 catches up",
        || match status_of(&cluster, FULL) {
            Some(s) if s["disk_full"] == false && s["applied_index"].as_u64() >= Some(commit) => {
                Ok(())
            }
            other => Err(format!("commit {commit}; peer 3: {other:?}")),
        },
    );
    cluster.check_alive();
    let records = query_log(&cluster, Duration::from_secs(10));
    check_log(&records, &appends);
}
