//! Transcript tests of the Raft core (in the manner of etcd's interaction tests and toydb's
//! goldenscripts): each `tests/transcripts/*.txt` is a script of commands driving cores wired
//! together by a tiny in-memory shell, with the output each command is expected to print. The
//! runner replays the commands and compares what they print with what the file says; with
//! `UPDATE_TRANSCRIPTS=1` it rewrites the files with what they print instead.
//!
//! ```text
//! cargo test --test transcripts                          # check every transcript
//! cargo test --test transcripts read_index               # one of them
//! UPDATE_TRANSCRIPTS=1 cargo test --test transcripts     # accept the actual output
//! ```
//!
//! # Format
//!
//! A line starting with `#` is a comment, a blank line separates; both are kept as they are.
//! Any other line is a command; the lines after it starting with `> ` are what it prints
//! (rewritten on update). Commands and options are whitespace-separated words.
//!
//! # Commands
//!
//! - `cluster N [election=MIN..MAX] [heartbeat=H] [inflight=K] [seed=S] [record_bytes=B]`:
//!   voters 1..=N, all followers in term 0 (defaults: 10..20, 2, 4, 1, 10000). Must come first.
//! - `tick COUNT [NODE...]`: ticks the nodes (default: every running one), COUNT rounds.
//! - `campaign N`: ticks node N alone until its election timer fires (it asks for votes).
//! - `elect N`: `campaign N` then `stabilize`, printing what the nodes do but no messages; an
//!   error unless N then leads.
//! - `deliver [SEL]`: delivers the messages in flight (those matching `SEL`: `A->B`, `A->` from
//!   A, `->B` to B), in the order they were sent; what they cause is printed beneath each, and
//!   messages sent meanwhile wait for the next `deliver`. A message on a cut link, or to a node
//!   that is down, is printed as dropped.
//! - `drop [SEL]`: drops the messages in flight (matching `SEL`).
//! - `pending`: lists the messages in flight.
//! - `stabilize`: delivers until no message is in flight (no ticks: timers stand still).
//! - `partition 1 2 | 3`: cuts every link between the groups (nodes not named form a group of
//!   their own); replaces any earlier partition. `heal`: restores every link.
//! - `append N TEXT [size=BYTES] [seq=S]`: a client appends TEXT (padded with dots to BYTES)
//!   at node N. Requests are numbered #1, #2, ... in the order given; S defaults to that number.
//! - `read N [start=I]`: a linearizable read (ReadIndex) of the log from I at node N.
//! - `transfer N [to M]`: asks node N to hand leadership to M (or to whom it picks).
//! - `add-learner N ID`, `promote N ID`, `remove N ID`: a membership change asked of node N; a
//!   new ID gets a node at once (an empty disk, no configuration: it joins).
//! - `snapshot N [keep=K]`: node N's shell takes a snapshot at the applied index, as the real
//!   one does, and the core compacts its log, keeping K entries before it. A snapshot streams
//!   as `record_bytes` per record plus 1000 bytes of meta.
//! - `crash N`: node N loses everything not on its disk (the store keeps what its latest snapshot
//!   covers). `restart N`: starts it again from its disk.
//! - `status [N...]`, `log N` (the core's log with payloads), `store N` (the applied log).
//!
//! # Output
//!
//! What nodes do in response to a command is printed as it happens, one line each; under
//! `deliver` and `stabilize`, each delivered message is printed first and what it causes is
//! indented beneath it. A node's lines:
//!
//! - `2: follower term=1 vote=1 leader=1`: its role, term, vote or leader changed;
//! - `2: commit=3 applied=3`: its commit or applied index changed;
//! - `2: truncate 2..3@1`, `2: append 2..3@2`: its shell wrote entries to its log, replacing
//!   some (state lines come right after the step that changed the state, before the writes);
//! - `1->2 AppendEntries term=1 prev=1@1 entries=2..3@1 commit=1 seq=0`: it sent a message;
//! - `1: reply #4 Appended 3@1`: it answered client request #4;
//! - `1: snapshot 5@1 of 101000 bytes`, `3: installed snapshot 5@1`,
//!   `3: removed from the configuration; stopped`.
//!
//! `I@T` is index I of term T, `2..5@1,6@3` entries 2 to 5 of term 1 and 6 of term 3. Messages
//! print the fields that matter: `last` (the candidate's last entry), `prev` (the entry before
//! the entries), `commit` (the leader's), `seq` (the read round, echoed back: thesis §6.4),
//! `accept=I` (the match index), `reject=I hint=I@T` (the fast backtracking hint), `stale` (the
//! request's term was old), `snap=I@T bytes=A..B/TOTAL`, `have=B` (bytes staged), `done`.
//!
//! `status` prints one line per node: `1: leader term=1 vote=1 commit=3 applied=3
//! [snapshot=I@T] [base=I@T] log=1..3@1 voters=1,2,3 [learners=4] [match=2:3,3:3]` (`base`: the
//! log is compacted through there; `match`: the leader's match index for each follower), or
//! `3: down` / `3: stopped`.
//!
//! Everything is deterministic: the cores' random election timeouts come from the seed, and
//! nodes, messages and maps are visited in a fixed order. Add a new file's name to the
//! `transcripts!` list below (a test fails for a file that is not listed).

