use super::*;
use std::error::Error as _;
use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "raft-storage-test-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
    fn wal(&self) -> PathBuf {
        self.0.join(WAL_FILE)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn data(index: Index, term: u64, text: &str) -> Entry {
    Entry {
        index,
        term,
        payload: Payload::Data {
            client: 0xC0FFEE + index,
            seq: index * 7,
            data: text.to_owned(),
        },
    }
}

fn noop(index: Index, term: u64) -> Entry {
    Entry {
        index,
        term,
        payload: Payload::Noop,
    }
}

fn hs(term: u64, vote: Option<NodeId>, commit: Index) -> HardState {
    HardState { term, vote, commit }
}

fn open(dir: &TempDir) -> (Wal, HardState, Vec<Entry>) {
    Wal::open(&dir.0, 1).unwrap()
}

/// What `result` was refused for; panics unless it is a refusal.
fn refusal<T>(result: Result<T, StorageError>) -> Refusal {
    match result {
        Err(StorageError::Refused { refusal, .. }) => refusal,
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => panic!("not refused"),
    }
}

/// The bytes of the segment at `path` up to where its frames end: the header, then every
/// frame whose header is not all zeros (a preallocated segment is zeros after that).
fn read_wal(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    let mut off = (WAL_HEADER_LEN as usize).min(bytes.len());
    let header = FRAME_HEADER_LEN as usize;
    while off + header <= bytes.len() && bytes[off..off + header].iter().any(|&b| b != 0) {
        let len = u32::from_le_bytes(bytes[off + 24..off + 28].try_into().unwrap());
        off = (off + header + len as usize).min(bytes.len());
    }
    bytes.truncate(off);
    bytes
}

/// The length of `wal` up to where its frames end (see [`read_wal`]).
fn wal_len(dir: &TempDir) -> u64 {
    read_wal(&dir.wal()).len() as u64
}

/// The magic a WAL's header holds.
fn wal_magic(dir: &TempDir) -> u64 {
    let bytes = read_wal(&dir.wal());
    u64::from_le_bytes(bytes[12..20].try_into().unwrap())
}

/// A WAL file header of `version` with `magic`.
fn wal_header(version: u32, magic: u64) -> Vec<u8> {
    let mut header = WAL_SIGNATURE.to_vec();
    header.extend_from_slice(&version.to_le_bytes());
    put_u64(&mut header, magic);
    let crc = crc32fast::hash(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    header
}

/// A complete frame, built as `persist` builds one.
fn frame(magic: u64, offset: u64, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0; FRAME_HEADER_LEN as usize];
    FrameHeader {
        magic,
        offset,
        seq,
        len: payload.len() as u32,
        data_crc: crc32fast::hash(payload),
    }
    .encode(&mut bytes);
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn new_dir_opens_empty_and_records_its_owner() {
    let dir = TempDir::new("new");
    let (s, state, log) = open(&dir);
    assert_eq!(state, HardState::default());
    assert!(log.is_empty());
    assert_eq!(s.last_index(), 0);
    assert_eq!(fs::read_to_string(dir.0.join(NODE_ID_FILE)).unwrap(), "1\n");
    let header = read_wal(&dir.wal());
    assert_eq!(header, wal_header(WAL_VERSION, wal_magic(&dir)));
    assert!(!dir.0.join("wal.tmp").exists());
    drop(s);
    let other = TempDir::new("new-other");
    drop(open(&other));
    assert_ne!(
        wal_magic(&dir),
        wal_magic(&other),
        "each WAL draws its own magic"
    );
}

#[test]
fn round_trip_preserves_hard_state_and_entries() {
    let dir = TempDir::new("round-trip");
    let state = hs(3, Some(2), 2);
    let log = vec![
        noop(1, 1),
        data(2, 1, "hello"),
        data(3, 3, ""),
        data(4, 3, "ünïcødé ✓ \n\"quoted\"\0"),
    ];
    {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&state), &log).unwrap();
        assert_eq!(s.last_index(), 4);
    }
    let (s, got_state, got_log) = open(&dir);
    assert_eq!(got_state, state);
    assert_eq!(got_log, log);
    assert_eq!(s.last_index(), 4);
}

#[test]
fn reopen_then_append_continues_the_log() {
    let dir = TempDir::new("reopen");
    {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&hs(1, Some(1), 0)), &[noop(1, 1)]).unwrap();
        s.persist(None, &[data(2, 1, "a"), data(3, 1, "b")])
            .unwrap();
    }
    {
        let (mut s, state, log) = open(&dir);
        assert_eq!(state, hs(1, Some(1), 0));
        assert_eq!(log.len(), 3);
        s.persist(None, &[data(4, 1, "c")]).unwrap();
        s.persist(Some(&hs(1, Some(1), 4)), &[]).unwrap();
    }
    let (_, state, log) = open(&dir);
    assert_eq!(state, hs(1, Some(1), 4));
    assert_eq!(
        log,
        vec![
            noop(1, 1),
            data(2, 1, "a"),
            data(3, 1, "b"),
            data(4, 1, "c")
        ]
    );
}

#[test]
fn last_hard_state_wins_and_commit_is_clamped_to_the_log() {
    let dir = TempDir::new("hard-state");
    {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&hs(1, Some(2), 0)), &[noop(1, 1), noop(2, 1)])
            .unwrap();
        s.persist(Some(&hs(2, Some(3), 2)), &[]).unwrap();
        s.persist(None, &[noop(3, 2)]).unwrap();
        s.persist(Some(&hs(5, None, 1)), &[]).unwrap();
    }
    assert_eq!(open(&dir).1, hs(5, None, 1));
    {
        let (mut s, _, _) = open(&dir);
        // A commit beyond the durable log cannot be trusted after a restart.
        s.persist(Some(&hs(5, Some(1), 9)), &[]).unwrap();
    }
    assert_eq!(open(&dir).1, hs(5, Some(1), 3));
}

#[test]
fn persisting_nothing_writes_nothing() {
    let dir = TempDir::new("nothing");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &[]).unwrap();
    assert_eq!(wal_len(&dir), WAL_HEADER_LEN);
    s.persist(None, &[noop(1, 1)]).unwrap();
    let len = wal_len(&dir);
    s.persist(None, &[]).unwrap();
    assert_eq!(wal_len(&dir), len);
}

#[test]
fn one_persist_is_one_frame() {
    let dir = TempDir::new("one-frame");
    let (mut s, _, _) = open(&dir);
    let batch = [noop(1, 1), data(2, 1, "xyz")];
    s.persist(Some(&hs(1, None, 0)), &batch).unwrap();
    s.persist(None, &[noop(3, 1)]).unwrap();
    let bytes = read_wal(&dir.wal());
    let magic = wal_magic(&dir);
    let first = WAL_HEADER_LEN as usize;
    let len = u32::from_le_bytes(bytes[first + 24..first + 28].try_into().unwrap()) as usize;
    // hard state (1 + 24) + noop (1 + 17) + data (1 + 17 + 20 + 3)
    assert_eq!(len, 25 + 18 + 41);
    let second = first + FRAME_HEADER_LEN as usize + len;
    assert_eq!(
        bytes[first..second],
        frame(magic, first as u64, 1, &bytes[first + 36..second])
    );
    assert_eq!(
        bytes[second..],
        frame(magic, second as u64, 2, &bytes[second + 36..])
    );
}

#[test]
fn truncation_then_append_survives_reopen() {
    let dir = TempDir::new("truncate");
    let old: Vec<Entry> = (1..=5).map(|i| data(i, 1, "old")).collect();
    {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&hs(1, Some(1), 2)), &old).unwrap();
        // A new leader's entries conflict from index 3 on.
        s.persist(Some(&hs(2, Some(2), 2)), &[data(3, 2, "new")])
            .unwrap();
        assert_eq!(s.last_index(), 3);
    }
    let expected = vec![old[0].clone(), old[1].clone(), data(3, 2, "new")];
    {
        let (mut s, _, log) = open(&dir);
        assert_eq!(log, expected);
        assert_eq!(s.last_index(), 3);
        s.persist(None, &[data(4, 2, "newer")]).unwrap();
    }
    let (mut s, state, log) = open(&dir);
    let mut expected = expected;
    expected.push(data(4, 2, "newer"));
    assert_eq!(log, expected, "the truncated entry 5 must never come back");
    assert_eq!(state, hs(2, Some(2), 2));
    // Truncating to the very first entry works too.
    s.persist(None, &[noop(1, 3)]).unwrap();
    drop(s);
    assert_eq!(open(&dir).2, vec![noop(1, 3)]);
}

