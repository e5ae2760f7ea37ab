//! Durable hard state and Raft log for one peer: a CRC-framed, append-only write-ahead log in the
//! style of etcd's WAL, split into segments so that a log prefix in a snapshot can be deleted.
//!
//! # Files in the data directory
//! - `node_id`: the owning peer's ID as decimal text, written once when the directory is new.
//!   A directory that belongs to another peer is refused.
//! - `LOCK`: locked exclusively (`File::try_lock`) for the life of a [`Wal`], so that two
//!   processes never append to the same log.
//! - `wal`, `wal.1`, `wal.2`, ...: the log's segments, numbered 0 (`wal`), 1, 2, ... and
//!   replayed in that (numeric) order. Each is a complete WAL file of its own (its own header,
//!   magic and frame sequence). [`Wal::persist`] appends one frame to the newest;
//!   [`Wal::rotate`] starts the next; [`Wal::compact`] deletes the oldest ones, so the
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
//!         | 3: u8, n: u32, json: [u8; n]                                    Payload::User
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

use super::error::{At, NotTorn, RecordProblem, Refusal, StorageError, WalProblem};
use super::fs::{sync_dir, write_atomically, Fs, FsFile, Open};
use super::simfs::all_zeros;
use crate::raft::{Entry, HardState, Index, NodeId, Payload, Term};
use std::fs::TryLockError;
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
const KIND_USER: u8 = 3;

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
    /// The base record the segment starts with; every segment [`Wal::rotate`] writes has one.
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
fn list_segments(fs: &Fs, dir: &Path) -> Result<(Vec<u64>, Vec<PathBuf>), StorageError> {
    let read_err = |e| StorageError::io("list data dir", dir)(e);
    let mut numbers = Vec::new();
    let mut leftovers = Vec::new();
    for (name, path) in fs.list(dir).map_err(read_err)? {
        let name = name.as_str();
        if let Some(number) = segment_number(name) {
            numbers.push(number);
        } else if name == SPARE_FILE
            || name
                .strip_suffix(TMP_SUFFIX)
                .and_then(segment_number)
                .is_some()
        {
            leftovers.push(path);
        }
    }
    numbers.sort_unstable();
    Ok((numbers, leftovers))
}

/// The durable state of one peer. Dropping it closes the WAL and releases the directory lock.
pub struct Wal {
    /// The filesystem every file of the WAL is on.
    fs: Fs,
    dir: PathBuf,
    /// The segments, oldest first; the last one is `wal`, the one written to.
    segments: Vec<Segment>,
    /// The newest segment's path.
    wal_path: PathBuf,
    wal: FsFile,
    /// Holds the directory's exclusive lock for as long as it is open.
    _lock: FsFile,
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
    /// Set once a write or fsync failed, to its sentence. The file's contents are then unknown (a
    /// failed fsync may have dropped dirty pages), so every later persist is refused
    /// ([`Refusal::AfterFailure`]).
    failed: Option<String>,
    /// The frame being built, reused between calls.
    buf: Vec<u8>,
    /// Records (a base record and a hard state) that the newest segment's first frame starts
    /// with, not yet written: a rotation into a prepared segment leaves them to the next
    /// persist, whose one write and fdatasync make them durable with its own records.
    pending_first: Option<Vec<u8>>,
}

impl Wal {
    /// Opens (creating if missing) `dir`, takes an exclusive lock, checks it belongs to `node_id`,
    /// replays the WAL's segments. The entries returned start at [`Wal::base`]'s index + 1.
    pub fn open(dir: &Path, node_id: NodeId) -> Result<(Wal, HardState, Vec<Entry>), StorageError> {
        Wal::open_in(&Fs::Real, dir, node_id)
    }

