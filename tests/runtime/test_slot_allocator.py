"""The KV slot allocator's order: a request that frees the tail of its own allocation (a verify row's
rejected drafts) gets those slots back first and in order, so its slot table stays consecutive and
attention reads its K/V as a view of the pool instead of gathering them in every layer."""

from __future__ import annotations

import random

import pytest

from sgl.runtime.cache.allocator import SlotAllocator


def test_freed_draft_slots_come_back_in_order() -> None:
    a = SlotAllocator(256)
    table = a.alloc(10)  # the prompt
    assert table == list(range(10))
    rng = random.Random(0)
    for _ in range(20):  # verify steps: 1 + 4 new slots, a random number of drafts rejected
        new = a.alloc(5)
        keep = 1 + rng.randrange(5)
        a.free(new[keep:])
        table += new[:keep]
    assert table == list(range(len(table)))  # consecutive: one view of the pool


def test_double_free_is_caught_whatever_the_order() -> None:
    a = SlotAllocator(8)
    s = a.alloc(3)
    a.free(s[::-1])
    with pytest.raises(AssertionError, match="double free"):
        a.free([s[1], s[0]])


def test_free_list_costs_bytes_not_objects_per_slot() -> None:
    # A list of Python ints held 40 bytes per slot: 5 MB resident for the default model's 122K-slot pool,
    # 40 MB for a million slots. The int32 stack plus the free flags: 5 bytes per slot.
    import tracemalloc

    tracemalloc.start()
    try:
        a = SlotAllocator(1 << 20)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 6 * (1 << 20), held
    assert a.alloc(3) == [0, 1, 2] and a.available == (1 << 20) - 3
