"""The engine's LoRA side: its adapter pool, set up from --lora-paths, and the run-time load/unload API.

A mixin of `sgl.runtime.engine.Engine` (which provides `model_config`, `_model_dtype`, `server_args` and
`_call`, running a function on the scheduler thread): the pool is mutated only on the scheduler thread
(runtime/lora/pool.py's threading rule), so load/unload hand their mutation to it.

    engine.load_lora_adapter("sql", "/adapters/sql")     # requests then name it: lora_path="sql"
    engine.lora_names()                                   # ['sql']
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from sgl.runtime.lora.adapter import AdapterError, LayerShapes, LoraAdapter, check_adapter_name, load_adapter
from sgl.runtime.lora.pool import AdapterPool, parse_lora_paths
from sgl.runtime.protocol import GenerateRequest, RequestError

logger = logging.getLogger("sgl.engine")


class EngineLoraMixin:
    model_config: Any
    server_args: Any
    _model_dtype: Any
    _call: Callable[..., Any]

    def _init_lora(self) -> None:
        """The adapter pool, with every --lora-paths adapter read now (a bad one fails the start)."""
        self.lora_pool = AdapterPool(self._read_adapter, self.server_args.max_loaded_loras)
        for name, path in parse_lora_paths(self.server_args.lora_paths):
            self.lora_pool.add(self._read_adapter(name, path))

    def _check_lora_path(self, r: GenerateRequest) -> None:
        """A request's `lora_path` names a loaded adapter (a 400 otherwise, listing the loaded ones)."""
        if r.lora_path is None:
            return
        if not isinstance(r.lora_path, str):
            raise RequestError("lora_path must be the name of a loaded adapter (a string)")
        if self.lora_pool.get(r.lora_path) is None:
            raise RequestError(f"lora_path: no adapter named {r.lora_path!r} is loaded (loaded: "
                               f"{', '.join(self.lora_pool.names()) or 'none'}; start with --lora-paths "
                               "or POST /load_lora_adapter)")

    def _read_adapter(self, name: str, path: str) -> LoraAdapter:
        cfg = self.model_config
        shapes = LayerShapes.for_llama(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim,
                                       cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size)
        return load_adapter(name, path, shapes, cfg.num_hidden_layers, self._model_dtype, self.server_args.max_lora_rank)

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> dict[str, Any]:
        """Register a PEFT adapter folder under `lora_name` (requests then select it by that name).

        Raises AdapterError (a ValueError) naming the problem. The files are read on the calling thread."""
        check_adapter_name(lora_name)
        if self.server_args.tp_size > 1:  # ServerArgs refuses --lora-paths with it too
            raise AdapterError(f"lora_name: adapters cannot be loaded at tp_size {self.server_args.tp_size} (they are "
                               "not split over the ranks; a LoRA request there failed mid-step and hung the ranks)")
        if self.lora_pool.get(lora_name) is not None:
            raise AdapterError(f"lora_name: an adapter named {lora_name!r} is already loaded; unload it first")
        adapter = self._read_adapter(lora_name, lora_path)
        self._call(lambda: self.lora_pool.add(adapter))
        logger.info("LoRA adapter %s loaded from %s (rank %d)", lora_name, adapter.path, adapter.rank)
        return self.lora_adapters()

    def unload_lora_adapter(self, lora_name: str) -> dict[str, Any]:
        """Forget `lora_name`: new requests naming it get a 400; requests already queued finish with it."""
        self._call(lambda: self.lora_pool.remove(lora_name))
        logger.info("LoRA adapter %s unloaded", lora_name)
        return self.lora_adapters()

    def lora_adapters(self) -> dict[str, Any]:
        """name -> {path, rank, scaling, resident, active_requests} of every loaded adapter."""
        return self._call(self.lora_pool.info, timeout=10)

    def lora_names(self) -> list[str]:
        return self.lora_pool.names()
