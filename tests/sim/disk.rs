//! The simulated shell's storage side: persisting a Ready, the store of applied records,
//! snapshots taken, sent in chunks, staged and installed, with crashes between the steps.

use super::*;

impl Sim {
    // ---- snapshots (the shell's side) ----------------------------------------------------------

    /// The rest of a Ready, once the core advanced: the applied records go to the store, reads
    /// below the core's memory are served from it, snapshot chunks are sent and received.
    /// Returns false if the node crashed meanwhile.
    pub(super) fn after_advance(
        &mut self,
        id: NodeId,
        applied: Vec<LogRecord>,
        store_reads: Vec<StoreRead>,
        chunk_reads: Vec<ChunkRead>,
        chunk_writes: Vec<ChunkWrite>,
    ) -> bool {
        let disk = self.disks.get_mut(&id).unwrap();
        for r in applied {
            let next = disk.store.len() as Index + 1;
            if r.index != next {
                let what = format!(
                    "node {id} applied {} while its store ends at {}",
                    r.index,
                    next - 1
                );
                self.fail(&what);
            }
            disk.store.push(r);
        }
        for r in store_reads {
            self.serve_store_read(id, r);
        }
        for c in chunk_reads {
            self.send_chunk(id, c);
        }
        for w in chunk_writes {
            if !self.stage_chunk(id, w) {
                return false;
            }
        }
        true
    }

    /// Answers one page of the store, as the core answers from its log: records `start..`
    /// up to `read_index`, as many as fit [`PAGE_BUDGET`] but at least one.
    pub(super) fn serve_store_read(&mut self, id: NodeId, r: StoreRead) {
        self.stats.store_reads += 1;
        let store = &self.disks[&id].store;
        if r.start == 0 || r.start > r.read_index || r.read_index > store.len() as Index {
            self.fail(&format!(
                "node {id} asked to read {}..={} from a store of {} records",
                r.start,
                r.read_index,
                store.len()
            ));
        }
        let mut entries = Vec::new();
        let mut used = 0;
        let mut next = None;
        for index in r.start..=r.read_index {
            let record = &store[index as usize - 1];
            used += ENTRY_OVERHEAD + record.data.as_deref().map_or(0, escaped_len);
            if used > PAGE_BUDGET && !entries.is_empty() {
                next = Some(index);
                break;
            }
            entries.push(record.clone());
        }
        let reply = ClientReply {
            id: r.id,
            from: id,
            result: ClientResult::Entries {
                entries,
                read_index: r.read_index,
                next,
            },
        };
        self.transmit(Event::Reply(r.reply_to, reply));
    }

    /// Reads a chunk of the node's current snapshot and sends it (its length rides in `data`).
    pub(super) fn send_chunk(&mut self, id: NodeId, c: ChunkRead) {
        let current = self.disks[&id].snapshot.as_ref().map(|(_, sid)| *sid);
        if current != Some(c.snapshot) || c.len == 0 || c.offset + c.len > c.snapshot.total_len() {
            self.fail(&format!(
                "node {id} asked to send bytes {}+{} of snapshot {:?}; its current one is \
                 {current:?}",
                c.offset, c.len, c.snapshot
            ));
        }
        self.stats.chunks_sent += 1;
        self.send(c.message(id, c.len.to_string(), 0));
    }

