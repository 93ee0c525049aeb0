"""Readiness: `/health/ready` and `/health_generate` (`/health` stays the cheap liveness probe).

    GET /health/ready -> 200 {"healthy": true, "checks": {"model_loaded": {...}, "memory": {...},
                                                          "latency": {...}, "queue_depth": {...}}}
                      -> 503 with the same body when any check fails

- model_loaded: the engine's scheduler thread is running.
- memory: KV pool slots in use vs the pool, process RSS vs the memory limit (the cgroup's, else RAM);
  fails over RSS_LIMIT_FRACTION of the limit.
- latency: a 1-token greedy generation must finish within `--health-latency-deadline` (0.5 s);
  /health/ready skips it while requests are queued (the probe would only add load and wait).
  /health_generate always runs it, with SGLang's meaning: healthy when it completes (within
  GENERATE_TIMEOUT_S), its time reported; so a slow-but-working server is not taken out of rotation.
- queue_depth: requests waiting must be under `--max-queue-depth` (at it, new requests get 503).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any, Optional

from fastapi import APIRouter, Request

from sgl.runtime.protocol import GenerateRequest, SamplingParams
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.server.runner import ServerState, collect
from sgl.runtime.server.tenancy_routes import queue_depth

router = APIRouter()
OPEN_PATHS = frozenset({"/health/ready"})  # readiness probes of load balancers send no key

RSS_LIMIT_FRACTION = 0.9
GENERATE_TIMEOUT_S = 60.0  # /health_generate's deadline (SGLang's probe semantics)


def process_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_limit_bytes() -> Optional[int]:
    """The smallest of the cgroup v2 / v1 memory limit and the machine's RAM."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge v1 number = unlimited
                limits.append(int(text))
        except OSError:
            pass
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def check_model_loaded(state: ServerState) -> dict[str, Any]:
    # NOTE: Engine's `_stopped` is set by shutdown(); an engine without one (a test double) counts as up.
    stopped = getattr(state.engine, "_stopped", None)
    ok = not (stopped is not None and stopped.is_set())
    return {"ok": ok, "model": state.model_name}


def check_memory(stats: dict[str, Any]) -> dict[str, Any]:
    total = int(stats.get("max_total_tokens") or 0)
    usage = float(stats.get("token_usage") or 0.0)
    rss, limit = process_rss_bytes(), memory_limit_bytes()
    ok = rss is None or limit is None or rss < RSS_LIMIT_FRACTION * limit
    return {"ok": ok, "kv_total_tokens": total, "kv_token_usage": round(usage, 4), "rss_bytes": rss,
            "rss_limit_bytes": limit, "rss_max_fraction": RSS_LIMIT_FRACTION}


def check_queue(state: ServerState) -> dict[str, Any]:
    depth, limit = queue_depth(state), getattr(state.server_args, "max_queue_depth", None)
    return {"ok": limit is None or depth < limit, "depth": depth, "max": limit}


async def check_latency(state: ServerState, busy: bool, deadline: Optional[float] = None) -> dict[str, Any]:
    deadline = deadline or float(getattr(state.server_args, "health_latency_deadline", 0.5))
    if busy:
        return {"ok": True, "skipped": True, "reason": "requests are queued", "deadline_s": deadline}
    # NOTE: concurrent probes share one generation (a burst of probes is one request, not a burst).
    attr = f"_latency_probe_{deadline}"
    task = getattr(state, attr, None)
    if task is None or task.done():
        task = asyncio.ensure_future(_probe_latency(state, deadline))
        setattr(state, attr, task)
    return dict(await asyncio.shield(task))


async def _probe_latency(state: ServerState, deadline: float) -> dict[str, Any]:
    req = GenerateRequest(rid=f"health-{uuid.uuid4().hex}", text="Hello",
                          sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0))
    start = time.perf_counter()
    try:
        await asyncio.wait_for(collect(state, [req]), deadline)
    except asyncio.TimeoutError:
        return {"ok": False, "seconds": round(time.perf_counter() - start, 4), "deadline_s": deadline,
                "error": f"no token within the deadline of {deadline} s"}
    except Exception as exc:
        return {"ok": False, "deadline_s": deadline, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "seconds": round(time.perf_counter() - start, 4), "deadline_s": deadline}


async def readiness(state: ServerState, always_generate: bool) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {"model_loaded": check_model_loaded(state)}
    try:
        stats = state.engine.get_stats() or {}
    except Exception as exc:
        stats = {}
        checks["model_loaded"] = {**checks["model_loaded"], "ok": False, "error": f"get_stats failed: {exc}"}
    checks["memory"] = check_memory(stats)
    checks["queue_depth"] = check_queue(state)
    if checks["model_loaded"]["ok"]:
        busy = not always_generate and checks["queue_depth"]["depth"] > 0
        checks["latency"] = await check_latency(state, busy, GENERATE_TIMEOUT_S if always_generate else None)
    else:
        checks["latency"] = {"ok": False, "skipped": True, "reason": "the model is not loaded"}
    return all(c["ok"] for c in checks.values()), checks


async def _respond(request: Request, always_generate: bool) -> JSONResponse:
    healthy, checks = await readiness(request.app.state.sgl, always_generate)
    return JSONResponse({"healthy": healthy, "checks": checks}, status_code=200 if healthy else 503,
                        headers=None if healthy else {"Retry-After": "1"})


@router.get("/health/ready")
async def health_ready(request: Request) -> JSONResponse:
    return await _respond(request, always_generate=False)


@router.get("/health_generate")
async def health_generate(request: Request) -> JSONResponse:
    """SGLang's probe: always runs the 1-token generation (even while queued)."""
    return await _respond(request, always_generate=True)
