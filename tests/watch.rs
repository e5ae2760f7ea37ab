//! `client watch` as a person sees it: in a real terminal (tmux), against a live cluster whose
//! leader is killed; and `watch --once` as plain text for scripts.

mod common;

use common::{describe, missing_tool, poll_until, Cluster, CLIENT};
use std::process::Command;
use std::time::{Duration, Instant};

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux").args(args).output().expect("run tmux")
}

#[test]
fn watch_once_prints_every_peer_and_the_leader_as_plain_text() {
    let mut cluster = Cluster::start("watch-once", 3);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));
    let out = cluster.client(&["watch", "--once"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\x1b'),
        "plain text, no terminal codes:\n{text}"
    );
    for id in 1..=3 {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{id} "))),
            "no row for peer {id}:\n{text}"
        );
    }
    assert!(text.contains(&format!("peer {leader} leads")), "{text}");
}

#[test]
fn watch_in_a_terminal_shows_a_new_leader_within_two_seconds_and_quits_on_q() {
    if let Err(e) = Command::new("tmux").arg("-V").output() {
        missing_tool(
            "tmux",
            &format!("cannot run tmux ({e}): apt-get install tmux"),
        );
        return;
    }
    let mut cluster = Cluster::start("watch-tmux", 3);
    let leader = cluster.wait_for_one_leader(Duration::from_secs(10));
    let session = format!("raft-watch-{}", std::process::id());
    let exit_file = cluster.dir.0.join("watch.exit");
    let command = format!(
        "{CLIENT} -p {} watch; echo $? > {}; sleep 30",
        cluster.configs[&1].display(),
        exit_file.display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "35",
        &command,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let screen = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        poll_until(
            Duration::from_secs(5),
            "the view did not show the leader",
            || {
                let s = screen();
                s.contains(&format!("peer {leader} leads"))
                    .then_some(())
                    .ok_or(s)
            },
        );
        cluster.kill_peer(leader);
        let killed = Instant::now();
        let s = poll_until(Duration::from_secs(2), "no leader change on screen", || {
            let s = screen();
            s.contains("leader change: peer")
                .then_some(s.clone())
                .ok_or(s)
        });
        println!(
            "leader change on screen {} ms after the kill",
            killed.elapsed().as_millis()
        );
        assert!(s.contains("started an election"), "{s}");
        assert!(
            s.contains(&format!("peer {leader} stopped answering")),
            "{s}"
        );
        tmux(&["send-keys", "-t", &session, "q"]);
        let code = poll_until(Duration::from_secs(3), "watch did not exit on q", || {
            std::fs::read_to_string(&exit_file).map_err(|e| e.to_string())
        });
        assert_eq!(code.trim(), "0", "exit status of watch");
        let after = screen();
        assert!(
            !after.contains("commits/s"),
            "the view was left on screen:\n{after}"
        );
    }));
    tmux(&["kill-session", "-t", &session]);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
