//! A peer's durable state as the node loop sees it: the WAL ([`Wal`]: hard state and the
//! log after its base) and the store ([`Store`]: the applied log and its snapshots), and the
//! policy for taking snapshots (`snapshot_entries`, `snapshot_trailing`).
//!
//! Invariant kept across crashes: the WAL continues from the store's latest snapshot (its base
//! is at or below the snapshot's index, and it holds the snapshot's (index, term)), so the core
//! restores from the snapshot plus the WAL after it.

mod error;
pub mod fs;
pub mod simfs;
pub mod store;
pub mod wal;

pub use error::{At, Lost, NotTorn, RecordProblem, Refusal, StorageError, WalProblem};

use fs::Fs;
use store::{Received, SnapshotJob, Store};
use wal::Wal;

use crate::raft::{ChunkRead, ChunkWrite, StoreRead, PAGE_BUDGET};
use crate::raft::{
    ClientResult, Entry, HardState, Index, LogRecord, Message, NodeId, SnapshotId, SnapshotState,
    Term,
};
use crossbeam_channel::{Receiver, Sender};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A WAL segment this long is closed at the next snapshot (see [`Disk::compact_wal`]). A
/// snapshot interval of 10,000 64-byte entries adds about 1 MB, so a segment usually stays
/// within the [`wal::SEGMENT_PREALLOC`] bytes written ahead for it.
const SEGMENT_BYTES: u64 = 1 << 20;

/// How often a store that a full disk interrupted is reopened and written again, and how often
/// the error line for a full disk is repeated.
const FULL_RETRY: Duration = Duration::from_secs(1);
const FULL_REPORT: Duration = Duration::from_secs(10);
/// At most this many records are kept for [`Disk::retry_store`] (with snapshots rare or off,
/// the oldest are dropped; a store a full disk interrupted then cannot be written again in
/// place, and the peer exits, to restart from what is on disk).
const MAX_HELD: usize = 1 << 18;

/// The store counts a page in bytes of record JSON; the reply adds a comma per record (at
/// least 47 bytes each) and its envelope.
const STORE_PAGE_BUDGET: usize = PAGE_BUDGET - 4096;

/// What a peer restores from: the hard state, the latest snapshot, and the log after `base`.
pub struct Restored {
    pub hard_state: HardState,
    pub snapshot: Option<(SnapshotState, SnapshotId)>,
    pub base: (Index, Term),
    pub entries: Vec<Entry>,
}

/// What became of a received snapshot chunk.
pub enum Staged {
    /// The staging area holds `[0, have)` of the stream.
    Partial { have: u64 },
    /// Verified, durable, swapped in, and the WAL reset to its base: tell the core.
    Installed {
        state: SnapshotState,
        id: SnapshotId,
    },
}

/// A snapshot the store has installed whose WAL reset a full disk stopped: the core is told
/// only once the WAL continues from it (the invariant above), so the peer acknowledges
/// nothing meanwhile; [`Disk::retry_install`] tries again.
struct PendingInstall {
    from: NodeId,
    hard_state: HardState,
    state: SnapshotState,
    id: SnapshotId,
}

/// A snapshot job back from the snapshot thread.
type SnapshotDone = Result<SnapshotJob, StorageError>;

/// File work for the snapshot thread, so that taking a snapshot costs the node thread only
/// what must happen in order with its writes.
enum Job {
    /// Make a snapshot durable (fsyncs of the store and its meta file); answered on `done`.
    Snapshot(Box<SnapshotJob>),
    /// Delete compacted WAL segments in this directory.
    DeleteSegments(Fs, PathBuf, Vec<PathBuf>),
    /// Prepare WAL segment `number` in this directory, then publish its number.
    PrepareSegment(Fs, PathBuf, u64, Arc<AtomicU64>),
    /// Free log entries a snapshot compacted away.
    Free(Vec<Entry>),
    /// Answer once every job sent before it is done.
    Barrier(Sender<()>),
}

/// Where the snapshot thread's jobs (a snapshot's fsyncs, WAL segments prepared and deleted)
/// run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Jobs {
    /// On a thread of their own, alongside the node thread (the peer).
    #[default]
    Thread,
    /// Queued until [`Disk::run_jobs`] (or a wait for one, or [`Disk::settle`]) runs them on
    /// the caller's thread: one order of file operations for a seed, for the simulator.
    Manual,
}