#[test]
fn torn_last_frame_is_dropped_at_every_cut() {
    let src = TempDir::new("torn-src");
    let first_batch = vec![noop(1, 1), data(2, 1, "kept")];
    let (kept_len, full) = {
        let (mut s, _, _) = open(&src);
        s.persist(Some(&hs(1, Some(1), 1)), &first_batch).unwrap();
        let kept_len = wal_len(&src) as usize;
        s.persist(
            Some(&hs(2, Some(2), 2)),
            &[data(2, 2, "lost"), data(3, 2, "also lost"), noop(4, 2)],
        )
        .unwrap();
        (kept_len, read_wal(&src.wal()))
    };
    for cut in kept_len..full.len() {
        let dir = TempDir::new("torn");
        drop(open(&dir));
        fs::write(dir.wal(), &full[..cut]).unwrap();
        let (mut s, state, log) =
            Wal::open(&dir.0, 1).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(state, hs(1, Some(1), 1), "cut at {cut}");
        assert_eq!(log, first_batch, "cut at {cut}");
        assert_eq!(wal_len(&dir), kept_len as u64, "cut at {cut}");
        s.persist(None, &[data(3, 1, "after")]).unwrap();
        drop(s);
        let (_, _, log) = open(&dir);
        assert_eq!(log.len(), 3, "cut at {cut}");
        assert_eq!(log[2], data(3, 1, "after"), "cut at {cut}");
    }
}

#[test]
fn segments_are_preallocated_and_frames_overwrite_the_zeros() {
    let dir = TempDir::new("prealloc");
    let file_len = |path: &Path| fs::metadata(path).unwrap().len();
    let log = [noop(1, 1), data(2, 1, "x"), data(3, 1, "y")];
    {
        let (mut s, _, _) = open(&dir);
        assert_eq!(file_len(&dir.wal()), SEGMENT_PREALLOC);
        s.persist(Some(&hs(1, Some(1), 0)), &log[..2]).unwrap();
        assert_eq!(
            file_len(&dir.wal()),
            SEGMENT_PREALLOC,
            "appended, not written in place"
        );
    }
    // Reopening ends at the zeros without calling them torn or cutting them off, and
    // writes continue in place.
    let (mut s, hard_state, got) = open(&dir);
    assert_eq!((hard_state.vote, got), (Some(1), log[..2].to_vec()));
    assert_eq!(file_len(&dir.wal()), SEGMENT_PREALLOC);
    s.persist(None, &log[2..]).unwrap();
    s.rotate(&hs(1, Some(1), 3), (3, 1)).unwrap();
    assert_eq!(file_len(&segment(&dir, 1)), SEGMENT_PREALLOC);
    s.persist(None, &[data(4, 1, "z")]).unwrap();
    drop(s);
    // Both segments end in zeros; replay reads through the older one into the newer.
    let (s, _, got) = open(&dir);
    assert_eq!(got.last().map(|e| e.index), Some(4));
    assert_eq!(s.last_index(), 4);
    assert_eq!(file_len(&dir.wal()), SEGMENT_PREALLOC);
    assert_eq!(file_len(&segment(&dir, 1)), SEGMENT_PREALLOC);
}

fn indices(log: &[Entry]) -> Vec<Index> {
    log.iter().map(|e| e.index).collect()
}

#[test]
fn a_rotation_takes_the_prepared_segment_or_creates_one_without_it() {
    let dir = TempDir::new("prepared");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &[noop(1, 1)]).unwrap();
    assert_eq!(s.next_segment_number(), 1);
    assert!(prepare_segment(&Fs::Real, &dir.0, 1).unwrap());
    assert!(!dir.0.join(SPARE_FILE).exists());
    let prepared = fs::read(segment(&dir, 1)).unwrap();
    assert_eq!(prepared.len() as u64, SEGMENT_PREALLOC);
    s.rotate_using(&hs(1, None, 1), (1, 1), true).unwrap();
    assert_eq!(
        fs::read(segment(&dir, 1)).unwrap(),
        prepared,
        "the first frame waits for the next persist"
    );
    s.persist(None, &[noop(2, 1)]).unwrap();
    assert_eq!(
        s.segment_len(),
        read_wal(&segment(&dir, 1)).len() as u64,
        "the persist wrote the first frame"
    );
    // Not prepared this time: the segment is created as by `rotate`, and a segment in use
    // is never replaced by a late preparation.
    s.rotate_using(&hs(1, None, 2), (2, 1), true).unwrap();
    assert!(!prepare_segment(&Fs::Real, &dir.0, 2).unwrap());
    s.persist(None, &[noop(3, 1)]).unwrap();
    drop(s);
    for n in [1, 2] {
        assert_eq!(
            fs::metadata(segment(&dir, n)).unwrap().len(),
            SEGMENT_PREALLOC
        );
    }
    // A spare file left by a crash is deleted at open; the log is whole.
    fs::write(dir.0.join(SPARE_FILE), b"half made").unwrap();
    let (s, _, got) = open(&dir);
    assert!(!dir.0.join(SPARE_FILE).exists());
    assert_eq!(indices(&got), [1, 2, 3]);
    assert_eq!(s.last_index(), 3);
}

#[test]
fn a_prepared_segment_never_written_to_is_deleted_at_open() {
    let dir = TempDir::new("unused");
    let (mut s, _, _) = open(&dir);
    s.persist(Some(&hs(1, Some(1), 0)), &log_of(1..=3, 1))
        .unwrap();
    // Prepared and not taken: a crash while the node still writes segment 0.
    assert!(prepare_segment(&Fs::Real, &dir.0, 1).unwrap());
    drop(s);
    let (mut s, state, got) = open(&dir);
    assert!(!segment(&dir, 1).exists());
    assert_eq!((state.vote, indices(&got)), (Some(1), vec![1, 2, 3]));
    // Taken, but a crash came before the next persist wrote its first frame; the one
    // after it was prepared too. Compaction kept the segment before them.
    assert!(prepare_segment(&Fs::Real, &dir.0, 1).unwrap());
    s.rotate_using(&hs(1, Some(1), 3), (3, 1), true).unwrap();
    assert!(prepare_segment(&Fs::Real, &dir.0, 2).unwrap());
    assert!(s.compact_later(3).unwrap().is_empty());
    drop(s);
    let (mut s, state, got) = open(&dir);
    assert!(!segment(&dir, 1).exists() && !segment(&dir, 2).exists());
    assert_eq!((state.vote, indices(&got)), (Some(1), vec![1, 2, 3]));
    // Once the first frame is written, the segment replaces the ones before it.
    assert!(prepare_segment(&Fs::Real, &dir.0, 1).unwrap());
    s.rotate_using(&hs(1, Some(1), 3), (3, 1), true).unwrap();
    s.persist(None, &[data(4, 1, "four")]).unwrap();
    assert_eq!(s.compact(3).unwrap(), 1);
    drop(s);
    let (s, _, got) = open(&dir);
    assert_eq!((s.base(), indices(&got)), ((3, 1), vec![4]));
}

