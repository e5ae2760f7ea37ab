//! The applied records on disk: the replicated state machine is the applied log itself, so the
//! store is an append-only file of [`LogRecord`]s, one line each, plus its snapshots.
//!
//! # Files in the data directory
//! - `store.current`: one line naming the current store directory (`store.<n>`). Replaced
//!   atomically (temp file, fsync, rename, directory fsync); created pointing at an empty
//!   `store.1` when missing.
//! - `store.<n>/records`: record `i` is line `i`: its JSON, a TAB, the CRC-32 of the JSON as 8
//!   lowercase hex digits, `\n`. serde_json escapes control characters, so client data cannot
//!   forge a TAB or a newline; and the bytes are deterministic, so peers that applied the same
//!   entries hold byte-identical files.
//! - `store.<n>/index`: the byte offsets (u64 little-endian) of records 1, 1+K, 1+2K, ...
//!   (K = [`INDEX_EVERY`]), also kept in memory, so a read seeks to near its first record.
//! - `store.<n>/snapshot.json`: the latest [`SnapshotMeta`], in the records' line format so a
//!   flipped bit is detected, replaced atomically. The records up to its `records_len` (and the
//!   index covering them) were made durable before it was written.
//! - `install/`: a snapshot being received, staged until it is complete and verified, then
//!   renamed to `store.<n+1>` and made current.
//!
//! Appends are buffered and never synced on their own: records after the latest snapshot are
//! cut off on open (the core re-applies them from the WAL).

use super::error::{At, Lost, Refusal, StorageError};
use super::fs::{
    exists, open_rw, remove_if_exists, replace_file, sync_dir, tmp_name, write_atomically,
    write_error, Fs, FsFile, Open,
};
use crate::raft::{Index, LogRecord, SnapshotId, SnapshotMeta, SnapshotState, Term};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use crc32fast::Hasher;
use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const CURRENT_FILE: &str = "store.current";
const STORE_PREFIX: &str = "store.";
const RECORDS_FILE: &str = "records";
const INDEX_FILE: &str = "index";
const SNAPSHOT_FILE: &str = "snapshot.json";
const INSTALL_DIR: &str = "install";
/// In `install/`: the [`SnapshotId`] being received, in the records' line format.
const STAGED_ID_FILE: &str = "id.json";

/// Records between two offsets in the sparse index.
pub const INDEX_EVERY: u64 = 256;
/// Bytes of framing after a line's JSON: TAB, 8 hex digits, newline.
const LINE_SUFFIX: usize = 10;
/// Write buffer for appends.
const WRITE_BUFFER: usize = 1 << 20;
/// Read buffer for pages, chunks and scans.
const READ_BUFFER: usize = 64 << 10;
/// No record line is longer than this: entries arrive in datagrams, so a longer "line" can only
/// be damage (and a parser must not buffer without bound while looking for its end).
const MAX_LINE: usize = 16 << 20;
/// A receiver fdatasyncs staged records every this many bytes, so the final sync is short.
pub const SYNC_EVERY: u64 = 16 << 20;

/// The applied records of one peer, their sparse index and latest snapshot, and the staging
/// area for a snapshot being received.
pub struct Store {
    fs: Fs,
    data_dir: PathBuf,
    cur: Current,
    /// The snapshot being received, if any.
    staging: Option<Staging>,
}

/// What [`Store::receive_chunk`] did with a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// The staging area holds `[0, have)` of the stream: the next chunk must start there.
    Partial { have: u64 },
    /// Verified, durable, and now the current store: the caller hands `meta` to the core.
    Installed { meta: SnapshotMeta },
}

/// A snapshot whose records are handed to the OS and whose meta file is built, to be made
/// durable by [`SnapshotJob::write`] (away from the node thread: it is a few fsyncs).
pub struct SnapshotJob {
    fs: Fs,
    store_dir: PathBuf,
    records: FsFile,
    index: FsFile,
    records_path: PathBuf,
    meta: SnapshotMeta,
    id: SnapshotId,
    bytes: Vec<u8>,
}

impl SnapshotJob {
    /// Syncs the records and the sparse index up to the snapshot (later appends may be synced
    /// too; a restart cuts them back), then writes `snapshot.json` atomically.
    pub fn write(self) -> Result<SnapshotJob, StorageError> {
        self.records
            .sync_data()
            .map_err(StorageError::io("fdatasync", &self.records_path))?;
        self.index.sync_data().map_err(StorageError::io(
            "fdatasync",
            &self.store_dir.join(INDEX_FILE),
        ))?;
        write_atomically(&self.fs, &self.store_dir, SNAPSHOT_FILE, &self.bytes)?;
        Ok(self)
    }
}

/// The latest snapshot of the current store.
struct Snapshot {
    meta: SnapshotMeta,
    id: SnapshotId,
    /// The bytes of `snapshot.json`: the tail of the snapshot's stream.
    bytes: Vec<u8>,
}

/// One open store directory.
struct Current {
    fs: Fs,
    number: u64,
    dir: PathBuf,
    records_path: PathBuf,
    index_path: PathBuf,
    records: BufWriter<FsFile>,
    /// A second handle on `records` for reads.
    reader: FsFile,
    index: BufWriter<FsFile>,
    /// Bytes of records appended (some possibly still in `records`' buffer).
    records_len: u64,
    /// Whether `records` holds bytes not yet handed to the OS.
    unflushed: bool,
    /// CRC-32 of the records bytes `[0, records_len)`.
    crc: Hasher,
    last_index: Index,
    last_term: Term,
    /// Byte offsets of records 1, 1+K, 1+2K, ...
    sparse: Vec<u64>,
    snapshot: Option<Snapshot>,
    /// Set once a write failed, to its sentence: what reached the file is then unknown, so
    /// writes are refused ([`Refusal::AfterFailure`]).
    failed: Option<String>,
}

impl Store {
    /// Opens (creating) the data dir's current store. If it has a snapshot, the records file is
    /// cut back to the snapshot's `records_len` (records after it were never synced; the core
    /// re-applies them from the WAL) and the running CRC resumes from `meta.records_crc`;
    /// without a snapshot, the store is cut back to empty. Returns the snapshot, if any, with
    /// its [`SnapshotId`].
    pub fn open(
        data_dir: &Path,
    ) -> Result<(Store, Option<(SnapshotMeta, SnapshotId)>), StorageError> {
        Store::open_in(&Fs::Real, data_dir)
    }

