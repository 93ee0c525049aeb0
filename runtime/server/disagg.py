"""The routes of a prefill/decode pair (`--disaggregation-mode prefill|decode`); `sgl router --prefill
URL --decode URL` calls them in turn (runtime/router/pd.py).

    POST /disagg/prefill   (prefill mode) a /generate body for ONE prompt: runs it for its first token,
                           exports the prompt's KV; -> {"input_ids", "kv": handle, "first_token", "meta_info"}
    POST /disagg/decode    (decode mode) a /generate body with "input_ids" and "kv" (the handle): imports
                           the KV into this server's radix tree, then answers as /generate would
An OpenAI body with "openai": "completions" | "chat" goes the same way: the prefill server renders its
prompt (chat template) and runs that; the decode server imports the KV under the same ids, then answers
as /v1/completions or /v1/chat/completions would (its own rendering finds the prompt in the tree).
A handle that is gone (the transfer timed out, the prefill server was restarted) is a 504 naming it;
the request is not run. The KV itself moves through shared memory (runtime/distributed/kv_transfer.py).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import Response

from sgl.runtime.protocol import RequestError, normalize_generate_input
from sgl.runtime.server.errors import error_response
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.server.native import get_state, read_json, respond_generate
from sgl.runtime.server.openai_api import _completion_prompts, chat_completions, completions, render_chat
from sgl.runtime.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from sgl.runtime.server.runner import check_requests, collect

router = APIRouter()


def _engine_disagg(request: Request, mode: str) -> Any:
    disagg = getattr(get_state(request).engine, "disagg", None)
    if disagg is None or disagg.mode != mode:
        raise RequestError(f"this server is not a {mode} server (start it with --disaggregation-mode {mode})")
    return disagg


def _is_transfer_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "KVTransferError"  # NOTE: by name: this layer imports no torch


_OPENAI = {"completions": CompletionRequest, "chat": ChatCompletionRequest}


def _openai_body(route: Any, body: dict[str, Any]) -> Any:
    """The parsed OpenAI request of a PD body marked "openai": route (400 naming the bad field)."""
    if route not in _OPENAI:
        raise RequestError(f"openai: must be one of {sorted(_OPENAI)} (got {route!r})")
    try:
        return _OPENAI[route].model_validate(body)
    except pydantic.ValidationError as exc:
        raise RequestError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


def _openai_prompt(request: Request, route: Any, body: dict[str, Any]) -> dict[str, Any]:
    """A /generate body for the prompt the OpenAI route would run (n = 1, one prompt)."""
    parsed = _openai_body(route, body)
    if parsed.n != 1:
        raise RequestError("n: the prefill/decode pair takes n = 1")
    if route == "chat":
        return {"text": render_chat(get_state(request), parsed)}
    prompts = _completion_prompts(parsed)
    if len(prompts) != 1:
        raise RequestError("prompt: the prefill/decode pair takes one prompt per request")
    return {"text": prompts[0]} if isinstance(prompts[0], str) else {"input_ids": prompts[0]}


@router.post("/disagg/prefill")
async def disagg_prefill(request: Request) -> Response:
    disagg = _engine_disagg(request, "prefill")
    body = await read_json(request)
    if not isinstance(body, dict) or body.get("stream"):
        raise RequestError("/disagg/prefill takes one /generate body without stream")
    if "openai" in body:
        route = body.pop("openai")
        body = _openai_prompt(request, route, body)
    body = copy.deepcopy(body)
    sp = body.setdefault("sampling_params", {})
    if not isinstance(sp, dict):
        raise RequestError("sampling_params must be an object")
    sp["max_new_tokens"] = 1  # the prefill server produces the first token; the decode server the rest
    reqs, is_batch = normalize_generate_input(body)
    if is_batch or len(reqs) != 1:
        raise RequestError("/disagg/prefill takes one prompt with n = 1")
    state = get_state(request)
    await check_requests(state, reqs)
    (out,) = await collect(state, reqs, request)
    try:
        ids, handle = await asyncio.to_thread(disagg.export_prompt, reqs[0])
    except Exception as exc:
        if _is_transfer_error(exc):
            return error_response(503, f"kv export failed: {exc}")
        raise
    return JSONResponse({"input_ids": ids, "kv": handle, "first_token": (out["output_ids"] or [None])[0],
                         "meta_info": out["meta_info"]})


@router.post("/disagg/decode")
async def disagg_decode(request: Request) -> Response:
    disagg = _engine_disagg(request, "decode")
    body = await read_json(request)
    if not isinstance(body, dict) or "kv" not in body or not isinstance(body.get("input_ids"), list):
        raise RequestError("/disagg/decode takes a /generate body with input_ids and kv from /disagg/prefill")
    handle = body.pop("kv")
    route = body.pop("openai", None)
    ids = body.pop("input_ids") if route is not None else body["input_ids"]
    parsed = _openai_body(route, body) if route is not None else None  # a bad body imports nothing
    try:
        await asyncio.to_thread(disagg.import_prompt, ids, handle)
    except Exception as exc:
        if _is_transfer_error(exc):
            return error_response(504, f"kv transfer failed: {exc}")
        raise
    if route == "chat":
        return await chat_completions(parsed, request)
    if route == "completions":
        return await completions(parsed, request)
    return await respond_generate(request, body)
