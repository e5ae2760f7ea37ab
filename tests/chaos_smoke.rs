//! A short chaos run on real peer processes, snapshotting every 50 entries, must come out
//! linearizable; and the same run's files, tampered with, must be caught by the checker
//! (`chaos --check`).

use std::path::Path;
use std::process::{Command, Output};

fn chaos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chaos")
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn explain(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The summary's `key=value` for `key`.
fn field(summary: &str, key: &str) -> String {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {summary:?}"))
        .to_string()
}

#[test]
fn a_short_mixed_run_is_linearizable_and_tampering_with_it_is_caught() {
    let dir = std::env::temp_dir().join(format!("raft-chaos-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = chaos(&[
        "--nodes",
        "3",
        "--duration",
        "20",
        "--faults",
        "mixed",
        "--seed",
        "1",
        "--snapshot-entries",
        "50",
        "--out",
        d,
    ]);
    let summary = last_line(&out);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert!(summary.starts_with("valid=true "), "{}", explain(&out));
    assert_ne!(field(&summary, "faults"), "none", "{summary}");
    // `mixed` includes membership changes (a member removed and added back, or leadership
    // transferred): the run must have made some, as it must have acknowledged appends.
    assert!(
        field(&summary, "faults").contains("membership:"),
        "no membership change in {summary}"
    );
    assert_ne!(field(&summary, "ok"), "0", "{summary}");
    for f in [
        "history.jsonl",
        "observed.jsonl",
        "final.jsonl",
        "report.txt",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let history = std::fs::read_to_string(dir.join("history.jsonl")).unwrap();
    assert!(history.contains(r#""type":"fault""#), "no faults recorded");

    // The saved files check out the same way.
    let again = chaos(&["--check", d]);
    assert_eq!(again.status.code(), Some(0), "{}", explain(&again));
    assert_eq!(
        field(&last_line(&again), "ops"),
        field(&summary, "ops"),
        "{}",
        explain(&again)
    );

    // Swap one acknowledged value in the final log for one nobody appended: lost and phantom.
    tamper_final_log(&dir);
    let caught = chaos(&["--check", d]);
    let verdict = last_line(&caught);
    assert_eq!(caught.status.code(), Some(1), "{}", explain(&caught));
    assert!(verdict.starts_with("valid=false "), "{verdict}");
    assert_eq!(field(&verdict, "lost"), "1", "{verdict}");
    assert_eq!(field(&verdict, "phantom"), "1", "{verdict}");

    let _ = std::fs::remove_dir_all(&dir);
}

/// Replaces the data of the last acknowledged append in `final.jsonl` with "ghost".
fn tamper_final_log(dir: &Path) {
    let history = std::fs::read_to_string(dir.join("history.jsonl")).unwrap();
    let acked: Vec<String> = history
        .lines()
        .filter(|l| l.contains(r#""f":"append""#) && l.contains(r#""outcome":"ok""#))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["value"].as_str().unwrap().to_string()
        })
        .collect();
    let victim = acked.last().expect("some acknowledged append");
    let path = dir.join("final.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let needle = format!(r#""data":{}"#, serde_json::to_string(victim).unwrap());
    assert_eq!(
        text.matches(&needle).count(),
        1,
        "{needle} once in the final log"
    );
    std::fs::write(&path, text.replace(&needle, r#""data":"ghost""#)).unwrap();
}
