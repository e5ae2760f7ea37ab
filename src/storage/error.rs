//! Why the WAL or the store failed ([`StorageError`]): a handful of variants that name the file
//! and, where there is one, the place in it, so that callers and tests can tell the cases
//! apart without reading sentences. `Display` prints the sentence the peer logs and prints
//! on stderr.

use crate::raft::{Index, NodeId, Term};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::Utf8Error;

/// Linux's errno for a full filesystem.
const ENOSPC: i32 = 28;

/// Why a storage operation failed. `Display` gives the whole sentence, naming the file (and
/// the byte offset, entry or record where there is one); where a variant holds its cause (an
/// I/O, JSON or UTF-8 error), that sentence already includes the cause's text, and
/// [`std::error::Error::source`] gives the cause itself.
#[derive(Debug)]
pub enum StorageError {
    /// A file system call on `path` failed; `action` is what it was for, as the sentence
    /// "cannot {action} {path}" says it: "open", "create data dir", "fsync directory", ...
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file system call failed at a place in `path` (or renaming it): see [`At`].
    IoAt {
        path: PathBuf,
        at: At,
        source: io::Error,
    },
    /// Another process holds the lock of data dir `dir` (its `LOCK` file).
    Locked { dir: PathBuf },
    /// Data dir `dir` belongs to node `found`, per its node_id file `path`, not to `expected`.
    WrongNode {
        dir: PathBuf,
        path: PathBuf,
        found: NodeId,
        expected: NodeId,
    },
    /// Data dir `dir` holds a WAL but no node_id file, so whose log it is is unknown.
    NoNodeId { dir: PathBuf },
    /// WAL segment `path` cannot be replayed: another format, or damage that no torn write
    /// explains (see [`WalProblem`]).
    Wal { path: PathBuf, problem: WalProblem },
    /// `path` does not hold what was written there: a store's records, sparse index or
    /// `snapshot.json`, `store.current`, the node_id file, or (for a WAL and store that do not
    /// fit together) the data dir. `offset` is the byte offset the damage is at, where the
    /// sentence names one; `problem` is the sentence after "{path}: ".
    Corrupt {
        path: PathBuf,
        offset: Option<u64>,
        problem: String,
    },
    /// `store.current` (at `current`) and the store directory `store` do not fit together:
    /// see [`Lost`].
    LostStore {
        current: PathBuf,
        store: PathBuf,
        lost: Lost,
    },
    /// The WAL or store at `path` refuses a request and has written nothing for it: see
    /// [`Refusal`].
    Refused { path: PathBuf, refusal: Refusal },
    /// A received snapshot chunk is not what its sender encoded; `problem` says how.
    BadChunk { problem: String },
    /// The snapshot thread could not be started (`source`), or is gone (`None`).
    SnapshotThread { source: Option<io::Error> },
}

/// Where in a file (and doing what) an [`StorageError::IoAt`] call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// Truncating the file to this many bytes.
    TruncateTo(u64),
    /// Reading at this byte offset.
    Read(u64),
    /// Replaying a WAL segment: a buffered read at or a little after this byte offset.
    ReadNear(u64),
    /// Writing a WAL frame of `len` bytes at byte `offset`.
    Write { offset: u64, len: usize },
    /// The fdatasync after writing a WAL frame at this byte offset.
    Sync(u64),
    /// Renaming the file (or directory) to this path.
    RenameTo(PathBuf),
}