    /// [`Store::open`] on filesystem `fs`.
    pub fn open_in(
        fs: &Fs,
        data_dir: &Path,
    ) -> Result<(Store, Option<(SnapshotMeta, SnapshotId)>), StorageError> {
        fs.create_dir_all(data_dir)
            .map_err(StorageError::io("create data dir", data_dir))?;
        let number = current_number(fs, data_dir)?;
        // Opened first: a `store.current` naming a directory that is not there is damage,
        // and the other stores may then hold the data; they are left alone.
        let cur = Current::open(fs, data_dir, number)?;
        remove_other_stores(fs, data_dir, number)?;
        let snapshot = cur.snapshot.as_ref().map(|s| (s.meta.clone(), s.id));
        let staging = Staging::resume(fs, &data_dir.join(INSTALL_DIR))?;
        let store = Store {
            fs: fs.clone(),
            data_dir: data_dir.to_path_buf(),
            cur,
            staging,
        };
        Ok((store, snapshot))
    }

    /// Hands the buffered records and sparse index to the OS (not synced), so that a full
    /// disk shows now rather than at a later append.
    pub fn flush(&mut self) -> Result<(), StorageError> {
        self.cur.flush_records()?;
        let flushed = self.cur.index.flush();
        let flushed = flushed.map_err(|e| write_error(&self.cur.index_path, e));
        self.cur.note(flushed)
    }

    /// Index of the last record appended (0 if none).
    pub fn last_index(&self) -> Index {
        self.cur.last_index
    }

    /// Appends records (the first must be `last_index() + 1`, consecutive, terms never going
    /// down). Buffered; not synced.
    pub fn append(&mut self, records: &[LogRecord]) -> Result<(), StorageError> {
        self.cur.append(records)
    }

    /// A page of records from `start` (>= 1) up to `read_index` (<= `last_index()`), stopping
    /// before the total JSON length of the records would exceed `budget` bytes (but with at
    /// least one record); `next` is `Some(first index not returned)` when it stopped early.
    pub fn read_page(
        &mut self,
        start: Index,
        read_index: Index,
        budget: usize,
    ) -> Result<(Vec<LogRecord>, Option<Index>), StorageError> {
        self.cur.read_page(start, read_index, budget)
    }

    /// Makes everything up to `state.index` durable and records it as the latest snapshot
    /// (requires `state.index == last_index()` and `state.term` the last record's term).
    /// Returns its ID.
    pub fn write_snapshot(&mut self, state: &SnapshotState) -> Result<SnapshotId, StorageError> {
        let job = self.begin_snapshot(state)?.write()?;
        Ok(self.finish_snapshot(job).expect("same store"))
    }

    /// The part of [`Store::write_snapshot`] that must happen in order with appends: hands the
    /// buffered records to the OS and builds the meta file. The returned job's
    /// [`SnapshotJob::write`] (the fsyncs, on any thread) makes it durable, and
    /// [`Store::finish_snapshot`] then makes it the snapshot this store serves.
    pub fn begin_snapshot(&mut self, state: &SnapshotState) -> Result<SnapshotJob, StorageError> {
        self.cur.begin_snapshot(state)
    }

    /// Records a written snapshot as the latest; None if the store it was taken of has been
    /// replaced by an installed snapshot meanwhile.
    pub fn finish_snapshot(&mut self, job: SnapshotJob) -> Option<SnapshotId> {
        if job.store_dir != self.cur.dir {
            return None;
        }
        let id = job.id;
        self.cur.snapshot = Some(Snapshot {
            meta: job.meta,
            id,
            bytes: job.bytes,
        });
        Some(id)
    }

    /// The latest snapshot's ID, if any.
    pub fn snapshot_id(&self) -> Option<SnapshotId> {
        self.cur.snapshot.as_ref().map(|s| s.id)
    }

