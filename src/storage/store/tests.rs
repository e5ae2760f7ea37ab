use super::*;
use crate::raft::{Membership, SessionRecord};
use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "raft-store-test-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
    fn store(&self) -> PathBuf {
        let current = fs::read_to_string(self.0.join(CURRENT_FILE)).unwrap();
        self.0.join(current.trim_end())
    }
    fn records(&self) -> Vec<u8> {
        fs::read(self.store().join(RECORDS_FILE)).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn record(index: Index) -> LogRecord {
    let term = 1 + index / 100;
    if index.is_multiple_of(7) {
        LogRecord {
            index,
            term,
            data: None,
            kind: Some("noop".to_string()),
        }
    } else {
        LogRecord {
            index,
            term,
            data: Some(format!(
                "value {index} {}",
                "x".repeat((index % 50) as usize)
            )),
            kind: None,
        }
    }
}

fn records(from: Index, to: Index) -> Vec<LogRecord> {
    (from..=to).map(record).collect()
}

fn state(index: Index, term: Term) -> SnapshotState {
    SnapshotState {
        index,
        term,
        membership: Membership::voters(&[1, 2, 3]),
        config_at: (0, 0),
        removed: vec![4],
        sessions: vec![SessionRecord {
            client: 7,
            seq: 3,
            index,
            term,
            data_hash: 99,
        }],
        users: Vec::new(),
    }
}

/// What `result` was refused for; panics unless it is a refusal.
fn refusal<T>(result: Result<T, StorageError>) -> Refusal {
    match result {
        Err(StorageError::Refused { refusal, .. }) => refusal,
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => panic!("not refused"),
    }
}

fn snapshot_here(store: &mut Store) -> SnapshotId {
    let last = store.last_index();
    let term = if last == 0 { 0 } else { record(last).term };
    store.write_snapshot(&state(last, term)).unwrap()
}

fn read_all(store: &mut Store) -> Vec<LogRecord> {
    let last = store.last_index();
    let mut out = Vec::new();
    let mut start = 1;
    loop {
        let (page, next) = store.read_page(start, last, 10_000).unwrap();
        out.extend(page);
        match next {
            Some(n) => start = n,
            None => return out,
        }
    }
}

#[test]
fn append_and_read_across_index_boundaries() {
    let dir = TempDir::new("read");
    let (mut store, snapshot) = Store::open(&dir.0).unwrap();
    assert!(snapshot.is_none());
    assert_eq!(store.last_index(), 0);
    let all = records(1, 1000);
    store.append(&all[..300]).unwrap();
    store.append(&all[300..]).unwrap();
    assert_eq!(store.last_index(), 1000);
    assert_eq!(read_all(&mut store), all);

    for (start, read_index) in [(1, 1), (256, 258), (257, 257), (513, 1000), (700, 900)] {
        let (page, next) = store.read_page(start, read_index, usize::MAX).unwrap();
        assert_eq!(
            page,
            all[start as usize - 1..read_index as usize],
            "{start}"
        );
        assert_eq!(next, None);
    }

    // A budget stops the page early, before the record that would exceed it.
    let json_len = |r: &LogRecord| serde_json::to_vec(r).unwrap().len();
    let budget = json_len(&all[299]) + json_len(&all[300]) + json_len(&all[301]) - 1;
    let (page, next) = store.read_page(300, 1000, budget).unwrap();
    assert_eq!(page, all[299..301]);
    assert_eq!(next, Some(302));
    // At least one record, however small the budget.
    let (page, next) = store.read_page(511, 1000, 1).unwrap();
    assert_eq!(page, all[510..511]);
    assert_eq!(next, Some(512));
    let (page, next) = store.read_page(1000, 1000, 1).unwrap();
    assert_eq!(page, all[999..]);
    assert_eq!(next, None);

    let range = |start, end| Refusal::ReadRange {
        start,
        end,
        last: 1000,
    };
    assert_eq!(refusal(store.read_page(0, 5, 100)), range(0, 5));
    assert_eq!(refusal(store.read_page(1, 1001, 100)), range(1, 1001));
    for index in [1002, 1000] {
        assert_eq!(
            refusal(store.append(&records(index, index))),
            Refusal::RecordOrder {
                index,
                term: record(index).term,
                after: 1000,
                after_term: record(1000).term
            }
        );
    }
}

#[test]
fn reopen_cuts_back_to_the_snapshot() {
    let dir = TempDir::new("reopen");
    let other = TempDir::new("reopen-other");
    let (mut never, _) = Store::open(&other.0).unwrap();
    never.append(&records(1, 1000)).unwrap();

    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 700)).unwrap();
    let id = snapshot_here(&mut store);
    assert_eq!(store.snapshot_id(), Some(id));
    store.append(&records(701, 900)).unwrap();
    drop(store);

    let (mut store, snapshot) = Store::open(&dir.0).unwrap();
    let (meta, reopened_id) = snapshot.unwrap();
    assert_eq!(reopened_id, id);
    assert_eq!(meta.state, state(700, record(700).term));
    assert_eq!(meta.records_len, id.records_len);
    assert_eq!(store.last_index(), 700);
    assert_eq!(
        fs::metadata(dir.store().join(RECORDS_FILE)).unwrap().len(),
        id.records_len
    );
    store.append(&records(701, 1000)).unwrap();
    assert_eq!(read_all(&mut store), records(1, 1000));
    // The running CRC resumed: a second snapshot matches the never-reopened store's.
    let id2 = snapshot_here(&mut store);
    let id_never = snapshot_here(&mut never);
    assert_eq!(id2, id_never);
    assert_eq!(dir.records(), other.records());

    // Without a snapshot, the store is cut back to empty.
    let empty = TempDir::new("reopen-empty");
    let (mut store, _) = Store::open(&empty.0).unwrap();
    store.append(&records(1, 10)).unwrap();
    drop(store);
    let (mut store, snapshot) = Store::open(&empty.0).unwrap();
    assert!(snapshot.is_none());
    assert_eq!(store.last_index(), 0);
    store.append(&records(1, 3)).unwrap();
    assert_eq!(read_all(&mut store), records(1, 3));
}

