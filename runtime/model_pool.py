"""Several base models behind one server: load on first use, unload the least recently used idle model
when the next one does not fit `--model-memory-budget`.

    pool = ModelPool(specs, base_args, budget_bytes=2 * 2**30)    # specs: runtime/model_names.py
    engine = await pool.acquire("small")                          # loads "small" first if needed
    ...                                                           # (runtime/model_handles.py: the routes' view)
    pool.release("small")

Invariants:
* a model with requests in flight (`in_use` > 0) is never unloaded: its running requests finish first;
* a request for a model that does not fit waits (in arrival order per model) until enough in-use models
  become idle and are unloaded; a model whose size alone exceeds the budget fails its requests with a 400;
* fairness: after `fair_wait_s` (--model-fair-wait) of waiting, the busy models it waits for drain (new
  requests for them wait, running ones finish) until it is loaded: no model waits forever behind a stream
  of requests for a resident one;
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
from typing import Any, Callable, Optional, Sequence

from sgl.runtime.model_names import ModelSpec, check_unique, resolve_model_adapter
from sgl.runtime.protocol import RequestError

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
    waiting: int = 0  # requests waiting for this model to load (or to stop draining)
    draining: bool = False  # a waiting model needs its memory: new requests wait, running ones finish
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
                 tokenizer_loader: Optional[Callable[[str], tuple[Any, str, Any]]] = None,
                 fair_wait_s: float = 5.0) -> None:
        check_unique(specs)
        self.budget_bytes = budget_bytes
        self.fair_wait_s = fair_wait_s  # --model-fair-wait: the longest a model waits before busy ones drain
        self._factory = engine_factory or _build_engine
        load_tok = tokenizer_loader or _load_tokenizer
        self.slots: dict[str, ModelSlot] = {}
        for spec in specs:
            args = base_args.replace(model_path=spec.model_path, served_model_name=spec.name, model_paths=None,
                                     models=None, lora_paths=spec.overrides.get("lora_paths"), **{
                                         k: v for k, v in spec.overrides.items() if k != "lora_paths"})
            tokenizer, path, config = load_tok(args.model_path)
            self.slots[spec.name] = ModelSlot(spec, args, tokenizer, path, config, size_bytes=_file_bytes(path))
        self.names = list(self.slots)
        if base_args.lora_paths:  # global --lora-paths: each adapter goes to the base model(s) it belongs to
            from sgl.runtime.lora.placement import place_lora_paths

            for name, own in place_lora_paths(base_args.lora_paths, self._adapter_bases()).items():
                slot = self.slots[name]
                slot.args = slot.args.replace(lora_paths=list(slot.args.lora_paths or []) + own or None)
        self._lock = asyncio.Lock()  # loads and unloads, one at a time
        self._changed = asyncio.Event()  # set when a model becomes idle (a waiting load may proceed)
        self._thread_lock = threading.Lock()  # guards in_use/last_used against the sync API

    def resolve_adapter(self, requested: Optional[str]) -> tuple[str, Optional[str]]:
        """`model` -> (served model, its LoRA adapter or None): "base:adapter" or a bare adapter name."""
        return resolve_model_adapter(requested, self.names, {n: self.adapter_names(n) for n in self.names})

    # ---- LoRA adapters: each belongs to its base model(s) (runtime/lora/placement.py) ----------------
    def _adapter_bases(self) -> dict[str, tuple[str, str, Any]]:
        return {n: (s.spec.model_path, s.resolved_path, s.config) for n, s in self.slots.items() if s.config is not None}

    def adapter_names(self, name: str) -> list[str]:
        """The adapters of model `name`: its engine's when resident, else those it will load (its lora_paths)."""
        from sgl.runtime.lora.pool import parse_lora_paths

        slot = self.slots[name]
        if slot.engine is not None and hasattr(slot.engine, "lora_names"):
            return list(slot.engine.lora_names())
        return [n for n, _ in parse_lora_paths(slot.args.lora_paths)]

    def bases_for_adapter(self, lora_name: str, lora_path: str, base: Optional[str] = None) -> list[str]:
        """The models a run-time adapter goes to (AdapterError naming the misfit, or an unknown base)."""
        from sgl.runtime.lora.placement import choose_bases

        return choose_bases(lora_name, lora_path, self._adapter_bases(), base)

    def register_adapter(self, name: str, lora_name: str, lora_path: Optional[str]) -> None:
        """Record (path) or forget (None) an adapter of model `name` in its args, so a reload keeps it."""
        from sgl.runtime.lora.pool import parse_lora_paths

        slot = self.slots[name]
        kept = [f"{n}={p}" for n, p in parse_lora_paths(slot.args.lora_paths) if n != lora_name]
        if lora_path is not None:
            kept.append(f"{lora_name}={lora_path}")
        slot.args = slot.args.replace(lora_paths=kept or None)

    def resident_bytes(self, exclude: str = "") -> int:
        return sum(s.size_bytes for n, s in self.slots.items() if s.engine is not None and n != exclude)

    def _estimate(self, slot: ModelSlot) -> None:
        """Before a first load: the measured size of a loaded twin (same file, same args but the name), if any."""
        if slot.measured:
            return
        for other in self.slots.values():
            if other.measured and other.resolved_path == slot.resolved_path and \
                    other.args.replace(served_model_name=None, lora_paths=None) == \
                    slot.args.replace(served_model_name=None, lora_paths=None):
                slot.size_bytes = max(slot.size_bytes, other.size_bytes)

    async def acquire(self, name: str) -> Any:
        """The engine of `name`, loaded if needed; counts one request in flight until `release(name)`.

        Fairness: a request whose model cannot load because busy models hold the memory waits at most
        `fair_wait_s`; then those models drain (their new requests wait, their running ones finish), so they go
        idle and are unloaded. A stream of requests for a resident model cannot starve a waiting one; the
        drained model's own requests get the same bounded wait in turn."""
        slot = self.slots[name]
        slot.waiting += 1
        since = time.monotonic()
        try:
            while True:
                if slot.engine is not None and not slot.draining:
                    with self._thread_lock:  # NOTE: no await between a usable check and this count
                        slot.in_use += 1
                        slot.last_used = time.monotonic()
                    return slot.engine
                if slot.engine is None:
                    self._estimate(slot)
                    if self.budget_bytes is not None and slot.size_bytes > self.budget_bytes:
                        raise RequestError(f"model: {name!r} needs {slot.size_bytes / 2**30:.2f} GB, over "
                                           f"--model-memory-budget {self.budget_bytes / 2**30:.2f} GB; it can never "
                                           "be loaded")
                    self._changed.clear()
                    async with self._lock:
                        if slot.engine is None and await self._make_room(slot):
                            await self._load(slot)
                            self._undrain()  # the waiting model is in: the drained ones may load again
                        if slot.engine is not None:
                            continue
                    if time.monotonic() - since >= self.fair_wait_s:
                        self._drain_for(slot)
                try:  # busy models hold the memory: wait for one to go idle (re-check at least every 0.5 s)
                    await asyncio.wait_for(self._changed.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
        finally:
            slot.waiting -= 1
            if not any(s.waiting and s.engine is None for s in self.slots.values()):
                self._undrain()  # nobody waits for memory any more (e.g. the waiter went away)

    def _drain_for(self, slot: ModelSlot) -> None:
        """Mark busy resident models draining, least recently used first, until `slot` would fit once they
        are unloaded."""
        assert self.budget_bytes is not None
        need = self.resident_bytes() + slot.size_bytes - self.budget_bytes
        for other in sorted(self.slots.values(), key=lambda s: s.last_used):
            if need <= 0:
                break
            if other is slot or other.engine is None:
                continue
            if not other.draining:
                other.draining = True
                logger.info("draining model %s: %s has waited %.1fs for memory (--model-fair-wait)",
                            other.spec.name, slot.spec.name, self.fair_wait_s)
            need -= other.size_bytes

    def _undrain(self) -> None:
        if any(s.draining for s in self.slots.values()):
            for s in self.slots.values():
                s.draining = False
            self._changed.set()

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
            idle = [s for s in self.slots.values() if s.engine is not None and s.in_use == 0 and s is not slot
                    and (s.waiting == 0 or s.draining)]  # (its own waiters are about to use it, unless drained)
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
        slot.draining = False
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
        return {n: {"loaded": s.engine is not None, "in_use": s.in_use, "waiting": s.waiting,
                    "draining": s.draining, "loads": s.loads, "unloads": s.unloads,
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
