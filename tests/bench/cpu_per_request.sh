#!/usr/bin/env bash
# CPU time a Breakwater process spends per request (user + system, every thread of it: workers
# and the log writer), read from /proc/PID/stat around each wrk run. On a shared machine this is
# steadier than requests/s (docs/benchmarks.md §6). Builds are run alternately, one worker each,
# against the same fast NGINX backend. Loopback only; needs nginx-light and wrk.
#
#   [LOGS=1] bash tests/bench/cpu_per_request.sh DURATION ROUNDS BINARY...
#
# LOGS=1 has every build write a JSON access-log line per request to a file; by default logs are
# at `warn` (no access lines).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
DUR=${1:?duration}
ROUNDS=${2:?rounds}
shift 2
[ $# -gt 0 ] || { echo "name at least one breakwater binary" >&2; exit 1; }
require_tools "nginx-light wrk" nginx wrk

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18301
fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"
nginx -c "$WORK/backend.conf" -p "$WORK" &

bins=("$@") pids=() ports=()
port=18310
for bin in "$@"; do
  breakwater_fast_conf "$port" "$((port + 1))" "$BACKEND" 1 "$([ -n "${LOGS:-}" ] && echo info || echo warn)" >"$WORK/$port.yaml"
  "$bin" --config "$WORK/$port.yaml" >"$WORK/$port.log" 2>&1 &
  pids+=($!) ports+=("$port")
  port=$((port + 10))
done
sleep 1

echo "wrk -t1 -c64 -d$DUR, $ROUNDS rounds, access logs $([ -n "${LOGS:-}" ] && echo on || echo off), $(nproc) cores, $(date -u +%F)"
for r in $(seq "$ROUNDS"); do
  echo "-- round $r"
  for i in "${!pids[@]}"; do
    cpu_line "$(basename "${bins[$i]}")" "${pids[$i]}" "http://127.0.0.1:${ports[$i]}/v1/sentiment" "$DUR"
  done
done