#[test]
fn hostile_client_data_round_trips() {
    let dir = TempDir::new("hostile");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    let texts = [
        "a\tb",
        "line\nbreak",
        "\t0000abcd",
        "x\t0000abcd\n",
        r#"{"index":9,"term":9,"data":"forged"}"#,
        "\u{0}\r\u{1b}é∑",
    ];
    let all: Vec<LogRecord> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| LogRecord {
            index: i as Index + 1,
            term: 1,
            data: Some(t.to_string()),
            kind: None,
        })
        .collect();
    store.append(&all).unwrap();
    assert_eq!(read_all(&mut store), all);
    snapshot_here(&mut store);
    drop(store);
    let (mut store, _) = Store::open(&dir.0).unwrap();
    assert_eq!(read_all(&mut store), all);
    assert_eq!(
        dir.records().iter().filter(|&&b| b == b'\n').count(),
        all.len()
    );
}

#[test]
fn a_flipped_bit_in_records_is_an_error() {
    let dir = TempDir::new("flip-records");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 600)).unwrap();
    snapshot_here(&mut store);
    let path = dir.store().join(RECORDS_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let (_, _) = store.read_page(300, 300, 1).unwrap();
    // Flip a bit inside record 300's data.
    let offset = bytes.windows(9).position(|w| w == b"value 300").unwrap();
    bytes[offset + 7] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let line = bytes[..offset].iter().rposition(|&b| b == b'\n').unwrap() as u64 + 1;
    let err = store.read_page(299, 301, usize::MAX).unwrap_err();
    assert!(
        matches!(&err, StorageError::Corrupt { path: p, offset: Some(at), .. }
            if *p == path && *at == line),
        "{err}"
    );
    assert!(store.read_page(1, 299, usize::MAX).is_ok());
}

