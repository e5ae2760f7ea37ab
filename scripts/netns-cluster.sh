#!/usr/bin/env bash
# A cluster whose peers each run on their own "host": one Linux network namespace per peer, each
# with its own address on a private bridge that the host also has an address on. Faults are made
# in the network itself (links taken down, packet filters), not by proxies. Needs root.
#
#   scripts/netns-cluster.sh up [N]        create N namespaces (default 3), start a peer in each
#   scripts/netns-cluster.sh cut N         take peer N's link down (both directions)
#   scripts/netns-cluster.sh cut-in N      drop what peer N receives (one-way; needs nft or iptables)
#   scripts/netns-cluster.sh cut-out N     drop what peer N sends (one-way; needs nft or iptables)
#   scripts/netns-cluster.sh split A,B,..  cut the listed peers off (a minority/majority split)
#   scripts/netns-cluster.sh heal [N]      bring peer N's link back and lift its filters (or all)
#   scripts/netns-cluster.sh kill N        kill -9 peer N;  start N: start it again on its data
#   scripts/netns-cluster.sh status        namespaces, addresses, links, peers
#   scripts/netns-cluster.sh down          stop the peers, remove every namespace, link, bridge
#
# Environment: RAFT_NETNS_PREFIX (default "raft": namespaces raft1.., bridge raftbr, links
# raftv1..), RAFT_NETNS_SUBNET (default 10.213.7: peers at .1 .. .N, the host at .254) and
# RAFT_NETNS_DIR (configs, data, logs, pid files, the cluster key; by default a fresh folder
# that `up` makes with mktemp and run/netns-PREFIX.dir remembers until `down`), so that tests
# can run a cluster of their own beside yours; RAFT_NETNS_SNAPSHOT_ENTRIES, if set, is written
# into the configs as snapshot_entries (snapshot_trailing a tenth of it).
#
# The peers run secured: `up` writes a fresh secret to cluster.key in the folder (mode 0600;
# one already there is kept) and names it in every config, so `client -p DIR/peer1.json ...`
# is the cluster's admin. RAFT_NETNS_INSECURE=1 writes configs without a key instead, with
# "insecure": true (the peers are not on loopback, so they refuse to start otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prefix="${RAFT_NETNS_PREFIX:-raft}"
subnet="${RAFT_NETNS_SUBNET:-10.213.7}"
# Which folder this prefix's cluster uses between commands, when RAFT_NETNS_DIR is not set.
dir_file="run/netns-$prefix.dir"
if [[ -n ${RAFT_NETNS_DIR:-} ]]; then
    dir=$RAFT_NETNS_DIR
elif [[ -f $dir_file ]]; then
    dir=$(cat "$dir_file")
else
    dir=""
fi
target="${CARGO_TARGET_DIR:-target}"
peer_bin="$target/release/peer"
client_bin="$target/release/client"
port=3000
bridge="${prefix}br"
host_addr="$subnet.254"
wait_seconds=15

die() {
    echo "netns-cluster: $*" >&2
    exit 1
}

ns_name() { echo "$prefix$1"; }
link_name() { echo "${prefix}v$1"; }
peer_addr() { echo "$subnet.$1"; }

# Our namespaces that exist now, by peer number, sorted.
existing_peers() {
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^${prefix}\([0-9][0-9]*\)$/\1/p" | sort -n
}

alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}

peer_pid() {
    local f="$dir/peer$1.pid"
    [[ -n $dir && -f $f ]] && cat "$f"
}

# Whether pid $1 is our peer $2: alive, and running the peer binary on this folder's config
# (a pid file may be stale, and its number reused by an unrelated process).
our_peer() {
    local pid=$1 i=$2 cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"/peer -p $dir/peer$i.json"* || $cmdline == "peer -p $dir/peer$i.json"* ]]
}

# Makes the run folder: RAFT_NETNS_DIR if given (a directory of ours, not a link), else a fresh
# one with an unpredictable name, remembered in $dir_file.
make_dir() {
    if [[ -z $dir ]]; then
        dir=$(mktemp -d "${TMPDIR:-/tmp}/raft-netns-$prefix.XXXXXXXXXX")
        mkdir -p "$(dirname "$dir_file")"
        echo "$dir" >"$dir_file"
    elif [[ -e $dir || -L $dir ]]; then
        [[ -d $dir && ! -L $dir && -O $dir ]] || die "$dir: not a directory of this user's (a link?); choose another RAFT_NETNS_DIR"
    else
        mkdir -p -m 700 "$dir"
    fi
    mkdir -p -m 700 "$dir/data"
}