/// Why a WAL segment cannot be replayed ([`StorageError::Wal`]).
#[derive(Debug)]
pub enum WalProblem {
    /// It does not start with a header of this format: a WAL of format version 1 (which had
    /// none), or no WAL at all.
    NoHeader,
    /// Its header is of format `version`, which this build cannot read.
    Version(u32),
    /// Its header fails its CRC check.
    HeaderCrc,
    /// The intact frame at byte `offset` is frame `found` where frame `due` belongs.
    OutOfSequence { offset: u64, found: u64, due: u64 },
    /// The first frame of a segment after the first, at byte `offset`, does not start with a
    /// base record.
    NoBaseRecord { offset: u64 },
    /// The intact frame at byte `frame` holds, at byte `offset`, a record that does not decode
    /// or does not fit the log (see [`RecordProblem`]).
    BadRecord {
        frame: u64,
        offset: u64,
        problem: RecordProblem,
    },
    /// The frame at byte `offset` is not intact (`damage` says how: a phrase such as "frame
    /// header fails its CRC check"), and `not_torn` says why that is no torn write.
    Damaged {
        offset: u64,
        damage: String,
        not_torn: NotTorn,
    },
    /// A segment after the first holds no frame, so not the base record it starts with.
    NoFrames,
    /// A prepared segment is `len` bytes, short of the `min` it was made with.
    ShortPrepared { len: u64, min: u64 },
}

/// Why a damaged WAL frame is not a torn write (which replay would cut off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTorn {
    /// A frame written after it starts at byte `at`.
    LaterFrame { at: u64 },
    /// It is in a segment that is not the newest: segments before the newest are synced whole.
    NotNewest,
    /// It is the first frame of the only segment left (after the first), which was synced
    /// before the older segments were deleted.
    OnlySegment,
}

/// What is wrong with a WAL record inside an intact frame ([`WalProblem::BadRecord`]).
#[derive(Debug)]
pub enum RecordProblem {
    /// The record needs `needs` more bytes; the frame has `has`.
    Truncated { needs: usize, has: usize },
    /// The data of entry `index` is not UTF-8.
    NotUtf8 { index: Index, source: Utf8Error },
    /// The configuration in entry `index` does not parse.
    BadConfig {
        index: Index,
        source: serde_json::Error,
    },
    /// Entry `index` has payload kind `kind`, which this build does not know.
    UnknownKind { index: Index, kind: u8 },
    /// A record of type `0`, which this build does not know.
    UnknownType(u8),
    /// Entry `index` is at or below the log's base index `base`.
    AtOrBelowBase { index: Index, base: Index },
    /// Entry `index` does not follow the log's last index `last`.
    NotNext { index: Index, last: Index },
}

/// How `store.current` and a store directory do not fit together ([`StorageError::LostStore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// `store.current` names the store, which does not exist.
    Store,
    /// `store.current` is missing, but the store holds records or a snapshot.
    Current,
}

/// A request the WAL or the store refuses ([`StorageError::Refused`]). Those of the WAL would
/// make it unreadable to replay; those of the store are out of its range or order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A hard state with a vote for node 0 (0 means no vote on disk).
    VoteForNodeZero,
    /// A batch starting at entry `index` in a log with base index `base` and last index
    /// `last`: at or below the base (compacted into a snapshot), or past `last + 1`.
    Append {
        index: Index,
        base: Index,
        last: Index,
    },
    /// Entry `index` follows entry `after` in a batch.
    NotConsecutive { index: Index, after: Index },
    /// A rotation to base index `index`, below the log's base index `base`.
    RotateBelowBase { index: Index, base: Index },
    /// A batch of `len` bytes, more than a frame can hold.
    FrameTooBig { len: usize },
    /// Something that cannot be encoded; the text names what (entry or record) and why.
    Unencodable(String),
    /// A write after an earlier write or sync failed (whose sentence is `earlier`): what
    /// reached the file is unknown.
    AfterFailure { earlier: String },
    /// Record `index` of term `term` after record `after` of term `after_term`.
    RecordOrder {
        index: Index,
        term: Term,
        after: Index,
        after_term: Term,
    },
    /// A read of records `start` to `end` from a store holding 1 to `last`.
    ReadRange {
        start: Index,
        end: Index,
        last: Index,
    },
    /// A snapshot at `index` (`term`) of a store whose last record is `last` (`last_term`).
    SnapshotNotAtEnd {
        index: Index,
        term: Term,
        last: Index,
        last_term: Term,
    },
    /// A read of snapshot `index` (`term`), which is not the current one.
    NotCurrent { index: Index, term: Term },
    /// A read at byte `offset` of snapshot `index`'s stream of `total` bytes.
    ReadPastEnd {
        offset: u64,
        index: Index,
        total: u64,
    },
    /// A snapshot `index` (`term`) announced with lengths no snapshot has.
    ImpossibleLengths {
        index: Index,
        term: Term,
        records_len: u64,
        meta_len: u64,
    },
    /// A chunk of `len` bytes at `offset` past the end of snapshot `index`'s `total` bytes.
    ChunkPastEnd {
        len: usize,
        offset: u64,
        index: Index,
        total: u64,
    },
    /// An install with nothing staged.
    NothingStaged,
}

