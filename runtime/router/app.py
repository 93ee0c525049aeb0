"""The router's HTTP front (FastAPI): proxies the native and OpenAI routes to the chosen worker.

    app = create_router_app(RouterArgs(worker_urls=["http://127.0.0.1:30001", "http://127.0.0.1:30002"]))

Routed (one worker, by the policy): POST /generate, /v1/completions, /v1/chat/completions (streaming
SSE or not). /abort_request goes to the worker that has the rid (to all when unknown), /flush_cache
to all; /server_info and /check_integrity aggregate all workers; /metrics is the router's own;
any other path goes to one healthy worker. A worker failing mid-request gives a 502 in our error
shape (mid-stream: a `data: {"error": ...}` event, then `[DONE]`); no healthy worker gives a 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sgl.runtime.router.config import RouterArgs
from sgl.runtime.router.policy import make_policy
from sgl.runtime.router.workers import WorkerPool
from sgl.runtime.server.errors import error_body, error_response

logger = logging.getLogger("sgl.router")
T = TypeVar("T")
_FORWARD_HEADERS = ("authorization", "content-type", "accept")
_RETURN_HEADERS = ("content-type", "retry-after")


class WorkerGone(Exception):
    """The worker died or was taken out while serving the request."""


def prompt_text(path: str, body: Any) -> str:
    """The text the cache-aware tree keys on: the prompt (first of a batch), or chat messages joined."""
    if not isinstance(body, dict):
        return ""
    if path == "/v1/chat/completions":
        parts = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, list):  # content parts
                    c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                parts.append(f"<{m.get('role')}>{c if isinstance(c, str) else ''}")
        return "".join(parts)
    value = body.get("prompt") if path == "/v1/completions" else body.get("text", body.get("input_ids"))
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, list):  # token ids: one char-like field per id
        return "".join(f"{t}," for t in value)
    return value if isinstance(value, str) else ""


class Router:
    def __init__(self, args: RouterArgs) -> None:
        self.args = args
        self.policy = make_policy(args.policy, args.balance_threshold, args.cache_threshold, args.max_tree_chars)
        self.pool = WorkerPool(list(args.worker_urls), on_down=self.policy.remove_worker,
                               failures=args.health_failures)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64))
        self.rids: dict[str, str] = {}  # rid of an in-flight request -> its worker
        self.decisions: collections.Counter[str] = collections.Counter()
        # Eviction events: per worker the next cursor of its /cache_evictions and the monotonic time of
        # the previous poll (entries routed since then may be cached again: an event does not drop them).
        start = time.monotonic()
        self.eviction_cursor: dict[str, int] = {u: 0 for u in args.worker_urls}
        self.last_poll: dict[str, float] = {u: start for u in args.worker_urls}
        self.eviction_events: collections.Counter[str] = collections.Counter()
        self.eviction_polls: collections.Counter[str] = collections.Counter()  # answered polls per worker
        self.no_eviction_route: set[str] = set()  # workers without /cache_evictions (e.g. SGLang's)

    def choose(self, text: str) -> Optional[str]:
        healthy = self.pool.healthy()
        if not healthy:
            return None
        worker, decision = self.policy.choose(healthy, text, self.pool.loads())
        self.decisions[decision] += 1
        self.policy.on_routed(worker, text)
        return worker

    async def poll_evictions(self, timeout: float) -> None:
        """Fetch each healthy worker's cache evictions since the last poll and forget them in the tree."""
        auth = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}

        async def one(url: str) -> None:
            now = time.monotonic()
            try:
                r = await self.client.get(url + "/cache_evictions", params={"since": self.eviction_cursor[url]},
                                          headers=auth, timeout=timeout)
            except httpx.HTTPError:
                return  # the health probe judges the worker
            if r.status_code == 404:
                self.no_eviction_route.add(url)
                return
            if r.status_code != 200:
                return
            try:
                body = r.json()
                events = [(str(e["text"]), int(e["kept"])) for e in body.get("events", [])]
                cursor, lost = int(body["cursor"]), int(body.get("lost", 0))
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning("worker %s: malformed /cache_evictions answer; not polled any more", url)
                self.no_eviction_route.add(url)
                return
            for text, kept in events:
                self.policy.on_evicted(url, text, kept, self.last_poll[url])
            self.eviction_events[url] += len(events) + lost
            self.eviction_cursor[url] = cursor
            self.last_poll[url] = now
            self.eviction_polls[url] += 1
        if self.policy.name == "cache_aware":
            await asyncio.gather(*(one(u) for u in self.pool.healthy() if u not in self.no_eviction_route))

    async def watch(self, interval: float) -> None:
        """Health probes, then eviction polls, every `interval` seconds."""
        while True:
            await self.pool.probe_once(self.client, timeout=max(2.0, interval))
            await self.poll_evictions(timeout=max(2.0, interval))
            await asyncio.sleep(interval)

    async def race(self, url: str, aw: Awaitable[T]) -> T:
        """Await `aw` unless the worker is taken out first (then WorkerGone)."""
        task = asyncio.ensure_future(aw)
        down = asyncio.ensure_future(self.pool.workers[url].down.wait())
        try:
            await asyncio.wait({task, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
        if not task.done():
            task.cancel()
            raise WorkerGone(f"worker {url} was taken out (failed health checks)")
        try:
            return task.result()
        except httpx.TransportError as exc:
            self.pool.mark_down(url, f"{type(exc).__name__}: {exc}")
            raise WorkerGone(f"worker {url} failed: {type(exc).__name__}: {exc}") from exc


def _headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}


def _passthrough(r: httpx.Response) -> Response:
    headers = {k: v for k, v in r.headers.items() if k.lower() in _RETURN_HEADERS}
    return Response(r.content, status_code=r.status_code, headers=headers)


def _gone(exc: Exception) -> JSONResponse:
    return error_response(502, f"the worker serving this request went away: {exc}")


def _no_worker() -> JSONResponse:
    return error_response(503, "no healthy worker to route to")


def create_router_app(args: RouterArgs) -> FastAPI:
    router = Router(args)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        probe = asyncio.create_task(router.watch(args.health_check_interval))
        try:
            yield
        finally:
            probe.cancel()
            await router.client.aclose()

    app = FastAPI(title="sgl router", lifespan=lifespan)
    app.state.router = router

    async def routed(request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            return error_response(400, f"malformed JSON body: {exc}")
        url = router.choose(prompt_text(path, body))
        if url is None:
            return _no_worker()
        w = router.pool.workers[url]
        rid = body.get("rid") if isinstance(body, dict) and isinstance(body.get("rid"), str) else None
        w.inflight += 1
        w.requests += 1
        if rid:
            router.rids[rid] = url
        stream = isinstance(body, dict) and bool(body.get("stream"))
        req = router.client.build_request("POST", url + path, content=raw, headers=_headers(request))

        def done() -> None:
            w.inflight -= 1
            if rid:
                router.rids.pop(rid, None)

        try:
            resp = await router.race(url, router.client.send(req, stream=stream))
        except WorkerGone as exc:
            w.errors += 1
            done()
            return _gone(exc)
        if not stream or resp.status_code != 200:
            try:
                if stream:
                    await router.race(url, resp.aread())
                return _passthrough(resp)
            except WorkerGone as exc:
                w.errors += 1
                return _gone(exc)
            finally:
                await resp.aclose()
                done()

        async def events() -> AsyncIterator[bytes]:
            chunks = resp.aiter_raw()
            try:
                while True:
                    try:
                        chunk = await router.race(url, chunks.__anext__())
                    except StopAsyncIteration:
                        break
                    yield chunk
            except (WorkerGone, httpx.HTTPError) as exc:
                w.errors += 1
                yield b"data: " + json.dumps(error_body(502, f"the worker serving this request went away: "
                                                             f"{exc}")).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                await resp.aclose()
                done()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await routed(request, "/generate")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await routed(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await routed(request, "/v1/chat/completions")

    async def to_all(request: Request, method: str, path: str, content: bytes = b"") -> dict[str, Any]:
        async def one(url: str) -> Any:
            try:
                return await router.client.request(method, url + path, content=content, headers=_headers(request),
                                                   timeout=60.0)
            except httpx.HTTPError as exc:
                return exc
        urls = router.pool.healthy()
        return dict(zip(urls, await asyncio.gather(*(one(u) for u in urls))))

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            return error_response(400, f"malformed JSON body: {exc}")
        rid = body.get("rid") if isinstance(body, dict) else None
        url = router.rids.get(rid) if isinstance(rid, str) else None
        if url is not None:
            try:
                return _passthrough(await router.client.post(url + "/abort_request", content=raw,
                                                             headers=_headers(request), timeout=30.0))
            except httpx.HTTPError as exc:
                return _gone(exc)
        results = await to_all(request, "POST", "/abort_request", raw)
        if not results:
            return _no_worker()
        aborted: list[str] = []
        for r in results.values():
            if isinstance(r, httpx.Response) and r.status_code != 200:
                return _passthrough(r)  # a 400 naming the bad field is the same on every worker
            if isinstance(r, httpx.Response):
                aborted += r.json().get("aborted", [])
        return JSONResponse({"aborted": sorted(set(aborted))})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request) -> Response:
        results = await to_all(request, "POST", "/flush_cache")
        if not results:
            return _no_worker()
        bad = {u: r for u, r in results.items() if not (isinstance(r, httpx.Response) and r.status_code == 200)}
        if bad:
            url, r = next(iter(bad.items()))
            msg = r.json()["error"]["message"] if isinstance(r, httpx.Response) else str(r)
            return error_response(400, f"cache not flushed on {len(bad)} worker(s) ({url}: {msg})")
        router.policy.clear()
        return Response("Cache flushed.\n", status_code=200)

    def router_info() -> dict[str, Any]:
        return {"policy": router.policy.name, "balance_threshold": args.balance_threshold,
                "decisions": dict(router.decisions),
                "workers": [{"url": w.url, "healthy": w.healthy, "inflight": w.inflight, "requests": w.requests,
                             "errors": w.errors, "eviction_events": router.eviction_events[w.url],
                             "eviction_cursor": router.eviction_cursor.get(w.url, 0),
                             "eviction_polls": router.eviction_polls[w.url]} for w in router.pool.workers.values()]}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info(request: Request) -> Response:
        results = await to_all(request, "GET", "/server_info")
        infos = [r.json() for r in results.values() if isinstance(r, httpx.Response) and r.status_code == 200]
        if not infos:
            return _no_worker()
        out = dict(infos[0])
        out["internal_states"] = [s for i in infos for s in i.get("internal_states", [])]
        out["dp_size"] = len(router.pool.workers)
        out["router"] = router_info()
        return JSONResponse(out)

    @app.get("/check_integrity")
    async def check_integrity(request: Request) -> Response:
        results = await to_all(request, "GET", "/check_integrity")
        for url, r in results.items():
            if not (isinstance(r, httpx.Response) and r.status_code == 200):
                detail = r.text if isinstance(r, httpx.Response) else str(r)
                return error_response(500, f"integrity check failed on {url}: {detail}")
        return JSONResponse({"ok": True, "workers": {u: r.json() for u, r in results.items()}})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200) if router.pool.healthy() else _no_worker()

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = ["# TYPE sgl_router_requests_total counter"]
        for w in router.pool.workers.values():
            lines.append(f'sgl_router_requests_total{{worker="{w.url}"}} {w.requests}')
        lines.append("# TYPE sgl_router_worker_errors_total counter")
        lines += [f'sgl_router_worker_errors_total{{worker="{w.url}"}} {w.errors}' for w in router.pool.workers.values()]
        lines.append("# TYPE sgl_router_inflight gauge")
        lines += [f'sgl_router_inflight{{worker="{w.url}"}} {w.inflight}' for w in router.pool.workers.values()]
        lines.append("# TYPE sgl_router_worker_healthy gauge")
        lines += [f'sgl_router_worker_healthy{{worker="{w.url}"}} {int(w.healthy)}' for w in router.pool.workers.values()]
        lines.append("# TYPE sgl_router_decisions_total counter")
        lines += [f'sgl_router_decisions_total{{policy="{router.policy.name}",decision="{d}"}} {n}'
                  for d, n in sorted(router.decisions.items())]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def other(request: Request, path: str) -> Response:
        healthy = router.pool.healthy()
        if not healthy:
            return _no_worker()
        url = min(healthy, key=lambda u: router.pool.workers[u].inflight)
        try:
            r = await router.client.request(request.method, f"{url}/{path}", content=await request.body(),
                                            headers=_headers(request), params=request.query_params, timeout=60.0)
        except httpx.HTTPError as exc:
            return _gone(exc)
        return _passthrough(r)

    return app
