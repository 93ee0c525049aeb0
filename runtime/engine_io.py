"""How outputs travel from the scheduler thread to callers, and how Engine arguments become requests."""

from __future__ import annotations

import asyncio
import queue

from typing import Any, AsyncIterator, Iterator, Optional

from sgl.runtime.protocol import GenerateRequest, RequestError, normalize_generate_input

Item = tuple[dict[str, Any], bool]  # (cumulative output, finished)


class RequestSink:
    """One request's output channel. `put` is called in the scheduler thread."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self._loop = loop
        self._q: Any = asyncio.Queue() if loop is not None else queue.Queue()

    @classmethod
    def threaded(cls) -> "RequestSink":
        return cls(None)

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> "RequestSink":
        return cls(loop)

    def put(self, out: dict[str, Any], finished: bool) -> None:
        if self._loop is None:
            self._q.put((out, finished))
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._q.put_nowait, (out, finished))

    def iter_sync(self) -> Iterator[Item]:
        while True:
            out, finished = self._q.get()
            yield out, finished
            if finished:
                return

    def wait_final(self) -> dict[str, Any]:
        for out, finished in self.iter_sync():
            if finished:
                return out
        raise AssertionError("unreachable")

    async def get_async(self) -> Item:
        return await self._q.get()

    async def iter_async(self) -> AsyncIterator[Item]:
        while True:
            item = await self._q.get()
            yield item
            if item[1]:
                return


def build_requests(prompt: Any, sampling_params: Any, input_ids: Any, return_logprob: Any,
                   logprob_start_len: Any, top_logprobs_num: Any, return_text_in_logprobs: bool,
                   stream: bool, rid: Any, priority: Optional[int],
                   priority_class: Optional[str] = None, lora_path: Any = None) -> tuple[list[GenerateRequest], bool]:
    body: dict[str, Any] = {"text": prompt, "input_ids": input_ids, "sampling_params": sampling_params or {},
                            "return_logprob": return_logprob, "return_text_in_logprobs": return_text_in_logprobs,
                            "stream": stream}
    for key, value in (("logprob_start_len", logprob_start_len), ("top_logprobs_num", top_logprobs_num),
                       ("rid", rid), ("priority", priority), ("priority_class", priority_class),
                       ("lora_path", lora_path)):
        if value is not None:
            body[key] = value
    if body["text"] is None:
        del body["text"]
    if body["input_ids"] is None:
        del body["input_ids"]
    return normalize_generate_input(body)


def validate_prompt_length(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    if prompt_len + max_new_tokens > context_length:
        raise RequestError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
            f"window of {context_length} tokens")


def finished_dict(rid: str, finish_reason: dict[str, Any]) -> dict[str, Any]:
    """The output of a request that ended before it reached the scheduler."""
    return {"text": "", "output_ids": [], "meta_info": {
        "id": rid, "finish_reason": finish_reason, "prompt_tokens": 0, "completion_tokens": 0,
        "cached_tokens": 0, "e2e_latency": 0.0}}