#[test]
fn a_damaged_snapshot_file_is_an_error() {
    let dir = TempDir::new("flip-meta");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 300)).unwrap();
    snapshot_here(&mut store);
    drop(store);
    let path = dir.store().join(SNAPSHOT_FILE);
    let good = fs::read(&path).unwrap();

    for bit in [0, 8 * 5 + 3, 8 * (good.len() / 2), 8 * (good.len() - 5) + 1] {
        let mut bytes = good.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        fs::write(&path, &bytes).unwrap();
        let err = Store::open(&dir.0)
            .err()
            .expect("a flipped bit must fail open");
        assert!(
            matches!(&err, StorageError::Corrupt { path: p, .. } if *p == path),
            "{err}"
        );
    }
    for len in 0..good.len() {
        fs::write(&path, &good[..len]).unwrap();
        let err = Store::open(&dir.0)
            .err()
            .expect("a torn snapshot must fail open");
        assert!(
            matches!(&err, StorageError::Corrupt { path: p, .. } if *p == path),
            "{len}: {err}"
        );
    }
    fs::write(&path, &good).unwrap();
    let (store, snapshot) = Store::open(&dir.0).unwrap();
    assert_eq!(store.last_index(), 300);
    assert!(snapshot.is_some());
}

#[test]
fn read_chunk_streams_records_then_meta() {
    let dir = TempDir::new("chunks");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 500)).unwrap();
    let id = snapshot_here(&mut store);
    store.append(&records(501, 600)).unwrap();
    let meta = fs::read(dir.store().join(SNAPSHOT_FILE)).unwrap();
    let mut want = dir.records()[..id.records_len as usize].to_vec();
    want.extend_from_slice(&meta);
    assert_eq!(want.len() as u64, id.total_len());
    let mut got = Vec::new();
    let mut offset = 0;
    while offset < id.total_len() {
        let chunk = store.read_chunk(&id, offset, 777).unwrap();
        assert!(!chunk.is_empty());
        offset += chunk.len() as u64;
        got.extend(chunk);
    }
    assert_eq!(got, want);
    assert!(store
        .read_chunk(&id, id.total_len(), 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        refusal(store.read_chunk(&id, id.total_len() + 1, 10)),
        Refusal::ReadPastEnd {
            offset: id.total_len() + 1,
            index: id.index,
            total: id.total_len()
        }
    );
    store.append(&records(601, 601)).unwrap();
    snapshot_here(&mut store);
    assert_eq!(
        refusal(store.read_chunk(&id, 0, 10)),
        Refusal::NotCurrent {
            index: id.index,
            term: id.term
        }
    );
}

/// A sender with records 1..=`last` and a snapshot of them.
fn sender(dir: &TempDir, last: Index) -> (Store, SnapshotId) {
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, last)).unwrap();
    let id = snapshot_here(&mut store);
    (store, id)
}

/// Sends `id` from `offset` in chunks of `chunk` bytes (through base64 and back) until the
/// receiver installs it or asks for an offset it already asked for.
fn stream(
    from: &mut Store,
    to: &mut Store,
    id: &SnapshotId,
    mut offset: u64,
    chunk: u64,
) -> Received {
    loop {
        let bytes = from.read_chunk(id, offset, chunk).unwrap();
        let (text, crc) = encode_chunk(&bytes);
        let bytes = decode_chunk(&text, crc).unwrap();
        match to.receive_chunk(id, offset, &bytes).unwrap() {
            Received::Partial { have } => {
                assert_eq!(to.staged(id), have);
                assert!(have > offset || have == 0, "stuck at {offset}");
                offset = have;
            }
            installed => return installed,
        }
    }
}

fn check_installed(sender: &TempDir, from: &mut Store, receiver: &TempDir, id: &SnapshotId) {
    assert_eq!(
        receiver.records(),
        sender.records()[..id.records_len as usize]
    );
    let (mut to, snapshot) = Store::open(&receiver.0).unwrap();
    let (meta, reopened) = snapshot.unwrap();
    assert_eq!(reopened, *id);
    assert_eq!(meta.state.index, id.index);
    assert_eq!(to.last_index(), id.index);
    let got = read_all(&mut to);
    let (want, _) = from.read_page(1, id.index, usize::MAX).unwrap();
    assert_eq!(got, want);
    assert!(!receiver.0.join(INSTALL_DIR).exists());
    // Appending continues after the installed records.
    to.append(&records(id.index + 1, id.index + 10)).unwrap();
    assert_eq!(to.last_index(), id.index + 10);
}

