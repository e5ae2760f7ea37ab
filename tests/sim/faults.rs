//! Disk faults injected into the real storage code (issue 24): a full disk on one node at a
//! time for a random while, and failed fsyncs and writes (EIO), each carried out as the peer's
//! node loop does (`src/peer/node_loop.rs`, `carry_out` and `wait_for_space`).
//!
//! - Full disk: a failed `persist_wal` with `Disk::full()` set holds the whole Ready (nothing
//!   more of it sent, the core not advanced, no replies); the node drops peer messages, ticks
//!   and client requests meanwhile, retries the same batch every [`FULL_RETRY`] of virtual
//!   time, and a leader sends TimeoutNow once per held Ready to its most up-to-date voter
//!   (`raft::peer::hand_over`). An install whose WAL reset finds no room
//!   (`Durable::install_pending()`) waits the same way, calling the round trip again with
//!   nothing new until it goes through. Once space is back the node goes on, no restart.
//! - EIO: any other storage error that an armed fault explains is the process exiting
//!   (crash-only): the disk is dropped without a power cut (the page cache survives a process
//!   exit; what the failed fsync would have made durable SimFs already dropped, as Linux may),
//!   and the node restarts later from what is on disk. Errors no injected fault explains fail
//!   the run.

use super::*;
use raft::storage::simfs::Faults;

/// How long the node loop waits between attempts to write a batch the disk had no space for.
pub const FULL_RETRY: Time = raft::peer::FULL_RETRY.as_millis() as Time * MS;

/// How long a full-disk episode lasts, uniformly.
const FULL_FOR: (Time, Time) = (300 * MS, 4_000 * MS);
/// A full disk's capacity is what the node uses plus up to this many bytes.
const FULL_SLACK: u64 = 4 << 10;

/// What a node whose disk is full is waiting to do again.
pub(super) enum Waiting {
    /// Write a Ready's batch; then carry out the rest of it.
    Persist(Box<Carrying>),
    /// Finish a snapshot install the WAL reset found no room for (the round trip with
    /// nothing new).
    Install,
}

/// A node waiting for space, as `wait_for_space` leaves it.
pub(super) struct Held {
    pub waiting: Waiting,
    /// Whether this Ready already asked a voter to take over (once per Ready, as `carry_out`).
    pub handed_over: bool,
    /// Tells this wait's retries from a stale one.
    pub serial: u64,
}

/// A Ready being carried out, from step `next` of `acts` on.
pub(super) struct Carrying {
    pub rd: Ready,
    pub after: Option<AfterAdvance>,
    pub acts: Vec<Act>,
    pub next: usize,
    pub role: Role,
    pub term: Term,
    pub handed_over: bool,
    /// Its batch waited for space at least once.
    pub was_held: bool,
}

/// The faults injected, and what they did.
#[derive(Debug, Default)]
pub(super) struct DiskFaults {
    /// `SIM_DISK_FAULTS=0` turns them off.
    pub enabled: bool,
    /// The node whose disk is full, with the episode's serial.
    pub full: Option<(NodeId, u64)>,
    pub serial: u64,
    /// Nodes with an EIO fault armed: true for a failing fsync, false for a failing write.
    pub armed: BTreeMap<NodeId, bool>,
    /// Nodes whose store, left behind by a full disk, was asked to be written again.
    pub store_retrying: BTreeSet<NodeId>,
}

/// What the injected disk faults did in a run: full-disk episodes; Readies whose batch waited
/// for space, and those written once it was back; retries; installs that waited for space and
/// went through; TimeoutNows sent by a leader whose disk was full; peer messages, ticks and
/// client requests a waiting node dropped; round trips that left a store behind (a full disk
/// stopped its appends, the records wait in memory), retries of such a store asked for once
/// space was back, and stores caught up (written again, holding every record applied);
/// queries a store refused (behind, or its read failed); exits on a failed fsync and on a
/// failed write.
#[derive(Clone, Debug, Default)]
pub struct DiskStats {
    pub full_episodes: u64,
    pub held_batches: u64,
    pub written_after_space: u64,
    pub full_retries: u64,
    pub installs_waited: u64,
    pub installs_after_space: u64,
    pub hand_overs: u64,
    pub dropped_while_full: u64,
    pub store_behind: u64,
    pub store_retries: u64,
    pub stores_caught_up: u64,
    pub reads_refused: u64,
    pub fsync_exits: u64,
    pub write_exits: u64,
}

