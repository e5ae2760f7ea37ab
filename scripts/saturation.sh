#!/usr/bin/env bash
# Saturation runs on a spawned three-peer cluster: appends at 1,024 in flight for 5 minutes,
# then 256 in flight for 60 s while the leader is flooded with 50,000 junk datagrams/s.
# Each must see no leader change. Prints bench's summary and JSON lines and the peers' slowest
# batches; on a leader change, also their role changes, and keeps their logs. Exit 1 then.
#
#   scripts/saturation.sh            # both runs, 6 minutes
#   LONG=30 FLOOD=20 scripts/saturation.sh   # shorter; 0 skips a run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bench="${CARGO_TARGET_DIR:-target}/release/bench"
long=${LONG:-300}
flood=${FLOOD:-60}
cargo build --release --bins --quiet
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
failed=0

run() {
  # Let the file system finish writing back what came before (a previous run deletes a
  # gigabyte of data dirs), so that this run's first seconds do not pay for it in fsyncs.
  sync
  echo "\$ $bench $*"
  local err out dir
  err=$(mktemp)
  out=$("$bench" --keep-logs "$@" 2>"$err") || { cat "$err" >&2; rm -f "$err"; exit 2; }
  echo "$out"
  dir=$(sed -n 's/^peer logs kept in //p' "$err")
  rm -f "$err"
  # The peers log every batch over 50 ms with where the time went (stepping, fsync, sending).
  # (sed, not head, ends pipelines here: head's early exit would fail them under pipefail.)
  local slow
  slow=$(cat "$dir"/peer*.log | grep 'took' || true)
  echo "slow batches logged by the peers: $(grep -c . <<<"$slow" || true); the slowest:"
  awk '{for (i = 1; i < NF; i++) if ($i == "took") print $(i + 1), $0}' <<<"$slow" |
    sort -rn | sed -n '1,3p' | cut -d' ' -f2-
  if grep -q '"leader_changes":0,' <<<"$out"; then
    rm -rf "$dir"
  else
    failed=1
    echo "leader changed; peer logs in $dir:"
    grep -h -e 'candidate\|leader in term\|stepping down\|took' "$dir"/peer*.log | sort | sed -n '1,40p'
  fi
}

((long > 0)) && run --spawn --clients 1024 --duration "$long"
((flood > 0)) && run --spawn --clients 256 --duration "$flood" --garbage-rate 50000
exit "$failed"
