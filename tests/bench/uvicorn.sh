#!/usr/bin/env bash
# Against a real FastAPI + `uvicorn --workers 4` backend (tests/e2e/app.py: 200 ms per request,
# one request at a time per worker process, so 20 req/s at best), three scenarios, each through:
#
#   direct       the 4-worker uvicorn itself
#   bw-4         Breakwater, concurrency 4 (budget 2s, queue 100 / 2s, pool 8 with 4 warm)
#   bw-auto      Breakwater, concurrency auto (the same, the limit found from latency)
#   haproxy-4    HAProxy maxconn 4 maxqueue 40, timeout queue 1500ms, in front of the 4 workers
#   ideal        four single-worker uvicorns on four ports behind HAProxy, maxconn 1 each,
#                balance leastconn (timeout queue 1500ms): one endpoint per worker
#   bw-endpoints the same four single-worker uvicorns as one Breakwater upstream with four
#                endpoints, `concurrency: 1` each (the route takes their sum; budget 2s, queue
#                100 / 2s): the recommended layout
#   bw-header-4, bw-header-auto  bw-4 and bw-auto with `worker_header: x-worker` (the app names
#                its worker process in that header) and `worker_probe: /healthz`: the pool meets
#                every worker and keeps requests on free ones
#   sim-4, sim-endpoints, sim-header-4  bw-4, bw-endpoints and bw-header-4 against the simulated
#                backend of `breakwater demo`
#                (pinned like uvicorn, seeded by the round) instead of uvicorn, to compare the
#                model with the real thing in the same run
#
# Scenarios (every caller on its own connection, each giving up after 3 s):
#   burst        200 callers at once after the 8-request warm-up     (breakwater demo burst)
#   overload     40 req/s for 10 s, open loop: 2x what the backend can do   (breakwater demo load)
#   slowdown     10 req/s for 12 s; arrivals in 3-6 s ask for ?latency_ms=3000
#   kill         (four-port targets only: ideal, bw-endpoints, sim-endpoints) 16 req/s for 14 s; the uvicorn on the second port is
#                killed at 3 s and started again at 8 s. For bw-endpoints the upstream's
#                capacity and the route's limit are sampled every 250 ms.
#
# Every (round, scenario, target) gets fresh backends and proxies, so abandoned work from one run
# never slows the next. Loopback only (127.0.0.1, ports 18400-18420); about 4 minutes a round.
#
#   cargo build --release && bash tests/bench/uvicorn.sh [rounds=2] [scenarios] [targets]
#   e.g. bash tests/bench/uvicorn.sh 1 "overload" "bw-4 ideal"
#
# Needs python3 (the venv is made like tests/e2e.rs does: $CARGO_TARGET_DIR/e2e-venv from
# tests/e2e/requirements.txt) and haproxy (apt-get install haproxy) for its two targets.
# Raw outputs go to $OUT (default: a temporary directory, printed at the end). BW_LOG=info keeps
# Breakwater's access log (JSON lines, one per request, with the refusal reasons) in
# $OUT/breakwater.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/common.sh
. tests/bench/common.sh
ROOT=$PWD
ROUNDS=${1:-2}
SCENARIOS=${2:-"burst overload slowdown"}
TARGETS=${3:-"direct bw-4 bw-auto haproxy-4 ideal bw-endpoints"}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$TARGET_DIR/release/breakwater
require_build "$BIN"
if ! command -v haproxy >/dev/null; then
  echo "haproxy is not installed (apt-get install haproxy): skipping the haproxy-4 and ideal targets" >&2
  TARGETS=$(echo "$TARGETS" | tr ' ' '\n' | grep -v -e haproxy-4 -e ideal | tr '\n' ' ')
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
GROUPS_FILE=$WORK/groups
: >"$GROUPS_FILE"
cleanup() {
  # Only what this script started: uvicorn process groups, and our own background jobs.
  while read -r g; do kill -- "-$g" 2>/dev/null || true; done <"$GROUPS_FILE"
  kill $(jobs -p) 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT
UV=18401 PROXY=18402 ADMIN=18403 UV1=18411 UV2=18412 UV3=18413 UV4=18414

# --- the Python environment, as tests/e2e.rs makes it ------------------------------------------
VENV=$TARGET_DIR/e2e-venv
if ! { [ -x "$VENV/bin/python" ] && cmp -s tests/e2e/requirements.txt "$VENV/requirements.txt"; }; then
  command -v python3 >/dev/null || { echo "needs python3 (with venv) to run uvicorn" >&2; exit 1; }
  echo "creating $VENV (first run only)"
  TMP=$TARGET_DIR/e2e-venv.tmp-$$
  rm -rf "$TMP"
  python3 -m venv "$TMP"
  "$TMP/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -r tests/e2e/requirements.txt
  cp tests/e2e/requirements.txt "$TMP/requirements.txt"
  rm -rf "$VENV"
  mv "$TMP" "$VENV"
fi
PY=$(cd "$VENV/bin" && pwd)/python

# --- processes ---------------------------------------------------------------------------------
start_uvicorn() { # port workers
  # The group's pid, by port, so one backend can be killed on its own.
  setsid env E2E_LATENCY_MS=200 PYTHONDONTWRITEBYTECODE=1 "$PY" -m uvicorn app:app \
    --app-dir "$ROOT/tests/e2e" --host 127.0.0.1 --port "$1" --workers "$2" \
    --log-level warning >>"$WORK/uvicorn-$1.log" 2>&1 &
  echo $! >>"$GROUPS_FILE"
  echo $! >"$WORK/group-$1"
}
# The simulated backend on a port, for the sim-* targets.
start_sim() { # port workers
  setsid "$BIN" demo backend --listen "127.0.0.1:$1" --workers "$2" --seed "$((ROUND * 100 + $1 % 100))" \
    >>"$WORK/sim-$1.log" 2>&1 &
  echo $! >>"$GROUPS_FILE"
  echo $! >"$WORK/group-$1"
}
start_backend() { # port workers: uvicorn, or the simulated backend for sim-* targets
  case $TARGET in sim-*) start_sim "$1" "$2" ;; *) start_uvicorn "$1" "$2" ;; esac
}
wait_backend() { # port workers
  case $TARGET in
    sim-*) for _ in $(seq 50); do curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$1/" && return 0; sleep 0.1; done ;;
    *) wait_uvicorn "$1" "$2" ;;
  esac
}
wait_uvicorn() { # port workers: until /healthz has answered from every worker (at most 20 s)
  local pids="" i
  for i in $(seq 200); do
    p=$(curl -s --max-time 1 "http://127.0.0.1:$1/healthz" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p' || true)
    [ -n "$p" ] && pids=$(printf '%s\n%s' "$pids" "$p" | sort -u)
    [ "$(echo "$pids" | grep -c .)" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "  (uvicorn on $1: only $(echo "$pids" | grep -c .) of $2 workers seen answering; going on)" >&2
}
stop_all() {
  while read -r g; do kill -- "-$g" 2>/dev/null || true; done <"$GROUPS_FILE"
  : >"$GROUPS_FILE"
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  sleep 0.5
}
warm() { # 8 requests, 4 at a time, each on its own connection (like burst.sh and the demo)
  local pids
  for _ in 1 2; do
    pids=""
    for _ in 1 2 3 4; do
      curl -s -o /dev/null --max-time 5 -XPOST -H 'content-type: application/json' -d '{"text":"warm"}' "$1" &
      pids="$pids $!"
    done
    wait $pids || true
  done
  sleep 0.5
}

breakwater_cfg() { # concurrency ("endpoints": four single-worker ports, the route unset) [worker header]
  if [ "$1" = endpoints ]; then
    upstream="    endpoints:
      - { url: \"http://127.0.0.1:$UV1\", concurrency: 1 }
      - { url: \"http://127.0.0.1:$UV2\", concurrency: 1 }
      - { url: \"http://127.0.0.1:$UV3\", concurrency: 1 }
      - { url: \"http://127.0.0.1:$UV4\", concurrency: 1 }
    pool: { max_connections: 8, min_idle: 1 }"
    concurrency=""
  else
    upstream="    url: \"http://127.0.0.1:$UV\"
    pool: { max_connections: 8, min_idle: 4 }${2:+
    worker_header: $2
    worker_probe: /healthz}"
    concurrency="    concurrency: $1"
  fi
  cat <<YAML
server: { listen: "127.0.0.1:$PROXY" }
admin: { listen: "127.0.0.1:$ADMIN" }
log: { format: json, level: ${BW_LOG:-warn} }
upstreams:
  analytics:
$upstream
routes:
  - name: sentiment
    match: { path_prefix: /v1/sentiment, methods: [POST] }
    upstream: analytics
    budget: 2s
$concurrency
    queue: { max_depth: 100, max_wait: 2s }
YAML
}

# Starts the target's backends and proxy; sets URL.
start_target() {
  case $1 in
    ideal|*endpoints)
      for p in $UV1 $UV2 $UV3 $UV4; do start_backend "$p" 1; done
      for p in $UV1 $UV2 $UV3 $UV4; do wait_backend "$p" 1; done
      ;;
    *)
      start_backend "$UV" 4
      wait_backend "$UV" 4
      ;;
  esac
  case $1 in
    direct) URL=http://127.0.0.1:$UV/v1/sentiment ;;
    bw-4|bw-auto|bw-endpoints|sim-4|sim-endpoints|bw-header-4|bw-header-auto|sim-header-4)
      case $1 in *-4) c=4 ;; *-auto) c=auto ;; *) c=endpoints ;; esac
      case $1 in *-header-*) h=x-worker ;; *) h="" ;; esac
      breakwater_cfg "$c" "$h" >"$WORK/breakwater.yaml"
      "$BIN" --config "$WORK/breakwater.yaml" >>"$OUT/breakwater.log" 2>&1 &
      URL=http://127.0.0.1:$PROXY/v1/sentiment
      ;;
    haproxy-4)
      haproxy_cfg "  server s1 127.0.0.1:$UV maxconn 4 maxqueue 40" >"$WORK/haproxy.cfg"
      haproxy -f "$WORK/haproxy.cfg" -db >>"$WORK/haproxy.log" 2>&1 &
      URL=http://127.0.0.1:$PROXY/v1/sentiment
      ;;
    ideal)
      haproxy_cfg "  balance leastconn
  server s1 127.0.0.1:$UV1 maxconn 1
  server s2 127.0.0.1:$UV2 maxconn 1
  server s3 127.0.0.1:$UV3 maxconn 1
  server s4 127.0.0.1:$UV4 maxconn 1" >"$WORK/haproxy.cfg"
      haproxy -f "$WORK/haproxy.cfg" -db >>"$WORK/haproxy.log" 2>&1 &
      URL=http://127.0.0.1:$PROXY/v1/sentiment
      ;;
  esac
  for _ in $(seq 50); do curl -s -o /dev/null --max-time 1 "${URL%/v1/sentiment}/healthz" && break; sleep 0.1; done
}

