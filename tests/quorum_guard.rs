//! The quorum guard on real processes (issue #22): with peer 3 of {1, 2, 3} killed, the leader
//! refuses `remove 2` (it would leave {1, 3} with one live voter, and the cluster would stop
//! until 3 came back), says that node 3 was not heard from, and accepts `remove 3`; the menu
//! offers to force a refused change; `remove 2 --force` is accepted and commits once 3 is back.

mod common;

use common::{describe, json_lines, poll_until, wait_with_deadline, Cluster, CLIENT};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// How long the leader must not have heard from a peer before the test counts on the guard
/// seeing it as silent: twice the longest election timeout in the test configs (300 ms).
const SILENT_MS: u64 = 600;

/// The member IDs as `client members` prints them.
fn member_ids(cluster: &Cluster) -> Vec<u64> {
    cluster
        .client_ok(&["members"])
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect()
}

/// Three peers, peer 1 leading.
fn three_led_by_1(name: &str) -> Cluster {
    let mut cluster = Cluster::start(name, 3);
    cluster.wait_for_one_leader(Duration::from_secs(10));
    poll_until(Duration::from_secs(15), "peer 1 leads", || {
        let out = cluster.client(&["--timeout-ms", "3000", "transfer-leader", "1"]);
        match json_lines(&out.stdout).first() {
            Some(l) if l["leader"].as_u64() == Some(1) => Ok(()),
            _ => Err(describe(&out)),
        }
    });
    cluster
}

/// Waits until the leader reports that it has not heard from peer `id` for [`SILENT_MS`].
fn wait_until_silent(cluster: &Cluster, id: u64) {
    poll_until(
        Duration::from_secs(10),
        "the leader reports the peer silent",
        || {
            let out = cluster.client(&["--timeout-ms", "500", "status"]);
            let lines = json_lines(&out.stdout);
            let silent_for = lines
                .iter()
                .filter(|l| l["role"] == "leader")
                .flat_map(|l| l["followers"].as_array().cloned().unwrap_or_default())
                .find(|f| f["id"].as_u64() == Some(id))
                .and_then(|f| f["last_contact_ms"].as_u64());
            match silent_for {
                Some(ms) if ms >= SILENT_MS => Ok(()),
                _ => Err(format!("{lines:?}")),
            }
        },
    );
}

/// Runs the client's menu with `input` on stdin.
fn menu(cluster: &Cluster, input: &str) -> Output {
    let mut child = Command::new(CLIENT)
        .arg("-p")
        .arg(&cluster.configs[&1])
        .current_dir(&cluster.dir.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn removing_a_live_voter_while_another_is_down_is_refused_and_removing_the_dead_one_is_not() {
    let _one = common::one_at_a_time();
    let mut cluster = three_led_by_1("guard-refuse");
    cluster.kill_peer(3);
    wait_until_silent(&cluster, 3);

    let out = cluster.client(&["remove", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "error: refused: removing node 2 would leave 1 of 2 voters heard from within the election timeout (not heard from: node 3); a majority of the new configuration must be live; --force skips this check"
        ),
        "{}",
        describe(&out)
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert_eq!(member_ids(&cluster), vec![1, 2, 3], "nothing changed");

    // The menu asks before forcing; answered no, nothing changes.
    let out = menu(&cluster, "9\n2\nn\n3\n");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(not heard from: node 3)"),
        "{}",
        describe(&out)
    );
    assert!(stdout.contains("force it?"), "{}", describe(&out));
    assert!(stdout.contains("not forced"), "{}", describe(&out));
    assert_eq!(member_ids(&cluster), vec![1, 2, 3], "nothing changed");

    // Removing the dead voter leaves {1, 2}, both live: allowed, and the cluster goes on.
    let lines = cluster.client_ok(&["remove", "3"]);
    let ids: Vec<u64> = lines[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(member_ids(&cluster), vec![1, 2]);
    cluster.client_ok(&["append", "after"]);
}

#[test]
fn a_forced_removal_is_accepted_and_commits_once_the_dead_voter_is_back() {
    let _one = common::one_at_a_time();
    let mut cluster = three_led_by_1("guard-force");
    cluster.kill_peer(3);
    wait_until_silent(&cluster, 3);

    // {1, 3} with 3 down cannot commit: the client waits while 3 is restarted.
    let mut client = Command::new(CLIENT)
        .arg("-p")
        .arg(&cluster.configs[&1])
        .args(["--timeout-ms", "30000", "remove", "2", "--force"])
        .current_dir(&cluster.dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll_until(
        Duration::from_secs(10),
        "the leader accepts the forced removal",
        || {
            if cluster
                .log_text(1)
                .contains("Remove { id: 2 } forced past the quorum guard")
            {
                Ok(())
            } else {
                Err(common::tail(&cluster.log_path(1)))
            }
        },
    );
    cluster.start_peer(3);
    if wait_with_deadline(&mut client, Duration::from_secs(30)).is_none() {
        let _ = client.kill();
        panic!("the forced removal was not answered within 30 s");
    }
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let lines = json_lines(&out.stdout);
    let ids: Vec<u64> = lines[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3]);
    assert_eq!(member_ids(&cluster), vec![1, 3]);
}