#[test]
fn a_streamed_snapshot_installs() {
    let a = TempDir::new("stream-from");
    let b = TempDir::new("stream-to");
    let (mut from, id) = sender(&a, 3000);
    from.append(&records(3001, 3100)).unwrap(); // not part of the snapshot
    let (mut to, _) = Store::open(&b.0).unwrap();
    to.append(&records(1, 50)).unwrap();
    to.write_snapshot(&state(50, record(50).term)).unwrap();
    assert_eq!(to.staged(&id), 0);

    let Received::Installed { meta } = stream(&mut from, &mut to, &id, 0, 10_000) else {
        panic!("not installed");
    };
    assert_eq!(meta.state, state(3000, record(3000).term));
    assert_eq!(to.last_index(), 3000);
    assert_eq!(to.snapshot_id(), Some(id));
    assert_eq!(read_all(&mut to), records(1, 3000));
    assert_eq!(b.store(), b.0.join("store.2"));
    assert!(!b.0.join("store.1").exists());
    // The receiver can serve the snapshot onwards, byte for byte.
    for offset in [0, 5000, id.records_len - 3, id.total_len() - 1] {
        assert_eq!(
            to.read_chunk(&id, offset, 4000).unwrap(),
            from.read_chunk(&id, offset, 4000).unwrap()
        );
    }
    drop(to);
    check_installed(&a, &mut from, &b, &id);
}

#[test]
fn duplicates_disorder_and_corruption_are_survived() {
    let a = TempDir::new("disorder-from");
    let b = TempDir::new("disorder-to");
    let (mut from, id) = sender(&a, 3000);
    let (mut to, _) = Store::open(&b.0).unwrap();
    let chunk = 7_000;
    let send = |from: &mut Store, to: &mut Store, offset: u64| {
        let bytes = from.read_chunk(&id, offset, chunk).unwrap();
        to.receive_chunk(&id, offset, &bytes).unwrap()
    };
    assert_eq!(
        send(&mut from, &mut to, 0),
        Received::Partial { have: 7_000 }
    );
    // A duplicate and a chunk from the future are dropped.
    assert_eq!(
        send(&mut from, &mut to, 0),
        Received::Partial { have: 7_000 }
    );
    assert_eq!(
        send(&mut from, &mut to, 14_000),
        Received::Partial { have: 7_000 }
    );
    assert_eq!(
        send(&mut from, &mut to, 7_000),
        Received::Partial { have: 14_000 }
    );

    // A corrupted chunk (its transport CRC made to match) resets staging to empty.
    let mut bad = from.read_chunk(&id, 14_000, chunk).unwrap();
    bad[100] ^= 0x04;
    let (text, crc) = encode_chunk(&bad);
    let bad = decode_chunk(&text, crc).unwrap();
    assert_eq!(
        to.receive_chunk(&id, 14_000, &bad).unwrap(),
        Received::Partial { have: 0 }
    );
    assert_eq!(to.staged(&id), 0);
    // The transport CRC catches a corruption in flight.
    let (text, crc) = encode_chunk(&from.read_chunk(&id, 0, chunk).unwrap());
    assert!(matches!(
        decode_chunk(&text, crc ^ 1),
        Err(StorageError::BadChunk { .. })
    ));

    // Damaged meta bytes are caught when the meta is complete.
    let mut offset = 0;
    loop {
        let mut bytes = from.read_chunk(&id, offset, chunk).unwrap();
        let last = offset + bytes.len() as u64 == id.total_len();
        if last {
            let n = bytes.len();
            bytes[n - 15] ^= 0x01;
        }
        match to.receive_chunk(&id, offset, &bytes).unwrap() {
            Received::Partial { have } if last => {
                assert_eq!(have, 0);
                break;
            }
            Received::Partial { have } => offset = have,
            Received::Installed { .. } => panic!("installed damaged meta"),
        }
    }
    // The sender goes back to `have`, and the transfer completes.
    let have = to.staged(&id);
    assert!(matches!(
        stream(&mut from, &mut to, &id, have, chunk),
        Received::Installed { .. }
    ));
    drop(to);
    check_installed(&a, &mut from, &b, &id);
}

