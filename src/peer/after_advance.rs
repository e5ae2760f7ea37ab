//! The snapshot round trip, carried out after the core's `advance`: applied records go to the
//! store, store reads and snapshot chunks are served, staged chunks become an install, and a
//! written snapshot lets the core and the WAL compact.

use super::node_loop::{AfterAdvance, Core, Durable, Outbox};
use crate::raft::{ClientReply, Entry, HardState};
use crate::storage::{Disk, Staged};
use std::time::Instant;

impl Durable for Disk {
    fn persist(&mut self, hard_state: Option<&HardState>, entries: &[Entry]) -> Result<(), String> {
        Ok(self.persist_wal(hard_state, entries)?)
    }

    fn full(&self) -> Option<String> {
        Disk::full(self).map(String::from)
    }

    fn persist_waits_for_space(&self) -> bool {
        Disk::wal_full(self)
    }

    fn install_pending(&self) -> bool {
        Disk::install_pending(self)
    }

    fn take_errors(&mut self) -> Vec<&'static str> {
        Disk::take_errors(self)
    }

    fn after_advance(
        &mut self,
        rd: AfterAdvance,
        core: &mut impl Core,
        out: &mut impl Outbox,
    ) -> Result<(), String> {
        let me = core.id();
        // Before anything else: the core's log still ends before that snapshot.
        if let Some((from, state, id)) = self.retry_install()? {
            core.install_snapshot(from, state, id);
        }
        self.apply(&rd.applied)?;
        for read in &rd.store_reads {
            let result = self.page(read);
            let reply = ClientReply {
                id: read.id,
                from: me,
                result,
            };
            out.send_reply(read.reply_to, reply);
        }
        for c in &rd.chunk_reads {
            if let Some(msg) = self.chunk(c, me) {
                out.send_peer(msg);
            }
        }
        for w in &rd.chunk_writes {
            // An earlier chunk of this batch may have installed this snapshot already.
            if w.snapshot.index <= core.applied_index() {
                continue;
            }
            match self.stage(w, core.hard_state())? {
                Staged::Partial { have } => {
                    core.snapshot_chunk_stored(w.from, w.snapshot.index, have)
                }
                Staged::Installed { state, id } => core.install_snapshot(w.from, state, id),
            }
        }
        if self.snapshot_due(core.applied_index()) {
            if let Some(state) = core.snapshot_state() {
                self.start_snapshot(&state)?;
            }
        }
        if let Some(id) = self.snapshot_written()? {
            let started = Instant::now();
            let base = core.snapshot_taken(id, self.snapshot_trailing());
            self.free_later(core.take_compacted())?;
            let compacted = started.elapsed();
            if let Some((base, _)) = base {
                self.compact_wal(&core.hard_state(), core.last(), base)?;
            }
            let took = started.elapsed();
            log::info!(
                "snapshot at {} (term {}): {} bytes of records; log from {}; node thread busy {} µs for it (start {} µs, log {} µs, WAL {} µs)",
                id.index,
                id.term,
                id.records_len,
                base.map_or(0, |(b, _)| b) + 1,
                (took + self.started_in).as_micros(),
                self.started_in.as_micros(),
                compacted.as_micros(),
                (took - compacted).as_micros()
            );
        }
        Ok(())
    }
}
