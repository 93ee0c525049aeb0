"""The OpenAI API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, streaming included.

Each API request becomes `GenerateRequest`s (one per prompt x choice) run by the same code as
`/generate`; responses are built from the engine's cumulative dicts.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:30000/v1", api_key="none")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from sgl.runtime.protocol import GenerateRequest, RequestError, SamplingParams
from sgl.runtime.server.jsonio import SafeJSONResponse as JSONResponse
from sgl.runtime.server.native import CLIENT_CLOSED, SSE_DONE, get_state, sse, start_stream, stream_error
from sgl.runtime.server.openai_protocol import (ChatCompletionRequest, CompletionRequest, chat_messages,
                                                sampling_dict)
from sgl.runtime.server.lora_routes import adapter_model_cards
from sgl.runtime.server.model_routing import route_chat, route_completion
from sgl.runtime.server.runner import (ClientDisconnected, ServerState, check_requests, collect, count_prompt_tokens,
                                      merge_streams)

router = APIRouter()
Triple = list  # [logprob, token_id, text|None]


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    created = int(time.time())
    cards = []
    for name in state.served_models:
        view = state.for_model(name)
        cards.append({"id": view.model_name, "object": "model", "created": created, "owned_by": "sgl",
                      "root": view.server_args.model_path, "max_model_len": view.context_length})
    return JSONResponse({"object": "list", "data": cards + adapter_model_cards(state, created)})


# ---------------------------------------------------------------------------------------------------
# Request building


def _check_n(state: ServerState, n: int) -> None:
    max_n = getattr(state.server_args, "max_n", 16)
    if not 1 <= n <= max_n:
        raise RequestError(f"n must be between 1 and {max_n} (got {n})")


def _default_max_tokens(state: ServerState, prompt_len: int) -> int:
    """OpenAI chat without max_tokens: generate until the context window is full (or EOS)."""
    if state.context_length is None:
        return SamplingParams().max_new_tokens
    return max(state.context_length - prompt_len, 1)


def _build(state: ServerState, body: Any, prompts: list[Union[str, list[int]]], max_new: list[int],
           api_id: str, logprobs: bool, top_n: int, echo_logprobs: bool = False) -> list[GenerateRequest]:
    """One GenerateRequest per prompt x choice; choice k of prompt p has index p * n + k."""
    _check_n(state, body.n)
    if top_n < 0 or top_n > 20:
        raise RequestError(f"top_logprobs must be in [0, 20] (got {top_n})")
    lora = state.adapter  # "base:adapter" / "adapter" in `model` selects a LoRA adapter (ServerState.for_model)
    reqs = []
    for p, prompt in enumerate(prompts):
        for k in range(body.n):
            sp = SamplingParams.from_dict(sampling_dict(body, max_new[p], choice_index=k))
            reqs.append(GenerateRequest(
                rid=f"{api_id}-{p * body.n + k}",
                text=prompt if isinstance(prompt, str) else None,
                input_ids=list(prompt) if not isinstance(prompt, str) else None,
                sampling_params=sp, return_logprob=logprobs, top_logprobs_num=top_n,
                logprob_start_len=0 if echo_logprobs else -1, return_text_in_logprobs=True,
                stream=body.stream, priority=body.priority or 0,
                priority_class=body.priority_class, lora_path=lora))
    return reqs


def _completion_prompts(body: CompletionRequest) -> list[Union[str, list[int]]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("prompt must not be empty")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # one prompt of token ids
    return list(p)


# ---------------------------------------------------------------------------------------------------
# Response pieces


def finish_reason(meta: dict[str, Any]) -> tuple[Optional[str], Any]:
    """(OpenAI finish_reason, matched_stop) from our meta_info."""
    fr = meta.get("finish_reason")
    if not fr:
        return None, None
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    return kind, fr.get("matched") if isinstance(fr, dict) and kind == "stop" else None


def _token_text(state: ServerState, t: Triple) -> str:
    return t[2] if t[2] is not None else state.tokenizer.decode([t[1]], skip_special_tokens=False)


def _tops(meta: dict[str, Any], key: str, start: int, end: int) -> list[Any]:
    tops = meta.get(key) or []
    return [tops[i] if i < len(tops) and tops[i] else [] for i in range(start, end)]


def completion_logprobs(state: ServerState, meta: dict[str, Any], start: int, text_offset: int,
                        echo: bool = False) -> dict[str, Any]:
    """OpenAI completions logprobs for output tokens [start:] (and the prompt's, when echo)."""
    triples, tops = [], []
    if echo:
        ins = meta.get("input_token_logprobs") or []
        triples += ins
        tops += _tops(meta, "input_top_logprobs", 0, len(ins))
    outs = meta.get("output_token_logprobs") or []
    triples += outs[start:]
    tops += _tops(meta, "output_top_logprobs", start, len(outs))
    tokens, offsets, pos = [], [], text_offset
    for t in triples:
        s = _token_text(state, t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [t[0] for t in triples],
            "top_logprobs": [{_token_text(state, a): a[0] for a in top} for top in tops],
            "text_offset": offsets}


def chat_logprobs(state: ServerState, meta: dict[str, Any], start: int) -> dict[str, Any]:
    def entry(t: Triple) -> dict[str, Any]:
        s = _token_text(state, t)
        return {"token": s, "logprob": t[0], "bytes": list(s.encode("utf-8"))}

    outs = (meta.get("output_token_logprobs") or [])[start:]
    tops = _tops(meta, "output_top_logprobs", start, start + len(outs))
    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in top]} for t, top in zip(outs, tops)]}


