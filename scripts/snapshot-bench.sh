#!/usr/bin/env bash
# Measures what snapshots bound, on the README's three-peer cluster in a scratch RAFT_HOME:
# 1. `bench` at C appends in flight for D seconds (snapshots happen during the run), sampling
#    every peer's resident memory; then the WAL and store sizes;
# 2. a SIGKILLed and restarted follower: time until it serves again (applied = commit);
# 3. a learner added on an empty data dir: time until its applied index reaches the leader's
#    commit index, and the rate in MB/s of the snapshot records it received.
#
#   scripts/snapshot-bench.sh [CLIENTS [SECONDS]]      (defaults: 256 in flight, 60 s)
#
# Uses ports 3000-3003 and metrics 9300-9303, like scripts/start-cluster.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
clients=${1:-256}
seconds=${2:-60}
target="${CARGO_TARGET_DIR:-$repo/target}"
cargo build --release --bins --manifest-path "$repo/Cargo.toml" >&2
home=$(mktemp -d -t raft-snapshot-bench-XXXXXX)
mkdir -p "$home/peers"
cp "$repo"/peers/peer[123].json "$home/peers/"
export RAFT_HOME=$home RAFT_NO_BUILD=1
cleanup() { "$repo/scripts/stop-cluster.sh" --wipe >/dev/null 2>&1 || true; rm -rf "$home"; }
trap cleanup EXIT
"$repo/scripts/start-cluster.sh" >/dev/null
# The configs name their secret and data relative to RAFT_HOME.
cd "$home"
client() { "$target/release/client" -p peers/peer1.json "$@"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

declare -A max_rss
sample() {
    for n in 1 2 3; do
        pid=$(cat "$home/run/peer$n.pid")
        r=$(rss_kib "$pid")
        if ((r > ${max_rss[$n]:-0})); then max_rss[$n]=$r; fi
    done
}
"$target/release/bench" -p peers/peer1.json --clients "$clients" --duration "$seconds" \
    >"$home/bench.out" &
bench_pid=$!
while kill -0 "$bench_pid" 2>/dev/null; do sample; sleep 1; done
wait "$bench_pid"
tail -n 6 "$home/bench.out"
sample
for n in 1 2 3; do
    wal=$(cat "$home"/data/peer$n/wal* | wc -c)
    store=$(du -sb "$home/data/peer$n" | cut -f1)
    echo "peer$n: max RSS $((max_rss[$n] / 1024)) MiB, WAL $((wal / 1024 / 1024)) MiB, data dir $((store / 1024 / 1024)) MiB"
done

status_of() { # node id -> "applied commit snapshot"
    client --timeout-ms 100 status 2>/dev/null | python3 -c "
import json, sys
for line in sys.stdin:
    s = json.loads(line)
    if s.get('id') == $1 and s.get('applied_index') is not None:
        print(s['applied_index'], s['commit_index'], s.get('snapshot_index', 0))"
}
leader_commit() {
    client --timeout-ms 1000 status 2>/dev/null | python3 -c "
import json, sys
print(max(json.loads(l).get('commit_index') or 0 for l in sys.stdin))"
}
now_ms() { date +%s%3N; }

# A follower restarted after SIGKILL (the bench is over: the commit index stays put).
target_commit=$(leader_commit)
pid2=$(cat "$home/run/peer2.pid")
kill -9 "$pid2"
start=$(now_ms)
(cd "$home" && { nohup "$target/release/peer" -p peers/peer2.json >>run/peer2.log 2>&1 & echo $! >run/peer2.pid; })
until read -r applied commit snap < <(status_of 2) && ((applied >= target_commit)); do sleep 0.02; done
grep 'restored term' "$home/run/peer2.log" | tail -n 1 | sed 's/.*restored/restored/; s/; tick.*//'
echo "restart: peer2 serving (applied $applied >= $target_commit, snapshot at $snap) $(($(now_ms) - start)) ms after the restart began; $(grep 'log replayed' "$home/run/peer2.log" | tail -n 1 | sed 's/.*rebuilt in/replay took/')"

# A learner on an empty data dir.
target_commit=$(leader_commit)
start=$(now_ms)
"$repo/scripts/add-peer.sh" 4 --learner >/dev/null
until read -r applied commit snap < <(status_of 4) && ((applied >= target_commit)); do sleep 0.05; done
took=$(($(now_ms) - start))
records=$(cat "$home"/data/peer4/store.*/records | wc -c)
echo "learner: applied $applied >= $target_commit in $took ms; records $((records / 1024 / 1024)) MiB: $((records * 1000 / took / 1024 / 1024)) MiB/s"
