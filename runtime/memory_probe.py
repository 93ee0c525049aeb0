"""Resident memory of address ranges: how much of a preallocated buffer the process has touched.

    >>> resident_bytes([(0, 0)])
    0

The KV pool is allocated uninitialized (runtime/executor/kv_cache.py): Linux maps its pages on first
write, so the process RSS rises as the allocator hands out slots the pool never used before, up to
the pool's size, and then stays. A soak that wants to see leaks subtracts this from the RSS.

Counted page by page from /proc/self/pagemap (bit 63: present, bit 62: swapped; readable without
privileges, only the frame numbers are hidden). `drop_pages` gives such pages back. An earlier version scaled each /proc/self/smaps
mapping's Rss by the share the ranges cover; once the pool was plain malloc memory, the kernel merged
its mappings with neighbours that were touched differently and the estimate read half the truth (the
CI soak then saw the other half as a 117 MB/min "leak"). Linux only; elsewhere 0. No torch here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Sequence

import numpy as np

PAGEMAP = "/proc/self/pagemap"
_IN_MEMORY = np.uint64((1 << 63) | (1 << 62))  # present or swapped: pages the process has touched


def resident_bytes(ranges: Sequence[tuple[int, int]], pagemap_path: str = PAGEMAP) -> int:
    """Bytes of the pages overlapping `ranges` ([start, end) byte addresses) that are present or swapped
    (a page shared by two ranges counts once per range)."""
    ranges = [(a, b) for a, b in ranges if b > a]
    if not ranges:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    touched = 0
    try:
        with open(pagemap_path, "rb", buffering=0) as f:
            for a, b in ranges:
                first, last = a // page, (b - 1) // page
                f.seek(first * 8)
                entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
                touched += int(np.count_nonzero(entries & _IN_MEMORY))
    except OSError:
        return 0
    return touched * page


_MADV_DONTNEED = 4  # Linux


def drop_pages(ranges: Sequence[tuple[int, int]]) -> int:
    """madvise(MADV_DONTNEED) on the whole pages inside each [start, end) of private anonymous memory: the OS
    takes them back, and the next write (or read) of one faults in a zeroed page. Returns the bytes advised.

    NOTE: the contents of those pages are LOST: only for memory no one reads before writing it again (the KV
    pool's free slots, runtime/executor/kv_cache.py). A page shared with bytes outside a range is kept.
    Linux only; elsewhere nothing is dropped (0)."""
    if not sys.platform.startswith("linux"):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    libc = _libc()
    dropped = 0
    for a, b in ranges:
        first, last = -(-a // page) * page, (b // page) * page  # whole pages inside [a, b)
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            dropped += last - first
    return dropped


_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
    return _LIBC[0]