#[test]
fn a_torn_first_frame_in_a_prepared_segment_is_dropped_only_if_nothing_follows() {
    let src = TempDir::new("torn-first-src");
    let (before, after) = {
        let (mut s, _, _) = open(&src);
        s.persist(None, &log_of(1..=2, 1)).unwrap();
        assert!(prepare_segment(&Fs::Real, &src.0, 1).unwrap());
        s.rotate_using(&hs(1, None, 2), (2, 1), true).unwrap();
        s.persist(None, &log_of(3..=3, 1)).unwrap();
        let before = fs::read(segment(&src, 1)).unwrap();
        s.persist(None, &log_of(4..=4, 1)).unwrap();
        (before, fs::read(segment(&src, 1)).unwrap())
    };
    let first_end = before.iter().rposition(|&b| b != 0).unwrap() + 1;
    let frame1 = WAL_HEADER_LEN as usize..first_end;
    let setup = |name: &str, bytes: &[u8]| {
        let dir = TempDir::new(name);
        fs::create_dir_all(&dir.0).unwrap();
        fs::copy(src.wal(), dir.wal()).unwrap();
        fs::copy(src.0.join(NODE_ID_FILE), dir.0.join(NODE_ID_FILE)).unwrap();
        fs::write(segment(&dir, 1), bytes).unwrap();
        dir
    };
    // Half the first frame reached the disk: the segment holds nothing synced.
    let mut torn = before.clone();
    torn[frame1.start + frame1.len() / 2..].fill(0);
    let dir = setup("torn-first", &torn);
    let (_, _, got) = open(&dir);
    assert_eq!(indices(&got), [1, 2]);
    assert!(!segment(&dir, 1).exists());
    // Damage in the first frame with the second frame intact after it: it was synced, so
    // this is corruption, never silently dropped.
    let mut damaged = after.clone();
    damaged[frame1.start + 40] ^= 1;
    let dir = setup("damaged-first", &damaged);
    let err = Wal::open(&dir.0, 1).err().expect("corruption refused");
    assert!(
        matches!(&err, StorageError::Wal {
            path,
            problem: WalProblem::Damaged { offset: WAL_HEADER_LEN, not_torn: NotTorn::LaterFrame { .. }, .. },
        } if *path == segment(&dir, 1)),
        "{err}"
    );
    // As the only segment left there is nothing older it could replace: corruption too.
    let dir = TempDir::new("torn-alone");
    fs::create_dir_all(&dir.0).unwrap();
    fs::copy(src.0.join(NODE_ID_FILE), dir.0.join(NODE_ID_FILE)).unwrap();
    fs::write(segment(&dir, 1), &torn).unwrap();
    let err = Wal::open(&dir.0, 1).err().expect("corruption refused");
    assert!(
        matches!(&err, StorageError::Wal {
            path,
            problem: WalProblem::Damaged { offset: WAL_HEADER_LEN, not_torn: NotTorn::OnlySegment, .. },
        } if *path == segment(&dir, 1)),
        "{err}"
    );
}

#[test]
fn a_zero_segment_between_others_is_deleted_at_open() {
    let dir = TempDir::new("zero-middle");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &log_of(1..=2, 1)).unwrap();
    // A preparation of segment 1 that came after the node thread made and then compacted
    // its own segment 1 leaves only zeros between segments.
    s.rotate(&hs(1, None, 2), (2, 1)).unwrap();
    s.persist(None, &log_of(3..=3, 1)).unwrap();
    s.rotate(&hs(1, None, 3), (3, 1)).unwrap();
    s.persist(None, &log_of(4..=4, 1)).unwrap();
    assert_eq!(s.compact(3).unwrap(), 2);
    assert!(prepare_segment(&Fs::Real, &dir.0, 1).unwrap());
    drop(s);
    let (_, _, got) = open(&dir);
    assert!(!segment(&dir, 1).exists());
    assert_eq!(indices(&got), [4]);
}

#[test]
fn an_install_writes_the_first_frame_at_once() {
    let dir = TempDir::new("install-first");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &log_of(1..=2, 1)).unwrap();
    assert!(prepare_segment(&Fs::Real, &dir.0, 1).unwrap());
    s.rotate_using(&hs(2, None, 10), (10, 2), true).unwrap();
    s.write_first_frame().unwrap();
    let len = s.segment_len();
    s.write_first_frame().unwrap();
    assert_eq!(s.segment_len(), len, "written once");
    assert_eq!(s.compact(10).unwrap(), 1);
    drop(s);
    let (s, state, got) = open(&dir);
    assert_eq!((s.base(), state.commit, got.len()), ((10, 2), 10, 0));
}

#[test]
fn a_segment_outgrowing_its_preallocation_is_appended_to() {
    let dir = TempDir::new("outgrow");
    let big = "b".repeat(1 << 20);
    let entries: Vec<Entry> = (1..=4).map(|i| data(i, 1, &big)).collect();
    {
        let (mut s, _, _) = open(&dir);
        for e in &entries {
            s.persist(None, std::slice::from_ref(e)).unwrap();
        }
    }
    assert!(fs::metadata(dir.wal()).unwrap().len() > SEGMENT_PREALLOC);
    assert_eq!(open(&dir).2, entries);
}

#[test]
fn zero_filled_tail_is_the_end_and_zeros_after_a_header_are_torn() {
    let dir = TempDir::new("zeros");
    let log = vec![noop(1, 1), data(2, 1, "x")];
    let (good_len, last_frame_start) = {
        let (mut s, _, _) = open(&dir);
        s.persist(None, &log[..1]).unwrap();
        let start = wal_len(&dir);
        s.persist(None, &log[1..]).unwrap();
        (wal_len(&dir), start)
    };
    let good = read_wal(&dir.wal());

    // Zeros after the last good frame (a preallocated segment, or one a file system
    // extended): the end, kept as it is.
    let mut bytes = good.clone();
    bytes.extend_from_slice(&[0; 4096]);
    fs::write(dir.wal(), &bytes).unwrap();
    let (mut s, _, got) = open(&dir);
    assert_eq!(got, log);
    assert_eq!(wal_len(&dir), good_len);
    assert_eq!(fs::read(dir.wal()).unwrap(), bytes, "open must not modify");
    s.persist(None, &[noop(3, 1)]).unwrap();
    drop(s);
    assert_eq!(open(&dir).2.len(), 3);

    // A last frame whose payload never reached the disk: its header, then zeros.
    let mut bytes = good.clone();
    bytes[last_frame_start as usize + FRAME_HEADER_LEN as usize..].fill(0);
    bytes.extend_from_slice(&[0; 100]);
    fs::write(dir.wal(), &bytes).unwrap();
    let (_, _, got) = open(&dir);
    assert_eq!(got, log[..1]);
    assert_eq!(wal_len(&dir), last_frame_start);
}

#[test]
fn flipped_bit_in_a_middle_frame_is_an_error_naming_its_offset() {
    let dir = TempDir::new("bitflip");
    let (start, end) = {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&hs(1, None, 0)), &[noop(1, 1)]).unwrap();
        let start = wal_len(&dir) as usize;
        s.persist(Some(&hs(1, Some(1), 1)), &[data(2, 1, "middle")])
            .unwrap();
        let end = wal_len(&dir) as usize;
        s.persist(None, &[data(3, 1, "last")]).unwrap();
        (start, end)
    };
    let good = read_wal(&dir.wal());
    // Every bit of the middle frame: header (length and CRC) and payload alike.
    for bit in start * 8..end * 8 {
        let mut bytes = good.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        fs::write(dir.wal(), &bytes).unwrap();
        let err = match Wal::open(&dir.0, 1) {
            Ok((_, _, log)) => panic!("bit {bit} flipped, yet open succeeded: {log:?}"),
            Err(e) => e,
        };
        assert!(
            matches!(&err, StorageError::Wal {
                path,
                problem: WalProblem::Damaged { offset, not_torn: NotTorn::LaterFrame { at }, .. },
            } if *path == dir.wal() && *offset == start as u64 && *at == end as u64),
            "bit {bit}: {err}"
        );
        assert_eq!(fs::read(dir.wal()).unwrap(), bytes, "open must not modify");
    }
}