    /// The receiver's side of a chunk, as the real store stages it: in order only; another
    /// snapshot keeps the records held if they are a prefix of its records (committed records
    /// never change), else starts over; the whole stream held, the snapshot is installed.
    /// Returns false if the node crashed.
    pub(super) fn stage_chunk(&mut self, id: NodeId, w: ChunkWrite) -> bool {
        let node = self.nodes[&id].as_ref().unwrap();
        let applied = node.applied_index();
        // As the peer: an earlier chunk of this Ready may have installed it already.
        if w.snapshot.index <= applied {
            return true;
        }
        let Ok(len) = w.data.parse::<u64>() else {
            self.fail(&format!("node {id} got a chunk with data {:?}", w.data));
        };
        let sid = w.snapshot;
        let disk = self.disks.get_mut(&id).unwrap();
        let mut st = match disk.staged {
            Some(st) if st.id == sid => st,
            Some(st) if st.records <= sid.records_len => Staged {
                id: sid,
                records: st.records,
                meta: 0,
            },
            _ => Staged {
                id: sid,
                records: 0,
                meta: 0,
            },
        };
        if w.offset == st.records + st.meta && w.offset + len <= sid.total_len() {
            let r = len.min(sid.records_len - st.records);
            st.records += r;
            st.meta += len - r;
        }
        disk.staged = Some(st);
        let have = st.records + st.meta;
        if have < sid.total_len() {
            let node = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
            node.snapshot_chunk_stored(w.from, sid.index, have);
            return true;
        }
        let Some(snap) = self.snapshots.get(&sid).cloned() else {
            self.fail(&format!(
                "node {id} received snapshot {sid:?}, which nobody took"
            ));
        };
        let (state, records) = &*snap;
        // Durable: the store is the snapshot's records, the snapshot current.
        let disk = self.disks.get_mut(&id).unwrap();
        disk.store_truncate(0);
        disk.store.extend_from_slice(records);
        disk.snapshot = Some((state.clone(), sid));
        disk.staged = None;
        self.store_checked.insert(id, 0);
        if self.snapshot_crash(id, CrashPoint::InstallBeforeWalReset) {
            return false;
        }
        self.reset_wal(id, (sid.index, sid.term));
        let disk = self.disks.get_mut(&id).unwrap();
        disk.hard_state.commit = disk.hard_state.commit.max(sid.index);
        if self.snapshot_crash(id, CrashPoint::InstallBeforeAck) {
            return false;
        }
        self.stats.installs += 1;
        let node = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
        node.install_snapshot(w.from, state.clone(), sid);
        true
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

    /// Crashes node `id` at `point` with probability [`SimConfig::crash_in_snapshot`].
    pub(super) fn snapshot_crash(&mut self, id: NodeId, point: CrashPoint) -> bool {
        if !self.rng.chance(self.cfg.crash_in_snapshot) {
            return false;
        }
        *self.stats.crashes_in_ready.entry(point).or_default() += 1;
        self.crash(id);
        true
    }

    /// Takes a snapshot on node `id` if it applied [`SimConfig::snapshot_every`] entries past
    /// its latest: durable first, then the core is told and the WAL compacted to the base it
    /// returns. Returns whether one was taken.
    pub(super) fn maybe_snapshot(&mut self, id: NodeId) -> bool {
        let Some((every, trailing)) = self.cfg.snapshot_every else {
            return false;
        };
        let Some(node) = self.nodes[&id].as_ref() else {
            return false;
        };
        if node.applied_index() < self.disks[&id].snapshot_index() + every.max(1) {
            return false;
        }
        let state = node.snapshot_state();
        let pad = self.cfg.record_pad;
        let disk = self.disks.get_mut(&id).unwrap();
        if disk.store.len() as Index != state.index {
            let what = format!(
                "node {id} snapshots at {} with {} records in its store",
                state.index,
                disk.store.len()
            );
            self.fail(&what);
        }
        let sid = snapshot_id(&state, disk.store_sums(state.index as usize, pad));
        match self.snapshots.get(&sid) {
            Some(known) => {
                if known.0 != state || known.1[..] != disk.store[..] {
                    let what = format!("two different snapshots have ID {sid:?}");
                    self.fail(&what);
                }
            }
            None => {
                let records = disk.store.clone();
                self.snapshots
                    .insert(sid, Arc::new((state.clone(), records)));
            }
        }
        if self.trace {
            println!("t={} node {id} takes snapshot {sid:?}", self.now);
        }
        let disk = self.disks.get_mut(&id).unwrap();
        disk.snapshot = Some((state, sid));
        self.stats.snapshots += 1;
        if self.snapshot_crash(id, CrashPoint::SnapshotBeforeTaken) {
            return true;
        }
        let node = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
        if let Some(base) = node.snapshot_taken(sid, trailing) {
            self.stats.compactions += 1;
            let disk = self.disks.get_mut(&id).unwrap();
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
        true
    }

    /// Makes a Ready's writes durable, checking Leader Append-Only and Log Matching on them.
    pub(super) fn persist(&mut self, id: NodeId, role: Role, term: Term, rd: &Ready) {
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
        self.disks.get_mut(&id).unwrap().persist(rd);
        let Some(first) = rd.entries.first() else {
            return;
        };
        let prefix = self.prefix.get_mut(&id).unwrap();
        prefix.truncate(first.index as usize - 1);
        let mut h = prefix.last().copied().unwrap_or(0);
        let mut conflict = None;
        for e in &rd.entries {
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
}