    /// Exactly the bytes `[offset, offset + len)` of snapshot `id`'s stream: the records
    /// `[0, records_len)`, then the bytes of `snapshot.json`. `len` is clamped to the stream's
    /// end. Fails if `id` is not the current snapshot (it was superseded).
    pub fn read_chunk(
        &mut self,
        id: &SnapshotId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        self.cur.read_chunk(id, offset, len)
    }
    /// Takes the chunk of snapshot `id`'s stream at `offset`, staging it in `install/`. A chunk
    /// that does not start where the staged bytes end is dropped (the sender goes back to
    /// `have`). Bytes are verified as they arrive; bad ones reset the staging area to empty.
    /// The last chunk installs the snapshot as the new current store.
    pub fn receive_chunk(
        &mut self,
        id: &SnapshotId,
        offset: u64,
        data: &[u8],
    ) -> Result<Received, StorageError> {
        let install = self.data_dir.join(INSTALL_DIR);
        let total = id.records_len.checked_add(id.meta_len);
        let Some(total) =
            total.filter(|_| id.meta_len > 0 && (id.index == 0) == (id.records_len == 0))
        else {
            let refusal = Refusal::ImpossibleLengths {
                index: id.index,
                term: id.term,
                records_len: id.records_len,
                meta_len: id.meta_len,
            };
            return Err(StorageError::refused(&install, refusal));
        };
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > total) {
            let refusal = Refusal::ChunkPastEnd {
                len: data.len(),
                offset,
                index: id.index,
                total,
            };
            return Err(StorageError::refused(&install, refusal));
        }
        // On an error the staged files are in an unknown state and the staging area is
        // dropped (the next chunk starts over), except for an install a full disk held back.
        self.receive(&install, id, offset, data)
    }

    fn receive(
        &mut self,
        install: &Path,
        id: &SnapshotId,
        offset: u64,
        data: &[u8],
    ) -> Result<Received, StorageError> {
        let staging = match self.staging.take() {
            Some(staging) if staging.id == *id => staging,
            Some(mut staging) => {
                if staging.records_have <= id.records_len {
                    // Committed records never change: the prefix received is the new stream's too.
                    log::info!(
                        "{}: now receiving snapshot {} (term {}); keeping the {} bytes of records \
                         staged for snapshot {}",
                        install.display(),
                        id.index,
                        id.term,
                        staging.records_have,
                        staging.id.index
                    );
                    staging.meta.clear();
                } else {
                    staging.reset()?;
                }
                staging.set_id(id)?;
                staging
            }
            None => Staging::create(&self.fs, install, id)?,
        };
        let staging = self.staging.insert(staging);
        let have = staging.have();
        if offset != have || data.is_empty() {
            return Ok(Received::Partial { have });
        }
        let verdict = match staging.take(data) {
            Err(Fault::Io(e)) => {
                self.staging = None;
                return Err(e);
            }
            Err(Fault::Bad(reason)) => Err(reason),
            Ok(()) if staging.meta.len() as u64 == id.meta_len => staging.check_meta().map(Some),
            Ok(()) => Ok(None),
        };
        match verdict {
            Ok(None) => Ok(Received::Partial {
                have: staging.have(),
            }),
            Ok(Some(meta)) => self.install(meta).map(|meta| Received::Installed { meta }),
            Err(reason) => {
                log::warn!(
                    "{}: snapshot {} (term {}) failed verification: {reason}; starting over",
                    install.display(),
                    id.index,
                    id.term
                );
                if let Err(e) = staging.reset() {
                    self.staging = None;
                    return Err(e);
                }
                Ok(Received::Partial { have: 0 })
            }
        }
    }

    /// Makes the complete, verified staging area the current store: durable first, then
    /// renamed to `store.<n+1>`, then named by `store.current`; the old store is deleted.
    ///
    /// A full disk before `store.current` names the new store leaves the old one current and
    /// intact: the staged snapshot goes back to `install/` and is kept (its meta part to be
    /// sent again, which retries the install), and the error says the disk is full. Once
    /// `store.current` may name the new store, any failure stops the store for good (which
    /// store a restart finds current is unknown).
    fn install(&mut self, meta: SnapshotMeta) -> Result<SnapshotMeta, StorageError> {
        let Some(mut staging) = self.staging.take() else {
            return Err(StorageError::refused(
                &self.data_dir,
                Refusal::NothingStaged,
            ));
        };
        staging.finish()?;
        let install = staging.dir.clone();

        let next = self.cur.number + 1;
        let dir = self.data_dir.join(format!("{STORE_PREFIX}{next}"));
        let fs = &self.fs;
        if exists(fs, &dir)? {
            fs.remove_dir_all(&dir)
                .map_err(StorageError::io("remove", &dir))?;
        }
        if let Err(e) = fs.rename(&install, &dir) {
            let e = StorageError::io_at(&install, At::RenameTo(dir.clone()))(e);
            if e.is_disk_full() {
                staging.meta.clear();
                self.staging = Some(staging);
            }
            return Err(e);
        }
        if let Err(e) = sync_dir(fs, &self.data_dir) {
            self.cur.failed = Some(e.to_string());
            return Err(e);
        }
        let current = format!("{STORE_PREFIX}{next}\n");
        match replace_file(fs, &self.data_dir, CURRENT_FILE, current.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.is_disk_full() => {
                // `store.current` still names the old store. Should the way back fail, the
                // new store is a leftover that the next open or install removes.
                if fs.rename(&dir, &install).is_ok() {
                    staging.meta.clear();
                    self.staging = Some(staging);
                }
                return Err(e);
            }
            Err(e) => {
                self.cur.failed = Some(e.to_string());
                return Err(e);
            }
        }
        drop(staging);
        let switched =
            sync_dir(fs, &self.data_dir).and_then(|()| Current::open(fs, &self.data_dir, next));
        let cur = match switched {
            Ok(cur) => cur,
            Err(e) => {
                // Which store a restart finds current is unknown: write nothing more here.
                self.cur.failed = Some(e.to_string());
                return Err(e);
            }
        };
        let old = std::mem::replace(&mut self.cur, cur);
        let old_dir = old.dir.clone();
        drop(old);
        if let Err(e) = self.fs.remove_dir_all(&old_dir) {
            log::warn!(
                "cannot remove the replaced store {}: {e}",
                old_dir.display()
            );
        }
        if let Err(e) = remove_if_exists(&self.fs, &dir.join(STAGED_ID_FILE)) {
            log::warn!("{e}");
        }
        Ok(meta)
    }

    /// Bytes of `id`'s stream the staging area holds contiguously from 0 (0 if it holds
    /// nothing for it): where a sender of `id` should start.
    pub fn staged(&self, id: &SnapshotId) -> u64 {
        match &self.staging {
            Some(staging) if staging.id == *id => staging.have(),
            Some(staging) if staging.records_have <= id.records_len => staging.records_have,
            _ => 0,
        }
    }
}

/// Base64 (standard alphabet) text of a snapshot chunk, and the chunk's CRC-32.
pub fn encode_chunk(bytes: &[u8]) -> (String, u32) {
    (STANDARD.encode(bytes), crc32fast::hash(bytes))
}

