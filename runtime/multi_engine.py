"""Several models in process: the server's model pool (runtime/model_pool.py, model_handles.py) behind the
offline engine's synchronous API, so `gen(model=...)` routes in process as it does on a server.

    >>> eng = sgl.Engine(model_path=["small=default", "big=/models/big.gguf"], model_memory_budget=0.5,
    ...                  num_threads=1)                                                   # doctest: +SKIP
    >>> eng.generate("Hi", {"max_new_tokens": 8}, model="big")["meta_info"]["model"]       # doctest: +SKIP
    'big'

`model` takes what the server's `model` field takes: a served name, "auto" (the router), "base:adapter" or a
bare adapter name; None is the first model. Every model keeps its own engine (scheduler thread, KV pool); the
pool's load/unload policy (LRU under the budget, bounded wait for a waiting model) runs on a private event
loop thread, which is where every request is awaited.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

from sgl.runtime.config import ServerArgs, split_model_paths
from sgl.runtime.engine_io import build_requests
from sgl.runtime.model_names import AUTO_MODEL
from sgl.runtime.protocol import GenerateRequest, RequestError


class MultiEngine:
    def __init__(self, model_path: Any = "default", **server_args: Any) -> None:
        from sgl.runtime.model_handles import build_multi_model_engine

        paths = [model_path] if isinstance(model_path, str) else list(model_path)
        fields = split_model_paths(paths, server_args.pop("served_model_name", None))
        if "model_paths" not in fields:  # one model (plus a `models` file): the pool serves it by name too
            fields["model_paths"] = paths
        self.server_args = ServerArgs.from_kwargs(**{**server_args, **fields})
        self.models = build_multi_model_engine(self.server_args)  # loads the first model (on this thread)
        self.pool = self.models.pool
        first = self.pool.slots[self.pool.names[0]]
        self.tokenizer, self.model_path = first.tokenizer, first.resolved_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sgl-models", daemon=True)
        self._thread.start()

    # ---- routing ---------------------------------------------------------------------------------
    def _target(self, req: GenerateRequest, model: Optional[str]) -> str:
        """The served model `req` runs on; a `model` naming an adapter sets its lora_path (its own wins)."""
        if model == AUTO_MODEL:
            return self._auto(req)
        name, adapter = self.pool.resolve_adapter(model)
        if req.lora_path is None:
            req.lora_path = adapter
        return name

    def _auto(self, req: GenerateRequest) -> str:
        from sgl.runtime.model_router import RouteFeatures

        router = self.models.router()
        sp = req.sampling_params
        tokens = {n: len(req.input_ids) if req.input_ids is not None else len(self.pool.slots[n].tokenizer.encode(req.text or ""))
                  for n in router.rules}
        kind = next((k for k in ("ebnf", "json_schema", "regex") if getattr(sp, k) is not None), "none")
        return router.choose(RouteFeatures(tokens, sp.max_new_tokens, kind, req.text or "")).model

    # ---- requests ----------------------------------------------------------------------------------
    def _run(self, coro: Any, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _final(self, req: GenerateRequest, name: str) -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for out in self.models.handle(name).stream_request(req):
            last = out
        last.setdefault("meta_info", {})["model"] = name
        return last

    def submit_and_wait(self, reqs: list[GenerateRequest], models: Optional[Sequence[Optional[str]]] = None
                        ) -> list[dict[str, Any]]:
        """Run `reqs` (each on models[i], as a `model` field names it) concurrently; their final outputs."""
        targets = [self._target(r, m) for r, m in zip(reqs, models or [None] * len(reqs))]

        async def run() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*[self._final(r, n) for r, n in zip(reqs, targets)]))

        return self._run(run())

    def generate(self, prompt: Any = None, sampling_params: Any = None, input_ids: Any = None,
                 return_logprob: Any = False, logprob_start_len: Any = None, top_logprobs_num: Any = None,
                 return_text_in_logprobs: bool = False, stream: bool = False, rid: Any = None,
                 priority: Optional[int] = None, priority_class: Optional[str] = None,
                 lora_path: Any = None, model: Optional[str] = None) -> Any:
        """Engine.generate, plus `model` (see the module docstring); outputs name their model in meta_info."""
        reqs, is_batch = build_requests(prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                                        top_logprobs_num, return_text_in_logprobs, stream, rid, priority,
                                        priority_class, lora_path)
        if stream:
            if len(reqs) != 1:
                raise RequestError("stream=True takes a single prompt with n = 1")
            return self._stream(reqs[0], self._target(reqs[0], model))
        outs = self.submit_and_wait(reqs, [model] * len(reqs))
        return outs if is_batch else outs[0]

    def _stream(self, req: GenerateRequest, name: str) -> Iterator[dict[str, Any]]:
        chunks: "queue.Queue[tuple[str, Any]]" = queue.Queue()

        async def pump() -> None:
            try:
                async for out in self.models.handle(name).stream_request(req):
                    out.setdefault("meta_info", {})["model"] = name
                    chunks.put(("out", out))
                chunks.put(("end", None))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                chunks.put(("error", e))

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                kind, value = chunks.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            if not task.done():  # the caller stopped early: cancelling the stream aborts the request
                self._loop.call_soon_threadsafe(task.cancel)

    # ---- LoRA adapters, per base model -------------------------------------------------------------
    def load_lora_adapter(self, lora_name: str, lora_path: str, base: Optional[str] = None) -> dict[str, Any]:
        return self.models.load_lora_adapter(lora_name, lora_path, base)

    def unload_lora_adapter(self, lora_name: str, base: Optional[str] = None) -> dict[str, Any]:
        return self.models.unload_lora_adapter(lora_name, base)

    def lora_adapters(self) -> dict[str, Any]:
        return self.models.lora_adapters()

    # ---- the rest of the Engine surface --------------------------------------------------------------
    def get_model_info(self) -> dict[str, Any]:
        return self.models.get_model_info()

    def get_server_info(self) -> dict[str, Any]:
        return self.models.get_server_info()

    def get_stats(self) -> dict[str, Any]:
        return self.models.get_stats()

    def flush_cache(self) -> bool:
        return self.models.flush_cache()

    def check_integrity(self) -> None:
        self.models.check_integrity()

    def wait_idle(self, timeout: float = 60.0) -> None:
        self.models.wait_idle(timeout)

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self.models.shutdown()

    def __enter__(self) -> "MultiEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
