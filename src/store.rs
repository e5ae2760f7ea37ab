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

use crate::raft::{Index, LogRecord, SnapshotId, SnapshotMeta, SnapshotState, Term};
use crc32fast::Hasher;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const CURRENT_FILE: &str = "store.current";
const STORE_PREFIX: &str = "store.";
const RECORDS_FILE: &str = "records";
const INDEX_FILE: &str = "index";
const SNAPSHOT_FILE: &str = "snapshot.json";

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

/// The applied records of one peer, their sparse index and latest snapshot, and the staging
/// area for a snapshot being received.
pub struct Store {
    data_dir: PathBuf,
    cur: Current,
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
    number: u64,
    dir: PathBuf,
    records_path: PathBuf,
    index_path: PathBuf,
    records: BufWriter<File>,
    /// A second handle on `records` for reads.
    reader: File,
    index: BufWriter<File>,
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
    /// Set once a write failed: what reached the file is then unknown, so writes are refused.
    failed: Option<String>,
}

impl Store {
    /// Opens (creating) the data dir's current store. If it has a snapshot, the records file is
    /// cut back to the snapshot's `records_len` (records after it were never synced; the core
    /// re-applies them from the WAL) and the running CRC resumes from `meta.records_crc`;
    /// without a snapshot, the store is cut back to empty. Returns the snapshot, if any, with
    /// its [`SnapshotId`].
    pub fn open(data_dir: &Path) -> Result<(Store, Option<(SnapshotMeta, SnapshotId)>), String> {
        fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
        let number = current_number(data_dir)?;
        remove_other_stores(data_dir, number)?;
        let cur = Current::open(data_dir, number)?;
        let snapshot = cur.snapshot.as_ref().map(|s| (s.meta.clone(), s.id));
        let store = Store {
            data_dir: data_dir.to_path_buf(),
            cur,
        };
        Ok((store, snapshot))
    }

    /// Index of the last record appended (0 if none).
    pub fn last_index(&self) -> Index {
        self.cur.last_index
    }

    /// Appends records (the first must be `last_index() + 1`, consecutive, terms never going
    /// down). Buffered; not synced.
    pub fn append(&mut self, records: &[LogRecord]) -> Result<(), String> {
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
    ) -> Result<(Vec<LogRecord>, Option<Index>), String> {
        self.cur.read_page(start, read_index, budget)
    }

    /// Makes everything up to `state.index` durable and records it as the latest snapshot
    /// (requires `state.index == last_index()` and `state.term` the last record's term).
    /// Returns its ID.
    pub fn write_snapshot(&mut self, state: &SnapshotState) -> Result<SnapshotId, String> {
        self.cur.write_snapshot(state)
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
    ) -> Result<Vec<u8>, String> {
        self.cur.read_chunk(id, offset, len)
    }
}

