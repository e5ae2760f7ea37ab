//! The linearizability checker for the replicated append-only log.
//!
//! The object is a log that clients `append(v)` to and `query()` in whole. Its sequential
//! specification: `append(v)` puts `v` at the end and returns its index; `query()` returns the
//! whole log. The cluster may also insert entries no client asked for (a leader's `noop`, and the
//! `duplicate` slot of a deduplicated retry); they carry no client data and take no part in the
//! order. Every appended value in a run is unique.
//!
//! The final log `F` (read after healing) fixes the order of every append that took effect: an
//! append at index `i` sits at position `2i`, and a query that returned records `1..=R` sits at
//! `2R + 1`, after the appends it saw and before the next. A history is linearizable iff
//!
//! 1. `F` is well formed (indexes `1..`), and holds no data nobody appended (*phantom*) and no
//!    value twice (*dup*);
//! 2. every acknowledged append is in `F` at the index and term it was acknowledged with
//!    (*lost*, which covers "moved"); no refused append is in `F` (*failed_applied*);
//! 3. every successful query returned a prefix of `F` (*diverged* otherwise: it saw a record
//!    that is not in the final log);
//! 4. real-time order holds on those positions: if `A` returned before `B` was invoked then
//!    `pos(A) <= pos(B)` (only two queries can share a position). Broken with a query as `B`,
//!    that is a *stale* read (it missed an append or a record an earlier query had already
//!    seen); with an append as `B`, it is an *order* violation.
//!
//! Appends of unknown outcome take part where `F` has them (with an unbounded return time:
//! they may take effect at any time after they were invoked) and not at all where it does not.
//! Refused appends and queries that failed or timed out take no part. Because positions are
//! fixed by `F`, the whole check is `O(n log n)` in the number of operations, plus the size of
//! the distinct records the queries observed.

use crate::history::{secs, Micros, Observed, Op, Outcome};
use raft::raft::{Index, LogRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// What rule a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The history or final log is not shaped as the checker needs (a harness bug).
    Malformed,
    /// An acknowledged append is missing from the final log, or sits elsewhere.
    Lost,
    /// A value appears twice in the final log.
    Duplicate,
    /// A record in the final log that no client appended.
    Phantom,
    /// A refused (definitely failed) append is in the final log.
    FailedApplied,
    /// A query returned something that is not a prefix of the final log.
    Diverged,
    /// A query missed something that real-time order says it must see.
    Stale,
    /// An append was ordered before an operation that completed before it was invoked.
    Order,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Malformed => "malformed",
            Kind::Lost => "lost",
            Kind::Duplicate => "dup",
            Kind::Phantom => "phantom",
            Kind::FailedApplied => "failed_applied",
            Kind::Diverged => "diverged",
            Kind::Stale => "stale",
            Kind::Order => "order",
        })
    }
}

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    /// The operation at fault, if one is.
    pub op: Option<u64>,
    /// Its invocation time, for ordering violations; `Micros::MAX` when there is no op.
    pub at: Micros,
    pub message: String,
}

/// The checker's answer, with the counts the summary line shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub ops: usize,
    pub ok: usize,
    pub unknown: usize,
    pub failed: usize,
    /// Per-kind violation counts.
    pub counts: BTreeMap<String, usize>,
    /// Every violation, the first (earliest invoked op) first.
    pub violations: Vec<Violation>,
    /// Unknown-outcome appends that the final log shows took effect.
    pub unknown_applied: usize,
}

impl Verdict {
    pub fn valid(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.counts.get(&kind.to_string()).copied().unwrap_or(0)
    }

    pub fn first(&self) -> Option<&Violation> {
        self.violations.first()
    }
}

/// An op's position in the linearization, with the times that constrain it.
struct Placed {
    pos: u64,
    invoke: Micros,
    ret: Micros,
    op: usize,
}

