#!/usr/bin/env bash
# What a codec of our own could save, measured rather than inferred (docs/benchmarks.md §14).
# Builds the gateway at the commit codec.patch was made on, with the patch applied: three
# measuring knobs read from the environment, never meant for main.
#
#   BW_RAW=1     GETs go upstream over a bare httparse client driven in the request's own task
#                (no hyper client, no connection task; no stale-connection check, no bodies)
#   BW_BARE=1    connections are served by hyper alone, without the listener's framing guard,
#                timers or parking
#   BW_STATIC=1  every request is answered at once with the backend's 35-byte body, no upstream
#
# Then runs, builds alternating (loopback only; needs nginx-light and wrk):
#   1. CPU per request through the proxy: as built, BW_RAW, BW_BARE, both;
#   2. a fixed answer and no upstream, NGINX's worker against hyper bare and hyper behind the
#      listener: what the server side costs on its own.
#
#   bash tests/bench/spikes/codec.sh [DURATION] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
DUR=${1:-5s}
ROUNDS=${2:-6}
BASE=dd15d6c
require_tools "nginx-light wrk" nginx wrk

WORK=$(mktemp -d)
SPIKE=$WORK/spike
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; git worktree remove --force "$SPIKE" 2>/dev/null; rm -rf "$WORK"' EXIT
git worktree add --detach "$SPIKE" "$BASE" >/dev/null
git -C "$SPIKE" apply "$PWD/tests/bench/spikes/codec.patch"
# Its own target directory keeps main's build untouched; the dependencies build once.
CARGO_TARGET_DIR=${SPIKE_TARGET:-target/spike} cargo build --release --manifest-path "$SPIKE/Cargo.toml"
BIN=$(realpath "${SPIKE_TARGET:-target/spike}")/release/breakwater
for knobs in "as-built:" "raw:BW_RAW=1" "bare:BW_BARE=1" "raw+bare:BW_RAW=1 BW_BARE=1" \
  "static-bare:BW_STATIC=1 BW_BARE=1" "static:BW_STATIC=1"; do
  name=${knobs%%:*}
  printf '#!/bin/sh\n%s exec %s "$@"\n' "${knobs#*:}" "$BIN" >"$WORK/$name"
  chmod +x "$WORK/$name"
done

echo "== 1. through the proxy"
bash tests/bench/cpu_per_request.sh "$DUR" "$ROUNDS" "$WORK/as-built" "$WORK/raw" "$WORK/bare" "$WORK/raw+bare"

echo "== 2. a fixed answer, no upstream"
BACKEND=18391
fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"
nginx -c "$WORK/backend.conf" -p "$WORK" &
sleep 0.5
names=(nginx) pids=("$(cat "$WORK/backend.pid")") ports=("$BACKEND")
port=18393
for name in static-bare static; do
  breakwater_fast_conf "$port" "$((port + 1))" "$BACKEND" 1 warn >"$WORK/$port.yaml"
  "$WORK/$name" --config "$WORK/$port.yaml" >"$WORK/$port.log" 2>&1 &
  names+=("$name") pids+=($!) ports+=("$port")
  port=$((port + 10))
done
sleep 1
for r in $(seq "$ROUNDS"); do
  echo "-- round $r"
  for i in "${!pids[@]}"; do
    cpu_line "${names[$i]}" "${pids[$i]}" "http://127.0.0.1:${ports[$i]}/v1/sentiment" "$DUR"
  done
done
