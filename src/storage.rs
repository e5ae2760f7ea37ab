//! Durable hard state and Raft log for one peer: a CRC-framed, append-only write-ahead log in the
//! style of etcd's WAL, split into segments so that a log prefix in a snapshot can be deleted.
//!
//! # Files in the data directory
//! - `node_id`: the owning peer's ID as decimal text, written once when the directory is new.
//!   A directory that belongs to another peer is refused.
//! - `LOCK`: locked exclusively (`File::try_lock`) for the life of a [`Storage`], so that two
//!   processes never append to the same log.
//! - `wal`, `wal.1`, `wal.2`, ...: the log's segments, numbered 0 (`wal`), 1, 2, ... and
//!   replayed in that (numeric) order. Each is a complete WAL file of its own (its own header,
//!   magic and frame sequence). [`Storage::persist`] appends one frame to the newest;
//!   [`Storage::rotate`] starts the next; [`Storage::compact`] deletes the oldest ones, so the
//!   numbers may start above 0 and need not be contiguous. A new directory starts with `wal`.
//!   The next segment is usually made ahead of time by another thread ([`prepare_segment`]):
//!   header, zeros, synced, under its final name.
//! - `wal.tmp`, `wal.N.tmp`: a segment being created; a leftover one (a crash before its rename)
//!   is deleted at open.
//! - `wal.spare.tmp`: a segment being prepared, linked to its final name when synced; a
//!   leftover one is deleted at open.
//!
//! # WAL format, version 2 (all integers little-endian); one segment
//! ```text
//! wal     = header frame*
//! header  = "raft-wal": [u8; 8], version: u32, magic: u64, crc: u32       crc of the 20 bytes before it
//! frame   = magic: u64, offset: u64, seq: u64, len: u32, data_crc: u32, header_crc: u32,
//!           payload: [u8; len]                                            header_crc of the 32 bytes before it
//! payload = record*
//! record  = 1: u8, term: u64, vote: u64 (0 = none), commit: u64             a hard state
//!         | 2: u8, index: u64, term: u64, kind                              an entry
//!         | 3: u8, index: u64, term: u64                                    the log's base
//! kind    = 0: u8                                                           Payload::Noop
//!         | 1: u8, client: u64, seq: u64, n: u32, data: [u8; n] (UTF-8)     Payload::Data
//!         | 2: u8, n: u32, json: [u8; n]                                    Payload::Config
//! ```
//! `magic` is drawn from the OS's randomness when the file is created and never leaves it;
//! every frame repeats it, along with the frame's own byte `offset` and its `seq` (1, 2, ...).
//! A frame header that carries the magic and its own offset, with a matching `header_crc`, can
//! only have been written by us, at that place: client data inside a payload cannot forge one
//! without the magic, and a copy of a real header elsewhere names the wrong offset.
//! Version 1 had no file header and only `len, crc` per frame; this build refuses it.
//!
//! A batch is one frame written with one `write` and made durable with one `fdatasync`, so it is
//! atomic: a crash mid-write leaves a torn last frame, which the next open drops as a whole.
//!
//! Every segment after `wal` has a first frame that starts with a base record and a hard state.
//! A segment the node thread creates itself is written whole (header and that frame) under a
//! temporary name, synced and renamed into place. A prepared segment gets its first frame with
//! the next persist, in one write and one fdatasync with that persist's records, so it costs
//! the rotation no sync; until then the segment is a header and zeros. Every segment but the
//! newest is synced whole before the next is written, and older segments are deleted only once
//! the first frame of a segment after them is durable. Record type 3 is the only change
//! segments brought to the format; a WAL without base records is read as before, with base
//! (0, 0).
//!
//! # Replay
//! First, segments numbered above 0 that were never written to are deleted: the newest while
//! another remains before it, if after its header there are only zeros or a torn first frame
//! with no frame of ours after it (a prepared segment not yet taken, or a crash before its
//! first frame was synced); any other holding only zeros after its header (a preparation that
//! came too late for its number). None of them holds anything that was synced.
//!
//! Segments are replayed in order, and the frames of each in order. The log is a base
//! `(index, term)`, (0, 0) at first, and the entries after it. An entry at or below the base
//! index is corruption. An entry whose index is at most the current last index first truncates
//! the log to `index - 1` (this is how Raft's conflict truncation becomes durable; there is no
//! separate truncate record); after that its index must be exactly last + 1. A base record
//! `(I, T)` says that the entries through `I` are compacted into a snapshot: if the log holds
//! index `I` with term `T` (the base counts as holding its own index and term), the log is
//! truncated to `I`; otherwise it becomes empty with base `(I, T)`. The last hard-state record
//! wins, and its commit index is clamped to the last index.
//!
//! Every segment is created [`SEGMENT_PREALLOC`] bytes long, zeros after its header (and first
//! frame), and frames overwrite the zeros; replay ends where a frame header would start if
//! only zeros follow, in any segment.
//!
//! Otherwise replay stops at the first frame that is not intact: its header is incomplete or not ours, its
//! payload runs past the end of the file, or its payload fails its CRC. Every frame is synced
//! before the next one is written, so a torn write is always the last frame of the newest
//! segment: if no header of ours starts anywhere after the bad frame's first byte, it is torn and
//! cut off (with a warning), whatever its bytes are (garbage, or pages of it that did reach the
//! disk, with zeros between; a frame of which nothing reached the disk is all zeros and simply
//! the end). If one does, the bad frame was synced before a later write, so the file was
//! damaged afterwards; open then fails, naming the file and byte offset, rather than silently
//! forgetting entries this peer may have promised to keep. So does any damage in an older
//! segment, in the first frame of the only segment (above 0) left, and an intact frame that is
//! out of sequence or does not decode.

use crate::raft::{Entry, HardState, Index, NodeId, Payload, Term};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const NODE_ID_FILE: &str = "node_id";
const LOCK_FILE: &str = "LOCK";
/// Segment 0; segment `n > 0` is `wal.n`.
const WAL_FILE: &str = "wal";
/// Where a segment the node thread creates is written before it is renamed into place
/// (`wal.tmp` for `wal`), so that it always has its header, and a rotated one its first frame.
const TMP_SUFFIX: &str = ".tmp";

/// The first bytes of every WAL (the per-file random magic comes after the version).
const WAL_SIGNATURE: [u8; 8] = *b"raft-wal";
/// The WAL format this build writes and reads.
const WAL_VERSION: u32 = 2;
/// `"raft-wal"`, `version: u32`, `magic: u64`, `crc: u32`.
const WAL_HEADER_LEN: u64 = 24;
/// `magic: u64`, `offset: u64`, `seq: u64`, `len: u32`, `data_crc: u32`, `header_crc: u32`.
const FRAME_HEADER_LEN: u64 = 36;
const RECORD_HARD_STATE: u8 = 1;
const RECORD_ENTRY: u8 = 2;
const RECORD_BASE: u8 = 3;
const KIND_NOOP: u8 = 0;
const KIND_DATA: u8 = 1;
const KIND_CONFIG: u8 = 2;