#[test]
fn undecodable_payload_with_a_valid_crc_is_an_error() {
    let dir = TempDir::new("undecodable");
    drop(open(&dir));
    let mut bytes = read_wal(&dir.wal());
    bytes.extend(frame(
        wal_magic(&dir),
        WAL_HEADER_LEN,
        1,
        &[RECORD_ENTRY, 1, 0, 0],
    ));
    fs::write(dir.wal(), &bytes).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(
            err,
            StorageError::Wal {
                problem: WalProblem::BadRecord {
                    frame: WAL_HEADER_LEN,
                    problem: RecordProblem::Truncated { .. },
                    ..
                },
                ..
            }
        ),
        "{err}"
    );

    // An index gap is corruption too.
    let mut payload = Vec::new();
    encode_entry(&mut payload, &noop(2, 1)).unwrap();
    bytes.truncate(WAL_HEADER_LEN as usize);
    bytes.extend(frame(wal_magic(&dir), WAL_HEADER_LEN, 1, &payload));
    fs::write(dir.wal(), &bytes).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(
            err,
            StorageError::Wal {
                problem: WalProblem::BadRecord {
                    problem: RecordProblem::NotNext { index: 2, last: 0 },
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn intact_frame_out_of_sequence_is_an_error() {
    let dir = TempDir::new("sequence");
    drop(open(&dir));
    let magic = wal_magic(&dir);
    let mut one = Vec::new();
    encode_entry(&mut one, &noop(1, 1)).unwrap();
    let mut bytes = read_wal(&dir.wal());
    bytes.extend(frame(magic, WAL_HEADER_LEN, 1, &one));
    let second = bytes.len() as u64;
    bytes.extend(frame(magic, second, 3, &one));
    fs::write(dir.wal(), &bytes).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(err, StorageError::Wal {
            problem: WalProblem::OutOfSequence { offset, found: 3, due: 2 },
            ..
        } if offset == second),
        "{err}"
    );
}

/// Builds a WAL whose magic is `magic` holding entries 1 and 2 in one frame, then a frame
/// with entry 3 whose data embeds `forge(offset)`, where `offset` is where in the file the
/// forged bytes will lie. Returns the file's bytes and where the last frame starts.
fn wal_with_forged_data(
    dir: &TempDir,
    magic: u64,
    forge: impl Fn(u64) -> Vec<u8>,
) -> (Vec<u8>, usize) {
    drop(open(dir));
    fs::write(dir.wal(), wal_header(WAL_VERSION, magic)).unwrap();
    let (mut s, _, _) = open(dir);
    s.persist(None, &[noop(1, 1), data(2, 1, "kept")]).unwrap();
    let start = wal_len(dir);
    // The data of entry 3 starts after the frame header and the entry's own fields.
    let data_at = start + FRAME_HEADER_LEN + 1 + 17 + 20;
    // Place the forgery where its offset's bytes are ASCII, so it can be UTF-8.
    let at = (data_at + 1..).find(|at| at & !0x7f7f == 0).unwrap();
    let mut text = "<".repeat((at - data_at) as usize).into_bytes();
    text.extend(forge(at));
    text.extend_from_slice(b"> and the rest of the entry");
    let text = String::from_utf8(text).expect("the forgery is UTF-8");
    s.persist(None, &[data(3, 1, &text)]).unwrap();
    drop(s);
    (read_wal(&dir.wal()), start as usize)
}

/// A frame from `frame`, its payload varied until all its bytes are UTF-8 (its other
/// fields must be ASCII for that to be possible).
fn utf8_frame(magic: u64, offset: u64, seq: u64) -> Vec<u8> {
    (0u32..)
        .map(|n| frame(magic, offset, seq, format!("forged {n:08}").as_bytes()))
        .find(|f| std::str::from_utf8(f).is_ok())
        .unwrap()
}

#[test]
fn only_a_header_with_this_wals_magic_and_its_own_offset_is_taken_for_a_frame() {
    // ASCII, so that frames carrying it can be embedded in an entry's data.
    let magic = u64::from_le_bytes(*b"m4g1c-wl");
    let guess = u64::from_le_bytes(*b"guessed!");

    // What a client could put in its data: a copy of a frame of ours (wrong offset), or a
    // frame at its own offset with the next seq but without the magic, which it never sees.
    let src = TempDir::new("forged-src");
    let (full, start) = wal_with_forged_data(&src, magic, |at| {
        let mut forged = utf8_frame(magic, WAL_HEADER_LEN, 1);
        forged.extend(utf8_frame(guess, at + forged.len() as u64, 3));
        forged
    });
    for cut in start..full.len() {
        let dir = TempDir::new("forged");
        drop(open(&dir));
        fs::write(dir.wal(), &full[..cut]).unwrap();
        let (_, _, log) = Wal::open(&dir.0, 1).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(log, vec![noop(1, 1), data(2, 1, "kept")], "cut at {cut}");
        assert_eq!(wal_len(&dir), start as u64, "cut at {cut}");
    }

    // The check relies on the magic alone staying secret: with it, the scan does see the
    // forgery, so a torn tail is then taken for damage.
    let src = TempDir::new("forged-with-magic");
    let (full, start) = wal_with_forged_data(&src, magic, |at| utf8_frame(magic, at, 3));
    let forged_at = full
        .windows(8)
        .rposition(|w| w == magic.to_le_bytes())
        .unwrap();
    fs::write(src.wal(), &full[..full.len() - 1]).unwrap();
    let err = Wal::open(&src.0, 1).err().unwrap();
    // The header is intact (the damage is to the payload), and the forgery is taken for a
    // frame written after it.
    assert!(
        matches!(&err, StorageError::Wal {
            problem: WalProblem::Damaged { offset, damage, not_torn: NotTorn::LaterFrame { at } },
            ..
        } if *offset == start as u64 && damage.starts_with("frame of") && *at == forged_at as u64),
        "{err}"
    );
}

#[test]
fn damage_before_a_torn_last_frame_is_an_error() {
    let dir = TempDir::new("damage-then-torn");
    let (second, third) = {
        let (mut s, _, _) = open(&dir);
        s.persist(None, &[noop(1, 1)]).unwrap();
        let second = wal_len(&dir) as usize;
        s.persist(None, &[data(2, 1, "damaged")]).unwrap();
        let third = wal_len(&dir) as usize;
        s.persist(None, &[data(3, 1, "torn")]).unwrap();
        (second, third)
    };
    let mut bytes = read_wal(&dir.wal());
    bytes[third - 1] ^= 1;
    bytes.truncate(bytes.len() - 2);
    fs::write(dir.wal(), &bytes).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(err, StorageError::Wal {
            problem: WalProblem::Damaged { offset, not_torn: NotTorn::LaterFrame { at }, .. },
            ..
        } if offset == second as u64 && at == third as u64),
        "{err}"
    );
}

#[test]
fn a_frame_after_damage_is_found_across_read_chunks() {
    // The frame after the damaged one starts near the end of the scan's first chunk, so
    // its header straddles two reads.
    for before_boundary in [
        0,
        1,
        10,
        FRAME_HEADER_LEN as usize - 1,
        FRAME_HEADER_LEN as usize,
    ] {
        let dir = TempDir::new("chunks");
        let (second, third) = {
            let (mut s, _, _) = open(&dir);
            s.persist(None, &[noop(1, 1)]).unwrap();
            let second = wal_len(&dir) as usize;
            // The scan starts one byte into the damaged frame.
            let frame_len = READ_BUFFER + 1 - before_boundary;
            let data_len = frame_len - FRAME_HEADER_LEN as usize - (1 + 17 + 20);
            s.persist(None, &[data(2, 1, &"d".repeat(data_len))])
                .unwrap();
            let third = wal_len(&dir) as usize;
            assert_eq!(third - second, frame_len);
            s.persist(None, &[noop(3, 1)]).unwrap();
            (second, third)
        };
        let mut bytes = read_wal(&dir.wal());
        bytes[second + 100] ^= 1;
        fs::write(dir.wal(), &bytes).unwrap();
        let err = Wal::open(&dir.0, 1).err().unwrap();
        assert!(
            matches!(err, StorageError::Wal {
                problem: WalProblem::Damaged { offset, not_torn: NotTorn::LaterFrame { at }, .. },
                ..
            } if offset == second as u64 && at == third as u64),
            "{before_boundary}: {err}"
        );
    }
}

#[test]
fn wal_of_another_format_is_refused_naming_the_file() {
    let dir = TempDir::new("format");
    drop(open(&dir));
    let magic = wal_magic(&dir);
    // A version 1 WAL: frames of `len, crc, payload` from the first byte on.
    let mut payload = Vec::new();
    encode_entry(&mut payload, &noop(1, 1)).unwrap();
    let mut v1 = (payload.len() as u32).to_le_bytes().to_vec();
    v1.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    v1.extend_from_slice(&payload);
    let mut flipped = wal_header(WAL_VERSION, magic);
    flipped[15] ^= 4;
    let no_header: fn(&WalProblem) -> bool = |p| matches!(p, WalProblem::NoHeader);
    let cases = [
        ("version 1", v1, no_header),
        ("empty", Vec::new(), no_header),
        (
            "short header",
            wal_header(WAL_VERSION, magic)[..20].to_vec(),
            no_header,
        ),
        ("version 3", wal_header(3, magic), |p| {
            matches!(p, WalProblem::Version(3))
        }),
        ("damaged header", flipped, |p| {
            matches!(p, WalProblem::HeaderCrc)
        }),
    ];
    for (what, bytes, expected) in cases {
        fs::write(dir.wal(), &bytes).unwrap();
        let err = Wal::open(&dir.0, 1).err().unwrap();
        assert!(
            matches!(&err, StorageError::Wal { path, problem } if *path == dir.wal()
                && expected(problem)),
            "{what}: {err}"
        );
        assert_eq!(
            fs::read(dir.wal()).unwrap(),
            bytes,
            "{what}: open must not modify"
        );
    }
}

#[test]
fn wrong_node_id_is_refused() {
    let dir = TempDir::new("node-id");
    drop(open(&dir));
    let err = Wal::open(&dir.0, 2).err().unwrap();
    assert!(
        matches!(&err, StorageError::WrongNode { dir: d, path, found: 1, expected: 2 }
            if *d == dir.0 && *path == dir.0.join(NODE_ID_FILE)),
        "{err}"
    );
    assert!(Wal::open(&dir.0, 1).is_ok());
}

#[test]
fn wal_without_node_id_is_refused() {
    let dir = TempDir::new("no-node-id");
    drop(open(&dir));
    fs::remove_file(dir.0.join(NODE_ID_FILE)).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(&err, StorageError::NoNodeId { dir: d } if *d == dir.0),
        "{err}"
    );
}