use raft::raft::{
    AppendResult, Body, ClientOp, ClientRequest, ClientResult, ConfChange, Config, Entry,
    HardState, Index, LogRecord, MemberRole, Membership, Message, Node, NodeId, Payload, Role,
    SnapshotId, SnapshotState, Term,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

// ---- the tests ----------------------------------------------------------------------------

/// One test per transcript file, so that `cargo test` names the scenario that broke.
macro_rules! transcripts {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
        const LISTED: &[&str] = &[$(stringify!($name)),*];
    };
}

transcripts!(
    conflict_truncation,
    crash_restart,
    election_prevote,
    figure8_commit,
    figure8_overwrite,
    leadership_transfer,
    membership_change,
    read_index,
    snapshot_install,
);

#[test]
fn every_transcript_file_is_listed() {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(dir()).expect("tests/transcripts exists") {
        let path = entry.expect("readable directory").path();
        if path.extension().is_some_and(|e| e == "txt") {
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            if !LISTED.contains(&stem.as_str()) {
                missing.push(stem);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "transcripts not listed in tests/transcripts.rs (add them to `transcripts!`): {missing:?}"
    );
}

/// The runner itself: a wrong expectation fails, with a diff that shows it.
#[test]
fn a_wrong_expectation_shows_as_a_diff() {
    let script = "cluster 3\ncampaign 1\n> 1: precandidate term=7\n";
    let actual = run_transcript("inline", script);
    assert_ne!(actual, script);
    let d = diff(script, &actual);
    assert!(d.contains("-> 1: precandidate term=7"), "{d}");
    assert!(d.contains("+> 1: precandidate term=0"), "{d}");
    // Comments and blank lines are kept; stale expectations are replaced.
    let again = run_transcript("inline", &actual);
    assert_eq!(again, actual, "a rewritten transcript is stable");
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts")
}

/// Runs one transcript; fails with a diff, or rewrites the file under `UPDATE_TRANSCRIPTS`.
fn check(name: &str) {
    let path = dir().join(format!("{name}.txt"));
    let shown = format!("tests/transcripts/{name}.txt");
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{shown}: {e}"));
    let actual = run_transcript(&shown, &expected);
    if actual == expected {
        return;
    }
    if std::env::var("UPDATE_TRANSCRIPTS").is_ok_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, &actual).unwrap_or_else(|e| panic!("{shown}: {e}"));
        eprintln!("updated {shown}");
        return;
    }
    panic!(
        "{shown}: the core's behaviour differs from the transcript (- expected, + actual); \
         if the change is intended, rerun with UPDATE_TRANSCRIPTS=1 and review the files' diff\n\n{}",
        diff(&expected, &actual)
    );
}

/// Replays `text`, returning it with every command's output replaced by what it printed.
fn run_transcript(name: &str, text: &str) -> String {
    let mut h = Harness::default();
    let mut out = String::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        if line.starts_with('>') {
            // An expectation without a command before it: dropped on rewrite.
            continue;
        }
        out.push_str(line);
        out.push('\n');
        let command = line.trim();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        while lines.peek().is_some_and(|(_, l)| l.starts_with('>')) {
            lines.next();
        }
        let printed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run(command)));
        let printed = printed.unwrap_or_else(|panic| {
            eprintln!("{name}:{}: panicked running `{command}`", n + 1);
            std::panic::resume_unwind(panic)
        });
        for p in printed {
            out.push('>');
            if !p.is_empty() {
                out.push(' ');
                out.push_str(&p);
            }
            out.push('\n');
        }
    }
    out
}

/// A unified diff of two texts, by lines, with three lines of context.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // Longest common subsequence, from the ends.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // (kind, line in a, line in b): ' ' both, '-' only a, '+' only b.
    let mut ops: Vec<(char, usize, usize)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', i, j));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', i, j));
            i += 1;
        } else {
            ops.push(('+', i, j));
            j += 1;
        }
    }
    const CONTEXT: usize = 3;
    let mut out = String::new();
    let mut k = 0;
    while k < ops.len() {
        if ops[k].0 == ' ' {
            k += 1;
            continue;
        }
        // A hunk: from CONTEXT lines before this change to CONTEXT lines after the last change
        // that is at most 2 * CONTEXT lines from the next one.
        let start = k.saturating_sub(CONTEXT);
        let mut end = k;
        let mut last_change = k;
        while end < ops.len() {
            if ops[end].0 != ' ' {
                last_change = end;
            } else if end - last_change > 2 * CONTEXT {
                break;
            }
            end += 1;
        }
        let end = (last_change + CONTEXT + 1).min(ops.len());
        let (a_from, b_from) = (ops[start].1, ops[start].2);
        let a_len = ops[start..end].iter().filter(|o| o.0 != '+').count();
        let b_len = ops[start..end].iter().filter(|o| o.0 != '-').count();
        out += &format!("@@ -{},{a_len} +{},{b_len} @@\n", a_from + 1, b_from + 1);
        for &(kind, i, j) in &ops[start..end] {
            let line = if kind == '+' { b[j] } else { a[i] };
            out += &format!("{kind}{line}\n");
        }
        k = end;
    }
    out
}

