//! Simulated clients: appends and queries retried with the same (client, seq) until a definite
//! answer, and the check that what they were told is consistent with the committed log.

use super::*;

impl Sim {
    // ---- clients -------------------------------------------------------------------------------

    pub fn add_client(&mut self) -> usize {
        let c = self.clients.len();
        let id = self.rng.next_u64();
        let target = self.rng.pick(&self.ids.clone());
        self.clients.push(SimClient {
            id,
            seq: 0,
            target,
            pending: None,
            request_id: 0,
            done: Vec::new(),
            busy_appends: None,
            made: 0,
            retries: 0,
            shares_id: false,
        });
        c
    }

    /// Gives client `c` the ID of client `with`: their requests with the same sequence number
    /// collide.
    pub fn share_client_id(&mut self, c: usize, with: usize) {
        self.clients[c].id = self.clients[with].id;
        self.clients[c].shares_id = true;
        self.clients[with].shares_id = true;
    }

    /// Makes client `c` issue operations back to back, appends with probability
    /// `append_ratio` and otherwise linearizable queries of the log's tail, until
    /// [`Sim::stop_clients`].
    pub fn keep_busy(&mut self, c: usize, append_ratio: f64) {
        self.clients[c].busy_appends = Some(append_ratio);
        if !self.client_busy(c) {
            self.next_op(c);
        }
    }

    /// Busy clients finish the operation they have started and issue no more.
    pub fn stop_clients(&mut self) {
        for c in &mut self.clients {
            c.busy_appends = None;
        }
    }

    pub(super) fn next_op(&mut self, c: usize) {
        let Some(ratio) = self.clients[c].busy_appends else {
            return;
        };
        if self.rng.chance(ratio) {
            self.clients[c].made += 1;
            let data = format!("b{c}.{}", self.clients[c].made);
            self.client_append(c, &data);
        } else {
            let start = self
                .max_commit()
                .saturating_sub(self.rng.range(0, 8))
                .max(1);
            self.client_query_from(c, start);
        }
    }

    pub(super) fn client_addr(c: usize) -> ReplyTo {
        SocketAddr::from(([127, 0, 0, 1], 40000 + c as u16))
    }

    /// The lab's `Start()` without a client behind it: hands `data` to node `id` directly, once,
    /// and returns the index it would take if `id` is leader (its last index either way).
    pub fn propose_once(&mut self, id: NodeId, data: &str) -> Index {
        let client = self.rng.next_u64();
        // A paused node takes nothing; one waiting for space drops it.
        if self.paused.contains_key(&id) || self.is_held(id) {
            return 0;
        }
        let Some(node) = self.nodes.get_mut(&id).unwrap().as_mut() else {
            return 0;
        };
        let req = ClientRequest {
            id: 0,
            op: ClientOp::Append {
                client,
                seq: 1,
                data: data.to_string(),
            },
        };
        node.request(SocketAddr::from(([127, 0, 0, 1], 1)), req);
        let index = node.log().last_index();
        self.after_event(id);
        index
    }

    pub fn client_busy(&self, c: usize) -> bool {
        self.clients[c].pending.is_some()
    }

    /// Starts an append; the client retries it (same seq) until it is acknowledged.
    pub fn client_append(&mut self, c: usize, data: &str) {
        assert!(!self.client_busy(c), "one operation per client at a time");
        let client = &mut self.clients[c];
        client.seq += 1;
        client.pending = Some((
            Pending::Append {
                seq: client.seq,
                data: data.to_string(),
            },
            self.now,
        ));
        self.client_send(c);
    }

    /// Starts a linearizable query of the whole committed log.
    pub fn client_query(&mut self, c: usize) {
        self.client_query_from(c, 1);
    }

    /// Starts a linearizable query of the committed log from `start`.
    pub fn client_query_from(&mut self, c: usize, start: Index) {
        assert!(!self.client_busy(c), "one operation per client at a time");
        self.clients[c].pending = Some((
            Pending::Query {
                pages: Vec::new(),
                read_index: None,
                first: start,
                start,
            },
            self.now,
        ));
        self.client_send(c);
    }

    pub(super) fn client_send(&mut self, c: usize) {
        let client = &mut self.clients[c];
        let Some((pending, _)) = &client.pending else {
            return;
        };
        client.request_id += 1;
        let op = match pending {
            Pending::Append { seq, data } => ClientOp::Append {
                client: client.id,
                seq: *seq,
                data: data.clone(),
            },
            Pending::Query {
                read_index, start, ..
            } => ClientOp::Query {
                start: *start,
                read_index: *read_index,
            },
        };
        let req = ClientRequest {
            id: client.request_id,
            op,
        };
        let (target, request_id) = (client.target, client.request_id);
        self.transmit(Event::Request(target, Self::client_addr(c), req));
        let retry = self.cfg.client_retry;
        self.schedule(retry, Event::ClientTimer(c, request_id));
    }

    pub(super) fn client_timeout(&mut self, c: usize, request_id: u64) {
        if self.clients[c].request_id != request_id || self.clients[c].pending.is_none() {
            return;
        }
        let ids = self.ids.clone();
        self.clients[c].target = self.rng.pick(&ids);
        self.clients[c].retries += 1;
        self.client_send(c);
    }