#[test]
fn second_open_of_a_locked_dir_is_refused() {
    let dir = TempDir::new("lock");
    let first = open(&dir);
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(&err, StorageError::Locked { dir: d } if *d == dir.0),
        "{err}"
    );
    drop(first);
    assert!(
        Wal::open(&dir.0, 1).is_ok(),
        "dropping Wal releases the lock"
    );
}

#[test]
fn batches_replay_would_reject_are_refused() {
    let dir = TempDir::new("refuse");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &[noop(1, 1)]).unwrap();
    let append = |index| Refusal::Append {
        index,
        base: 0,
        last: 1,
    };
    assert_eq!(refusal(s.persist(None, &[noop(3, 1)])), append(3));
    assert_eq!(refusal(s.persist(None, &[noop(0, 1)])), append(0));
    assert_eq!(
        refusal(s.persist(None, &[noop(2, 1), noop(4, 1)])),
        Refusal::NotConsecutive { index: 4, after: 2 }
    );
    assert_eq!(
        refusal(s.persist(Some(&hs(1, Some(0), 0)), &[])),
        Refusal::VoteForNodeZero
    );
    // Nothing was written, and the storage still works.
    s.persist(None, &[noop(2, 1)]).unwrap();
    drop(s);
    assert_eq!(open(&dir).2, vec![noop(1, 1), noop(2, 1)]);
}

fn segment(dir: &TempDir, number: u64) -> PathBuf {
    segment_path(&dir.0, number)
}

fn log_of(range: std::ops::RangeInclusive<Index>, term: u64) -> Vec<Entry> {
    range.map(|i| data(i, term, &format!("e{i}"))).collect()
}

#[test]
fn segment_names_are_numbered_numerically() {
    assert_eq!(segment_number("wal"), Some(0));
    assert_eq!(segment_number("wal.1"), Some(1));
    assert_eq!(segment_number("wal.10"), Some(10));
    for name in [
        "wal.",
        "wal.0",
        "wal.01",
        "wal.tmp",
        "wal.1.tmp",
        "wal.x",
        "wal1",
    ] {
        assert_eq!(segment_number(name), None, "{name}");
    }
    let dir = TempDir::new("names");
    fs::create_dir_all(&dir.0).unwrap();
    for name in [
        "wal",
        "wal.10",
        "wal.9",
        "wal.2",
        "wal.3.tmp",
        "wal.tmp",
        "node_id",
    ] {
        fs::write(dir.0.join(name), b"").unwrap();
    }
    let (numbers, mut leftovers) = list_segments(&Fs::Real, &dir.0).unwrap();
    assert_eq!(numbers, vec![0, 2, 9, 10]);
    leftovers.sort();
    assert_eq!(
        leftovers,
        vec![dir.0.join("wal.3.tmp"), dir.0.join("wal.tmp")]
    );
}

#[test]
fn rotate_at_the_last_entry_keeps_the_log() {
    let dir = TempDir::new("rotate-keep");
    let log = log_of(1..=5, 2);
    {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&hs(2, Some(1), 3)), &log).unwrap();
        s.rotate(&hs(2, Some(1), 4), (5, 2)).unwrap();
        assert_eq!((s.base(), s.last_index()), ((0, 0), 5));
        assert!(segment(&dir, 1).exists());
        assert!(!dir.0.join("wal.1.tmp").exists());
    }
    let (mut s, state, got) = open(&dir);
    assert_eq!(state, hs(2, Some(1), 4));
    assert_eq!(got, log);
    assert_eq!((s.base(), s.last_index()), ((0, 0), 5));
    // Later writes go to the new segment, and a second rotation numbers the next one.
    let wal_before = read_wal(&dir.wal());
    s.persist(None, &[data(6, 2, "six")]).unwrap();
    assert_eq!(read_wal(&dir.wal()), wal_before);
    s.rotate(&hs(3, None, 6), (6, 2)).unwrap();
    s.persist(None, &[data(7, 3, "seven")]).unwrap();
    drop(s);
    let (s, state, got) = open(&dir);
    assert_eq!(state, hs(3, None, 6));
    assert_eq!(got.len(), 7);
    assert_eq!(got[6], data(7, 3, "seven"));
    assert_eq!(
        s.segments.iter().map(|s| s.number).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[test]
fn rotate_to_an_earlier_entry_of_the_log_truncates_it() {
    let dir = TempDir::new("rotate-truncate");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &log_of(1..=3, 1)).unwrap();
    s.persist(None, &log_of(4..=6, 2)).unwrap();
    s.rotate(&hs(2, None, 0), (4, 2)).unwrap();
    assert_eq!((s.base(), s.last_index()), ((0, 0), 4));
    // A term the log does not hold there: a reset.
    s.rotate(&hs(2, None, 0), (3, 2)).unwrap();
    assert_eq!((s.base(), s.last_index()), ((3, 2), 3));
    assert_eq!(
        refusal(s.rotate(&hs(2, None, 0), (2, 1))),
        Refusal::RotateBelowBase { index: 2, base: 3 }
    );
    drop(s);
    let (s, _, got) = open(&dir);
    assert!(got.is_empty());
    assert_eq!((s.base(), s.last_index()), ((3, 2), 3));
}

#[test]
fn compact_deletes_the_segments_through_the_index_and_reopen_agrees() {
    let dir = TempDir::new("compact");
    let (mut s, _, _) = open(&dir);
    s.persist(Some(&hs(1, None, 0)), &log_of(1..=10, 1))
        .unwrap();
    s.rotate(&hs(1, None, 8), (10, 1)).unwrap();
    s.persist(None, &log_of(11..=20, 2)).unwrap();
    s.rotate(&hs(2, None, 18), (20, 2)).unwrap();
    s.persist(None, &log_of(21..=25, 2)).unwrap();

    // Nothing is wholly at or below 9: the first successor's base is 10.
    assert_eq!(s.compact(9).unwrap(), 0);
    assert!(dir.wal().exists());
    assert_eq!(s.compact(15).unwrap(), 1);
    assert!(!dir.wal().exists());
    assert_eq!((s.base(), s.last_index()), ((10, 1), 25));
    drop(s);
    let (mut s, state, got) = open(&dir);
    assert_eq!(state, hs(2, None, 18));
    assert_eq!(got, log_of(11..=25, 2));
    assert_eq!((s.base(), s.last_index()), ((10, 1), 25));

    // The newest segment is never deleted, however far `through` goes.
    assert_eq!(s.compact(1000).unwrap(), 1);
    assert!(!segment(&dir, 1).exists() && segment(&dir, 2).exists());
    assert_eq!((s.base(), s.last_index()), ((20, 2), 25));
    assert_eq!(s.compact(1000).unwrap(), 0);
    s.persist(None, &[data(26, 3, "after")]).unwrap();
    // A conflicting entry above the base still truncates.
    s.persist(None, &[data(22, 3, "conflict")]).unwrap();
    assert!(s.holds((22, 3)) && !s.holds((21, 3)) && s.holds((21, 2)));
    drop(s);
    let (s, _, got) = open(&dir);
    let mut expected = log_of(21..=21, 2);
    expected.push(data(22, 3, "conflict"));
    assert_eq!(got, expected);
    assert_eq!((s.base(), s.last_index()), ((20, 2), 22));
    // A new segment after a gap in the numbers is numbered after the newest.
    drop(s);
    let (mut s, _, _) = open(&dir);
    s.rotate(&hs(3, None, 22), (22, 3)).unwrap();
    assert!(segment(&dir, 3).exists());
}