/// Checks a history against the final log. `observed` must hold every record the history's
/// queries refer to.
pub fn check(ops: &[Op], observed: &Observed, final_log: &[LogRecord]) -> Verdict {
    let mut v = Verdict {
        ops: ops.len(),
        ..Verdict::default()
    };
    for op in ops {
        match op.outcome {
            Outcome::Appended { .. } | Outcome::Read { .. } => v.ok += 1,
            Outcome::Failed { .. } => v.failed += 1,
            Outcome::Unknown { .. } => v.unknown += 1,
        }
    }
    let mut out: Vec<Violation> = Vec::new();
    let mut report = |kind: Kind, op: Option<&Op>, message: String| {
        out.push(Violation {
            kind,
            op: op.map(|o| o.id),
            at: op.map_or(Micros::MAX, |o| o.invoke),
            message,
        })
    };

    // Every value is appended by exactly one op.
    let mut by_value: HashMap<&str, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Some(value) = op.value() {
            if let Some(&first) = by_value.get(value) {
                report(
                    Kind::Malformed,
                    Some(op),
                    format!(
                        "value {value:?} appended by both op {} and op {}; values must be unique",
                        ops[first].id, op.id
                    ),
                );
            } else {
                by_value.insert(value, i);
            }
        }
    }

    // 1. The final log: shape, phantoms, duplicates.
    for (i, r) in final_log.iter().enumerate() {
        if r.index != i as Index + 1 {
            report(
                Kind::Malformed,
                None,
                format!(
                    "final log has index {} at position {}; cannot check",
                    r.index,
                    i + 1
                ),
            );
            return finish(v, out);
        }
    }
    let mut positions: HashMap<&str, Vec<Index>> = HashMap::new();
    for r in final_log {
        match (&r.data, r.kind.as_deref()) {
            (Some(data), _) => {
                if by_value.contains_key(data.as_str()) {
                    positions.entry(data).or_default().push(r.index);
                } else {
                    report(
                        Kind::Phantom,
                        None,
                        format!(
                            "final log index {} holds {data:?}, which no client appended",
                            r.index
                        ),
                    );
                }
            }
            // A leader's empty entry, a retry applied as a no-op, a membership change.
            (None, Some("noop" | "duplicate" | "config")) => {}
            (None, kind) => report(
                Kind::Phantom,
                None,
                format!("final log index {} has no data and kind {kind:?}", r.index),
            ),
        }
    }
    for (value, at) in &positions {
        if at.len() > 1 {
            let op = &ops[by_value[value]];
            report(
                Kind::Duplicate,
                Some(op),
                format!(
                    "value {value:?} of {} is applied {} times, at indexes {at:?}",
                    op.describe(),
                    at.len()
                ),
            );
        }
    }

    // 2 and 3. Each op against the final log; place the ones that took effect.
    let mut placed: Vec<Placed> = Vec::new();
    let bad_first_variants: BTreeSet<Index> = (1..=observed.len())
        .filter(|&k| observed.get(k, 0) != final_log.get(k as usize - 1))
        .collect();
    for (i, op) in ops.iter().enumerate() {
        let applied_at = op
            .value()
            .and_then(|value| positions.get(value))
            .map(|at| at[0]);
        match &op.outcome {
            Outcome::Appended { index, term, .. } => {
                let at_index = final_log.get((*index as usize).wrapping_sub(1));
                let holds =
                    at_index.is_some_and(|r| r.term == *term && r.data.as_deref() == op.value());
                if !holds {
                    let found = match applied_at {
                        Some(k) => format!("it is at index {k} instead"),
                        None => "it is not in the final log".to_string(),
                    };
                    report(
                        Kind::Lost,
                        Some(op),
                        format!(
                            "{} was acknowledged at index {index} term {term}, but {found} (final log there: {})",
                            op.describe(),
                            show(at_index)
                        ),
                    );
                }
                placed.push(Placed {
                    pos: 2 * index,
                    invoke: op.invoke,
                    ret: op.ret,
                    op: i,
                });
            }
            Outcome::Failed { .. } if op.is_append() => {
                if let Some(k) = applied_at {
                    report(
                        Kind::FailedApplied,
                        Some(op),
                        format!(
                            "{} was refused, yet the final log has it at index {k}",
                            op.describe()
                        ),
                    );
                }
            }
            Outcome::Unknown { .. } if op.is_append() => {
                if let Some(k) = applied_at {
                    v.unknown_applied += 1;
                    placed.push(Placed {
                        pos: 2 * k,
                        invoke: op.invoke,
                        ret: Micros::MAX,
                        op: i,
                    });
                }
            }
            Outcome::Read { len, alt, .. } => {
                match first_difference(*len, alt, observed, &bad_first_variants, final_log) {
                    Some(message) => {
                        report(
                            Kind::Diverged,
                            Some(op),
                            format!("{}: {message}", op.describe()),
                        );
                    }
                    None => placed.push(Placed {
                        pos: 2 * len + 1,
                        invoke: op.invoke,
                        ret: op.ret,
                        op: i,
                    }),
                }
            }
            Outcome::Failed { .. } | Outcome::Unknown { .. } => {}
        }
    }

    // 4. Real-time order: for each op B, the highest position among ops that returned before B
    // was invoked must not exceed B's.
    let mut by_return: Vec<&Placed> = placed.iter().collect();
    by_return.sort_by_key(|p| p.ret);
    let mut best: Vec<usize> = Vec::with_capacity(by_return.len());
    for (k, p) in by_return.iter().enumerate() {
        let prev = k.checked_sub(1).map(|j| best[j]);
        best.push(match prev {
            Some(j) if by_return[j].pos >= p.pos => j,
            _ => k,
        });
    }
    for b in &placed {
        let before = by_return.partition_point(|a| a.ret < b.invoke);
        if before == 0 {
            continue;
        }
        let a = by_return[best[before - 1]];
        if a.pos <= b.pos {
            continue;
        }
        let (op_a, op_b) = (&ops[a.op], &ops[b.op]);
        let kind = if op_b.is_append() {
            Kind::Order
        } else {
            Kind::Stale
        };
        let why = match (op_a.is_append(), op_b.is_append()) {
            (true, false) => format!("it misses the append at index {}", a.pos / 2),
            (false, false) => format!(
                "it returned {} records, an earlier query {}",
                b.pos / 2,
                a.pos / 2
            ),
            (true, true) => format!("its index {} is below {}", b.pos / 2, a.pos / 2),
            (false, true) => format!(
                "its index {} was already visible to a query that finished earlier",
                b.pos / 2
            ),
        };
        report(
            kind,
            Some(op_b),
            format!(
                "{} was invoked after [{}] returned at {:.3} s, but {why}",
                op_b.describe(),
                op_a.describe(),
                secs(op_a.ret)
            ),
        );
    }
    finish(v, out)
}

