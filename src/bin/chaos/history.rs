//! The record of a chaos run: every client operation with its invoke and return times and its
//! outcome, every fault with its start and end, and the log records that queries observed.
//!
//! Query results are not stored whole (a query reads the entire log, so thousands of queries
//! would repeat the same records millions of times). Instead every record any query returned is
//! kept once in an [`Observed`] table, as a *variant* of its index (normally each index has
//! exactly one variant; a second one means two queries disagreed about that slot). A query's
//! result is then its length plus the indexes where it saw a variant other than the first:
//! exact, and small.
//!
//! On disk (all JSON lines, times in microseconds since the run started):
//! - `history.jsonl`: `{"type":"op",...}` and `{"type":"fault",...}` lines, by start time;
//! - `observed.jsonl`: `{"variant":v,"index":k,"term":t,"data":...,"kind":...}`;
//! - `final.jsonl`: the final log, one record per line, as the client prints it.

use raft::raft::{Index, LogRecord, NodeId, Term};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

/// Microseconds since the start of the run.
pub type Micros = u64;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// Append a value; every value of a run is unique.
    Append { value: String },
    /// Read the whole committed log.
    Query,
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The append was acknowledged at `index` by `peer`.
    Appended {
        index: Index,
        term: Term,
        peer: NodeId,
    },
    /// The query returned records `1..=len`: for each index the first [`Observed`] variant,
    /// except at the indexes listed in `alt`, as `(index, variant)`. `peer` answered the
    /// last page.
    Read {
        len: Index,
        alt: Vec<(Index, u32)>,
        peer: NodeId,
    },
    /// A definite refusal: the operation certainly did not take effect.
    Failed { error: String },
    /// No definite answer (timeout, I/O): the operation may or may not have taken effect, at
    /// any time after it was invoked.
    Unknown { error: String },
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Unique within a run, in invocation order.
    pub id: u64,
    /// The client thread that ran it; a client runs one operation at a time.
    pub client: u32,
    pub call: Call,
    pub invoke: Micros,
    /// When the client gave up or got the answer. For [`Outcome::Unknown`] this bounds nothing:
    /// the operation may still take effect later.
    pub ret: Micros,
    pub outcome: Outcome,
}

impl Op {
    pub fn is_append(&self) -> bool {
        matches!(self.call, Call::Append { .. })
    }

    pub fn value(&self) -> Option<&str> {
        match &self.call {
            Call::Append { value } => Some(value),
            Call::Query => None,
        }
    }

    /// A short human description, for reports.
    pub fn describe(&self) -> String {
        let call = match &self.call {
            Call::Append { value } => format!("append({value:?})"),
            Call::Query => "query()".to_string(),
        };
        let outcome = match &self.outcome {
            Outcome::Appended { index, term, peer } => {
                format!("ok index={index} term={term} peer={peer}")
            }
            Outcome::Read { len, alt, peer } if alt.is_empty() => {
                format!("ok len={len} peer={peer}")
            }
            Outcome::Read { len, alt, peer } => format!("ok len={len} alt={alt:?} peer={peer}"),
            Outcome::Failed { error } => format!("failed ({error})"),
            Outcome::Unknown { error } => format!("unknown ({error})"),
        };
        format!(
            "op {} client {} {call} -> {outcome}, invoked {:.3} s, returned {:.3} s",
            self.id,
            self.client,
            secs(self.invoke),
            secs(self.ret)
        )
    }
}

/// Microseconds as seconds, for reports.
pub fn secs(t: Micros) -> f64 {
    t as f64 / 1e6
}

/// One fault, from its start to its healing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// The kind: crash, killall, pause, partition, loss, dup or delay.
    pub fault: String,
    /// What exactly was done, e.g. `isolate leader 2: [2] | [1,3]`.
    pub detail: String,
    pub start: Micros,
    pub end: Micros,
}

/// Every distinct record queries returned, by index and variant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `variants[k - 1]` holds the distinct records seen at index `k`, in order of first sight.
    variants: Vec<Vec<LogRecord>>,
}