    /// [`Wal::open`] on filesystem `fs`.
    pub fn open_in(
        fs: &Fs,
        dir: &Path,
        node_id: NodeId,
    ) -> Result<(Wal, HardState, Vec<Entry>), StorageError> {
        fs.create_dir_all(dir)
            .map_err(StorageError::io("create data dir", dir))?;
        let lock = lock_dir(fs, dir)?;
        let (mut numbers, leftovers) = list_segments(fs, dir)?;
        check_node_id(fs, dir, node_id, !numbers.is_empty())?;
        for leftover in &leftovers {
            log::warn!(
                "{}: deleting a segment left half-created by a crash",
                leftover.display()
            );
            fs.remove_file(leftover)
                .map_err(StorageError::io("delete", leftover))?;
        }

        drop_never_written(fs, dir, &mut numbers)?;

        if numbers.is_empty() {
            let wal_path = segment_path(dir, 0);
            let (bytes, _) = new_segment_bytes(&wal_path, None)?;
            drop(write_segment(fs, &wal_path, &bytes)?);
            sync_dir(fs, dir)?;
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
            let how = Open {
                write: number == newest,
                ..Open::READ
            };
            let mut file = fs
                .open(&path, how)
                .map_err(StorageError::io("open", &path))?;
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
                .map_err(StorageError::io_at(
                    &wal_path,
                    At::TruncateTo(end.valid_len),
                ))?;
        }
        wal.seek(SeekFrom::Start(end.valid_len))
            .map_err(StorageError::io("seek in", &wal_path))?;

        let last_index = log.base.0 + log.entries.len() as Index;
        log.hard_state.commit = log.hard_state.commit.min(last_index);
        log.entries.shrink_to_fit();
        let mut terms = Vec::new();
        for entry in &log.entries {
            push_term(&mut terms, entry.index, entry.term);
        }
        let storage = Wal {
            fs: fs.clone(),
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
    ) -> Result<(), StorageError> {
        if hard_state.is_none() && entries.is_empty() {
            return Ok(());
        }
        self.write_batch(None, hard_state, entries)
    }

    /// [`Wal::persist`]'s frame: the pending first frame's records (if any), a base record
    /// (if `base`), `hard_state` and `entries`, written and synced.
    fn write_batch(
        &mut self,
        base: Option<(Index, Term)>,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), StorageError> {
        self.check_not_failed()?;
        self.check_batch(hard_state, entries)?;

        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; FRAME_HEADER_LEN as usize]);
        if let Some(first) = &self.pending_first {
            buf.extend_from_slice(first);
        }
        if let Some(base) = base {
            encode_base(&mut buf, base);
        }
        if let Some(hs) = hard_state {
            encode_hard_state(&mut buf, hs);
        }
        for entry in entries {
            encode_entry(&mut buf, entry)
                .map_err(|refusal| StorageError::refused(&self.wal_path, refusal))?;
        }
        let payload_len = u32::try_from(buf.len() - FRAME_HEADER_LEN as usize).map_err(|_| {
            let refusal = Refusal::FrameTooBig { len: buf.len() };
            StorageError::refused(&self.wal_path, refusal)
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
    /// new one. It is the new segment's base record that later lets [`Wal::compact`] delete
    /// the older segments.
    pub fn rotate(
        &mut self,
        hard_state: &HardState,
        base: (Index, Term),
    ) -> Result<(), StorageError> {
        self.rotate_using(hard_state, base, false)
    }

    /// [`Wal::rotate`], into the segment [`prepare_segment`] made for
    /// [`Wal::next_segment_number`] if `prepared` (or, if that fails, creating one as
    /// `rotate` does).
    ///
    /// A prepared segment costs no sync here: its name is already durable, and its first frame
    /// is left to the next persist (or [`Wal::write_first_frame`]), whose fdatasync makes
    /// it durable with that persist's records. Until then a crash leaves the segment holding
    /// only zeros after its header, which the next open deletes; the older segments still
    /// hold the whole log, as [`Wal::compact_later`] keeps them until then.
    pub fn rotate_using(
        &mut self,
        hard_state: &HardState,
        base: (Index, Term),
        prepared: bool,
    ) -> Result<(), StorageError> {
        self.check_not_failed()?;
        self.check_batch(Some(hard_state), &[])?;
        if base.0 < self.base.0 {
            let refusal = Refusal::RotateBelowBase {
                index: base.0,
                base: self.base.0,
            };
            return Err(StorageError::refused(&self.wal_path, refusal));
        }
        // Every segment but the newest is durable whole (replay relies on it).
        self.write_first_frame()?;
        let number = self.next_segment_number();
        let path = segment_path(&self.dir, number);
        let mut payload = Vec::with_capacity(2 * 25);
        encode_base(&mut payload, base);
        encode_hard_state(&mut payload, hard_state);
        let taken = prepared.then(|| {
            open_prepared(&self.fs, &path).inspect_err(|e| {
                log::warn!("{e}; creating {} instead", path.display());
            })
        });
        let (file, magic, len, pending) = match taken {
            Some(Ok((file, magic))) => (file, magic, WAL_HEADER_LEN, Some(payload)),
            _ => {
                let (bytes, magic) = new_segment_bytes(&path, Some(&payload))?;
                let file = write_segment(&self.fs, &path, &bytes)?;
                // The new segment is in place: from here on the log is the one with it,
                // durable or not.
                if let Err(e) = sync_dir(&self.fs, &self.dir) {
                    self.failed = Some(e.to_string());
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
    pub fn write_first_frame(&mut self) -> Result<(), StorageError> {
        if self.pending_first.is_none() {
            return Ok(());
        }
        self.write_batch(None, None, &[])
    }

    /// What [`Wal::rotate`] does to the log, without a new segment: the base record `base`
    /// and `hard_state` written as one frame of the newest segment (replay applies a base
    /// record wherever it is). For when no segment can be made (a full disk): the frame
    /// usually fits in the segment's preallocated zeros. The older segments stay until a
    /// later rotation lets [`Wal::compact`] delete them.
    pub fn reset_in_place(
        &mut self,
        hard_state: &HardState,
        base: (Index, Term),
    ) -> Result<(), StorageError> {
        self.check_not_failed()?;
        if base.0 < self.base.0 {
            let refusal = Refusal::RotateBelowBase {
                index: base.0,
                base: self.base.0,
            };
            return Err(StorageError::refused(&self.wal_path, refusal));
        }
        self.write_batch(Some(base), Some(hard_state), &[])?;
        note_cut(&mut self.segments, base.0);
        if self.holds(base) {
            self.truncate_terms(base.0);
        } else {
            self.terms.clear();
            self.base = base;
        }
        self.last_index = base.0;
        Ok(())
    }

    /// The number the next segment takes: one more than the newest's.
    pub fn next_segment_number(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.number) + 1
    }

    /// Deletes the oldest segments, those whose entries are all at or below `through`;
    /// returns how many it deleted. The newest segment is never deleted.
    ///
    /// The segments before segment `k` go when `k`'s base record has an index at most `through`
    /// (the log then held nothing above that index from older segments) and the log was never
    /// cut back to or below that index after it (by a conflicting entry or a lower base), as
    /// replay starting at `k` would then not give this log; the latest such `k` is taken. The
    /// base then becomes `k`'s base, unless it is already higher. The segments are deleted
    /// newest first, so that after a crash midway replay still starts with a prefix of the old
    /// segments followed by `k` (which gives the same log above `k`'s base). On an error some
    /// of them may remain; a later call deletes them.
    pub fn compact(&mut self, through: Index) -> Result<usize, StorageError> {
        let doomed = self.compact_later(through)?;
        delete_segments(&self.fs, &self.dir, &doomed)
    }

    /// [`Wal::compact`] without the file work, which may then happen on another thread
    /// ([`delete_segments`]): forgets the segments wholly at or below `through` and returns
    /// their files, newest first. Until they are deleted, a restart replays them before the
    /// rest, which gives the same log.
    pub fn compact_later(&mut self, through: Index) -> Result<Vec<PathBuf>, StorageError> {
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

    /// The filesystem the WAL is on.
    pub fn fs(&self) -> &Fs {
        &self.fs
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

    fn check_not_failed(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(failure) => {
                let earlier = failure.clone();
                let refusal = Refusal::AfterFailure { earlier };
                Err(StorageError::refused(&self.wal_path, refusal))
            }
            None => Ok(()),
        }
    }

    /// Refuses a batch that replay would reject, so a bug upstream never makes the WAL unreadable.
    fn check_batch(
        &self,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), StorageError> {
        let refuse = |refusal| Err(StorageError::refused(&self.wal_path, refusal));
        if let Some(HardState { vote: Some(0), .. }) = hard_state {
            return refuse(Refusal::VoteForNodeZero);
        }
        if let Some(first) = entries.first() {
            if first.index <= self.base.0 || first.index > self.last_index + 1 {
                return refuse(Refusal::Append {
                    index: first.index,
                    base: self.base.0,
                    last: self.last_index,
                });
            }
        }
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return refuse(Refusal::NotConsecutive {
                    index: pair[1].index,
                    after: pair[0].index,
                });
            }
        }
        Ok(())
    }

    /// Appends one complete frame and syncs it. A write the disk had no space for is cut
    /// back off (nothing of it was synced, so the WAL is as before and the frame may be
    /// written again); any other failure marks the storage failed: after a failed fsync the
    /// state of the file's pages is unknown, and retrying it could report success for data
    /// the kernel dropped.
    fn write_frame(&mut self, frame: &[u8]) -> Result<(), StorageError> {
        let offset = self.wal_len;
        let len = frame.len();
        let written = self.wal.write_all(frame).map_err(StorageError::io_at(
            &self.wal_path,
            At::Write { offset, len },
        ));
        let result = written.and_then(|()| {
            self.wal
                .sync_data()
                .map_err(StorageError::io_at(&self.wal_path, At::Sync(offset)))
        });
        match result {
            Ok(()) => {
                self.wal_len += len as u64;
                Ok(())
            }
            Err(e) => {
                // Do not leave a partial frame in front of later frames.
                let cut = self
                    .wal
                    .set_len(offset)
                    .and_then(|()| self.wal.seek(SeekFrom::Start(offset)));
                let retryable = e.is_disk_full()
                    && matches!(
                        e,
                        StorageError::IoAt {
                            at: At::Write { .. },
                            ..
                        }
                    )
                    && cut.is_ok();
                if !retryable {
                    self.failed = Some(e.to_string());
                }
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
fn drop_never_written(fs: &Fs, dir: &Path, numbers: &mut Vec<u64>) -> Result<(), StorageError> {
    let mut doomed = Vec::new();
    while numbers.len() > 1 {
        let path = segment_path(dir, numbers[numbers.len() - 1]);
        let Some(how) = never_written(fs, &path, true)? else {
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
            never_written(fs, &path, false)?
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
        fs.remove_file(path)
            .map_err(StorageError::io("delete", path))?;
    }
    // No directory sync: a deleted segment that a power cut brings back holds nothing synced
    // and is deleted again at the next open, and every later name for its number (a segment
    // created or prepared) is made durable by a directory sync of its own, which makes this
    // deletion durable too.
    Ok(())
}

/// Creates (if needed) and locks the directory's LOCK file. Its name is not synced: it holds
/// nothing, and a power cut that takes it away also ends every process that held the lock.
fn lock_dir(fs: &Fs, dir: &Path) -> Result<FsFile, StorageError> {
    let path = dir.join(LOCK_FILE);
    let file = fs
        .open(&path, Open::RW_CREATE)
        .map_err(StorageError::io("open", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(StorageError::Locked {
                dir: dir.to_path_buf(),
            })
        }
        Err(TryLockError::Error(e)) => return Err(StorageError::io("lock", &path)(e)),
    }
    Ok(file)
}

/// Checks the directory's `node_id` file, writing it if the directory is new (`has_wal`: it
/// holds a WAL segment).
fn check_node_id(fs: &Fs, dir: &Path, node_id: NodeId, has_wal: bool) -> Result<(), StorageError> {
    let path = dir.join(NODE_ID_FILE);
    match fs.read_to_string(&path) {
        Ok(text) => {
            let found: NodeId = text.trim().parse().map_err(|_| {
                let problem = format!("expected a node ID, found {:?}", text.trim());
                StorageError::corrupt(&path, problem)
            })?;
            if found != node_id {
                return Err(StorageError::WrongNode {
                    dir: dir.to_path_buf(),
                    path,
                    found,
                    expected: node_id,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if has_wal {
                return Err(StorageError::NoNodeId {
                    dir: dir.to_path_buf(),
                });
            }
            write_atomically(fs, dir, NODE_ID_FILE, format!("{node_id}\n").as_bytes())
        }
        Err(e) => Err(StorageError::io("read", &path)(e)),
    }
}

/// Deletes WAL segment files, newest first (as [`Wal::compact_later`] lists them), each
/// deletion made durable (a directory sync) before the next, so that a power cut leaves a
/// prefix of the old segments before the one that made them redundant, which replays to the
/// same log above its base; a file already gone is fine. Returns how many it deleted.
///
/// Without that order, a filesystem that reorders directory updates could bring back an old
/// segment but not the next: replay would then start at that next one, whose own base record
/// may be followed by a conflict truncation below it, and refuse the WAL. The last deletion
/// needs no sync: what a power cut brings back is still such a prefix, deleted again at the
/// next compaction.
pub fn delete_segments(fs: &Fs, dir: &Path, doomed: &[PathBuf]) -> Result<usize, StorageError> {
    let mut deleted = 0;
    for (i, path) in doomed.iter().enumerate() {
        if i > 0 {
            sync_dir(fs, dir)?;
        }
        match fs.remove_file(path) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("delete", path)(e)),
        }
    }
    Ok(deleted)
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

/// Appends `entry` as a record; a refusal if it cannot be encoded.
fn encode_entry(buf: &mut Vec<u8>, entry: &Entry) -> Result<(), Refusal> {
    let unencodable = |why: String| Refusal::Unencodable(format!("entry {}: {why}", entry.index));
    buf.push(RECORD_ENTRY);
    put_u64(buf, entry.index);
    put_u64(buf, entry.term);
    match &entry.payload {
        Payload::Noop => buf.push(KIND_NOOP),
        Payload::Data { client, seq, data } => {
            let len = u32::try_from(data.len())
                .map_err(|_| unencodable(format!("data of {} bytes is too long", data.len())))?;
            buf.push(KIND_DATA);
            put_u64(buf, *client);
            put_u64(buf, *seq);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(data.as_bytes());
        }
        Payload::Config(m) => {
            let json =
                serde_json::to_vec(m).map_err(|e| unencodable(format!("configuration: {e}")))?;
            let len = u32::try_from(json.len()).map_err(|_| {
                unencodable(format!("configuration of {} bytes is too long", json.len()))
            })?;
            buf.push(KIND_CONFIG);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&json);
        }
        Payload::User(u) => {
            // A name and a role, never a key (see raft::users).
            let json = serde_json::to_vec(u).map_err(|e| unencodable(format!("user: {e}")))?;
            buf.push(KIND_USER);
            buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
            buf.extend_from_slice(&json);
        }
    }
    Ok(())
}

/// A frame's header, as [`Wal::persist`] writes it; `header_crc` is computed, not stored.
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
fn new_segment_bytes(path: &Path, payload: Option<&[u8]>) -> Result<(Vec<u8>, u64), StorageError> {
    let magic = getrandom::u64().map_err(|e| {
        StorageError::io("draw a random magic for a new", path)(io::Error::other(e))
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
fn write_segment(fs: &Fs, path: &Path, bytes: &[u8]) -> Result<FsFile, StorageError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<FsFile> {
        let how = Open {
            truncate: true,
            ..Open::RW_CREATE
        };
        let mut f = fs.open(&tmp, how)?;
        f.write_all(bytes)?;
        write_zeros_to_prealloc(fs, &mut f, bytes.len() as u64)?;
        f.sync_all()?;
        fs.rename(&tmp, path)?;
        f.seek(SeekFrom::Start(bytes.len() as u64))?;
        Ok(f)
    };
    write().map_err(|e| {
        let _ = fs.remove_file(&tmp);
        StorageError::io("create", path)(e)
    })
}

/// The length segments are created with on `fs`: [`SEGMENT_PREALLOC`], unless a simulated
/// filesystem asks for less.
fn segment_prealloc(fs: &Fs) -> u64 {
    match fs {
        Fs::Sim(sim) => sim.segment_prealloc().unwrap_or(SEGMENT_PREALLOC),
        Fs::Real => SEGMENT_PREALLOC,
    }
}

/// Writes zeros from `len`, where `f`'s write position is, up to the preallocated length.
fn write_zeros_to_prealloc(fs: &Fs, f: &mut FsFile, mut len: u64) -> io::Result<()> {
    let prealloc = segment_prealloc(fs);
    while len < prealloc {
        let n = (prealloc - len).min(ZEROS.len() as u64) as usize;
        f.write_all(&ZEROS[..n])?;
        len += n as u64;
    }
    Ok(())
}

/// Prepares segment `number` in `dir` for [`Wal::rotate_using`]: a header with a fresh
/// magic, then zeros to [`SEGMENT_PREALLOC`], synced, given its final name (never replacing a
/// file already there) and the directory synced. Returns false if segment `number` exists
/// already (the node thread created it meanwhile). Meant for a thread other than the one
/// persisting.
pub fn prepare_segment(fs: &Fs, dir: &Path, number: u64) -> Result<bool, StorageError> {
    let spare = dir.join(SPARE_FILE);
    let path = segment_path(dir, number);
    let (header, _) = new_segment_bytes(&path, None)?;
    let write = || -> io::Result<()> {
        let how = Open {
            truncate: true,
            ..Open::RW_CREATE
        };
        let mut f = fs.open(&spare, how)?;
        f.write_all(&header)?;
        write_zeros_to_prealloc(fs, &mut f, header.len() as u64)?;
        f.sync_all()
    };
    write().map_err(StorageError::io("prepare", &spare))?;
    // A link, unlike a rename, fails rather than replace a segment in use.
    let linked = match fs.hard_link(&spare, &path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            let _ = fs.remove_file(&spare);
            return Err(StorageError::io("create", &path)(e));
        }
    };
    fs.remove_file(&spare)
        .map_err(StorageError::io("delete", &spare))?;
    if linked {
        sync_dir(fs, dir)?;
    }
    Ok(linked)
}

/// Opens a segment [`prepare_segment`] made, for writing after its header; returns it and its
/// magic.
fn open_prepared(fs: &Fs, path: &Path) -> Result<(FsFile, u64), StorageError> {
    let how = Open {
        write: true,
        ..Open::READ
    };
    let mut f = fs
        .open(path, how)
        .map_err(StorageError::io("open the prepared segment", path))?;
    let len = len_of(path, &f)?;
    let min = segment_prealloc(fs);
    if len < min {
        return Err(StorageError::wal(
            path,
            WalProblem::ShortPrepared { len, min },
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
fn never_written(
    fs: &Fs,
    path: &Path,
    torn_allowed: bool,
) -> Result<Option<Unwritten>, StorageError> {
    let mut file = fs
        .open(path, Open::READ)
        .map_err(StorageError::io("open", path))?;
    let file_len = len_of(path, &file)?;
    let Ok(magic) = read_wal_header(path, &mut file, file_len) else {
        return Ok(None);
    };
    let read_err = |e| StorageError::io_at(path, At::ReadNear(WAL_HEADER_LEN))(e);
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
fn len_of(path: &Path, file: &FsFile) -> Result<u64, StorageError> {
    file.size().map_err(StorageError::io("stat", path))
}

/// Checks the WAL's file header; returns its magic.
fn read_wal_header(
    path: &Path,
    reader: &mut impl Read,
    file_len: u64,
) -> Result<u64, StorageError> {
    if file_len < WAL_HEADER_LEN {
        return Err(StorageError::wal(path, WalProblem::NoHeader));
    }
    let mut header = [0; WAL_HEADER_LEN as usize];
    reader
        .read_exact(&mut header)
        .map_err(StorageError::io_at(path, At::ReadNear(0)))?;
    if header[0..8] != WAL_SIGNATURE {
        return Err(StorageError::wal(path, WalProblem::NoHeader));
    }
    if crc32fast::hash(&header[0..20]) != u32::from_le_bytes(header[20..24].try_into().unwrap()) {
        return Err(StorageError::wal(path, WalProblem::HeaderCrc));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != WAL_VERSION {
        return Err(StorageError::wal(path, WalProblem::Version(version)));
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
    file: &mut FsFile,
    log: &mut LogState,
    newest: bool,
    only: bool,
) -> Result<SegmentEnd, StorageError> {
    let rotated = log.segments.last().is_some_and(|s| s.number > 0);
    let file_len = len_of(path, file)?;
    let read_err = |off: u64, e| StorageError::io_at(path, At::ReadNear(off))(e);
    let corrupt = |problem| Err(StorageError::wal(path, problem));
    let mut reader = BufReader::with_capacity(read_buffer(file_len, 0), &mut *file);
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
            return corrupt(WalProblem::OutOfSequence {
                offset: off,
                found: header.seq,
                due: seq,
            });
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
            return corrupt(WalProblem::NoBaseRecord { offset: off });
        }
        log.at_segment_start = seq == 1;
        if let Err((at, problem)) = apply_frame(&payload, off + FRAME_HEADER_LEN, log) {
            return corrupt(WalProblem::BadRecord {
                frame: off,
                offset: at,
                problem,
            });
        }
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
            return corrupt(WalProblem::Damaged {
                offset: off,
                damage: why,
                not_torn: if newest {
                    NotTorn::OnlySegment
                } else {
                    NotTorn::NotNewest
                },
            });
        }
        Some(why) => match find_frame(file, off + 1, magic).map_err(|e| read_err(off, e))? {
            None => Some(why),
            Some(at) => {
                return corrupt(WalProblem::Damaged {
                    offset: off,
                    damage: why,
                    not_torn: NotTorn::LaterFrame { at },
                })
            }
        },
    };
    if rotated && seq == 1 {
        return corrupt(WalProblem::NoFrames);
    }

    Ok(SegmentEnd {
        magic,
        next_seq: seq,
        valid_len: off,
        torn,
    })
}

/// A read buffer for the bytes of a file `len` long from `from` on: [`READ_BUFFER`] at most,
/// and no bigger than they need (each fill of a buffered reader zeroes all of it first).
fn read_buffer(len: u64, from: u64) -> usize {
    (len.saturating_sub(from) as usize).clamp(8 << 10, READ_BUFFER)
}

/// Whether every byte from offset `from` to the end of the file is zero (a segment's
/// preallocated tail, or one that no write reached).
fn zeros_from(file: &mut FsFile, from: u64) -> io::Result<bool> {
    file.seek(SeekFrom::Start(from))?;
    let len = file.size()?;
    let mut reader = BufReader::with_capacity(read_buffer(len, from), file);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        if !all_zeros(buf) {
            return Ok(false);
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// The offset of the first frame header of ours at or after byte offset `from`, if any.
fn find_frame(file: &mut FsFile, from: u64, magic: u64) -> io::Result<Option<u64>> {
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

/// Applies one frame's records; `base` is the file offset of the payload. An error gives the
/// file offset of the record at fault, and what is wrong with it.
fn apply_frame(payload: &[u8], base: u64, log: &mut LogState) -> Result<(), (u64, RecordProblem)> {
    let mut d = Decoder {
        buf: payload,
        pos: 0,
    };
    while d.pos < payload.len() {
        let at = base + d.pos as u64;
        apply_record(&mut d, log).map_err(|problem| (at, problem))?;
    }
    Ok(())
}

fn apply_record(d: &mut Decoder, log: &mut LogState) -> Result<(), RecordProblem> {
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
                        .map_err(|source| RecordProblem::NotUtf8 { index, source })?
                        .to_owned();
                    Payload::Data { client, seq, data }
                }
                KIND_CONFIG => {
                    let len = d.u32()? as usize;
                    let membership = serde_json::from_slice(d.bytes(len)?)
                        .map_err(|source| RecordProblem::BadConfig { index, source })?;
                    Payload::Config(membership)
                }
                KIND_USER => {
                    let len = d.u32()? as usize;
                    let change = serde_json::from_slice(d.bytes(len)?)
                        .map_err(|source| RecordProblem::BadConfig { index, source })?;
                    Payload::User(change)
                }
                kind => return Err(RecordProblem::UnknownKind { index, kind }),
            };
            let base = log.base.0;
            let last = log.last_index();
            if index <= base {
                return Err(RecordProblem::AtOrBelowBase { index, base });
            }
            if index <= last {
                log.entries.truncate((index - base - 1) as usize);
                note_cut(&mut log.segments, index - 1);
            } else if index != last + 1 {
                return Err(RecordProblem::NotNext { index, last });
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
        tag => return Err(RecordProblem::UnknownType(tag)),
    }
    Ok(())
}

/// Reads little-endian values from a frame's payload.
struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], RecordProblem> {
        let rest = self.buf.len() - self.pos;
        if n > rest {
            return Err(RecordProblem::Truncated {
                needs: n,
                has: rest,
            });
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, RecordProblem> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, RecordProblem> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, RecordProblem> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests;
