"""The web console: the static page at `/` (playground + dashboard), its JSON feed `/v1/stats` and
`/v1/validate` (does this output satisfy that constraint?).

    app.include_router(web_console.stats_router)     # always: scripts may poll /v1/stats too
    app.include_router(web_console.page_router)      # unless --disable-web-console
    curl -s 127.0.0.1:30000/v1/stats | jq .kv

The page (runtime/server/console/: index.html, app.js, style.css; no build step, no CDN) loads without
the API key; every API call it makes (`/v1/stats`, `/v1/chat/completions`, ...) sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import regex
from fastapi import APIRouter, Request
from fastapi.responses import Response

from sgl.runtime.protocol import RequestError

from sgl.runtime.server.errors import error_response
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.server.native import read_json
from sgl.runtime.server.runner import ServerState

logger = logging.getLogger("sgl.server")

STATIC_DIR = Path(__file__).parent / "console"
# URL path -> (file in STATIC_DIR, content type). A fixed table: no path from the URL reaches the disk.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/console/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The page itself loads without the API key (it asks for the key and sends it on every API call).
OPEN_PATHS = frozenset(STATIC_FILES)

page_router = APIRouter()  # the static page: only when the console is on
stats_router = APIRouter()  # /v1/stats and /v1/validate: always

# (monotonic time, prompt tokens, prefill tokens computed, generation tokens) per /v1/stats call,
# so the rates need no background task. Rates span the samples of the last RATE_WINDOW_S seconds.
RATE_WINDOW_S = 5.0
# /v1/validate runs user-supplied patterns: bounded input, and a regex (`regex` module) time limit.
MAX_VALIDATE_CHARS = 32_768
REGEX_TIMEOUT_S = 2.0


class RateTracker:
    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=256)

    def rates(self, prompt: int, prefill: int, generation: int) -> dict[str, float]:
        now = time.monotonic()
        self.samples.append((now, prompt, prefill, generation))
        while len(self.samples) > 2 and now - self.samples[1][0] > RATE_WINDOW_S:
            self.samples.popleft()
        t0, p0, f0, g0 = self.samples[0]
        dt = now - t0
        if dt <= 0.05:
            return {"prompt_tokens_per_s": 0.0, "prefill_tokens_per_s": 0.0, "generation_tokens_per_s": 0.0}
        return {"prompt_tokens_per_s": (prompt - p0) / dt, "prefill_tokens_per_s": (prefill - f0) / dt,
                "generation_tokens_per_s": (generation - g0) / dt}


def _num(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _spec_accept_length(stats: dict[str, Any]) -> Optional[float]:
    """Mean tokens per speculative verify step of this engine (None until a drafter ran one)."""
    if not _num(stats, "spec_verify_ct"):
        return None
    value = stats.get("spec_accept_length")
    return float(value) if isinstance(value, (int, float)) else None


async def build_stats(state: ServerState, rates: RateTracker) -> dict[str, Any]:
    engine = state.engine
    stats: dict[str, Any] = dict(engine.get_stats() or {})
    kv: dict[str, Any] = {}
    getter = getattr(engine, "get_cache_stats", None)
    if getter is not None:
        try:
            kv = await asyncio.wait_for(asyncio.to_thread(getter), timeout=10)
        except Exception as exc:  # the stats page must not fail because one reading timed out
            logger.warning("get_cache_stats failed: %s", exc)
    total = kv.get("kv_total_tokens") or _num(stats, "max_total_tokens")
    recent = state.metrics.recent.percentiles() if state.metrics is not None else {}
    queue = _num(stats, "num_queue_reqs")
    return {
        "time": time.time(),
        "model": state.model_name,
        "num_running_reqs": _num(stats, "num_running_reqs"),
        "num_queue_reqs": queue,
        "num_inflight_http": len(state.inflight),
        "throughput": rates.rates(_num(stats, "prompt_tokens_total"), _num(stats, "prefill_tokens_computed"),
                                  _num(stats, "generation_tokens_total")),
        "totals": {k: _num(stats, k) for k in ("prompt_tokens_total", "cached_tokens_total",
                                               "generation_tokens_total", "prefill_tokens_computed",
                                               "num_preemptions", "jump_forward_tokens", "num_steps",
                                               "num_preemptions_swap", "num_preemptions_recompute",
                                               "swap_out_bytes", "swap_in_bytes")},
        "latency": recent,  # {"ttft": {"p50", "p90", "p99"} seconds, "itl": {...}, "window_s"}
        "kv": {"total": total, "in_use": kv.get("kv_in_use_tokens"), "cached": kv.get("kv_cached_tokens"),
               "free": kv.get("kv_free_tokens"), "token_usage": stats.get("token_usage")},
        "cache_hit_rate": stats.get("cache_hit_rate"),
        "radix": {"num_nodes": kv.get("radix_num_nodes"), "num_tokens": kv.get("radix_num_tokens"),
                  "disabled": bool(getattr(state.server_args, "disable_radix_cache", False))},
        # Hooks for later features; each stays null/empty until its engine part reports it.
        "speculative": {"algorithm": getattr(state.server_args, "speculative_algorithm", None),
                        "mean_accept_length": _spec_accept_length(stats)},
        "queues": stats.get("per_class_queues") or {"default": queue},  # waiting requests per priority class
        "host_kv": {"used": stats.get("host_kv_used_tokens"), "total": stats.get("host_kv_total_tokens")},
        "adapters": stats.get("lora_adapters") or list(getattr(state.server_args, "lora_paths", None) or []),
        "models": stats.get("models") or [state.model_name],
        "metrics_enabled": bool(getattr(state.server_args, "enable_metrics", False)),
    }


@stats_router.get("/v1/stats")
async def get_stats(request: Request) -> Response:
    app_state = request.app.state
    rates = getattr(app_state, "console_rates", None)
    if rates is None:
        rates = app_state.console_rates = RateTracker()
    return JSONResponse(await build_stats(app_state.sgl, rates))


def validate_output(kind: str, spec: str, text: str) -> dict[str, Any]:
    """Does `text` satisfy the constraint? {"valid", "error", "checked_by"}; a bad spec is a RequestError."""
    if kind == "regex":
        try:
            ok = regex.fullmatch(spec, text, flags=regex.DOTALL, timeout=REGEX_TIMEOUT_S) is not None
        except regex.error as exc:
            raise RequestError(f"spec: not a valid regex: {exc}") from None
        except TimeoutError:
            return {"valid": False, "error": f"the regex check took over {REGEX_TIMEOUT_S}s",
                    "checked_by": "regex.fullmatch"}
        return {"valid": ok, "error": None if ok else "no full match of the regex", "checked_by": "regex.fullmatch"}
    if kind == "choices":
        options = [c.strip() for c in spec.split("\n") if c.strip()]
        ok = text in options
        return {"valid": ok, "error": None if ok else f"not one of {options}", "checked_by": "choices"}
    if kind == "json_schema":
        import jsonschema  # NOTE: imported on first use: 2 MB resident in a server that never validates (lark 2.6)

        try:
            schema = json.loads(spec)
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except (json.JSONDecodeError, jsonschema.SchemaError) as exc:
            raise RequestError(f"spec: not a valid JSON schema: {str(exc).splitlines()[0]}") from None
        try:
            jsonschema.validate(json.loads(text), schema)
        except json.JSONDecodeError as exc:
            return {"valid": False, "error": f"not JSON: {exc}", "checked_by": "jsonschema"}
        except jsonschema.ValidationError as exc:
            return {"valid": False, "error": exc.message, "checked_by": "jsonschema"}
        return {"valid": True, "error": None, "checked_by": "jsonschema"}
    if kind == "ebnf":
        import lark

        try:
            parser = lark.Lark(spec)
        except lark.exceptions.LarkError as exc:
            raise RequestError(f"spec: not a Lark grammar: {str(exc).splitlines()[0]}") from None
        try:
            parser.parse(text)
        except lark.exceptions.LarkError as exc:
            return {"valid": False, "error": str(exc).splitlines()[0], "checked_by": "lark"}
        return {"valid": True, "error": None, "checked_by": "lark"}
    raise RequestError(f"kind must be one of regex, choices, json_schema, ebnf (got {kind!r})")


@stats_router.post("/v1/validate")
async def validate(request: Request) -> Response:
    """`{"kind": "regex"|"choices"|"json_schema"|"ebnf", "spec": str, "text": str}` -> is it valid?"""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object with kind, spec and text")
    for key in ("kind", "spec", "text"):
        if not isinstance(body.get(key), str):
            raise RequestError(f"{key} must be a string")
        if len(body[key]) > MAX_VALIDATE_CHARS:
            raise RequestError(f"{key} is {len(body[key])} characters, over the limit of {MAX_VALIDATE_CHARS}")
    return JSONResponse(await asyncio.to_thread(validate_output, body["kind"], body["spec"], body["text"]))


def _static(url_path: str) -> Response:
    name, media_type = STATIC_FILES[url_path]
    try:
        body = (STATIC_DIR / name).read_bytes()
    except OSError as exc:
        return error_response(500, f"web console file {name} is missing from the install: {exc}")
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


@page_router.get("/", include_in_schema=False)
async def index() -> Response:
    return _static("/")


@page_router.get("/console/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    path = f"/console/{name}"
    if path not in STATIC_FILES:
        return error_response(404, f"no web console file {name!r}")
    return _static(path)
