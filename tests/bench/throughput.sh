#!/usr/bin/env bash
# Throughput and latency of the plain proxy path, side by side in one run:
#   direct to a fast backend, through NGINX (upstream keepalive), through Breakwater.
# Each proxy gets one worker thread. Loopback only; needs nginx-light and wrk
# (apt-get install nginx-light wrk) and a release build (cargo build --release).
#
#   bash tests/bench/throughput.sh [duration=10s] [connections=32] [rounds=3]
#
# BASELINE=path/to/another/breakwater adds that build as a fourth column, in the same run (to
# compare a change with the build before it). LOGS=1 has both proxies write an access-log line
# per request to a file (NGINX's combined format; Breakwater's JSON lines), as every deployment
# does; by default both have access logs off. FLOOR=1 adds the floor (tests/bench/floor_proxy.rs,
# built with `cargo build --release --example floor_proxy`): a bare httparse forwarder in one
# tokio worker, what a codec of our own could at best reach, and `floor-http`, the same with
# every head going through the `http` crate's types as the gateway's stages take them. Each
# line also gives the CPU time the proxy spent per request (user + system, all its threads or
# worker processes, from /proc).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
DUR=${1:-10s}
CONNS=${2:-32}
ROUNDS=${3:-3}
BIN=target/release/breakwater
require_build "$BIN"
require_tools "nginx-light wrk" nginx wrk

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18101 NGINX=18102 BW=18103 BW_ADMIN=18104 BASE=18105 BASE_ADMIN=18106 FLOOR_PORT=18107 FLOOR_HTTP_PORT=18108
FLOOR_BIN=target/release/examples/floor_proxy
[ -z "${FLOOR:-}" ] || [ -x "$FLOOR_BIN" ] || { echo "FLOOR=1 needs: cargo build --release --example floor_proxy" >&2; exit 1; }

fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"

nginx_proxy_conf "$WORK" proxy "$NGINX" "$BACKEND" 1 "" "" \
  "$([ -n "${LOGS:-}" ] && echo "access_log $WORK/nginx-access.log;")" >"$WORK/proxy.conf"

breakwater_fast_conf "$BW" "$BW_ADMIN" "$BACKEND" 1 "$([ -n "${LOGS:-}" ] && echo info || echo warn)" >"$WORK/breakwater.yaml"

nginx -c "$WORK/backend.conf" -p "$WORK" &
BACKEND_PID=$!
nginx -c "$WORK/proxy.conf" -p "$WORK" &
NGINX_PID=$!
"$BIN" --config "$WORK/breakwater.yaml" >"$WORK/bw-access.log" 2>&1 &
BW_PID=$!
if [ -n "${BASELINE:-}" ]; then
  sed -e "s/$BW_ADMIN/$BASE_ADMIN/" -e "s/$BW/$BASE/" "$WORK/breakwater.yaml" >"$WORK/baseline.yaml"
  "$BASELINE" --config "$WORK/baseline.yaml" >"$WORK/baseline-access.log" 2>&1 &
  BASE_PID=$!
fi
if [ -n "${FLOOR:-}" ]; then
  "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$BACKEND" 2>"$WORK/floor.err" &
  FLOOR_PID=$!
  "$FLOOR_BIN" "127.0.0.1:$FLOOR_HTTP_PORT" "127.0.0.1:$BACKEND" --http-types 2>"$WORK/floor-http.err" &
  FLOOR_HTTP_PID=$!
fi
sleep 1

HZ=$(getconf CLK_TCK)

echo "wrk -t1 -c$CONNS -d$DUR, $ROUNDS rounds, access logs $([ -n "${LOGS:-}" ] && echo on || echo off), $(nproc) cores, $(date -u +%F)"
for r in $(seq "$ROUNDS"); do
  echo "-- round $r"
  wrk_run direct     "$BACKEND_PID" "http://127.0.0.1:$BACKEND/v1/sentiment"
  wrk_run nginx      "$NGINX_PID" "http://127.0.0.1:$NGINX/v1/sentiment"
  wrk_run breakwater "$BW_PID" "http://127.0.0.1:$BW/v1/sentiment"
  if [ -n "${BASELINE:-}" ]; then wrk_run baseline "$BASE_PID" "http://127.0.0.1:$BASE/v1/sentiment"; fi
  if [ -n "${FLOOR:-}" ]; then
    wrk_run floor "$FLOOR_PID" "http://127.0.0.1:$FLOOR_PORT/v1/sentiment"
    wrk_run floor-http "$FLOOR_HTTP_PID" "http://127.0.0.1:$FLOOR_HTTP_PORT/v1/sentiment"
  fi
done