pub struct Disk {
    pub wal: Wal,
    pub store: Store,
    /// Entries applied between two snapshots, and entries kept before a snapshot's index.
    snapshot_entries: u64,
    snapshot_trailing: u64,
    /// A WAL segment this long is closed at the next snapshot ([`SEGMENT_BYTES`] unless set).
    segment_bytes: u64,
    /// Index of the latest snapshot, or of the one being written (0: none).
    snapshot_index: Index,
    /// A snapshot handed to the snapshot thread and not yet back.
    writing: bool,
    /// A snapshot back from the snapshot thread, not yet announced to the core.
    written: Option<SnapshotId>,
    /// How long the node thread took to start the latest snapshot ([`Disk::start_snapshot`]).
    pub started_in: Duration,
    jobs: Sender<Job>,
    done: Receiver<SnapshotDone>,
    /// With [`Jobs::Manual`]: the queue the snapshot thread would take jobs from, and where
    /// it would answer.
    manual: Option<(Receiver<Job>, Sender<SnapshotDone>)>,
    /// The number of the WAL segment the snapshot thread last prepared (0: none yet); a
    /// rotation takes it if it is the next number.
    prepared: Arc<AtomicU64>,
    /// The records applied after the store's latest durable snapshot, so that a store a full
    /// disk interrupted can be reopened (which cuts it back to that snapshot) and written
    /// again. About a snapshot interval of records.
    since_snapshot: Vec<LogRecord>,
    /// While the store cannot be written for lack of space: what failed, and when to retry.
    /// Applied records wait in `since_snapshot` meanwhile.
    store_full: Option<(String, Instant)>,
    /// While the WAL cannot be written for lack of space: what failed.
    wal_full: Option<String>,
    /// An installed snapshot the WAL does not continue from yet (a full disk).
    pending_install: Option<PendingInstall>,
    /// When the full disk was last reported (the error line is rate-limited).
    reported: Option<Instant>,
    /// Storage errors since the shell last took them, by what failed (`wal_write`,
    /// `store_write`, `snapshot`, `wal_rotate`, `snapshot_install`), for
    /// `raft_storage_errors_total`.
    errors: Vec<&'static str>,
}

impl Disk {
    /// Opens the WAL (which locks the directory) and the store, and makes the WAL continue
    /// from the store's snapshot if a crash came between installing one and resetting the WAL.
    pub fn open(
        dir: &Path,
        node_id: NodeId,
        snapshot_entries: u64,
        snapshot_trailing: u64,
    ) -> Result<(Disk, Restored), StorageError> {
        Disk::open_in(&Fs::Real, dir, node_id, snapshot_entries, snapshot_trailing)
    }

    /// [`Disk::open`] on filesystem `fs`.
    pub fn open_in(
        fs: &Fs,
        dir: &Path,
        node_id: NodeId,
        snapshot_entries: u64,
        snapshot_trailing: u64,
    ) -> Result<(Disk, Restored), StorageError> {
        let (entries, trailing) = (snapshot_entries, snapshot_trailing);
        Disk::open_with(fs, dir, node_id, entries, trailing, Jobs::Thread)
    }