#[test]
fn installing_an_unrelated_base_empties_the_log() {
    let dir = TempDir::new("install");
    {
        let (mut s, _, _) = open(&dir);
        s.persist(Some(&hs(1, Some(2), 10)), &log_of(1..=10, 1))
            .unwrap();
        s.rotate(&hs(3, Some(2), 50), (50, 3)).unwrap();
        assert_eq!((s.base(), s.last_index()), ((50, 3), 50));
        assert_eq!(s.compact(50).unwrap(), 1);
    }
    assert!(!dir.wal().exists());
    let (mut s, state, got) = open(&dir);
    assert!(got.is_empty());
    assert_eq!(state, hs(3, Some(2), 50));
    assert_eq!((s.base(), s.last_index()), ((50, 3), 50));
    let append = |index| Refusal::Append {
        index,
        base: 50,
        last: 50,
    };
    assert_eq!(refusal(s.persist(None, &[noop(50, 3)])), append(50));
    // A batch must start at 51, the one index from the base + 1 to the last + 1.
    assert_eq!(refusal(s.persist(None, &[noop(52, 3)])), append(52));
    s.persist(None, &[noop(51, 3)]).unwrap();
    drop(s);
    let (s, _, got) = open(&dir);
    assert_eq!(got, vec![noop(51, 3)]);
    assert_eq!((s.base(), s.last_index()), ((50, 3), 51));
}

#[test]
fn a_crash_between_rotate_and_compact_replays_both_segments() {
    let dir = TempDir::new("crash-rotate");
    {
        let (mut s, _, _) = open(&dir);
        s.persist(None, &log_of(1..=10, 1)).unwrap();
        s.rotate(&hs(1, None, 10), (10, 1)).unwrap();
        s.persist(None, &log_of(11..=12, 1)).unwrap();
    }
    let (s, _, got) = open(&dir);
    assert_eq!(got, log_of(1..=12, 1));
    assert_eq!((s.base(), s.last_index()), ((0, 0), 12));
    drop(s);

    // An install: the older segment's entries are replaced by the base.
    let dir = TempDir::new("crash-install");
    {
        let (mut s, _, _) = open(&dir);
        s.persist(None, &log_of(1..=10, 1)).unwrap();
        s.rotate(&hs(3, None, 50), (50, 3)).unwrap();
    }
    let (s, state, got) = open(&dir);
    assert!(got.is_empty());
    assert_eq!(state, hs(3, None, 50));
    assert_eq!((s.base(), s.last_index()), ((50, 3), 50));
    drop(s);

    // A crash before the rename leaves a temporary file, deleted at open.
    fs::write(dir.0.join("wal.2.tmp"), b"raft-wal, half written").unwrap();
    let (mut s, _, got) = open(&dir);
    assert!(got.is_empty());
    assert!(!dir.0.join("wal.2.tmp").exists());
    s.rotate(&hs(3, None, 50), (50, 3)).unwrap();
    assert!(segment(&dir, 2).exists());
}

#[test]
fn torn_tail_is_cut_only_in_the_newest_segment() {
    let dir = TempDir::new("segment-torn");
    let (old_len, new_len) = {
        let (mut s, _, _) = open(&dir);
        s.persist(None, &log_of(1..=3, 1)).unwrap();
        s.persist(None, &log_of(4..=5, 1)).unwrap();
        s.rotate(&hs(1, None, 0), (5, 1)).unwrap();
        let new_len = read_wal(&segment(&dir, 1)).len() as u64;
        s.persist(None, &log_of(6..=7, 1)).unwrap();
        (wal_len(&dir), new_len)
    };
    let newest = read_wal(&segment(&dir, 1));
    let oldest = read_wal(&dir.wal());

    // The newest segment's last frame torn: cut off.
    fs::write(segment(&dir, 1), &newest[..newest.len() - 3]).unwrap();
    let (s, _, got) = open(&dir);
    assert_eq!(got, log_of(1..=5, 1));
    assert_eq!(read_wal(&segment(&dir, 1)).len() as u64, new_len);
    drop(s);

    // The same damage in the older segment is an error naming it.
    fs::write(segment(&dir, 1), &newest).unwrap();
    let torn = &oldest[..oldest.len() - 3];
    fs::write(dir.wal(), torn).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    let frame_at = old_len - (FRAME_HEADER_LEN + 2 * (1 + 17 + 20 + 2));
    assert!(
        matches!(&err, StorageError::Wal {
            path,
            problem: WalProblem::Damaged { offset, not_torn: NotTorn::NotNewest, .. },
        } if *path == dir.wal() && *offset == frame_at),
        "{err}"
    );
    assert_eq!(fs::read(dir.wal()).unwrap(), torn, "open must not modify");

    // The newest segment's first frame torn, or never written, with nothing after it:
    // the segment holds nothing synced and is deleted; the older one still has the log.
    for cut in [WAL_HEADER_LEN as usize + 10, WAL_HEADER_LEN as usize] {
        fs::write(dir.wal(), &oldest).unwrap();
        fs::write(segment(&dir, 1), &newest[..cut]).unwrap();
        let (_, _, got) = open(&dir);
        assert_eq!(got, log_of(1..=5, 1), "cut at {cut}");
        assert!(!segment(&dir, 1).exists(), "cut at {cut}");
    }
}

#[test]
fn an_entry_at_or_below_the_base_in_the_file_is_corruption() {
    let dir = TempDir::new("below-base");
    {
        let (mut s, _, _) = open(&dir);
        s.rotate(&hs(1, None, 5), (5, 1)).unwrap();
    }
    let path = segment(&dir, 1);
    let mut bytes = read_wal(&path);
    let magic = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
    let mut payload = Vec::new();
    encode_entry(&mut payload, &noop(5, 1)).unwrap();
    let at = bytes.len() as u64;
    bytes.extend(frame(magic, at, 2, &payload));
    fs::write(&path, &bytes).unwrap();
    let err = Wal::open(&dir.0, 1).err().unwrap();
    assert!(
        matches!(&err, StorageError::Wal {
            path: p,
            problem: WalProblem::BadRecord {
                frame,
                problem: RecordProblem::AtOrBelowBase { index: 5, base: 5 },
                ..
            },
        } if *p == path && *frame == at),
        "{err}"
    );
}

#[test]
fn a_legacy_single_wal_opens_with_base_zero() {
    let dir = TempDir::new("legacy");
    drop(open(&dir));
    // A WAL as the build before segments wrote it, frame by frame.
    let magic = wal_magic(&dir);
    let mut bytes = wal_header(WAL_VERSION, magic);
    let mut payload = Vec::new();
    encode_hard_state(&mut payload, &hs(4, Some(1), 2));
    for entry in log_of(1..=3, 4) {
        encode_entry(&mut payload, &entry).unwrap();
    }
    bytes.extend(frame(magic, WAL_HEADER_LEN, 1, &payload));
    fs::write(dir.wal(), &bytes).unwrap();
    let (mut s, state, got) = open(&dir);
    assert_eq!(state, hs(4, Some(1), 2));
    assert_eq!(got, log_of(1..=3, 4));
    assert_eq!((s.base(), s.last_index()), ((0, 0), 3));
    s.persist(None, &[noop(4, 4)]).unwrap();
    drop(s);
    assert_eq!(list_segments(&Fs::Real, &dir.0).unwrap().0, vec![0]);
    assert_eq!(open(&dir).2.len(), 4);
}

