#!/usr/bin/env bash
# Does `server.workers: 2` scale? NGINX with one and two worker processes and Breakwater with
# `workers: 1` and `workers: 2`, side by side in one run against the same fast backend, with the
# CPU time each proxy spent per request (all its processes or threads, user + system, from
# /proc), and how that time was split over Breakwater's threads. Loopback only; needs
# nginx-light and wrk, and a release build.
#
#   bash tests/bench/workers.sh [duration=5s] [connections=64] [rounds=2]
#   QUOTA=0.4 bash tests/bench/workers.sh 5s 64 4     # each proxy held to 0.4 cores per worker
#
# On a machine where wrk and the backend share the proxy's cores, requests/s cannot double; the
# CPU time per request staying level from one worker to two shows whether a second core would be
# used as well as the first. QUOTA (needs root: a cgroup per proxy) makes each proxy's own CPU
# the limit instead, so requests/s can show the scaling here: with c cores per worker, two
# workers have 2c to one worker's c, and wrk and the backend keep what is left.
# BASELINE=path/to/another/breakwater adds that build with `workers: 2` as a fifth column
# (before `server.workers` ran a runtime per worker, `workers: 2` was one multi-threaded runtime
# of two threads accepting on one socket).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
DUR=${1:-5s}
CONNS=${2:-64}
ROUNDS=${3:-2}
BIN=${BIN:-target/release/breakwater}
require_build "$BIN"
require_tools "nginx-light wrk" nginx wrk

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18131 NGINX1=18132 NGINX2=18133 BW1=18134 BW1_ADMIN=18135 BW2=18136 BW2_ADMIN=18137 BASE=18138 BASE_ADMIN=18139

fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"

nginx_proxy_conf "$WORK" proxy1 "$NGINX1" "$BACKEND" 1 reuseport >"$WORK/nginx1.conf"
nginx_proxy_conf "$WORK" proxy2 "$NGINX2" "$BACKEND" 2 reuseport >"$WORK/nginx2.conf"

bw_conf() { # workers port admin
  breakwater_fast_conf "$2" "$3" "$BACKEND" "$1" warn
}
bw_conf 1 "$BW1" "$BW1_ADMIN" >"$WORK/bw1.yaml"
bw_conf 2 "$BW2" "$BW2_ADMIN" >"$WORK/bw2.yaml"
bw_conf 2 "$BASE" "$BASE_ADMIN" >"$WORK/base.yaml"

nginx -c "$WORK/backend.conf" -p "$WORK" &
nginx -c "$WORK/nginx1.conf" -p "$WORK" &
NGINX1_PID=$!
nginx -c "$WORK/nginx2.conf" -p "$WORK" &
NGINX2_PID=$!
"$BIN" --config "$WORK/bw1.yaml" >/dev/null 2>&1 &
BW1_PID=$!
"$BIN" --config "$WORK/bw2.yaml" >/dev/null 2>&1 &
BW2_PID=$!
if [ -n "${BASELINE:-}" ]; then
  "$BASELINE" --config "$WORK/base.yaml" >/dev/null 2>&1 &
  BASE_PID=$!
fi
sleep 1

# QUOTA=c: each proxy gets c cores per worker of CPU time (a CFS quota on its own cgroup), so the
# proxy, not the shared cores, is what limits requests/s: one worker at c, two at 2c.
if [ -n "${QUOTA:-}" ]; then
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then CG=/sys/fs/cgroup; else CG=/sys/fs/cgroup/cpu; fi
  limit() { # name pid workers
    local dir="$CG/breakwater-bench-$1" period=100000 p
    mkdir -p "$dir"
    CGDIRS+=("$dir")
    local quota
    quota=$(awk -v c="$QUOTA" -v w="$3" -v p=$period 'BEGIN {printf "%d", c * w * p}')
    if [ -f "$dir/cpu.max" ]; then echo "$quota $period" >"$dir/cpu.max"; else
      echo "$period" >"$dir/cpu.cfs_period_us"; echo "$quota" >"$dir/cpu.cfs_quota_us"; fi
    for p in "$2" $(pgrep -P "$2" || true); do echo "$p" >"$dir/cgroup.procs"; done
  }
  CGDIRS=()
  trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; for d in "${CGDIRS[@]}"; do rmdir "$d" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
  limit nginx1 "$NGINX1_PID" 1
  limit nginx2 "$NGINX2_PID" 2
  limit bw1 "$BW1_PID" 1
  limit bw2 "$BW2_PID" 2
  if [ -n "${BASELINE:-}" ]; then limit base "$BASE_PID" 2; fi
fi

threads() { # pid: clock ticks per thread name
  for t in /proc/"$1"/task/*; do
    awk '{gsub(/[()]/, "", $2); print $2, $14 + $15}' "$t/stat"
  done | awk '{s[$1] += $2} END {for (n in s) if (s[n] > 0) printf "%s %d  ", n, s[n]}'
}

HZ=$(getconf CLK_TCK)

echo "wrk -t1 -c$CONNS -d$DUR, $ROUNDS rounds, $(nproc) cores, $(date -u +%F)${QUOTA:+, CPU quota $QUOTA cores per worker}"
for r in $(seq "$ROUNDS"); do
  echo "-- round $r"
  wrk_run nginx-1 "$NGINX1_PID" "http://127.0.0.1:$NGINX1/v1/sentiment"
  wrk_run nginx-2 "$NGINX2_PID" "http://127.0.0.1:$NGINX2/v1/sentiment"
  wrk_run bw-1 "$BW1_PID" "http://127.0.0.1:$BW1/v1/sentiment"
  wrk_run bw-2 "$BW2_PID" "http://127.0.0.1:$BW2/v1/sentiment"
  if [ -n "${BASELINE:-}" ]; then wrk_run baseline-2 "$BASE_PID" "http://127.0.0.1:$BASE/v1/sentiment"; fi
done
echo "CPU ticks per thread since start: bw-1: $(threads "$BW1_PID")"
echo "                                  bw-2: $(threads "$BW2_PID")"
echo "connections accepted per worker, bw-2: $(curl -s "http://127.0.0.1:$BW2_ADMIN/metrics" | grep '^breakwater_connections_accepted_total' | tr '\n' ' ')"