impl Current {
    /// Opens `store.<number>`, cutting it back to its snapshot (or to empty without one).
    fn open(data_dir: &Path, number: u64) -> Result<Current, String> {
        let dir = data_dir.join(format!("{STORE_PREFIX}{number}"));
        if !exists(&dir)? {
            return Err(format!(
                "{} names {}, which does not exist",
                data_dir.join(CURRENT_FILE).display(),
                dir.display()
            ));
        }
        remove_if_exists(&dir.join(tmp_name(SNAPSHOT_FILE)))?;
        let snapshot = load_snapshot(&dir)?;
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
        let mut records = open_rw(&records_path)?;
        cut(&records_path, &mut records, records_len, "records")?;

        let index_path = dir.join(INDEX_FILE);
        let mut index = open_rw(&index_path)?;
        let count = last_index.div_ceil(INDEX_EVERY);
        cut(&index_path, &mut index, count * 8, "index")?;
        let sparse = read_sparse(&index_path, &mut index, records_len)?;
        if sparse.len() as u64 != count {
            return Err(format!(
                "{}: holds {} offsets where {count} were expected",
                index_path.display(),
                sparse.len()
            ));
        }

        let mut reader = File::open(&records_path)
            .map_err(|e| format!("cannot open {}: {e}", records_path.display()))?;
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

    fn check_writable(&self) -> Result<(), String> {
        match &self.failed {
            Some(failure) => Err(format!(
                "{}: refusing to write after an earlier failure: {failure}",
                self.dir.display()
            )),
            None => Ok(()),
        }
    }

    /// Records `result`'s error as a failure that stops all later writes.
    fn note<T>(&mut self, result: Result<T, String>) -> Result<T, String> {
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn append(&mut self, records: &[LogRecord]) -> Result<(), String> {
        self.check_writable()?;
        let mut expect = self.last_index + 1;
        let mut term = self.last_term;
        for r in records {
            if r.index != expect || r.term < term {
                return Err(format!(
                    "{}: cannot append record {} (term {}) after record {} (term {term})",
                    self.records_path.display(),
                    r.index,
                    r.term,
                    expect - 1
                ));
            }
            expect += 1;
            term = r.term;
        }
        let mut line = Vec::new();
        for r in records {
            line.clear();
            encode_line(&mut line, r)
                .map_err(|e| format!("{}: record {}: {e}", self.records_path.display(), r.index))?;
            if (r.index - 1) % INDEX_EVERY == 0 {
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
    fn flush_records(&mut self) -> Result<(), String> {
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
    ) -> Result<(Vec<LogRecord>, Option<Index>), String> {
        if start == 0 || read_index > self.last_index {
            return Err(format!(
                "{}: cannot read records {start} to {read_index}: the store holds 1 to {}",
                self.records_path.display(),
                self.last_index
            ));
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
            .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
        let mut page = Vec::new();
        let mut used = 0usize;
        let mut line = Vec::new();
        while index <= read_index {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(|e| {
                format!(
                    "cannot read {} at byte offset {offset}: {e}",
                    path.display()
                )
            })?;
            if n == 0 || line[n - 1] != b'\n' {
                return Err(format!(
                    "{}: record {index} at byte offset {offset} is cut short",
                    path.display()
                ));
            }
            if index >= start {
                let record = decode_record(&line[..n - 1]).map_err(|e| {
                    format!("{}: bad line at byte offset {offset}: {e}", path.display())
                })?;
                if record.index != index {
                    return Err(format!(
                        "{}: the line at byte offset {offset} holds record {} where record \
                         {index} belongs",
                        path.display(),
                        record.index
                    ));
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

    fn write_snapshot(&mut self, state: &SnapshotState) -> Result<SnapshotId, String> {
        self.check_writable()?;
        if state.index != self.last_index || state.term != self.last_term {
            return Err(format!(
                "{}: a snapshot at index {} (term {}) must end at the last record, {} (term {})",
                self.dir.display(),
                state.index,
                state.term,
                self.last_index,
                self.last_term
            ));
        }
        self.flush_records()?;
        let synced = self
            .records
            .get_ref()
            .sync_data()
            .map_err(|e| format!("cannot fdatasync {}: {e}", self.records_path.display()));
        self.note(synced)?;
        let synced = self
            .index
            .flush()
            .and_then(|()| self.index.get_ref().sync_data())
            .map_err(|e| format!("cannot fdatasync {}: {e}", self.index_path.display()));
        self.note(synced)?;

        let meta = SnapshotMeta {
            state: state.clone(),
            records_len: self.records_len,
            records_crc: self.crc.clone().finalize(),
        };
        let mut bytes = Vec::new();
        encode_line(&mut bytes, &meta)
            .map_err(|e| format!("{}: {e}", self.dir.join(SNAPSHOT_FILE).display()))?;
        let written = write_atomic(&self.dir, SNAPSHOT_FILE, &bytes);
        self.note(written)?;
        let id = snapshot_id(&meta, &bytes);
        self.snapshot = Some(Snapshot { meta, id, bytes });
        Ok(id)
    }

    fn read_chunk(&mut self, id: &SnapshotId, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let Some(snapshot) = self.snapshot.as_ref().filter(|s| s.id == *id) else {
            return Err(format!(
                "{}: snapshot {} (term {}) is not the current one",
                self.dir.display(),
                id.index,
                id.term
            ));
        };
        let total = id.total_len();
        if offset > total {
            return Err(format!(
                "{}: offset {offset} is past the end of snapshot {}'s {total} bytes",
                self.dir.display(),
                id.index
            ));
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
                .map_err(|e| {
                    format!(
                        "cannot read {} at byte offset {offset}: {e}",
                        path.display()
                    )
                })?;
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
fn current_number(data_dir: &Path) -> Result<u64, String> {
    let path = data_dir.join(CURRENT_FILE);
    remove_if_exists(&data_dir.join(tmp_name(CURRENT_FILE)))?;
    if !exists(&path)? {
        // No store was ever made current here: anything named store.<n> is a leftover.
        remove_other_stores(data_dir, 0)?;
        let dir = data_dir.join(format!("{STORE_PREFIX}1"));
        fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        sync_dir(data_dir)?;
        write_atomic(
            data_dir,
            CURRENT_FILE,
            format!("{STORE_PREFIX}1\n").as_bytes(),
        )?;
        return Ok(1);
    }
    let text =
        fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.strip_suffix('\n')
        .and_then(store_number)
        .ok_or_else(|| {
            format!(
                "{}: expected one line naming a store directory, found {text:?}",
                path.display()
            )
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

/// Deletes every `store.<n>` directory but `store.<keep>`: leftovers of a crash mid-install.
fn remove_other_stores(data_dir: &Path, keep: u64) -> Result<(), String> {
    let entries = fs::read_dir(data_dir)
        .map_err(|e| format!("cannot list data dir {}: {e}", data_dir.display()))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| format!("cannot list data dir {}: {e}", data_dir.display()))?;
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(store_number) else {
            continue;
        };
        if n != keep {
            let path = entry.path();
            log::warn!(
                "{}: removing a store left over from an interrupted install",
                path.display()
            );
            fs::remove_dir_all(&path)
                .map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Reads and checks `dir/snapshot.json`, if there is one.
fn load_snapshot(dir: &Path) -> Result<Option<Snapshot>, String> {
    let path = dir.join(SNAPSHOT_FILE);
    if !exists(&path)? {
        return Ok(None);
    }
    let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = decode_meta(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let id = snapshot_id(&meta, &bytes);
    Ok(Some(Snapshot { meta, id, bytes }))
}

/// The [`SnapshotMeta`] in `bytes`, which must be exactly one line.
fn decode_meta(bytes: &[u8]) -> Result<SnapshotMeta, String> {
    let line = match bytes.split_last() {
        Some((b'\n', line)) if !line.contains(&b'\n') => line,
        _ => return Err("expected exactly one line (torn or damaged)".to_string()),
    };
    let json = check_line(line)?;
    let meta: SnapshotMeta =
        serde_json::from_slice(json).map_err(|e| format!("bad snapshot meta: {e}"))?;
    if (meta.state.index == 0) != (meta.records_len == 0) {
        return Err(format!(
            "snapshot at index {} cannot cover {} bytes of records",
            meta.state.index, meta.records_len
        ));
    }
    Ok(meta)
}

/// Appends `value` as a line: its JSON, a TAB, the JSON's CRC-32 in 8 lowercase hex digits, `\n`.
fn encode_line<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), String> {
    let start = out.len();
    serde_json::to_writer(&mut *out, value).map_err(|e| format!("cannot encode: {e}"))?;
    let crc = crc32fast::hash(&out[start..]);
    out.push(b'\t');
    out.extend_from_slice(format!("{crc:08x}").as_bytes());
    out.push(b'\n');
    Ok(())
}

/// Checks the framing and CRC of one line (without its `\n`); returns its JSON.
fn check_line(line: &[u8]) -> Result<&[u8], String> {
    if line.len() < LINE_SUFFIX - 1 || line[line.len() - 9] != b'\t' {
        return Err("no TAB and CRC at the end of the line".to_string());
    }
    let (json, tail) = line.split_at(line.len() - 9);
    let hex = &tail[1..];
    let mut want = 0u32;
    for &b in hex {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return Err("the CRC is not 8 lowercase hex digits".to_string()),
        };
        want = want << 4 | u32::from(digit);
    }
    let got = crc32fast::hash(json);
    if got != want {
        return Err(format!(
            "CRC mismatch: the line says {want:08x}, its bytes have {got:08x}"
        ));
    }
    Ok(json)
}

/// The record on one line (without its `\n`).
fn decode_record(line: &[u8]) -> Result<LogRecord, String> {
    let json = check_line(line)?;
    serde_json::from_slice(json).map_err(|e| format!("bad record: {e}"))
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
    fn feed(&mut self, mut data: &[u8], offsets: &mut Vec<u64>) -> Result<(), String> {
        while !data.is_empty() {
            let Some(end) = data.iter().position(|&b| b == b'\n') else {
                if self.partial.len() + data.len() > MAX_LINE {
                    return Err(format!(
                        "the line at byte offset {} runs over {MAX_LINE} bytes",
                        self.line_start
                    ));
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
            let record =
                decode_record(line).map_err(|e| format!("bad line at byte offset {at}: {e}"))?;
            if record.index != self.next_index || record.term < self.last_term {
                return Err(format!(
                    "the line at byte offset {at} holds record {} (term {}) where record {} \
                     (term >= {}) belongs",
                    record.index, record.term, self.next_index, self.last_term
                ));
            }
            if (record.index - 1) % INDEX_EVERY == 0 {
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
    reader: &mut File,
    parser: &mut LineParser,
    records_len: u64,
    last_index: Index,
    last_term: Term,
) -> Result<(), String> {
    let from = parser.line_start;
    reader
        .seek(SeekFrom::Start(from))
        .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
    let mut buf = vec![0; READ_BUFFER];
    let mut left = records_len - from;
    let mut ignored = Vec::new();
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = reader
            .read(&mut buf[..want])
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            return Err(format!(
                "{}: ends before byte {records_len}",
                path.display()
            ));
        }
        parser
            .feed(&buf[..n], &mut ignored)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        left -= n as u64;
    }
    if !parser.partial.is_empty() || parser.next_index != last_index + 1 {
        return Err(format!(
            "{}: the snapshot's {records_len} bytes do not end with record {last_index}",
            path.display()
        ));
    }
    if parser.last_term != last_term {
        return Err(format!(
            "{}: record {last_index} has term {}, the snapshot says {last_term}",
            path.display(),
            parser.last_term
        ));
    }
    Ok(())
}

/// Reads the sparse index: offsets starting at 0, increasing, inside the records.
fn read_sparse(path: &Path, file: &mut File, records_len: u64) -> Result<Vec<u64>, String> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
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
            return Err(format!(
                "{}: bad offset {offset} at byte offset {}",
                path.display(),
                i * 8
            ));
        }
    }
    Ok(sparse)
}

/// Cuts `file` back to `len` bytes (it must hold at least that many) and seeks to its end.
fn cut(path: &Path, file: &mut File, len: u64, what: &str) -> Result<(), String> {
    let have = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    if have < len {
        return Err(format!(
            "{}: holds {have} bytes, but the snapshot covers {len} bytes of {what}",
            path.display()
        ));
    }
    if have > len {
        file.set_len(len)
            .map_err(|e| format!("cannot truncate {} to {len} bytes: {e}", path.display()))?;
    }
    file.seek(SeekFrom::Start(len))
        .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
    Ok(())
}

fn open_rw(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn write_error(path: &Path, e: io::Error) -> String {
    format!("cannot write {}: {e}", path.display())
}

fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

fn exists(path: &Path) -> Result<bool, String> {
    path.try_exists()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))
}

fn remove_if_exists(path: &Path) -> Result<(), String> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(format!("cannot remove {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Makes the directory's entries (new or renamed files) durable.
fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot fsync directory {}: {e}", dir.display()))
}

/// Replaces `dir/name` with `bytes` atomically: a temp file, fsync, rename, directory fsync.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(name);
    let tmp = dir.join(tmp_name(name));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Membership, SessionRecord};
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
        if index % 7 == 0 {
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
            sessions: vec![SessionRecord {
                client: 7,
                seq: 3,
                index,
                term,
                data_hash: 99,
            }],
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

        assert!(store.read_page(0, 5, 100).is_err());
        assert!(store.read_page(1, 1001, 100).is_err());
        assert!(store.append(&records(1002, 1002)).is_err());
        assert!(store.append(&records(1000, 1000)).is_err());
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
        let err = store.read_page(299, 301, usize::MAX).unwrap_err();
        assert!(
            err.contains("records") && err.contains("byte offset"),
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
            assert!(err.contains(SNAPSHOT_FILE), "{err}");
        }
        for len in 0..good.len() {
            fs::write(&path, &good[..len]).unwrap();
            let err = Store::open(&dir.0)
                .err()
                .expect("a torn snapshot must fail open");
            assert!(err.contains(SNAPSHOT_FILE), "{len}: {err}");
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
        assert!(store.read_chunk(&id, id.total_len() + 1, 10).is_err());
        store.append(&records(601, 601)).unwrap();
        snapshot_here(&mut store);
        assert!(store.read_chunk(&id, 0, 10).is_err());
    }
}
