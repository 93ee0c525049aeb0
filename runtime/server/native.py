"""SGLang's native HTTP API: `/generate`, health, model/server info, cache, abort, metrics.

    curl -s 127.0.0.1:30000/generate -d '{"text": "The capital of France is",
                                          "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from sgl.runtime.protocol import RequestError, normalize_generate_input
from sgl.runtime.server.errors import error_body, error_response
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.server.jsonio import dumps
from sgl.runtime.server.model_routing import route_generate, tag_output
from sgl.runtime.server.runner import ClientDisconnected, ServerState, check_requests, collect, merge_streams

logger = logging.getLogger("sgl.server")
router = APIRouter()

# 499: nginx's "client closed request"; nobody reads it, but the access log should not say 200.
CLIENT_CLOSED = 499


def get_state(request: Request) -> ServerState:
    return request.app.state.sgl


def version() -> str:
    try:
        from importlib.metadata import version as _v
        return _v("sgl")
    except Exception:
        return "0.0.0"


async def read_json(request: Request) -> Any:
    """The body as JSON; invalid UTF-8 or malformed JSON is a `RequestError` (400)."""
    raw = await request.body()
    if not raw:
        raise RequestError("request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON body: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def stream_error(exc: BaseException) -> bytes:
    status = 400 if isinstance(exc, RequestError) else 500
    if status == 500:
        logger.exception("error while streaming", exc_info=exc)
    return sse(error_body(status, str(exc) or type(exc).__name__))


async def start_stream(gen: AsyncIterator[Any]) -> tuple[list[Any], AsyncIterator[Any]]:
    """Pull the first item before the response starts, so an early `RequestError` is still a 400."""
    try:
        first = [await gen.__anext__()]
    except StopAsyncIteration:
        first = []
    except BaseException:
        await gen.aclose()
        raise
    return first, gen


@router.post("/generate")
async def generate(request: Request) -> Response:
    return await respond_generate(request, await read_json(request))


async def respond_generate(request: Request, body: Any) -> Response:
    """/generate for an already read body (also the decode side of runtime/server/disagg.py)."""
    reqs, is_batch = normalize_generate_input(body)
    state = route_generate(get_state(request), body.get("model"), reqs)
    await check_requests(state, reqs)
    if body.get("stream"):
        first, gen = await start_stream(merge_streams(state, reqs))

        async def events() -> AsyncIterator[bytes]:
            try:
                for i, out in first:
                    out = tag_output(state, out)
                    yield sse({**out, "index": i} if is_batch else out)
                async for i, out in gen:
                    out = tag_output(state, out)
                    yield sse({**out, "index": i} if is_batch else out)
            except Exception as exc:
                yield stream_error(exc)
            finally:
                await gen.aclose()
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")
    try:
        outs = await collect(state, reqs, request)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    outs = [tag_output(state, out) for out in outs]
    return JSONResponse(outs if is_batch else outs[0])


@router.get("/health")
async def health() -> Response:
    """Liveness only; /health/ready and /health_generate (runtime/server/health.py) check readiness."""
    return Response(status_code=200)


def model_info(state: ServerState) -> dict[str, Any]:
    args = state.server_args
    info: dict[str, Any] = {"model_path": args.model_path, "tokenizer_path": args.tokenizer_path or args.model_path,
                            "is_generation": True, "served_model_name": state.model_name}
    info.update(state.engine.get_model_info() or {})
    info.setdefault("served_model_name", state.model_name)
    if state.context_length is not None:
        info.setdefault("context_length", state.context_length)
    return info


@router.get("/model_info")
@router.get("/get_model_info")
async def get_model_info(request: Request) -> JSONResponse:
    return JSONResponse(model_info(get_state(request)))


@router.get("/server_info")
@router.get("/get_server_info")
async def get_server_info(request: Request) -> JSONResponse:
    state = get_state(request)
    info: dict[str, Any] = dataclasses.asdict(state.server_args)
    if info.get("api_key"):
        info["api_key"] = "***"
    info.update(state.engine.get_server_info() or {})
    info["internal_states"] = [state.engine.get_stats() or {}]
    info["version"] = version()
    return JSONResponse(info)


@router.get("/version")
@router.get("/get_version")
async def get_version() -> JSONResponse:
    return JSONResponse({"version": version()})


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    ok = get_state(request).engine.flush_cache()
    if ok is False:
        return error_response(400, "cache not flushed: requests are still running; retry when idle")
    return Response("Cache flushed.\n", status_code=200, media_type="text/plain")


@router.post("/abort_request")
async def abort_request(request: Request) -> JSONResponse:
    """`{"rid": ...}` aborts that request (and its `n` > 1 siblings `rid-j`); `{"abort_all": true}` all."""
    state = get_state(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object with rid or abort_all")
    rid, abort_all = body.get("rid"), body.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise RequestError("abort_all must be a boolean")
    if not abort_all and not isinstance(rid, str):
        raise RequestError("rid must be a string (or set abort_all)")
    if rid is not None and not isinstance(rid, str):  # found by tests/fuzz: ignored, not refused, with abort_all
        raise RequestError("rid must be a string")
    targets = list(state.inflight) if abort_all else \
        [r for r in list(state.inflight) if r == rid or r.startswith(f"{rid}-")] or [rid]
    for r in targets:
        state.engine.abort(r)
    return JSONResponse({"aborted": targets})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    if state.metrics is None or not getattr(state.server_args, "enable_metrics", True):
        return error_response(404, "metrics are disabled; start the server with --enable-metrics")
    state.metrics.update_from_stats(state.model_name, state.engine.get_stats() or {})
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/cache_evictions")
async def cache_evictions(request: Request, since: int = 0) -> JSONResponse:
    """What the prefix cache evicted since cursor `since` (as text), for a data-parallel router."""
    if since < 0:
        return error_response(400, "since: must be >= 0")
    return JSONResponse(await asyncio.to_thread(get_state(request).engine.cache_evictions, since))


@router.get("/check_integrity")
async def check_integrity(request: Request) -> JSONResponse:
    """Run the KV pool / radix tree integrity check (meaningful when idle); 500 names the leak."""
    state = get_state(request)
    try:
        await asyncio.to_thread(state.engine.check_integrity)
    except Exception as exc:
        return error_response(500, f"integrity check failed: {exc}")
    return JSONResponse({"ok": True, "stats": state.engine.get_stats() or {}})
