//! Measures the storage layer: append + fsync throughput at several batch sizes, how long
//! `Wal::open` takes to replay a large WAL, the store's cost per applied entry, and what
//! preallocating a file saves an `fdatasync`.
//!
//! `cargo run --release --bin storage_bench [-- --entries N --size BYTES --dir DIR]`

use argh::FromArgs;
use raft::raft::record_of;
use raft::raft::{Entry, HardState, Index, Payload};
use raft::storage::store::Store;
use raft::storage::wal::Wal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// WAL benchmark: append+fsync throughput and WAL replay time.
#[derive(FromArgs)]
struct Args {
    /// directory to work in; must be missing or empty (default: a fresh temp dir). The bench
    /// removes what it wrote there when done.
    #[argh(option)]
    dir: Option<PathBuf>,
    /// entries to write before timing a reopen (default 1,000,000)
    #[argh(option, default = "1_000_000")]
    entries: u64,
    /// bytes of data per entry (default 64)
    #[argh(option, default = "64")]
    size: usize,
}

/// How long, and at most how many batches, each append measurement runs.
const APPEND_TIME: Duration = Duration::from_secs(2);
const APPEND_MAX_BATCHES: usize = 100_000;
const BATCH_SIZES: [usize; 3] = [1, 64, 256];
const OPEN_BATCH: u64 = 1000;
/// Writes per round, and rounds of each kind, in the preallocation measurement.
const FSYNC_ROUND: usize = 500;
const FSYNC_ROUNDS: usize = 4;

fn main() {
    let args: Args = argh::from_env();
    if let Err(e) = run(&args) {
        eprintln!("storage_bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let root = match &args.dir {
        Some(dir) => {
            let empty = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
            };
            if !empty {
                return Err(format!("--dir {} must be missing or empty", dir.display()));
            }
            dir.clone()
        }
        None => std::env::temp_dir().join(format!("raft-storage-bench-{}", std::process::id())),
    };
    let _cleanup = RemoveOnDrop(root.clone());
    measure(args, &root)
}

/// Removes the bench's directory however the bench ends (error, panic or success).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn measure(args: &Args, root: &Path) -> Result<(), String> {
    let data = "x".repeat(args.size);
    let mut appends = Vec::new();
    for batch in BATCH_SIZES {
        let dir = root.join(format!("append-{batch}"));
        let (mut storage, _, _) = Wal::open(&dir, 1)?;
        let mut next: Index = 1;
        let mut latencies = Vec::new();
        let start = Instant::now();
        while start.elapsed() < APPEND_TIME && latencies.len() < APPEND_MAX_BATCHES {
            let entries = make_batch(next, batch as u64, &data);
            let t = Instant::now();
            storage.persist(None, &entries)?;
            latencies.push(t.elapsed());
            next += batch as u64;
        }
        let elapsed = start.elapsed().as_secs_f64();
        latencies.sort();
        let n = latencies.len();
        let mean_us = latencies.iter().map(|d| d.as_secs_f64()).sum::<f64>() / n as f64 * 1e6;
        let pct = |p: f64| latencies[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e6;
        let (p50, p99) = (pct(0.50), pct(0.99));
        let batches_per_s = n as f64 / elapsed;
        let entries_per_s = batches_per_s * batch as f64;
        println!(
            "append batch={batch:>3}: {n} persists in {elapsed:.2} s: {batches_per_s:.0} batches/s, \
             {entries_per_s:.0} entries/s, persist (write+fdatasync) mean {mean_us:.0} µs, \
             p50 {p50:.0} µs, p99 {p99:.0} µs"
        );
        appends.push(serde_json::json!({
            "batch": batch,
            "persists": n,
            "batches_per_s": round(batches_per_s),
            "entries_per_s": round(entries_per_s),
            "fsync_mean_us": round(mean_us),
            "fsync_p50_us": round(p50),
            "fsync_p99_us": round(p99),
        }));
        drop(storage);
        let _ = std::fs::remove_dir_all(&dir);
    }

    let dir = root.join("open");
    let write_start = Instant::now();
    {
        let (mut storage, _, _) = Wal::open(&dir, 1)?;
        let mut next: Index = 1;
        while next <= args.entries {
            let count = OPEN_BATCH.min(args.entries - next + 1);
            let hard_state = HardState {
                term: 1,
                vote: Some(1),
                commit: next - 1,
            };
            storage.persist(Some(&hard_state), &make_batch(next, count, &data))?;
            next += count;
        }
    }
    let write_s = write_start.elapsed().as_secs_f64();
    let wal_bytes = std::fs::metadata(dir.join("wal"))
        .map_err(|e| format!("cannot stat the wal: {e}"))?
        .len();
    let open_start = Instant::now();
    let (storage, hard_state, log) = Wal::open(&dir, 1)?;
    let open_s = open_start.elapsed().as_secs_f64();
    if log.len() as u64 != args.entries || storage.last_index() != args.entries {
        return Err(format!(
            "reopen found {} entries, expected {}",
            log.len(),
            args.entries
        ));
    }
    drop((storage, log));
    println!(
        "open: replayed {} entries of {} bytes ({:.1} MB of WAL, written in {write_s:.2} s) in \
         {:.0} ms ({:.2} M entries/s, {:.0} MB/s), commit {}",
        args.entries,
        args.size,
        wal_bytes as f64 / 1e6,
        open_s * 1e3,
        args.entries as f64 / open_s / 1e6,
        wal_bytes as f64 / open_s / 1e6,
        hard_state.commit
    );
    let store_us = measure_store(root, args.entries, &data)?;
    let (append_p50, overwrite_p50) = measure_preallocation(root)?;
    let summary = serde_json::json!({
        "store_append_us_per_record": round(store_us),
        "fdatasync_4k_append_p50_us": round(append_p50),
        "fdatasync_4k_preallocated_p50_us": round(overwrite_p50),
        "append": appends,
        "open": {
            "entries": args.entries,
            "entry_size": args.size,
            "wal_bytes": wal_bytes,
            "write_s": round(write_s),
            "open_ms": round(open_s * 1e3),
        },
    });
    println!("{summary}");
    Ok(())
}

