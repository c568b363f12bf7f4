#!/usr/bin/env bash
# What the kernel sees per request, NGINX proxying against Breakwater (docs/benchmarks.md §14):
# TCP segments in and out and pure ACKs on loopback (`nstat`, every process on the machine: wrk,
# the backend and the proxy), the proxy's context switches, and its user and system time.
# One worker each, `wrk -t1 -c64`, the same fast NGINX backend. Loopback only; needs nginx-light
# and wrk; nothing else should be using the network meanwhile.
#
#   bash tests/bench/segments.sh DURATION ROUNDS [BINARY]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
DUR=${1:?duration}
ROUNDS=${2:?rounds}
BIN=${3:-target/release/breakwater}
require_tools "nginx-light wrk" nginx wrk
command -v nstat >/dev/null || { echo "needs nstat (iproute2)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18331 NGINX=18332 BW=18333 BW_ADMIN=18334
fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"
nginx_proxy_conf "$WORK" proxy "$NGINX" "$BACKEND" 1 >"$WORK/proxy.conf"
breakwater_fast_conf "$BW" "$BW_ADMIN" "$BACKEND" 1 warn >"$WORK/breakwater.yaml"
nginx -c "$WORK/backend.conf" -p "$WORK" &
nginx -c "$WORK/proxy.conf" -p "$WORK" &
"$BIN" --config "$WORK/breakwater.yaml" >"$WORK/breakwater.log" 2>&1 &
BW_PID=$!
sleep 1
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/proxy.pid")")
switches() { awk '/ctxt_switches/ {s += $2} END {print s}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
echo "wrk -t1 -c64 -d$DUR, $ROUNDS rounds, $(nproc) cores, $(date -u +%F); per request:"
for r in $(seq "$ROUNDS"); do
  for target in "nginx $NGINX $NGINX_WORKER" "breakwater $BW $BW_PID"; do
    read -r name port pid <<<"$target"
    wrk -t1 -c64 -d1s "http://127.0.0.1:$port/v1/sentiment" >/dev/null
    nstat -n >/dev/null
    cs0=$(switches "$pid") user0=$(ticks "$pid" user) sys0=$(ticks "$pid" sys)
    out=$(wrk -t1 -c64 -d"$DUR" "http://127.0.0.1:$port/v1/sentiment")
    cs1=$(switches "$pid") user1=$(ticks "$pid" user) sys1=$(ticks "$pid" sys)
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    nstat | awk -v name="$name" -v n="$n" -v cs=$((cs1 - cs0)) -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz="$hz" '
      $1 == "TcpInSegs" {i = $2} $1 == "TcpOutSegs" {o = $2} $1 == "TcpExtTCPPureAcks" {a = $2}
      END {printf "%-10s segments in %.2f out %.2f, pure ACKs %.3f, context switches %.3f, user %.1f us, system %.1f us\n",
        name, i / n, o / n, a / n, cs / n, u * 1e6 / hz / n, s * 1e6 / hz / n}'
  done
done
