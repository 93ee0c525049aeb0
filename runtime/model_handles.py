"""The server's view of several models: one `ModelHandle` per served model (the single-engine contract the
routes use: runtime/server/runner.py's preamble) and the `MultiModelEngine` over them (routing, the
`model: "auto"` router, LoRA adapters per base model, stats and integrity over all models).

    pool = ModelPool(specs, base_args, budget_bytes=2 * 2**30)    # runtime/model_pool.py
    engine = MultiModelEngine(pool)
    handle = engine.handle("small")
    async for out in handle.stream_request(req): ...              # loads "small" first if needed

No torch at import time (the server imports this).
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Optional

from sgl.runtime.model_pool import ModelPool
from sgl.runtime.protocol import GenerateRequest

logger = logging.getLogger("sgl.models")


def build_multi_model_engine(server_args: Any) -> "MultiModelEngine":
    """Several models (`model_paths`: NAME=PATH or PATH each, and/or the `models` JSON file) under the
    `model_memory_budget`. Models load on first use; the first one loads now (ready as soon as we serve)."""
    from sgl.runtime.model_names import parse_model_spec, read_models_file

    specs = [parse_model_spec(p) for p in server_args.model_paths or []]
    if server_args.models:
        specs += read_models_file(server_args.models)
    budget = server_args.model_memory_budget
    pool = ModelPool(specs, server_args, budget_bytes=int(budget * 2**30) if budget else None,
                     fair_wait_s=server_args.model_fair_wait)
    logger.info("serving %d models: %s (memory budget: %s)", len(specs), ", ".join(pool.names),
                f"{budget} GB" if budget else "none")
    pool.load_now(pool.names[0])
    return MultiModelEngine(pool, router_config=server_args.router_config)


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

    # ---- LoRA adapters, per base model (runtime/lora/placement.py) -----------------------------------
    def load_lora_adapter(self, lora_name: str, lora_path: str, base: Optional[str] = None) -> dict[str, Any]:
        """Register an adapter on `base`, or on the served models it belongs to (its fit, its declared base).
        A resident model reads it now; the others when they load. Raises AdapterError (a ValueError)."""
        from sgl.runtime.lora.adapter import AdapterError, check_adapter_name

        check_adapter_name(lora_name)
        bases = self.pool.bases_for_adapter(lora_name, lora_path, base)
        taken = [b for b in bases if lora_name in self.pool.adapter_names(b)]
        if taken:
            raise AdapterError(f"lora_name: an adapter named {lora_name!r} is already loaded on {', '.join(taken)}; "
                               "unload it first")
        for b in bases:
            engine = self.pool.slots[b].engine
            if engine is not None:
                engine.load_lora_adapter(lora_name, lora_path)
            self.pool.register_adapter(b, lora_name, lora_path)
        return self.lora_adapters()

    def unload_lora_adapter(self, lora_name: str, base: Optional[str] = None) -> dict[str, Any]:
        from sgl.runtime.lora.adapter import AdapterError

        bases = [b for b in ([base] if base is not None else self.pool.names) if b in self.pool.slots
                 and lora_name in self.pool.adapter_names(b)]
        if not bases:
            raise AdapterError(f"lora_name: no adapter named {lora_name!r} is loaded"
                               + (f" on {base!r}" if base is not None else ""))
        for b in bases:
            engine = self.pool.slots[b].engine
            if engine is not None:
                engine.unload_lora_adapter(lora_name)
            self.pool.register_adapter(b, lora_name, None)
        return self.lora_adapters()

    def lora_adapters(self) -> dict[str, Any]:
        """"base:adapter" -> {"path"} of every adapter of every served model (loaded or not)."""
        from sgl.runtime.lora.pool import parse_lora_paths

        out: dict[str, Any] = {}
        for name, slot in self.pool.slots.items():
            for lora, path in parse_lora_paths(slot.args.lora_paths):
                out[f"{name}:{lora}"] = {"path": path, "base": name, "resident": slot.engine is not None}
        return out

    def adapters_by_model(self) -> dict[str, list[str]]:
        return {n: self.pool.adapter_names(n) for n in self.pool.names}

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
