//! The simulated shell's storage side, on the real storage code: each node's
//! `raft::storage::Disk` (WAL, store, snapshots, staged installs) over a simulated filesystem
//! of its own, driven as the peer drives it (`persist_wal`, then the real after-advance round
//! trip through the node loop's `Durable` seam). The snapshot thread's jobs run on the sim's
//! thread at points the seed picks ([`Jobs::Manual`]), so a seed reruns the same file
//! operations. A crash is a process kill or a power cut that loses what was not synced, also
//! in the middle of the round trip. The shadow [`Disk`] is what the real code reported
//! durable when it returned; the invariants read it, and every restart checks the real disk
//! against it: nothing made durable lost, nothing invented.

use super::*;
use raft::peer::{AfterAdvance, Core, Durable, Outbox};
use raft::storage::fs::Fs;
use raft::storage::simfs::SimFs;
use raft::storage::{Disk as RealDisk, Jobs, Restored};
use std::path::Path;

/// Where each node's data directory is on its filesystem.
const DATA_DIR: &str = "/peer/data";

/// WAL segments are created this long (the peer's are megabytes, which every restart would
/// read back).
const SEGMENT_PREALLOC: u64 = 32 << 10;

/// A node's real storage: its filesystem (which outlives crashes), and the `Disk` opened on
/// it while the node runs.
pub struct Real {
    pub fs: SimFs,
    pub disk: Option<RealDisk>,
}

/// What the real round trip told the core, in order, for the shadow to follow.
enum Told {
    Taken(SnapshotId, Option<(Index, Term)>),
    Installed(SnapshotState, SnapshotId),
}

/// The core as the real after-advance code sees it: the node, plus what it was told, and
/// crashes (with [`SimConfig::crash_in_snapshot`]) right before it is told of a snapshot
/// taken or installed: the filesystem as it is then is kept for the restart.
struct SimCore<'a> {
    node: &'a mut Node,
    rng: &'a mut Rng,
    crash_p: f64,
    fs: &'a SimFs,
    crashed: Option<(CrashPoint, SimFs)>,
    told: Vec<Told>,
    /// Indices of the node's log checked as committed in this life, and the committed entries
    /// a compaction is about to drop before they were checked (a snapshot can be started and
    /// announced within one event): checked once the round trip returns.
    checked: Index,
    compacting: Vec<Entry>,
    /// The state of the snapshot the real code started, if it started one.
    started: std::cell::RefCell<Option<SnapshotState>>,
}

impl SimCore<'_> {
    fn crash_here(&mut self, point: CrashPoint) -> bool {
        if self.crashed.is_none() && self.rng.chance(self.crash_p) {
            self.crashed = Some((point, self.fs.fork()));
        }
        self.crashed.is_some()
    }
}

impl Core for SimCore<'_> {
    fn tick(&mut self) {
        self.node.tick()
    }
    fn step(&mut self, msg: Message) {
        self.node.step(msg)
    }
    fn request(&mut self, reply_to: ReplyTo, req: ClientRequest) {
        self.node.request(reply_to, req)
    }
    fn ready(&mut self) -> Ready {
        self.node.ready()
    }
    fn advance(&mut self) {
        self.node.advance()
    }
    fn id(&self) -> NodeId {
        self.node.id()
    }
    fn applied_index(&self) -> Index {
        self.node.applied_index()
    }
    fn hard_state(&self) -> HardState {
        self.node.hard_state()
    }
    fn last(&self) -> (Index, Term) {
        (self.node.log().last_index(), self.node.log().last_term())
    }
    fn snapshot_state(&self) -> Option<SnapshotState> {
        let state = self.node.snapshot_state();
        *self.started.borrow_mut() = Some(state.clone());
        Some(state)
    }
    fn snapshot_taken(&mut self, id: SnapshotId, trailing: u64) -> Option<(Index, Term)> {
        if self.crash_here(CrashPoint::SnapshotBeforeTaken) {
            return None;
        }
        let upto = id.index.min(self.node.commit_index());
        for i in self.checked + 1..=upto {
            self.compacting.extend(self.node.log().get(i).cloned());
        }
        self.checked = self.checked.max(upto);
        let base = self.node.snapshot_taken(id, trailing);
        self.told.push(Told::Taken(id, base));
        base
    }
    fn take_compacted(&mut self) -> Vec<Entry> {
        self.node.take_compacted()
    }
    fn snapshot_chunk_stored(&mut self, leader: NodeId, index: Index, have: u64) {
        if self.crashed.is_none() {
            self.node.snapshot_chunk_stored(leader, index, have)
        }
    }
    fn install_snapshot(&mut self, leader: NodeId, state: SnapshotState, id: SnapshotId) {
        if self.crash_here(CrashPoint::InstallBeforeAck) {
            return;
        }
        self.node.install_snapshot(leader, state.clone(), id);
        self.told.push(Told::Installed(state, id));
    }
}