/// The bytes of a chunk [`encode_chunk`] made, checked against its CRC-32.
pub fn decode_chunk(text: &str, crc: u32) -> Result<Vec<u8>, StorageError> {
    let bytes = STANDARD.decode(text).map_err(|e| StorageError::BadChunk {
        problem: format!("bad base64: {e}"),
    })?;
    let got = crc32fast::hash(&bytes);
    if got != crc {
        return Err(StorageError::BadChunk {
            problem: format!(
                "CRC mismatch: sent {crc:08x}, its {} bytes have {got:08x}",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

/// Why staged bytes were not taken.
enum Fault {
    /// They are not a valid stream: start over.
    Bad(Damage),
    /// Reading or writing the staging area failed.
    Io(StorageError),
}

/// What is wrong with bytes that are not what was written (a line, a meta file, a staged
/// stream), found where the file is not known or not named: `problem` is a phrase such as
/// "CRC mismatch: ...", and `offset` the byte offset it names, if any. [`Damage::in_file`]
/// makes it an error naming the file.
#[derive(Debug)]
struct Damage {
    offset: Option<u64>,
    problem: String,
}

impl Damage {
    fn new(problem: impl Into<String>) -> Damage {
        Damage {
            offset: None,
            problem: problem.into(),
        }
    }

    fn at(offset: u64, problem: impl Into<String>) -> Damage {
        Damage {
            offset: Some(offset),
            problem: problem.into(),
        }
    }

    fn in_file(self, path: &Path) -> StorageError {
        StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: self.offset,
            problem: self.problem,
        }
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem)
    }
}

/// A snapshot being received, in `install/`: its records so far (checked line by line, with
/// their sparse index built as they arrive), and its meta bytes in memory (they are small).
struct Staging {
    fs: Fs,
    dir: PathBuf,
    records_path: PathBuf,
    index_path: PathBuf,
    id: SnapshotId,
    /// Positioned at `records_have`.
    records: FsFile,
    /// Positioned at its end.
    index: FsFile,
    /// Records bytes staged: the parser's complete lines, then its partial line.
    records_have: u64,
    parser: LineParser,
    meta: Vec<u8>,
    /// Records bytes written since the last fdatasync.
    unsynced: u64,
}

impl Staging {
    fn have(&self) -> u64 {
        self.records_have + self.meta.len() as u64
    }

    /// An empty staging area for `id`, replacing whatever `dir` held.
    fn create(fs: &Fs, dir: &Path, id: &SnapshotId) -> Result<Staging, StorageError> {
        if exists(fs, dir)? {
            fs.remove_dir_all(dir)
                .map_err(StorageError::io("remove", dir))?;
        }
        fs.create_dir(dir)
            .map_err(StorageError::io("create", dir))?;
        let mut staging = Staging::open(fs, dir, *id)?;
        staging.set_id(id)?;
        Ok(staging)
    }

    fn open(fs: &Fs, dir: &Path, id: SnapshotId) -> Result<Staging, StorageError> {
        let records_path = dir.join(RECORDS_FILE);
        let index_path = dir.join(INDEX_FILE);
        let records = open_rw(fs, &records_path)?;
        let index = open_rw(fs, &index_path)?;
        Ok(Staging {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            records_path,
            index_path,
            id,
            records,
            index,
            records_have: 0,
            parser: LineParser::new(1, 0),
            meta: Vec::new(),
            unsynced: 0,
        })
    }

    /// Reopens `dir` after a restart: rescans its records once to rebuild the parser and the
    /// index, cutting any tail that is not whole, valid lines. Deletes it if its ID is missing
    /// or unreadable.
    fn resume(fs: &Fs, dir: &Path) -> Result<Option<Staging>, StorageError> {
        if !exists(fs, dir)? {
            return Ok(None);
        }
        let id_path = dir.join(STAGED_ID_FILE);
        let id = fs
            .read(&id_path)
            .map_err(|e| Damage::new(format!("cannot read: {e}")))
            .and_then(|bytes| decode_staged_id(&bytes));
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                log::warn!("{}: {e}; discarding the staged snapshot", id_path.display());
                fs.remove_dir_all(dir)
                    .map_err(StorageError::io("remove", dir))?;
                return Ok(None);
            }
        };
        remove_if_exists(fs, &dir.join(tmp_name(STAGED_ID_FILE)))?;
        remove_if_exists(fs, &dir.join(tmp_name(SNAPSHOT_FILE)))?;
        let mut staging = Staging::open(fs, dir, id)?;
        let path = &staging.records_path;
        let file_len = staging
            .records
            .size()
            .map_err(StorageError::io("stat", path))?;
        let limit = file_len.min(id.records_len);
        let mut offsets = Vec::new();
        let mut buf = vec![0; READ_BUFFER];
        let mut read = 0;
        while read < limit {
            let want = (limit - read).min(buf.len() as u64) as usize;
            let n = staging
                .records
                .read(&mut buf[..want])
                .map_err(StorageError::io("read", path))?;
            if n == 0 {
                break;
            }
            if let Err(e) = staging.parser.feed(&buf[..n], &mut offsets) {
                log::warn!("{}: {e}; cutting the staged records there", path.display());
                break;
            }
            read += n as u64;
        }
        staging.parser.drop_partial();
        let valid = staging.parser.line_start;
        if valid < file_len {
            staging
                .records
                .set_len(valid)
                .map_err(StorageError::io("truncate", path))?;
        }
        staging
            .records
            .seek(SeekFrom::Start(valid))
            .map_err(StorageError::io("seek in", path))?;
        staging.records_have = valid;
        let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let index_path = &staging.index_path;
        staging
            .index
            .set_len(0)
            .and_then(|()| staging.index.seek(SeekFrom::Start(0)))
            .and_then(|_| staging.index.write_all(&bytes))
            .map_err(StorageError::io("rewrite", index_path))?;
        if valid == id.records_len {
            if let Err(e) = staging.check_records() {
                log::warn!("{}: {e}; starting over", staging.records_path.display());
                staging.reset()?;
            }
        }
        log::info!(
            "{}: resuming snapshot {} (term {}) at byte {valid} of {}",
            dir.display(),
            id.index,
            id.term,
            id.total_len()
        );
        Ok(Some(staging))
    }

    /// Names the snapshot being staged, durably.
    fn set_id(&mut self, id: &SnapshotId) -> Result<(), StorageError> {
        let mut bytes = Vec::new();
        encode_line(&mut bytes, id).map_err(|e| {
            let refusal = Refusal::Unencodable(format!("cannot encode: {e}"));
            StorageError::refused(&self.dir.join(STAGED_ID_FILE), refusal)
        })?;
        write_atomically(&self.fs, &self.dir, STAGED_ID_FILE, &bytes)?;
        self.id = *id;
        Ok(())
    }

    /// Empties the staging area (keeping its ID).
    fn reset(&mut self) -> Result<(), StorageError> {
        for (file, path) in [
            (&mut self.records, &self.records_path),
            (&mut self.index, &self.index_path),
        ] {
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
                .map_err(StorageError::io("truncate", path))?;
        }
        self.records_have = 0;
        self.parser = LineParser::new(1, 0);
        self.meta.clear();
        self.unsynced = 0;
        Ok(())
    }

    /// Takes the next bytes of the stream (they start at `have()` and end inside it).
    fn take(&mut self, mut data: &[u8]) -> Result<(), Fault> {
        let id = self.id;
        if self.records_have < id.records_len {
            let n = (id.records_len - self.records_have).min(data.len() as u64) as usize;
            let (records, rest) = data.split_at(n);
            let mut offsets = Vec::new();
            self.parser
                .feed(records, &mut offsets)
                .map_err(Fault::Bad)?;
            let path = &self.records_path;
            self.records
                .write_all(records)
                .map_err(|e| Fault::Io(write_error(path, e)))?;
            if !offsets.is_empty() {
                let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
                let path = &self.index_path;
                self.index
                    .write_all(&bytes)
                    .map_err(|e| Fault::Io(write_error(path, e)))?;
            }
            self.records_have += n as u64;
            self.unsynced += n as u64;
            if self.unsynced >= SYNC_EVERY {
                self.records
                    .sync_data()
                    .map_err(|e| Fault::Io(StorageError::io("fdatasync", path)(e)))?;
                self.unsynced = 0;
            }
            data = rest;
        }
        if self.records_have == id.records_len && self.meta.is_empty() {
            self.check_records().map_err(Fault::Bad)?;
        }
        self.meta.extend_from_slice(data);
        Ok(())
    }

    /// Checks the complete records part against the ID.
    fn check_records(&self) -> Result<(), Damage> {
        let id = &self.id;
        let parser = &self.parser;
        if !parser.partial.is_empty() {
            return Err(Damage::new("the records end inside a line"));
        }
        let last = parser.next_index - 1;
        if last != id.index || parser.last_term != id.term {
            return Err(Damage::new(format!(
                "the records end with record {last} (term {}), the snapshot says {} (term {})",
                parser.last_term, id.index, id.term
            )));
        }
        let crc = parser.crc.clone().finalize();
        if crc != id.records_crc {
            return Err(Damage::new(format!(
                "the records have CRC {crc:08x}, the snapshot says {:08x}",
                id.records_crc
            )));
        }
        Ok(())
    }

    /// Checks the complete meta bytes against the ID; returns the meta.
    fn check_meta(&self) -> Result<SnapshotMeta, Damage> {
        let id = &self.id;
        let crc = crc32fast::hash(&self.meta);
        if crc != id.meta_crc {
            return Err(Damage::new(format!(
                "the meta has CRC {crc:08x}, the snapshot says {:08x}",
                id.meta_crc
            )));
        }
        let meta = decode_meta(&self.meta).map_err(|e| Damage::new(format!("the meta: {e}")))?;
        if snapshot_id(&meta, &self.meta) != *id {
            return Err(Damage::new(format!(
                "the meta describes snapshot {} (term {}, {} bytes of records, CRC {:08x}), not \
                 the one being sent",
                meta.state.index, meta.state.term, meta.records_len, meta.records_crc
            )));
        }
        Ok(meta)
    }

    /// Makes the complete staging area durable, with its `snapshot.json`.
    fn finish(&self) -> Result<(), StorageError> {
        self.records
            .sync_data()
            .map_err(StorageError::io("fdatasync", &self.records_path))?;
        self.index
            .sync_data()
            .map_err(StorageError::io("fdatasync", &self.index_path))?;
        write_atomically(&self.fs, &self.dir, SNAPSHOT_FILE, &self.meta)
    }
}

/// The [`SnapshotId`] in `install/id.json`.
fn decode_staged_id(bytes: &[u8]) -> Result<SnapshotId, Damage> {
    let line = match bytes.split_last() {
        Some((b'\n', line)) => line,
        _ => return Err(Damage::new("torn")),
    };
    serde_json::from_slice(check_line(line)?)
        .map_err(|e| Damage::new(format!("bad snapshot ID: {e}")))
}

impl Current {
    /// Opens `store.<number>`, cutting it back to its snapshot (or to empty without one).
    fn open(fs: &Fs, data_dir: &Path, number: u64) -> Result<Current, StorageError> {
        let dir = data_dir.join(format!("{STORE_PREFIX}{number}"));
        if !exists(fs, &dir)? {
            return Err(StorageError::LostStore {
                current: data_dir.join(CURRENT_FILE),
                store: dir,
                lost: Lost::Store,
            });
        }
        remove_if_exists(fs, &dir.join(tmp_name(SNAPSHOT_FILE)))?;
        let snapshot = load_snapshot(fs, &dir)?;
        let (records_len, crc, last_index, last_term) = match &snapshot {
            Some(s) => (
                s.meta.records_len,
                Hasher::new_with_initial_len(s.meta.records_crc, s.meta.records_len),
                s.meta.state.index,
                s.meta.state.term,
            ),
            None => (0, Hasher::new(), 0, 0),
        };

        let records_path = dir.join(RECORDS_FILE);
        let index_path = dir.join(INDEX_FILE);
        let created = !exists(fs, &records_path)? || !exists(fs, &index_path)?;
        let mut records = open_rw(fs, &records_path)?;
        cut(&records_path, &mut records, records_len, "records")?;
        let mut index = open_rw(fs, &index_path)?;
        if created {
            // Their names durable before a snapshot's `snapshot.json` can be: a filesystem
            // that reorders directory updates could otherwise keep it and lose them.
            sync_dir(fs, &dir)?;
        }
        let count = last_index.div_ceil(INDEX_EVERY);
        cut(&index_path, &mut index, count * 8, "index")?;
        let sparse = read_sparse(&index_path, &mut index, records_len)?;
        if sparse.len() as u64 != count {
            let problem = format!("holds {} offsets where {count} were expected", sparse.len());
            return Err(StorageError::corrupt(&index_path, problem));
        }

        let mut reader = fs
            .open(&records_path, Open::READ)
            .map_err(StorageError::io("open", &records_path))?;
        if let Some(&from) = sparse.last() {
            let mut parser = LineParser::new((count - 1) * INDEX_EVERY + 1, from);
            check_tail(
                &records_path,
                &mut reader,
                &mut parser,
                records_len,
                last_index,
                last_term,
            )?;
        }

        Ok(Current {
            fs: fs.clone(),
            number,
            dir,
            records_path,
            index_path,
            records: BufWriter::with_capacity(WRITE_BUFFER, records),
            reader,
            index: BufWriter::new(index),
            records_len,
            unflushed: false,
            crc,
            last_index,
            last_term,
            sparse,
            snapshot,
            failed: None,
        })
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(failure) => {
                let earlier = failure.clone();
                let refusal = Refusal::AfterFailure { earlier };
                Err(StorageError::refused(&self.dir, refusal))
            }
            None => Ok(()),
        }
    }

    /// Records `result`'s error as a failure that stops all later writes.
    fn note<T>(&mut self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    fn append(&mut self, records: &[LogRecord]) -> Result<(), StorageError> {
        self.check_writable()?;
        let mut term = self.last_term;
        for (expect, r) in (self.last_index + 1..).zip(records) {
            if r.index != expect || r.term < term {
                let refusal = Refusal::RecordOrder {
                    index: r.index,
                    term: r.term,
                    after: expect - 1,
                    after_term: term,
                };
                return Err(StorageError::refused(&self.records_path, refusal));
            }
            term = r.term;
        }
        let mut line = Vec::new();
        for r in records {
            line.clear();
            encode_line(&mut line, r).map_err(|e| {
                let refusal =
                    Refusal::Unencodable(format!("record {}: cannot encode: {e}", r.index));
                StorageError::refused(&self.records_path, refusal)
            })?;
            if (r.index - 1).is_multiple_of(INDEX_EVERY) {
                let offset = self.records_len;
                let written = self.index.write_all(&offset.to_le_bytes());
                let written = written.map_err(|e| write_error(&self.index_path, e));
                self.note(written)?;
                self.sparse.push(offset);
            }
            let written = self.records.write_all(&line);
            let written = written.map_err(|e| write_error(&self.records_path, e));
            self.note(written)?;
            self.unflushed = true;
            self.crc.update(&line);
            self.records_len += line.len() as u64;
            self.last_index = r.index;
            self.last_term = r.term;
        }
        Ok(())
    }

    /// Hands buffered records to the OS, so the read handle sees them.
    fn flush_records(&mut self) -> Result<(), StorageError> {
        if self.unflushed {
            let flushed = self.records.flush();
            let flushed = flushed.map_err(|e| write_error(&self.records_path, e));
            self.note(flushed)?;
            self.unflushed = false;
        }
        Ok(())
    }

    fn read_page(
        &mut self,
        start: Index,
        read_index: Index,
        budget: usize,
    ) -> Result<(Vec<LogRecord>, Option<Index>), StorageError> {
        if start == 0 || read_index > self.last_index {
            let refusal = Refusal::ReadRange {
                start,
                end: read_index,
                last: self.last_index,
            };
            return Err(StorageError::refused(&self.records_path, refusal));
        }
        if start > read_index {
            return Ok((Vec::new(), None));
        }
        self.flush_records()?;
        let path = &self.records_path;
        let slot = (start - 1) / INDEX_EVERY;
        let mut offset = self.sparse[slot as usize];
        let mut index = slot * INDEX_EVERY + 1;
        let mut reader = BufReader::with_capacity(READ_BUFFER, &self.reader);
        reader
            .seek(SeekFrom::Start(offset))
            .map_err(StorageError::io("seek in", path))?;
        let mut page = Vec::new();
        let mut used = 0usize;
        let mut line = Vec::new();
        while index <= read_index {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(StorageError::io_at(path, At::Read(offset)))?;
            if n == 0 || line[n - 1] != b'\n' {
                let problem = format!("record {index} at byte offset {offset} is cut short");
                return Err(StorageError::corrupt_at(path, offset, problem));
            }
            if index >= start {
                let record = decode_record(&line[..n - 1]).map_err(|e| {
                    let problem = format!("bad line at byte offset {offset}: {e}");
                    StorageError::corrupt_at(path, offset, problem)
                })?;
                if record.index != index {
                    let problem = format!(
                        "the line at byte offset {offset} holds record {} where record {index} \
                         belongs",
                        record.index
                    );
                    return Err(StorageError::corrupt_at(path, offset, problem));
                }
                let json_len = n - LINE_SUFFIX.min(n);
                if !page.is_empty() && used + json_len > budget {
                    return Ok((page, Some(index)));
                }
                used += json_len;
                page.push(record);
            }
            offset += n as u64;
            index += 1;
        }
        Ok((page, None))
    }

    fn begin_snapshot(&mut self, state: &SnapshotState) -> Result<SnapshotJob, StorageError> {
        self.check_writable()?;
        if state.index != self.last_index || state.term != self.last_term {
            let refusal = Refusal::SnapshotNotAtEnd {
                index: state.index,
                term: state.term,
                last: self.last_index,
                last_term: self.last_term,
            };
            return Err(StorageError::refused(&self.dir, refusal));
        }
        self.flush_records()?;
        let flushed = self
            .index
            .flush()
            .map_err(|e| write_error(&self.index_path, e));
        self.note(flushed)?;
        let handles = self
            .records
            .get_ref()
            .try_clone()
            .and_then(|r| Ok((r, self.index.get_ref().try_clone()?)))
            .map_err(StorageError::io("reopen", &self.records_path));
        let (records, index) = self.note(handles)?;

        let meta = SnapshotMeta {
            state: state.clone(),
            records_len: self.records_len,
            records_crc: self.crc.clone().finalize(),
        };
        let mut bytes = Vec::new();
        encode_line(&mut bytes, &meta).map_err(|e| {
            let refusal = Refusal::Unencodable(format!("cannot encode: {e}"));
            StorageError::refused(&self.dir.join(SNAPSHOT_FILE), refusal)
        })?;
        let id = snapshot_id(&meta, &bytes);
        Ok(SnapshotJob {
            fs: self.fs.clone(),
            store_dir: self.dir.clone(),
            records,
            index,
            records_path: self.records_path.clone(),
            meta,
            id,
            bytes,
        })
    }

    fn read_chunk(
        &mut self,
        id: &SnapshotId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let Some(snapshot) = self.snapshot.as_ref().filter(|s| s.id == *id) else {
            let refusal = Refusal::NotCurrent {
                index: id.index,
                term: id.term,
            };
            return Err(StorageError::refused(&self.dir, refusal));
        };
        let total = id.total_len();
        if offset > total {
            let refusal = Refusal::ReadPastEnd {
                offset,
                index: id.index,
                total,
            };
            return Err(StorageError::refused(&self.dir, refusal));
        }
        let end = offset.saturating_add(len).min(total);
        let mut out = Vec::with_capacity((end - offset) as usize);
        let records_end = end.min(id.records_len);
        if offset < records_end {
            out.resize((records_end - offset) as usize, 0);
            let path = &self.records_path;
            let mut reader = &self.reader;
            reader
                .seek(SeekFrom::Start(offset))
                .and_then(|_| reader.read_exact(&mut out))
                .map_err(StorageError::io_at(path, At::Read(offset)))?;
        }
        if end > id.records_len {
            let from = offset.max(id.records_len) - id.records_len;
            let to = end - id.records_len;
            out.extend_from_slice(&snapshot.bytes[from as usize..to as usize]);
        }
        Ok(out)
    }
}

/// The ID naming a snapshot with `meta` whose `snapshot.json` is `bytes`.
fn snapshot_id(meta: &SnapshotMeta, bytes: &[u8]) -> SnapshotId {
    SnapshotId {
        index: meta.state.index,
        term: meta.state.term,
        records_len: meta.records_len,
        records_crc: meta.records_crc,
        meta_len: bytes.len() as u64,
        meta_crc: crc32fast::hash(bytes),
    }
}

/// Reads `store.current`, creating it (pointing at a new, empty `store.1`) when missing.
fn current_number(fs: &Fs, data_dir: &Path) -> Result<u64, StorageError> {
    let path = data_dir.join(CURRENT_FILE);
    remove_if_exists(fs, &data_dir.join(tmp_name(CURRENT_FILE)))?;
    if !exists(fs, &path)? {
        // No store was ever made current here: anything named store.<n> is a leftover of a
        // crash before the first `store.current` was written, and holds nothing. One with
        // records or a snapshot means `store.current` was lost: refuse, never delete them.
        if let Some(dir) = store_with_data(fs, data_dir)? {
            return Err(StorageError::LostStore {
                current: path,
                store: dir,
                lost: Lost::Current,
            });
        }
        remove_other_stores(fs, data_dir, 0)?;
        let dir = data_dir.join(format!("{STORE_PREFIX}1"));
        fs.create_dir(&dir)
            .map_err(StorageError::io("create", &dir))?;
        sync_dir(fs, data_dir)?;
        write_atomically(
            fs,
            data_dir,
            CURRENT_FILE,
            format!("{STORE_PREFIX}1\n").as_bytes(),
        )?;
        return Ok(1);
    }
    let text = fs
        .read_to_string(&path)
        .map_err(StorageError::io("read", &path))?;
    text.strip_suffix('\n')
        .and_then(store_number)
        .ok_or_else(|| {
            let problem = format!("expected one line naming a store directory, found {text:?}");
            StorageError::corrupt(&path, problem)
        })
}

/// `n` for a name `store.<n>` (n >= 1, decimal).
fn store_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STORE_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n >= 1)
}