impl StorageError {
    /// For `map_err`: a failed `action` on `path` (the path is copied only on failure).
    pub(crate) fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> StorageError + 'a {
        move |source| StorageError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the filesystem was out of space (ENOSPC): a write that failed before anything
    /// was made durable, which a retry may get through once space is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } | StorageError::IoAt { source, .. } => {
                source.raw_os_error() == Some(ENOSPC) || source.kind() == io::ErrorKind::StorageFull
            }
            _ => false,
        }
    }

    /// For `map_err`: a failed call at `at` in `path`.
    pub(crate) fn io_at(path: &Path, at: At) -> impl FnOnce(io::Error) -> StorageError + '_ {
        move |source| StorageError::IoAt {
            path: path.to_path_buf(),
            at,
            source,
        }
    }

    /// `path` holds something other than was written: `problem` (the sentence after the path).
    pub(crate) fn corrupt(path: &Path, problem: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            problem: problem.into(),
        }
    }

    /// As [`StorageError::corrupt`], at byte `offset` (which `problem` names).
    pub(crate) fn corrupt_at(path: &Path, offset: u64, problem: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: Some(offset),
            problem: problem.into(),
        }
    }

    pub(crate) fn wal(path: &Path, problem: WalProblem) -> StorageError {
        StorageError::Wal {
            path: path.to_path_buf(),
            problem,
        }
    }

    pub(crate) fn refused(path: &Path, refusal: Refusal) -> StorageError {
        StorageError::Refused {
            path: path.to_path_buf(),
            refusal,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            StorageError::IoAt { path, at, source } => {
                let path = path.display();
                match at {
                    At::TruncateTo(len) => {
                        write!(f, "cannot truncate {path} to {len} bytes: {source}")
                    }
                    At::Read(offset) => {
                        write!(f, "cannot read {path} at byte offset {offset}: {source}")
                    }
                    At::ReadNear(offset) => {
                        write!(f, "{path}: read failed near byte offset {offset}: {source}")
                    }
                    At::Write { offset, len } => write!(
                        f,
                        "{path}: at byte offset {offset}: write of {len} bytes failed: {source}"
                    ),
                    At::Sync(offset) => {
                        write!(
                            f,
                            "{path}: at byte offset {offset}: fdatasync failed: {source}"
                        )
                    }
                    At::RenameTo(to) => {
                        write!(f, "cannot rename {path} to {}: {source}", to.display())
                    }
                }
            }
            StorageError::Locked { dir } => write!(
                f,
                "data dir {} is in use by another process (its LOCK file is locked)",
                dir.display()
            ),
            StorageError::WrongNode {
                dir,
                path,
                found,
                expected,
            } => write!(
                f,
                "data dir {} belongs to node {found}, not to node {expected} (per {})",
                dir.display(),
                path.display()
            ),
            StorageError::NoNodeId { dir } => write!(
                f,
                "data dir {} has a wal but no node_id file, so whose log it is is unknown; \
                 refusing to use it",
                dir.display()
            ),
            StorageError::Wal { path, problem } => write_wal_problem(f, path, problem),
            StorageError::Corrupt { path, problem, .. } => {
                write!(f, "{}: {problem}", path.display())
            }
            StorageError::LostStore {
                current,
                store,
                lost: Lost::Store,
            } => write!(
                f,
                "{} names {}, which does not exist",
                current.display(),
                store.display()
            ),
            StorageError::LostStore {
                current,
                store,
                lost: Lost::Current,
            } => write!(
                f,
                "{} is missing but {} holds records or a snapshot; restore {} (one line naming \
                 the store to use, such as store.1) or move the data dir aside",
                current.display(),
                store.display(),
                current.file_name().unwrap_or_default().to_string_lossy()
            ),
            StorageError::Refused { path, refusal } => {
                write!(f, "{}: {refusal}", path.display())
            }
            StorageError::BadChunk { problem } => write!(f, "snapshot chunk: {problem}"),
            StorageError::SnapshotThread { source: Some(e) } => {
                write!(f, "cannot start the snapshot thread: {e}")
            }
            StorageError::SnapshotThread { source: None } => {
                write!(f, "the snapshot thread is gone")
            }
        }
    }
}