/// What the round trip sends: held until it returns, and dropped if the node crashed in it.
#[derive(Default)]
struct SimOutbox {
    peers: Vec<Message>,
    replies: Vec<(ReplyTo, ClientReply)>,
}

impl Outbox for SimOutbox {
    fn send_peer(&mut self, msg: Message) {
        self.peers.push(msg);
    }
    fn send_reply(&mut self, to: ReplyTo, reply: ClientReply) {
        self.replies.push((to, reply));
    }
}

/// Whether `r` holds the hard state (its term and vote) and the log of `d`.
fn holds(d: &Disk, r: &Restored) -> bool {
    let last = r.base.0 + r.entries.len() as Index;
    let skip = d.base.0.checked_sub(r.base.0).map(|k| k as usize);
    (r.hard_state.term, r.hard_state.vote) == (d.hard_state.term, d.hard_state.vote)
        && last == d.last_index()
        && skip.is_some_and(|k| k <= r.entries.len() && r.entries[k..] == d.entries[..])
}

/// Records `from..=to` of a real store.
fn read_store(disk: &mut RealDisk, from: Index, to: Index) -> Result<Vec<LogRecord>, String> {
    let mut out = Vec::new();
    let mut next = from;
    while next <= to {
        let (records, more) = disk
            .store
            .read_page(next, to, 1 << 20)
            .map_err(|e| format!("reading records {next}..={to}: {e}"))?;
        if records.is_empty() {
            return Err(format!("reading records {next}..={to}: an empty page"));
        }
        out.extend(records);
        match more {
            Some(n) => next = n,
            None => break,
        }
    }
    Ok(out)
}

impl Sim {
    /// (entries between snapshots, entries kept before one) for the real disk.
    fn snapshot_policy(&self) -> (u64, u64) {
        self.cfg
            .snapshot_every
            .map_or((u64::MAX, 0), |(every, trailing)| (every.max(1), trailing))
    }

    fn real_disk(&mut self, id: NodeId) -> &mut RealDisk {
        self.real
            .get_mut(&id)
            .and_then(|r| r.disk.as_mut())
            .expect("a running node has its disk open")
    }

    /// Opens node `id`'s real disk (a new filesystem for a new node), checks what it restored
    /// against what was made durable, and makes the shadow what it restored.
    pub(super) fn open_disk(&mut self, id: NodeId) -> Restored {
        if !self.real.contains_key(&id) {
            let fs = SimFs::new(self.rng.next_u64());
            fs.set_segment_prealloc(SEGMENT_PREALLOC);
            self.real.insert(id, Real { fs, disk: None });
        }
        let fs = Fs::Sim(self.real[&id].fs.clone());
        let (every, trailing) = self.snapshot_policy();
        let dir = Path::new(DATA_DIR);
        let (mut disk, r) = RealDisk::open_with(&fs, dir, id, every, trailing, Jobs::Manual)
            .unwrap_or_else(|e| self.fail(&format!("node {id} cannot open its storage: {e}")));
        disk.set_segment_bytes(SEGMENT_PREALLOC / 2);
        self.reconcile(id, &mut disk, &r);
        self.real.get_mut(&id).unwrap().disk = Some(disk);
        r
    }