// ---- the shell ----------------------------------------------------------------------------

/// What a node keeps on disk, as the real shell does: the hard state and WAL (entries after a
/// base), the applied log (its store), its latest snapshot, and a snapshot being received.
#[derive(Default)]
struct Disk {
    hard_state: HardState,
    base: (Index, Term),
    entries: Vec<Entry>,
    store: Vec<LogRecord>,
    snapshot: Option<(SnapshotState, SnapshotId)>,
    /// Bytes held, from 0, of a snapshot being received.
    staged: Option<(SnapshotId, u64)>,
}

struct Peer {
    cfg: Config,
    /// None while crashed or once stopped.
    node: Option<Node>,
    disk: Disk,
    /// Removed from the configuration: its process stopped for good.
    stopped: bool,
}

/// What a state line reports.
#[derive(Clone, PartialEq)]
struct Summary {
    role: Role,
    term: Term,
    vote: Option<NodeId>,
    leader: Option<NodeId>,
    commit: Index,
    applied: Index,
}

fn summary(n: &Node) -> Summary {
    Summary {
        role: n.role(),
        term: n.term(),
        vote: n.vote(),
        leader: n.leader(),
        commit: n.commit_index(),
        applied: n.applied_index(),
    }
}

/// Bytes of meta in every snapshot's stream (the real one is JSON; its length does not matter).
const META_BYTES: u64 = 1000;

/// Cores exchanging messages through a queue the script delivers from.
struct Harness {
    peers: BTreeMap<NodeId, Peer>,
    /// Messages in flight, in the order they were sent.
    queue: VecDeque<Message>,
    /// Cut links, both directions listed.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Every snapshot taken: what a receiver installs once it holds all of its bytes.
    snapshots: HashMap<SnapshotId, (SnapshotState, Vec<LogRecord>)>,
    requests: u64,
    election: (u64, u64),
    heartbeat: u64,
    inflight: usize,
    seed: u64,
    record_bytes: u64,
    /// Output of the command being run, and the indentation of what nodes do.
    out: Vec<String>,
    indent: &'static str,
    /// `elect`: messages are not printed, only what the nodes do.
    terse: bool,
}

impl Default for Harness {
    fn default() -> Harness {
        Harness {
            peers: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            snapshots: HashMap::new(),
            requests: 0,
            election: (10, 20),
            heartbeat: 2,
            inflight: 4,
            seed: 1,
            record_bytes: 10_000,
            out: Vec::new(),
            indent: "",
            terse: false,
        }
    }
}

/// A command's words: positional arguments and `key=value` options.
struct Args {
    pos: Vec<String>,
    opts: BTreeMap<String, String>,
}

impl Args {
    fn parse(words: &[&str]) -> Args {
        let mut pos = Vec::new();
        let mut opts = BTreeMap::new();
        for w in words {
            match w.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    opts.insert(k.to_string(), v.to_string());
                }
                _ => pos.push(w.to_string()),
            }
        }
        Args { pos, opts }
    }

    fn opt<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, String> {
        match self.opts.remove(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("bad value {v:?} for {key}")),
        }
    }

    fn done(&self) -> Result<(), String> {
        match self.opts.keys().next() {
            Some(k) => Err(format!("unknown option {k}")),
            None => Ok(()),
        }
    }
}

fn number(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("expected a number, got {s:?}"))
}

/// Which messages in flight a `deliver` or `drop` means.
struct Selector {
    from: Option<NodeId>,
    to: Option<NodeId>,
}

impl Selector {
    fn parse(pos: &[String]) -> Result<Selector, String> {
        match pos {
            [] => Ok(Selector {
                from: None,
                to: None,
            }),
            [s] => {
                let (from, to) = s
                    .split_once("->")
                    .ok_or_else(|| format!("expected FROM->TO, FROM-> or ->TO, got {s:?}"))?;
                let side = |x: &str| (!x.is_empty()).then(|| number(x)).transpose();
                Ok(Selector {
                    from: side(from)?,
                    to: side(to)?,
                })
            }
            _ => Err("expected at most one selector".into()),
        }
    }

    fn matches(&self, m: &Message) -> bool {
        self.from.is_none_or(|f| f == m.from) && self.to.is_none_or(|t| t == m.to)
    }
}

impl Harness {
    /// Runs one command; returns what it printed.
    fn run(&mut self, line: &str) -> Vec<String> {
        self.out.clear();
        self.indent = "";
        self.terse = false;
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Err(e) = self.command(words[0], Args::parse(&words[1..])) {
            self.out.push(format!("error: {e}"));
        }
        std::mem::take(&mut self.out)
    }