/// The first index where a query's result differs from the final log, described.
fn first_difference(
    len: Index,
    alt: &[(Index, u32)],
    observed: &Observed,
    bad_first_variants: &BTreeSet<Index>,
    final_log: &[LogRecord],
) -> Option<String> {
    let alt_at: BTreeMap<Index, u32> = alt.iter().copied().collect();
    let mut first: Option<Index> = None;
    for &k in bad_first_variants.range(1..=len) {
        if !alt_at.contains_key(&k) {
            first = Some(k);
            break;
        }
    }
    for (&k, &variant) in &alt_at {
        if k > len || first.is_some_and(|f| f < k) {
            break;
        }
        if observed.get(k, variant) != final_log.get(k as usize - 1) {
            first = Some(first.map_or(k, |f| f.min(k)));
            break;
        }
    }
    if let Some(k) = first {
        let seen = observed.get(k, alt_at.get(&k).copied().unwrap_or(0));
        return Some(format!(
            "at index {k} it saw {}, the final log has {}",
            show(seen),
            show(final_log.get(k as usize - 1))
        ));
    }
    if len as usize > final_log.len() {
        return Some(format!(
            "it read {len} records, the final log has only {}",
            final_log.len()
        ));
    }
    None
}

fn show(r: Option<&LogRecord>) -> String {
    match r {
        None => "nothing".into(),
        Some(r) => serde_json::to_string(r).unwrap_or_else(|_| format!("{r:?}")),
    }
}