    /// [`Disk::open_in`], with the snapshot thread's jobs run as `jobs` says.
    pub fn open_with(
        fs: &Fs,
        dir: &Path,
        node_id: NodeId,
        snapshot_entries: u64,
        snapshot_trailing: u64,
        jobs: Jobs,
    ) -> Result<(Disk, Restored), StorageError> {
        let (mut wal, mut hard_state, mut entries) = Wal::open_in(fs, dir, node_id)?;
        let (store, snapshot) = Store::open_in(fs, dir)?;
        let mut base = wal.base();
        let snapshot = snapshot.map(|(meta, id)| (meta.state, id));
        match &snapshot {
            Some((state, _)) => {
                let term_at = |i: Index| {
                    if i == base.0 {
                        Some(base.1)
                    } else if i > base.0 {
                        entries.get((i - base.0 - 1) as usize).map(|e| e.term)
                    } else {
                        None
                    }
                };
                if term_at(state.index) != Some(state.term) {
                    log::warn!(
                        "{}: the WAL does not reach the snapshot at {} (term {}): an install was cut short; starting the log from the snapshot",
                        dir.display(),
                        state.index,
                        state.term
                    );
                    hard_state.commit = hard_state.commit.max(state.index);
                    let snap = (state.index, state.term);
                    let rotated = wal.rotate(&hard_state, snap);
                    reset_if_full(&mut wal, rotated, &hard_state, snap, &mut Vec::new())?;
                    wal.compact(state.index)?;
                    base = (state.index, state.term);
                    entries.clear();
                }
            }
            None if base.0 > 0 => {
                let problem = format!(
                    "the WAL starts after index {} but the store has no snapshot covering it",
                    base.0
                );
                return Err(StorageError::corrupt(dir, problem));
            }
            None => {}
        }
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let manual = match jobs {
            Jobs::Manual => Some((jobs_rx, done_tx)),
            Jobs::Thread => {
                thread::Builder::new()
                    .name("snapshot".into())
                    .spawn(move || snapshot_thread(jobs_rx, done_tx))
                    .map_err(|e| StorageError::SnapshotThread { source: Some(e) })?;
                None
            }
        };
        let disk = Disk {
            wal,
            store,
            snapshot_entries,
            snapshot_trailing,
            segment_bytes: SEGMENT_BYTES,
            snapshot_index: snapshot.as_ref().map_or(0, |(s, _)| s.index),
            writing: false,
            written: None,
            started_in: Duration::ZERO,
            jobs: jobs_tx,
            done,
            manual,
            prepared: Arc::new(AtomicU64::new(0)),
            since_snapshot: Vec::new(),
            store_full: None,
            wal_full: None,
            pending_install: None,
            reported: None,
            errors: Vec::new(),
        };
        disk.prepare_segment()?;
        let restored = Restored {
            hard_state,
            snapshot,
            base,
            entries,
        };
        Ok((disk, restored))
    }

    /// Persists the hard state and entries in the WAL ([`Wal::persist`]); notes a full disk
    /// (the batch may be written again once there is space) and counts errors.
    pub fn persist_wal(
        &mut self,
        hard_state: Option<&HardState>,
        entries: &[Entry],
    ) -> Result<(), StorageError> {
        match self.wal.persist(hard_state, entries) {
            Ok(()) => {
                if let Some(what) = self.wal_full.take() {
                    log::info!("space again: the WAL is written ({what} earlier)");
                }
                Ok(())
            }
            Err(e) => {
                self.errors.push("wal_write");
                if e.is_disk_full() {
                    self.report_full(&e);
                    self.wal_full = Some(e.to_string());
                } else {
                    // Not a batch to write again: the peer exits (crash-only).
                    self.wal_full = None;
                }
                Err(e)
            }
        }
    }

    /// What a full disk stopped, if anything: the WAL (this peer acknowledges nothing until
    /// it is written) or the store.
    pub fn full(&self) -> Option<&str> {
        match (&self.wal_full, &self.store_full) {
            (Some(what), _) | (None, Some((what, _))) => Some(what),
            (None, None) => None,
        }
    }

    /// Whether the last persist failed for lack of space: the batch is to be written again.
    /// A store left behind by a full disk does not count (it catches up by itself).
    pub fn wal_full(&self) -> bool {
        self.wal_full.is_some()
    }