/// Every segment is created this long, zeros after its first frame, so that the frames written
/// into it overwrite blocks the file system has already allocated: an fdatasync then changes
/// no metadata and needs no journal commit of its own (on ext4 that commit would also wait for
/// whatever else the journal holds, such as a snapshot's fsyncs). A segment that outgrows it is
/// appended to as before.
pub const SEGMENT_PREALLOC: u64 = 2 << 20;
/// A segment being prepared ([`prepare_segment`]) before it is linked under its final name;
/// deleted at open as a leftover.
const SPARE_FILE: &str = "wal.spare.tmp";
/// Zeros written per call while preallocating a segment.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Read buffer for replay: big enough that start-up is a few large reads.
const READ_BUFFER: usize = 1 << 20;
/// The frame buffer is reused between persists, but not kept above this size after a huge batch.
const KEEP_BUFFER: usize = 1 << 20;

/// One segment file, as far as compaction needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    /// 0 for `wal`, `n` for `wal.n`.
    number: u64,
    /// The base record the segment starts with; every segment [`Storage::rotate`] writes has one.
    base: Option<(Index, Term)>,
    /// The lowest index the log was cut back to (by a conflicting entry or a base record) after
    /// this segment's base record; `Index::MAX` if it never was.
    floor: Index,
}

impl Segment {
    /// Whether replay starting at this segment gives the same log as replay of every segment,
    /// except for entries at or below this segment's base: true when nothing after its base
    /// record reached back to or below the base index.
    fn can_be_first(&self) -> bool {
        matches!(self.base, Some((index, _)) if self.floor >= index)
    }
}

/// Notes, for every segment with a base record, that the log was cut back to `to`.
fn note_cut(segments: &mut [Segment], to: Index) {
    for segment in segments.iter_mut().filter(|s| s.base.is_some()) {
        segment.floor = segment.floor.min(to);
    }
}

/// The path of segment `number` in `dir`.
fn segment_path(dir: &Path, number: u64) -> PathBuf {
    if number == 0 {
        dir.join(WAL_FILE)
    } else {
        dir.join(format!("{WAL_FILE}.{number}"))
    }
}

