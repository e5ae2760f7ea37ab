#!/usr/bin/env bash
# Adds peer N to the running cluster: writes peers/peerN.json (unless it exists), starts
# `peer --join` on it (it waits, never campaigning, until the leader adds it), adds it as a
# learner (an ID the cluster removed before is added back with --rejoin when its peer starts
# over on an empty data dir), then promotes it to voter once it has caught up. Logs and pid in
# run/, like scripts/start-cluster.sh.
#
#   scripts/add-peer.sh N [--host HOST] [--port PORT] [--learner]
#
# Defaults: HOST 127.0.0.1, PORT 3000+N-1, metrics on 9300+N-1. --learner stops before the
# promotion. The peer's other_peers are the current members (its contact points: it learns
# the configuration from the leader). Environment: RAFT_CLIENT_CONFIG, the config the client
# uses to reach the cluster (default: the first peers/peer*.json that is not peerN's).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# RAFT_HOME: where peers/, run/ and data/ are (default: the repository).
cd "${RAFT_HOME:-$repo}"

usage() { echo "usage: scripts/add-peer.sh N [--host HOST] [--port PORT] [--learner]" >&2; exit 1; }
(($# >= 1)) || usage
n=$1
shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "N must be a node ID (1, 2, ...), not '$n'" >&2; exit 1; }
host=127.0.0.1
port=$((3000 + n - 1))
learner_only=false
while (($#)); do
    case $1 in
    --host) host=${2:?--host needs a value}; shift 2 ;;
    --port) port=${2:?--port needs a value}; shift 2 ;;
    --learner) learner_only=true; shift ;;
    *) usage ;;
    esac
done

target="${CARGO_TARGET_DIR:-$repo/target}"
peer="$target/release/peer"
client="$target/release/client"
name="peer$n"
config="peers/$name.json"
[[ -n ${RAFT_NO_BUILD:-} ]] || cargo build --release --bins --manifest-path "$repo/Cargo.toml" >&2

shopt -s nullglob
client_config=${RAFT_CLIENT_CONFIG:-}
if [[ -z $client_config ]]; then
    for c in peers/peer*.json; do
        [[ $c == "$config" ]] || { client_config=$c; break; }
    done
fi
[[ -n $client_config ]] || { echo "no config in peers/ to reach the cluster with" >&2; exit 1; }
c() { "$client" -p "$client_config" "$@"; }

alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}

members=$(c members) || { echo "cannot list the members through $client_config" >&2; exit 1; }

if [[ ! -f $config ]]; then
    # The secret file and cluster name are the cluster's: copy them from the client's config.
    python3 - "$client_config" "$config" "$name" "$n" "$host" "$port" "$members" <<'PY'
import json, sys
template, path, name, n, host, port, members = sys.argv[1:]
with open(template) as f:
    t = json.load(f)
others = []
for line in members.splitlines():
    m = json.loads(line)
    if m["id"] == int(n):
        continue
    h, _, p = m["address"].rpartition(":")
    others.append({"node_ID": m["id"], "host": h, "port": int(p)})
c = {"name": name, "node_ID": int(n), "host": host, "port": int(port),
     "other_peers": others, "data_dir": "data/" + name}
for key in ("election_timeout_ms", "heartbeat_ms", "secret_file", "cluster"):
    if key in t:
        c[key] = t[key]
if "metrics_addr" in t:
    c["metrics_addr"] = "127.0.0.1:%d" % (9300 + int(n) - 1)
with open(path, "w") as f:
    json.dump(c, f, indent=2)
    f.write("\n")
PY
    echo "wrote $config"
    mkdir -p run
    echo "$config" >>run/written-configs
fi
mkdir -p run
grep -qxF "$name" run/added-peers 2>/dev/null || echo "$name" >>run/added-peers
sed -i "/^$name\$/d" run/removed-peers 2>/dev/null || true

# Whether the peer starts over on an empty data dir: then its ID, if the cluster removed it
# before (say after `peer --force-new-cluster`), may be added back explicitly (--rejoin).
data_dir=$(python3 -c '
import json, os, sys
c = json.load(open(sys.argv[1]))
print(c.get("data_dir") or os.path.join("data", c["name"]))' "$config")
fresh=false
pidfile="run/$name.pid"
if [[ -f $pidfile ]] && alive "$(<"$pidfile")"; then
    echo "$name is already running (pid $(<"$pidfile"))"
else
    if [[ ! -e $data_dir ]] || [[ -z $(ls -A "$data_dir" 2>/dev/null) ]]; then
        fresh=true
    fi
    log="run/$name.log"
    printf '\n=== %s: %s -p %s --join ===\n' "$(date '+%F %T')" "$peer" "$config" >>"$log"
    if command -v setsid >/dev/null; then
        setsid "$peer" -p "$config" --join </dev/null >>"$log" 2>&1 &
    else
        nohup "$peer" -p "$config" --join </dev/null >>"$log" 2>&1 &
    fi
    echo $! >"$pidfile"
    echo "started $name (pid $!) with --join; log in $log"
fi

address="$host:$port"
rc=0
added=$(c add-learner "$n" "$address" 2>&1) || rc=$?
if ((rc != 0)) && $fresh && [[ $added == *"was removed from the cluster"* ]]; then
    echo "node $n was removed from the cluster earlier; its peer started over on an empty data dir: adding it back (add-learner --rejoin)"
    rc=0
    added=$(c add-learner "$n" "$address" --rejoin 2>&1) || rc=$?
fi
echo "$added"
((rc == 0)) || exit "$rc"
if $learner_only; then
    echo "$name is a learner; promote it with: $client -p $client_config promote $n"
    exit 0
fi
# Promotion waits (up to 60 s) for the learner to catch up.
c --timeout-ms 60000 promote "$n"
c members