/// A `store.<n>` directory with a non-empty records file or a snapshot, if there is one.
fn store_with_data(fs: &Fs, data_dir: &Path) -> Result<Option<PathBuf>, StorageError> {
    let list_err = |e| StorageError::io("list data dir", data_dir)(e);
    for (name, dir) in fs.list(data_dir).map_err(list_err)? {
        if store_number(&name).is_none() {
            continue;
        }
        let records = dir.join(RECORDS_FILE);
        let has_records = exists(fs, &records)?
            && fs
                .file_len(&records)
                .map_err(StorageError::io("stat", &records))?
                > 0;
        if has_records || exists(fs, &dir.join(SNAPSHOT_FILE))? {
            return Ok(Some(dir));
        }
    }
    Ok(None)
}

/// Deletes every `store.<n>` directory but `store.<keep>`: leftovers of a crash mid-install.
fn remove_other_stores(fs: &Fs, data_dir: &Path, keep: u64) -> Result<(), StorageError> {
    let list_err = |e| StorageError::io("list data dir", data_dir)(e);
    for (name, path) in fs.list(data_dir).map_err(list_err)? {
        let Some(n) = store_number(&name) else {
            continue;
        };
        if n != keep {
            log::warn!(
                "{}: removing a store left over from an interrupted install",
                path.display()
            );
            fs.remove_dir_all(&path)
                .map_err(StorageError::io("remove", &path))?;
        }
    }
    Ok(())
}