/// A file name's segment number, if it names a segment (`wal`, or `wal.n` with `n` written
/// without leading zeros).
fn segment_number(name: &str) -> Option<u64> {
    if name == WAL_FILE {
        return Some(0);
    }
    let digits = name.strip_prefix(WAL_FILE)?.strip_prefix('.')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment numbers in `dir`, ascending, and the leftover temporary files of segments.
fn list_segments(dir: &Path) -> Result<(Vec<u64>, Vec<PathBuf>), String> {
    let read_err = |e: io::Error| format!("cannot list data dir {}: {e}", dir.display());
    let mut numbers = Vec::new();
    let mut leftovers = Vec::new();
    for item in fs::read_dir(dir).map_err(read_err)? {
        let item = item.map_err(read_err)?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(number) = segment_number(name) {
            numbers.push(number);
        } else if name == SPARE_FILE
            || name
                .strip_suffix(TMP_SUFFIX)
                .and_then(segment_number)
                .is_some()
        {
            leftovers.push(item.path());
        }
    }
    numbers.sort_unstable();
    Ok((numbers, leftovers))
}

/// The durable state of one peer. Dropping it closes the WAL and releases the directory lock.
pub struct Storage {
    dir: PathBuf,
    /// The segments, oldest first; the last one is `wal`, the one written to.
    segments: Vec<Segment>,
    /// The newest segment's path.
    wal_path: PathBuf,
    wal: File,
    /// Holds the directory's exclusive lock for as long as it is open.
    _lock: File,
    /// Length of the newest segment: every byte before it belongs to the header or a complete,
    /// synced frame.
    wal_len: u64,
    /// The newest segment's random magic, repeated in every frame header.
    magic: u64,
    /// The `seq` the next frame takes: one more than the frames in the newest segment.
    next_seq: u64,
    /// The log's base: entries through its index are compacted away.
    base: (Index, Term),
    /// Index of the last entry in the durable log; the base index when the log is empty.
    last_index: Index,
    /// The terms of the entries after the base, as runs: `(first index, term)`, ascending.
    terms: Vec<(Index, Term)>,
    /// Set once a write or fsync failed. The file's contents are then unknown (a failed fsync may
    /// have dropped dirty pages), so every later persist is refused.
    failed: Option<String>,
    /// The frame being built, reused between calls.
    buf: Vec<u8>,
    /// Records (a base record and a hard state) that the newest segment's first frame starts
    /// with, not yet written: a rotation into a prepared segment leaves them to the next
    /// persist, whose one write and fdatasync make them durable with its own records.
    pending_first: Option<Vec<u8>>,
}

impl Storage {
    /// Opens (creating if missing) `dir`, takes an exclusive lock, checks it belongs to `node_id`,
    /// replays the WAL's segments. The entries returned start at [`Storage::base`]'s index + 1.
    pub fn open(dir: &Path, node_id: NodeId) -> Result<(Storage, HardState, Vec<Entry>), String> {
        fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
        let lock = lock_dir(dir)?;
        let (mut numbers, leftovers) = list_segments(dir)?;
        check_node_id(dir, node_id, !numbers.is_empty())?;
        for leftover in &leftovers {
            log::warn!(
                "{}: deleting a segment left half-created by a crash",
                leftover.display()
            );
            fs::remove_file(leftover)
                .map_err(|e| format!("cannot delete {}: {e}", leftover.display()))?;
        }

        drop_never_written(dir, &mut numbers)?;

        if numbers.is_empty() {
            let wal_path = segment_path(dir, 0);
            let (bytes, _) = new_segment_bytes(&wal_path, None)?;
            drop(write_segment(&wal_path, &bytes)?);
            sync_dir(dir)?;
            numbers.push(0);
        }

        let mut log = LogState {
            hard_state: HardState::default(),
            base: (0, 0),
            entries: Vec::new(),
            segments: Vec::with_capacity(numbers.len()),
            at_segment_start: false,
        };
        let newest = *numbers.last().unwrap();
        let mut wal = None;
        for &number in &numbers {
            let path = segment_path(dir, number);
            let mut file = OpenOptions::new()
                .read(true)
                .write(number == newest)
                .open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            log.segments.push(Segment {
                number,
                base: None,
                floor: Index::MAX,
            });
            let only = numbers.len() == 1;
            let end = replay_segment(&path, &mut file, &mut log, number == newest, only)?;
            if number == newest {
                wal = Some((path, file, end));
            }
        }
        let (wal_path, mut wal, end) = wal.unwrap();

        if let Some(reason) = &end.torn {
            let file_len = len_of(&wal_path, &wal)?;
            log::warn!(
                "{}: torn write at byte offset {}: {reason}; discarding the last {} bytes \
                 (an unsynced batch)",
                wal_path.display(),
                end.valid_len,
                file_len - end.valid_len
            );
            wal.set_len(end.valid_len)
                .and_then(|()| wal.sync_all())
                .map_err(|e| {
                    format!(
                        "cannot truncate {} to {} bytes: {e}",
                        wal_path.display(),
                        end.valid_len
                    )
                })?;
        }
        wal.seek(SeekFrom::Start(end.valid_len))
            .map_err(|e| format!("cannot seek in {}: {e}", wal_path.display()))?;

        let last_index = log.base.0 + log.entries.len() as Index;
        log.hard_state.commit = log.hard_state.commit.min(last_index);
        log.entries.shrink_to_fit();
        let mut terms = Vec::new();
        for entry in &log.entries {
            push_term(&mut terms, entry.index, entry.term);
        }
        let storage = Storage {
            dir: dir.to_path_buf(),
            segments: log.segments,
            wal_path,
            wal,
            _lock: lock,
            wal_len: end.valid_len,
            magic: end.magic,
            next_seq: end.next_seq,
            base: log.base,
            last_index,
            terms,
            failed: None,
            buf: Vec::new(),
            pending_first: None,
        };
        Ok((storage, log.hard_state, log.entries))
    }

    /// Writes `hard_state` (if Some) and `entries` (which replace any log suffix from entries[0].index on) with ONE write and ONE fsync (fdatasync / File::sync_data).
    ///
    /// `entries` must be consecutive and start at an index from the base index + 1 to the last
    /// index + 1. With neither a hard state nor entries this does nothing. After an I/O error
    /// every later call fails too: the process should stop and recover by reopening.
    pub fn persist(
        &mut self,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), String> {
        if hard_state.is_none() && entries.is_empty() {
            return Ok(());
        }
        self.write_batch(hard_state, entries)
    }

    /// [`Storage::persist`]'s frame: the pending first frame's records (if any), `hard_state`
    /// and `entries`, written and synced.
    fn write_batch(
        &mut self,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), String> {
        self.check_not_failed()?;
        self.check_batch(hard_state, entries)?;

        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; FRAME_HEADER_LEN as usize]);
        if let Some(first) = &self.pending_first {
            buf.extend_from_slice(first);
        }
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
        let (header, payload) = buf.split_at_mut(FRAME_HEADER_LEN as usize);
        FrameHeader {
            magic: self.magic,
            offset: self.wal_len,
            seq: self.next_seq,
            len: payload_len,
            data_crc: crc32fast::hash(payload),
        }
        .encode(header);

        let result = self.write_frame(&buf);
        if buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        }
        self.buf = buf;
        result?;

        self.pending_first = None;
        self.next_seq += 1;
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            if first.index <= self.last_index {
                note_cut(&mut self.segments, first.index - 1);
                self.truncate_terms(first.index - 1);
            }
            for entry in entries {
                push_term(&mut self.terms, entry.index, entry.term);
            }
            self.last_index = last.index;
        }
        Ok(())
    }

    /// Starts a new segment whose first frame holds the base record `base` and `hard_state`;
    /// later persists go to it.
    ///
    /// With `base` = (last index, last term) the log stays as it is; with a `(index, term)` the
    /// log holds, it is truncated to `index`; otherwise (say, a snapshot installed from the
    /// leader) the log becomes empty with that base. A base index below the current one is
    /// refused. The segment is written under a temporary name, synced, renamed into place and
    /// the directory synced, so a crash leaves either the old segments or all of them with the
    /// new one. It is the new segment's base record that later lets [`Storage::compact`] delete
    /// the older segments.
    pub fn rotate(&mut self, hard_state: &HardState, base: (Index, Term)) -> Result<(), String> {
        self.rotate_using(hard_state, base, false)
    }

    /// [`Storage::rotate`], into the segment [`prepare_segment`] made for
    /// [`Storage::next_segment_number`] if `prepared` (or, if that fails, creating one as
    /// `rotate` does).
    ///
    /// A prepared segment costs no sync here: its name is already durable, and its first frame
    /// is left to the next persist (or [`Storage::write_first_frame`]), whose fdatasync makes
    /// it durable with that persist's records. Until then a crash leaves the segment holding
    /// only zeros after its header, which the next open deletes; the older segments still
    /// hold the whole log, as [`Storage::compact_later`] keeps them until then.
    pub fn rotate_using(
        &mut self,
        hard_state: &HardState,
        base: (Index, Term),
        prepared: bool,
    ) -> Result<(), String> {
        self.check_not_failed()?;
        self.check_batch(Some(hard_state), &[])?;
        if base.0 < self.base.0 {
            return Err(format!(
                "{}: cannot rotate to base index {}, below the log's base index {}",
                self.wal_path.display(),
                base.0,
                self.base.0
            ));
        }
        // Every segment but the newest is durable whole (replay relies on it).
        self.write_first_frame()?;
        let number = self.next_segment_number();
        let path = segment_path(&self.dir, number);
        let mut payload = Vec::with_capacity(2 * 25);
        encode_base(&mut payload, base);
        encode_hard_state(&mut payload, hard_state);
        let taken = prepared.then(|| {
            open_prepared(&path).inspect_err(|e| {
                log::warn!("{e}; creating {} instead", path.display());
            })
        });
        let (file, magic, len, pending) = match taken {
            Some(Ok((file, magic))) => (file, magic, WAL_HEADER_LEN, Some(payload)),
            _ => {
                let (bytes, magic) = new_segment_bytes(&path, Some(&payload))?;
                let file = write_segment(&path, &bytes)?;
                // The new segment is in place: from here on the log is the one with it,
                // durable or not.
                if let Err(e) = sync_dir(&self.dir) {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
                (file, magic, bytes.len() as u64, None)
            }
        };

        note_cut(&mut self.segments, base.0);
        self.segments.push(Segment {
            number,
            base: Some(base),
            floor: Index::MAX,
        });
        if self.holds(base) {
            self.truncate_terms(base.0);
            self.last_index = base.0;
        } else {
            self.terms.clear();
            self.base = base;
            self.last_index = base.0;
        }
        self.wal_path = path;
        self.wal = file;
        self.wal_len = len;
        self.magic = magic;
        self.next_seq = if pending.is_some() { 1 } else { 2 };
        self.pending_first = pending;
        Ok(())
    }

    /// Writes and syncs the newest segment's first frame now if a rotation into a prepared
    /// segment left it to the next persist: for a rotation that must be durable before it is
    /// acknowledged (a snapshot install).
    pub fn write_first_frame(&mut self) -> Result<(), String> {
        if self.pending_first.is_none() {
            return Ok(());
        }
        self.write_batch(None, &[])
    }

    /// The number the next segment takes: one more than the newest's.
    pub fn next_segment_number(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.number) + 1
    }

    /// Deletes the oldest segments, those whose entries are all at or below `through`, then
    /// syncs the directory; returns how many it deleted. The newest segment is never deleted.
    ///
    /// The segments before segment `k` go when `k`'s base record has an index at most `through`
    /// (the log then held nothing above that index from older segments) and the log was never
    /// cut back to or below that index after it (by a conflicting entry or a lower base), as
    /// replay starting at `k` would then not give this log; the latest such `k` is taken. The
    /// base then becomes `k`'s base, unless it is already higher. The segments are deleted
    /// newest first, so that after a crash midway replay still starts with a prefix of the old
    /// segments followed by `k` (which gives the same log above `k`'s base). On an error some
    /// of them may remain; a later call deletes them.
    pub fn compact(&mut self, through: Index) -> Result<usize, String> {
        let doomed = self.compact_later(through)?;
        delete_segments(&self.dir, &doomed)
    }

    /// [`Storage::compact`] without the file work, which may then happen on another thread
    /// ([`delete_segments`]): forgets the segments wholly at or below `through` and returns
    /// their files, newest first. Until they are deleted, a restart replays them before the
    /// rest, which gives the same log.
    pub fn compact_later(&mut self, through: Index) -> Result<Vec<PathBuf>, String> {
        self.check_not_failed()?;
        // A segment whose first frame is not yet written holds no base record on disk.
        let written = self.segments.len() - usize::from(self.pending_first.is_some());
        let Some(first) = (1..written).rev().find(|&k| {
            let segment = &self.segments[k];
            segment.can_be_first() && segment.base.is_some_and(|(index, _)| index <= through)
        }) else {
            return Ok(Vec::new());
        };
        let first_base = self.segments[first].base.expect("checked above");
        let doomed = self.segments[..first]
            .iter()
            .rev()
            .map(|s| segment_path(&self.dir, s.number))
            .collect();
        self.segments.drain(..first);
        if self.base.0 < first_base.0 {
            self.base = first_base;
            self.drop_terms_through(first_base.0);
        }
        Ok(doomed)
    }

    /// Bytes in the newest segment (the one being written).
    pub fn segment_len(&self) -> u64 {
        self.wal_len
    }

    /// The data directory the WAL is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Index of the last entry in the durable log; the base index when it is empty.
    pub fn last_index(&self) -> Index {
        self.last_index
    }

    /// The log's base `(index, term)`: entries through `index` are compacted away; (0, 0) for a
    /// log that never was.
    pub fn base(&self) -> (Index, Term) {
        self.base
    }

    /// Whether the log holds `index` with `term`, the base counting as held.
    fn holds(&self, (index, term): (Index, Term)) -> bool {
        if (index, term) == self.base {
            return true;
        }
        if index <= self.base.0 || index > self.last_index {
            return false;
        }
        let run = self.terms.partition_point(|&(first, _)| first <= index);
        run > 0 && self.terms[run - 1].1 == term
    }

    /// Forgets the terms of entries at or below `index`, now the base.
    fn drop_terms_through(&mut self, index: Index) {
        if index >= self.last_index {
            self.terms.clear();
            return;
        }
        // The runs that start at or before `index + 1`; the last of them covers it.
        let covering = self.terms.partition_point(|&(first, _)| first <= index + 1);
        if covering > 0 {
            self.terms.drain(..covering - 1);
            self.terms[0].0 = self.terms[0].0.max(index + 1);
        }
    }

    /// Forgets the terms of entries after `index`.
    fn truncate_terms(&mut self, index: Index) {
        let keep = self.terms.partition_point(|&(first, _)| first <= index);
        self.terms.truncate(keep);
    }

    fn check_not_failed(&self) -> Result<(), String> {
        match &self.failed {
            Some(failure) => Err(format!(
                "{}: refusing to write after an earlier failure: {failure}",
                self.wal_path.display()
            )),
            None => Ok(()),
        }
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
            if first.index <= self.base.0 {
                return Err(format!(
                    "{wal}: cannot append entry {}: it is at or below the log's base index {} \
                     (compacted into a snapshot)",
                    first.index, self.base.0
                ));
            }
            if first.index > self.last_index + 1 {
                return Err(format!(
                    "{wal}: cannot append entry {} to a log whose last index is {}: a batch must \
                     start at an index from {} to {}",
                    first.index,
                    self.last_index,
                    self.base.0 + 1,
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

/// Deletes the segments (numbered above 0, with an older one left) that were never written to
/// (see [`never_written`]) and takes them out of `numbers`: the newest ones, which may be
/// prepared but not yet taken or torn in their first frame, and any other holding only zeros (a
/// segment prepared while the node thread created that number itself, then compacted away).
/// Every segment but the newest is synced whole before the next is written, so only the
/// newest can be torn.
fn drop_never_written(dir: &Path, numbers: &mut Vec<u64>) -> Result<(), String> {
    let mut doomed = Vec::new();
    while numbers.len() > 1 {
        let path = segment_path(dir, numbers[numbers.len() - 1]);
        let Some(how) = never_written(&path, true)? else {
            break;
        };
        doomed.push((path, how));
        numbers.pop();
    }
    let newest = numbers.len().saturating_sub(1);
    let mut kept = Vec::with_capacity(numbers.len());
    for (i, &number) in numbers.iter().enumerate() {
        let path = segment_path(dir, number);
        let unwritten = if i < newest && number > 0 {
            never_written(&path, false)?
        } else {
            None
        };
        match unwritten {
            Some(how) => doomed.push((path, how)),
            None => kept.push(number),
        }
    }
    *numbers = kept;
    for (path, how) in &doomed {
        match how {
            // The usual case after a clean stop: the next segment was ready.
            Unwritten::Zeros => log::info!(
                "{}: deleting a prepared segment that was never written to",
                path.display()
            ),
            Unwritten::Torn => log::warn!(
                "{}: deleting a segment whose first frame a crash cut short (nothing in it \
                 was synced)",
                path.display()
            ),
        }
        fs::remove_file(path).map_err(|e| format!("cannot delete {}: {e}", path.display()))?;
    }
    if !doomed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(())
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

/// Checks the directory's `node_id` file, writing it if the directory is new (`has_wal`: it
/// holds a WAL segment).
fn check_node_id(dir: &Path, node_id: NodeId, has_wal: bool) -> Result<(), String> {
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
            if has_wal {
                return Err(format!(
                    "data dir {} has a {WAL_FILE} but no {NODE_ID_FILE} file, so whose log it is \
                     is unknown; refusing to use it",
                    dir.display()
                ));
            }
            write_atomically(dir, NODE_ID_FILE, format!("{node_id}\n").as_bytes())
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `dir/name` so that a crash leaves either the old file or the whole new one, never an
/// empty or partial one: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    sync_dir(dir)
}

fn exists(path: &Path) -> Result<bool, String> {
    path.try_exists()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))
}

/// Makes the directory's entries (newly created or renamed files) durable.
/// Deletes WAL segment files (newest first, as [`Storage::compact_later`] lists them, so that
/// a crash midway leaves a prefix of the old segments, which replays to the same log) and
/// syncs the directory; a file already gone is fine. Returns how many it deleted.
pub fn delete_segments(dir: &Path, doomed: &[PathBuf]) -> Result<usize, String> {
    let mut deleted = 0;
    for path in doomed {
        match fs::remove_file(path) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot delete {}: {e}", path.display())),
        }
    }
    if deleted > 0 {
        sync_dir(dir)?;
    }
    Ok(deleted)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot fsync data dir {}: {e}", dir.display()))
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

/// Extends the term runs `terms` with entry `index` of `term`, the next after their last.
fn push_term(terms: &mut Vec<(Index, Term)>, index: Index, term: Term) {
    if terms.last().map(|&(_, t)| t) != Some(term) {
        terms.push((index, term));
    }
}

fn encode_base(buf: &mut Vec<u8>, (index, term): (Index, Term)) {
    buf.push(RECORD_BASE);
    put_u64(buf, index);
    put_u64(buf, term);
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
        Payload::Config(m) => {
            let json = serde_json::to_vec(m).map_err(|e| format!("configuration: {e}"))?;
            let len = u32::try_from(json.len())
                .map_err(|_| format!("configuration of {} bytes is too long", json.len()))?;
            buf.push(KIND_CONFIG);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&json);
        }
    }
    Ok(())
}

/// A frame's header, as [`Storage::persist`] writes it; `header_crc` is computed, not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    magic: u64,
    offset: u64,
    seq: u64,
    len: u32,
    data_crc: u32,
}