    /// A restarted node's real disk must hold what the real code reported durable (the
    /// shadow): the same hard state (a commit index no lower), a snapshot no older, the same
    /// log (from a base no higher: compacted segments may be left), or, for an install cut
    /// short, the log reset to the installed snapshot; the store cut back to the snapshot and
    /// holding the records applied.
    fn reconcile(&mut self, id: NodeId, disk: &mut RealDisk, r: &Restored) {
        // A batch the power cut short is durable if the restart finds it whole.
        if let Some((hs, entries)) = self.in_flight.remove(&id) {
            let mut whole = self.disks[&id].clone();
            whole.persist(hs, &entries);
            if holds(&whole, r) {
                self.persisted(id, hs, &entries);
            }
        }
        let d = &self.disks[&id];
        let hs = r.hard_state;
        if (hs.term, hs.vote) != (d.hard_state.term, d.hard_state.vote)
            || hs.commit < d.hard_state.commit
        {
            self.fail(&format!(
                "node {id} restarted with hard state {hs:?}; {:?} was made durable",
                d.hard_state
            ));
        }
        let snap = r.snapshot.as_ref().map_or(0, |(s, _)| s.index);
        if snap < d.snapshot_index() {
            self.fail(&format!(
                "node {id} restarted with its snapshot at {snap}; one at {} was made durable",
                d.snapshot_index()
            ));
        }
        let last = r.base.0 + r.entries.len() as Index;
        let moved = r.base != d.base || last != d.last_index();
        if r.entries.is_empty() && snap > 0 && r.base.0 == snap && moved {
            // The WAL did not reach an installed snapshot: reset to its base on opening.
            self.reset_wal(id, r.base);
        } else {
            let skip = d.base.0.checked_sub(r.base.0).map(|k| k as usize);
            let agrees =
                skip.is_some_and(|k| k <= r.entries.len() && r.entries[k..] == d.entries[..]);
            if last != d.last_index() || !agrees {
                self.fail(&format!(
                    "node {id} restarted with a log after {:?} to {last}; its durable log is \
                     after {:?} to {}",
                    r.base,
                    d.base,
                    d.last_index()
                ));
            }
            // Entries left below the base in segments not yet deleted: committed ones.
            for e in &r.entries[..skip.unwrap()] {
                if self.committed.get(&e.index).map(|c| &c.0) != Some(e) {
                    self.fail(&format!(
                        "node {id} restarted with compacted entry {} not the committed one",
                        e.index
                    ));
                }
            }
        }
        if disk.store.last_index() != snap {
            self.fail(&format!(
                "node {id} restarted with {} records in its store, its snapshot at {snap}",
                disk.store.last_index()
            ));
        }
        // The records it kept must be those applied; those of an installed snapshot the
        // shadow never heard of are read, and checked as new ones.
        let keep = (self.disks[&id].store.len() as Index).min(snap);
        let mut probes = vec![1, keep];
        probes.push(self.rng.range(1, keep.max(1)));
        if self.paranoid {
            probes = (1..=keep).collect();
        }
        for i in probes.into_iter().filter(|&i| i >= 1 && i <= keep) {
            let got = read_store(disk, i, i).unwrap_or_else(|e| self.fail(&e));
            let want = &self.disks[&id].store[i as usize - 1];
            if got.first() != Some(want) {
                self.fail(&format!(
                    "node {id} restarted with {got:?} at {i} in its store; {want:?} was applied"
                ));
            }
        }
        let rest = read_store(disk, keep + 1, snap).unwrap_or_else(|e| self.fail(&e));
        let d = self.disks.get_mut(&id).unwrap();
        d.hard_state = hs;
        d.base = r.base;
        d.entries = r.entries.clone();
        d.snapshot = r.snapshot.clone();
        d.store.truncate(keep as usize);
        d.store.extend(rest);
        let checked = self.store_checked.entry(id).or_default();
        *checked = (*checked).min(keep as usize);
    }