# Samples the upstream's capacity and the route's limit every 250 ms for $1 seconds.
sample_capacity() {
  local t0 i
  t0=$(date +%s.%N)
  for i in $(seq $(( $1 * 4 ))); do
    cap=$(curl -s --max-time 1 "http://127.0.0.1:$ADMIN/metrics" | sed -n 's/^breakwater_upstream_capacity{upstream="analytics"} //p')
    lim=$(curl -s --max-time 1 "http://127.0.0.1:$ADMIN/metrics" | sed -n 's/^breakwater_concurrency_limit{route="sentiment"} //p')
    printf 'capacity t=%.2f capacity=%s limit=%s\n' "$(awk "BEGIN { print $(date +%s.%N) - $t0 }")" "$cap" "$lim"
    sleep 0.25
  done
}

run_scenario() { # scenario url
  case $1 in
    kill)
      (sleep 3; g=$(cat "$WORK/group-$UV2"); echo "kill t=3 uvicorn :$UV2"; kill -KILL -- "-$g" 2>/dev/null || true
       sleep 5; echo "restart t=8 uvicorn :$UV2"; start_backend "$UV2" 1) &
      case $TARGET in *endpoints) sample_capacity 14 >"$WORK/capacity" & ;; esac
      "$BIN" demo load "$2" --rate 16 --duration 14s --caller-timeout 3s --timeline
      wait
      if [ -f "$WORK/capacity" ]; then cat "$WORK/capacity"; rm -f "$WORK/capacity"; fi
      ;;
    burst) "$BIN" demo burst "$2" --callers 200 --caller-timeout 3s --capacity 20 ;;
    overload) "$BIN" demo load "$2" --rate 40 --duration 10s --caller-timeout 3s ;;
    slowdown)
      "$BIN" demo load "$2" --rate 10 --duration 12s --caller-timeout 3s \
        --slow-from 3s --slow-to 6s --slow-latency 3s --window-from 4.5s --window-to 6s --timeline
      ;;
  esac
}

