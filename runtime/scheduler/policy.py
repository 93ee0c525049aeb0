"""Waiting-queue orderings within a priority class: fcfs, lpm (longest prefix match first) and priority.

Across classes: fair_share.py; who is preempted: preemption.py."""

from __future__ import annotations

from sgl.runtime.cache.radix_cache import RadixCache
from sgl.runtime.scheduler.request import Req

# NOTE: lpm matches every waiting request against the tree each step; past this queue length the
# cost outweighs the gain and we fall back to fcfs (SGLang does the same).
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, cache: RadixCache) -> list[Req]:
    if policy == "lpm" and not cache.disabled and len(waiting) <= LPM_MAX_QUEUE:
        # match_prefix may split nodes but never changes what is cached, so this is side-effect free.
        return sorted(waiting, key=lambda r: (-len(cache.match_prefix(r.fill_ids[: r.max_prefix_len], r.cache_namespace).slots), r.arrival))
    if policy == "priority":
        return sorted(waiting, key=lambda r: (-r.priority, r.arrival))
    return sorted(waiting, key=lambda r: r.arrival)

