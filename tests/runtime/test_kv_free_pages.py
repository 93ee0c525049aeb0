"""The KV pool gives back the pages of freed slots when the engine goes idle (runtime/idle_memory.py
release_free_kv): before, a slot's page stayed resident once touched, whether a prefix was evicted,
flushed or a request preempted; the radix cache's slots (cached prefixes) keep theirs."""

from __future__ import annotations

import sys

import pytest
import torch

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.idle_memory import release_free_kv

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap, madvise")


def test_take_freed_runs_sees_each_free_only_once() -> None:
    a = SlotAllocator(64)
    s = a.alloc(40)
    assert a.take_freed_runs() == []  # nothing freed: slots never handed out were never written
    a.free(s[5:20])
    a.free(s[30:32])
    assert a.take_freed_runs(min_len=3) == [(5, 20)]  # the 2-slot run is too short to cover a page
    assert a.take_freed_runs() == []  # taken
    a.free(s[:5])
    assert a.take_freed_runs() == [(0, 20)]  # whole: a page may straddle it and the run freed before
    a.free(s[20:30] + s[32:])
    assert a.take_freed_runs() == [(0, 64)]  # up to the pool's end (never written: harmless)
    assert a.available == 64  # taking runs does not change what is free


@linux
def test_freed_slots_pages_go_back_and_held_slots_keep_their_kv() -> None:
    # the default model's per-layer geometry (3 kv heads x 64: 768 B a slot per layer and pool), 4 layers
    kv = KVCache(num_layers=4, num_slots=8192, num_kv_heads=3, head_dim=64, dtype=torch.float32)
    a = SlotAllocator(8192)
    slots = a.alloc(4000)
    for layer in range(4):
        ids = torch.tensor(slots)
        kv.store(layer, ids, ids.float().view(-1, 1, 1).expand(-1, 3, 64), -ids.float().view(-1, 1, 1).expand(-1, 3, 64))
    touched = kv.resident_bytes()
    assert touched >= 4000 * kv.slot_bytes * 8  # 4 layers x K, V
    a.free(slots[1000:3500])  # evicted
    dropped = release_free_kv(a, kv)
    assert dropped >= 0.98 * 2500 * kv.slot_bytes * 8, dropped
    assert kv.resident_bytes() <= touched - dropped + (1 << 16)
    for layer in (0, 3):  # the held slots' K/V are intact, up to the pages they share with freed slots
        assert torch.equal(kv.k_buffer(layer)[:1000, 0, 0], torch.arange(1000).float())
        assert torch.equal(kv.v_buffer(layer)[3500:4000, 2, 63], -torch.arange(3500, 4000).float())
    assert release_free_kv(a, kv) == 0  # nothing freed since