    /// Kills node `id`'s process: its disk is closed, and with `power_cut` what it did not
    /// sync may be lost.
    pub(super) fn kill_disk(&mut self, id: NodeId, power_cut: bool) {
        self.disarm(id);
        let Some(real) = self.real.get_mut(&id) else {
            return;
        };
        if real.disk.take().is_some() && power_cut {
            real.fs.power_cut();
            self.stats.power_cuts += 1;
        }
    }

    /// Crashes node `id` with its filesystem as `fs` (a crash image or a copy taken part-way
    /// through the round trip).
    fn crash_into(&mut self, id: NodeId, point: CrashPoint, fs: SimFs) {
        *self.stats.crashes_in_ready.entry(point).or_default() += 1;
        self.stats.power_cuts += 1;
        let real = self.real.get_mut(&id).unwrap();
        real.disk = None;
        real.fs = fs;
        self.crash_process(id);
    }

    /// Makes a Ready's writes durable on the real disk, checking Leader Append-Only and Log
    /// Matching on them (`check`: the first time this batch is written). A full disk (as the
    /// node loop tells it, by `wal_full()`) and an injected I/O error are told to the caller; any
    /// other error fails the run. The shadow takes the batch only once it is written.
    pub(super) fn persist(
        &mut self,
        id: NodeId,
        role: Role,
        term: Term,
        rd: &Ready,
        check: bool,
    ) -> faults::Persisted {
        if check {
            self.check_write(id, role, term, rd);
        }
        // Through the node loop's seam, deciding as its `carry_out` does.
        let disk = self.real_disk(id);
        match Durable::persist(disk, rd.hard_state.as_ref(), &rd.entries) {
            Ok(()) => {
                self.persisted(id, rd.hard_state, &rd.entries);
                faults::Persisted::Done
            }
            Err(_) if disk.persist_waits_for_space() => faults::Persisted::Full,
            Err(_) if self.eio_fired(id) => faults::Persisted::Exit,
            Err(e) => self.fail(&format!("node {id} could not persist a Ready: {e}")),
        }
    }

    /// What node `id`, `role` of `term`, writes must continue its durable log, and a leader
    /// only appends.
    fn check_write(&mut self, id: NodeId, role: Role, term: Term, rd: &Ready) {
        let durable = self.disks[&id].last_index();
        if let Some(first) = rd.entries.first() {
            let base = self.disks[&id].base;
            if first.index <= base.0 {
                self.fail(&format!(
                    "node {id} writes entry {} at or below its WAL's base {base:?}",
                    first.index
                ));
            }
            if first.index > durable + 1 {
                self.fail(&format!(
                    "node {id} writes entry {} past the end of its durable log ({durable})",
                    first.index
                ));
            }
            // Leader Append-Only (Figure 3): a leader only ever appends to its log.
            if role == Role::Leader {
                if first.index != durable + 1 {
                    self.fail(&format!(
                        "Leader Append-Only: leader {id} of term {term} rewrites its log from \
                         index {} (it had {durable} entries)",
                        first.index
                    ));
                }
                if let Some(e) = rd.entries.iter().find(|e| e.term != term) {
                    self.fail(&format!(
                        "leader {id} of term {term} appends an entry of term {}",
                        e.term
                    ));
                }
                for (k, e) in rd.entries.iter().enumerate() {
                    if let Payload::Config(m) = &e.payload {
                        self.leader_appends_config(id, term, e.index, m, &rd.entries[..k]);
                    }
                }
            }
        }
    }

    /// The power fails while node `id` writes a Ready's batch (checked as `persist` checks
    /// it): the node restarts from a crash image taken before the WAL's fsync, which may
    /// hold the batch whole, or none of it, a torn tail cut off on opening.
    pub(super) fn torn_persist(&mut self, id: NodeId, role: Role, term: Term, rd: &Ready) {
        self.check_write(id, role, term, rd);
        let fs = self.real[&id].fs.clone();
        fs.capture_images(u64::MAX);
        let written = self
            .real_disk(id)
            .persist_wal(rd.hard_state.as_ref(), &rd.entries);
        let images = fs.stop_capture();
        if let Err(e) = written {
            self.fail(&format!("node {id} could not persist a Ready: {e}"));
        }
        if images.is_empty() {
            self.fail(&format!("node {id} persisted a Ready with no fsync"));
        }
        let k = self.rng.below(images.len() as u64) as usize;
        let image = images.into_iter().nth(k).unwrap();
        self.in_flight
            .insert(id, (rd.hard_state, rd.entries.clone()));
        self.crash_into(id, CrashPoint::TornPersist, image);
    }

