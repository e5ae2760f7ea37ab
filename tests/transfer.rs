//! Leadership transfer on real processes (Raft thesis §3.10): `client transfer-leader` moves
//! leadership to a named peer or to the most up-to-date one while a client keeps appending,
//! and no append fails or is lost.

mod common;

use common::{describe, json_lines, Cluster};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn leadership_moves_on_request_under_a_stream_of_appends_and_no_append_fails() {
    let mut cluster = Cluster::start("transfer", 3);
    let first = cluster.wait_for_one_leader(Duration::from_secs(10));

    // A steady stream of appends through one client library handle; every one must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let writer = {
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
        let mut client = cluster.lib_client(Duration::from_secs(5));
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("w{i}");
                match client.append(&text) {
                    Ok(a) => acked.lock().unwrap().push((a.index, text)),
                    Err(e) => failures.push(format!("{text}: {e}")),
                }
                i += 1;
            }
            failures
        })
    };

    let mut leader = first;
    let mut took = Vec::new();
    let mut probe = cluster.lib_client(Duration::from_secs(5));
    for round in 0..12 {
        // Alternate a named target with "the most up-to-date peer".
        let target = (round % 2 == 0).then(|| leader % 3 + 1);
        let mut args = vec!["--timeout-ms", "5000", "transfer-leader"];
        let id = target.map(|t| t.to_string());
        args.extend(id.as_deref());
        let started = Instant::now();
        let out = cluster.client(&args);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let line = &json_lines(&out.stdout)[0];
        let new = line["leader"].as_u64().expect("leader");
        probe
            .append(&format!("probe{round}"))
            .expect("the new leader serves appends");
        took.push(started.elapsed());
        assert_ne!(new, leader, "round {round}: leadership did not move");
        if let Some(t) = target {
            assert_eq!(new, t, "round {round}: went to {new}, not {t}");
        }
        let (leaders, text) = cluster.leaders();
        assert!(
            leaders.iter().any(|&(id, _)| id == new),
            "round {round}: {new} is not leading:\n{text}"
        );
        leader = new;
    }
    stop.store(true, Ordering::Relaxed);
    let failures = writer.join().unwrap();
    assert!(failures.is_empty(), "appends failed: {failures:?}");

    took.sort();
    println!(
        "12 transfers: command to an append acknowledged by the new leader: median {} ms, max {} ms",
        took[took.len() / 2].as_millis(),
        took[took.len() - 1].as_millis()
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 12,
        "the writer kept appending: {}",
        acked.len()
    );

    // A transfer to a peer that is not a member is refused.
    let out = cluster.client(&["transfer-leader", "9"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    // Every acknowledged append is in the log once, at its index.
    let out = cluster.client(&["query"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let log = json_lines(&out.stdout);
    for (index, text) in &acked {
        assert_eq!(log[*index as usize - 1]["data"], text.as_str());
        let copies = log.iter().filter(|e| e["data"] == text.as_str()).count();
        assert_eq!(copies, 1, "{text} appears {copies} times");
    }
}
