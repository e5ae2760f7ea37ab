//! A crash mid-write leaves a torn last WAL frame, which `Wal::open` must cut off however
//! the lost bytes look: neither what clients write nor which pages reached the disk may turn a
//! torn tail into a refusal to start. Only the public API and the bytes of the file are used.

use raft::raft::{Entry, HardState, Index, Payload};
use raft::storage::wal::Wal;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;

/// Keeps every warning logged, with the thread that logged it, so a test can find its own.
struct Warnings(Mutex<Vec<(ThreadId, String)>>);

impl log::Log for Warnings {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let entry = (std::thread::current().id(), record.args().to_string());
            self.0.lock().unwrap().push(entry);
        }
    }
    fn flush(&self) {}
}

static WARNINGS: Warnings = Warnings(Mutex::new(Vec::new()));

/// Warnings this thread logged since the last call.
fn take_warnings() -> Vec<String> {
    // Tests run in parallel: a thread that found the logger installed must not log before the
    // installer has raised the max level (the default, Off, drops the warning), so all wait here.
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&WARNINGS).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Warn);
    });
    let me = std::thread::current().id();
    let mut all = WARNINGS.0.lock().unwrap();
    let (mine, others) = all.drain(..).partition(|(id, _)| *id == me);
    *all = others;
    mine.into_iter().map(|(_, text)| text).collect()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "raft-wal-torn-tail-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }

    fn wal(&self) -> PathBuf {
        self.0.join("wal")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn data(index: Index, text: &str) -> Entry {
    Entry {
        index,
        term: 1,
        payload: Payload::Data {
            client: 7,
            seq: index,
            data: text.to_owned(),
        },
    }
}

fn hard_state(commit: Index) -> HardState {
    HardState {
        term: 1,
        vote: Some(1),
        commit,
    }
}

/// Writes `kept` as one batch and `lost` as the next; returns the WAL's bytes up to the end of
/// its frames and where the second batch's frame starts.
fn two_batches(dir: &Path, kept: &[Entry], lost: &[Entry]) -> (Vec<u8>, usize) {
    let (mut s, _, _) = Wal::open(dir, 1).unwrap();
    s.persist(Some(&hard_state(1)), kept).unwrap();
    // Where the frames end; the segment is preallocated, zeros after that.
    let start = s.segment_len() as usize;
    s.persist(Some(&hard_state(2)), lost).unwrap();
    let end = s.segment_len() as usize;
    drop(s);
    let mut bytes = fs::read(dir.join("wal")).unwrap();
    bytes.truncate(end);
    (bytes, start)
}

/// Opens a WAL whose last frame is torn; checks that exactly that frame is cut off and that
/// the log goes on from there.
fn assert_torn_tail_is_cut(bytes: &[u8], start: usize, kept: &[Entry], what: &str) {
    let dir = TempDir::new("torn");
    drop(Wal::open(&dir.0, 1).unwrap());
    fs::write(dir.wal(), bytes).unwrap();
    take_warnings();
    let (mut s, state, log) =
        Wal::open(&dir.0, 1).unwrap_or_else(|e| panic!("{what}: refused to open: {e}"));
    let warnings = take_warnings();
    let warned = warnings
        .iter()
        .any(|w| w.contains(&format!("torn write at byte offset {start}")));
    // With nothing of the last frame written there is nothing to cut.
    assert_eq!(
        warned,
        bytes.len() > start,
        "{what}: a cut is logged as a warning: {warnings:?}"
    );
    assert_eq!(log, kept, "{what}");
    assert_eq!(state, hard_state(1), "{what}");
    assert_eq!(
        fs::metadata(dir.wal()).unwrap().len(),
        start as u64,
        "{what}: the torn frame is cut off"
    );
    let next = kept.len() as Index + 1;
    s.persist(None, &[data(next, "after")]).unwrap();
    drop(s);
    let (_, _, log) = Wal::open(&dir.0, 1).unwrap();
    assert_eq!(log.len(), kept.len() + 1, "{what}");
}

/// A complete frame of the layout that carries no per-file magic (length, CRC-32 of the
/// payload, payload) holding one hard-state record, whose bytes are valid UTF-8 and so can be
/// part of an entry's data. A replay that takes any CRC-valid frame after damage as proof of
/// corruption is fooled by it.
fn frame_shaped_text() -> String {
    for term in 1u64.. {
        let mut payload = vec![1u8];
        for v in [term, 1, 1] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        let mut frame = Vec::new();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        if let Ok(text) = String::from_utf8(frame) {
            return text;
        }
    }
    unreachable!()
}

#[test]
fn client_data_shaped_like_a_frame_cannot_make_a_torn_tail_look_corrupt() {
    let src = TempDir::new("frame-shaped-src");
    let kept = vec![data(1, "first"), data(2, "second")];
    let text = format!(
        "before {} after, and some more text so the frame goes on past it",
        frame_shaped_text()
    );
    let (full, start) = two_batches(&src.0, &kept, &[data(3, &text)]);
    // Every crash point inside the last frame, including those after the embedded bytes.
    for cut in start..full.len() {
        assert_torn_tail_is_cut(&full[..cut], start, &kept, &format!("cut at {cut}"));
    }
}

#[test]
fn last_frame_whose_first_page_never_reached_the_disk_is_a_torn_write() {
    // Write-back does not go in file order: after a crash, later pages of the last frame may
    // be on disk while its first page (holding its header) reads as zeros.
    const PAGE: usize = 4096;
    let src = TempDir::new("lost-page-src");
    let kept = vec![data(1, "kept")];
    let lost: Vec<Entry> = (2..40).map(|i| data(i, &"x".repeat(300))).collect();
    let (full, start) = two_batches(&src.0, &kept, &lost);
    let first_page_end = (start / PAGE + 1) * PAGE;
    assert!(full.len() > first_page_end + PAGE, "the frame spans pages");
    let mut bytes = full.clone();
    bytes[start..first_page_end].fill(0);
    assert_torn_tail_is_cut(&bytes, start, &kept, "first page zeroed");
    // The same with only the first bytes of the header lost (a torn sector).
    let mut bytes = full;
    bytes[start..start + 8].fill(0);
    assert_torn_tail_is_cut(&bytes, start, &kept, "first 8 bytes zeroed");
}
