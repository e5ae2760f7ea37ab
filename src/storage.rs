//! Durable hard state and Raft log for one peer: a CRC-framed, append-only write-ahead log in the
//! style of etcd's WAL.
//!
//! # Files in the data directory
//! - `node_id`: the owning peer's ID as decimal text, written once when the directory is new.
//!   A directory that belongs to another peer is refused.
//! - `LOCK`: locked exclusively (`File::try_lock`) for the life of a [`Storage`], so that two
//!   processes never append to the same log.
//! - `wal`: the log, one frame per [`Storage::persist`] call.
//!
//! # Frame format (all integers little-endian)
//! ```text
//! frame   = len: u32, crc: u32 (CRC-32 of payload), payload: [u8; len]      with len > 0
//! payload = record*
//! record  = 1: u8, term: u64, vote: u64 (0 = none), commit: u64             a hard state
//!         | 2: u8, index: u64, term: u64, kind                              an entry
//! kind    = 0: u8                                                           Payload::Noop
//!         | 1: u8, client: u64, seq: u64, n: u32, data: [u8; n] (UTF-8)     Payload::Data
//! ```
//! A batch is one frame written with one `write` and made durable with one `fdatasync`, so it is
//! atomic: a crash mid-write leaves a torn last frame, which the next open drops as a whole.
//!
//! # Replay
//! Frames are applied in order. An entry whose index is at most the current last index first
//! truncates the log to `index - 1` (this is how Raft's conflict truncation becomes durable; there
//! is no separate truncate record); after that its index must be exactly last + 1. The last
//! hard-state record wins, and its commit index is clamped to the last index.
//!
//! A bad last frame is a torn write and is cut off (with a warning): one that runs past the end
//! of the file with no valid frame anywhere after its header, or one that fails its CRC (or is an
//! all-zero header) with nothing but zero bytes after it. Any other bad frame means the file was
//! damaged after it was synced; open then fails, naming the file and byte offset, rather than
//! silently forgetting entries this peer may have promised to keep.

use crate::raft::{Entry, HardState, Index, NodeId, Payload};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const NODE_ID_FILE: &str = "node_id";
const LOCK_FILE: &str = "LOCK";
const WAL_FILE: &str = "wal";

/// `len: u32` and `crc: u32`.
const FRAME_HEADER_LEN: u64 = 8;
const RECORD_HARD_STATE: u8 = 1;
const RECORD_ENTRY: u8 = 2;
const KIND_NOOP: u8 = 0;
const KIND_DATA: u8 = 1;

/// Read buffer for replay: big enough that start-up is a few large reads.
const READ_BUFFER: usize = 1 << 20;
/// The frame buffer is reused between persists, but not kept above this size after a huge batch.
const KEEP_BUFFER: usize = 1 << 20;

/// The durable state of one peer. Dropping it closes the WAL and releases the directory lock.
pub struct Storage {
    wal_path: PathBuf,
    wal: File,
    /// Holds the directory's exclusive lock for as long as it is open.
    _lock: File,
    /// Length of the WAL: every byte before it belongs to a complete, synced frame.
    wal_len: u64,
    /// Index of the last entry in the durable log; 0 when the log is empty.
    last_index: Index,
    /// Set once a write or fsync failed. The file's contents are then unknown (a failed fsync may
    /// have dropped dirty pages), so every later persist is refused.
    failed: Option<String>,
    /// The frame being built, reused between calls.
    buf: Vec<u8>,
}

impl Storage {
    /// Opens (creating if missing) `dir`, takes an exclusive lock, checks it belongs to `node_id`, replays the WAL.
    pub fn open(dir: &Path, node_id: NodeId) -> Result<(Storage, HardState, Vec<Entry>), String> {
        fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
        let lock = lock_dir(dir)?;
        check_node_id(dir, node_id)?;

        let wal_path = dir.join(WAL_FILE);
        let existed = exists(&wal_path)?;
        let mut wal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|e| format!("cannot open {}: {e}", wal_path.display()))?;
        if !existed {
            sync_dir(dir)?;
        }