for round in $(seq "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for target in $TARGETS; do
      f=$OUT/$scenario.$target.$round.txt
      echo "== round $round, $scenario, $target   ($(uptime | sed 's/.*load average/load average/'))"
      case $scenario in kill) case $target in ideal|*endpoints) ;; *) continue ;; esac ;; esac
      TARGET=$target ROUND=$round
      start_target "$target"
      warm "$URL"
      run_scenario "$scenario" "$URL" | tee "$f"
      case $target in *-auto|*-header-*)
        curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^breakwater_(concurrency_limit|endpoint_worker)' | tee -a "$f" || true
      esac
      stop_all
    done
  done
done

# --- side by side -------------------------------------------------------------------------------
python3 - "$OUT" "$ROUNDS" "$SCENARIOS" "$TARGETS" <<'PY'
import re, sys, os
out, rounds, scenarios, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
def burst(text):
    row = lambda label: (re.search(rf"^{re.escape(label)}\s+(.*)$", text, re.M) or [None, "?"])[1].strip()
    return {"2xx": row("answered 2xx"), "503+RA": row("503 with Retry-After"),
            "503 bare": row("503 without Retry-After"), "timeouts": row("caller timeouts (your 504s)"),
            "other": row("other errors"), "max": row("latency max"),
            "refusal p50/p99": row("refusal answered in p50 / p99"), "goodput": row("goodput (share of capacity)")}
