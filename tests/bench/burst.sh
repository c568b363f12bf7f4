#!/usr/bin/env bash
# The peak-hour scenario from the admission-control issue, side by side in one run:
# a backend with 4 workers x 200 ms (20 req/s, unbounded backlog like uvicorn), 200 callers at once,
# each giving up after 3 s; directly, through HAProxy (maxconn 4, maxqueue 40, timeout queue
# 1500ms), through NGINX (max_conns=4) and through Breakwater (budget 2s, concurrency 4).
# Every target gets a fresh backend and the same 8-request warm-up. Loopback only.
# The simulated backend pins each connection to one worker like uvicorn (PINNING=uvicorn, the
# default; SEED picks the accept race's seed) or lets any request use any free worker
# (PINNING=free, the model before the pinning was simulated).
#
#   cargo build --release && bash tests/bench/burst.sh [callers=200] [caller_timeout=3s]
#   PINNING=free bash tests/bench/burst.sh
# Needs haproxy and nginx-light for their columns (apt-get install haproxy nginx-light).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
CALLERS=${1:-200}
TIMEOUT=${2:-3s}
PINNING=${PINNING:-uvicorn}
SEED=${SEED:-1}
BIN=${CARGO_TARGET_DIR:-target}/release/breakwater
require_build "$BIN"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.3; rm -rf "$WORK"' EXIT
BACKEND=18301 PROXY=18302 ADMIN=18303

start_backend() {
  "$BIN" demo backend --listen "127.0.0.1:$BACKEND" --workers 4 --service-time 200ms \
    --pinning "$PINNING" --seed "$SEED" >/dev/null &
  BACKEND_PID=$!
  sleep 0.3
}
stop() { kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; sleep 0.3; }
warm() { # 8 requests, 4 at a time, like the demo
  for _ in 1 2; do
    for _ in 1 2 3 4; do curl -s -o /dev/null -XPOST -d '{"text":"warm"}' "$1" & done
    wait $(jobs -p | grep -v -e "$BACKEND_PID" -e "${PROXY_PID:-x}") 2>/dev/null || true
  done
  sleep 0.5
}
burst() { # name url
  echo "== $1"
  "$BIN" demo burst "$2" --callers "$CALLERS" --caller-timeout "$TIMEOUT" --capacity 20
}

start_backend
warm "http://127.0.0.1:$BACKEND/v1/sentiment"
burst direct "http://127.0.0.1:$BACKEND/v1/sentiment"
stop "$BACKEND_PID"

if command -v haproxy >/dev/null; then
  haproxy_cfg "  server s1 127.0.0.1:$BACKEND maxconn 4 maxqueue 40" >"$WORK/haproxy.cfg"
  start_backend
  haproxy -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 & PROXY_PID=$!
  sleep 0.5
  warm "http://127.0.0.1:$PROXY/v1/sentiment"
  burst haproxy "http://127.0.0.1:$PROXY/v1/sentiment"
  stop "$PROXY_PID" "$BACKEND_PID"
fi

if command -v nginx >/dev/null; then
  cat >"$WORK/nginx.conf" <<NGX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$BACKEND max_conns=4; keepalive 8; }
  server {
    listen 127.0.0.1:$PROXY backlog=4096;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
  start_backend
  nginx -c "$WORK/nginx.conf" -p "$WORK" & PROXY_PID=$!
  sleep 0.5
  warm "http://127.0.0.1:$PROXY/v1/sentiment"
  burst nginx "http://127.0.0.1:$PROXY/v1/sentiment"
  stop "$PROXY_PID" "$BACKEND_PID"
fi

cat >"$WORK/breakwater.yaml" <<YAML
server: { listen: "127.0.0.1:$PROXY" }
admin: { listen: "127.0.0.1:$ADMIN" }
log: { format: json, level: info }
upstreams:
  analytics:
    url: "http://127.0.0.1:$BACKEND"
    pool: { max_connections: 8, min_idle: 4 }
routes:
  - name: sentiment
    match: { path_prefix: /v1/sentiment, methods: [POST] }
    upstream: analytics
    budget: 2s
    concurrency: 4
    queue: { max_depth: 100, max_wait: 2s }
YAML
start_backend
"$BIN" --config "$WORK/breakwater.yaml" >>"$WORK/access.log" 2>&1 & PROXY_PID=$!
sleep 0.5
warm "http://127.0.0.1:$PROXY/v1/sentiment"
: >"$WORK/access.log"
burst breakwater "http://127.0.0.1:$PROXY/v1/sentiment"
stop "$PROXY_PID" "$BACKEND_PID"
# The same burst seen from inside the gateway: head arrival to answer, from the access log.
python3 - "$WORK/access.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"breakwater::access"' in l]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p * len(xs) + 0.5)) - 1))] if xs else float("nan")
for label, sel in (("refusals (503)", lambda r: r["status"] == 503), ("answers (2xx)", lambda r: 200 <= r["status"] < 300)):
    t = [r["total_ms"] for r in rows if sel(r)]
    print(f"inside breakwater, {label}: n={len(t)} p50 {pct(t, .5):.3f} ms  p99 {pct(t, .99):.3f} ms  max {max(t, default=float('nan')):.3f} ms")
reasons = {}
for r in rows:
    if r["status"] == 503:
        reasons[r.get("reason")] = reasons.get(r.get("reason"), 0) + 1
print("refusal reasons:", reasons)
PY