impl FrameHeader {
    /// Writes the header, with its CRC, into the first [`FRAME_HEADER_LEN`] bytes of `out`.
    fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.magic.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..32].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[0..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
    }

    /// The header in `raw` if this WAL's writer put it at byte offset `at`; otherwise why not.
    fn ours(raw: &[u8], magic: u64, at: u64) -> Result<FrameHeader, String> {
        let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().unwrap());
        if u64_at(0) != magic {
            return Err("frame header does not carry this WAL's magic".into());
        }
        if crc32fast::hash(&raw[0..32]) != u32_at(32) {
            return Err("frame header fails its CRC check".into());
        }
        if u64_at(8) != at {
            return Err(format!("frame header names byte offset {}", u64_at(8)));
        }
        Ok(FrameHeader {
            magic,
            offset: at,
            seq: u64_at(16),
            len: u32_at(24),
            data_crc: u32_at(28),
        })
    }
}

/// The bytes of a new segment at `path`: the file header with a fresh random magic, then, if
/// `payload` is given, frame 1 holding it. Returns them and the magic.
fn new_segment_bytes(path: &Path, payload: Option<&[u8]>) -> Result<(Vec<u8>, u64), String> {
    let magic = getrandom::u64().map_err(|e| {
        format!(
            "cannot draw a random magic for a new {}: {e}",
            path.display()
        )
    })?;
    let mut bytes = Vec::with_capacity(WAL_HEADER_LEN as usize);
    bytes.extend_from_slice(&WAL_SIGNATURE);
    bytes.extend_from_slice(&WAL_VERSION.to_le_bytes());
    put_u64(&mut bytes, magic);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    if let Some(payload) = payload {
        let len = u32::try_from(payload.len()).expect("a first frame is small");
        let mut header = [0; FRAME_HEADER_LEN as usize];
        FrameHeader {
            magic,
            offset: WAL_HEADER_LEN,
            seq: 1,
            len,
            data_crc: crc32fast::hash(payload),
        }
        .encode(&mut header);
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(payload);
    }
    Ok((bytes, magic))
}

