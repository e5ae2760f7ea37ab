#!/usr/bin/env bash
# Restarts peer N of the running cluster without disturbing clients: if N leads, leadership
# moves to the most up-to-date other voter first (`client transfer-leader`); then N is stopped
# (SIGTERM, SIGKILL after 5 s), started again on the same data, and the script waits until it
# has caught up with the leader's commit index. A rolling restart is one call per peer:
#
#   for n in 1 2 3; do scripts/restart-peer.sh $n; done
#
# Environment: RAFT_CLIENT_CONFIG, the config the client uses (default: the first
# peers/peer*.json that is not peerN's).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# RAFT_HOME: where peers/, run/ and data/ are (default: the repository).
cd "${RAFT_HOME:-$repo}"

(($# == 1)) && [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/restart-peer.sh N" >&2; exit 1; }
n=$1
name="peer$n"
config="peers/$name.json"
target="${CARGO_TARGET_DIR:-$repo/target}"
peer="$target/release/peer"
client="$target/release/client"
[[ -f $config ]] || { echo "no $config" >&2; exit 1; }
build() { [[ -n ${RAFT_NO_BUILD:-} ]] || cargo build --release --bins --manifest-path "$repo/Cargo.toml" >&2; }
[[ -x $peer && -x $client ]] || build

shopt -s nullglob
client_config=${RAFT_CLIENT_CONFIG:-}
if [[ -z $client_config ]]; then
    for c in peers/peer*.json; do
        [[ $c == "$config" ]] || { client_config=$c; break; }
    done
fi
c() { "$client" -p "$client_config" "$@"; }
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}
# "leader commit" as the leader reports them, from `client status`.
leader_of() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        s = json.loads(line)
    except ValueError:
        continue
    if s.get("answered") and s.get("role") == "leader":
        print(s["id"], s["commit_index"])
        break
'
}

read -r leader _ < <(c status | leader_of) || leader=
if [[ $leader == "$n" ]]; then
    echo "$name leads; transferring leadership away first"
    c transfer-leader
fi

pidfile="run/$name.pid"
if [[ -f $pidfile ]] && alive "$(<"$pidfile")"; then
    pid=$(<"$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        kill -KILL "$pid" || true
        echo "$name (pid $pid) did not stop within 5 s; killed it"
    else
        echo "stopped $name (pid $pid)"
    fi
fi

log="run/$name.log"
mkdir -p run
printf '\n=== %s: %s -p %s ===\n' "$(date '+%F %T')" "$peer" "$config" >>"$log"
if command -v setsid >/dev/null; then
    setsid "$peer" -p "$config" </dev/null >>"$log" 2>&1 &
else
    nohup "$peer" -p "$config" </dev/null >>"$log" 2>&1 &
fi
echo $! >"$pidfile"
echo "started $name (pid $!)"

# Caught up: its applied index reaches the commit index the leader had a moment ago.
for _ in $(seq 100); do
    read -r _ commit < <(c status | leader_of) || commit=
    applied=$(c status | python3 -c '
import json, sys
for line in sys.stdin:
    s = json.loads(line)
    if s.get("id") == int(sys.argv[1]) and s.get("answered"):
        print(s["applied_index"])
' "$n")
    if [[ -n $commit && -n $applied ]] && ((applied >= commit)); then
        echo "$name is back and caught up (applied index $applied)"
        exit 0
    fi
    sleep 0.2
done
echo "$name did not catch up within 20 s; see $log" >&2
exit 1