def load(text):
    m = re.search(r"^summary: (.*)$", text, re.M)
    return dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}
cols = {
    "burst": ["2xx", "503+RA", "503 bare", "timeouts", "other", "refusal p50/p99", "max", "goodput"],
    "overload": ["ok", "timeouts", "refused_retry_after", "refused_bare", "other", "refusal_p95_ms", "ok_max_ms"],
    "slowdown": ["ok", "timeouts", "refused_retry_after", "refused_bare", "window_fast_503", "window_waited_over_1s", "after_slowdown_ok", "recovered_after_s"],
    "kill": ["ok", "timeouts", "refused_retry_after", "refused_bare", "other", "refusal_p95_ms", "ok_max_ms"],
}
for s in scenarios:
    print(f"\n### {s}\n")
    print("| target | round | " + " | ".join(cols[s]) + " |")
    print("|---" * (len(cols[s]) + 2) + "|")
    for t in targets:
        for r in range(1, rounds + 1):
            p = os.path.join(out, f"{s}.{t}.{r}.txt")
            if not os.path.exists(p):
                continue
            text = open(p).read()
            d = burst(text) if s == "burst" else load(text)
            print(f"| {t} | {r} | " + " | ".join(d.get(c, "?") for c in cols[s]) + " |")
PY
echo
echo "raw outputs: $OUT"