/// Creates the segment `path` holding `bytes`, under a temporary name first (synced, then
/// renamed into place), so a crash never leaves a segment without its header or first frame.
/// The file is [`SEGMENT_PREALLOC`] bytes long, zeros after `bytes`. Returns it open for
/// reading and writing, positioned after `bytes`. The caller syncs
/// the directory.
fn write_segment(path: &Path, bytes: &[u8]) -> Result<File, String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<File> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        write_zeros_to_prealloc(&mut f, bytes.len() as u64)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        f.seek(SeekFrom::Start(bytes.len() as u64))?;
        Ok(f)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot create {}: {e}", path.display())
    })
}

/// Writes zeros from `len`, where `f`'s write position is, up to [`SEGMENT_PREALLOC`].
fn write_zeros_to_prealloc(f: &mut File, mut len: u64) -> io::Result<()> {
    while len < SEGMENT_PREALLOC {
        let n = (SEGMENT_PREALLOC - len).min(ZEROS.len() as u64) as usize;
        f.write_all(&ZEROS[..n])?;
        len += n as u64;
    }
    Ok(())
}

/// Prepares segment `number` in `dir` for [`Storage::rotate_using`]: a header with a fresh
/// magic, then zeros to [`SEGMENT_PREALLOC`], synced, given its final name (never replacing a
/// file already there) and the directory synced. Returns false if segment `number` exists
/// already (the node thread created it meanwhile). Meant for a thread other than the one
/// persisting.
pub fn prepare_segment(dir: &Path, number: u64) -> Result<bool, String> {
    let spare = dir.join(SPARE_FILE);
    let path = segment_path(dir, number);
    let (header, _) = new_segment_bytes(&path, None)?;
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spare)?;
        f.write_all(&header)?;
        write_zeros_to_prealloc(&mut f, header.len() as u64)?;
        f.sync_all()
    };
    write().map_err(|e| format!("cannot prepare {}: {e}", spare.display()))?;
    // A link, unlike a rename, fails rather than replace a segment in use.
    let linked = match fs::hard_link(&spare, &path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            let _ = fs::remove_file(&spare);
            return Err(format!("cannot create {}: {e}", path.display()));
        }
    };
    fs::remove_file(&spare).map_err(|e| format!("cannot delete {}: {e}", spare.display()))?;
    if linked {
        sync_dir(dir)?;
    }
    Ok(linked)
}

