"""The adapter pool: registered adapters by name, at most --max-loaded-loras of them resident.

Registered adapters whose weights were evicted (least recently used first, only those no request
holds) are reloaded from their folder on their next use. A request takes a reference when it is
queued (`acquire`) and the scheduler drops it when the request finishes, so the weights of an
adapter in use never go away, even when it is unloaded meanwhile (unload only removes the name).

Threading: every mutation runs on the scheduler thread (the engine routes load/unload there), so
no lock is needed; other threads only call `names()` (a tuple replaced whole on each change) and
`get()` (one dict lookup).

    >>> pool = AdapterPool(loader=None, max_loaded=None)
    >>> pool.names()
    []
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional

from sgl.runtime.lora.adapter import AdapterError, LoraAdapter

logger = logging.getLogger("sgl.lora")

# (name, path) -> a resident LoraAdapter (runtime/lora/adapter.py: load_adapter with the model's shapes)
Loader = Callable[[str, str], LoraAdapter]


def parse_lora_paths(items: Optional[list[str]]) -> list[tuple[str, str]]:
    """--lora-paths entries `name=path` (or a bare path, named by its folder) -> (name, path)."""
    out: list[tuple[str, str]] = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            name = path.rstrip("/").split("/")[-1]
        if not name or not path:
            raise ValueError(f"--lora-paths entry {item!r}: expected NAME=PATH or PATH")
        if name in {n for n, _ in out}:
            raise ValueError(f"--lora-paths: the name {name!r} is given twice")
        out.append((name, path))
    return out


class AdapterPool:
    def __init__(self, loader: Optional[Loader], max_loaded: Optional[int]) -> None:
        self.loader = loader
        self.max_loaded = max_loaded
        self.adapters: dict[str, LoraAdapter] = {}  # the registered names
        self._names: tuple[str, ...] = ()  # snapshot of the keys for other threads
        self._lru: "OrderedDict[int, LoraAdapter]" = OrderedDict()  # resident adapters by uid, oldest first
        self.num_loads = 0  # loads from disk, reloads after eviction included
        self.num_evictions = 0

    def names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> Optional[LoraAdapter]:
        return self.adapters.get(name)

    def add(self, adapter: LoraAdapter) -> None:
        """Register a freshly loaded (resident) adapter under its name."""
        if adapter.name in self.adapters:
            raise AdapterError(f"lora_name: an adapter named {adapter.name!r} is already loaded; unload it first")
        self.adapters[adapter.name] = adapter
        self._names = tuple(self.adapters)
        self.num_loads += 1
        self._touch(adapter)

    def remove(self, name: str) -> LoraAdapter:
        adapter = self.adapters.pop(name, None)
        self._names = tuple(self.adapters)
        if adapter is None:
            raise AdapterError(f"lora_name: no adapter named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        if adapter.refs == 0:  # otherwise its requests keep the weights until they finish
            self._drop(adapter)
        return adapter

    def acquire(self, name: str) -> LoraAdapter:
        """The adapter for a new request, resident (reloaded if evicted), with one more reference."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise AdapterError(f"lora_path: no adapter named {name!r} is loaded "
                               f"(loaded: {', '.join(self.adapters) or 'none'})")
        if not adapter.resident:
            assert self.loader is not None
            adapter.layers = self.loader(adapter.name, adapter.path).layers
            self.num_loads += 1
            logger.info("LoRA adapter %s reloaded from %s", adapter.name, adapter.path)
        adapter.refs += 1
        self._touch(adapter)
        return adapter

    def _touch(self, adapter: LoraAdapter) -> None:
        self._lru[adapter.uid] = adapter
        self._lru.move_to_end(adapter.uid)
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used idle adapters' weights while more than max_loaded are resident."""
        self.release_unused()
        if self.max_loaded is None:
            return
        for adapter in list(self._lru.values()):
            if len(self._lru) <= self.max_loaded:
                break
            if adapter.refs == 0:
                self._drop(adapter)
                self.num_evictions += 1
        # NOTE: when every resident adapter is in use the pool runs over max_loaded until they finish

    def _drop(self, adapter: LoraAdapter) -> None:
        adapter.layers = None
        self._lru.pop(adapter.uid, None)

    def release_unused(self) -> None:
        """Free the weights of unloaded adapters whose last request finished (called when idle)."""
        registered = {a.uid for a in self.adapters.values()}
        for adapter in list(self._lru.values()):
            if adapter.uid not in registered and adapter.refs == 0:
                self._drop(adapter)

    def info(self) -> dict[str, dict[str, object]]:
        return {a.name: {"path": a.path, "rank": a.rank, "scaling": a.scaling, "resident": a.resident,
                         "active_requests": a.refs} for a in self.adapters.values()}