    fn command(&mut self, cmd: &str, mut args: Args) -> Result<(), String> {
        if cmd != "cluster" && self.peers.is_empty() {
            return Err("no cluster: start with `cluster N`".into());
        }
        match cmd {
            "cluster" => self.cluster(args),
            "tick" => {
                let (count, nodes) = match args.pos.split_first() {
                    Some((c, nodes)) => (number(c)?, self.ids(nodes)?),
                    None => return Err("usage: tick COUNT [NODE...]".into()),
                };
                args.done()?;
                let nodes = if nodes.is_empty() {
                    self.peers.keys().copied().collect()
                } else {
                    nodes
                };
                for _ in 0..count {
                    for &id in &nodes {
                        if self.peers[&id].node.is_some() {
                            self.input(id, |n| n.tick());
                        }
                    }
                }
                Ok(())
            }
            "campaign" => {
                let id = self.one_id(&args.pos)?;
                args.done()?;
                self.up(id)?;
                for _ in 0..1000 {
                    let sent = self.queue.len();
                    self.input(id, |n| n.tick());
                    let asked = self.queue.iter().skip(sent).any(|m| {
                        m.from == id
                            && matches!(m.body, Body::PreVote { .. } | Body::RequestVote { .. })
                    });
                    let node = self.peers[&id].node.as_ref();
                    if asked || node.is_none_or(|n| n.role() == Role::Leader) {
                        return Ok(());
                    }
                }
                Err(format!("node {id} did not campaign within 1000 ticks"))
            }
            "elect" => {
                args.done()?;
                let id = self.one_id(&args.pos)?;
                self.terse = true;
                self.command("campaign", Args::parse(&[&id.to_string()]))?;
                self.command("stabilize", Args::parse(&[]))?;
                let node = self.up(id)?;
                if node.role() != Role::Leader {
                    return Err(format!("node {id} did not win the election"));
                }
                Ok(())
            }
            "deliver" => {
                let sel = Selector::parse(&args.pos)?;
                args.done()?;
                self.deliver(&sel);
                Ok(())
            }
            "drop" => {
                let sel = Selector::parse(&args.pos)?;
                args.done()?;
                let (dropped, kept): (VecDeque<Message>, VecDeque<Message>) =
                    std::mem::take(&mut self.queue)
                        .into_iter()
                        .partition(|m| sel.matches(m));
                self.queue = kept;
                for m in dropped {
                    self.out.push(format!("{} [dropped]", msg(&m)));
                }
                Ok(())
            }
            "pending" => {
                args.done()?;
                for m in &self.queue {
                    self.out.push(msg(m));
                }
                Ok(())
            }
            "stabilize" => {
                args.done()?;
                let all = Selector {
                    from: None,
                    to: None,
                };
                for _ in 0..1000 {
                    if self.queue.is_empty() {
                        return Ok(());
                    }
                    self.deliver(&all);
                }
                Err("messages still in flight after 1000 rounds".into())
            }
            "partition" => {
                args.done()?;
                self.partition(&args.pos)
            }
            "heal" => {
                args.done()?;
                self.cut.clear();
                Ok(())
            }
            "append" => {
                let size: Option<usize> = args.opt("size")?;
                let seq: Option<u64> = args.opt("seq")?;
                args.done()?;
                let [id, text] = &args.pos[..] else {
                    return Err("usage: append N TEXT [size=BYTES] [seq=S]".into());
                };
                let id = self.id(id)?;
                let mut data = text.clone();
                while data.len() < size.unwrap_or(0) {
                    data.push('.');
                }
                let request = self.requests + 1;
                let op = ClientOp::Append {
                    client: 1,
                    seq: seq.unwrap_or(request),
                    data,
                };
                self.request(id, op)
            }
            "read" => {
                let start = args.opt("start")?.unwrap_or(1);
                args.done()?;
                let id = self.one_id(&args.pos)?;
                let op = ClientOp::Query {
                    start,
                    read_index: None,
                };
                self.request(id, op)
            }
            "transfer" => {
                args.done()?;
                let (id, target) = match &args.pos[..] {
                    [id] => (self.id(id)?, None),
                    [id, to, target] if to == "to" => (self.id(id)?, Some(number(target)?)),
                    _ => return Err("usage: transfer N [to M]".into()),
                };
                let op = ClientOp::TransferLeader {
                    target,
                    away_from: None,
                };
                self.request(id, op)
            }
            "add-learner" | "promote" | "remove" => {
                args.done()?;
                let [id, member] = &args.pos[..] else {
                    return Err(format!("usage: {cmd} N ID"));
                };
                let (id, member) = (self.id(id)?, number(member)?);
                let change = match cmd {
                    "add-learner" => ConfChange::AddLearner {
                        id: member,
                        address: format!("node{member}:{}", 7000 + member),
                    },
                    "promote" => ConfChange::Promote { id: member },
                    _ => ConfChange::Remove { id: member },
                };
                if cmd == "add-learner" && !self.peers.contains_key(&member) {
                    // A server that joins: an empty disk and no configuration (thesis §4.1).
                    self.start_peer(member, Membership::default());
                }
                self.request(
                    id,
                    ClientOp::ChangeMembers {
                        change,
                        force: false,
                    },
                )
            }
            "snapshot" => {
                let keep = args.opt("keep")?.unwrap_or(0);
                args.done()?;
                let id = self.one_id(&args.pos)?;
                self.snapshot(id, keep)
            }
            "crash" => {
                args.done()?;
                let id = self.one_id(&args.pos)?;
                self.up(id)?;
                let peer = self.peers.get_mut(&id).unwrap();
                peer.node = None;
                // The store is durable up to the latest snapshot; staged bytes are lost.
                let keep = peer.disk.snapshot.as_ref().map_or(0, |(s, _)| s.index);
                peer.disk.store.truncate(keep as usize);
                peer.disk.staged = None;
                Ok(())
            }
            "restart" => {
                args.done()?;
                let id = self.one_id(&args.pos)?;
                self.restart(id)
            }
            "status" => {
                args.done()?;
                let ids = match self.ids(&args.pos)? {
                    ids if ids.is_empty() => self.peers.keys().copied().collect(),
                    ids => ids,
                };
                for id in ids {
                    let line = self.status(id);
                    self.out.push(line);
                }
                Ok(())
            }
            "log" => {
                args.done()?;
                let id = self.one_id(&args.pos)?;
                let node = self.up(id)?;
                let (base, entries) = (node.log().base(), node.log().entries().to_vec());
                if base.0 > 0 {
                    self.out.push(format!("base={}", at(base.0, base.1)));
                }
                for e in entries {
                    self.out
                        .push(format!("{} {}", at(e.index, e.term), payload(&e.payload)));
                }
                Ok(())
            }
            "store" => {
                args.done()?;
                let id = self.one_id(&args.pos)?;
                for r in &self.peers[&id].disk.store {
                    self.out.push(record(r));
                }
                Ok(())
            }
            _ => Err(format!("unknown command {cmd:?}")),
        }
    }