/// Opens a segment [`prepare_segment`] made, for writing after its header; returns it and its
/// magic.
fn open_prepared(path: &Path) -> Result<(File, u64), String> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open the prepared segment {}: {e}", path.display()))?;
    let len = len_of(path, &f)?;
    if len < SEGMENT_PREALLOC {
        return Err(format!(
            "the prepared segment {} is {len} bytes, short of {SEGMENT_PREALLOC}",
            path.display()
        ));
    }
    let magic = read_wal_header(path, &mut f, len)?;
    Ok((f, magic))
}

/// How a segment that was never written to looks; it holds nothing that was synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unwritten {
    /// Only zeros after its header: a prepared segment no rotation took, or whose first frame
    /// never reached the disk.
    Zeros,
    /// A torn first frame with nothing of ours after it: a crash while writing it.
    Torn,
}

/// Whether segment `path` was never written to: only zeros after its header or, if
/// `torn_allowed`, a torn first frame with nothing of ours after it. A segment whose header
/// is damaged is not judged here; replay reports it.
fn never_written(path: &Path, torn_allowed: bool) -> Result<Option<Unwritten>, String> {
    let wal = path.display();
    let mut file = File::open(path).map_err(|e| format!("cannot open {wal}: {e}"))?;
    let file_len = len_of(path, &file)?;
    let Ok(magic) = read_wal_header(path, &mut file, file_len) else {
        return Ok(None);
    };
    let read_err = |e: io::Error| format!("{wal}: read failed near byte offset 24: {e}");
    let mut raw = [0; FRAME_HEADER_LEN as usize];
    let n = read_up_to(&mut file, &mut raw).map_err(read_err)?;
    if n == raw.len() {
        if let Ok(h) = FrameHeader::ours(&raw, magic, WAL_HEADER_LEN) {
            let mut payload = vec![0; h.len as usize];
            let n = read_up_to(&mut file, &mut payload).map_err(read_err)?;
            if n == payload.len() && crc32fast::hash(&payload) == h.data_crc {
                return Ok(None);
            }
        }
    }
    if zeros_from(&mut file, WAL_HEADER_LEN).map_err(read_err)? {
        return Ok(Some(Unwritten::Zeros));
    }
    let torn = torn_allowed
        && find_frame(&mut file, WAL_HEADER_LEN + 1, magic)
            .map_err(read_err)?
            .is_none();
    Ok(torn.then_some(Unwritten::Torn))
}

/// The length of `file`, opened from `path`.
fn len_of(path: &Path, file: &File) -> Result<u64, String> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))
}

