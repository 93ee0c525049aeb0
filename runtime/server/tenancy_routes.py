"""API keys, budgets and usage on the HTTP server: the admission middleware, `/v1/usage`, the hooks the
runner calls to account each request, and the budget-rejection metric.

    install_tenancy(app, state, open_paths)   # in create_app, before GuardMiddleware is added

The middleware (pure ASGI, so the tenant contextvar it sets reaches the route and its tasks):
1. with `--api-keys`: the bearer token must be one of the file's keys or `--api-key` (else 401);
2. on a generating route: the queue must be under `--max-queue-depth` (else 503), then the tenant
   under its token budget and request rate (else 429); both say `Retry-After` and generate nothing.
Usage is recorded per engine request when it ends (aborted ones too); `meta_info.cost` is added to a
finished request's output when prices are set.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any, Iterator, Optional

from fastapi import APIRouter, FastAPI, Request
from prometheus_client.core import CounterMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

from sgl.runtime.server.errors import error_body
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.protocol import RequestError
from sgl.runtime.tenancy import ApiKey, OverLimit, PromptOverLimit, Tenancy, Usage
from sgl.runtime.tenancy.tenancy import ANONYMOUS, SINGLE_KEY_TENANT

logger = logging.getLogger("sgl.server")
router = APIRouter()

GENERATE_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
_ERROR_TYPES = {429: "RateLimitError", 403: "PermissionDeniedError", 503: "ServiceUnavailable"}

current_tenant: contextvars.ContextVar[ApiKey] = contextvars.ContextVar("sgl_tenant", default=ANONYMOUS)


def _error(status: int, message: str) -> dict[str, Any]:
    body = error_body(status, message)
    body["error"]["type"] = _ERROR_TYPES.get(status, body["error"]["type"])
    return body


def queue_depth(state: Any) -> int:
    """Requests waiting to run: the scheduler's queue, or (higher while prompts are tokenized or grammars
    compile) the server's in-flight requests not yet in the running batch."""
    stats = state.engine.get_stats() or {}
    running = int(stats.get("num_running_reqs") or 0)
    return max(int(stats.get("num_queue_reqs") or 0), len(state.inflight) - running, 0)


class TenancyHooks:
    """What runner.stream_one calls, bound to the server's Tenancy (ServerState.tenancy)."""

    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy

    def prepare(self, req: Any) -> None:
        # the key's class is the default of its requests' `priority_class`; a body field wins
        if req.priority_class is None:
            req.priority_class = current_tenant.get().priority_class

    def check_prompt(self, prompt_tokens: int) -> None:
        """The current key's prompt-token caps, once the request is tokenized (runner.check_requests):
        RequestError (400) over `max_prompt_tokens`, OverLimit (429 + Retry-After) over the per-minute rate."""
        try:
            self.tenancy.admit_prompt(current_tenant.get(), prompt_tokens)
        except PromptOverLimit as exc:
            raise RequestError(str(exc)) from None

    def annotate(self, out: dict[str, Any]) -> dict[str, Any]:
        """`out` with meta_info.cost once the request finished (and prices are set)."""
        meta = out.get("meta_info") or {}
        if meta.get("finish_reason") is None or not self.tenancy.prices.enabled:
            return out
        cost = self.tenancy.cost(_usage(meta))
        return {**out, "meta_info": {**meta, "cost": cost}}

    def record(self, rid: str, last: Optional[dict[str, Any]]) -> None:
        if last is None or rid.startswith("health-"):  # the probes' tokens are the server's, not a tenant's
            return
        try:
            self.tenancy.record(current_tenant.get(), _usage(last.get("meta_info") or {}))
        except Exception as exc:  # NOTE: accounting must never fail a request that already ran
            logger.error("usage not recorded for %s: %s", rid, exc)


def _usage(meta: dict[str, Any]) -> Usage:
    return Usage(prompt_tokens=int(meta.get("prompt_tokens") or 0), cached_tokens=int(meta.get("cached_tokens") or 0),
                 completion_tokens=int(meta.get("completion_tokens") or 0))