/// Reads and checks `dir/snapshot.json`, if there is one.
fn load_snapshot(fs: &Fs, dir: &Path) -> Result<Option<Snapshot>, StorageError> {
    let path = dir.join(SNAPSHOT_FILE);
    if !exists(fs, &path)? {
        return Ok(None);
    }
    let bytes = fs.read(&path).map_err(StorageError::io("read", &path))?;
    let meta = decode_meta(&bytes).map_err(|e| e.in_file(&path))?;
    let id = snapshot_id(&meta, &bytes);
    Ok(Some(Snapshot { meta, id, bytes }))
}

/// The [`SnapshotMeta`] in `bytes`, which must be exactly one line.
fn decode_meta(bytes: &[u8]) -> Result<SnapshotMeta, Damage> {
    let line = match bytes.split_last() {
        Some((b'\n', line)) if !line.contains(&b'\n') => line,
        _ => return Err(Damage::new("expected exactly one line (torn or damaged)")),
    };
    let json = check_line(line)?;
    let meta: SnapshotMeta =
        serde_json::from_slice(json).map_err(|e| Damage::new(format!("bad snapshot meta: {e}")))?;
    if (meta.state.index == 0) != (meta.records_len == 0) {
        return Err(Damage::new(format!(
            "snapshot at index {} cannot cover {} bytes of records",
            meta.state.index, meta.records_len
        )));
    }
    Ok(meta)
}

