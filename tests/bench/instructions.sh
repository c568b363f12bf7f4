#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: deterministic where CPU
# time on this shared machine moves by ±10 % from round to round, so a change of 1 % in what the
# request path executes shows (docs/benchmarks.md §14). Each proxy runs under callgrind twice, idle
# and under `wrk -t1 -c64` for DURATION, against the same fast NGINX backend; the difference of the
# two totals over the requests answered is its cost per request (start-up cancels out).
# Loopback only; needs nginx-light, wrk and valgrind.
#
#   bash tests/bench/instructions.sh DURATION TARGET...
#
# TARGET: a Breakwater binary (a wrapper script must `exec` it: callgrind does not follow a
# script), `nginx` for NGINX as the proxy (one process), or `floor` / `floor-http` for
# tests/bench/floor_proxy.rs (cargo build --release --example floor_proxy).
#
# Under callgrind a proxy runs ~20× slower, so it batches fewer requests per wake-up than at full
# speed: the counts compare builds with each other, not with the CPU times elsewhere in the doc.
# Summary lines only; CALLGRIND_KEEP=DIR keeps the profiles (callgrind_annotate --inclusive=yes).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
DUR=${1:?duration}
shift
[ $# -gt 0 ] || { echo "name at least one target" >&2; exit 1; }
require_tools "nginx-light wrk valgrind" nginx wrk valgrind

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18321 PROXY=18323 ADMIN=18324
fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"
nginx -c "$WORK/backend.conf" -p "$WORK" &
# One process, so that callgrind sees the worker.
nginx_proxy_conf "$WORK" proxy "$PROXY" "$BACKEND" 1 "" "master_process off;" >"$WORK/proxy.conf"
breakwater_fast_conf "$PROXY" "$ADMIN" "$BACKEND" 1 warn >"$WORK/breakwater.yaml"
FLOOR_BIN=target/release/examples/floor_proxy

# One run under callgrind: prints "REQUESTS INSTRUCTIONS". $1: wrk duration, or 0 for idle.
measure() {
  local target=$1 dur=$2 out="$WORK/cg.out" cmd stop=INT
  case "$target" in
    nginx) cmd=(nginx -c "$WORK/proxy.conf" -p "$WORK"); stop=QUIT ;;
    floor) cmd=("$FLOOR_BIN" "127.0.0.1:$PROXY" "127.0.0.1:$BACKEND"); stop=TERM ;;
    floor-http) cmd=("$FLOOR_BIN" "127.0.0.1:$PROXY" "127.0.0.1:$BACKEND" --http-types); stop=TERM ;;
    *) cmd=("$target" --config "$WORK/breakwater.yaml") ;;
  esac
  valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" >"$WORK/proxy.log" 2>&1 &
  local pid=$! i
  # The same one request on both runs, so it cancels out too.
  for i in $(seq 150); do
    curl -s -o /dev/null "http://127.0.0.1:$PROXY/v1/sentiment" && break
    sleep 0.2
  done
  local n=0
  if [ "$dur" != 0 ]; then
    n=$(wrk -t1 -c64 -d"$dur" "http://127.0.0.1:$PROXY/v1/sentiment" | awk '/requests in/ {print $1}')
  fi
  kill -"$stop" "$pid"
  wait "$pid" 2>/dev/null || true
  [ -n "${CALLGRIND_KEEP:-}" ] && [ "$dur" != 0 ] && mkdir -p "$CALLGRIND_KEEP" &&
    cp "$out" "$CALLGRIND_KEEP/$(basename "$target").callgrind"
  echo "$n $(awk '/^(summary|totals):/ {print $2; exit}' "$out")"
}

echo "instructions per request (user space), wrk -t1 -c64 -d$DUR under callgrind, $(date -u +%F)"
for target in "$@"; do
  read -r _ idle < <(measure "$target" 0)
  read -r n loaded < <(measure "$target" "$DUR")
  awk -v name="$(basename "$target")" -v n="$n" -v d=$((loaded - idle)) \
    'BEGIN {printf "%-24s %8.0f instructions per request (%d requests)\n", name, d / n, n}'
done