fn finish(mut v: Verdict, mut out: Vec<Violation>) -> Verdict {
    out.sort_by_key(|a| (a.at, a.kind, a.op));
    for o in &out {
        *v.counts.entry(o.kind.to_string()).or_default() += 1;
    }
    v.violations = out;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Call;

    /// A history under construction; times are in milliseconds for readability.
    #[derive(Default)]
    struct H {
        ops: Vec<Op>,
        observed: Observed,
    }

    fn rec(index: Index, data: &str) -> LogRecord {
        LogRecord {
            index,
            term: 1,
            data: Some(data.into()),
            kind: None,
        }
    }

    fn special(index: Index, kind: &str) -> LogRecord {
        LogRecord {
            index,
            term: 1,
            data: None,
            kind: Some(kind.into()),
        }
    }

    /// A log of the given values at indexes 1, 2, ...
    fn log(values: &[&str]) -> Vec<LogRecord> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| match *v {
                "noop" | "duplicate" | "config" => special(i as Index + 1, v),
                _ => rec(i as Index + 1, v),
            })
            .collect()
    }

    impl H {
        fn push(&mut self, call: Call, invoke: u64, ret: u64, outcome: Outcome) -> &mut Self {
            let id = self.ops.len() as u64;
            self.ops.push(Op {
                id,
                client: id as u32,
                call,
                invoke: invoke * 1000,
                ret: ret * 1000,
                outcome,
            });
            self
        }

        fn ok(&mut self, value: &str, invoke: u64, ret: u64, index: Index) -> &mut Self {
            let call = Call::Append {
                value: value.into(),
            };
            let outcome = Outcome::Appended {
                index,
                term: 1,
                peer: 1,
            };
            self.push(call, invoke, ret, outcome)
        }

        fn unknown(&mut self, value: &str, invoke: u64, ret: u64) -> &mut Self {
            let call = Call::Append {
                value: value.into(),
            };
            let outcome = Outcome::Unknown {
                error: "timeout".into(),
            };
            self.push(call, invoke, ret, outcome)
        }

        fn failed(&mut self, value: &str, invoke: u64, ret: u64) -> &mut Self {
            let call = Call::Append {
                value: value.into(),
            };
            let outcome = Outcome::Failed {
                error: "refused".into(),
            };
            self.push(call, invoke, ret, outcome)
        }

        fn query(&mut self, invoke: u64, ret: u64, values: &[&str]) -> &mut Self {
            let (len, alt) = self.observed.intern(&log(values)).unwrap();
            let outcome = Outcome::Read { len, alt, peer: 1 };
            self.push(Call::Query, invoke, ret, outcome)
        }

        fn check(&self, final_values: &[&str]) -> Verdict {
            check(&self.ops, &self.observed, &log(final_values))
        }
    }

    /// Asserts the verdict is invalid with a first violation of `kind` at op `op`.
    fn rejected(v: &Verdict, kind: Kind, op: Option<u64>) {
        assert!(!v.valid(), "should be rejected: {v:#?}");
        let first = v.first().unwrap();
        assert_eq!((first.kind, first.op), (kind, op), "{v:#?}");
        assert_eq!(v.count(kind), 1, "{v:#?}");
    }

    fn valid(v: &Verdict) {
        assert!(v.valid(), "should be valid: {:#?}", v.violations);
    }

    #[test]
    fn a_sequential_history_is_valid() {
        let mut h = H::default();
        h.ok("a", 0, 1, 2)
            .query(2, 3, &["noop", "a"])
            .ok("b", 4, 5, 3)
            .query(6, 7, &["noop", "a", "b"]);
        let v = h.check(&["noop", "a", "b", "noop"]);
        valid(&v);
        assert_eq!((v.ops, v.ok, v.unknown, v.failed), (4, 4, 0, 0));
    }

    #[test]
    fn concurrent_appends_may_land_in_either_order() {
        let mut h = H::default();
        // b is invoked later but lands first: fine, they overlap.
        h.ok("a", 0, 10, 2).ok("b", 1, 5, 1).query(2, 3, &["b"]);
        valid(&h.check(&["b", "a"]));
    }

    #[test]
    fn a_query_concurrent_with_an_append_may_see_it_or_not() {
        let mut h = H::default();
        h.ok("a", 0, 10, 1)
            .query(1, 2, &[])
            .query(3, 4, &["a"])
            .query(5, 12, &["a"]);
        valid(&h.check(&["a"]));
    }

    #[test]
    fn an_unknown_append_that_a_later_query_sees_is_valid() {
        let mut h = H::default();
        h.unknown("a", 0, 10)
            .query(20, 21, &["a"])
            .ok("b", 22, 23, 2);
        let v = h.check(&["a", "b"]);
        valid(&v);
        assert_eq!(v.unknown_applied, 1);
    }

    #[test]
    fn an_unknown_append_never_seen_is_valid() {
        let mut h = H::default();
        h.unknown("a", 0, 10).query(20, 21, &[]).ok("b", 22, 23, 1);
        let v = h.check(&["b"]);
        valid(&v);
        assert_eq!((v.unknown, v.unknown_applied), (1, 0));
    }

    #[test]
    fn an_unknown_append_may_take_effect_long_after_its_client_gave_up() {
        let mut h = H::default();
        // The client timed out at 10; a delayed retry lands after b, which began at 20.
        h.unknown("a", 0, 10)
            .ok("b", 20, 21, 1)
            .query(30, 31, &["b", "a"]);
        valid(&h.check(&["b", "a"]));
    }

    #[test]
    fn an_unknown_append_cannot_take_effect_before_it_was_invoked() {
        let mut h = H::default();
        // b was acknowledged at index 2 before a was even invoked, but a sits at index 1.
        h.ok("b", 0, 1, 2).unknown("a", 5, 10);
        rejected(&h.check(&["a", "b"]), Kind::Order, Some(1));
    }

    #[test]
    fn noops_and_duplicate_slots_are_ignored() {
        let mut h = H::default();
        h.ok("a", 0, 1, 2).query(2, 3, &["noop", "a", "duplicate"]);
        valid(&h.check(&["noop", "a", "duplicate", "noop", "config"]));
    }

    #[test]
    fn failed_and_timed_out_queries_constrain_nothing() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1);
        h.push(
            Call::Query,
            2,
            3,
            Outcome::Unknown {
                error: "timeout".into(),
            },
        );
        h.push(
            Call::Query,
            4,
            5,
            Outcome::Failed {
                error: "refused".into(),
            },
        );
        valid(&h.check(&["a"]));
    }

    #[test]
    fn a_stale_read_is_rejected() {
        let mut h = H::default();
        // a was acknowledged before the query began, and the query does not show it.
        h.ok("a", 0, 1, 1).query(2, 3, &[]);
        rejected(&h.check(&["a"]), Kind::Stale, Some(1));
    }

    #[test]
    fn a_read_that_goes_back_in_time_is_rejected() {
        let mut h = H::default();
        // Two overlapping appends, then one query sees both and a later one sees only one.
        h.ok("a", 0, 10, 1)
            .ok("b", 0, 10, 2)
            .query(11, 12, &["a", "b"])
            .query(13, 14, &["a"]);
        rejected(&h.check(&["a", "b"]), Kind::Stale, Some(3));
    }

    #[test]
    fn a_read_that_sees_an_append_before_it_was_invoked_is_rejected() {
        let mut h = H::default();
        h.query(0, 1, &["a"]).ok("a", 2, 3, 1);
        rejected(&h.check(&["a"]), Kind::Order, Some(1));
    }

    #[test]
    fn a_lost_acknowledged_append_is_rejected() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1).ok("b", 2, 3, 2);
        rejected(&h.check(&["a"]), Kind::Lost, Some(1));
    }

    #[test]
    fn a_moved_acknowledged_append_is_rejected() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1).unknown("x", 0, 5);
        rejected(&h.check(&["x", "a"]), Kind::Lost, Some(0));
    }

    #[test]
    fn an_acknowledgement_with_the_wrong_term_is_rejected() {
        let mut h = H::default();
        h.push(
            Call::Append { value: "a".into() },
            0,
            1,
            Outcome::Appended {
                index: 1,
                term: 7,
                peer: 1,
            },
        );
        rejected(&h.check(&["a"]), Kind::Lost, Some(0));
    }

    #[test]
    fn a_value_applied_twice_is_rejected() {
        let mut h = H::default();
        h.unknown("a", 0, 5).ok("b", 6, 7, 2);
        rejected(&h.check(&["a", "b", "a"]), Kind::Duplicate, Some(0));
    }

    #[test]
    fn a_phantom_value_is_rejected() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1);
        let v = h.check(&["a", "ghost"]);
        rejected(&v, Kind::Phantom, None);
        // A record with neither data nor a known kind is no better.
        let mut bad = log(&["a"]);
        bad.push(LogRecord {
            index: 2,
            term: 1,
            data: None,
            kind: Some("mystery".into()),
        });
        rejected(&check(&h.ops, &h.observed, &bad), Kind::Phantom, None);
    }

    #[test]
    fn a_failed_append_that_is_present_is_rejected() {
        let mut h = H::default();
        h.failed("a", 0, 1).ok("b", 2, 3, 2);
        rejected(&h.check(&["a", "b"]), Kind::FailedApplied, Some(0));
    }

    #[test]
    fn broken_real_time_order_between_appends_is_rejected() {
        let mut h = H::default();
        // a returned before b was invoked, yet b got the lower index.
        h.ok("a", 0, 1, 2).ok("b", 2, 3, 1);
        rejected(&h.check(&["b", "a"]), Kind::Order, Some(1));
    }

    #[test]
    fn a_query_that_saw_what_the_final_log_lacks_is_rejected() {
        let mut h = H::default();
        // The query saw x at index 1 (an uncommitted entry of a deposed leader, say).
        h.unknown("x", 0, 5).query(1, 2, &["x"]).ok("a", 3, 4, 1);
        rejected(&h.check(&["a"]), Kind::Diverged, Some(1));
    }

    #[test]
    fn a_query_that_disagrees_with_another_is_caught_at_the_index_that_differs() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1)
            .ok("b", 0, 1, 2)
            .query(2, 3, &["a", "b"])
            .query(4, 5, &["a", "noop"]);
        let v = h.check(&["a", "b"]);
        rejected(&v, Kind::Diverged, Some(3));
        assert!(v.first().unwrap().message.contains("index 2"), "{v:#?}");
        // The other way round: the first-seen variant is the wrong one.
        let mut h = H::default();
        h.ok("a", 0, 1, 1)
            .ok("b", 0, 1, 2)
            .query(2, 3, &["a", "noop"])
            .query(4, 5, &["a", "b"]);
        rejected(&h.check(&["a", "b"]), Kind::Diverged, Some(2));
    }

    #[test]
    fn a_query_longer_than_the_final_log_is_rejected() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1).query(2, 3, &["a", "noop"]);
        rejected(&h.check(&["a"]), Kind::Diverged, Some(1));
    }

    #[test]
    fn a_malformed_final_log_is_reported_not_trusted() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1);
        let mut bad = log(&["a"]);
        bad[0].index = 5;
        rejected(&check(&h.ops, &h.observed, &bad), Kind::Malformed, None);
    }

    #[test]
    fn violations_are_ordered_by_the_op_that_broke_them_first() {
        let mut h = H::default();
        h.ok("a", 0, 1, 1).ok("b", 2, 3, 2).query(4, 5, &["a"]);
        let v = h.check(&["a"]);
        assert!(!v.valid());
        let kinds: Vec<(Kind, Option<u64>)> = v.violations.iter().map(|x| (x.kind, x.op)).collect();
        // b is lost (op 1, invoked at 2); and the query, invoked after b's acknowledgement
        // for index 2, is stale by that acknowledgement.
        assert_eq!(kinds, vec![(Kind::Lost, Some(1)), (Kind::Stale, Some(2))]);
    }
}
