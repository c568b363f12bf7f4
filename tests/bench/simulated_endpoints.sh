#!/usr/bin/env bash
# The 2x sustained overload of tests/bench/uvicorn.sh (40 req/s for 10 s, caller timeout 3 s,
# budget 2 s) against the simulated backend of `breakwater demo` instead of real uvicorn: one
# pinned 4-worker port with `concurrency: 4`, beside four single-worker backends as endpoints with
# `concurrency: 1` each. Loopback only (ports 18601-18614), under a minute per seed.
#
#   cargo build --release && bash tests/bench/simulated_endpoints.sh [seeds="1 2"]
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${CARGO_TARGET_DIR:-target}/release/breakwater
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for seed in ${1:-1 2}; do
for layout in port endpoints; do
  pids=""
  if [ $layout = port ]; then
    $B demo backend --listen 127.0.0.1:18601 --workers 4 --seed $seed >/dev/null 2>&1 & pids="$pids $!"
    up='    url: "http://127.0.0.1:18601"
    pool: { max_connections: 8, min_idle: 4 }'; conc="    concurrency: 4"
  else
    for i in 1 2 3 4; do $B demo backend --listen 127.0.0.1:1861$i --workers 1 --seed $((seed*10+i)) >/dev/null 2>&1 & pids="$pids $!"; done
    up='    endpoints:
      - { url: "http://127.0.0.1:18611", concurrency: 1 }
      - { url: "http://127.0.0.1:18612", concurrency: 1 }
      - { url: "http://127.0.0.1:18613", concurrency: 1 }
      - { url: "http://127.0.0.1:18614", concurrency: 1 }
    pool: { max_connections: 8, min_idle: 1 }'; conc=""
  fi
  cat > "$WORK/sim.yaml" <<YAML
server: { listen: "127.0.0.1:18602" }
admin: { listen: "127.0.0.1:18603" }
log: { format: json, level: warn }
upstreams:
  analytics:
$up
routes:
  - name: sentiment
    match: { path_prefix: /v1/sentiment, methods: [POST] }
    upstream: analytics
    budget: 2s
$conc
    queue: { max_depth: 100, max_wait: 2s }
YAML
  $B --config "$WORK/sim.yaml" >/dev/null 2>&1 & pids="$pids $!"; sleep 1
  for i in 1 2; do c=""; for j in 1 2 3 4; do curl -s -o /dev/null --max-time 5 -XPOST -H 'content-type: application/json' -d '{"text":"w"}' http://127.0.0.1:18602/v1/sentiment & c="$c $!"; done; wait $c; done
  sleep 0.5
  echo "seed $seed $layout: $($B demo load http://127.0.0.1:18602/v1/sentiment --rate 40 --duration 10s --caller-timeout 3s | grep summary)"
  kill $pids; sleep 0.5
done; done
