#!/usr/bin/env bash
# Stops the peers that scripts/start-cluster.sh started: SIGTERM, up to 5 s to exit, then
# SIGKILL. With --wipe, also deletes data/ (every peer's log and vote: a cluster from scratch)
# and the configs of peers that scripts/add-peer.sh added.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# RAFT_HOME: where peers/, run/ and data/ are (default: the repository).
cd "${RAFT_HOME:-$repo}"

wipe=false
for arg in "$@"; do
    case $arg in
    --wipe) wipe=true ;;
    -h | --help)
        echo "usage: scripts/stop-cluster.sh [--wipe]"
        exit 0
        ;;
    *)
        echo "unknown argument: $arg (usage: scripts/stop-cluster.sh [--wipe])" >&2
        exit 2
        ;;
    esac
done

# True if $1 is a live process running our peer binary: not a stale pid that now belongs to
# another program, nor a zombie waiting to be reaped.
is_peer() {
    kill -0 "$1" 2>/dev/null || return 1
    command -v ps >/dev/null || return 0
    local stat comm
    read -r stat comm < <(ps -o stat= -o comm= -p "$1" 2>/dev/null) || return 1
    [[ $stat != Z* && $comm == peer* ]]
}

shopt -s nullglob
names=()
pids=()
for pidfile in run/*.pid; do
    name=$(basename "$pidfile" .pid)
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && is_peer "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        names+=("$name")
        pids+=("$pid")
        echo "stopping $name (pid $pid)"
    else
        echo "$name was not running"
        rm -f "$pidfile"
    fi
done

# SIGTERM has been sent; up to 5 s for a clean exit, then SIGKILL.
stop_all() {
    for _ in $(seq 50); do
        alive=0
        for pid in "${pids[@]}"; do
            if is_peer "$pid"; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.1
    done

    for i in "${!pids[@]}"; do
        if is_peer "${pids[$i]}"; then
            kill -KILL "${pids[$i]}" 2>/dev/null || true
            echo "${names[$i]} did not stop within 5 s; killed it"
        else
            echo "${names[$i]} stopped"
        fi
        rm -f "run/${names[$i]}.pid"
    done
}

if ((${#pids[@]} == 0)); then
    echo "no peers to stop"
else
    stop_all
fi

if $wipe; then
    rm -rf data
    echo "deleted data/"
    # Peers added by scripts/add-peer.sh belong to the cluster just wiped: a fresh one starts
    # from the configs in peers/ that bootstrap it.
    if [[ -f run/written-configs ]]; then
        while IFS= read -r config; do
            [[ -n $config ]] && rm -f "$config" && echo "deleted $config (written by scripts/add-peer.sh)"
        done <run/written-configs
    fi
    rm -f run/added-peers run/removed-peers run/written-configs
fi