    /// A batch is durable: the shadow takes it, and the durable log's prefix hashes (Log
    /// Matching is checked on them).
    fn persisted(&mut self, id: NodeId, hard_state: Option<HardState>, entries: &[Entry]) {
        self.disks
            .get_mut(&id)
            .unwrap()
            .persist(hard_state, entries);
        let Some(first) = entries.first() else {
            return;
        };
        let prefix = self.prefix.get_mut(&id).unwrap();
        prefix.truncate(first.index as usize - 1);
        let mut h = prefix.last().copied().unwrap_or(0);
        let mut conflict = None;
        for e in entries {
            h = chain(h, entry_hash(e));
            prefix.push(h);
            // Log Matching (Figure 3), over every log that ever existed: an entry's index and
            // term determine it and everything before it.
            let first_writer = self.written.entry((e.index, e.term)).or_insert((h, id));
            if first_writer.0 != h && conflict.is_none() {
                conflict = Some((e.index, e.term, first_writer.1));
            }
        }
        if let Some((index, term, other)) = conflict {
            self.fail(&format!(
                "Log Matching: node {id} wrote an entry at index {index} of term {term} whose \
                 log differs from the one node {other} wrote with that entry"
            ));
        }
    }

    /// Runs the snapshot thread's queued jobs of node `id` now and then: a snapshot's fsyncs,
    /// WAL segments prepared and deleted.
    pub(super) fn maybe_run_jobs(&mut self, id: NodeId) {
        if self.rng.chance(0.5) {
            if let Some(disk) = self.real.get_mut(&id).and_then(|r| r.disk.as_mut()) {
                disk.run_jobs(usize::MAX);
            }
        }
    }

