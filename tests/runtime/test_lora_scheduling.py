"""LoRA in the scheduler and the caches, without a model: the radix tree keys prefixes by
(adapter, tokens), a batch holds at most --max-loras-per-batch adapters, and the adapter pool
evicts least recently used idle adapters and never one a request holds."""

from __future__ import annotations

import pytest

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.cache.radix_cache import RadixCache
from sgl.runtime.lora.adapter import AdapterError, LoraAdapter
from sgl.runtime.lora.pool import AdapterPool, parse_lora_paths

from .test_scheduler import add, make_scheduler, run_to_end


def fake_adapter(name: str) -> LoraAdapter:
    return LoraAdapter(name=name, path=f"/adapters/{name}", rank=4, scaling="alpha/r", layers=[{}])


def test_radix_namespaces_never_share_and_stay_consistent() -> None:
    alloc = SlotAllocator(64)
    tree = RadixCache(alloc)
    tree.insert([1, 2, 3, 4], alloc.alloc(4))
    tree.insert([1, 2, 3, 4], alloc.alloc(4), namespace=7)
    assert len(tree.match_prefix([1, 2, 3, 9]).slots) == 3
    assert len(tree.match_prefix([1, 2, 3, 9], namespace=8).slots) == 0  # another adapter: nothing
    m = tree.match_prefix([1, 2, 5], namespace=7)  # splits a node inside namespace 7 only
    assert len(m.slots) == 2 and set(m.slots).isdisjoint(tree.match_prefix([1, 2]).slots)
    tree.lock(m.node)
    tree.check_integrity()
    assert tree.evict(64) == 4 + 2  # base's 4 and namespace 7's unlocked tail; its locked [1, 2] stays
    tree.unlock(m.node)
    tree.check_integrity()
    assert tree.evict(64) == 2 and tree.total_size == 0
    assert list(tree.roots) == [None]  # an emptied adapter namespace is dropped
    tree.check_integrity()


def test_same_prompt_under_different_adapters_is_not_a_cache_hit() -> None:
    s, _, done = make_scheduler(1000)
    a, b = fake_adapter("a"), fake_adapter("b")
    prompt = list(range(1, 40))
    for rid, adapter in (("base", None), ("a1", a), ("a2", a), ("b1", b), ("base2", None)):
        if adapter is not None:
            adapter.refs += 1  # as AdapterPool.acquire does
        add(s, rid, prompt, 3, lora=adapter)
        run_to_end(s)
    cached = {rid: done[rid].num_cached_tokens for rid in done}
    assert cached == {"base": 0, "a1": 0, "a2": len(prompt) - 1, "b1": 0, "base2": len(prompt) - 1}
    assert a.refs == 0 and b.refs == 0  # the scheduler dropped each request's reference at finish


def test_a_batch_holds_at_most_max_loras_per_batch_adapters() -> None:
    s, runner, done = make_scheduler(4000, max_loras_per_batch=2)
    adapters = [fake_adapter(f"x{i}") for i in range(3)]
    by_rid = {}
    for i in range(9):
        adapter = adapters[i % 3] if i % 4 else None
        if adapter is not None:
            adapter.refs += 1
        add(s, f"r{i}", [5, i + 1, 7, 8], 6, lora=adapter)
        by_rid[f"r{i}"] = adapter
    run_to_end(s)
    assert len(done) == 9 and all(d.finish_reason["type"] == "length" for d in done.values())
    for batch in runner.batches:
        assert len({by_rid[rid].uid for rid, _, _ in batch if by_rid[rid] is not None}) <= 2
    assert any(len({by_rid[r].uid for r, _, _ in b if by_rid[r]}) == 2 for b in runner.batches)


def test_pool_evicts_lru_idle_adapters_and_reloads_them() -> None:
    loads = []

    def loader(name: str, path: str) -> LoraAdapter:
        loads.append(name)
        return fake_adapter(name)

    pool = AdapterPool(loader, max_loaded=2)
    for name in ("a", "b", "c"):
        pool.add(fake_adapter(name))
    assert [n for n in "abc" if pool.get(n).resident] == ["b", "c"] and pool.num_evictions == 1
    a = pool.acquire("a")  # reloaded; b is now the least recently used
    assert loads == ["a"] and a.resident and not pool.get("b").resident
    b = pool.acquire("b")  # reloaded; c evicted; a is held by a request, so it stays
    assert a.resident and b.resident and not pool.get("c").resident
    pool.remove("a")  # unloaded while in use: new requests cannot name it, its request keeps the weights
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        pool.acquire("a")
    assert a.resident
    a.refs -= 1
    pool.acquire("c")
    assert not a.resident  # freed once its last request finished
    with pytest.raises(AdapterError, match="already loaded"):
        pool.add(fake_adapter("c"))


def test_parse_lora_paths() -> None:
    assert parse_lora_paths(["x=/a/b", "/c/d/"]) == [("x", "/a/b"), ("d", "/c/d/")]
    with pytest.raises(ValueError, match="twice"):
        parse_lora_paths(["x=/a", "x=/b"])


def test_generate_body_lora_path_is_checked() -> None:
    from sgl.runtime.protocol import RequestError, normalize_generate_input

    reqs, _ = normalize_generate_input({"text": ["a", "b"], "lora_path": ["x", None]})
    assert [r.lora_path for r in reqs] == ["x", None]
    assert normalize_generate_input({"text": "a", "lora_path": "x"})[0][0].lora_path == "x"
    for bad in ({"text": ["a", "b"], "lora_path": ["x"]}, {"text": "a", "lora_path": ["x"]},
                {"text": "a", "lora_path": 3}, {"text": ["a"], "lora_path": [{}]}):
        with pytest.raises(RequestError, match="lora_path"):
            normalize_generate_input(bad)