#[test]
fn compaction_skips_a_segment_whose_base_the_log_was_cut_back_below() {
    let dir = TempDir::new("compact-cut");
    let (mut s, _, _) = open(&dir);
    s.persist(None, &log_of(1..=10, 1)).unwrap();
    s.rotate(&hs(1, None, 5), (10, 1)).unwrap();
    // A new leader replaces entries 8.. (uncommitted), below segment 1's base.
    s.persist(None, &log_of(8..=9, 2)).unwrap();
    s.rotate(&hs(2, None, 7), (9, 2)).unwrap();
    s.persist(None, &log_of(10..=11, 2)).unwrap();
    let mut expected = log_of(1..=7, 1);
    expected.extend(log_of(8..=11, 2));
    assert_eq!(s.compact(8).unwrap(), 0);
    drop(s);
    let (mut s, _, got) = open(&dir);
    assert_eq!(got, expected);
    assert_eq!(s.segments[1].floor, 7, "replay notes the cut too");
    assert!(!s.segments[1].can_be_first() && s.segments[2].can_be_first());

    // A crash midway through compact(9), which deletes segment 1 before segment 0.
    let crashed = TempDir::new("compact-cut-crash");
    fs::create_dir_all(&crashed.0).unwrap();
    for name in [NODE_ID_FILE, "wal", "wal.2"] {
        fs::copy(dir.0.join(name), crashed.0.join(name)).unwrap();
    }
    let (c, _, got) = open(&crashed);
    assert_eq!(got, expected[9..]);
    assert_eq!((c.base(), c.last_index()), ((9, 2), 11));

    // Segment 1 alone could not come first; with segment 2 first, both go.
    assert_eq!(s.compact(9).unwrap(), 2);
    assert_eq!(list_segments(&Fs::Real, &dir.0).unwrap().0, vec![2]);
    assert_eq!((s.base(), s.last_index()), ((9, 2), 11));
    assert!(s.holds((10, 2)) && s.holds((9, 2)) && !s.holds((8, 2)));
    drop(s);
    let (s, _, got) = open(&dir);
    assert_eq!(got, expected[9..]);
    assert_eq!((s.base(), s.last_index()), ((9, 2), 11));
}

/// What a crash must give back: the state as of the last synced write.
#[derive(Clone, Debug)]
struct Durable {
    hard_state: HardState,
    base: (Index, Term),
    entries: Vec<Entry>,
}

impl Durable {
    fn last(&self) -> (Index, Term) {
        self.entries.last().map_or(self.base, |e| (e.index, e.term))
    }
}

/// The files of `src` as a crash would leave them if every write so far reached the disk.
fn crash_image(src: &Path, name: &str) -> TempDir {
    let dir = TempDir::new(name);
    fs::create_dir_all(&dir.0).unwrap();
    for item in fs::read_dir(src).unwrap() {
        let item = item.unwrap();
        if item.file_type().unwrap().is_file() {
            fs::copy(item.path(), dir.0.join(item.file_name())).unwrap();
        }
    }
    dir
}

/// Opens `dir` and checks it gives `want`'s term, vote and log; a base above `want`'s is
/// fine where the log held that entry (a compaction that had run).
fn opens_to(dir: &TempDir, want: &Durable) -> Result<(), String> {
    let (s, hard_state, got) = Wal::open(&dir.0, 1).map_err(|e| format!("refused: {e}"))?;
    let base = s.base();
    let expected: Vec<Entry> = want
        .entries
        .iter()
        .filter(|e| e.index > base.0)
        .cloned()
        .collect();
    let base_ok = base == want.base
        || (base.0 > want.base.0 && want.entries.iter().any(|e| (e.index, e.term) == base));
    let same = (hard_state.term, hard_state.vote) == (want.hard_state.term, want.hard_state.vote)
        && s.last_index() == want.last().0
        && got == expected;
    match base_ok && same {
        true => Ok(()),
        false => Err(format!(
            "opened to base {base:?}, hard state {hard_state:?}, {} entries; expected base \
             {:?}, hard state {:?}, last index {}",
            got.len(),
            want.base,
            want.hard_state,
            want.last().0
        )),
    }
}

/// Where a random compaction reaches: often everything, as right after a rotation.
fn through(rng: &mut crate::raft::rng::Rng, s: &Wal) -> Index {
    match rng.chance(0.5) {
        true => s.last_index(),
        false => rng.below(s.last_index() + 1),
    }
}

/// One random run against the WAL: persists (appends, conflicts, hard states), segments
/// prepared (also late, for numbers already used), rotations into them or not, compactions
/// now or deferred as the snapshot thread defers them, installs. After every step a crash
/// image must open to what was synced; after every persist, so must one in which a random
/// range of the new frame never reached the disk (to the state before or after it).
/// Returns (persists, rotations into prepared segments, compactions, installs).
fn crash_model_run(seed: u64, steps: usize) -> [u64; 4] {
    use crate::raft::rng::Rng;
    let mut rng = Rng::new(seed);
    let dir = TempDir::new(&format!("model-{seed}"));
    let (mut s, _, _) = open(&dir);
    let mut now = Durable {
        hard_state: HardState::default(),
        base: (0, 0),
        entries: Vec::new(),
    };
    let mut synced = now.clone();
    let (mut term, mut prepared, mut counts) = (1, 0, [0; 4]);
    let mut deferred: Vec<Vec<PathBuf>> = Vec::new();
    for step in 0..steps {
        let op = rng.below(100);
        let at = format!("seed {seed} step {step} op {op}");
        if op < 40 {
            let last = now.last().0;
            let lowest = s.base().0 + 1;
            let start = if rng.below(5) == 0 && last >= lowest {
                term += 1;
                rng.range(lowest, last)
            } else {
                last + 1
            };
            let n = rng.below(4);
            let entries: Vec<Entry> = (start..start + n)
                .map(|i| data(i, term, &"x".repeat(rng.below(3000) as usize)))
                .collect();
            let new_last = if n > 0 { start + n - 1 } else { last };
            let hard_state = (n == 0 || rng.chance(0.5)).then(|| {
                let commit = rng.range(now.base.0, new_last);
                hs(term, Some(rng.range(1, 4)), commit)
            });
            let (path, from) = (s.wal_path.clone(), s.segment_len());
            s.persist(hard_state.as_ref(), &entries).unwrap();
            let to = s.segment_len();
            let before = synced.clone();
            if let Some(h) = hard_state {
                now.hard_state = h;
            }
            if let Some(first) = entries.first() {
                now.entries.retain(|e| e.index < first.index);
                now.entries.extend(entries.iter().cloned());
            }
            synced = now.clone();
            if to > from {
                counts[0] += 1;
                let image = crash_image(&dir.0, "model-torn");
                let segment = image.0.join(path.file_name().unwrap());
                let mut bytes = fs::read(&segment).unwrap();
                let cut = rng.range(from, to - 1);
                let end = rng.range(cut + 1, to);
                bytes[cut as usize..end as usize].fill(0);
                fs::write(&segment, &bytes).unwrap();
                if let (Err(e), Err(e2)) = (opens_to(&image, &before), opens_to(&image, &synced)) {
                    panic!(
                        "{at}, bytes {cut}..{end} of {} torn: {e}; {e2}",
                        path.display()
                    );
                }
            }
        } else if op < 55 {
            let next = s.next_segment_number();
            let number = if rng.below(4) == 0 {
                rng.range(1, next)
            } else {
                next
            };
            if prepare_segment(&Fs::Real, &dir.0, number).unwrap() && number == next {
                prepared = number;
            }
        } else if op < 65 {
            let take = prepared == s.next_segment_number();
            synced = now.clone();
            s.rotate_using(&now.hard_state, now.last(), take).unwrap();
            counts[1] += u64::from(take);
        } else if op < 75 {
            deferred.push(s.compact_later(through(&mut rng, &s)).unwrap());
        } else if op < 82 {
            if !deferred.is_empty() {
                counts[2] +=
                    delete_segments(&Fs::Real, &dir.0, &deferred.remove(0)).unwrap() as u64;
            }
        } else if op < 88 {
            counts[2] += s.compact(through(&mut rng, &s)).unwrap() as u64;
        } else if op < 93 {
            s.write_first_frame().unwrap();
            synced = now.clone();
        } else {
            // An install: a base the log does not hold, durable before it is acknowledged.
            counts[3] += 1;
            term += 1;
            let base = (now.last().0 + rng.range(1, 6), term);
            let hard_state = hs(term, now.hard_state.vote, base.0);
            s.rotate_using(&hard_state, base, prepared == s.next_segment_number())
                .unwrap();
            s.write_first_frame().unwrap();
            s.compact(base.0).unwrap();
            now = Durable {
                hard_state,
                base,
                entries: Vec::new(),
            };
            synced = now.clone();
        }
        if let Err(e) = opens_to(&crash_image(&dir.0, "model-crash"), &synced) {
            panic!("{at}: a crash image {e}");
        }
    }
    counts
}