fn write_wal_problem(f: &mut fmt::Formatter<'_>, path: &Path, problem: &WalProblem) -> fmt::Result {
    let wal = path.display();
    match problem {
        WalProblem::NoHeader => write!(
            f,
            "{wal}: not a WAL of format version 2: it does not start with a 24-byte header \
             beginning \"raft-wal\" (WALs of earlier versions have none, and this build cannot \
             read them); refusing to start"
        ),
        WalProblem::Version(version) => write!(
            f,
            "{wal}: WAL format version {version} (byte offset 8); this build reads only version \
             2; refusing to start"
        ),
        WalProblem::HeaderCrc => write!(
            f,
            "{wal}: the WAL header at byte offset 0 fails its CRC check; the WAL is corrupt, \
             refusing to start"
        ),
        WalProblem::OutOfSequence { offset, found, due } => write!(
            f,
            "{wal}: frame at byte offset {offset} is frame {found} where frame {due} was due; \
             the WAL is corrupt"
        ),
        WalProblem::NoBaseRecord { offset } => write!(
            f,
            "{wal}: frame at byte offset {offset} does not start with a base record, as the \
             first frame of every segment after the first does; the WAL is corrupt"
        ),
        WalProblem::BadRecord {
            frame,
            offset,
            problem,
        } => write!(
            f,
            "{wal}: frame at byte offset {frame}: record at byte offset {offset}: {problem}; the \
             WAL is corrupt"
        ),
        WalProblem::Damaged {
            offset,
            damage,
            not_torn: NotTorn::LaterFrame { at },
        } => write!(
            f,
            "{wal}: frame at byte offset {offset} is damaged ({damage}), yet a frame written \
             after it starts at byte offset {at}; the WAL is corrupt (this is not a torn write), \
             refusing to start"
        ),
        WalProblem::Damaged {
            offset,
            damage,
            not_torn,
        } => {
            let which = if *not_torn == NotTorn::OnlySegment {
                "the first frame of the only segment left, so it was synced before older ones \
                 were deleted"
            } else {
                "in a segment that is not the newest, so no torn write"
            };
            write!(
                f,
                "{wal}: frame at byte offset {offset} is damaged ({damage}): {which}; the WAL is \
                 corrupt, refusing to start"
            )
        }
        WalProblem::NoFrames => write!(
            f,
            "{wal}: the segment has no frames, so not the base record that every segment after \
             the first starts with; the WAL is corrupt, refusing to start"
        ),
        WalProblem::ShortPrepared { len, min } => write!(
            f,
            "the prepared segment {wal} is {len} bytes, short of {min}"
        ),
    }
}

