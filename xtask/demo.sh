#!/usr/bin/env bash
# Both jobs of isolation on a small network of namespaces, then cleans up (namespaces,
# listeners, pins, state):
#
#   friend   192.0.2.10     --f0--+
#   stranger 203.0.113.66   --s0--+
#   it1      198.51.100.2   --i1--+-- host (router, isolation on every port)
#   it2      198.51.100.18  --i2--+
#   hr1      198.51.100.130 --h1--+
#
# The policy is the packaged example (packaging/policy.example.toml), as it is:
# 1. The host whitelist: only the admin network (the friend) and the virtual networks may
#    open connections.
# 2. Virtual-network isolation, the classic ipset recipe: HR may reach IT on tcp:80 and IT's
#    replies flow; IT cannot open to HR and gets a REJECT at once; inside IT (hairpin) all
#    passes. Then a live edit, `check`, the counters, and unload.
set -euo pipefail
BIN=${BIN:?BIN must point at isolation-user}
export ISOLATION_PIN_DIR=/sys/fs/bpf/isolation-demo ISOLATION_STATE_DIR=/run/isolation-demo
unset SSH_CONNECTION
H=iso-demo-host
NS=(iso-demo-friend iso-demo-stranger iso-demo-it1 iso-demo-it2 iso-demo-hr1)
POLICY=$(cd "$(dirname "$0")/.." && pwd)/packaging/policy.example.toml
TRACE_OUT=$(mktemp /tmp/isolation-demo-trace-XXXX.txt)
LISTENERS=()

cleanup() {
    # Listeners (and a trace) first: alive, they would hold their namespaces after the deletion.
    if [ -n "${TRACE:-}" ]; then kill "$TRACE" 2>/dev/null || true; wait "$TRACE" 2>/dev/null || true; fi
    for p in "${LISTENERS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    LISTENERS=()
    nsenter --net=/run/netns/$H "$BIN" unload >/dev/null 2>&1 || true
    for ns in $H "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -f "$TRACE_OUT"
}
trap cleanup EXIT
cleanup

nsx() { local ns=$1; shift; nsenter --net=/run/netns/$ns "$@"; }
iso() { echo "# isolation-user $*"; nsx $H "$BIN" "$@"; }
listen() { # listen NS PORT: a TCP listener, killed at cleanup
    # Not through nsx (a function: `&` would fork a subshell, and $! would be the
    # subshell's): nsenter execs nc, so $! is the listener itself.
    nsenter --net=/run/netns/$1 nc -lk "$2" >/dev/null 2>&1 &
    LISTENERS+=($!)
}
probe() { # probe LABEL NS tcp ADDR PORT | probe LABEL NS ping ADDR: how it ended
    local label=$1 ns=$2 kind=$3 addr=$4 port=${5:-} out rc t0 ms
    t0=$(date +%s%N)
    if [ "$kind" = tcp ]; then
        out=$(nsx "$ns" timeout 2 nc -zv -w1 "$addr" "$port" 2>&1) && rc=0 || rc=$?
    else
        out=$(nsx "$ns" ping -c1 -W1 "$addr" 2>&1) && rc=0 || rc=$?
    fi
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    if [ $rc -eq 0 ]; then printf '  %-46s \e[32mpasses\e[0m\n' "$label"
    elif [[ "$out" == *refused* ]]; then printf '  %-46s \e[33mREJECTED\e[0m (refused after %d ms)\n' "$label" "$ms"
    else printf '  %-46s \e[31mdropped\e[0m (no answer in %d ms)\n' "$label" "$ms"; fi
}
traffic() {
    echo " whitelist (who may reach the host):"
    probe "friend 192.0.2.10 -> host tcp:8080" iso-demo-friend tcp 192.0.2.1 8080
    probe "stranger 203.0.113.66 -> host tcp:8080" iso-demo-stranger tcp 203.0.113.65 8080
    probe "host -> stranger ping (its reply comes back)" $H ping 203.0.113.66
    echo " isolation (hr may reach it on tcp:80 only):"
    probe "hr1 -> it1 tcp:80 (and it1's replies)" iso-demo-hr1 tcp 198.51.100.2 80
    probe "hr1 -> it1 tcp:22" iso-demo-hr1 tcp 198.51.100.2 22
    probe "it1 -> hr1 tcp:80" iso-demo-it1 tcp 198.51.100.130 80
    probe "it1 -> it2 tcp:80 (same network)" iso-demo-it1 tcp 198.51.100.18 80
}

ip netns add $H; ip -n $H link set lo up
nsx $H sysctl -qw net.ipv4.ip_forward=1
spoke() { # spoke NS HOST_IF HOST_ADDR/LEN PEER_ADDR/LEN
    ip netns add "$1"; ip -n "$1" link set lo up
    ip -n $H link add "$2" type veth peer name e0 netns "$1"
    ip -n $H addr add "$3" dev "$2"; ip -n "$1" addr add "$4" dev e0
    ip -n $H link set "$2" up; ip -n "$1" link set e0 up
    ip -n "$1" route add default via "${3%/*}"
}
spoke iso-demo-friend f0 192.0.2.1/24 192.0.2.10/24
spoke iso-demo-stranger s0 203.0.113.65/26 203.0.113.66/26
spoke iso-demo-it1 i1 198.51.100.1/28 198.51.100.2/28
spoke iso-demo-it2 i2 198.51.100.17/28 198.51.100.18/28
spoke iso-demo-hr1 h1 198.51.100.129/28 198.51.100.130/28
listen $H 8080
for ns in iso-demo-it1 iso-demo-it2 iso-demo-hr1; do listen $ns 80; listen $ns 22; done
sleep 0.2


echo "== before: no filter, everything passes"
traffic
echo
echo "== load the datapath on every port of the host, with this policy"
cat "$POLICY"
echo
iso load --iface f0 --iface s0 --iface i1 --iface i2 --iface h1 --policy "$POLICY"
iso status
echo
echo "== after load"
# Every logged drop of the probes below (the stranger's SYN may be retried, so no fixed
# count): trace runs until the probes are done. nsenter execs it, so $! is trace itself.
nsenter --net=/run/netns/$H "$BIN" trace --timeout 30 > "$TRACE_OUT" &
TRACE=$!
sleep 0.3
traffic
sleep 0.3
kill $TRACE 2>/dev/null || true
wait $TRACE 2>/dev/null || true
echo
echo "# isolation-user trace   (drops and rejects, as iptables LOG lines)"
cat "$TRACE_OUT"
echo
echo "== why? the verdict the live maps give, and the rule that decides it"
iso check 198.51.100.130 198.51.100.2 --proto tcp --dport 80 || true
iso check 198.51.100.2 198.51.100.130 --proto tcp --dport 80 || true
iso check 203.0.113.66 192.0.2.1 --proto tcp --dport 8080 || true
echo
echo "== live edits: let it reach hr on tcp:80, whitelist the stranger"
iso allow it hr --port tcp:80
iso whitelist add 203.0.113.66
traffic
echo
iso stats
echo
echo "== unload: everything passes again"
iso unload
traffic