/// Appends `value` as a line: its JSON, a TAB, the JSON's CRC-32 in 8 lowercase hex digits, `\n`.
fn encode_line<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), serde_json::Error> {
    let start = out.len();
    serde_json::to_writer(&mut *out, value)?;
    let crc = crc32fast::hash(&out[start..]);
    out.push(b'\t');
    out.extend_from_slice(format!("{crc:08x}").as_bytes());
    out.push(b'\n');
    Ok(())
}

/// Checks the framing and CRC of one line (without its `\n`); returns its JSON.
fn check_line(line: &[u8]) -> Result<&[u8], Damage> {
    if line.len() < LINE_SUFFIX - 1 || line[line.len() - 9] != b'\t' {
        return Err(Damage::new("no TAB and CRC at the end of the line"));
    }
    let (json, tail) = line.split_at(line.len() - 9);
    let hex = &tail[1..];
    let mut want = 0u32;
    for &b in hex {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return Err(Damage::new("the CRC is not 8 lowercase hex digits")),
        };
        want = want << 4 | u32::from(digit);
    }
    let got = crc32fast::hash(json);
    if got != want {
        return Err(Damage::new(format!(
            "CRC mismatch: the line says {want:08x}, its bytes have {got:08x}"
        )));
    }
    Ok(json)
}