# The cluster key: kept if there, else a fresh one (32 random bytes in hex, mode 0600).
make_key() {
    local key="$dir/cluster.key"
    if [[ -L $key ]] || { [[ -e $key ]] && [[ ! -f $key || ! -O $key ]]; }; then
        die "$key: not a regular file of this user's"
    fi
    if [[ ! -s $key ]]; then
        (
            umask 077
            {
                echo '# raft cluster secret (netns-cluster.sh)'
                od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
                echo
            } >"$key"
        )
    fi
    chmod 600 "$key"
}

check_root() {
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
    command -v ip >/dev/null || die "needs iproute2's ip (apt-get install iproute2)"
}

# The first packet filter that works here: nft, then iptables, or nothing.
filter_tool() {
    if command -v nft >/dev/null && nft list tables >/dev/null 2>&1; then
        echo nft
    elif command -v iptables >/dev/null && iptables -L -n >/dev/null 2>&1; then
        echo iptables
    fi
}

write_config() {
    local i=$1 n=$2 others="" j snapshot_fields="" security
    if [[ ${RAFT_NETNS_INSECURE:-} == 1 ]]; then
        security='"insecure": true,'
    else
        security="\"secret_file\": \"$(realpath -m "$dir")/cluster.key\","
    fi
    if [[ -n ${RAFT_NETNS_SNAPSHOT_ENTRIES:-} ]]; then
        snapshot_fields=$(printf '\n  "snapshot_entries": %d,\n  "snapshot_trailing": %d,' \
            "$RAFT_NETNS_SNAPSHOT_ENTRIES" "$((RAFT_NETNS_SNAPSHOT_ENTRIES / 10))")
    fi
    for ((j = 1; j <= n; j++)); do
        ((j == i)) && continue
        [[ -n $others ]] && others+=","
        others+=$(printf '\n    {"node_ID": %d, "host": "%s", "port": %d}' "$j" "$(peer_addr "$j")" "$port")
    done
    cat >"$dir/peer$i.json" <<JSON
{
  "name": "peer$i",
  "node_ID": $i,
  "host": "$(peer_addr "$i")",
  "port": $port,
  "other_peers": [$others
  ],
  "data_dir": "$(realpath -m "$dir")/data/peer$i",
  $security
  "election_timeout_ms": [150, 300],${snapshot_fields}
  "heartbeat_ms": 50
}
JSON
}

start_peer() {
    local i=$1 ns log
    ns=$(ns_name "$i")
    log="$dir/peer$i.log"
    if pid=$(peer_pid "$i") && our_peer "$pid" "$i"; then
        return 0
    fi
    printf '\n=== %s: %s -p %s (namespace %s) ===\n' "$(date '+%F %T')" "$peer_bin" "$dir/peer$i.json" "$ns" >>"$log"
    RUST_LOG="${RUST_LOG:-info}" setsid ip netns exec "$ns" "$peer_bin" -p "$dir/peer$i.json" </dev/null >>"$log" 2>&1 &
    echo $! >"$dir/peer$i.pid"
}

stop_peer() {
    local i=$1 pid ns
    if pid=$(peer_pid "$i"); then
        if our_peer "$pid" "$i"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/peer$i.pid"
    fi
    # Anything else still running inside the namespace (a peer started by hand, say).
    ns=$(ns_name "$i")
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
    fi
}

# Prints the leader's node ID if exactly one answering peer says it leads.
find_leader() {
    "$client_bin" -p "$dir/peer1.json" --timeout-ms 1000 status 2>/dev/null |
        python3 -c '
import json, sys
leaders = set()
for line in sys.stdin:
    try:
        s = json.loads(line)
    except ValueError:
        continue
    if s.get("answered") and s.get("role") == "leader":
        leaders.add(s["id"])
if len(leaders) != 1:
    sys.exit(1)
print(leaders.pop())
'
}

