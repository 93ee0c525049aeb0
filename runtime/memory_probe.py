"""Resident memory of address ranges: how much of a preallocated buffer the process has touched.

    >>> resident_bytes([(0, 0)])
    0

The KV pool is allocated uninitialized (runtime/executor/kv_cache.py): Linux maps its pages on first
write, so the process RSS rises as the allocator hands out slots the pool never used before, up to
the pool's size, and then stays. A soak that wants to see leaks subtracts this from the RSS.
Reads /proc/self/smaps (Linux); elsewhere it returns 0. No torch here.
"""

from __future__ import annotations

from typing import Sequence

SMAPS = "/proc/self/smaps"


def resident_bytes(ranges: Sequence[tuple[int, int]], smaps_path: str = SMAPS) -> int:
    """Resident bytes of the mappings that overlap `ranges` ([start, end) byte addresses), each
    mapping's `Rss` scaled by the share of it the ranges cover (uniform-touch estimate for mappings
    that hold more than the ranges: at most the 2 MiB alignment pad of `alloc_huge`)."""
    ranges = [(a, b) for a, b in ranges if b > a]
    if not ranges:
        return 0
    total = 0.0
    try:
        with open(smaps_path) as f:
            span = None
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # "start-end perms offset dev inode path"
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    covered = sum(max(0, min(hi, b) - max(lo, a)) for a, b in ranges)
                    span = (covered / (hi - lo)) if covered else None
                elif head == "Rss:" and span is not None:
                    total += int(line.split()[1]) * 1024 * span
    except OSError:
        return 0
    return int(total)
