"""The FastAPI app: routes, the API-key and body-size guard, error handlers.

    app = create_app(engine)          # engine: sgl.runtime.engine.Engine (built by the caller)
    uvicorn.run(app, host="127.0.0.1", port=30000)

`create_app` only reads the engine through its public contract; it never imports torch.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sgl.runtime.metrics import get_metrics
from sgl.runtime.server import disagg, health, lora_routes, native, openai_api, web_console
from sgl.runtime.server.errors import BodyTooLarge, error_body, install_error_handlers
from sgl.runtime.server.openapi_spec import install_openapi
from sgl.runtime.server.runner import ServerState
from sgl.runtime.server.tenancy_routes import install_tenancy

logger = logging.getLogger("sgl.server")

# Routes reachable without the API key (load balancers probe them).
# NOTE: the console page asks for the key itself; /health/ready is for probes that send none.
OPEN_PATHS = frozenset({"/health"}) | health.OPEN_PATHS | web_console.OPEN_PATHS


class GuardMiddleware:
    """`--api-key`: `Authorization: Bearer <key>` on every route but /health.
    `--max-request-bytes`: a larger body is a 400 (by Content-Length up front, or while reading)."""

    def __init__(self, app: ASGIApp, api_key: Optional[str], max_request_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_bytes = max_request_bytes

    async def _reject(self, send: Send, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope.get("path") not in OPEN_PATHS:
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                what = "missing" if not got else "invalid"
                await self._reject(send, 401, f"{what} API key: send the header 'Authorization: Bearer <api-key>'")
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send, 400, f"request body is {int(length)} bytes, over the limit of {self.max_bytes} "
                                          "(--max-request-bytes)")
            return
        seen = 0
        limit = self.max_bytes

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"request body is over the limit of {limit} bytes (--max-request-bytes)")
            return message

        await self.app(scope, counted_receive, send)


def _probe_limits(engine: Any, server_args: Any) -> tuple[Optional[int], Optional[int]]:
    """(context length, vocab size) from whatever the engine reports."""
    infos: list[dict[str, Any]] = []
    for getter in ("get_model_info", "get_server_info"):
        try:
            infos.append(getattr(engine, getter)() or {})
        except Exception as exc:
            logger.debug("%s failed: %s", getter, exc)
    ctx = None
    for info in infos:
        for key in ("context_length", "max_context_length", "context_len", "max_model_len"):
            if isinstance(info.get(key), int):
                ctx = ctx or info[key]
    ctx = ctx or getattr(server_args, "context_length", None)
    vocab = getattr(engine.tokenizer, "vocab_size", None)
    for info in infos:
        if isinstance(info.get("vocab_size"), int):
            vocab = max(vocab or 0, info["vocab_size"])
    return ctx, vocab


def create_app(engine: Any, server_args: Any = None) -> FastAPI:
    """The HTTP app serving `engine` (native SGLang API + OpenAI API)."""
    args = server_args or engine.server_args
    ctx, vocab = _probe_limits(engine, args)
    console = not getattr(args, "disable_web_console", False)
    pool = getattr(engine, "pool", None)  # several models (runtime/model_pool.py): the first one's name
    state = ServerState(engine=engine, server_args=args,
                        model_name=pool.names[0] if pool is not None else args.served_model_name or args.model_path,
                        context_length=ctx, vocab_size=vocab,
                        # NOTE: the console's TTFT/ITL percentiles need the recorders; /metrics stays off
                        metrics=get_metrics() if args.enable_metrics or console else None)
    app = FastAPI(title="sgl", version=native.version(), docs_url=None, redoc_url=None)
    app.state.sgl = state
    install_error_handlers(app)
    app.include_router(native.router)
    if getattr(server_args, "disaggregation_mode", None) is not None:
        app.include_router(disagg.router)  # /disagg/prefill, /disagg/decode
    app.include_router(openai_api.router)
    app.include_router(health.router)
    app.include_router(lora_routes.router)
    app.include_router(web_console.stats_router)
    if console:
        app.include_router(web_console.page_router)
    install_openapi(app)
    install_tenancy(app, state, OPEN_PATHS)  # --api-keys, budgets, queue depth; runs inside the guard
    # NOTE: with --api-keys the tenancy middleware checks every key (--api-key included), not the guard
    guard_key = None if getattr(args, "api_keys", None) else args.api_key
    app.add_middleware(GuardMiddleware, api_key=guard_key, max_request_bytes=args.max_request_bytes)
    origins = [o.strip() for o in (getattr(args, "cors_allow_origins", None) or "").split(",") if o.strip()]
    if origins:  # NOTE: added last = outermost, so a preflight OPTIONS is answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    return app