def usage(outs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice); completion tokens for every choice."""
    metas = [o["meta_info"] for o in outs]
    prompt = sum(int(m.get("prompt_tokens") or 0) for m in metas[::n])
    cached = sum(int(m.get("cached_tokens") or 0) for m in metas[::n])
    completion = sum(int(m.get("completion_tokens") or 0) for m in metas)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if any("accepted_prediction_tokens" in m for m in metas):  # a `prediction` (OpenAI's Predicted Outputs)
        out["completion_tokens_details"] = {
            key: sum(int(m.get(key) or 0) for m in metas)
            for key in ("accepted_prediction_tokens", "rejected_prediction_tokens")}
    if any("cost" in m for m in metas):  # --price-*: every choice's engine request is billed (tenancy_routes)
        out["cost"] = round(sum(float(m.get("cost") or 0.0) for m in metas), 10)
    return out


def _delta(new: str, sent: str) -> str:
    """New text since `sent`. Cumulative text only grows; if it ever does not, send what differs."""
    if new.startswith(sent):
        return new[len(sent):]
    i = 0
    while i < min(len(new), len(sent)) and new[i] == sent[i]:
        i += 1
    return new[i:]


async def _run(state: ServerState, reqs: list[GenerateRequest], request: Request) -> Optional[list[dict[str, Any]]]:
    try:
        return await collect(state, reqs, request)
    except ClientDisconnected:
        return None


async def _stream_with_usage(state: ServerState, body: Any, reqs: list[GenerateRequest], chunks: Any, api_id: str,
                             created: int, obj: str, n: int) -> Any:
    """Stream `reqs` as SSE; with stream_options.include_usage, end with a usage-only chunk."""
    final = None
    if body.stream_options and body.stream_options.include_usage:
        def final(outs: list) -> dict[str, Any]:
            return {"id": api_id, "object": obj, "created": created, "model": state.model_name, "choices": [],
                    "usage": usage(outs, n)}
    first, gen = await start_stream(merge_streams(state, reqs))
    return _stream_response(first, gen, chunks, final)


def _stream_response(first: list[Any], gen: AsyncIterator[Any], make_chunks: Any,
                     final_usage: Optional[Any]) -> StreamingResponse:
    """SSE: `make_chunks(i, out)` -> chunks for each engine output, then usage, then [DONE]."""
    last: dict[int, dict[str, Any]] = {}

    async def events() -> AsyncIterator[bytes]:
        try:
            for i, out in first:
                last[i] = out
                for c in make_chunks(i, out):
                    yield sse(c)
            async for i, out in gen:
                last[i] = out
                for c in make_chunks(i, out):
                    yield sse(c)
            if final_usage is not None:
                yield sse(final_usage([last[i] for i in sorted(last)]))
        except Exception as exc:
            yield stream_error(exc)
        finally:
            await gen.aclose()
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")


# ---------------------------------------------------------------------------------------------------
# /v1/completions


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = route_completion(get_state(request), body)
    if body.suffix:
        raise RequestError("suffix is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of is not supported (use n)")
    prompts = _completion_prompts(body)
    max_new = body.max_tokens if body.max_tokens is not None else 16
    top_n = body.logprobs or 0
    echo_lp = body.echo and body.logprobs is not None
    reqs = _build(state, body, prompts, [max_new] * len(prompts), f"cmpl-{uuid.uuid4().hex}",
                  body.logprobs is not None, top_n, echo_logprobs=echo_lp)
    await check_requests(state, reqs)
    api_id, created, n = reqs[0].rid.rsplit("-", 1)[0], int(time.time()), body.n

    def prompt_text(i: int) -> str:
        p = prompts[i // n]
        return p if isinstance(p, str) else state.tokenizer.decode(p)

    if body.stream:
        sent: dict[int, str] = {}
        lp_sent: dict[int, int] = {}

        def chunks(i: int, out: dict[str, Any]) -> list[dict[str, Any]]:
            meta = out["meta_info"]
            fr, matched = finish_reason(meta)
            first_time = i not in sent
            prefix = prompt_text(i) if body.echo and first_time else ""
            before = sent.get(i, "")
            text = _delta(out["text"], before)
            sent[i] = out["text"]
            lp = None
            if body.logprobs is not None:
                start = lp_sent.get(i, 0)
                lp = completion_logprobs(state, meta, start, len(before), echo=echo_lp and first_time)
                lp_sent[i] = len(meta.get("output_token_logprobs") or [])
            if not (prefix or text or fr or (lp and lp["tokens"])):
                return []
            choice = {"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": fr, "matched_stop": matched}
            return [{"id": api_id, "object": "text_completion", "created": created, "model": state.model_name,
                     "choices": [choice]}]

        return await _stream_with_usage(state, body, reqs, chunks, api_id, created, "text_completion", n)

    outs = await _run(state, reqs, request)
    if outs is None:
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for i, out in enumerate(outs):
        fr, matched = finish_reason(out["meta_info"])
        prefix = prompt_text(i) if body.echo else ""
        lp = completion_logprobs(state, out["meta_info"], 0, 0, echo=echo_lp) if body.logprobs is not None else None
        choices.append({"index": i, "text": prefix + out["text"], "logprobs": lp, "finish_reason": fr,
                        "matched_stop": matched})
    return JSONResponse({"id": api_id, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": usage(outs, n)})


# ---------------------------------------------------------------------------------------------------
# /v1/chat/completions


def render_chat(state: ServerState, body: ChatCompletionRequest) -> str:
    messages = chat_messages(body)
    try:
        return _without_template_bos(state.tokenizer, state.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except RequestError:
        raise
    except Exception as exc:  # jinja's raise_exception(...) in a template, e.g. roles must alternate
        raise RequestError(f"messages: the model's chat template rejected them: {exc}") from None


def _without_template_bos(tokenizer: Any, prompt: str) -> str:
    """The engine encodes prompts WITH special tokens; a template that writes BOS itself (Gemma, Llama 3)
    would then start with two. Drop the template's when the tokenizer adds one (transformers encodes a
    rendered chat with add_special_tokens=False: the same single BOS)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not prompt.startswith(bos):
        return prompt
    ids = tokenizer.encode("a")
    return prompt[len(bos):] if ids and ids[0] == tokenizer.bos_token_id else prompt


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = route_chat(get_state(request), body)
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs requires logprobs: true")
    prompt = render_chat(state, body)
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_new is None:
        max_new = _default_max_tokens(state, len(await count_prompt_tokens(state, prompt, "messages")))
    reqs = _build(state, body, [prompt], [max_new], f"chatcmpl-{uuid.uuid4().hex}", body.logprobs,
                  body.top_logprobs or 0)
    await check_requests(state, reqs)
    api_id, created, n = reqs[0].rid.rsplit("-", 1)[0], int(time.time()), body.n

    if body.stream:
        sent: dict[int, str] = {}
        lp_sent: dict[int, int] = {}

        def chunks(i: int, out: dict[str, Any]) -> list[dict[str, Any]]:
            meta = out["meta_info"]
            fr, matched = finish_reason(meta)
            head = {"id": api_id, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
            result = []
            if i not in sent:
                sent[i] = ""
                result.append({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            text = _delta(out["text"], sent[i])
            sent[i] = out["text"]
            lp = None
            if body.logprobs:
                lp = chat_logprobs(state, meta, lp_sent.get(i, 0))
                lp_sent[i] = len(meta.get("output_token_logprobs") or [])
            if text or fr or (lp and lp["content"]):
                result.append({**head, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                                    "logprobs": lp, "finish_reason": fr, "matched_stop": matched}]})
            return result

        return await _stream_with_usage(state, body, reqs, chunks, api_id, created, "chat.completion.chunk", n)

    outs = await _run(state, reqs, request)
    if outs is None:
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for i, out in enumerate(outs):
        fr, matched = finish_reason(out["meta_info"])
        choices.append({"index": i, "message": {"role": "assistant", "content": out["text"]},
                        "logprobs": chat_logprobs(state, out["meta_info"], 0) if body.logprobs else None,
                        "finish_reason": fr, "matched_stop": matched})
    return JSONResponse({"id": api_id, "object": "chat.completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": usage(outs, n)})
