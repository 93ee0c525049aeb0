"""The KV token-slot pool: which of the `size` KV slots are free. Pure bookkeeping, no tensors.

SGLang's token_to_kv_pool allocator with page size 1. The tensors live in the model runner's KVCache;
this class only hands out slot indices. Invariant: every slot is either in the free list or owned by
exactly one holder (the radix tree or one running request); `check_integrity` in the scheduler sums
them up.

    >>> a = SlotAllocator(8)
    >>> slots = a.alloc(3)
    >>> a.available
    5
    >>> a.free(slots); a.available
    8
"""

from __future__ import annotations

from array import array
from typing import Iterable, Optional


class SlotAllocator:
    def __init__(self, size: int) -> None:
        assert size > 0
        self.size = size
        # NOTE: a stack whose end holds the lowest free slots; `alloc` returns them ascending, so a
        # fresh sequence gets consecutive slots and attention can read its K/V as a view, no gather.
        # int32 array, not a list: a list of Python ints costs 40 bytes a slot (5 MB resident for the
        # default model's 122K-slot pool, tests/runtime/test_slot_allocator.py), the array 4.
        self._free = _stack(size)
        self._is_free = bytearray(b"\x01") * size
        self._freed_below = 0  # every slot freed since the last `take_freed_runs` is below this

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> Optional[list[int]]:
        """n free slots, or None when fewer than n are free (the caller evicts or preempts)."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:][::-1].tolist()
        del self._free[-n:]
        is_free = self._is_free
        for s in out:
            is_free[s] = 0
        return out

    def free(self, slots: Iterable[int]) -> None:
        # NOTE: pushed highest first, so the lowest freed slot is allocated first: a request that frees
        # the tail of its own allocation (a verify row's rejected drafts) gets it back in order next
        # step, and its slot table stays consecutive (attention reads its K/V as a view, no gather).
        order = sorted(slots, reverse=True)
        is_free = self._is_free
        for k, s in enumerate(order):
            if is_free[s]:
                self._free.fromlist(order[:k])  # those marked free so far are pushed too: still consistent
                raise AssertionError(f"double free of KV slot {s}")
            is_free[s] = 1
        self._free.fromlist(order)
        if order and order[0] >= self._freed_below:
            self._freed_below = order[0] + 1

    def take_freed_runs(self, min_len: int = 1) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of at least `min_len` free slots that start below every slot freed since
        the last call (the KV pages such a run covers may be resident; slots never handed out were never
        written). Resets that mark: the next call looks only at what is freed after this one."""
        hi, is_free, runs, pos = self._freed_below, self._is_free, [], 0
        while pos < hi:  # NOTE: bytearray.find scans in C: ~50 us for 100K slots
            start = is_free.find(1, pos, hi)
            if start < 0:
                break
            end = is_free.find(0, start)  # (whole: a page may straddle a run freed now and one freed before)
            end = self.size if end < 0 else end
            if end - start >= min_len:
                runs.append((start, end))
            pos = end
        self._freed_below = 0
        return runs

    def clear(self) -> None:
        self._freed_below = self.size  # (held slots were written: the next take looks at the whole pool)
        self._free = _stack(self.size)
        self._is_free = bytearray(b"\x01") * self.size


def _stack(size: int) -> "array[int]":
    """Every slot free: [size - 1, ..., 1, 0] (the end is popped first)."""
    assert size < 2**31, size  # int32 slot ids
    return array("i", range(size - 1, -1, -1))