impl Observed {
    /// Records a query's result, which must list indexes `1..=len` in order, and returns its
    /// compact form `(len, alt)` (see [`Outcome::Read`]). Errors if the indexes are not
    /// `1, 2, 3, ...`.
    pub fn intern(&mut self, records: &[LogRecord]) -> Result<(Index, Vec<(Index, u32)>), String> {
        let mut alt = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let index = i as Index + 1;
            if r.index != index {
                return Err(format!(
                    "query result has index {} at position {index}",
                    r.index
                ));
            }
            if self.variants.len() < index as usize {
                self.variants.push(Vec::new());
            }
            let slot = &mut self.variants[i];
            let variant = match slot.iter().position(|v| v == r) {
                Some(v) => v,
                None => {
                    slot.push(r.clone());
                    slot.len() - 1
                }
            };
            if variant != 0 {
                alt.push((index, variant as u32));
            }
        }
        Ok((records.len() as Index, alt))
    }

    /// The record a query saw at `index` as variant `variant`.
    pub fn get(&self, index: Index, variant: u32) -> Option<&LogRecord> {
        let slot = self.variants.get((index as usize).checked_sub(1)?)?;
        slot.get(variant as usize)
    }

    /// The highest index any query saw.
    pub fn len(&self) -> Index {
        self.variants.len() as Index
    }

    /// Indexes where queries disagreed, with how many variants each.
    pub fn disagreements(&self) -> Vec<(Index, usize)> {
        self.variants
            .iter()
            .enumerate()
            .filter(|(_, v)| v.len() > 1)
            .map(|(i, v)| (i as Index + 1, v.len()))
            .collect()
    }

    /// Expands a compact query result back into records.
    #[cfg(test)]
    pub fn expand(&self, len: Index, alt: &[(Index, u32)]) -> Result<Vec<LogRecord>, String> {
        let alt: std::collections::BTreeMap<Index, u32> = alt.iter().copied().collect();
        (1..=len)
            .map(|k| {
                let v = alt.get(&k).copied().unwrap_or(0);
                self.get(k, v)
                    .cloned()
                    .ok_or_else(|| format!("no observed record for index {k} variant {v}"))
            })
            .collect()
    }
}

/// The flat JSON shape of a history line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: String,
    // ---- op lines
    #[serde(default, skip_serializing_if = "Option::is_none")]
    op: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    invoke_us: Option<Micros>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    return_us: Option<Micros>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index: Option<Index>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    term: Option<Term>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer: Option<NodeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    len: Option<Index>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alt: Option<Vec<(Index, u32)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    // ---- fault lines
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fault: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_us: Option<Micros>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_us: Option<Micros>,
}

fn op_line(op: &Op) -> Line {
    let mut l = Line {
        kind: "op".into(),
        op: Some(op.id),
        client: Some(op.client),
        invoke_us: Some(op.invoke),
        return_us: Some(op.ret),
        ..Line::default()
    };
    match &op.call {
        Call::Append { value } => {
            l.f = Some("append".into());
            l.value = Some(value.clone());
        }
        Call::Query => l.f = Some("query".into()),
    }
    match &op.outcome {
        Outcome::Appended { index, term, peer } => {
            l.outcome = Some("ok".into());
            (l.index, l.term, l.peer) = (Some(*index), Some(*term), Some(*peer));
        }
        Outcome::Read { len, alt, peer } => {
            l.outcome = Some("ok".into());
            l.len = Some(*len);
            l.alt = Some(alt.clone());
            l.peer = Some(*peer);
        }
        Outcome::Failed { error } => {
            l.outcome = Some("failed".into());
            l.error = Some(error.clone());
        }
        Outcome::Unknown { error } => {
            l.outcome = Some("unknown".into());
            l.error = Some(error.clone());
        }
    }
    l
}

fn parse_op(l: Line) -> Result<Op, String> {
    let need = |what: &str| format!("op line without `{what}`");
    let call = match l.f.as_deref() {
        Some("append") => Call::Append {
            value: l.value.ok_or_else(|| need("value"))?,
        },
        Some("query") => Call::Query,
        other => return Err(format!("op line with f={other:?}")),
    };
    let outcome = match (l.outcome.as_deref(), &call) {
        (Some("ok"), Call::Append { .. }) => Outcome::Appended {
            index: l.index.ok_or_else(|| need("index"))?,
            term: l.term.ok_or_else(|| need("term"))?,
            peer: l.peer.unwrap_or(0),
        },
        (Some("ok"), Call::Query) => Outcome::Read {
            len: l.len.ok_or_else(|| need("len"))?,
            alt: l.alt.unwrap_or_default(),
            peer: l.peer.unwrap_or(0),
        },
        (Some("failed"), _) => Outcome::Failed {
            error: l.error.unwrap_or_default(),
        },
        (Some("unknown"), _) => Outcome::Unknown {
            error: l.error.unwrap_or_default(),
        },
        (other, _) => return Err(format!("op line with outcome={other:?}")),
    };
    Ok(Op {
        id: l.op.ok_or_else(|| need("op"))?,
        client: l.client.unwrap_or(0),
        call,
        invoke: l.invoke_us.ok_or_else(|| need("invoke_us"))?,
        ret: l.return_us.ok_or_else(|| need("return_us"))?,
        outcome,
    })
}

/// Writes ops and faults as JSON lines, ordered by their start time.
pub fn write_history(path: &Path, ops: &[Op], faults: &[FaultEvent]) -> Result<(), String> {
    let mut lines: Vec<(Micros, u8, u64, Line)> = ops
        .iter()
        .map(|o| (o.invoke, 1, o.id, op_line(o)))
        .collect();
    for (i, f) in faults.iter().enumerate() {
        lines.push((
            f.start,
            0,
            i as u64,
            Line {
                kind: "fault".into(),
                fault: Some(f.fault.clone()),
                detail: Some(f.detail.clone()),
                start_us: Some(f.start),
                end_us: Some(f.end),
                ..Line::default()
            },
        ));
    }
    lines.sort_by_key(|(t, k, id, _)| (*t, *k, *id));
    write_lines(path, lines.iter().map(|(_, _, _, l)| l))
}