impl DiskStats {
    /// Adds another run's counts.
    pub fn add(&mut self, o: &DiskStats) {
        self.full_episodes += o.full_episodes;
        self.held_batches += o.held_batches;
        self.written_after_space += o.written_after_space;
        self.full_retries += o.full_retries;
        self.installs_waited += o.installs_waited;
        self.installs_after_space += o.installs_after_space;
        self.hand_overs += o.hand_overs;
        self.dropped_while_full += o.dropped_while_full;
        self.store_behind += o.store_behind;
        self.store_retries += o.store_retries;
        self.stores_caught_up += o.stores_caught_up;
        self.reads_refused += o.reads_refused;
        self.fsync_exits += o.fsync_exits;
        self.write_exits += o.write_exits;
    }
}

/// What a write of a Ready's batch came to.
pub(super) enum Persisted {
    Done,
    /// The disk is full: wait and write it again.
    Full,
    /// An injected I/O error: the process exits.
    Exit,
}

/// What the round trip after `advance` came to.
pub(super) enum AfterOutcome {
    Done,
    /// The node crashed in it or exited after it (an injected I/O error).
    Down,
    /// An install waits for space.
    InstallWaits,
}

/// Whether randomized runs inject disk faults (`SIM_DISK_FAULTS=0` turns them off).
pub fn disk_faults_enabled() -> bool {
    std::env::var("SIM_DISK_FAULTS").map_or(true, |v| v.trim() != "0")
}

impl DiskFaults {
    pub fn from_env() -> DiskFaults {
        DiskFaults {
            enabled: disk_faults_enabled(),
            ..DiskFaults::default()
        }
    }
}

impl Sim {
    /// Whether node `id`'s filesystem has no fault set (a power cut mid-write is then
    /// simulated as before: a fault would stop the write it images).
    pub(super) fn faults_quiet(&self, id: NodeId) -> bool {
        let f = self.real[&id].fs.faults();
        f.capacity.is_none()
            && f.failing_syncs == 0
            && f.failing_writes == 0
            && f.growing_writes_left.is_none()
    }

    /// Whether an EIO fault armed on node `id` went off: an error now is the process exiting.
    pub(super) fn eio_fired(&self, id: NodeId) -> bool {
        let f = self.real[&id].fs.faults();
        self.disk_faults.armed.contains_key(&id) && f.failing_syncs == 0 && f.failing_writes == 0
    }

    /// Whether disk faults are injected (`SIM_DISK_FAULTS=0` turns them off).
    pub fn disk_faults_on(&self) -> bool {
        self.disk_faults.enabled
    }

    pub fn is_held(&self, id: NodeId) -> bool {
        self.held.contains_key(&id)
    }

    /// One disk fault on a running node, at random: its disk fills for a while (if no disk is
    /// full), or its next fsync or its next write fails.
    pub fn random_disk_fault(&mut self) {
        if !self.disk_faults.enabled {
            return;
        }
        let up: Vec<NodeId> = self
            .up_nodes()
            .into_iter()
            .filter(|&i| !self.is_held(i) && self.faults_quiet(i))
            .collect();
        if up.is_empty() {
            return;
        }
        let id = self.rng.pick(&up);
        match self.rng.below(4) {
            0 | 1 if self.disk_faults.full.is_none() => self.fill_disk(id),
            0 | 1 => {}
            k => self.arm_eio(id, k == 2),
        }
    }

    /// Node `id`'s disk fills: its capacity becomes what it uses plus a little, until a random
    /// while later.
    pub fn fill_disk(&mut self, id: NodeId) {
        let fs = self.real[&id].fs.clone();
        let capacity = fs.used() + self.rng.below(FULL_SLACK + 1);
        fs.set_faults(Faults {
            capacity: Some(capacity),
            ..fs.faults()
        });
        self.disk_faults.serial += 1;
        let serial = self.disk_faults.serial;
        self.disk_faults.full = Some((id, serial));
        self.stats.disk.full_episodes += 1;
        let lasts = self.rng.range(FULL_FOR.0, FULL_FOR.1);
        self.schedule(lasts, Event::SpaceBack(id, serial));
    }

    /// Node `id`'s next fsync (`sync`) or next write fails with EIO.
    fn arm_eio(&mut self, id: NodeId, sync: bool) {
        let fs = &self.real[&id].fs;
        let f = fs.faults();
        fs.set_faults(Faults {
            failing_syncs: u32::from(sync),
            failing_writes: u32::from(!sync),
            ..f
        });
        self.disk_faults.armed.insert(id, sync);
    }