cmd_up() {
    local n=${1:-3} i ns link
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 9)) || die "up: N must be 1-9, not '$n'"
    check_root
    local have
    have=$(existing_peers | tr '\n' ' ')
    if [[ -n $have ]]; then
        if [[ $have != "$(seq -s ' ' 1 "$n") " ]]; then
            die "a cluster with peers ${have}is already up; run 'down' first"
        fi
        echo "namespaces ${prefix}1..${prefix}$n are already up; starting any peer that is not running"
    fi
    [[ -x $peer_bin && -x $client_bin ]] || cargo build --release --bins
    make_dir
    [[ ${RAFT_NETNS_INSECURE:-} == 1 ]] || make_key
    # If anything below fails, leave nothing half made.
    trap 'echo "netns-cluster: up failed; cleaning up" >&2; cmd_down >/dev/null 2>&1 || true' ERR

    if ! ip link show "$bridge" >/dev/null 2>&1; then
        ip link add "$bridge" type bridge
        ip addr add "$host_addr/24" dev "$bridge"
    fi
    ip link set "$bridge" up
    for ((i = 1; i <= n; i++)); do
        ns=$(ns_name "$i")
        link=$(link_name "$i")
        if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            ip netns add "$ns"
            ip link add "$link" type veth peer name eth0 netns "$ns"
            ip link set "$link" master "$bridge"
            ip link set "$link" up
            ip -n "$ns" addr add "$(peer_addr "$i")/24" dev eth0
            ip -n "$ns" link set eth0 up
            ip -n "$ns" link set lo up
        fi
        write_config "$i" "$n"
    done
    for ((i = 1; i <= n; i++)); do
        start_peer "$i"
        echo "peer$i: namespace $(ns_name "$i"), $(peer_addr "$i"):$port, log $dir/peer$i.log"
    done
    trap - ERR

    echo "waiting up to ${wait_seconds} s for a leader..."
    local deadline=$((SECONDS + wait_seconds)) leader
    while ! leader=$(find_leader); do
        for ((i = 1; i <= n; i++)); do
            pid=$(peer_pid "$i") || true
            if [[ -z $pid ]] || ! alive "$pid"; then
                echo "peer$i exited; the end of $dir/peer$i.log:" >&2
                tail -n 20 "$dir/peer$i.log" >&2
                die "up failed (the namespaces are still there: 'down' removes them)"
            fi
        done
        ((SECONDS < deadline)) || die "no leader after ${wait_seconds} s (see the logs in $dir/)"
        sleep 0.2
    done
    cat <<HINT
leader: peer$leader at $(peer_addr "$leader"):$port

Use it from the host (which is $host_addr on bridge $bridge):
  $client_bin -p $dir/peer1.json append hello
  $client_bin -p $dir/peer1.json query
  $client_bin -p $dir/peer1.json status
Faults: $0 cut N | cut-in N | cut-out N | split A,B | heal [N] | kill N | start N
Stop and remove everything: $0 down
HINT
}