    /// The storage errors since the last call, by what failed.
    pub fn take_errors(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.errors)
    }

    /// The error line for a full disk, at most every [`FULL_REPORT`].
    fn report_full(&mut self, e: &StorageError) {
        let now = Instant::now();
        if self
            .reported
            .is_none_or(|at| now.duration_since(at) >= FULL_REPORT)
        {
            self.reported = Some(now);
            log::error!("disk full: {e}; retrying until there is space");
        }
    }

    /// Appends applied records to the store; records it already has (the core re-applies
    /// from its snapshot after a restart) are skipped. A store the disk had no space for is
    /// left behind (see [`Disk::retry_store`]); the records wait in memory meanwhile.
    pub fn apply(&mut self, records: &[LogRecord]) -> Result<(), StorageError> {
        let have = self
            .since_snapshot
            .last()
            .map_or(0, |r| r.index)
            .max(self.store.last_index());
        let from = records.partition_point(|r| r.index <= have);
        let records = &records[from..];
        self.since_snapshot.extend_from_slice(records);
        if self.since_snapshot.len() > MAX_HELD && self.store_full.is_none() {
            self.since_snapshot.drain(..MAX_HELD / 2);
        }
        if self.store_full.is_some() {
            return self.retry_store();
        }
        let appended = self.store.append(records);
        self.store_failed(appended, "store_write")
    }

    /// Passes `result` on, unless it is a full disk: then the store is left behind until
    /// [`Disk::retry_store`] gets it written.
    fn store_failed(
        &mut self,
        result: Result<(), StorageError>,
        op: &'static str,
    ) -> Result<(), StorageError> {
        let Err(e) = result else {
            return Ok(());
        };
        self.errors.push(op);
        if !e.is_disk_full() {
            return Err(e);
        }
        self.report_full(&e);
        if self.store_full.is_none() {
            self.store_full = Some((e.to_string(), self.next_store_retry()));
        }
        Ok(())
    }

    /// When a store a full disk left behind is next written again: [`FULL_RETRY`] from now,
    /// or with [`Jobs::Manual`] only when asked ([`Disk::retry_store_now`]), so that a seed
    /// of the simulator does not depend on the clock.
    fn next_store_retry(&self) -> Instant {
        let wait = if self.manual.is_none() {
            FULL_RETRY
        } else {
            Duration::from_secs(1 << 30)
        };
        Instant::now() + wait
    }

    /// Makes the retry of a store a full disk left behind due now (it runs at the next
    /// `apply`): for the simulator, whose disks retry only when asked.
    #[doc(hidden)]
    pub fn retry_store_now(&mut self) {
        if let Some((_, due)) = &mut self.store_full {
            *due = Instant::now();
        }
    }

    /// Once a retry is due: reopens the store (cut back to its latest durable snapshot) and
    /// writes the records applied since, flushed so that a disk still full shows now.
    fn retry_store(&mut self) -> Result<(), StorageError> {
        let Some((what, due)) = self.store_full.clone() else {
            return Ok(());
        };
        if Instant::now() < due {
            return Ok(());
        }
        self.store_full = None;
        if self.writing {
            let written = self.wait_for_snapshot();
            self.snapshot_done(written)?;
        }
        let reopened = Store::open_in(self.wal.fs(), self.wal.dir()).and_then(|(store, _)| {
            self.store = store;
            let have = self.store.last_index();
            let from = self.since_snapshot.partition_point(|r| r.index <= have);
            let held = &self.since_snapshot[from..];
            if held.first().is_some_and(|r| r.index != have + 1) {
                let problem = format!(
                    "the store was cut back to record {have} and the records after it are no \
                     longer held in memory (a full disk interrupted it); restart to re-apply \
                     them from the WAL"
                );
                return Err(StorageError::corrupt(self.wal.dir(), problem));
            }
            self.store.append(held)?;
            self.store.flush()
        });
        self.store_failed(reopened, "store_write")?;
        let next = self.next_store_retry();
        match &mut self.store_full {
            Some((_, due)) => *due = next,
            None => log::info!("space again: the store is written ({what} earlier)"),
        }
        Ok(())
    }

    /// One page of a read the core left to the store.
    pub fn page(&mut self, read: &StoreRead) -> ClientResult {
        if let Some((what, _)) = &self.store_full {
            return ClientResult::Refused {
                reason: format!("this peer's store is behind for lack of disk space: {what}"),
            };
        }
        match self
            .store
            .read_page(read.start, read.read_index, STORE_PAGE_BUDGET)
        {
            Ok((entries, next)) => ClientResult::Entries {
                entries,
                read_index: read.read_index,
                next,
            },
            Err(e) if e.is_disk_full() => {
                // The read flushed appended records and the disk had no room: the store is
                // behind, as when an append finds no room, and is written again later.
                let reason = format!("this peer's store is behind for lack of disk space: {e}");
                if let Err(e) = self.store_failed(Err(e), "store_write") {
                    log::error!("{e}");
                }
                ClientResult::Refused { reason }
            }
            Err(e) => {
                log::error!("cannot serve a read from the store: {e}");
                ClientResult::Refused {
                    reason: format!("this peer cannot read its store: {e}"),
                }
            }
        }
    }

    /// The InstallSnapshot message for a chunk the core wants sent, or None if its snapshot
    /// was superseded meanwhile (the core moves on to the newer one).
    pub fn chunk(&mut self, c: &ChunkRead, from: NodeId) -> Option<Message> {
        match self.store.read_chunk(&c.snapshot, c.offset, c.len) {
            Ok(bytes) => {
                let (data, crc) = store::encode_chunk(&bytes);
                Some(c.message(from, data, crc))
            }
            Err(e) => {
                log::debug!("not sending a snapshot chunk to {}: {e}", c.to);
                None
            }
        }
    }

    /// Stages a received chunk; the last one installs the snapshot and resets the WAL to its
    /// base, durably, before the core is told (and acknowledges it). A chunk that fails its
    /// checksum is dropped: the answer says what is held, and the leader sends it again.
    pub fn stage(&mut self, w: &ChunkWrite, hard_state: HardState) -> Result<Staged, StorageError> {
        let id = w.snapshot;
        // An install replaces the store directory a snapshot may still be written into.
        if self.writing {
            let written = self.wait_for_snapshot();
            self.snapshot_done(written)?;
        }
        let received = store::decode_chunk(&w.data, w.crc)
            .and_then(|bytes| self.store.receive_chunk(&id, w.offset, &bytes));
        let meta = match received {
            Ok(Received::Partial { have }) => return Ok(Staged::Partial { have }),
            Ok(Received::Installed { meta }) => meta,
            Err(e) => {
                if e.is_disk_full() {
                    // Retried when the leader sends the chunk again (see `Store::install`).
                    self.errors.push("snapshot_install");
                    self.report_full(&e);
                } else {
                    log::warn!(
                        "dropping chunk at {} of snapshot {} from {}: {e}",
                        w.offset,
                        id.index,
                        w.from
                    );
                }
                let have = self.store.staged(&id);
                return Ok(Staged::Partial { have });
            }
        };
        // A snapshot of the store just replaced is no longer ours to announce; the new store
        // is written whole, whatever a full disk left behind in the old one.
        self.written = None;
        self.since_snapshot.clear();
        self.store_full = None;
        let state = meta.state;
        let hard_state = HardState {
            commit: hard_state.commit.max(state.index),
            ..hard_state
        };
        let pending = PendingInstall {
            from: w.from,
            hard_state,
            state,
            id,
        };
        let (_, state, id) = self.finish_install(pending)?;
        Ok(Staged::Installed { state, id })
    }

    /// Whether a snapshot is installed in the store but the WAL does not continue from it
    /// yet, for lack of space ([`Disk::retry_install`]).
    pub fn install_pending(&self) -> bool {
        self.pending_install.is_some()
    }

    /// Tries again to reset the WAL to a snapshot installed while the disk was full; once it
    /// is durable, returns who sent the snapshot and what it is, for the core to install.
    pub fn retry_install(
        &mut self,
    ) -> Result<Option<(NodeId, SnapshotState, SnapshotId)>, StorageError> {
        match self.pending_install.take() {
            Some(pending) => self.finish_install(pending).map(Some),
            None => Ok(None),
        }
    }

    /// Resets the WAL to an installed snapshot's base (a new segment, or in place when there
    /// is no room for one), durably, then lets it compact. A full disk leaves the install
    /// pending, reported as a full WAL: the core has not been told, so nothing is acknowledged.
    fn finish_install(
        &mut self,
        pending: PendingInstall,
    ) -> Result<(NodeId, SnapshotState, SnapshotId), StorageError> {
        let base = (pending.state.index, pending.state.term);
        if let Err(e) = self.reset_wal(&pending.hard_state, base) {
            if e.is_disk_full() {
                self.errors.push("wal_write");
                self.report_full(&e);
                self.wal_full = Some(e.to_string());
                self.pending_install = Some(pending);
            }
            return Err(e);
        }
        if let Some(what) = self.wal_full.take() {
            log::info!(
                "space again: the WAL continues from the installed snapshot ({what} earlier)"
            );
        }
        self.wal.compact(base.0)?;
        self.prepare_segment()?;
        self.snapshot_index = base.0;
        Ok((pending.from, pending.state, pending.id))
    }

    /// Starts the WAL afresh at `base` with `hard_state`, durably.
    fn reset_wal(
        &mut self,
        hard_state: &HardState,
        base: (Index, Term),
    ) -> Result<(), StorageError> {
        // The next segment is prepared once the node thread is done with the WAL's files, so
        // that the two threads never work on them at once (tests then see one order).
        let prepared = self.prepared.load(Ordering::Acquire) == self.wal.next_segment_number();
        let rotated = self.wal.rotate_using(hard_state, base, prepared);
        reset_if_full(&mut self.wal, rotated, hard_state, base, &mut self.errors)?;
        self.wal.write_first_frame()
    }

    /// Starts a new WAL segment with base `base`, the one the snapshot thread prepared if it
    /// is ready, and has it prepare the next.
    pub fn rotate_wal(
        &mut self,
        hard_state: &HardState,
        base: (Index, Term),
    ) -> Result<(), StorageError> {
        let prepared = self.prepared.load(Ordering::Acquire) == self.wal.next_segment_number();

        self.wal.rotate_using(hard_state, base, prepared)?;
        self.prepare_segment()
    }

    /// Has the snapshot thread prepare the WAL segment after the newest and publish it in
    /// `prepared`.
    fn prepare_segment(&self) -> Result<(), StorageError> {
        self.send(Job::PrepareSegment(
            self.wal.fs().clone(),
            self.wal.dir().to_path_buf(),
            self.wal.next_segment_number(),
            self.prepared.clone(),
        ))
    }

    fn send(&self, job: Job) -> Result<(), StorageError> {
        self.jobs
            .send(job)
            .map_err(|_| StorageError::SnapshotThread { source: None })
    }

    /// Has the snapshot thread free `entries` (those a snapshot compacted away): for a
    /// snapshot interval's worth that took the node thread 0.6-0.7 ms at p50 in the bench.
    pub fn free_later(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.send(Job::Free(entries))
    }

    /// Whether enough entries were applied since the latest snapshot to take another (and
    /// none is being written).
    pub fn snapshot_due(&self, applied: Index) -> bool {
        !self.writing
            && self.store_full.is_none()
            && applied >= self.snapshot_index.saturating_add(self.snapshot_entries)
            && self.store.last_index() == applied
    }

    /// Starts a snapshot of the store up to `state.index`: what must happen in order with
    /// appends happens here; the fsyncs happen on the snapshot thread (see
    /// [`Disk::snapshot_written`]).
    pub fn start_snapshot(&mut self, state: &SnapshotState) -> Result<(), StorageError> {
        let started = Instant::now();
        let job = match self.store.begin_snapshot(state) {
            Ok(job) => job,
            Err(e) => return self.store_failed(Err(e), "snapshot"),
        };
        self.started_in = started.elapsed();
        self.snapshot_index = state.index;
        self.writing = true;
        self.send(Job::Snapshot(Box::new(job)))
    }

    /// The snapshot the snapshot thread made durable, if one is back: it is now the one this
    /// peer sends. None also when the store was replaced by an install meanwhile.
    pub fn snapshot_written(&mut self) -> Result<Option<SnapshotId>, StorageError> {
        if let Some(id) = self.written.take() {
            return Ok(Some(id));
        }
        if !self.writing {
            return Ok(None);
        }
        match self.done.try_recv() {
            Ok(result) => {
                self.writing = false;
                self.snapshot_done(result)?;
                Ok(self.written.take())
            }
            Err(_) => Ok(None),
        }
    }

    /// Takes a snapshot job back from the snapshot thread: a written one becomes the store's
    /// latest (in `written`, to announce); one the disk had no space for is dropped, and the
    /// next is taken a snapshot interval later.
    fn snapshot_done(
        &mut self,
        result: Result<SnapshotJob, StorageError>,
    ) -> Result<(), StorageError> {
        match result {
            Ok(job) => {
                self.written = self.store.finish_snapshot(job);
                if let Some(id) = self.written {
                    let upto = self.since_snapshot.partition_point(|r| r.index <= id.index);
                    self.since_snapshot.drain(..upto);
                }
                Ok(())
            }
            Err(e) if e.is_disk_full() => {
                self.errors.push("snapshot");
                self.report_full(&e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn wait_for_snapshot(&mut self) -> Result<SnapshotJob, StorageError> {
        self.writing = false;
        while self.manual.is_some() && self.done.is_empty() {
            if self.run_jobs(1) == 0 {
                return Err(StorageError::SnapshotThread { source: None });
            }
        }
        self.done
            .recv()
            .map_err(|_| StorageError::SnapshotThread { source: None })?
    }

    /// Waits until the snapshot thread has done every job sent so far (a snapshot's fsyncs,
    /// segment preparations and deletions), so that tests see one order of file operations.
    pub fn settle(&self) -> Result<(), StorageError> {
        if self.manual.is_some() {
            self.run_jobs(usize::MAX);
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Job::Barrier(tx))?;
        rx.recv()
            .map_err(|_| StorageError::SnapshotThread { source: None })
    }

    /// With [`Jobs::Manual`], runs at most `max` of the queued jobs, oldest first, on this
    /// thread; returns how many ran (0 with [`Jobs::Thread`]).
    pub fn run_jobs(&self, max: usize) -> usize {
        let Some((jobs, done)) = &self.manual else {
            return 0;
        };
        let mut ran = 0;
        while ran < max {
            let Ok(job) = jobs.try_recv() else { break };
            run_job(job, done);
            ran += 1;
        }
        ran
    }

    /// Closes a WAL segment at a snapshot once it holds `bytes` (not [`SEGMENT_BYTES`]): the
    /// simulator's short runs then rotate and delete segments too.
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
    }

    pub fn snapshot_trailing(&self) -> u64 {
        self.snapshot_trailing
    }

    /// After the core compacted its log to `base`: start a new WAL segment after the log's
    /// `last` entry once the current one holds [`SEGMENT_BYTES`], and have the snapshot
    /// thread delete the segments wholly at or below `base`. A segment is started only that
    /// often (so the WAL holds two or three segments and what the log has since) because one
    /// the snapshot thread did not prepare in time costs the node thread syncs.
    pub fn compact_wal(
        &mut self,
        hard_state: &HardState,
        last: (Index, Term),
        base: Index,
    ) -> Result<(), StorageError> {
        if self.wal.segment_len() >= self.segment_bytes {
            if let Err(e) = self.rotate_wal(hard_state, last) {
                // Nothing changed: the WAL goes on in its current segment.
                self.errors.push("wal_rotate");
                if !e.is_disk_full() {
                    return Err(e);
                }
                self.report_full(&e);
            }
        }
        let doomed = self.wal.compact_later(base)?;
        if !doomed.is_empty() {
            let (fs, dir) = (self.wal.fs().clone(), self.wal.dir().to_path_buf());
            self.send(Job::DeleteSegments(fs, dir, doomed))?;
        }
        Ok(())
    }
}

/// After a WAL rotation to an installed snapshot's `base` failed for lack of space for a new
/// segment: resets the log to that base in the newest segment instead
/// ([`Wal::reset_in_place`]), counting the failure (`wal_rotate`).
fn reset_if_full(
    wal: &mut Wal,
    rotated: Result<(), StorageError>,
    hard_state: &HardState,
    base: (Index, Term),
    errors: &mut Vec<&'static str>,
) -> Result<(), StorageError> {
    match rotated {
        Err(e) if e.is_disk_full() => {
            errors.push("wal_rotate");
            log::error!("disk full: {e}; resetting the WAL to the snapshot in its newest segment");
            wal.reset_in_place(hard_state, base)
        }
        other => other,
    }
}

/// The snapshot thread: runs jobs in order until the disk is dropped.
fn snapshot_thread(jobs: Receiver<Job>, done: Sender<SnapshotDone>) {
    for job in jobs {
        if !run_job(job, &done) {
            return;
        }
    }
}

/// Runs one job; false once nobody takes snapshot results any more.
fn run_job(job: Job, done: &Sender<SnapshotDone>) -> bool {
    match job {
        Job::Snapshot(job) => return done.send(job.write()).is_ok(),
        Job::PrepareSegment(fs, dir, number, prepared) => {
            match wal::prepare_segment(&fs, &dir, number) {
                Ok(true) => prepared.store(number, Ordering::Release),
                // The node thread created that segment itself meanwhile.
                Ok(false) => {}
                // Rotations then create their segments on the node thread.
                Err(e) => log::warn!("{e}"),
            }
        }
        Job::Free(entries) => drop(entries),
        Job::Barrier(done) => {
            let _ = done.send(());
        }
        Job::DeleteSegments(fs, dir, doomed) => {
            if let Err(e) = wal::delete_segments(&fs, &dir, &doomed) {
                // A segment left behind is replayed first and gives the same log.
                log::warn!("compacting the WAL: {e}");
            }
        }
    }
    true
}

#[cfg(test)]
mod tests;
