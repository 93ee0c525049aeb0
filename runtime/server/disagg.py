"""The routes of a prefill/decode pair (`--disaggregation-mode prefill|decode`); `sgl router --prefill
URL --decode URL` calls them in turn (runtime/router/pd.py).

    POST /disagg/prefill   (prefill mode) a /generate body for ONE prompt: runs it for its first token,
                           exports the prompt's KV; -> {"input_ids", "kv": handle, "first_token", "meta_info"}
    POST /disagg/decode    (decode mode) a /generate body with "input_ids" and "kv" (the handle): imports
                           the KV into this server's radix tree, then answers as /generate would
A handle that is gone (the transfer timed out, the prefill server was restarted) is a 504 naming it;
the request is not run. The KV itself moves through shared memory (runtime/distributed/kv_transfer.py).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sgl.runtime.protocol import RequestError, normalize_generate_input
from sgl.runtime.server.errors import error_response
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.server.native import get_state, read_json, respond_generate
from sgl.runtime.server.runner import check_requests, collect

router = APIRouter()


def _engine_disagg(request: Request, mode: str) -> Any:
    disagg = getattr(get_state(request).engine, "disagg", None)
    if disagg is None or disagg.mode != mode:
        raise RequestError(f"this server is not a {mode} server (start it with --disaggregation-mode {mode})")
    return disagg


def _is_transfer_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "KVTransferError"  # NOTE: by name: this layer imports no torch


@router.post("/disagg/prefill")
async def disagg_prefill(request: Request) -> Response:
    disagg = _engine_disagg(request, "prefill")
    body = await read_json(request)
    if not isinstance(body, dict) or body.get("stream"):
        raise RequestError("/disagg/prefill takes one /generate body without stream")
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
    try:
        await asyncio.to_thread(disagg.import_prompt, body["input_ids"], handle)
    except Exception as exc:
        if _is_transfer_error(exc):
            return error_response(504, f"kv transfer failed: {exc}")
        raise
    return await respond_generate(request, body)
