# Shared by the benchmark scripts (sourced, not run): the fast backend they all proxy to.

# User + system clock ticks a process has used, with its children's (NGINX's worker processes):
# read around a wrk run for the CPU time a proxy spent on it.   ticks PID [user|sys]
ticks() {
  local t=0 p field='$14 + $15'
  case "${2:-}" in user) field='$14' ;; sys) field='$15' ;; esac
  for p in "$1" $(pgrep -P "$1" || true); do
    t=$((t + $(awk "{print $field}" "/proc/$p/stat")))
  done
  echo "$t"
}

# One wrk run (-t1, CONNS connections for DUR) against URL, with the CPU time process PID (and its
# children) spent meanwhile: prints requests/s, p50, p99, CPU per request, the cores that CPU time
# kept busy, and any non-2xx count. Needs CONNS, DUR, WORK and HZ (getconf CLK_TCK) set.
#   wrk_run NAME PID URL
wrk_run() {
  local before after
  before=$(ticks "$2")
  wrk -t1 -c"$CONNS" -d"$DUR" --latency "$3" >"$WORK/wrk.out"
  after=$(ticks "$2")
  awk -v name="$1" -v cpu=$((after - before)) -v hz="$HZ" '
    /requests in/ {n=$1; secs=$4 + 0}
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
    /Non-2xx/ {bad=$NF}
    END {printf "%-12s %10s req/s   p50 %8s   p99 %8s   %5.1f us CPU/request   %4.2f cores busy%s\n", name, rps, p50, p99, cpu / hz / n * 1e6, cpu / hz / secs, bad ? "   NON-2XX: " bad : ""}' "$WORK/wrk.out"
}

# Writes an NGINX config for a backend answering every request at once with a 35-byte JSON body,
# one worker, no access log: the backend costs as little as possible, so the proxy in front is
# what is measured.   fast_backend_conf WORKDIR PORT > FILE
fast_backend_conf() {
  cat <<NGX
worker_processes 1;
pid $1/backend.pid;
error_log $1/backend.err;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$2;
    location / { default_type application/json; return 200 '{"sentiment":"neutral","score":0.5}'; }
  }
}
NGX
}

# Writes an NGINX config proxying to that backend over keep-alive connections, the way every
# comparison here runs it.   nginx_proxy_conf DIR NAME PORT BACKEND_PORT WORKERS [LISTEN] [MAIN] [SERVER] > FILE
# NAME names its pid and error-log files in DIR; LISTEN: options of the `listen` directive
# (`reuseport`); MAIN and SERVER: more directives for the main and the server context.
nginx_proxy_conf() {
  cat <<NGX
worker_processes $5;
${7:-}
pid $1/$2.pid;
error_log $1/$2.err;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$4; keepalive 64; keepalive_requests 1000000; }
  server {
    ${8:-}
    listen 127.0.0.1:$3${6:+ $6};
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
}

# Runs `wrk -t1 -c64` for DURATION against URL and prints its rate and the CPU time PID (with its
# children) spent per request, split into user and system.   cpu_line NAME PID URL DURATION
cpu_line() {
  local hz out reqs rps user0 sys0 user1 sys1
  hz=$(getconf CLK_TCK)
  user0=$(ticks "$2" user) sys0=$(ticks "$2" sys)
  out=$(wrk -t1 -c64 -d"$4" "$3")
  user1=$(ticks "$2" user) sys1=$(ticks "$2" sys)
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  awk -v name="$1" -v rps="$rps" -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz="$hz" -v n="$reqs" \
    'BEGIN {printf "%-24s %10s req/s   %6.1f us CPU per request (user %4.1f, system %4.1f)\n", name, rps, (u + s) * 1e6 / hz / n, u * 1e6 / hz / n, s * 1e6 / hz / n}'
}

# Writes a Breakwater config in front of that backend: one route for everything, a pool of 64
# with 8 kept warm, budget 10 s.   breakwater_fast_conf PORT ADMIN_PORT BACKEND_PORT WORKERS LEVEL > FILE
breakwater_fast_conf() {
  cat <<YAML
server: { listen: "127.0.0.1:$1", workers: $4 }
admin: { listen: "127.0.0.1:$2" }
log: { format: json, level: $5 }
upstreams:
  backend:
    url: "http://127.0.0.1:$3"
    pool: { max_connections: 64, min_idle: 8 }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: backend
    budget: 10s
YAML
}

# Writes an HAProxy config: one frontend on 127.0.0.1:$PROXY, one backend with the given
# `server` lines, a 1.5 s queue timeout.   haproxy_cfg "  server s1 ..." > FILE
haproxy_cfg() {
  cat <<CFG
global
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout queue 1500ms
frontend fe
  bind 127.0.0.1:$PROXY
  default_backend be
backend be
$*
CFG
}

# Stops the script unless the release build at $1 exists.
require_build() {
  [ -x "$1" ] || { echo "build first: cargo build --release" >&2; exit 1; }
}

# Stops the script unless every command after the first argument is installed; the first names
# the Debian packages that bring them.
require_tools() { # "packages" command...
  local pkgs=$1 c
  shift
  for c in "$@"; do
    command -v "$c" >/dev/null || { echo "needs: apt-get install $pkgs" >&2; exit 1; }
  done
}