/// Randomized: `WAL_SEEDS` runs (default 3) from `WAL_SEED_OFFSET` (default: from the
/// clock, printed), or just `WAL_SEED`.
#[test]
fn every_crash_image_opens_to_what_was_synced() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let (offset, seeds) = match env("WAL_SEED") {
        Some(seed) => (seed, 1),
        None => {
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            (
                env("WAL_SEED_OFFSET").unwrap_or(clock * 1000),
                env("WAL_SEEDS").unwrap_or(3),
            )
        }
    };
    println!("WAL_SEED_OFFSET={offset} WAL_SEEDS={seeds} (rerun one with WAL_SEED=N)");
    let mut total = [0; 4];
    for seed in offset..offset + seeds {
        println!("WAL_SEED={seed}");
        let counts = crash_model_run(seed, 120);
        for (t, c) in total.iter_mut().zip(counts) {
            *t += c;
        }
    }
    println!("persists, rotations into prepared segments, segments deleted, installs: {total:?}");
    assert!(
        total.iter().all(|&c| c > 0),
        "a run must exercise every operation: {total:?}"
    );
}

/// The peer prints these sentences (tests/durability.rs matches parts of them), so they stay
/// as they were before errors had types.
#[test]
fn errors_print_todays_sentences() {
    let dir = TempDir::new("sentences");
    let d = dir.0.display();
    let first = open(&dir);
    let e = Wal::open(&dir.0, 1).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("data dir {d} is in use by another process (its {LOCK_FILE} file is locked)")
    );
    drop(first);
    let e = Wal::open(&dir.0, 2).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "data dir {d} belongs to node 1, not to node 2 (per {})",
            dir.0.join(NODE_ID_FILE).display()
        )
    );
    fs::remove_file(dir.0.join(NODE_ID_FILE)).unwrap();
    let e = Wal::open(&dir.0, 1).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "data dir {d} has a {WAL_FILE} but no {NODE_ID_FILE} file, so whose log it is is \
             unknown; refusing to use it"
        )
    );
    fs::create_dir(dir.0.join(NODE_ID_FILE)).unwrap();
    let e = Wal::open(&dir.0, 1).err().unwrap();
    let StorageError::Io { source, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(
        e.to_string(),
        format!(
            "cannot read {}: {source}",
            dir.0.join(NODE_ID_FILE).display()
        )
    );
    assert!(e.source().is_some_and(|s| s.is::<io::Error>()));
    fs::remove_dir(dir.0.join(NODE_ID_FILE)).unwrap();
    fs::write(dir.0.join(NODE_ID_FILE), "1\n").unwrap();

    let wal = dir.wal();
    let w = wal.display();
    let good = read_wal(&wal);
    fs::write(&wal, b"raft").unwrap();
    assert_eq!(
        Wal::open(&dir.0, 1).err().unwrap().to_string(),
        format!(
            "{w}: not a WAL of format version {WAL_VERSION}: it does not start with a \
             {WAL_HEADER_LEN}-byte header beginning \"raft-wal\" (WALs of earlier versions have \
             none, and this build cannot read them); refusing to start"
        )
    );
    fs::write(&wal, wal_header(7, 1)).unwrap();
    assert_eq!(
        Wal::open(&dir.0, 1).err().unwrap().to_string(),
        format!(
            "{w}: WAL format version 7 (byte offset 8); this build reads only version \
             {WAL_VERSION}; refusing to start"
        )
    );
    let magic = u64::from_le_bytes(good[12..20].try_into().unwrap());
    let mut payload = Vec::new();
    encode_entry(&mut payload, &noop(2, 1)).unwrap();
    let mut bytes = good.clone();
    bytes.extend(frame(magic, WAL_HEADER_LEN, 1, &payload));
    fs::write(&wal, &bytes).unwrap();
    let e = Wal::open(&dir.0, 1).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{w}: frame at byte offset {WAL_HEADER_LEN}: record at byte offset {}: entry 2 does \
             not follow the last index 0; the WAL is corrupt",
            WAL_HEADER_LEN + FRAME_HEADER_LEN
        )
    );
    // A damaged frame with one after it.
    let mut one = Vec::new();
    encode_entry(&mut one, &noop(1, 1)).unwrap();
    let second = WAL_HEADER_LEN + FRAME_HEADER_LEN + one.len() as u64;
    let mut bytes = good.clone();
    bytes.extend(frame(magic, WAL_HEADER_LEN, 1, &one));
    bytes.extend(frame(magic, second, 2, &payload));
    bytes[WAL_HEADER_LEN as usize] ^= 1;
    fs::write(&wal, &bytes).unwrap();
    assert_eq!(
        Wal::open(&dir.0, 1).err().unwrap().to_string(),
        format!(
            "{w}: frame at byte offset {WAL_HEADER_LEN} is damaged (frame header does not carry \
             this WAL's magic), yet a frame written after it starts at byte offset {second}; the \
             WAL is corrupt (this is not a torn write), refusing to start"
        )
    );
    fs::write(&wal, &good).unwrap();

    let (mut s, _, _) = open(&dir);
    s.persist(None, &[noop(1, 1)]).unwrap();
    assert_eq!(
        s.persist(None, &[noop(3, 1)]).unwrap_err().to_string(),
        format!(
            "{w}: cannot append entry 3 to a log whose last index is 1: a batch must start at an \
             index from 1 to 2"
        )
    );
    assert_eq!(
        s.persist(None, &[noop(0, 1)]).unwrap_err().to_string(),
        format!(
            "{w}: cannot append entry 0: it is at or below the log's base index 0 (compacted \
             into a snapshot)"
        )
    );
    fs::write(dir.0.join("short"), b"raft").unwrap();
    assert_eq!(
        open_prepared(&Fs::Real, &dir.0.join("short"))
            .err()
            .unwrap()
            .to_string(),
        format!(
            "the prepared segment {} is 4 bytes, short of {SEGMENT_PREALLOC}",
            dir.0.join("short").display()
        )
    );

    // Failed writes and reads, which a test cannot provoke.
    let failed = |at: At| StorageError::IoAt {
        path: wal.clone(),
        at,
        source: io::Error::other("the disk is on fire"),
    };
    let cases = [
        (
            At::ReadNear(60),
            format!("{w}: read failed near byte offset 60: the disk is on fire"),
        ),
        (
            At::Write {
                offset: 60,
                len: 42,
            },
            format!("{w}: at byte offset 60: write of 42 bytes failed: the disk is on fire"),
        ),
        (
            At::Sync(60),
            format!("{w}: at byte offset 60: fdatasync failed: the disk is on fire"),
        ),
        (
            At::TruncateTo(60),
            format!("cannot truncate {w} to 60 bytes: the disk is on fire"),
        ),
    ];
    for (at, sentence) in cases {
        assert_eq!(failed(at).to_string(), sentence);
    }
    s.failed = Some(failed(At::Sync(60)).to_string());
    assert_eq!(
        s.persist(None, &[noop(2, 1)]).unwrap_err().to_string(),
        format!(
            "{w}: refusing to write after an earlier failure: {w}: at byte offset 60: fdatasync \
             failed: the disk is on fire"
        )
    );
}
