#!/usr/bin/env bash
# Removes peer N from the running cluster and stops it: `client remove N` (if N leads, it
# hands over and steps down once the new configuration commits), then waits for the removed
# peer to exit by itself (it does once it learns of its removal), SIGTERM after 10 s. Its
# config stays in peers/ and its data in data/, but scripts/start-cluster.sh skips it from
# now on (run/removed-peers); scripts/add-peer.sh N brings it back.
#
#   scripts/remove-peer.sh N
#
# Environment: RAFT_CLIENT_CONFIG, the config the client uses (default: the first
# peers/peer*.json that is not peerN's).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# RAFT_HOME: where peers/, run/ and data/ are (default: the repository).
cd "${RAFT_HOME:-$repo}"

(($# == 1)) && [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/remove-peer.sh N" >&2; exit 1; }
n=$1
name="peer$n"
target="${CARGO_TARGET_DIR:-$repo/target}"
client="$target/release/client"
build() { [[ -n ${RAFT_NO_BUILD:-} ]] || cargo build --release --bins --manifest-path "$repo/Cargo.toml" >&2; }
[[ -x $client ]] || build

shopt -s nullglob
client_config=${RAFT_CLIENT_CONFIG:-}
if [[ -z $client_config ]]; then
    for c in peers/peer*.json; do
        [[ $c == "peers/$name.json" ]] || { client_config=$c; break; }
    done
fi
[[ -n $client_config ]] || { echo "no config in peers/ to reach the cluster with" >&2; exit 1; }

"$client" -p "$client_config" remove "$n"
mkdir -p run
grep -qxF "$name" run/removed-peers 2>/dev/null || echo "$name" >>run/removed-peers

pidfile="run/$name.pid"
if [[ -f $pidfile ]]; then
    pid=$(<"$pidfile")
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]] || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then
        echo "$name (pid $pid) did not exit within 10 s of its removal; stopping it"
        kill -TERM "$pid" 2>/dev/null || true
    else
        echo "$name (pid $pid) exited"
    fi
    rm -f "$pidfile"
fi
"$client" -p "$client_config" members