    /// The rest of a Ready once the core advanced, by the real code: applied records to the
    /// store, reads served from it, snapshot chunks sent and staged, snapshots taken and
    /// announced. Now and then the power fails at one of its fsyncs while it stages or
    /// installs a snapshot (among them, between the store swapped in and the WAL reset), or
    /// the node crashes right before the core is told of a snapshot. An error the node loop
    /// takes for an install waiting for space (`install_pending()`) or that an injected I/O
    /// error explains (the process exits, after sending what it sent) is told to the caller,
    /// as is a crash; any other fails the run.
    pub(super) fn after_advance(&mut self, id: NodeId, rd: AfterAdvance) -> faults::AfterOutcome {
        self.check_requests(id, &rd);
        let crash_p = self.cfg.crash_in_snapshot;
        let fs = self.real[&id].fs.clone();
        let capture = !rd.chunk_writes.is_empty() && self.rng.chance(crash_p);
        if capture {
            // Images before fsyncs only.
            fs.capture_images(u64::MAX);
        }
        let applied = rd.applied.clone();
        let reads = rd.store_reads.len() as u64;
        let checked = self.checked_commit.get(&id).copied().unwrap_or(0);
        // Borrowed in place: moving a node and a disk out and back costs more than the rest.
        let Sim {
            real, nodes, rng, ..
        } = self;
        let disk = real.get_mut(&id).unwrap().disk.as_mut().unwrap();
        let segment = disk.wal.next_segment_number();
        let node = nodes.get_mut(&id).unwrap().as_mut().unwrap();
        let mut out = SimOutbox::default();
        let mut core = SimCore {
            node,
            rng,
            crash_p,
            fs: &fs,
            crashed: None,
            told: Vec::new(),
            checked,
            compacting: Vec::new(),
            started: Default::default(),
        };
        let result = Durable::after_advance(disk, rd, &mut core, &mut out);
        let rotations = disk.wal.next_segment_number() - segment;
        let (crashed, told, started) = (core.crashed, core.told, core.started.into_inner());
        let (checked, compacting) = (core.checked, core.compacting);
        let images = if capture {
            fs.stop_capture()
        } else {
            Vec::new()
        };
        let (install_waits, store_behind) = (disk.install_pending(), disk.full().is_some());
        let ops = disk.take_errors();
        if let Some((point, image)) = crashed {
            image.power_cut();
            self.crash_into(id, point, image);
            return faults::AfterOutcome::Down;
        }
        if !images.is_empty() {
            let k = self.rng.below(images.len() as u64) as usize;
            let image = images.into_iter().nth(k).unwrap();
            self.crash_into(id, CrashPoint::InstallPowerCut, image);
            return faults::AfterOutcome::Down;
        }
        let outcome = match result {
            Ok(()) => faults::AfterOutcome::Done,
            Err(_) if install_waits => faults::AfterOutcome::InstallWaits,
            Err(_) if self.eio_fired(id) => faults::AfterOutcome::Down,
            Err(e) => self.fail(&format!(
                "node {id}: storage failed after advance: {e} (failed: {ops:?}, full: {store_behind})"
            )),
        };
        self.stats.wal_rotations += rotations;
        if let Some(state) = started {
            self.started_snapshot.insert(id, state);
        }
        if !compacting.is_empty() {
            let term = self.node(id).unwrap().term();
            for e in compacting {
                self.check_committed(id, term, e);
            }
            self.checked_commit.insert(id, checked);
        }
        for r in applied {
            let store = &mut self.disks.get_mut(&id).unwrap().store;
            let next = store.len() as Index + 1;
            if r.index != next {
                let what = format!(
                    "node {id} applied {} while its store ends at {}",
                    r.index,
                    next - 1
                );
                self.fail(&what);
            }
            store.push(r);
        }
        self.stats.store_reads += reads;
        for msg in out.peers {
            if let Body::InstallSnapshot { .. } = msg.body {
                self.stats.chunks_sent += 1;
            }
            self.send(msg);
        }
        for (to, reply) in out.replies {
            self.transmit(Event::Reply(to, reply));
        }
        for t in told {
            match t {
                Told::Taken(sid, base) => self.snapshot_announced(id, sid, base),
                Told::Installed(state, sid) => self.snapshot_installed(id, state, sid),
            }
        }
        if let faults::AfterOutcome::Down = outcome {
            self.exit_on_error(id);
            return outcome;
        }
        // A store a full disk interrupted is behind: the records wait in memory.
        let have = self.real_disk(id).store.last_index();
        let shadow = self.disks[&id].store.len() as Index;
        if have != shadow && !(store_behind && have < shadow) {
            self.fail(&format!(
                "node {id}'s store holds {have} records, {shadow} were applied"
            ));
        }
        if store_behind && have < shadow {
            self.stats.disk.store_behind += 1;
        } else if self.disk_faults.store_retrying.remove(&id) {
            // Not behind any more: it holds every record applied (checked above).
            self.stats.disk.stores_caught_up += 1;
        }
        outcome
    }

    /// What the core asks of the store must be there: reads within the records applied,
    /// chunks of its current snapshot within its stream.
    fn check_requests(&self, id: NodeId, rd: &AfterAdvance) {
        let d = &self.disks[&id];
        let applied = d.store.len() as Index + rd.applied.len() as Index;
        for r in &rd.store_reads {
            if r.start == 0 || r.start > r.read_index || r.read_index > applied {
                self.fail(&format!(
                    "node {id} asked to read {}..={} from a store of {applied} records",
                    r.start, r.read_index
                ));
            }
        }
        let current = d.snapshot.as_ref().map(|(_, sid)| *sid);
        for c in &rd.chunk_reads {
            if current != Some(c.snapshot)
                || c.len == 0
                || c.offset + c.len > c.snapshot.total_len()
            {
                self.fail(&format!(
                    "node {id} asked to send bytes {}+{} of snapshot {:?}; its current one is \
                     {current:?}",
                    c.offset, c.len, c.snapshot
                ));
            }
        }
    }