#[test]
fn a_transfer_resumes_after_the_receiver_restarts() {
    let a = TempDir::new("resume-from");
    let b = TempDir::new("resume-to");
    let (mut from, id) = sender(&a, 3000);
    let (mut to, _) = Store::open(&b.0).unwrap();
    let mut have = 0;
    while have < id.records_len / 2 {
        let bytes = from.read_chunk(&id, have, 5_000).unwrap();
        let Received::Partial { have: now } = to.receive_chunk(&id, have, &bytes).unwrap() else {
            panic!("installed early");
        };
        have = now;
    }
    drop(to);
    // Chunks end mid-line: a restart keeps the whole lines.
    let (to, _) = Store::open(&b.0).unwrap();
    let staged = to.staged(&id);
    assert!(staged <= have && staged + 200 > have, "{staged} vs {have}");
    assert!(staged > 0);
    assert_eq!(
        &b.0.join(INSTALL_DIR)
            .join(RECORDS_FILE)
            .metadata()
            .unwrap()
            .len(),
        &staged
    );

    // A garbage tail (an unsynced write) is cut on reopen.
    drop(to);
    let records_path = b.0.join(INSTALL_DIR).join(RECORDS_FILE);
    let mut bytes = fs::read(&records_path).unwrap();
    bytes.extend_from_slice(&[0; 3000]);
    fs::write(&records_path, &bytes).unwrap();
    let (mut to, _) = Store::open(&b.0).unwrap();
    assert_eq!(to.staged(&id), staged);

    assert!(matches!(
        stream(&mut from, &mut to, &id, staged, 5_000),
        Received::Installed { .. }
    ));
    drop(to);
    check_installed(&a, &mut from, &b, &id);

    // Staging without a readable ID is discarded.
    let c = TempDir::new("resume-lost-id");
    let (mut to, _) = Store::open(&c.0).unwrap();
    let bytes = from.read_chunk(&id, 0, 5_000).unwrap();
    to.receive_chunk(&id, 0, &bytes).unwrap();
    drop(to);
    fs::write(c.0.join(INSTALL_DIR).join(STAGED_ID_FILE), b"{\"index\":").unwrap();
    let (to, _) = Store::open(&c.0).unwrap();
    assert_eq!(to.staged(&id), 0);
    assert!(!c.0.join(INSTALL_DIR).exists());
}

#[test]
fn a_new_snapshot_keeps_the_records_received() {
    let a = TempDir::new("newer-from");
    let b = TempDir::new("newer-to");
    let c = TempDir::new("newer-to-2");
    let (mut from, old) = sender(&a, 1500);
    let (mut to, _) = Store::open(&b.0).unwrap();
    let (mut to2, _) = Store::open(&c.0).unwrap();
    // `to` holds part of the old records; `to2` all of them and part of the old meta.
    let Received::Partial { have } = stream_until(&mut from, &mut to, &old, 20_000) else {
        panic!()
    };
    let Received::Partial { have: have2 } =
        stream_until(&mut from, &mut to2, &old, old.records_len + 10)
    else {
        panic!()
    };
    assert_eq!(have2, old.records_len + 10);

    from.append(&records(1501, 3000)).unwrap();
    let new = snapshot_here(&mut from);
    assert!(matches!(
        refusal(from.read_chunk(&old, 0, 10)),
        Refusal::NotCurrent { .. }
    ));
    assert_eq!(to.staged(&new), have);
    assert_eq!(to2.staged(&new), old.records_len);
    for (store, dir, start) in [(&mut to, &b, have), (&mut to2, &c, old.records_len)] {
        assert!(matches!(
            stream(&mut from, store, &new, start, 6_000),
            Received::Installed { .. }
        ));
        check_installed(&a, &mut from, dir, &new);
    }

    // A snapshot with fewer records than staged starts over.
    let d = TempDir::new("newer-shorter");
    let (mut to3, _) = Store::open(&d.0).unwrap();
    stream_until(&mut from, &mut to3, &new, old.records_len + 100);
    let e = TempDir::new("newer-shorter-from");
    let (mut short, short_id) = sender(&e, 1500);
    assert_eq!(short_id.records_len, old.records_len);
    assert_eq!(to3.staged(&short_id), 0);
    assert!(matches!(
        stream(&mut short, &mut to3, &short_id, 0, 6_000),
        Received::Installed { .. }
    ));
    drop(to3);
    check_installed(&e, &mut short, &d, &short_id);
}