        let replay = replay(&wal_path, &mut wal)?;
        if let Some(reason) = &replay.torn {
            let file_len = wal
                .metadata()
                .map_err(|e| format!("cannot stat {}: {e}", wal_path.display()))?
                .len();
            log::warn!(
                "{}: torn write at byte offset {}: {reason}; discarding the last {} bytes \
                 (an unsynced batch)",
                wal_path.display(),
                replay.valid_len,
                file_len - replay.valid_len
            );
            wal.set_len(replay.valid_len)
                .and_then(|()| wal.sync_all())
                .map_err(|e| {
                    format!(
                        "cannot truncate {} to {} bytes: {e}",
                        wal_path.display(),
                        replay.valid_len
                    )
                })?;
        }
        wal.seek(SeekFrom::Start(replay.valid_len))
            .map_err(|e| format!("cannot seek in {}: {e}", wal_path.display()))?;

        let storage = Storage {
            wal_path,
            wal,
            _lock: lock,
            wal_len: replay.valid_len,
            last_index: replay.entries.len() as Index,
            failed: None,
            buf: Vec::new(),
        };
        Ok((storage, replay.hard_state, replay.entries))
    }

    /// Writes `hard_state` (if Some) and `entries` (which replace any log suffix from entries[0].index on) with ONE write and ONE fsync (fdatasync / File::sync_data).
    ///
    /// `entries` must be consecutive and start at an index from 1 to the last index + 1. With
    /// neither a hard state nor entries this does nothing. After an I/O error every later call
    /// fails too: the process should stop and recover by reopening.
    pub fn persist(
        &mut self,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), String> {
        if hard_state.is_none() && entries.is_empty() {
            return Ok(());
        }
        if let Some(failure) = &self.failed {
            return Err(format!(
                "{}: refusing to write after an earlier failure: {failure}",
                self.wal_path.display()
            ));
        }
        self.check_batch(hard_state, entries)?;

        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; FRAME_HEADER_LEN as usize]);
        if let Some(hs) = hard_state {
            encode_hard_state(&mut buf, hs);
        }
        for entry in entries {
            encode_entry(&mut buf, entry)
                .map_err(|e| format!("{}: entry {}: {e}", self.wal_path.display(), entry.index))?;
        }
        let payload_len = u32::try_from(buf.len() - FRAME_HEADER_LEN as usize).map_err(|_| {
            format!(
                "{}: a batch of {} bytes exceeds the 4 GiB frame limit",
                self.wal_path.display(),
                buf.len()
            )
        })?;
        let crc = crc32fast::hash(&buf[FRAME_HEADER_LEN as usize..]);
        buf[0..4].copy_from_slice(&payload_len.to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());

        let result = self.write_frame(&buf);
        if buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        }
        self.buf = buf;
        result?;

        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        Ok(())
    }

    /// Index of the last entry in the durable log; 0 when it is empty.
    pub fn last_index(&self) -> Index {
        self.last_index
    }

    /// Refuses a batch that replay would reject, so a bug upstream never makes the WAL unreadable.
    fn check_batch(&self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), String> {
        let wal = self.wal_path.display();
        if let Some(HardState { vote: Some(0), .. }) = hard_state {
            return Err(format!(
                "{wal}: cannot persist a vote for node 0 (0 means no vote)"
            ));
        }
        if let Some(first) = entries.first() {
            if first.index == 0 || first.index > self.last_index + 1 {
                return Err(format!(
                    "{wal}: cannot append entry {} to a log whose last index is {}: a batch must \
                     start at an index from 1 to {}",
                    first.index,
                    self.last_index,
                    self.last_index + 1
                ));
            }
        }
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(format!(
                    "{wal}: entries of a batch must be consecutive, but entry {} follows entry {}",
                    pair[1].index, pair[0].index
                ));
            }
        }
        Ok(())
    }

    /// Appends one complete frame and syncs it; on failure marks the storage failed.
    fn write_frame(&mut self, frame: &[u8]) -> Result<(), String> {
        let offset = self.wal_len;
        let result = self
            .wal
            .write_all(frame)
            .map_err(|e| format!("write of {} bytes failed: {e}", frame.len()))
            .and_then(|()| {
                self.wal
                    .sync_data()
                    .map_err(|e| format!("fdatasync failed: {e}"))
            });
        match result {
            Ok(()) => {
                self.wal_len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                let e = format!("{}: at byte offset {offset}: {e}", self.wal_path.display());
                self.failed = Some(e.clone());
                // Best effort: do not leave a partial frame in front of later frames.
                let _ = self.wal.set_len(offset);
                Err(e)
            }
        }
    }
}