class TenancyMiddleware:
    def __init__(self, app: ASGIApp, state: Any, open_paths: frozenset[str]) -> None:
        self.app, self.state, self.open_paths = app, state, open_paths
        self.tenancy: Tenancy = state.tenancy.tenancy
        self.max_queue_depth: Optional[int] = getattr(state.server_args, "max_queue_depth", None)

    async def _reply(self, send: Send, status: int, message: str, retry_after: Optional[str] = None) -> None:
        body = json.dumps(_error(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if retry_after is not None:
            headers.append((b"retry-after", retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _tenant(self, scope: Scope) -> Optional[ApiKey]:
        if not self.tenancy.uses_key_file:  # GuardMiddleware already checked the single --api-key
            return SINGLE_KEY_TENANT if self.tenancy.api_key else ANONYMOUS
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        return self.tenancy.authenticate(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        tenant = self._tenant(scope)
        if tenant is None:
            await self._reply(send, 401, "missing or invalid API key: send the header "
                                         "'Authorization: Bearer <api-key>' with a key from --api-keys")
            return
        if scope.get("method") == "POST" and scope.get("path") in GENERATE_PATHS:
            try:
                depth = queue_depth(self.state) if self.max_queue_depth is not None else 0
                if self.max_queue_depth is not None and depth >= self.max_queue_depth:
                    raise self.tenancy.reject_queue_full(depth, self.max_queue_depth)
                self.tenancy.admit(tenant)
            except OverLimit as exc:
                await self._reply(send, exc.status, str(exc), exc.retry_after_header)
                return
        token = current_tenant.set(tenant)
        try:
            await self.app(scope, receive, send)
        finally:
            current_tenant.reset(token)


@router.get("/v1/usage")
async def usage(request: Request, key: Optional[str] = None) -> JSONResponse:
    """Today's tokens and cost per key (admin keys only). `key`: an API key or a tenant's name."""
    tenant = current_tenant.get()
    tenancy: Tenancy = request.app.state.sgl.tenancy.tenancy
    if not tenant.admin:
        return error_response_typed(403, f"key {tenant.name!r} is not an admin key; /v1/usage needs one "
                                         "(\"admin\": true in --api-keys)")
    name = None
    if key is not None:
        found = tenancy.authenticate(key) if tenancy.uses_key_file else None
        found = found if found not in (None, SINGLE_KEY_TENANT) else tenancy.tenant_named(key)
        if found is None and key not in tenancy.ledger.all_today():
            return error_response_typed(404, "key: no such API key or key name")
        name = found.name if found is not None else key
    return JSONResponse(tenancy.usage_report(name))


def error_response_typed(status: int, message: str) -> JSONResponse:
    return JSONResponse(_error(status, message), status_code=status)


class _RejectionCollector:
    """`sgl:budget_rejections_total{reason=tokens|rate|queue_full}`, read from the Tenancy at scrape."""

    def __init__(self, tenancy: Tenancy, model_name: str) -> None:
        self.tenancy, self.model_name = tenancy, model_name

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("sgl:budget_rejections", "Requests refused before running, by reason "
                                     "(tokens: daily budget, rate: requests per minute, queue_full: 503, "
                                     "prompt_tokens: the key's prompt-token caps)",
                                     labels=["model_name", "reason"])
        for reason in ("tokens", "rate", "queue_full", "prompt_tokens"):
            family.add_metric([self.model_name, reason], float(self.tenancy.rejections.get(reason, 0)))
        yield family


_collectors: dict[int, _RejectionCollector] = {}  # id(registry) -> its collector (one per registry)


def install_tenancy(app: FastAPI, state: Any, open_paths: frozenset[str]) -> None:
    """Build the Tenancy from the server args, hook it into `state`, add the middleware and /v1/usage."""
    tenancy = Tenancy.from_args(state.server_args)
    state.tenancy = TenancyHooks(tenancy)
    app.include_router(router)
    app.add_middleware(TenancyMiddleware, state=state, open_paths=open_paths)

    @app.exception_handler(OverLimit)  # raised inside a route: the per-key prompt-token rate
    async def _over_limit(_: Request, exc: OverLimit) -> JSONResponse:
        return JSONResponse(_error(exc.status, str(exc)), status_code=exc.status,
                            headers={"Retry-After": exc.retry_after_header})
    if state.metrics is not None:
        registry = state.metrics.registry
        collector = _collectors.get(id(registry))
        if collector is None:
            collector = _collectors[id(registry)] = _RejectionCollector(tenancy, state.model_name)
            registry.register(collector)
        collector.tenancy, collector.model_name = tenancy, state.model_name  # the newest app's
    if tenancy.uses_key_file:
        logger.info("API keys: %d from %s; usage in %s (%s)", len(tenancy.keys), state.server_args.api_keys,
                    tenancy.ledger.path, tenancy.ledger.tz.key)