cmd_down() {
    check_root
    local i
    for i in $(existing_peers); do
        stop_peer "$i"
        ip netns del "$(ns_name "$i")" 2>/dev/null || true
    done
    # Pid files of peers whose namespace is already gone: only a process that is our peer.
    if [[ -n $dir ]]; then
        for f in "$dir"/peer*.pid; do
            [[ -f $f ]] || continue
            i=${f##*/peer}
            i=${i%.pid}
            pid=$(cat "$f")
            if our_peer "$pid" "$i"; then
                kill -9 "$pid" 2>/dev/null || true
            fi
            rm -f "$f"
        done
    fi
    # Host ends of the veth pairs normally go with their namespace; remove any left over.
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${prefix}v[0-9]+$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    if [[ -z ${RAFT_NETNS_DIR:-} && -f $dir_file ]]; then
        rm -f "$dir_file"
        echo "down: the run folder $dir is kept (logs, data); remove it when done"
    fi
    echo "down: no ${prefix}* namespace, link or bridge left"
}

need_peer() {
    [[ ${1:-} =~ ^[0-9]+$ ]] || die "$2: which peer? (a number)"
    ip netns list | awk '{print $1}' | grep -qx "$(ns_name "$1")" || die "$2: no peer $1 is up"
}

cmd_cut() {
    need_peer "${1:-}" cut
    ip link set "$(link_name "$1")" down
    echo "peer$1 cut off (link $(link_name "$1") down)"
}

# One-way cut inside the peer's namespace: "in" drops what it receives, "out" what it sends.
cmd_cut_way() {
    local way=$1 i=${2:-} ns tool
    need_peer "$i" "cut-$way"
    ns=$(ns_name "$i")
    tool=$(ip netns exec "$ns" bash -c "$(declare -f filter_tool); filter_tool")
    case "$tool" in
    nft)
        ip netns exec "$ns" nft add table inet raftcut
        if [[ $way == in ]]; then
            ip netns exec "$ns" nft add chain inet raftcut input '{ type filter hook input priority 0; policy accept; }'
            ip netns exec "$ns" nft add rule inet raftcut input iifname eth0 udp dport "$port" drop
        else
            ip netns exec "$ns" nft add chain inet raftcut output '{ type filter hook output priority 0; policy accept; }'
            ip netns exec "$ns" nft add rule inet raftcut output oifname eth0 drop
        fi
        ;;
    iptables)
        if [[ $way == in ]]; then
            ip netns exec "$ns" iptables -A INPUT -i eth0 -p udp --dport "$port" -j DROP
        else
            ip netns exec "$ns" iptables -A OUTPUT -o eth0 -j DROP
        fi
        ;;
    *) die "cut-$way: no working packet filter (nft or iptables) here; use 'cut $i' to cut both ways" ;;
    esac
    echo "peer$i: one-way cut ($way) with $tool"
}

cmd_split() {
    local list=${1:-} i
    [[ -n $list ]] || die "split: which peers? (e.g. split 1 or split 4,5)"
    for i in ${list//,/ }; do
        cmd_cut "$i"
    done
}

heal_one() {
    local i=$1 ns
    ns=$(ns_name "$i")
    ip link set "$(link_name "$i")" up
    ip netns exec "$ns" nft delete table inet raftcut 2>/dev/null || true
    if command -v iptables >/dev/null; then
        ip netns exec "$ns" iptables -F 2>/dev/null || true
    fi
}

cmd_heal() {
    local i
    if [[ -n ${1:-} ]]; then
        need_peer "$1" heal
        heal_one "$1"
        echo "peer$1 healed"
    else
        for i in $(existing_peers); do heal_one "$i"; done
        echo "all links healed"
    fi
}

cmd_status() {
    local i ns link state pid run
    if [[ -z $(existing_peers) ]]; then
        echo "no ${prefix}* namespaces are up"
        return 0
    fi
    printf 'bridge %s: %s\n' "$bridge" "$(ip -o -4 addr show dev "$bridge" 2>/dev/null | awk '{print $4}')"
    printf '%-6s %-10s %-16s %-10s %-6s %s\n' peer namespace address link filter process
    for i in $(existing_peers); do
        ns=$(ns_name "$i")
        link=$(link_name "$i")
        if ip link show "$link" 2>/dev/null | grep -q '<[^>]*\bUP\b'; then state=up; else state=down; fi
        filt=none
        if ip netns exec "$ns" nft list table inet raftcut >/dev/null 2>&1; then filt=one-way; fi
        if ip netns exec "$ns" iptables -S 2>/dev/null | grep -q DROP; then filt=one-way; fi
        pid=$(peer_pid "$i" || true)
        if [[ -n $pid ]] && alive "$pid"; then run="pid $pid"; else run="not running"; fi
        printf '%-6s %-10s %-16s %-10s %-6s %s\n' "peer$i" "$ns" "$(ip -n "$ns" -o -4 addr show dev eth0 | awk '{print $4}')" "$state" "$filt" "$run"
    done
}

case "${1:-}" in
up) cmd_up "${2:-3}" ;;
down) cmd_down ;;
cut) cmd_cut "${2:-}" ;;
cut-in) cmd_cut_way in "${2:-}" ;;
cut-out) cmd_cut_way out "${2:-}" ;;
split) cmd_split "${2:-}" ;;
heal) cmd_heal "${2:-}" ;;
kill)
    need_peer "${2:-}" kill
    stop_peer "$2"
    echo "peer$2 killed"
    ;;
start)
    need_peer "${2:-}" start
    start_peer "$2"
    echo "peer$2 started"
    ;;
status) cmd_status ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 1
    ;;
esac
