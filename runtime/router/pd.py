"""The router of a prefill/decode pair: `sgl router --prefill URL --decode URL`.

    POST /generate (one prompt) -> prefill's /disagg/prefill: the prompt runs there (its first token),
                                   its KV is exported (a shared-memory handle)
                                -> decode's /disagg/decode with the prompt's ids and the handle: the KV
                                   is imported into the decode server's radix tree, the request decodes
                                   there (streamed or not); its response goes back unchanged
Long prompts thus never share a batch with the decode server's running requests, so their inter-token
latency does not jump when a prompt arrives. A failure on either side is that request's error (502
when a server is unreachable, the server's own status otherwise); an exported KV that never reaches
the decode server is freed by the prefill server after --disaggregation-transfer-timeout.
POST /v1/completions and /v1/chat/completions (streamed or not) go the same way, marked "openai": the
prefill server renders the prompt (chat template) and the decode server answers in the OpenAI shape.
Batches (a list of prompts, n > 1) are not split here yet: they get a 400.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from sgl.runtime.router.config import RouterArgs
from sgl.runtime.server.errors import error_response

logger = logging.getLogger("sgl.router")
_FORWARD_HEADERS = ("authorization", "content-type")


def create_pd_app(args: RouterArgs) -> FastAPI:
    assert args.prefill is not None and args.decode is not None
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
    app = FastAPI(title="sgl router (prefill/decode)")

    def headers(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}

    @app.get("/health")
    async def health() -> Response:
        for url in (args.prefill, args.decode):
            try:
                if (await client.get(f"{url}/health", timeout=5)).status_code != 200:
                    return error_response(503, f"{url} is not healthy")
            except httpx.HTTPError as exc:
                return error_response(503, f"{url} is unreachable: {exc}")
        return Response(status_code=200)

    async def pd(request: Request, body: Any, openai: Optional[str]) -> Response:
        """Prefill, then decode (streamed or not); `openai` marks an OpenAI body ("completions" | "chat")."""
        mark = {"openai": openai} if openai else {}
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "rid")} | mark
        try:
            p = await client.post(f"{args.prefill}/disagg/prefill", json=prefill_body, headers=headers(request))
        except httpx.HTTPError as exc:
            return error_response(502, f"prefill server {args.prefill} unreachable: {exc}")
        if p.status_code != 200:
            return Response(p.content, status_code=p.status_code, media_type="application/json")
        pre = p.json()
        decode_body = {k: v for k, v in body.items() if openai or k != "text"} | mark
        decode_body.update(input_ids=pre["input_ids"], kv=pre["kv"])
        req = client.build_request("POST", f"{args.decode}/disagg/decode", json=decode_body, headers=headers(request))
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            return error_response(502, f"decode server {args.decode} unreachable: {exc} (the prefill server frees "
                                       f"the exported KV after its transfer timeout)")
        if not body.get("stream") or resp.status_code != 200:
            content = await resp.aread()
            await resp.aclose()
            return Response(content, status_code=resp.status_code, media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                logger.warning("decode server stream broke: %s", exc)
            finally:
                await resp.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await json_body(request)
        if body is None:
            return error_response(400, "malformed JSON body")
        if not isinstance(body, dict) or isinstance(body.get("text"), list) or \
                (body.get("input_ids") and isinstance(body["input_ids"][0], list)):
            return error_response(400, "the prefill/decode router takes one prompt per request (no batches)")
        sp = body.get("sampling_params") or {}
        if isinstance(sp, dict) and sp.get("n", 1) != 1:
            return error_response(400, "sampling_params.n: the prefill/decode router takes n = 1")
        return await pd(request, body, None)

    async def openai_route(request: Request, route: str) -> Response:
        body = await json_body(request)
        if not isinstance(body, dict):
            return error_response(400, "malformed JSON body: an object is expected")
        if body.get("n", 1) != 1:
            return error_response(400, "n: the prefill/decode router takes n = 1")
        return await pd(request, body, route)  # the servers check the rest (400 naming the field)

    @app.post("/v1/completions")
    async def openai_completions(request: Request) -> Response:
        return await openai_route(request, "completions")

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request) -> Response:
        return await openai_route(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            r = await client.get(f"{args.decode}/v1/models", headers=headers(request), timeout=30)
        except httpx.HTTPError as exc:
            return error_response(502, f"decode server {args.decode} unreachable: {exc}")
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.on_event("shutdown")
    async def close() -> None:
        await client.aclose()

    return app
