"""Running `GenerateRequest`s through the engine for the HTTP routes: checks, metrics, logs, aborts.

Every route funnels into `stream_one` (one request, cumulative dicts), `collect` (wait for a batch,
aborting it if the client goes away) or `merge_streams` (interleave a batch's streams). Leaving any
of them early, by a disconnect, a cancellation or an error, aborts the engine request at once, so
its KV returns to the pool within one scheduler step.

The engine is reached only through the contract in the preamble (`stream_request`, `abort`,
`tokenizer`, `get_stats`, ...); nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import anyio
from starlette.requests import Request

from sgl.runtime.limits import RequestLimits, check_costs
from sgl.runtime.metrics import ServerMetrics
from sgl.runtime.model_names import resolve_model_adapter
from sgl.runtime.protocol import GenerateRequest, InternalError, RequestError, internal_error_of

logger = logging.getLogger("sgl.server")

# Texts longer than this are tokenized off the event loop.
_BIG_TEXT_CHARS = 20_000


class ClientDisconnected(Exception):
    """The HTTP client went away before its (non-streaming) response was ready."""


@dataclass
class ServerState:
    """What the routes share: the engine, its settings, the metrics and the in-flight requests."""

    engine: Any
    server_args: Any  # sgl.runtime.config.ServerArgs
    model_name: str
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    metrics: Optional[ServerMetrics] = None
    inflight: dict[str, "RequestTracker"] = field(default_factory=dict)  # rid -> tracker
    tenancy: Optional[Any] = None  # tenancy_routes.TenancyHooks: priority class, cost, usage accounting
    route_decision: Optional[dict[str, Any]] = None  # model "auto": the router's choice (model_routing.py)
    adapter: Optional[str] = None  # the LoRA adapter the `model` field named ("base:adapter" / "adapter")

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def served_models(self) -> list[str]:
        """Names of the served models (several with a MultiModelEngine, runtime/model_pool.py)."""
        pool = getattr(self.engine, "pool", None)
        return list(pool.names) if pool is not None else [self.model_name]

    def for_model(self, requested: Optional[str]) -> "ServerState":
        """This state narrowed to the model a request names (`model` field), with `adapter` set when the field
        names a LoRA adapter ("base:adapter" or a bare adapter name). One model: `self` (the field is not
        otherwise checked, as before). Several: a view whose engine is that model's handle; unknown names are a
        RequestError naming the field."""
        pool = getattr(self.engine, "pool", None)
        if pool is None:
            names = self.engine.lora_names() if hasattr(self.engine, "lora_names") else []
            _, adapter = resolve_model_adapter(requested, [self.model_name], {self.model_name: names}, check=False)
            return dataclasses.replace(self, adapter=adapter) if adapter is not None else self
        name, adapter = pool.resolve_adapter(requested)
        handle = self.engine.handle(name)
        slot = pool.slots[name]
        ctx = slot.args.context_length or (slot.config.max_position_embeddings if slot.config else None)
        return dataclasses.replace(self, engine=handle, server_args=handle.server_args, model_name=name,
                                   context_length=ctx, vocab_size=slot.tokenizer.vocab_size, adapter=adapter)


class RequestTracker:
    """Timing and token counts of one request, for the metrics and the one-line log."""

    def __init__(self, state: ServerState, rid: str) -> None:
        self.state, self.rid = state, rid
        self.arrival = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.completion_tokens = 0

    def on_chunk(self, out: dict[str, Any]) -> None:
        meta = out.get("meta_info", {})
        n = int(meta.get("completion_tokens") or 0)
        if n <= self.completion_tokens:
            return
        now = time.perf_counter()
        metrics, model = self.state.metrics, self.state.model_name
        if self.first_token_at is None and meta.get("finish_reason") is not None and n > 1 \
                and meta.get("first_token_latency") is not None:
            # the whole answer at once (not streamed): place the first token by the engine's clock
            since_first = max(float(meta["e2e_latency"]) - float(meta["first_token_latency"]), 0.0)
            self.first_token_at = now - since_first
            if metrics:
                metrics.observe_first_token(model, self.first_token_at - self.arrival, meta.get("priority_class"))
                metrics.observe_inter_token(model, since_first, n - 1)
        elif self.first_token_at is None:
            self.first_token_at = now
            if metrics:
                metrics.observe_first_token(model, now - self.arrival, meta.get("priority_class"))
                if n > 1:  # several tokens in the first chunk (jump-forward): they came together
                    metrics.observe_inter_token(model, 0.0, n - 1)
        elif metrics and self.last_token_at is not None:
            metrics.observe_inter_token(model, now - self.last_token_at, n - self.completion_tokens)
        self.last_token_at, self.completion_tokens = now, n

    def finish(self, last: Optional[dict[str, Any]], error: Optional[BaseException]) -> None:
        meta = (last or {}).get("meta_info", {})
        reason = meta.get("finish_reason")
        latency = time.perf_counter() - self.arrival
        aborted = reason is None or (isinstance(reason, dict) and reason.get("type") == "abort")
        prompt, cached = int(meta.get("prompt_tokens") or 0), int(meta.get("cached_tokens") or 0)
        if self.state.metrics:
            self.state.metrics.observe_finished(self.state.model_name, prompt, self.completion_tokens, latency,
                                                cached_tokens=cached, aborted=aborted)
        ttft = f"{self.first_token_at - self.arrival:.3f}s" if self.first_token_at else "-"
        if error is not None and not isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            how = f"error={type(error).__name__}: {error}"
        elif reason is None:
            how = "finish=client_gone"
        else:
            how = f"finish={reason.get('type') if isinstance(reason, dict) else reason}"
        # NOTE: /health_generate probes (rid health-*) log at DEBUG: a load balancer polls them.
        level = logging.DEBUG if self.rid.startswith("health-") else logging.INFO
        logger.log(level, "request rid=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d ttft=%s "
                   "latency=%.3fs %s", self.rid, prompt, self.completion_tokens, cached, ttft, latency, how)


def _encode(state: ServerState, text: str) -> list[int]:
    return list(state.tokenizer.encode(text))


def _encode_big(state: ServerState, text: str) -> list[int]:
    """`_encode` that lets other threads run: `tokenizers`' encode_batch releases the GIL while it works
    (measured on a 1.7 MB text: a 10 ms ticker thread's longest gap 166 ms, vs 3.5 s under encode)."""
    batch = getattr(state.tokenizer, "encode_batch", None)
    return list(batch([text])[0]) if batch is not None else _encode(state, text)


_TOKEN_CHARS: dict[int, Optional[int]] = {}  # id(tokenizer) -> its longest token in characters


def _max_token_chars(tokenizer: Any) -> Optional[int]:
    """The longest vocabulary entry in characters (byte-level BPE: one character per byte), or None."""
    key = id(tokenizer)
    if key not in _TOKEN_CHARS:
        try:
            vocab = getattr(tokenizer, "backend", tokenizer).get_vocab()
            _TOKEN_CHARS[key] = max(len(t) for t in vocab) if vocab else None
        except Exception:  # noqa: BLE001 - no vocabulary to read: no early refusal, still correct
            _TOKEN_CHARS[key] = None
    return _TOKEN_CHARS[key]


async def count_prompt_tokens(state: ServerState, text: str, field: str = "text") -> list[int]:
    """The token ids of `text`, refusing first (RequestError naming `field`) a text too long to fit the
    prompt cap whatever its tokens, and tokenizing big texts off the event loop without the GIL."""
    caps = [c for c in (getattr(state.server_args, "max_prompt_tokens", None), state.context_length) if c]
    longest = _max_token_chars(state.tokenizer) if caps and len(text) > _BIG_TEXT_CHARS else None
    # NOTE: a token covers at most `longest` characters of text (x2 for normalizers that contract text),
    # so more characters than that times the cap cannot fit: refused without spending the tokenizer on it.
    if longest is not None and len(text) > 2 * longest * min(caps):
        raise RequestError(f"{field} is {len(text)} characters, more than a prompt of at most {min(caps)} tokens "
                           "can hold (--max-prompt-tokens / the context window)")
    if len(text) > _BIG_TEXT_CHARS:
        return await asyncio.to_thread(_encode_big, state, text)
    return _encode(state, text)


async def check_requests(state: ServerState, reqs: list[GenerateRequest]) -> None:
    """Checks the engine would otherwise fail late: `n` limit, empty prompt, vocab, context window.

    Raises `RequestError` naming the field (-> HTTP 400).
    """
    max_n = getattr(state.server_args, "max_n", None)
    lengths: dict[int, int] = {}  # id(text) -> token count; n > 1 repeats the same prompt object
    limits = RequestLimits.from_args(state.server_args)
    if len(reqs) > limits.max_batch_size:  # before tokenizing them all
        check_costs(reqs, [], limits)
    prompt_tokens: list[int] = []
    for req in reqs:
        sp = req.sampling_params
        if max_n is not None and sp.n > max_n:
            raise RequestError(f"sampling_params.n must be at most {max_n} (got {sp.n})")
        if req.input_ids is not None:
            num = len(req.input_ids)
            # NOTE: the OpenAI routes' token-id prompts reach here unchecked: a negative id would index the
            # embedding out of range inside the step (found by tests/fuzz)
            bad = [t for t in req.input_ids if t < 0 or (state.vocab_size is not None and t >= state.vocab_size)]
            if bad:
                raise RequestError(f"input_ids contains token id {bad[0]}, outside the vocabulary "
                                   f"[0, {state.vocab_size})")
        else:
            text = req.text or ""
            if not text:
                raise RequestError("text must not be empty")
            if id(text) not in lengths:
                lengths[id(text)] = len(await count_prompt_tokens(state, text))
            num = lengths[id(text)]
        if num == 0:
            raise RequestError("the prompt is empty after tokenization (text)")
        prompt_tokens.append(num)
        ctx = state.context_length
        if ctx is not None:
            if num >= ctx:
                raise RequestError(f"the prompt has {num} tokens; the context window is {ctx} tokens")
            if num + sp.max_new_tokens > ctx:
                raise RequestError(
                    f"prompt ({num} tokens) + sampling_params.max_new_tokens ({sp.max_new_tokens}) exceeds "
                    f"the context window of {ctx} tokens; lower max_new_tokens to at most {ctx - num}")
    check_costs(reqs, prompt_tokens, limits, state.vocab_size)
    if state.tenancy is not None:  # the key's own prompt-token caps (--api-keys file); last: it counts them
        state.tenancy.check_prompt(sum(prompt_tokens))


def _abort_quietly(state: ServerState, rid: str) -> None:
    try:
        state.engine.abort(rid)
    except Exception as exc:  # an abort must never turn a disconnect into a 500
        logger.warning("abort of %s failed: %s", rid, exc)


async def stream_one(state: ServerState, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
    """The engine's cumulative outputs for one request. Closing this early aborts the request."""
    # NOTE: a non-streaming request gets only its final output (no per-token response building in
    # the scheduler); its TTFT comes from meta_info.first_token_latency (see RequestTracker.on_chunk).
    tracker = RequestTracker(state, req.rid)
    state.inflight[req.rid] = tracker
    last: Optional[dict[str, Any]] = None
    error: Optional[BaseException] = None
    it: Any = None
    try:
        if state.tenancy is not None:
            state.tenancy.prepare(req)
        it = state.engine.stream_request(req)
        if inspect.isawaitable(it):
            it = await it
        async for out in it:
            if state.tenancy is not None:
                out = state.tenancy.annotate(out)  # + meta_info.cost once finished
            last = out
            tracker.on_chunk(out)
            yield out
    except BaseException as exc:
        error = exc
        raise
    finally:
        state.inflight.pop(req.rid, None)
        if last is None or last.get("meta_info", {}).get("finish_reason") is None:
            _abort_quietly(state, req.rid)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):  # NOTE: must run even when we are being cancelled
                try:
                    await aclose()
                except Exception as exc:
                    logger.debug("closing the engine stream of %s: %s", req.rid, exc)
        tracker.finish(last, error)
        if state.tenancy is not None:
            state.tenancy.record(req.rid, last)  # aborted requests' tokens count too


async def run_to_end(state: ServerState, req: GenerateRequest) -> dict[str, Any]:
    last: Optional[dict[str, Any]] = None
    async with aclosing(stream_one(state, req)) as outs:
        async for out in outs:
            last = out
    if last is None:
        raise RuntimeError(f"the engine returned no output for request {req.rid}")
    return last


async def _wait_disconnect(request: Request, poll_s: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)


def _no_internal_error(outs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request the engine failed by its own fault is a 500 naming the error, not a 200 (crash safety)."""
    message = internal_error_of(outs)
    if message is not None:
        raise InternalError(message)
    return outs


async def collect(state: ServerState, reqs: list[GenerateRequest],
                  request: Optional[Request] = None) -> list[dict[str, Any]]:
    """Run `reqs` concurrently to completion. If `request`'s client disconnects first, abort them
    all and raise `ClientDisconnected`."""
    tasks = [asyncio.ensure_future(run_to_end(state, r)) for r in reqs]
    gathered = asyncio.gather(*tasks)
    watcher = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
    try:
        if watcher is None:
            return _no_internal_error(list(await gathered))
        done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return _no_internal_error(list(gathered.result()))
        raise ClientDisconnected()
    finally:
        for t in tasks:
            t.cancel()
        if watcher is not None:
            watcher.cancel()
        # Let cancelled tasks run their `finally` (engine abort) before we return.
        await asyncio.gather(*tasks, return_exceptions=True)
        if not gathered.done():
            gathered.cancel()
        elif not gathered.cancelled():
            gathered.exception()  # mark retrieved


async def merge_streams(state: ServerState, reqs: list[GenerateRequest]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Interleave the streams of `reqs` as (index, cumulative dict). An error in any stream is raised
    here; leaving early aborts every unfinished request."""
    if len(reqs) == 1:
        async with aclosing(stream_one(state, reqs[0])) as outs:
            async for out in outs:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()

    async def pump(i: int, req: GenerateRequest) -> None:
        try:
            async with aclosing(stream_one(state, req)) as outs:
                async for out in outs:
                    queue.put_nowait(("item", i, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait(("error", i, exc))
        finally:
            queue.put_nowait(("done", i, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(tasks)
        while remaining:
            kind, i, value = await queue.get()
            if kind == "item":
                yield i, value
            elif kind == "error":
                raise value
            else:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
