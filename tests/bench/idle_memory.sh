#!/usr/bin/env bash
# Memory per idle keep-alive client connection, NGINX and Breakwater side by side: N connections
# each send one small GET and then stay open and idle; the proxy's RSS growth per connection is
# printed. One worker each, fast NGINX backend, loopback only; needs nginx-light, python3 and a
# release build.
#
#   bash tests/bench/idle_memory.sh [connections=5000]
#
# POOL sets Breakwater's upstream pool (default 64, as NGINX's `keepalive 64` here): the
# connections arrive 200 at a time, and every upstream connection a larger pool keeps idle holds
# hyper's client buffers (~27 KiB), shared by all client connections but counted in the figure.
# Breakwater's RSS is read three times: once the connections are idle, after three health checks
# on its admin port (all an idle process probed by a load balancer sees), and after 1000 requests
# on another connection (the allocator returns freed memory only when it next does some work).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
N=${1:-5000}
BIN=${BIN:-target/release/breakwater}
require_build "$BIN"
require_tools nginx-light nginx
ulimit -n $((N * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.2; rm -rf "$WORK"' EXIT
BACKEND=18121 NGINX=18122 BW=18123 BW_ADMIN=18124

fast_backend_conf "$WORK" "$BACKEND" >"$WORK/backend.conf"
cat >"$WORK/proxy.conf" <<NGX
worker_processes 1;
worker_rlimit_nofile $((N * 2 + 1000));
pid $WORK/proxy.pid;
error_log $WORK/proxy.err;
daemon off;
events { worker_connections $((N + 1000)); }
http {
  access_log off;
  keepalive_timeout 300s;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
cat >"$WORK/breakwater.yaml" <<YAML
server: { listen: "127.0.0.1:$BW", workers: 1, keepalive_timeout: 300s, max_connections: $((N + 1000)) }
admin: { listen: "127.0.0.1:$BW_ADMIN" }
log: { format: json, level: warn }
upstreams:
  backend:
    url: "http://127.0.0.1:$BACKEND"
    pool: { max_connections: ${POOL:-64}, min_idle: 8 }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: backend
    budget: 10s
    # The connections arrive 200 at a time: none of them should be refused for the memory figure.
    concurrency: 256
    queue: { max_depth: 1000 }
YAML

nginx -c "$WORK/backend.conf" -p "$WORK" &
nginx -c "$WORK/proxy.conf" -p "$WORK" &
NGINX_PID=$!
"$BIN" --config "$WORK/breakwater.yaml" >/dev/null 2>&1 &
BW_PID=$!
sleep 1
echo "$(nproc) cores, $(date -u +%F)"
printf "nginx       "; python3 tests/bench/idle_conns.py "$NGINX_PID" "$NGINX" "$N"
printf "breakwater  "; python3 tests/bench/idle_conns.py "$BW_PID" "$BW" "$N" "$BW_ADMIN"
