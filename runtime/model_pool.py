"""Several base models behind one server: load on first use, unload the least recently used idle model
when the next one does not fit `--model-memory-budget`.

    pool = ModelPool(specs, base_args, budget_bytes=2 * 2**30)    # specs: runtime/model_names.py
    engine = MultiModelEngine(pool)                               # what the HTTP routes talk to
    handle = engine.handle("small")                               # one model, the single-engine contract
    async for out in handle.stream_request(req): ...              # loads "small" first if needed

Invariants:
* a model with requests in flight (`in_use` > 0) is never unloaded: its running requests finish first;
* a request for a model that does not fit waits (in arrival order per model) until enough in-use models
  become idle and are unloaded; a model whose size alone exceeds the budget fails its requests with a 400;
* one load or unload at a time (`_lock`); a model's KV integrity is checked before it is unloaded;
* sizes: before a model's first load, its file size on disk (a lower bound); after, the measured bytes of
  its weights and KV pool (`engine_memory_bytes`).

Tokenizers of every model load at startup (cheap, no weights): the routes render chat templates and count
tokens before a model is resident. No torch at import time (the server imports this).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from sgl.runtime.model_names import ModelSpec, check_unique, resolve_model_name
from sgl.runtime.protocol import GenerateRequest, RequestError

logger = logging.getLogger("sgl.models")


def engine_memory_bytes(engine: Any) -> int:
    """Bytes an engine holds: every distinct tensor storage of its model (parameters, buffers, weight arenas)
    plus its KV pool."""
    runner = engine.scheduler.runner
    model = runner.model
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if hasattr(t, "untyped_storage") and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for module in model.modules():
        for key, value in vars(module).items():
            if key.startswith("_weights_buffer"):
                add(value)
    return sum(seen.values()) + int(runner.kv.nbytes)


def _file_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return 0


@dataclasses.dataclass
class ModelSlot:
    """One served model: its spec, args, tokenizer, and (when resident) its engine."""

    spec: ModelSpec
    args: Any  # ServerArgs of this model
    tokenizer: Any
    resolved_path: str
    config: Optional[Any] = None  # ModelConfig from the file header (context length, vocab) before any load
    engine: Optional[Any] = None
    in_use: int = 0  # requests in flight (streams open) on this model
    last_used: float = 0.0  # monotonic time of the last acquire/release: LRU order
    size_bytes: int = 0  # measured after a load; before: the file size (a lower bound)
    measured: bool = False
    loads: int = 0
    unloads: int = 0
    load_seconds_total: float = 0.0
    last_load_seconds: float = 0.0


class ModelPool:
    def __init__(self, specs: Sequence[ModelSpec], base_args: Any, budget_bytes: Optional[int] = None,
                 engine_factory: Optional[Callable[[Any], Any]] = None,
                 tokenizer_loader: Optional[Callable[[str], tuple[Any, str, Any]]] = None) -> None:
        check_unique(specs)
        self.budget_bytes = budget_bytes
        self._factory = engine_factory or _build_engine
        load_tok = tokenizer_loader or _load_tokenizer
        self.slots: dict[str, ModelSlot] = {}
        for spec in specs:
            args = base_args.replace(model_path=spec.model_path, served_model_name=spec.name, model_paths=None,
                                     models=None, **spec.overrides)
            tokenizer, path, config = load_tok(args.model_path)
            self.slots[spec.name] = ModelSlot(spec, args, tokenizer, path, config, size_bytes=_file_bytes(path))
        self.names = list(self.slots)
        self._lock = asyncio.Lock()  # loads and unloads, one at a time
        self._changed = asyncio.Event()  # set when a model becomes idle (a waiting load may proceed)
        self._thread_lock = threading.Lock()  # guards in_use/last_used against the sync API

    def resolve(self, requested: Optional[str]) -> tuple[str, Optional[str]]:
        return resolve_model_name(requested, self.names)

    def resident_bytes(self, exclude: str = "") -> int:
        return sum(s.size_bytes for n, s in self.slots.items() if s.engine is not None and n != exclude)

    def _estimate(self, slot: ModelSlot) -> None:
        """Before a first load: the measured size of a loaded twin (same file, same args but the name), if any."""
        if slot.measured:
            return
        for other in self.slots.values():
            if other.measured and other.resolved_path == slot.resolved_path and \
                    other.args.replace(served_model_name=None) == slot.args.replace(served_model_name=None):
                slot.size_bytes = max(slot.size_bytes, other.size_bytes)

    async def acquire(self, name: str) -> Any:
        """The engine of `name`, loaded if needed; counts one request in flight until `release(name)`."""
        slot = self.slots[name]
        with self._thread_lock:
            slot.in_use += 1  # NOTE: counted before any wait, so it cannot be unloaded under us once loaded
            slot.last_used = time.monotonic()
        try:
            while slot.engine is None:
                self._estimate(slot)
                if self.budget_bytes is not None and slot.size_bytes > self.budget_bytes:
                    raise RequestError(f"model: {name!r} needs {slot.size_bytes / 2**30:.2f} GB, over "
                                       f"--model-memory-budget {self.budget_bytes / 2**30:.2f} GB; it can never be loaded")
                self._changed.clear()
                async with self._lock:
                    if slot.engine is not None:
                        break
                    if await self._make_room(slot):
                        await self._load(slot)
                        continue
                try:  # busy models hold the memory: wait for one to go idle (re-check at least every 0.5 s)
                    await asyncio.wait_for(self._changed.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
            return slot.engine
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        slot = self.slots[name]
        with self._thread_lock:
            slot.in_use -= 1
            slot.last_used = time.monotonic()
        if slot.in_use == 0:
            self._changed.set()

    async def _make_room(self, slot: ModelSlot) -> bool:
        """Unload idle models, least recently used first, until `slot` fits; False when busy ones block it."""
        if self.budget_bytes is None:
            return True
        while self.resident_bytes() + slot.size_bytes > self.budget_bytes:
            idle = [s for s in self.slots.values() if s.engine is not None and s.in_use == 0 and s is not slot]
            if not idle:
                return False
            await self._unload(min(idle, key=lambda s: s.last_used))
        return True

    async def _load(self, slot: ModelSlot) -> None:
        t0 = time.monotonic()
        logger.info("loading model %s (%s)", slot.spec.name, slot.resolved_path)
        engine = await asyncio.to_thread(self._factory, slot.args)
        slot.last_load_seconds = time.monotonic() - t0
        slot.load_seconds_total += slot.last_load_seconds
        slot.loads += 1
        slot.engine = engine
        try:
            slot.size_bytes, slot.measured = engine_memory_bytes(engine), True
        except Exception as exc:  # an engine without the usual parts (tests): keep the estimate
            logger.debug("cannot measure %s: %s", slot.spec.name, exc)
        logger.info("loaded model %s in %.2fs (%.0f MB; load #%d; resident: %s)", slot.spec.name,
                    slot.last_load_seconds, slot.size_bytes / 2**20, slot.loads, self.resident_names())
        if self.budget_bytes is not None and slot.size_bytes > self.budget_bytes:
            await self._unload(slot)  # the measured size can never fit: its requests get a 400 (acquire)
            return
        # the estimate (file size) was low: unload idle others, least recently used first, until it fits
        while self.budget_bytes is not None and self.resident_bytes() > self.budget_bytes:
            idle = [s for s in self.slots.values() if s.engine is not None and s.in_use == 0 and s is not slot]
            if not idle:
                logger.warning("resident models exceed --model-memory-budget until busy ones go idle: %s",
                               self.resident_names())
                break
            await self._unload(min(idle, key=lambda s: s.last_used))

    async def _unload(self, slot: ModelSlot) -> None:
        engine, slot.engine = slot.engine, None
        assert engine is not None
        await asyncio.to_thread(_check_and_shutdown, engine)
        slot.unloads += 1
        logger.info("unloaded model %s (least recently used idle; %.0f MB freed)", slot.spec.name, slot.size_bytes / 2**20)

    def load_now(self, name: str) -> None:
        """Load `name` synchronously (server startup, before the event loop: nothing else runs)."""
        slot = self.slots[name]
        if self.budget_bytes is not None and slot.size_bytes > self.budget_bytes:
            return  # its first request gets the 400
        asyncio.run(self._load(slot))

    def resident_names(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.engine is not None]

    def stats(self) -> dict[str, dict[str, Any]]:
        return {n: {"loaded": s.engine is not None, "in_use": s.in_use, "loads": s.loads, "unloads": s.unloads,
                    "size_bytes": s.size_bytes, "size_measured": s.measured,
                    "last_load_seconds": round(s.last_load_seconds, 3),
                    "load_seconds_total": round(s.load_seconds_total, 3)} for n, s in self.slots.items()}

    def shutdown(self) -> None:
        for slot in self.slots.values():
            if slot.engine is not None:
                slot.engine.shutdown()
                slot.engine = None


def _check_and_shutdown(engine: Any) -> None:
    engine.wait_idle() if hasattr(engine, "wait_idle") else None
    engine.check_integrity()  # KV integrity per model: every slot back in the pool before the weights go
    engine.shutdown()


def _build_engine(args: Any) -> Any:
    from sgl.runtime.engine import Engine  # NOTE: function-local: torch loads only with a model

    kwargs = dataclasses.asdict(args)
    return Engine(**kwargs)


def _load_tokenizer(model_path: str) -> tuple[Any, str, Any]:
    """(tokenizer, resolved path, ModelConfig) without the weights: a GGUF's header, or a folder's files."""
    from sgl.runtime.models.default_model import resolve_model_path

    path = resolve_model_path(model_path)
    if path.endswith(".gguf"):
        from sgl.runtime.models.gguf_loader import read_gguf

        gguf = read_gguf(path, show_progress=False)
        return gguf.tokenizer, path, gguf.config
    from sgl.runtime.models.hf_loader import read_hf_config
    from sgl.runtime.tokenizer import Tokenizer

    return Tokenizer.from_folder(path), path, read_hf_config(path)


class ModelHandle:
    """One served model under the single-engine contract the routes use (runner.py's preamble)."""

    def __init__(self, pool: ModelPool, name: str) -> None:
        self.pool, self.name = pool, name
        self.slot = pool.slots[name]
        self.tokenizer = self.slot.tokenizer
        self.server_args = self.slot.args

    async def stream_request(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        engine = await self.pool.acquire(self.name)
        try:
            async for out in engine.stream_request(req):
                yield out
        finally:
            self.pool.release(self.name)

    def abort(self, rid: str) -> None:
        if self.slot.engine is not None:
            self.slot.engine.abort(rid)

    def get_stats(self) -> dict[str, Any]:
        return self.slot.engine.get_stats() if self.slot.engine is not None else {}

    def get_model_info(self) -> dict[str, Any]:
        info = {"model_path": self.slot.resolved_path, "tokenizer_path": self.slot.resolved_path,
                "served_model_name": self.name, "is_generation": True, "loaded": self.slot.engine is not None,
                "chat_template": self.tokenizer.chat_template}
        if self.slot.engine is not None:
            info.update(self.slot.engine.get_model_info())
        return info

    def get_server_info(self) -> dict[str, Any]:
        return self.slot.engine.get_server_info() if self.slot.engine is not None else {}

    def flush_cache(self) -> bool:
        return self.slot.engine.flush_cache() if self.slot.engine is not None else True

    def check_integrity(self) -> None:
        if self.slot.engine is not None:
            self.slot.engine.check_integrity()


class MultiModelEngine:
    """The engine the server holds when several models are served: the first model's tokenizer and args for
    whatever names no model; per-request routing through `handle(name)`; stats and integrity over all."""

    def __init__(self, pool: ModelPool, router_config: Optional[str] = None) -> None:
        from sgl.runtime.model_router import ModelRouter

        self.pool = pool
        # --router-config fixed at startup; else the default rule set, rebuilt per call from current sizes
        self._router = ModelRouter.from_file(router_config, pool.names) if router_config else None
        self.handles = {n: ModelHandle(pool, n) for n in pool.names}
        first = self.handles[pool.names[0]]
        self.tokenizer, self.server_args = first.tokenizer, first.server_args

    def handle(self, name: str) -> ModelHandle:
        return self.handles[name]

    def router(self) -> Any:
        """The `model: "auto"` router (runtime/model_router.py)."""
        from sgl.runtime.model_router import ModelRouter

        if self._router is not None:
            return self._router
        for slot in self.pool.slots.values():
            self.pool._estimate(slot)
        return ModelRouter.default(self.pool.names, {n: s.size_bytes / 2**30 for n, s in self.pool.slots.items()})

    async def stream_request(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        async for out in self.handles[self.pool.names[0]].stream_request(req):
            yield out

    def abort(self, rid: str) -> None:
        for h in self.handles.values():
            h.abort(rid)

    def get_stats(self) -> dict[str, Any]:
        """Numbers summed over resident models (the keys /metrics and /health read), plus `models`."""
        total: dict[str, Any] = {}
        for h in self.handles.values():
            for k, v in h.get_stats().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        total["models"] = self.pool.stats()
        return total

    def get_model_info(self) -> dict[str, Any]:
        info = self.handles[self.pool.names[0]].get_model_info()
        info["served_models"] = list(self.pool.names)
        return info

    def get_server_info(self) -> dict[str, Any]:
        return {"models": self.pool.stats(), **self.get_stats()}

    def flush_cache(self) -> bool:
        return all([h.flush_cache() for h in self.handles.values()])

    def check_integrity(self) -> None:
        for h in self.handles.values():
            h.check_integrity()

    def wait_idle(self, timeout: float = 60.0) -> None:
        for slot in self.pool.slots.values():
            if slot.engine is not None:
                slot.engine.wait_idle(timeout)

    def shutdown(self) -> None:
        self.pool.shutdown()