/// Streams `id` in chunks of 5000 bytes until the receiver has at least `until` bytes.
fn stream_until(from: &mut Store, to: &mut Store, id: &SnapshotId, until: u64) -> Received {
    let mut have = 0;
    loop {
        let len = (until - have).min(5_000);
        let bytes = from.read_chunk(id, have, len).unwrap();
        match to.receive_chunk(id, have, &bytes).unwrap() {
            Received::Partial { have: now } if now < until => have = now,
            received => return received,
        }
    }
}

#[test]
fn bad_input_never_panics() {
    let a = TempDir::new("garbage-from");
    let b = TempDir::new("garbage-to");
    let (mut from, id) = sender(&a, 600);
    let (mut to, _) = Store::open(&b.0).unwrap();
    let good = from.read_chunk(&id, 0, id.total_len()).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let have = to.staged(&id);
        let len = (next() % 3000) as usize + 1;
        let end = (have as usize + len).min(good.len());
        let mut bytes = good[have as usize..end].to_vec();
        match round % 3 {
            0 => {
                let i = next() as usize % bytes.len();
                bytes[i] = next() as u8;
            }
            1 => bytes.iter_mut().for_each(|b| *b = next() as u8),
            _ => {}
        }
        let _ = to.receive_chunk(&id, have, &bytes);
    }
    // Impossible IDs and out-of-range chunks are errors, not panics.
    let mut odd = id;
    odd.records_len = u64::MAX;
    assert!(matches!(
        refusal(to.receive_chunk(&odd, 0, b"x")),
        Refusal::ImpossibleLengths { .. }
    ));
    odd = id;
    odd.meta_len = 0;
    assert!(matches!(
        refusal(to.receive_chunk(&odd, 0, b"x")),
        Refusal::ImpossibleLengths { meta_len: 0, .. }
    ));
    for offset in [id.total_len(), u64::MAX] {
        assert_eq!(
            refusal(to.receive_chunk(&id, offset, b"x")),
            Refusal::ChunkPastEnd {
                len: 1,
                offset,
                index: id.index,
                total: id.total_len()
            }
        );
    }
    assert!(matches!(
        decode_chunk("not base64!", 0),
        Err(StorageError::BadChunk { .. })
    ));
    // And a clean transfer still completes.
    let have = to.staged(&id);
    let received = stream(&mut from, &mut to, &id, have, 4_000);
    if to.last_index() != 600 {
        assert!(matches!(received, Received::Installed { .. }));
    }
    assert_eq!(to.last_index(), 600);
}

#[test]
fn open_removes_leftovers_of_an_interrupted_install() {
    let dir = TempDir::new("leftovers");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 20)).unwrap();
    snapshot_here(&mut store);
    drop(store);
    // A crash after renaming install/ to store.2 but before repointing store.current.
    fs::create_dir(dir.0.join("store.2")).unwrap();
    fs::write(dir.0.join("store.2").join(RECORDS_FILE), b"junk").unwrap();
    fs::write(dir.0.join(tmp_name(CURRENT_FILE)), b"store.2\n").unwrap();
    fs::write(dir.0.join("wal"), b"not ours").unwrap();
    let (store, snapshot) = Store::open(&dir.0).unwrap();
    assert_eq!(store.last_index(), 20);
    assert!(snapshot.is_some());
    assert!(!dir.0.join("store.2").exists());
    assert!(!dir.0.join(tmp_name(CURRENT_FILE)).exists());
    assert_eq!(fs::read(dir.0.join("wal")).unwrap(), b"not ours");
    assert_eq!(dir.store(), dir.0.join("store.1"));

    fs::write(dir.0.join(CURRENT_FILE), b"store.x\n").unwrap();
    let err = Store::open(&dir.0).err().unwrap();
    assert!(
        matches!(&err, StorageError::Corrupt { path, .. } if *path == dir.0.join(CURRENT_FILE)),
        "{err}"
    );
}