    fn cluster(&mut self, mut args: Args) -> Result<(), String> {
        if !self.peers.is_empty() {
            return Err("a cluster exists already".into());
        }
        if let Some(e) = args.opt::<String>("election")? {
            let (lo, hi) = e.split_once("..").ok_or("election=MIN..MAX")?;
            self.election = (number(lo)?, number(hi)?);
        }
        self.heartbeat = args.opt("heartbeat")?.unwrap_or(self.heartbeat);
        self.inflight = args.opt("inflight")?.unwrap_or(self.inflight);
        self.seed = args.opt("seed")?.unwrap_or(self.seed);
        self.record_bytes = args.opt("record_bytes")?.unwrap_or(self.record_bytes);
        args.done()?;
        let n = number(self.one(&args.pos)?)?;
        let ids: Vec<NodeId> = (1..=n).collect();
        for &id in &ids {
            self.start_peer(id, Membership::voters(&ids));
        }
        Ok(())
    }

    fn start_peer(&mut self, id: NodeId, membership: Membership) {
        let cfg = Config {
            id,
            membership,
            election_ticks: self.election,
            heartbeat_ticks: self.heartbeat,
            max_inflight: self.inflight,
            vote_floor: 0,
            vote_floor_term: 0,
            started_over: (0, 0),
            seed: self.seed,
        };
        let node = Node::new(cfg.clone(), HardState::default(), Vec::new());
        let peer = Peer {
            cfg,
            node: Some(node),
            disk: Disk::default(),
            stopped: false,
        };
        self.peers.insert(id, peer);
    }

