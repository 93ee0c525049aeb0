"""A request's prefix in the radix tree (the table in request.py): matched and locked when it is admitted, picked up
again between chunks, released when it is not admitted, and its computed KV handed to the tree when it finishes or
is preempted. No tensors."""

from __future__ import annotations

from typing import Callable

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.cache.hiradix_cache import HiRadixCache
from sgl.runtime.cache.radix_cache import RadixCache
from sgl.runtime.scheduler.preemption import promote_prefix
from sgl.runtime.scheduler.request import Req


def match_prefix(cache: RadixCache, ensure_free: Callable[[int], bool], req: Req) -> None:
    """Lock the longest cached prefix of a request that holds no KV yet and take its slots (a host-tier prefix is
    promoted to the device first, `ensure_free` making room)."""
    assert req.kv_len == 0 and req.last_node is None
    if isinstance(cache, HiRadixCache):
        promote_prefix(cache, ensure_free, req.fill_ids[: req.max_prefix_len], req.cache_namespace)
    m = cache.match_prefix(req.fill_ids[: req.max_prefix_len], req.cache_namespace)
    cache.lock(m.node)
    req.last_node, req.slots, req.cached_len = m.node, list(m.slots), len(m.slots)


def rematch_prefix(cache: RadixCache, req: Req) -> None:
    """An in-flight chunked request picks up what others cached since its last chunk (e.g. the
    rest of a shared system prompt), instead of computing its own copy."""
    if cache.disabled or req.cached_len != req.kv_len:
        return
    m = cache.match_prefix(req.fill_ids[: req.max_prefix_len], req.cache_namespace)
    if len(m.slots) <= req.kv_len:
        return
    assert m.slots[: req.kv_len] == req.slots, "the tree must hold this request's own prefix"
    cache.lock(m.node)
    if req.last_node is not None:
        cache.unlock(req.last_node)
    req.last_node, req.slots, req.cached_len = m.node, list(m.slots), len(m.slots)


def release_prefix(cache: RadixCache, req: Req) -> None:
    """Undo `match_prefix` for a request that was not admitted."""
    if req.last_node is not None:
        cache.unlock(req.last_node)
    req.last_node, req.slots, req.cached_len = None, [], 0


def cache_request(cache: RadixCache, allocator: SlotAllocator, req: Req, keep_locked: bool) -> None:
    """Hand the request's computed KV to the tree (or free it when the cache is disabled); `keep_locked`: the request
    goes on and keeps the tree's copy of its prefix locked."""
    key = req.fill_ids[: req.kv_len]
    existing = cache.insert(key, req.slots, req.cache_namespace)
    # [cached_len, existing): the tree already had these tokens: our copies are duplicates.
    allocator.free(req.slots[req.cached_len:existing])
    old = req.last_node
    if keep_locked and not cache.disabled:
        m = cache.match_prefix(key, req.cache_namespace)
        assert len(m.slots) == len(key)
        cache.lock(m.node)
        req.last_node, req.slots, req.cached_len = m.node, list(m.slots), len(key)
    else:
        req.last_node, req.slots, req.cached_len = None, [], 0
    if old is not None:
        cache.unlock(old)