#[test]
fn a_damaged_or_lost_store_current_never_deletes_the_store() {
    let dir = TempDir::new("lost-current");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 20)).unwrap();
    snapshot_here(&mut store);
    drop(store);
    // A bit flip that names another store: a clear error, and store.1 stays.
    fs::write(dir.0.join(CURRENT_FILE), b"store.3\n").unwrap();
    let err = Store::open(&dir.0).err().unwrap();
    assert!(
        matches!(&err, StorageError::LostStore { store, lost: Lost::Store, .. }
            if *store == dir.0.join("store.3")),
        "{err}"
    );
    assert!(dir.0.join("store.1").join(SNAPSHOT_FILE).exists());
    // Lost altogether: refused, naming the store that holds data.
    fs::remove_file(dir.0.join(CURRENT_FILE)).unwrap();
    let err = Store::open(&dir.0).err().unwrap();
    assert!(
        matches!(&err, StorageError::LostStore { current, store, lost: Lost::Current }
            if *current == dir.0.join(CURRENT_FILE) && *store == dir.0.join("store.1")),
        "{err}"
    );
    assert!(dir.0.join("store.1").join(SNAPSHOT_FILE).exists());
    // Put back, everything is there.
    fs::write(dir.0.join(CURRENT_FILE), b"store.1\n").unwrap();
    let (store, snapshot) = Store::open(&dir.0).unwrap();
    assert_eq!(store.last_index(), 20);
    assert!(snapshot.is_some());
}

#[test]
fn chunks_round_trip_through_base64() {
    for len in [0, 1, 2, 3, 4, 1000, 40_000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        let (text, crc) = encode_chunk(&bytes);
        assert!(text.is_ascii());
        assert_eq!(decode_chunk(&text, crc).unwrap(), bytes);
        assert!(matches!(
            decode_chunk(&text, crc.wrapping_add(1)),
            Err(StorageError::BadChunk { .. })
        ));
    }
}

/// The peer logs these sentences and sends some to clients, so they stay as they were before
/// errors had types.
#[test]
fn errors_print_todays_sentences() {
    let dir = TempDir::new("sentences");
    let (mut store, _) = Store::open(&dir.0).unwrap();
    store.append(&records(1, 20)).unwrap();
    snapshot_here(&mut store);
    let records_path = dir.store().join(RECORDS_FILE);
    let r = records_path.display();
    assert_eq!(
        store.read_page(1, 21, 100).unwrap_err().to_string(),
        format!("{r}: cannot read records 1 to 21: the store holds 1 to 20")
    );
    assert_eq!(
        store.append(&records(22, 22)).unwrap_err().to_string(),
        format!("{r}: cannot append record 22 (term 1) after record 20 (term 1)")
    );
    // Record 2's JSON with a bit flipped: its CRC no longer matches.
    let mut bytes = fs::read(&records_path).unwrap();
    let second = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    bytes[second + 2] ^= 1;
    fs::write(&records_path, &bytes).unwrap();
    let end = second + bytes[second..].iter().position(|&b| b == b'\n').unwrap();
    let said = std::str::from_utf8(&bytes[end - 8..end]).unwrap();
    let got = crc32fast::hash(&bytes[second..end - 9]);
    assert_eq!(
        store.read_page(2, 2, 100).unwrap_err().to_string(),
        format!(
            "{r}: bad line at byte offset {second}: CRC mismatch: the line says {said}, its bytes \
             have {got:08x}"
        )
    );
    drop(store);
    fs::remove_file(dir.0.join(CURRENT_FILE)).unwrap();
    assert_eq!(
        Store::open(&dir.0).err().unwrap().to_string(),
        format!(
            "{} is missing but {} holds records or a snapshot; restore {CURRENT_FILE} (one line \
             naming the store to use, such as store.1) or move the data dir aside",
            dir.0.join(CURRENT_FILE).display(),
            dir.0.join("store.1").display()
        )
    );
    let (text, crc) = encode_chunk(b"chunk");
    assert_eq!(
        decode_chunk(&text, crc ^ 1).unwrap_err().to_string(),
        format!(
            "snapshot chunk: CRC mismatch: sent {:08x}, its 5 bytes have {crc:08x}",
            crc ^ 1
        )
    );
}