impl fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordProblem::Truncated { needs, has } => write!(
                f,
                "record truncated: needs {needs} more bytes, the frame has {has}"
            ),
            RecordProblem::NotUtf8 { index, source } => {
                write!(f, "entry {index}: data is not UTF-8: {source}")
            }
            RecordProblem::BadConfig { index, source } => {
                write!(f, "entry {index}: bad configuration: {source}")
            }
            RecordProblem::UnknownKind { index, kind } => {
                write!(f, "entry {index}: unknown payload kind {kind}")
            }
            RecordProblem::UnknownType(tag) => write!(f, "unknown record type {tag}"),
            RecordProblem::AtOrBelowBase { index, base } => write!(
                f,
                "entry {index} is at or below the log's base index {base}"
            ),
            RecordProblem::NotNext { index, last } => {
                write!(f, "entry {index} does not follow the last index {last}")
            }
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::VoteForNodeZero => {
                write!(f, "cannot persist a vote for node 0 (0 means no vote)")
            }
            Refusal::Append { index, base, .. } if index <= base => write!(
                f,
                "cannot append entry {index}: it is at or below the log's base index {base} \
                 (compacted into a snapshot)"
            ),
            Refusal::Append { index, base, last } => write!(
                f,
                "cannot append entry {index} to a log whose last index is {last}: a batch must \
                 start at an index from {} to {}",
                base + 1,
                last + 1
            ),
            Refusal::NotConsecutive { index, after } => write!(
                f,
                "entries of a batch must be consecutive, but entry {index} follows entry {after}"
            ),
            Refusal::RotateBelowBase { index, base } => write!(
                f,
                "cannot rotate to base index {index}, below the log's base index {base}"
            ),
            Refusal::FrameTooBig { len } => {
                write!(f, "a batch of {len} bytes exceeds the 4 GiB frame limit")
            }
            Refusal::Unencodable(what) => write!(f, "{what}"),
            Refusal::AfterFailure { earlier } => {
                write!(f, "refusing to write after an earlier failure: {earlier}")
            }
            Refusal::RecordOrder {
                index,
                term,
                after,
                after_term,
            } => write!(
                f,
                "cannot append record {index} (term {term}) after record {after} (term \
                 {after_term})"
            ),
            Refusal::ReadRange { start, end, last } => write!(
                f,
                "cannot read records {start} to {end}: the store holds 1 to {last}"
            ),
            Refusal::SnapshotNotAtEnd {
                index,
                term,
                last,
                last_term,
            } => write!(
                f,
                "a snapshot at index {index} (term {term}) must end at the last record, {last} \
                 (term {last_term})"
            ),
            Refusal::NotCurrent { index, term } => {
                write!(f, "snapshot {index} (term {term}) is not the current one")
            }
            Refusal::ReadPastEnd {
                offset,
                index,
                total,
            } => write!(
                f,
                "offset {offset} is past the end of snapshot {index}'s {total} bytes"
            ),
            Refusal::ImpossibleLengths {
                index,
                term,
                records_len,
                meta_len,
            } => write!(
                f,
                "snapshot {index} (term {term}) has impossible lengths: {records_len} bytes of \
                 records, {meta_len} of meta"
            ),
            Refusal::ChunkPastEnd {
                len,
                offset,
                index,
                total,
            } => write!(
                f,
                "a chunk of {len} bytes at offset {offset} runs past the end of snapshot \
                 {index}'s {total} bytes"
            ),
            Refusal::NothingStaged => write!(f, "nothing staged"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } | StorageError::IoAt { source, .. } => Some(source),
            StorageError::Wal {
                problem: WalProblem::BadRecord { problem, .. },
                ..
            } => match problem {
                RecordProblem::NotUtf8 { source, .. } => Some(source),
                RecordProblem::BadConfig { source, .. } => Some(source),
                _ => None,
            },
            StorageError::SnapshotThread { source } => source.as_ref().map(|e| e as _),
            StorageError::Wal { .. }
            | StorageError::Locked { .. }
            | StorageError::WrongNode { .. }
            | StorageError::NoNodeId { .. }
            | StorageError::Corrupt { .. }
            | StorageError::LostStore { .. }
            | StorageError::Refused { .. }
            | StorageError::BadChunk { .. } => None,
        }
    }
}

/// For callers whose errors are still sentences: the same text as `Display`.
impl From<StorageError> for String {
    fn from(e: StorageError) -> String {
        e.to_string()
    }
}
