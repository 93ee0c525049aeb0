"""Who is preempted. No tensors here.

`--preemption-mode swap` copies the victim's computed KV (`slots[:kv_len]`) to host slots of a `HostPool`
(runtime/cache/host_pool.py: its `KVMover` is the runner's tensors; tests pass a recording fake), frees its
device slots and requeues it; it resumes by copying the rows back into fresh device slots, so nothing is recomputed and its output is
token-identical (the sampling state, seeded generator included, stays on the request). `recompute`
(or a full host tier) hands the KV to the radix tree and the request prefills again on resume.
"""

from __future__ import annotations

from typing import Callable, Optional

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.cache.hiradix_cache import HiRadixCache
from sgl.runtime.cache.host_pool import HostPool
from sgl.runtime.scheduler.fair_share import CLASS_RANK
from sgl.runtime.scheduler.request import Req

# A request is preempted for a realtime arrival at most this often; then it runs to its end (KV shortage
# may still preempt it). Without the cap a realtime load over capacity starves batch work: fair share
# admits a batch request, the next realtime arrival preempts it, and so on forever.
MAX_LATENCY_PREEMPTIONS = 1


def preemption_victim(running: list[Req], below_rank: Optional[int] = None) -> Optional[Req]:
    """The lowest class first, then the lowest `priority`, then the newest arrival. With `below_rank` (a
    realtime arrival): only classes ranked under it, and only requests not yet preempted for latency."""
    cands = [r for r in running if below_rank is None or (
        CLASS_RANK[r.priority_class] < below_rank and r.num_latency_preemptions < MAX_LATENCY_PREEMPTIONS)]
    return min(cands, key=lambda r: (CLASS_RANK[r.priority_class], r.priority, -r.arrival), default=None)



def swap_in(swap: HostPool, allocator: SlotAllocator, ensure_free: Callable[[int], bool], req: Req) -> bool:
    """Copy a swapped request's KV rows back into fresh device slots (no recompute); False when the
    pool cannot make room now. The caller moves the request from waiting to running."""
    n = len(req.host_slots)
    if not ensure_free(n):
        return False
    slots = allocator.alloc(n)
    assert slots is not None
    swap.swap_in(req.host_slots, slots)
    req.host_slots, req.slots, req.cached_len, req.last_node = [], slots, 0, None
    return True


def promote_prefix(cache: HiRadixCache, ensure_free: Callable[[int], bool], key: list[int],
                   namespace: Optional[int] = None) -> None:
    """Copy the host-tier part of `key`'s cached prefix back to device slots (instead of a prefill)."""
    n = cache.host_prefix_len(key, namespace)
    if n == 0:
        return
    m = cache.match_prefix(key, namespace)
    cache.lock(m.node)  # NOTE: making room must not demote the device part of this very prefix
    room = ensure_free(n)
    cache.unlock(m.node)
    if room:
        cache.promote(key, namespace)