    pub(super) fn client_reply(&mut self, c: usize, reply: ClientReply) {
        let now = self.now;
        let client = &mut self.clients[c];
        if reply.id != client.request_id || client.pending.is_none() {
            return; // stale or duplicated answer
        }
        let (pending, invoked) = client.pending.take().unwrap();
        match (pending, reply.result) {
            (Pending::Append { data, .. }, ClientResult::Appended { index, .. }) => {
                client.done.push(Op::Append {
                    data,
                    index,
                    invoked,
                    returned: now,
                });
                self.next_op(c);
            }
            (
                Pending::Query {
                    mut pages, first, ..
                },
                ClientResult::Entries {
                    entries,
                    read_index,
                    next,
                },
            ) => {
                pages.extend(entries);
                match next {
                    Some(start) => {
                        client.pending = Some((
                            Pending::Query {
                                pages,
                                read_index: Some(read_index),
                                first,
                                start,
                            },
                            invoked,
                        ));
                        client.target = reply.from;
                        self.client_send(c);
                    }
                    None => {
                        client.done.push(Op::Query {
                            log: pages,
                            start: first,
                            read_index,
                            invoked,
                            returned: now,
                            peer: reply.from,
                        });
                        self.next_op(c);
                    }
                }
            }
            (Pending::Append { data, .. }, ClientResult::Refused { reason })
                if client.shares_id =>
            {
                client.done.push(Op::Refused { data, reason });
                self.next_op(c);
            }
            // A store a full disk left behind refuses reads, as does one whose read failed
            // (an injected I/O error in flushing it; `Disk::page`): as a client that gets no
            // entries, try another node when the retry timer fires.
            (pending @ Pending::Query { .. }, ClientResult::Refused { reason })
                if reason.contains("lack of disk space")
                    || reason.contains("cannot read its store") =>
            {
                client.pending = Some((pending, invoked));
                self.stats.disk.reads_refused += 1;
            }
            (pending, ClientResult::NotLeader { leader }) => {
                client.pending = Some((pending, invoked));
                match leader {
                    Some(l) if l != reply.from => {
                        client.target = l;
                        self.client_send(c);
                    }
                    // No leader known: the retry timer tries another node.
                    _ => {}
                }
            }
            (pending, result) => {
                self.fail(&format!(
                    "client {c}: unexpected answer {result:?} to {pending:?}"
                ));
            }
        }
    }

    /// Checks what clients saw against the final committed log: every acknowledged append is
    /// in it exactly once at its acknowledged index; every query's entries are the committed
    /// ones, contiguous up to its read index, and that read index covers every append
    /// acknowledged before the query began (no stale reads).
    pub fn check_client_history(&self) {
        let log = self.committed_log();
        let mut seen_data: BTreeMap<&str, Index> = BTreeMap::new();
        for e in &log {
            if let Payload::Data { data, client, seq } = &e.payload {
                if !self.node_view_is_duplicate(e.index) {
                    if let Some(prev) = seen_data.insert(data, e.index) {
                        self.fail(&format!(
                            "{data:?} applied twice, at {prev} and {} (client {client:x} seq {seq})",
                            e.index
                        ));
                    }
                }
            }
        }
        let mut acks: Vec<(Time, Index)> = Vec::new();
        for client in &self.clients {
            for op in &client.done {
                if let Op::Append {
                    data,
                    index,
                    returned,
                    ..
                } = op
                {
                    if seen_data.get(data.as_str()) != Some(index) {
                        self.fail(&format!(
                            "acknowledged append {data:?} at {index} is not in the final log there"
                        ));
                    }
                    acks.push((*returned, *index));
                }
            }
        }
        // The highest index acknowledged at or before each time, for the stale-read check.
        acks.sort_unstable();
        let mut highest = 0;
        let acked_by: Vec<(Time, Index)> = acks
            .iter()
            .map(|&(t, i)| {
                highest = highest.max(i);
                (t, highest)
            })
            .collect();
        for client in &self.clients {
            for op in &client.done {
                let Op::Query {
                    log: got,
                    start,
                    read_index,
                    invoked,
                    ..
                } = op
                else {
                    continue;
                };
                if *read_index > log.len() as Index {
                    self.fail(&format!(
                        "query read index {read_index} beyond the committed log ({})",
                        log.len()
                    ));
                }
                let want = (*start).max(1)..=*read_index;
                if got.len() != want.clone().count() {
                    self.fail(&format!("query of {want:?} returned {} entries", got.len()));
                }
                for (r, index) in got.iter().zip(want) {
                    let e = &log[index as usize - 1];
                    let data = match &e.payload {
                        Payload::Data { data, .. } if !self.node_view_is_duplicate(index) => {
                            Some(data.clone())
                        }
                        _ => None,
                    };
                    if r.index != index || r.term != e.term || r.data != data {
                        self.fail(&format!("query returned {r:?}, committed was {e:?}"));
                    }
                }
                let before = acked_by.partition_point(|&(t, _)| t < *invoked);
                if let Some(&(t, i)) = before.checked_sub(1).map(|k| &acked_by[k]) {
                    if i > *read_index {
                        self.fail(&format!(
                            "stale read: query at {invoked} read up to {read_index}, but index \
                             {i} was acknowledged by {t}"
                        ));
                    }
                }
            }
        }
    }

    pub(super) fn node_view_is_duplicate(&self, index: Index) -> bool {
        // The applied history (as the first store held it; all agree) knows, also below the
        // snapshots that cores were restored from.
        if let Some(r) = self.applied_records.get(index as usize - 1) {
            return r.kind.as_deref() == Some("duplicate");
        }
        self.nodes
            .values()
            .flatten()
            .find(|n| n.applied_index() >= index)
            .is_some_and(|n| n.state_machine().is_duplicate(index))
    }
}