/// Checks the WAL's file header; returns its magic.
fn read_wal_header(path: &Path, reader: &mut impl Read, file_len: u64) -> Result<u64, String> {
    let wal = path.display();
    let refuse_other_format = || {
        format!(
            "{wal}: not a WAL of format version {WAL_VERSION}: it does not start with a \
             {WAL_HEADER_LEN}-byte header beginning \"raft-wal\" (WALs of earlier versions have \
             none, and this build cannot read them); refusing to start"
        )
    };
    if file_len < WAL_HEADER_LEN {
        return Err(refuse_other_format());
    }
    let mut header = [0; WAL_HEADER_LEN as usize];
    reader
        .read_exact(&mut header)
        .map_err(|e| format!("{wal}: read failed near byte offset 0: {e}"))?;
    if header[0..8] != WAL_SIGNATURE {
        return Err(refuse_other_format());
    }
    if crc32fast::hash(&header[0..20]) != u32::from_le_bytes(header[20..24].try_into().unwrap()) {
        return Err(format!(
            "{wal}: the WAL header at byte offset 0 fails its CRC check; the WAL is corrupt, \
             refusing to start"
        ));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != WAL_VERSION {
        return Err(format!(
            "{wal}: WAL format version {version} (byte offset 8); this build reads only version \
             {WAL_VERSION}; refusing to start"
        ));
    }
    Ok(u64::from_le_bytes(header[12..20].try_into().unwrap()))
}

/// The log as replay rebuilds it, across segments.
struct LogState {
    hard_state: HardState,
    base: (Index, Term),
    /// The entries after the base: `entries[i].index == base.0 + i + 1`.
    entries: Vec<Entry>,
    /// The segments replayed so far; the last one is being replayed.
    segments: Vec<Segment>,
    /// True while the next record is the first of a segment: a base record there is the
    /// segment's own.
    at_segment_start: bool,
}

impl LogState {
    fn last_index(&self) -> Index {
        self.base.0 + self.entries.len() as Index
    }
}

/// Where replay of a segment ended.
struct SegmentEnd {
    /// The segment's magic, from its header.
    magic: u64,
    /// The `seq` of the next frame to write.
    next_seq: u64,
    /// End of the last good frame.
    valid_len: u64,
    /// Why the bytes from `valid_len` on are a torn write, if there are any.
    torn: Option<String>,
}

/// Replays the segment at `path` (the last of `log.segments`) into `log`. Only in the `newest`
/// segment may the last frame be torn, and not its first frame if it is the `only` one.
fn replay_segment(
    path: &Path,
    file: &mut File,
    log: &mut LogState,
    newest: bool,
    only: bool,
) -> Result<SegmentEnd, String> {
    let wal = path.display();
    let rotated = log.segments.last().is_some_and(|s| s.number > 0);
    let file_len = len_of(path, file)?;
    let read_err =
        |off: u64, e: io::Error| format!("{wal}: read failed near byte offset {off}: {e}");
    let mut reader = BufReader::with_capacity(READ_BUFFER, &mut *file);
    let magic = read_wal_header(path, &mut reader, file_len)?;
    // A guess at the entry count; the log grows past it if the entries are smaller.
    log.entries.reserve((file_len / 64) as usize);
    let mut payload = Vec::new();
    let mut off = WAL_HEADER_LEN;
    let mut seq = 1;

    // Why the frame at `off` is not intact, if it is not.
    let damage = loop {
        if off >= file_len {
            break None;
        }
        let remaining = file_len - off;
        if remaining < FRAME_HEADER_LEN {
            break Some(format!(
                "incomplete frame header ({remaining} of {FRAME_HEADER_LEN} bytes)"
            ));
        }
        let mut raw = [0; FRAME_HEADER_LEN as usize];
        reader.read_exact(&mut raw).map_err(|e| read_err(off, e))?;
        let header = match FrameHeader::ours(&raw, magic, off) {
            Ok(header) => header,
            Err(why) => break Some(why),
        };
        if header.seq != seq {
            // An intact header is a whole write of ours; in the wrong place in the sequence it
            // is no torn write.
            return Err(format!(
                "{wal}: frame at byte offset {off} is frame {} where frame {seq} was due; the \
                 WAL is corrupt",
                header.seq
            ));
        }
        let end = off + FRAME_HEADER_LEN + u64::from(header.len);
        if end > file_len {
            break Some(format!(
                "frame of {} bytes runs past the end of the file ({file_len} bytes)",
                header.len
            ));
        }
        payload.resize(header.len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(|e| read_err(off, e))?;
        if crc32fast::hash(&payload) != header.data_crc {
            break Some(format!("frame of {} bytes fails its CRC check", header.len));
        }
        if rotated && seq == 1 && payload.first() != Some(&RECORD_BASE) {
            return Err(format!(
                "{wal}: frame at byte offset {off} does not start with a base record, as the \
                 first frame of every segment after the first does; the WAL is corrupt"
            ));
        }
        log.at_segment_start = seq == 1;
        apply_frame(&payload, off + FRAME_HEADER_LEN, log)
            .map_err(|e| format!("{wal}: frame at byte offset {off}: {e}; the WAL is corrupt"))?;
        off = end;
        seq += 1;
    };

    // A preallocated segment ends in zeros where its next frame would go.
    let damage = match damage {
        Some(_) if zeros_from(file, off).map_err(|e| read_err(off, e))? => None,
        damage => damage,
    };
    let torn = match damage {
        None => None,
        Some(why) if !newest || (rotated && only && off == WAL_HEADER_LEN) => {
            let which = if newest {
                "the first frame of the only segment left, so it was synced before older \
                 ones were deleted"
            } else {
                "in a segment that is not the newest, so no torn write"
            };
            return Err(format!(
                "{wal}: frame at byte offset {off} is damaged ({why}): {which}; the WAL is \
                 corrupt, refusing to start"
            ));
        }
        Some(why) => match find_frame(file, off + 1, magic).map_err(|e| read_err(off, e))? {
            None => Some(why),
            Some(at) => {
                return Err(format!(
                    "{wal}: frame at byte offset {off} is damaged ({why}), yet a frame written \
                     after it starts at byte offset {at}; the WAL is corrupt (this is not a torn \
                     write), refusing to start"
                ))
            }
        },
    };
    if rotated && seq == 1 {
        return Err(format!(
            "{wal}: the segment has no frames, so not the base record that every segment after \
             the first starts with; the WAL is corrupt, refusing to start"
        ));
    }

    Ok(SegmentEnd {
        magic,
        next_seq: seq,
        valid_len: off,
        torn,
    })
}

/// Whether every byte from offset `from` to the end of the file is zero (a segment's
/// preallocated tail, or one that no write reached).
fn zeros_from(file: &mut File, from: u64) -> io::Result<bool> {
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, file);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        if buf.iter().any(|&b| b != 0) {
            return Ok(false);
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// The offset of the first frame header of ours at or after byte offset `from`, if any.
fn find_frame(file: &mut File, from: u64, magic: u64) -> io::Result<Option<u64>> {
    let header_len = FRAME_HEADER_LEN as usize;
    let magic_bytes = magic.to_le_bytes();
    file.seek(SeekFrom::Start(from))?;
    let mut chunk = vec![0; READ_BUFFER];
    // `chunk[..filled]` holds the file from byte offset `base` on.
    let mut base = from;
    let mut filled = 0;
    loop {
        let n = read_up_to(file, &mut chunk[filled..])?;
        let at_eof = filled + n < chunk.len();
        filled += n;
        if filled >= header_len {
            for at in 0..=filled - header_len {
                let raw = &chunk[at..at + header_len];
                if raw[0..8] == magic_bytes
                    && FrameHeader::ours(raw, magic, base + at as u64).is_ok()
                {
                    return Ok(Some(base + at as u64));
                }
            }
        }
        if at_eof {
            return Ok(None);
        }
        // Keep the bytes that could begin a header straddling the chunks.
        let keep = header_len - 1;
        chunk.copy_within(filled - keep..filled, 0);
        base += (filled - keep) as u64;
        filled = keep;
    }
}

/// Fills `buf` from `reader`, short only at the end of the input; returns how much it read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Applies one frame's records; `base` is the file offset of the payload, for error messages.
fn apply_frame(payload: &[u8], base: u64, log: &mut LogState) -> Result<(), String> {
    let mut d = Decoder {
        buf: payload,
        pos: 0,
    };
    while d.pos < payload.len() {
        let at = base + d.pos as u64;
        apply_record(&mut d, log).map_err(|e| format!("record at byte offset {at}: {e}"))?;
    }
    Ok(())
}

fn apply_record(d: &mut Decoder, log: &mut LogState) -> Result<(), String> {
    let at_segment_start = std::mem::take(&mut log.at_segment_start);
    match d.u8()? {
        RECORD_HARD_STATE => {
            let term = d.u64()?;
            let vote = d.u64()?;
            let commit = d.u64()?;
            log.hard_state = HardState {
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
                KIND_CONFIG => {
                    let len = d.u32()? as usize;
                    let membership = serde_json::from_slice(d.bytes(len)?)
                        .map_err(|e| format!("entry {index}: bad configuration: {e}"))?;
                    Payload::Config(membership)
                }
                kind => return Err(format!("entry {index}: unknown payload kind {kind}")),
            };
            let base = log.base.0;
            let last = log.last_index();
            if index <= base {
                return Err(format!(
                    "entry {index} is at or below the log's base index {base}"
                ));
            }
            if index <= last {
                log.entries.truncate((index - base - 1) as usize);
                note_cut(&mut log.segments, index - 1);
            } else if index != last + 1 {
                return Err(format!(
                    "entry {index} does not follow the last index {last}"
                ));
            }
            log.entries.push(Entry {
                index,
                term,
                payload,
            });
        }
        RECORD_BASE => {
            let index = d.u64()?;
            let term = d.u64()?;
            let (base, base_term) = log.base;
            let holds = (index, term) == (base, base_term)
                || (index > base
                    && index <= log.last_index()
                    && log.entries[(index - base - 1) as usize].term == term);
            if holds {
                log.entries.truncate((index - base) as usize);
            } else {
                log.entries.clear();
                log.base = (index, term);
            }
            note_cut(&mut log.segments, index);
            if at_segment_start {
                log.segments.last_mut().expect("a segment").base = Some((index, term));
            }
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
        assert!(prepare_segment(&dir.0, 1).unwrap());
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
        assert!(!prepare_segment(&dir.0, 2).unwrap());
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
        assert!(prepare_segment(&dir.0, 1).unwrap());
        drop(s);
        let (mut s, state, got) = open(&dir);
        assert!(!segment(&dir, 1).exists());
        assert_eq!((state.vote, indices(&got)), (Some(1), vec![1, 2, 3]));
        // Taken, but a crash came before the next persist wrote its first frame; the one
        // after it was prepared too. Compaction kept the segment before them.
        assert!(prepare_segment(&dir.0, 1).unwrap());
        s.rotate_using(&hs(1, Some(1), 3), (3, 1), true).unwrap();
        assert!(prepare_segment(&dir.0, 2).unwrap());
        assert!(s.compact_later(3).unwrap().is_empty());
        drop(s);
        let (mut s, state, got) = open(&dir);
        assert!(!segment(&dir, 1).exists() && !segment(&dir, 2).exists());
        assert_eq!((state.vote, indices(&got)), (Some(1), vec![1, 2, 3]));
        // Once the first frame is written, the segment replaces the ones before it.
        assert!(prepare_segment(&dir.0, 1).unwrap());
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
            assert!(prepare_segment(&src.0, 1).unwrap());
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
        let err = Storage::open(&dir.0, 1).err().expect("corruption refused");
        assert!(
            err.contains("wal.1") && err.contains("a frame written after it"),
            "{err}"
        );
        // As the only segment left there is nothing older it could replace: corruption too.
        let dir = TempDir::new("torn-alone");
        fs::create_dir_all(&dir.0).unwrap();
        fs::copy(src.0.join(NODE_ID_FILE), dir.0.join(NODE_ID_FILE)).unwrap();
        fs::write(segment(&dir, 1), &torn).unwrap();
        let err = Storage::open(&dir.0, 1).err().expect("corruption refused");
        assert!(err.contains("wal.1"), "{err}");
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
        assert!(prepare_segment(&dir.0, 1).unwrap());
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
        assert!(prepare_segment(&dir.0, 1).unwrap());
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
        let mut bytes = read_wal(&dir.wal());
        bytes.extend(frame(
            wal_magic(&dir),
            WAL_HEADER_LEN,
            1,
            &[RECORD_ENTRY, 1, 0, 0],
        ));
        fs::write(dir.wal(), &bytes).unwrap();
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains(&format!("byte offset {WAL_HEADER_LEN}")) && err.contains("truncated"),
            "{err}"
        );

        // An index gap is corruption too.
        let mut payload = Vec::new();
        encode_entry(&mut payload, &noop(2, 1)).unwrap();
        bytes.truncate(WAL_HEADER_LEN as usize);
        bytes.extend(frame(wal_magic(&dir), WAL_HEADER_LEN, 1, &payload));
        fs::write(dir.wal(), &bytes).unwrap();
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains("entry 2 does not follow the last index 0"),
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
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains(&format!(
                "byte offset {second} is frame 3 where frame 2 was due"
            )),
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
            let (_, _, log) =
                Storage::open(&dir.0, 1).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
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
        let err = Storage::open(&src.0, 1).err().unwrap();
        assert!(
            err.contains(&format!(
                "frame at byte offset {start} is damaged (frame of"
            )) && err.contains(&format!("starts at byte offset {forged_at}")),
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
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains(&format!("frame at byte offset {second} is damaged"))
                && err.contains(&format!("starts at byte offset {third}")),
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
            let err = Storage::open(&dir.0, 1).err().unwrap();
            assert!(
                err.contains(&format!("frame at byte offset {second} is damaged"))
                    && err.contains(&format!("starts at byte offset {third}")),
                "{before_boundary}: {err}"
            );
        }
    }

    #[test]
    fn wal_of_another_format_is_refused_naming_the_file() {
        let dir = TempDir::new("format");
        drop(open(&dir));
        let magic = wal_magic(&dir);
        let wal = dir.wal().display().to_string();
        // A version 1 WAL: frames of `len, crc, payload` from the first byte on.
        let mut payload = Vec::new();
        encode_entry(&mut payload, &noop(1, 1)).unwrap();
        let mut v1 = (payload.len() as u32).to_le_bytes().to_vec();
        v1.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        v1.extend_from_slice(&payload);
        let mut flipped = wal_header(WAL_VERSION, magic);
        flipped[15] ^= 4;
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("version 1", v1, "not a WAL of format version 2"),
            ("empty", Vec::new(), "not a WAL of format version 2"),
            (
                "short header",
                wal_header(WAL_VERSION, magic)[..20].to_vec(),
                "not a WAL",
            ),
            (
                "version 3",
                wal_header(3, magic),
                "WAL format version 3 (byte offset 8)",
            ),
            (
                "damaged header",
                flipped,
                "byte offset 0 fails its CRC check",
            ),
        ];
        for (what, bytes, expected) in cases {
            fs::write(dir.wal(), &bytes).unwrap();
            let err = Storage::open(&dir.0, 1).err().unwrap();
            assert!(
                err.contains(&wal) && err.contains(expected),
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
        let (numbers, mut leftovers) = list_segments(&dir.0).unwrap();
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
        assert!(s.rotate(&hs(2, None, 0), (2, 1)).is_err(), "below the base");
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
        let err = s.persist(None, &[noop(50, 3)]).unwrap_err();
        assert!(
            err.contains("entry 50") && err.contains("base index 50"),
            "{err}"
        );
        let err = s.persist(None, &[noop(52, 3)]).unwrap_err();
        assert!(err.contains("from 51 to 51"), "{err}");
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
        let err = Storage::open(&dir.0, 1).err().unwrap();
        let frame_at = old_len as usize - (FRAME_HEADER_LEN as usize + 2 * (1 + 17 + 20 + 2));
        assert!(
            err.contains(&format!(
                "{}: frame at byte offset {frame_at}",
                dir.wal().display()
            )) && err.contains("not the newest"),
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
        let err = Storage::open(&dir.0, 1).err().unwrap();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&format!("frame at byte offset {at}"))
                && err.contains("entry 5 is at or below the log's base index 5"),
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
        assert_eq!(list_segments(&dir.0).unwrap().0, vec![0]);
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
        assert_eq!(list_segments(&dir.0).unwrap().0, vec![2]);
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
        let (s, hard_state, got) = Storage::open(&dir.0, 1).map_err(|e| format!("refused: {e}"))?;
        let base = s.base();
        let expected: Vec<Entry> = want
            .entries
            .iter()
            .filter(|e| e.index > base.0)
            .cloned()
            .collect();
        let base_ok = base == want.base
            || (base.0 > want.base.0 && want.entries.iter().any(|e| (e.index, e.term) == base));
        let same = (hard_state.term, hard_state.vote)
            == (want.hard_state.term, want.hard_state.vote)
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
    fn through(rng: &mut crate::raft::rng::Rng, s: &Storage) -> Index {
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
                    if let (Err(e), Err(e2)) =
                        (opens_to(&image, &before), opens_to(&image, &synced))
                    {
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
                if prepare_segment(&dir.0, number).unwrap() && number == next {
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
                    counts[2] += delete_segments(&dir.0, &deferred.remove(0)).unwrap() as u64;
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
        println!(
            "persists, rotations into prepared segments, segments deleted, installs: {total:?}"
        );
        assert!(
            total.iter().all(|&c| c > 0),
            "a run must exercise every operation: {total:?}"
        );
    }
}