/// Reads a history written by [`write_history`].
pub fn read_history(path: &Path) -> Result<(Vec<Op>, Vec<FaultEvent>), String> {
    let mut ops = Vec::new();
    let mut faults = Vec::new();
    for (n, line) in read_lines::<Line>(path)?.into_iter().enumerate() {
        let at = |e: String| format!("{}:{}: {e}", path.display(), n + 1);
        match line.kind.as_str() {
            "op" => ops.push(parse_op(line).map_err(at)?),
            "fault" => faults.push(FaultEvent {
                fault: line.fault.unwrap_or_default(),
                detail: line.detail.unwrap_or_default(),
                start: line.start_us.unwrap_or(0),
                end: line.end_us.unwrap_or(0),
            }),
            other => return Err(at(format!("unknown line type {other:?}"))),
        }
    }
    ops.sort_by_key(|o| o.id);
    Ok((ops, faults))
}

#[derive(Serialize, Deserialize)]
struct ObservedLine {
    variant: u32,
    #[serde(flatten)]
    record: LogRecord,
}

pub fn write_observed(path: &Path, observed: &Observed) -> Result<(), String> {
    let lines = observed.variants.iter().flat_map(|slot| {
        slot.iter().enumerate().map(|(v, r)| ObservedLine {
            variant: v as u32,
            record: r.clone(),
        })
    });
    write_lines(path, lines)
}

pub fn read_observed(path: &Path) -> Result<Observed, String> {
    let mut observed = Observed::default();
    for l in read_lines::<ObservedLine>(path)? {
        let k = l.record.index as usize;
        if k == 0 {
            return Err(format!("{}: index 0", path.display()));
        }
        if observed.variants.len() < k {
            observed.variants.resize(k, Vec::new());
        }
        let slot = &mut observed.variants[k - 1];
        if slot.len() != l.variant as usize {
            return Err(format!(
                "{}: variant {} of index {k} out of order",
                path.display(),
                l.variant
            ));
        }
        slot.push(l.record);
    }
    Ok(observed)
}

pub fn write_log(path: &Path, log: &[LogRecord]) -> Result<(), String> {
    write_lines(path, log.iter())
}

pub fn read_log(path: &Path) -> Result<Vec<LogRecord>, String> {
    read_lines(path)
}

fn write_lines<T: Serialize>(path: &Path, items: impl Iterator<Item = T>) -> Result<(), String> {
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for item in items {
        serde_json::to_writer(&mut w, &item).map_err(|e| format!("{}: {e}", path.display()))?;
        w.write_all(b"\n")
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    w.flush().map_err(|e| format!("{}: {e}", path.display()))
}

fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: Index, data: &str) -> LogRecord {
        LogRecord {
            index,
            term: 1,
            data: Some(data.into()),
            kind: None,
        }
    }

    #[test]
    fn interning_keeps_one_copy_and_marks_disagreements() {
        let mut obs = Observed::default();
        let a = obs.intern(&[rec(1, "a"), rec(2, "b")]).unwrap();
        assert_eq!(a, (2, vec![]));
        let b = obs.intern(&[rec(1, "a"), rec(2, "x"), rec(3, "c")]);
        assert_eq!(b.unwrap(), (3, vec![(2, 1)]));
        assert_eq!(obs.disagreements(), vec![(2, 2)]);
        assert_eq!(
            obs.expand(3, &[(2, 1)]).unwrap(),
            vec![rec(1, "a"), rec(2, "x"), rec(3, "c")]
        );
        assert!(obs.intern(&[rec(2, "a")]).is_err());
    }

    #[test]
    fn history_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("chaos-history-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ops = vec![
            Op {
                id: 0,
                client: 1,
                call: Call::Append { value: "v".into() },
                invoke: 5,
                ret: 9,
                outcome: Outcome::Appended {
                    index: 1,
                    term: 2,
                    peer: 3,
                },
            },
            Op {
                id: 1,
                client: 2,
                call: Call::Query,
                invoke: 6,
                ret: 10,
                outcome: Outcome::Read {
                    len: 1,
                    alt: vec![(1, 1)],
                    peer: 2,
                },
            },
            Op {
                id: 2,
                client: 2,
                call: Call::Append { value: "w".into() },
                invoke: 11,
                ret: 20,
                outcome: Outcome::Unknown {
                    error: "timeout".into(),
                },
            },
        ];
        let faults = vec![FaultEvent {
            fault: "crash".into(),
            detail: "kill -9 node 1".into(),
            start: 1,
            end: 7,
        }];
        let mut obs = Observed::default();
        obs.intern(&[rec(1, "v")]).unwrap();
        obs.intern(&[rec(1, "z")]).unwrap();
        write_history(&dir.join("h.jsonl"), &ops, &faults).unwrap();
        write_observed(&dir.join("o.jsonl"), &obs).unwrap();
        assert_eq!(read_history(&dir.join("h.jsonl")).unwrap(), (ops, faults));
        assert_eq!(read_observed(&dir.join("o.jsonl")).unwrap(), obs);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
