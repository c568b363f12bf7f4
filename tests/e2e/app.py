"""A small FastAPI backend for Breakwater's end-to-end tests (tests/e2e.rs) and docker/compose.yaml.

The sentiment endpoint is a *sync* function doing a blocking sleep, so it behaves like a
CPU-bound model call: FastAPI runs it in its threadpool, but with `--workers N` and the latency
dominating, throughput is bounded by the number of uvicorn workers.

Environment:
  E2E_LATENCY_MS  simulated work per request in milliseconds (default 200). A request may
                  override it with the query parameter `?latency_ms=N`.
"""

import os
import threading
import time
from typing import Optional

from fastapi import FastAPI, Header, Query
from pydantic import BaseModel

LATENCY_MS = int(os.environ.get("E2E_LATENCY_MS", "200"))

# One request at a time per worker process, like a model that is not thread-safe.
_work_lock = threading.Lock()

# How often each x-request-id reached this worker, so a test can tell a request sent twice; and
# the most requests this worker held at once (working or waiting for the work lock), so a test can
# tell requests queued inside the backend.
_seen = {}
_active = 0
_max_active = 0
_seen_lock = threading.Lock()

app = FastAPI(title="breakwater-e2e-backend")


# The one line of middleware that lets Breakwater's pool learn which worker each keep-alive
# connection reaches (`worker_header: x-worker`; docs/operations.md, "FastAPI layout").
@app.middleware("http")
async def name_the_worker(request, call_next):
    response = await call_next(request)
    response.headers["x-worker"] = str(os.getpid())
    return response

_POSITIVE = {"good", "great", "love", "excellent", "happy", "nice", "fast"}
_NEGATIVE = {"bad", "awful", "hate", "terrible", "sad", "slow", "broken"}


class SentimentIn(BaseModel):
    text: str


def _classify(text: str) -> str:
    words = {w.strip(".,!?;:").lower() for w in text.split()}
    score = len(words & _POSITIVE) - len(words & _NEGATIVE)
    if score > 0:
        return "positive"
    if score < 0:
        return "negative"
    return "neutral"


@app.post("/v1/sentiment")
def sentiment(
    body: SentimentIn,
    latency_ms: Optional[int] = Query(default=None, ge=0, le=60_000),
    x_request_id: Optional[str] = Header(default=None),
    x_breakwater_budget_ms: Optional[str] = Header(default=None),
):
    global _active, _max_active
    delay = LATENCY_MS if latency_ms is None else latency_ms
    with _seen_lock:
        if x_request_id is not None:
            _seen[x_request_id] = _seen.get(x_request_id, 0) + 1
        _active += 1
        _max_active = max(_max_active, _active)
    try:
        with _work_lock:
            time.sleep(delay / 1000.0)
    finally:
        with _seen_lock:
            _active -= 1
    try:
        budget = int(x_breakwater_budget_ms) if x_breakwater_budget_ms is not None else None
    except ValueError:
        budget = None
    return {
        "sentiment": _classify(body.text),
        "request_id": x_request_id,
        "budget_ms": budget,
    }


@app.get("/v1/seen")
def seen():
    # Per worker process: meaningful with --workers 1.
    with _seen_lock:
        return {
            "seen": dict(_seen),
            "duplicates": {k: n for k, n in _seen.items() if n > 1},
            "max_active": _max_active,
        }


@app.get("/healthz")
def healthz():
    # The worker's pid lets a test wait until every `--workers N` process is serving.
    return {"status": "ok", "pid": os.getpid()}