/// Creates (if needed) and locks the directory's LOCK file.
fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join(LOCK_FILE);
    let existed = exists(&path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(format!(
                "data dir {} is in use by another process (its {LOCK_FILE} file is locked)",
                dir.display()
            ))
        }
        Err(TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
    }
    if !existed {
        sync_dir(dir)?;
    }
    Ok(file)
}

/// Checks the directory's `node_id` file, writing it if the directory is new.
fn check_node_id(dir: &Path, node_id: NodeId) -> Result<(), String> {
    let path = dir.join(NODE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found: NodeId = text.trim().parse().map_err(|_| {
                format!(
                    "{}: expected a node ID, found {:?}",
                    path.display(),
                    text.trim()
                )
            })?;
            if found != node_id {
                return Err(format!(
                    "data dir {} belongs to node {found}, not to node {node_id} (per {})",
                    dir.display(),
                    path.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if exists(&dir.join(WAL_FILE))? {
                return Err(format!(
                    "data dir {} has a {WAL_FILE} but no {NODE_ID_FILE} file, so whose log it is \
                     is unknown; refusing to use it",
                    dir.display()
                ));
            }
            // Write-then-rename, so a crash never leaves an empty or partial node_id.
            let tmp = dir.join(format!("{NODE_ID_FILE}.tmp"));
            let write = || -> io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(format!("{node_id}\n").as_bytes())?;
                f.sync_all()?;
                fs::rename(&tmp, &path)
            };
            write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            sync_dir(dir)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn exists(path: &Path) -> Result<bool, String> {
    path.try_exists()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))
}

/// Makes the directory's entries (newly created or renamed files) durable.
fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot fsync data dir {}: {e}", dir.display()))
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn encode_hard_state(buf: &mut Vec<u8>, hs: &HardState) {
    buf.push(RECORD_HARD_STATE);
    put_u64(buf, hs.term);
    put_u64(buf, hs.vote.unwrap_or(0));
    put_u64(buf, hs.commit);
}

fn encode_entry(buf: &mut Vec<u8>, entry: &Entry) -> Result<(), String> {
    buf.push(RECORD_ENTRY);
    put_u64(buf, entry.index);
    put_u64(buf, entry.term);
    match &entry.payload {
        Payload::Noop => buf.push(KIND_NOOP),
        Payload::Data { client, seq, data } => {
            let len = u32::try_from(data.len())
                .map_err(|_| format!("data of {} bytes is too long", data.len()))?;
            buf.push(KIND_DATA);
            put_u64(buf, *client);
            put_u64(buf, *seq);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(data.as_bytes());
        }
    }
    Ok(())
}

/// What replaying the WAL found.
struct Replay {
    hard_state: HardState,
    /// The whole log, `entries[i].index == i + 1`.
    entries: Vec<Entry>,
    /// End of the last good frame.
    valid_len: u64,
    /// Why the bytes from `valid_len` on are a torn write, if there are any.
    torn: Option<String>,
}

fn replay(path: &Path, file: &mut File) -> Result<Replay, String> {
    let wal = path.display();
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot stat {wal}: {e}"))?
        .len();
    let read_err =
        |off: u64, e: io::Error| format!("{wal}: read failed near byte offset {off}: {e}");
    let mut reader = BufReader::with_capacity(READ_BUFFER, &mut *file);
    let mut hard_state = HardState::default();
    // A guess at the entry count; the log grows past it if the entries are smaller.
    let mut entries = Vec::with_capacity((file_len / 64) as usize);
    let mut payload = Vec::new();
    let mut off = 0;
    let mut torn = None;

    while off < file_len {
        let remaining = file_len - off;
        if remaining < FRAME_HEADER_LEN {
            torn = Some(format!(
                "incomplete frame header ({remaining} of {FRAME_HEADER_LEN} bytes)"
            ));
            break;
        }
        let mut header = [0; FRAME_HEADER_LEN as usize];
        reader
            .read_exact(&mut header)
            .map_err(|e| read_err(off, e))?;
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap());
        let end = off + FRAME_HEADER_LEN + u64::from(len);

        if len == 0 {
            if header == [0; FRAME_HEADER_LEN as usize] {
                match first_nonzero(&mut reader).map_err(|e| read_err(off, e))? {
                    None => {
                        torn = Some("zero-filled tail".into());
                        break;
                    }
                    Some(at) => {
                        return Err(format!(
                            "{wal}: frame at byte offset {off} has a zero header, but non-zero \
                             data follows at byte offset {}; the WAL is corrupt",
                            off + FRAME_HEADER_LEN + at
                        ))
                    }
                }
            }
            return Err(format!(
                "{wal}: frame at byte offset {off} has length 0; the WAL is corrupt"
            ));
        }

        if end > file_len {
            // Torn, unless the length itself is damaged: then a synced frame lies after it.
            let mut rest = Vec::with_capacity((remaining - FRAME_HEADER_LEN) as usize);
            reader
                .read_to_end(&mut rest)
                .map_err(|e| read_err(off, e))?;
            if let Some(at) = find_frame(&rest) {
                return Err(format!(
                    "{wal}: frame at byte offset {off} claims {len} bytes, past the end of the \
                     file ({file_len} bytes), yet a valid frame follows at byte offset {}; the \
                     WAL is corrupt",
                    off + FRAME_HEADER_LEN + at as u64
                ));
            }
            torn = Some(format!(
                "frame of {len} bytes runs past the end of the file ({file_len} bytes)"
            ));
            break;
        }

        payload.resize(len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(|e| read_err(off, e))?;
        if crc32fast::hash(&payload) != crc {
            match first_nonzero(&mut reader).map_err(|e| read_err(end, e))? {
                None => {
                    torn = Some(format!("last frame ({len} bytes) fails its CRC check"));
                    break;
                }
                Some(at) => {
                    return Err(format!(
                        "{wal}: frame at byte offset {off} ({len} bytes) fails its CRC check, \
                         and data follows it at byte offset {}; the WAL is corrupt (this is \
                         not a torn write), refusing to start",
                        end + at
                    ))
                }
            }
        }
        apply_frame(
            &payload,
            off + FRAME_HEADER_LEN,
            &mut hard_state,
            &mut entries,
        )
        .map_err(|e| format!("{wal}: frame at byte offset {off}: {e}; the WAL is corrupt"))?;
        off = end;
    }

    hard_state.commit = hard_state.commit.min(entries.len() as Index);
    entries.shrink_to_fit();
    Ok(Replay {
        hard_state,
        entries,
        valid_len: off,
        torn,
    })
}

/// Reads to the end; returns the position (from the reader's start) of the first non-zero byte.
fn first_nonzero(reader: &mut impl Read) -> io::Result<Option<u64>> {
    let mut chunk = vec![0; 64 * 1024];
    let mut pos = 0;
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(i) = chunk[..n].iter().position(|&b| b != 0) {
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
}

/// The first position in `bytes` where a complete frame with a matching CRC starts, if any.
fn find_frame(bytes: &[u8]) -> Option<usize> {
    let header = FRAME_HEADER_LEN as usize;
    (0..bytes.len().saturating_sub(header)).find(|&at| {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        len > 0
            && len <= bytes.len() - at - header
            && crc32fast::hash(&bytes[at + header..at + header + len]) == crc
    })
}

/// Applies one frame's records; `base` is the file offset of the payload, for error messages.
fn apply_frame(
    payload: &[u8],
    base: u64,
    hard_state: &mut HardState,
    entries: &mut Vec<Entry>,
) -> Result<(), String> {
    let mut d = Decoder {
        buf: payload,
        pos: 0,
    };
    while d.pos < payload.len() {
        let at = base + d.pos as u64;
        apply_record(&mut d, hard_state, entries)
            .map_err(|e| format!("record at byte offset {at}: {e}"))?;
    }
    Ok(())
}

fn apply_record(
    d: &mut Decoder,
    hard_state: &mut HardState,
    entries: &mut Vec<Entry>,
) -> Result<(), String> {
    match d.u8()? {
        RECORD_HARD_STATE => {
            let term = d.u64()?;
            let vote = d.u64()?;
            let commit = d.u64()?;
            *hard_state = HardState {
                term,
                vote: (vote != 0).then_some(vote),
                commit,
            };
        }
        RECORD_ENTRY => {
            let index = d.u64()?;
            let term = d.u64()?;
            let payload = match d.u8()? {
                KIND_NOOP => Payload::Noop,
                KIND_DATA => {
                    let client = d.u64()?;
                    let seq = d.u64()?;
                    let len = d.u32()? as usize;
                    let bytes = d.bytes(len)?;
                    let data = std::str::from_utf8(bytes)
                        .map_err(|e| format!("entry {index}: data is not UTF-8: {e}"))?
                        .to_owned();
                    Payload::Data { client, seq, data }
                }
                kind => return Err(format!("entry {index}: unknown payload kind {kind}")),
            };
            let last = entries.len() as Index;
            if index == 0 {
                return Err("entry with index 0".into());
            }
            if index <= last {
                entries.truncate((index - 1) as usize);
            } else if index != last + 1 {
                return Err(format!(
                    "entry {index} does not follow the last index {last}"
                ));
            }
            entries.push(Entry {
                index,
                term,
                payload,
            });
        }
        tag => return Err(format!("unknown record type {tag}")),
    }
    Ok(())
}

/// Reads little-endian values from a frame's payload.
struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let rest = self.buf.len() - self.pos;
        if n > rest {
            return Err(format!(
                "record truncated: needs {n} more bytes, the frame has {rest}"
            ));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn open(dir: &TempDir) -> (Storage, HardState, Vec<Entry>) {
        Storage::open(&dir.0, 1).unwrap()
    }

    fn wal_len(dir: &TempDir) -> u64 {
        fs::metadata(dir.wal()).unwrap().len()
    }

    #[test]
    fn new_dir_opens_empty_and_records_its_owner() {
        let dir = TempDir::new("new");
        let (s, state, log) = open(&dir);
        assert_eq!(state, HardState::default());
        assert!(log.is_empty());
        assert_eq!(s.last_index(), 0);
        assert_eq!(fs::read_to_string(dir.0.join(NODE_ID_FILE)).unwrap(), "1\n");
        assert_eq!(wal_len(&dir), 0);
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
        assert_eq!(wal_len(&dir), 0);
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
        let bytes = fs::read(dir.wal()).unwrap();
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 8 + len);
        let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&bytes[8..]));
        // hard state (1 + 24) + noop (1 + 17) + data (1 + 17 + 20 + 3)
        assert_eq!(len, 25 + 18 + 41);
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
            (kept_len, fs::read(src.wal()).unwrap())
        };
        for cut in kept_len..full.len() {
            let dir = TempDir::new("torn");
            drop(open(&dir));
            fs::write(dir.wal(), &full[..cut]).unwrap();
            let (mut s, state, log) =
                Storage::open(&dir.0, 1).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
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
    fn zero_filled_tail_is_treated_as_torn() {
        let dir = TempDir::new("zeros");
        let log = vec![noop(1, 1), data(2, 1, "x")];
        let (good_len, last_frame_start) = {
            let (mut s, _, _) = open(&dir);
            s.persist(None, &log[..1]).unwrap();
            let start = wal_len(&dir);
            s.persist(None, &log[1..]).unwrap();
            (wal_len(&dir), start)
        };
        let good = fs::read(dir.wal()).unwrap();

        // Zeros after the last good frame, as a preallocating file system may leave.
        let mut bytes = good.clone();
        bytes.extend_from_slice(&[0; 4096]);
        fs::write(dir.wal(), &bytes).unwrap();
        let (mut s, _, got) = open(&dir);
        assert_eq!(got, log);
        assert_eq!(wal_len(&dir), good_len);
        s.persist(None, &[noop(3, 1)]).unwrap();
        drop(s);
        assert_eq!(open(&dir).2.len(), 3);

        // A last frame whose payload never reached the disk: its header, then zeros.
        let mut bytes = good.clone();
        for b in &mut bytes[last_frame_start as usize + 8..] {
            *b = 0;
        }
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
        let good = fs::read(dir.wal()).unwrap();
        // Every bit of the middle frame: header (length and CRC) and payload alike.
        for bit in start * 8..end * 8 {
            let mut bytes = good.clone();
            bytes[bit / 8] ^= 1 << (bit % 8);
            fs::write(dir.wal(), &bytes).unwrap();
            let err = match Storage::open(&dir.0, 1) {
                Ok((_, _, log)) => panic!("bit {bit} flipped, yet open succeeded: {log:?}"),
                Err(e) => e,
            };
            assert!(
                err.contains(&format!("byte offset {start}")) && err.contains("wal"),
                "bit {bit}: {err}"
            );
            assert_eq!(fs::read(dir.wal()).unwrap(), bytes, "open must not modify");
        }
    }

    #[test]
    fn undecodable_payload_with_a_valid_crc_is_an_error() {
        let dir = TempDir::new("undecodable");
        drop(open(&dir));
        let mut frame = Vec::new();
        let payload = [RECORD_ENTRY, 1, 0, 0];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        fs::write(dir.wal(), &frame).unwrap();
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains("byte offset 0") && err.contains("truncated"),
            "{err}"
        );

        // An index gap is corruption too.
        let mut bytes = Vec::new();
        encode_entry(&mut bytes, &noop(2, 1)).unwrap();
        let mut frame = Vec::new();
        frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        frame.extend_from_slice(&bytes);
        fs::write(dir.wal(), &frame).unwrap();
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains("entry 2 does not follow the last index 0"),
            "{err}"
        );
    }

    #[test]
    fn wrong_node_id_is_refused() {
        let dir = TempDir::new("node-id");
        drop(open(&dir));
        let err = Storage::open(&dir.0, 2).err().unwrap();
        assert!(err.contains("belongs to node 1, not to node 2"), "{err}");
        assert!(Storage::open(&dir.0, 1).is_ok());
    }

    #[test]
    fn wal_without_node_id_is_refused() {
        let dir = TempDir::new("no-node-id");
        drop(open(&dir));
        fs::remove_file(dir.0.join(NODE_ID_FILE)).unwrap();
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(err.contains("no node_id"), "{err}");
    }

    #[test]
    fn second_open_of_a_locked_dir_is_refused() {
        let dir = TempDir::new("lock");
        let first = open(&dir);
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(err.contains("is in use by another process"), "{err}");
        drop(first);
        assert!(
            Storage::open(&dir.0, 1).is_ok(),
            "dropping Storage releases the lock"
        );
    }

    #[test]
    fn batches_replay_would_reject_are_refused() {
        let dir = TempDir::new("refuse");
        let (mut s, _, _) = open(&dir);
        s.persist(None, &[noop(1, 1)]).unwrap();
        let err = s.persist(None, &[noop(3, 1)]).unwrap_err();
        assert!(
            err.contains("entry 3") && err.contains("last index is 1"),
            "{err}"
        );
        assert!(s.persist(None, &[noop(0, 1)]).is_err());
        let err = s.persist(None, &[noop(2, 1), noop(4, 1)]).unwrap_err();
        assert!(err.contains("consecutive"), "{err}");
        assert!(s.persist(Some(&hs(1, Some(0), 0)), &[]).is_err());
        // Nothing was written, and the storage still works.
        s.persist(None, &[noop(2, 1)]).unwrap();
        drop(s);
        assert_eq!(open(&dir).2, vec![noop(1, 1), noop(2, 1)]);
    }
}
