#!/usr/bin/env bash
# A small network of namespaces: a host running isolation, a whitelisted friend and a
# stranger. Shows traffic allowed and denied, the counters and the trace, then cleans up.
set -euo pipefail
BIN=${BIN:?BIN must point at isolation-user}
export ISOLATION_PIN_DIR=/sys/fs/bpf/isolation-demo ISOLATION_STATE_DIR=/run/isolation-demo
unset SSH_CONNECTION
H=iso-demo-host F=iso-demo-friend S=iso-demo-stranger
POLICY=$(mktemp /tmp/isolation-demo-XXXX.toml)

cleanup() {
    # The listener first: alive, it would hold the host namespace after its deletion.
    if [ -n "${NC:-}" ]; then kill "$NC" 2>/dev/null || true; wait "$NC" 2>/dev/null || true; fi
    nsenter --net=/run/netns/$H "$BIN" unload >/dev/null 2>&1 || true
    for ns in $H $F $S; do ip netns del $ns 2>/dev/null || true; done
    rm -f "$POLICY"
}
trap cleanup EXIT
cleanup

nsx() { local ns=$1; shift; nsenter --net=/run/netns/$ns "$@"; }
iso() { echo "# isolation-user $*"; nsx $H "$BIN" "$@"; }
try() { # try LABEL NS CMD...: run CMD in NS and say whether it got through
    local label=$1 ns=$2; shift 2
    if nsx $ns timeout 2 "$@" >/dev/null 2>&1; then printf '  %-44s \e[32mok\e[0m\n' "$label"
    else printf '  %-44s \e[31mblocked\e[0m\n' "$label"; fi
}
traffic() {
    try "friend   192.0.2.10   -> host  ping"     $F ping -c1 -W1 192.0.2.1
    try "friend   192.0.2.10   -> host  tcp:8080" $F nc -z -w1 192.0.2.1 8080
    try "stranger 198.51.100.66 -> host  ping"    $S ping -c1 -W1 198.51.100.1
    try "stranger 198.51.100.66 -> host  tcp:8080" $S nc -z -w1 198.51.100.1 8080
    try "host -> stranger ping (its reply)"      $H ping -c1 -W1 198.51.100.66
}

for ns in $H $F $S; do ip netns add $ns; ip -n $ns link set lo up; done
ip -n $H link add h1 type veth peer name e0 netns $F
ip -n $H link add h2 type veth peer name e0 netns $S
ip -n $H addr add 192.0.2.1/24 dev h1;    ip -n $F addr add 192.0.2.10/24 dev e0
ip -n $H addr add 198.51.100.1/24 dev h2; ip -n $S addr add 198.51.100.66/24 dev e0
for l in "$H h1" "$H h2" "$F e0" "$S e0"; do set -- $l; ip -n $1 link set $2 up; done
# Not through nsx (a function: `&` would fork a subshell, and $! would be the subshell's):
# nsenter execs nc, so $! is the listener itself.
nsenter --net=/run/netns/$H nc -lk 8080 >/dev/null 2>&1 &
NC=$!

cat > "$POLICY" <<'TOML'
[whitelist]
enabled = true
log = true
allow = ["192.0.2.10"]
TOML

echo "== before: no filter"
traffic
echo
echo "== load the datapath with a whitelist of one address"
cat "$POLICY"
iso load --iface h1 --iface h2 --policy "$POLICY"
iso status
echo
echo "== after load"
nsx $H "$BIN" trace --count 2 --timeout 6 > /tmp/isolation-demo-trace.txt &
TRACE=$!
sleep 0.3
traffic
wait $TRACE || true
echo
echo "# isolation-user trace   (drops, as iptables LOG lines)"
cat /tmp/isolation-demo-trace.txt; rm -f /tmp/isolation-demo-trace.txt
echo
iso stats
echo
echo "== live edit: whitelist the stranger"
iso whitelist add 198.51.100.66
traffic
echo
echo "== unload"
iso unload
traffic