/// What the node thread spends per applied entry on the store: making its record
/// (`record_of`) and appending it (no sync; the snapshot thread syncs).
fn measure_store(root: &Path, entries: u64, data: &str) -> Result<f64, String> {
    let dir = root.join("store");
    let (mut store, _) = Store::open(&dir)?;
    let mut next: Index = 1;
    let start = Instant::now();
    while next <= entries {
        let count = OPEN_BATCH.min(entries - next + 1);
        let batch = make_batch(next, count, data);
        let records: Vec<_> = batch.iter().map(|e| record_of(e, false)).collect();
        store.append(&records)?;
        next += count;
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / entries as f64;
    println!("store: {entries} records made and appended at {us:.2} µs each");
    Ok(us)
}

/// Why WAL segments are preallocated: the p50 of a 4 KiB write + `fdatasync` that extends a
/// file, and of one that overwrites a file already written with zeros (no metadata change,
/// so no journal commit), alternating rounds of [`FSYNC_ROUND`] writes each.
fn measure_preallocation(root: &Path) -> Result<(f64, f64), String> {
    use std::io::{Seek, SeekFrom, Write};
    let err = |e: std::io::Error| format!("preallocation measurement in {}: {e}", root.display());
    let block = [b'x'; 4096];
    let mut lat = [Vec::new(), Vec::new()];
    for round in 0..2 * FSYNC_ROUNDS {
        let preallocated = round % 2 == 1;
        let path = root.join("fsync");
        let mut f = std::fs::File::create(&path).map_err(err)?;
        if preallocated {
            f.write_all(&vec![0; FSYNC_ROUND * block.len()])
                .map_err(err)?;
            f.sync_all().map_err(err)?;
            f.seek(SeekFrom::Start(0)).map_err(err)?;
        }
        for _ in 0..FSYNC_ROUND {
            let t = Instant::now();
            f.write_all(&block).map_err(err)?;
            f.sync_data().map_err(err)?;
            lat[usize::from(preallocated)].push(t.elapsed());
        }
        drop(f);
        std::fs::remove_file(&path).map_err(err)?;
    }
    let p50 = |l: &mut Vec<Duration>| {
        l.sort();
        l[l.len() / 2].as_secs_f64() * 1e6
    };
    let (append, overwrite) = (p50(&mut lat[0]), p50(&mut lat[1]));
    println!(
        "fdatasync of a 4 KiB write: p50 {append:.0} µs extending the file, {overwrite:.0} µs \
         in a preallocated one"
    );
    Ok((append, overwrite))
}

fn make_batch(first: Index, count: u64, data: &str) -> Vec<Entry> {
    (first..first + count)
        .map(|index| Entry {
            index,
            term: 1,
            payload: Payload::Data {
                client: 7,
                seq: index,
                data: data.to_owned(),
            },
        })
        .collect()
}

/// Rounds to 2 decimals for the JSON line.
fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