    /// Space is back on node `id`'s disk (if episode `serial` is still on): a held node
    /// notices at its next retry.
    pub(super) fn space_back(&mut self, id: NodeId, serial: u64) {
        if self.disk_faults.full != Some((id, serial)) {
            return;
        }
        self.disk_faults.full = None;
        if let Some(real) = self.real.get(&id) {
            let f = real.fs.faults();
            real.fs.set_faults(Faults {
                capacity: None,
                ..f
            });
        }
        self.store_caught_up(id);
    }

    /// Ends every disk fault: space back, armed faults disarmed (for the healed end of a run).
    pub fn end_disk_faults(&mut self) {
        if let Some((id, serial)) = self.disk_faults.full {
            self.space_back(id, serial);
        }
        for id in std::mem::take(&mut self.disk_faults.armed).into_keys() {
            if let Some(real) = self.real.get(&id) {
                real.fs.set_faults(Faults::default());
            }
        }
    }

    /// A node whose store a full disk left behind, once space is back: the peer's `Disk`
    /// writes it again a wall-clock second after the failure; the simulator's (opened with
    /// `Jobs::Manual`, so that a seed reruns the same) only when asked, which it is here. The
    /// next round trip's `apply` then writes it, with no restart.
    fn store_caught_up(&mut self, id: NodeId) {
        if self.is_held(id) || self.disk_faults.full.is_some_and(|(n, _)| n == id) {
            return;
        }
        let disk = self.real.get_mut(&id).and_then(|r| r.disk.as_mut());
        if let Some(disk) = disk.filter(|d| d.full().is_some()) {
            disk.retry_store_now();
            self.stats.disk.store_retries += 1;
            self.disk_faults.store_retrying.insert(id);
        }
    }

    /// Clears what node `id`'s process had: its faults (a restart opens a disk with space and
    /// nothing armed) and a wait for space.
    pub(super) fn disarm(&mut self, id: NodeId) {
        self.held.remove(&id);
        self.disk_faults.armed.remove(&id);
        self.disk_faults.store_retrying.remove(&id);
        if self.disk_faults.full.is_some_and(|(n, _)| n == id) {
            self.disk_faults.full = None;
        }
        if let Some(real) = self.real.get(&id) {
            real.fs.set_faults(Faults::default());
        }
    }

    /// The process exits on an injected I/O error: nothing more of it is sent; its disk is
    /// dropped (no power cut).
    pub(super) fn exit_on_error(&mut self, id: NodeId) {
        match self.disk_faults.armed.get(&id) {
            Some(true) => self.stats.disk.fsync_exits += 1,
            _ => self.stats.disk.write_exits += 1,
        }
        self.kill_disk(id, false);
        self.crash_process(id);
    }

    /// Node `id` waits for space (as `wait_for_space`): a leader asks its most up-to-date
    /// voter to take over, once per Ready; the same work is tried again in [`FULL_RETRY`].
    pub(super) fn hold(&mut self, id: NodeId, waiting: Waiting, mut handed_over: bool) {
        if !handed_over {
            handed_over = true;
            let msg = self
                .node(id)
                .and_then(|n| raft::peer::hand_over(&n.status()));
            if let Some(msg) = msg {
                self.stats.disk.hand_overs += 1;
                self.send(msg);
            }
        }
        self.disk_faults.serial += 1;
        let serial = self.disk_faults.serial;
        self.held.insert(
            id,
            Held {
                waiting,
                handed_over,
                serial,
            },
        );
        self.schedule(FULL_RETRY, Event::DiskRetry(id, serial));
    }

    /// A held node tries again (retry `serial`). Returns whether it went on (the Ready carried
    /// out, or the install through).
    pub(super) fn retry_held(&mut self, id: NodeId, serial: u64) -> bool {
        if self.held.get(&id).is_none_or(|h| h.serial != serial) {
            return false;
        }
        let held = self.held.remove(&id).unwrap();
        self.stats.disk.full_retries += 1;
        match held.waiting {
            Waiting::Persist(mut c) => {
                c.handed_over = held.handed_over;
                self.carry_out(id, *c, None)
            }
            Waiting::Install => match self.after_advance(id, AfterAdvance::default()) {
                AfterOutcome::Done => {
                    self.stats.disk.installs_after_space += 1;
                    true
                }
                AfterOutcome::Down => false,
                AfterOutcome::InstallWaits => {
                    self.hold(id, Waiting::Install, held.handed_over);
                    false
                }
            },
        }
    }

    /// After an event of a node not waiting for space: a store left behind whose space came
    /// back while the node waited is caught up now ([`Sim::space_back`] skips a waiting node).
    pub(super) fn went_on(&mut self, id: NodeId) {
        self.store_caught_up(id);
    }
}
