#!/usr/bin/env bash
# Starts a local cluster: one `peer` per config in peers/ (peer1.json, peer2.json, ...), in the
# background, with logs and pid files in run/; then waits until the peers agree on one leader.
# Stop it with scripts/stop-cluster.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# RAFT_HOME: where peers/, run/ and data/ are (default: the repository).
cd "${RAFT_HOME:-$repo}"

target="${CARGO_TARGET_DIR:-$repo/target}"
peer="$target/release/peer"
client="$target/release/client"
wait_seconds=10

shopt -s nullglob
# Peers removed with scripts/remove-peer.sh stay out; those added with scripts/add-peer.sh
# start with --join (which a data_dir that already belongs to the cluster ignores).
configs=()
for config in peers/peer*.json; do
    grep -qxF "$(basename "$config" .json)" run/removed-peers 2>/dev/null || configs+=("$config")
done
if ((${#configs[@]} == 0)); then
    echo "no configs in peers/ (expected peers/peer1.json, ...)" >&2
    exit 1
fi

# True if process $1 is running (a zombie waiting to be reaped is not).
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}

mkdir -p run
running=()
for config in "${configs[@]}"; do
    name=$(basename "$config" .json)
    pidfile="run/$name.pid"
    if [[ -f $pidfile ]]; then
        pid=$(<"$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then
            running+=("$name (pid $pid)")
        else
            rm -f "$pidfile" # left over from a peer that is gone
        fi
    fi
done
if ((${#running[@]})); then
    echo "the cluster is already running: ${running[*]}"
    echo "stop it first with scripts/stop-cluster.sh"
    exit 1
fi

# Every secret_file the configs name (the cluster secret that authenticates all datagrams):
# made if missing, as 32 random bytes in hex, readable by this user only. The peers refuse
# to start with a secret file that others can read.
secrets=$(python3 -c '
import json, sys
seen = set()
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            s = json.load(f).get("secret_file")
    except (OSError, ValueError):
        continue
    if s and s not in seen:
        seen.add(s)
        print(s)
' "${configs[@]}")
while IFS= read -r secret; do
    [[ -n $secret && ! -e $secret ]] || continue
    mkdir -p "$(dirname "$secret")"
    (
        umask 077
        key=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
        if ((${#key} != 64)); then
            echo "could not draw 32 random bytes for $secret" >&2
            exit 1
        fi
        printf '# raft cluster secret: the first key seals, a second one is also accepted (rotation)\n%s\n' "$key" >"$secret.tmp.$$"
        mv "$secret.tmp.$$" "$secret"
    )
    echo "made a new cluster secret in $secret (mode 0600); every peer and client of this cluster uses it"
done <<<"$secrets"

[[ -n ${RAFT_NO_BUILD:-} ]] || cargo build --release --bins --manifest-path "$repo/Cargo.toml"

for config in "${configs[@]}"; do
    name=$(basename "$config" .json)
    log="run/$name.log"
    args=(-p "$config")
    if grep -qxF "$name" run/added-peers 2>/dev/null; then
        args+=(--join)
    fi
    printf '\n=== %s: %s %s ===\n' "$(date '+%F %T')" "$peer" "${args[*]}" >>"$log"
    # A session of its own, when setsid exists, so a Ctrl-C in this terminal does not reach it.
    if command -v setsid >/dev/null; then
        setsid "$peer" "${args[@]}" </dev/null >>"$log" 2>&1 &
    else
        nohup "$peer" "${args[@]}" </dev/null >>"$log" 2>&1 &
    fi
    echo $! >"run/$name.pid"
    echo "started $name (pid $!) from $config"
done
echo "logs and pid files are in $(pwd)/run/"

if [[ ! -x $client ]]; then
    echo "no $client to ask for the leader; not waiting for an election"
    exit 0
fi

# Prints "peerN (node N, ADDRESS, term T)" if exactly one peer that answered says it leads.
find_leader() {
    python3 -c '
import json, sys
names = {}
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            c = json.load(f)
        names[c["node_ID"]] = c["name"]
    except (OSError, ValueError, KeyError):
        pass
leaders = []
for line in sys.stdin:
    try:
        s = json.loads(line)
    except ValueError:
        continue
    if isinstance(s, dict) and s.get("answered") and s.get("role") == "leader":
        leaders.append(s)
if len(leaders) != 1:
    sys.exit(1)
s = leaders[0]
print("%s (node %s, %s, term %s)" % (names.get(s.get("id"), "peer"), s.get("id"), s.get("address"), s.get("term")))
' "${configs[@]}"
}

echo "waiting up to ${wait_seconds} s for a leader..."
deadline=$((SECONDS + wait_seconds))
while :; do
    for config in "${configs[@]}"; do
        name=$(basename "$config" .json)
        pid=$(<"run/$name.pid")
        if ! alive "$pid"; then
            echo "$name exited during startup; the end of run/$name.log:" >&2
            tail -n 20 "run/$name.log" >&2
            scripts/stop-cluster.sh >&2 || true
            exit 1
        fi
    done
    status=$("$client" -p "${configs[0]}" --timeout-ms 1000 status 2>&1 || true)
    if leader=$(find_leader <<<"$status"); then
        echo "leader: $leader"
        break
    fi
    if ((SECONDS >= deadline)); then
        echo "no single leader after ${wait_seconds} s; the last status was:" >&2
        echo "$status" >&2
        echo "the peers are still running; see their logs in run/, stop them with scripts/stop-cluster.sh" >&2
        exit 1
    fi
    sleep 0.3
done

# Where each peer serves Prometheus metrics, if its config names a metrics_addr.
metrics=$(python3 -c '
import json, sys
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            c = json.load(f)
    except (OSError, ValueError):
        continue
    if c.get("metrics_addr"):
        print("  %s: http://%s/metrics" % (c.get("name", path), c["metrics_addr"]))
' "${configs[@]}")
if [[ -n $metrics ]]; then
    echo "Prometheus metrics (scrape these):"
    echo "$metrics"
fi

cat <<HINT

Try:
  $client -p ${configs[0]}               # the interactive menu
  $client -p ${configs[0]} append hello  # append an entry
  $client -p ${configs[0]} query         # print the committed log
  $client -p ${configs[0]} status        # every peer's role, term and leader
Stop with scripts/stop-cluster.sh (add --wipe to delete data/ as well).
HINT