    fn one<'a>(&self, pos: &'a [String]) -> Result<&'a str, String> {
        match pos {
            [one] => Ok(one),
            _ => Err(format!("expected one argument, got {}", pos.len())),
        }
    }

    fn id(&self, s: &str) -> Result<NodeId, String> {
        let id = number(s)?;
        if !self.peers.contains_key(&id) {
            return Err(format!("no node {id}"));
        }
        Ok(id)
    }

    fn one_id(&self, pos: &[String]) -> Result<NodeId, String> {
        self.id(self.one(pos)?)
    }

    fn ids(&self, pos: &[String]) -> Result<Vec<NodeId>, String> {
        pos.iter().map(|s| self.id(s)).collect()
    }

    fn up(&self, id: NodeId) -> Result<&Node, String> {
        let peer = &self.peers[&id];
        match &peer.node {
            Some(n) => Ok(n),
            None if peer.stopped => Err(format!("node {id} is stopped")),
            None => Err(format!("node {id} is down")),
        }
    }

    fn partition(&mut self, pos: &[String]) -> Result<(), String> {
        let mut groups: Vec<Vec<NodeId>> = vec![Vec::new()];
        for w in pos {
            if w == "|" {
                groups.push(Vec::new());
            } else {
                groups.last_mut().unwrap().push(self.id(w)?);
            }
        }
        let named: BTreeSet<NodeId> = groups.iter().flatten().copied().collect();
        groups.push(
            self.peers
                .keys()
                .copied()
                .filter(|id| !named.contains(id))
                .collect(),
        );
        self.cut.clear();
        for (g, group) in groups.iter().enumerate() {
            for other in &groups[g + 1..] {
                for &a in group {
                    for &b in other {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
        }
        Ok(())
    }

    /// One round: delivers the matching messages now in flight.
    fn deliver(&mut self, sel: &Selector) {
        let (now, kept): (VecDeque<Message>, VecDeque<Message>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|m| sel.matches(m));
        self.queue = kept;
        for m in now {
            let to = m.to;
            let why = if self.cut.contains(&(m.from, to)) {
                Some("partitioned".to_string())
            } else {
                match self.peers.get(&to) {
                    None => Some(format!("no node {to}")),
                    Some(p) if p.stopped => Some(format!("{to} is stopped")),
                    Some(p) if p.node.is_none() => Some(format!("{to} is down")),
                    Some(_) => None,
                }
            };
            if let Some(why) = why {
                self.say_msg(format!("{} [dropped: {why}]", msg(&m)));
                continue;
            }
            self.say_msg(msg(&m));
            self.indent = if self.terse { "" } else { "  " };
            self.input(to, |n| n.step(m));
            self.indent = "";
        }
    }

    fn request(&mut self, id: NodeId, op: ClientOp) -> Result<(), String> {
        self.up(id)?;
        self.requests += 1;
        let req = ClientRequest {
            id: self.requests,
            op,
        };
        self.input(id, |n| n.request(client_address(), req));
        Ok(())
    }

    fn say(&mut self, line: String) {
        self.out.push(format!("{}{line}", self.indent));
    }

    /// A message sent, delivered or dropped: not printed by `elect`.
    fn say_msg(&mut self, line: String) {
        if !self.terse {
            self.say(line);
        }
    }

    /// Feeds node `id` one input, then carries out what it asks of its shell.
    fn input(&mut self, id: NodeId, f: impl FnOnce(&mut Node)) {
        let node = self.peers.get_mut(&id).unwrap().node.as_mut().unwrap();
        let before = summary(node);
        f(node);
        self.process(id, Some(before));
    }

    /// Prints how node `id` changed since `before` (None: it just started).
    fn report(&mut self, id: NodeId, before: Option<&Summary>) -> Summary {
        let now = summary(self.peers[&id].node.as_ref().unwrap());
        let who = |s: &Summary| (s.role, s.term, s.vote, s.leader);
        if before.is_none_or(|b| who(b) != who(&now)) {
            let line = format!("{id}: {}", role_line(&now));
            self.say(line);
        }
        if before.is_none_or(|b| (b.commit, b.applied) != (now.commit, now.applied)) {
            self.say(format!(
                "{id}: commit={} applied={}",
                now.commit, now.applied
            ));
        }
        now
    }

    /// Carries out node `id`'s Readies as the shell does: persist, send, advance, then the
    /// applied records, store reads and snapshot chunks; prints each effect.
    fn process(&mut self, id: NodeId, before: Option<Summary>) {
        let mut last = self.report(id, before.as_ref());
        loop {
            let Some(node) = self.peers.get_mut(&id).unwrap().node.as_mut() else {
                return;
            };
            let rd = node.ready();
            if rd.is_empty() {
                break;
            }
            let disk = &mut self.peers.get_mut(&id).unwrap().disk;
            if let Some(first) = rd.entries.first() {
                let replaced: Vec<(Index, Term)> = disk
                    .entries
                    .iter()
                    .filter(|e| e.index >= first.index)
                    .map(|e| (e.index, e.term))
                    .collect();
                let keep = (first.index - disk.base.0 - 1) as usize;
                disk.entries.truncate(keep);
                disk.entries.extend_from_slice(&rd.entries);
                if !replaced.is_empty() {
                    self.say(format!("{id}: truncate {}", runs(replaced)));
                }
                let written = rd.entries.iter().map(|e| (e.index, e.term));
                self.say(format!("{id}: append {}", runs(written)));
            }
            if let Some(hs) = rd.hard_state {
                self.peers.get_mut(&id).unwrap().disk.hard_state = hs;
            }
            for m in rd.messages {
                self.say_msg(msg(&m));
                self.queue.push_back(m);
            }
            for (_, reply) in &rd.replies {
                self.say(format!(
                    "{id}: reply #{} {}",
                    reply.id,
                    client_result(&reply.result)
                ));
            }
            let peer = self.peers.get_mut(&id).unwrap();
            peer.node.as_mut().unwrap().advance();
            last = self.report(id, Some(&last));
            let store = &mut self.peers.get_mut(&id).unwrap().disk.store;
            for r in rd.applied {
                let next = store.len() as Index + 1;
                assert_eq!(r.index, next, "node {id} applied {} out of order", r.index);
                store.push(r);
            }
            for r in rd.store_reads {
                let store = &self.peers[&id].disk.store;
                let entries = store[(r.start - 1) as usize..r.read_index as usize].to_vec();
                let result = ClientResult::Entries {
                    entries,
                    read_index: r.read_index,
                    next: None,
                };
                self.say(format!(
                    "{id}: reply #{} {} (from the store)",
                    r.id,
                    client_result(&result)
                ));
            }
            for c in rd.chunk_reads {
                // The chunk's bytes are pretend: its length stands in for them.
                let m = c.message(id, c.len.to_string(), 0);
                self.say_msg(msg(&m));
                self.queue.push_back(m);
            }
            for w in rd.chunk_writes {
                self.stage(id, w.from, w.snapshot, w.offset, &w.data);
            }
            last = self.report(id, Some(&last));
            let peer = self.peers.get_mut(&id).unwrap();
            if peer.node.as_ref().unwrap().removed() {
                // The shell stops a removed node (thesis §4.2.2).
                peer.node = None;
                peer.stopped = true;
                self.say(format!("{id}: removed from the configuration; stopped"));
                return;
            }
        }
    }

    /// The receiver's side of a chunk: staged in order only; once the whole stream is held,
    /// the snapshot becomes the store, the WAL is reset to its base and the core is told.
    fn stage(&mut self, id: NodeId, from: NodeId, sid: SnapshotId, offset: u64, data: &str) {
        let peer = self.peers.get_mut(&id).unwrap();
        let node = peer.node.as_mut().unwrap();
        if sid.index <= node.applied_index() {
            return;
        }
        let len: u64 = data.parse().expect("chunk data is its length");
        let have = match peer.disk.staged {
            Some((s, have)) if s == sid => have,
            _ => 0,
        };
        let have = if offset == have { have + len } else { have };
        peer.disk.staged = Some((sid, have));
        if have < sid.total_len() {
            return node.snapshot_chunk_stored(from, sid.index, have);
        }
        let Some((state, records)) = self.snapshots.get(&sid).cloned() else {
            panic!("node {id} received snapshot {sid:?}, which nobody took");
        };
        let disk = &mut peer.disk;
        disk.store = records;
        disk.snapshot = Some((state.clone(), sid));
        disk.staged = None;
        disk.base = (sid.index, sid.term);
        disk.entries.clear();
        disk.hard_state.commit = disk.hard_state.commit.max(sid.index);
        node.install_snapshot(from, state, sid);
        self.say(format!(
            "{id}: installed snapshot {}",
            at(sid.index, sid.term)
        ));
    }

    fn snapshot(&mut self, id: NodeId, keep: u64) -> Result<(), String> {
        self.up(id)?;
        let record_bytes = self.record_bytes;
        let peer = self.peers.get_mut(&id).unwrap();
        let node = peer.node.as_mut().unwrap();
        let state = node.snapshot_state();
        let records = peer.disk.store[..state.index as usize].to_vec();
        let sid = SnapshotId {
            index: state.index,
            term: state.term,
            records_len: state.index * record_bytes,
            records_crc: fnv(&format!("{records:?}")) as u32,
            meta_len: META_BYTES,
            meta_crc: fnv(&format!("{state:?}")) as u32,
        };
        peer.disk.snapshot = Some((state.clone(), sid));
        self.snapshots.insert(sid, (state, records));
        let before = summary(node);
        let compacted = node.snapshot_taken(sid, keep);
        if let Some(base) = compacted {
            let disk = &mut peer.disk;
            disk.entries.retain(|e| e.index > base.0);
            disk.base = base;
        }
        self.say(format!(
            "{id}: snapshot {} of {} bytes",
            at(sid.index, sid.term),
            sid.total_len()
        ));
        if let Some(base) = compacted {
            self.say(format!(
                "{id}: compacted log through {}",
                at(base.0, base.1)
            ));
        }
        self.process(id, Some(before));
        Ok(())
    }

    fn restart(&mut self, id: NodeId) -> Result<(), String> {
        let peer = self.peers.get_mut(&id).unwrap();
        if peer.stopped {
            return Err(format!("node {id} is stopped"));
        }
        if peer.node.is_some() {
            return Err(format!("node {id} is running"));
        }
        let disk = &mut peer.disk;
        let node = Node::restore(
            peer.cfg.clone(),
            disk.hard_state,
            disk.snapshot.clone(),
            disk.base,
            disk.entries.clone(),
        );
        // The core replaces a WAL that does not reach its snapshot by the snapshot's base.
        if node.log().base() != disk.base {
            disk.base = node.log().base();
            disk.entries.clear();
        }
        peer.node = Some(node);
        self.process(id, None);
        Ok(())
    }

    fn status(&self, id: NodeId) -> String {
        let peer = &self.peers[&id];
        let Some(n) = &peer.node else {
            return match peer.stopped {
                true => format!("{id}: stopped"),
                false => format!("{id}: down"),
            };
        };
        let mut s = format!(
            "{id}: {} commit={} applied={}",
            role_line(&summary(n)),
            n.commit_index(),
            n.applied_index()
        );
        let log = n.log();
        if let Some(snap) = n.snapshot_id() {
            s += &format!(" snapshot={}", at(snap.index, snap.term));
        }
        if log.base().0 > 0 {
            s += &format!(" base={}", at(log.base().0, log.base().1));
        }
        s += &format!(
            " log={}",
            runs(log.entries().iter().map(|e| (e.index, e.term)))
        );
        s += &format!(" {}", members(n.membership()));
        let followers = n.status().followers;
        if !followers.is_empty() {
            let m: Vec<String> = followers
                .iter()
                .map(|f| format!("{}:{}", f.id, f.match_index))
                .collect();
            s += &format!(" match={}", m.join(","));
        }
        s
    }
}

fn client_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---- printing -----------------------------------------------------------------------------

fn at(index: Index, term: Term) -> String {
    format!("{index}@{term}")
}

/// Entries as runs of one term: `2..5@1,6@3`; `none` for no entries.
fn runs(entries: impl IntoIterator<Item = (Index, Term)>) -> String {
    let mut parts: Vec<(Index, Index, Term)> = Vec::new();
    for (index, term) in entries {
        match parts.last_mut() {
            Some((_, last, t)) if *t == term && *last + 1 == index => *last = index,
            _ => parts.push((index, index, term)),
        }
    }
    if parts.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = parts
        .into_iter()
        .map(|(first, last, term)| match first == last {
            true => at(first, term),
            false => format!("{first}..{last}@{term}"),
        })
        .collect();
    parts.join(",")
}

fn role_line(s: &Summary) -> String {
    let mut line = format!("{} term={}", s.role.name(), s.term);
    if let Some(v) = s.vote {
        line += &format!(" vote={v}");
    }
    if let Some(l) = s.leader.filter(|_| s.role != Role::Leader) {
        line += &format!(" leader={l}");
    }
    line
}

fn members(m: &Membership) -> String {
    let ids = |role| {
        m.members
            .iter()
            .filter(|x| x.role == role)
            .map(|x| x.id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut s = format!("voters={}", ids(MemberRole::Voter));
    let learners = ids(MemberRole::Learner);
    if !learners.is_empty() {
        s += &format!(" learners={learners}");
    }
    s
}

/// Client data, shortened when long.
fn quote(s: &str) -> String {
    if s.len() <= 16 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(8).collect();
        format!("{head:?}+{} bytes", s.len() - head.len())
    }
}

fn payload(p: &Payload) -> String {
    match p {
        Payload::Noop => "noop".into(),
        Payload::Data { data, .. } => quote(data),
        Payload::Config(m) => format!("config {}", members(m)),
        Payload::User(u) => format!("user {u:?}"),
    }
}

fn record(r: &LogRecord) -> String {
    let what = match (&r.data, &r.kind) {
        (Some(d), _) => quote(d),
        (None, Some(kind)) => kind.clone(),
        (None, None) => "?".into(),
    };
    format!("{} {what}", at(r.index, r.term))
}

fn msg(m: &Message) -> String {
    let body = match &m.body {
        Body::PreVote {
            last_log_index,
            last_log_term,
        }
        | Body::RequestVote {
            last_log_index,
            last_log_term,
        } => format!("last={}", at(*last_log_index, *last_log_term)),
        Body::PreVoteResponse { granted } | Body::RequestVoteResponse { granted } => {
            match granted {
                true => "granted".into(),
                false => "rejected".into(),
            }
        }
        Body::AppendEntries {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            read_seq,
        } => {
            let mut s = format!("prev={}", at(*prev_log_index, *prev_log_term));
            if !entries.is_empty() {
                s += &format!(
                    " entries={}",
                    runs(entries.iter().map(|e| (e.index, e.term)))
                );
            }
            s + &format!(" commit={leader_commit} seq={read_seq}")
        }
        Body::AppendEntriesResponse { read_seq, result } => {
            let r = match result {
                AppendResult::Accepted { match_index } => format!("accept={match_index}"),
                AppendResult::Rejected {
                    prev_log_index,
                    hint_index,
                    hint_term,
                } => format!(
                    "reject={prev_log_index} hint={}",
                    at(*hint_index, *hint_term)
                ),
                AppendResult::StaleTerm => "stale".into(),
            };
            format!("{r} seq={read_seq}")
        }
        Body::InstallSnapshot {
            snapshot,
            offset,
            data,
            ..
        } => {
            let len: u64 = data.parse().unwrap_or(data.len() as u64);
            format!(
                "snap={} bytes={offset}..{}/{}",
                at(snapshot.index, snapshot.term),
                offset + len,
                snapshot.total_len()
            )
        }
        Body::InstallSnapshotResponse {
            snapshot_index,
            have,
            done,
        } => match done {
            true => format!("snap={snapshot_index} done"),
            false => format!("snap={snapshot_index} have={have}"),
        },
        Body::TimeoutNow | Body::ClusterProbe | Body::ClusterProbeAnswer => String::new(),
    };
    let line = format!("{}->{} {} term={}", m.from, m.to, m.body.name(), m.term);
    match body.is_empty() {
        true => line,
        false => format!("{line} {body}"),
    }
}

fn client_result(r: &ClientResult) -> String {
    match r {
        ClientResult::Appended { index, term } => format!("Appended {}", at(*index, *term)),
        ClientResult::Entries {
            entries,
            read_index,
            next,
        } => {
            let list: Vec<String> = entries.iter().map(record).collect();
            let mut s = format!("Entries read_index={read_index} [{}]", list.join(", "));
            if let Some(next) = next {
                s += &format!(" next={next}");
            }
            s
        }
        ClientResult::Transferred { leader, term } => {
            format!("Transferred leader={leader} term={term}")
        }
        ClientResult::Configured {
            index,
            term,
            members: m,
        } => format!(
            "Configured {} {}",
            at(*index, *term),
            members(&Membership::new(m.clone()))
        ),
        ClientResult::NotLeader { leader } => match leader {
            Some(l) => format!("NotLeader leader={l}"),
            None => "NotLeader leader=none".into(),
        },
        ClientResult::Busy { reason } => format!("Busy: {reason}"),
        ClientResult::Refused { reason } => format!("Refused: {reason}"),
        other => format!("{other:?}"),
    }
}