/// The record on one line (without its `\n`).
fn decode_record(line: &[u8]) -> Result<LogRecord, Damage> {
    let json = check_line(line)?;
    serde_json::from_slice(json).map_err(|e| Damage::new(format!("bad record: {e}")))
}

/// Checks records lines as their bytes arrive in pieces: each line's CRC, indices running on by
/// one, terms never going down. It carries a partial line from one piece to the next.
struct LineParser {
    partial: Vec<u8>,
    /// Byte offset of the line being assembled (= bytes of complete lines seen).
    line_start: u64,
    next_index: Index,
    last_term: Term,
    /// CRC-32 of the complete lines seen (when started at offset 0, of the whole prefix).
    crc: Hasher,
}

impl LineParser {
    fn new(next_index: Index, line_start: u64) -> LineParser {
        LineParser {
            partial: Vec::new(),
            line_start,
            next_index,
            last_term: 0,
            crc: Hasher::new(),
        }
    }

    /// Takes the next bytes; pushes onto `offsets` the start of each record line that belongs
    /// in the sparse index. On error the parser's complete-line state is unchanged, but its
    /// partial line is not: drop it (see [`LineParser::drop_partial`]) or the parser.
    fn feed(&mut self, mut data: &[u8], offsets: &mut Vec<u64>) -> Result<(), Damage> {
        while !data.is_empty() {
            let Some(end) = data.iter().position(|&b| b == b'\n') else {
                if self.partial.len() + data.len() > MAX_LINE {
                    let at = self.line_start;
                    let problem =
                        format!("the line at byte offset {at} runs over {MAX_LINE} bytes");
                    return Err(Damage::at(at, problem));
                }
                self.partial.extend_from_slice(data);
                return Ok(());
            };
            let line: &[u8] = if self.partial.is_empty() {
                &data[..end]
            } else {
                self.partial.extend_from_slice(&data[..end]);
                &self.partial
            };
            let at = self.line_start;
            let record = decode_record(line)
                .map_err(|e| Damage::at(at, format!("bad line at byte offset {at}: {e}")))?;
            if record.index != self.next_index || record.term < self.last_term {
                let problem = format!(
                    "the line at byte offset {at} holds record {} (term {}) where record {} \
                     (term >= {}) belongs",
                    record.index, record.term, self.next_index, self.last_term
                );
                return Err(Damage::at(at, problem));
            }
            if (record.index - 1).is_multiple_of(INDEX_EVERY) {
                offsets.push(at);
            }
            self.crc.update(line);
            self.crc.update(b"\n");
            self.line_start += line.len() as u64 + 1;
            self.next_index += 1;
            self.last_term = record.term;
            self.partial.clear();
            data = &data[end + 1..];
        }
        Ok(())
    }

    fn drop_partial(&mut self) {
        self.partial.clear();
    }
}

/// Checks the records from the parser's start to `records_len`: whole lines ending with record
/// `last_index` of `last_term`.
fn check_tail(
    path: &Path,
    reader: &mut FsFile,
    parser: &mut LineParser,
    records_len: u64,
    last_index: Index,
    last_term: Term,
) -> Result<(), StorageError> {
    let from = parser.line_start;
    reader
        .seek(SeekFrom::Start(from))
        .map_err(StorageError::io("seek in", path))?;
    let mut buf = vec![0; READ_BUFFER];
    let mut left = records_len - from;
    let mut ignored = Vec::new();
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = reader
            .read(&mut buf[..want])
            .map_err(StorageError::io("read", path))?;
        if n == 0 {
            let problem = format!("ends before byte {records_len}");
            return Err(StorageError::corrupt(path, problem));
        }
        parser
            .feed(&buf[..n], &mut ignored)
            .map_err(|e| e.in_file(path))?;
        left -= n as u64;
    }
    if !parser.partial.is_empty() || parser.next_index != last_index + 1 {
        let problem =
            format!("the snapshot's {records_len} bytes do not end with record {last_index}");
        return Err(StorageError::corrupt(path, problem));
    }
    if parser.last_term != last_term {
        let problem = format!(
            "record {last_index} has term {}, the snapshot says {last_term}",
            parser.last_term
        );
        return Err(StorageError::corrupt(path, problem));
    }
    Ok(())
}

/// Reads the sparse index: offsets starting at 0, increasing, inside the records.
fn read_sparse(path: &Path, file: &mut FsFile, records_len: u64) -> Result<Vec<u64>, StorageError> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(StorageError::io("read", path))?;
    let sparse: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    for (i, &offset) in sparse.iter().enumerate() {
        let ok = if i == 0 {
            offset == 0
        } else {
            offset > sparse[i - 1]
        };
        if !ok || offset >= records_len {
            let at = i as u64 * 8;
            let problem = format!("bad offset {offset} at byte offset {at}");
            return Err(StorageError::corrupt_at(path, at, problem));
        }
    }
    Ok(sparse)
}

/// Cuts `file` back to `len` bytes (it must hold at least that many) and seeks to its end.
fn cut(path: &Path, file: &mut FsFile, len: u64, what: &str) -> Result<(), StorageError> {
    let have = file.size().map_err(StorageError::io("stat", path))?;
    if have < len {
        let problem = format!("holds {have} bytes, but the snapshot covers {len} bytes of {what}");
        return Err(StorageError::corrupt(path, problem));
    }
    if have > len {
        file.set_len(len)
            .map_err(StorageError::io_at(path, At::TruncateTo(len)))?;
    }
    file.seek(SeekFrom::Start(len))
        .map_err(StorageError::io("seek in", path))?;
    Ok(())
}

#[cfg(test)]
mod tests;