    /// A snapshot made durable was announced to the core (`snapshot_taken`), which compacted
    /// its log to `base`, as the real code compacts the WAL.
    fn snapshot_announced(&mut self, id: NodeId, sid: SnapshotId, base: Option<(Index, Term)>) {
        let Some(state) = self
            .started_snapshot
            .get(&id)
            .filter(|s| s.index == sid.index)
            .cloned()
        else {
            self.fail(&format!(
                "node {id} announced snapshot {sid:?}, which it never started"
            ));
        };
        let records = self.disks[&id].store.len() as Index;
        if state.index > records {
            self.fail(&format!(
                "node {id} announced snapshot {sid:?} of {} with {records} records applied",
                state.index
            ));
        }
        self.known_snapshot(id, &state, sid);
        if self.trace {
            println!("t={} node {id} takes snapshot {sid:?}", self.now);
        }
        self.stats.snapshots += 1;
        let disk = self.disks.get_mut(&id).unwrap();
        disk.snapshot = Some((state, sid));
        if let Some(base) = base {
            self.stats.compactions += 1;
            let at = base.0.checked_sub(disk.base.0 + 1).map(|k| k as usize);
            let term = at.and_then(|k| disk.entries.get(k)).map(|e| e.term);
            if base.0 > sid.index || term != Some(base.1) {
                let what = format!(
                    "node {id} compacted to {base:?} (snapshot {}), its WAL has {term:?} there",
                    sid.index
                );
                self.fail(&what);
            }
            disk.entries.drain(..=at.unwrap());
            disk.base = base;
        }
    }

    /// Equal snapshot IDs must mean equal snapshots.
    fn known_snapshot(&mut self, id: NodeId, state: &SnapshotState, sid: SnapshotId) {
        match self.snapshot_states.get(&sid) {
            Some(known) if known != state => self.fail(&format!(
                "node {id}: two different snapshots have ID {sid:?}"
            )),
            Some(_) => {}
            None => {
                self.snapshot_states.insert(sid, state.clone());
            }
        }
    }

    /// A received snapshot was installed (durable, WAL reset) and the core told: the store
    /// is now its records (read back from the real store, and checked as new ones).
    fn snapshot_installed(&mut self, id: NodeId, state: SnapshotState, sid: SnapshotId) {
        self.known_snapshot(id, &state, sid);
        let records = read_store(self.real_disk(id), 1, sid.index)
            .unwrap_or_else(|e| self.fail(&format!("node {id} after an install: {e}")));
        let disk = self.disks.get_mut(&id).unwrap();
        disk.store = records;
        disk.snapshot = Some((state, sid));
        self.store_checked.insert(id, 0);
        self.reset_wal(id, (sid.index, sid.term));
        let disk = self.disks.get_mut(&id).unwrap();
        disk.hard_state.commit = disk.hard_state.commit.max(sid.index);
        self.stats.installs += 1;
    }

    /// The WAL of node `id` now starts at a snapshot's `base`, with no entries: its durable log
    /// is the committed one up to there.
    pub(super) fn reset_wal(&mut self, id: NodeId, base: (Index, Term)) {
        let Some((e, _)) = self.committed.get(&base.0).filter(|_| base.0 > 0) else {
            if base.0 > 0 {
                self.fail(&format!(
                    "node {id}'s WAL reset to {base:?}, never seen committed"
                ));
            }
            let disk = self.disks.get_mut(&id).unwrap();
            disk.base = base;
            disk.entries.clear();
            self.prefix.insert(id, Vec::new());
            return;
        };
        if e.term != base.1 {
            self.fail(&format!(
                "node {id}'s WAL reset to {base:?}, but term {} was committed there",
                e.term
            ));
        }
        let disk = self.disks.get_mut(&id).unwrap();
        disk.base = base;
        disk.entries.clear();
        let prefix = self.committed_prefix[..base.0 as usize].to_vec();
        self.prefix.insert(id, prefix);
    }
}
