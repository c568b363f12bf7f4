#!/usr/bin/env bash
# Memory under steady load with nobody scraping /metrics: the gateway's RSS sampled every 5 s
# while wrk drives it. Histogram samples queue in the Prometheus recorder until something drains
# them; the recorder's own upkeep thread must keep RSS level without a scrape.
# Loopback only; needs nginx-light and wrk, and a release build.
#
#   bash tests/bench/steady_rss.sh [duration_s=60] [connections=200]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
SECS=${1:-60}
CONNS=${2:-200}
BIN=target/release/breakwater
require_build "$BIN"
require_tools "nginx-light wrk" nginx wrk

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18111 BW=18113 BW_ADMIN=18114

fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"

breakwater_fast_conf "$BW" "$BW_ADMIN" "$BACKEND" 1 info >"$WORK/breakwater.yaml"

nginx -c "$WORK/backend.conf" -p "$WORK" &
"$BIN" --config "$WORK/breakwater.yaml" >/dev/null 2>&1 &
BW_PID=$!
sleep 1
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$BW_PID/status"; }

echo "wrk -t1 -c$CONNS for ${SECS}s, access log on (to /dev/null), nobody scraping /metrics; $(nproc) cores, $(date -u +%F)"
wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:$BW/v1/sentiment" >"$WORK/wrk.out" &
WRK=$!
printf "RSS MiB:"
printf " %s" "$(rss)"
for _ in $(seq $((SECS / 5))); do
  sleep 5
  printf " %s" "$(rss)"
done
wait "$WRK" || true
echo
grep "Requests/sec" "$WORK/wrk.out"
