"""The radix tree against a reference model: a dict from every cached prefix to its KV slot."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.cache.radix_cache import RadixCache

POOL = 200
keys = st.lists(st.integers(0, 3), min_size=1, max_size=12)


def longest_cached(ref: dict[tuple[int, ...], int], key: list[int]) -> int:
    n = 0
    while n < len(key) and tuple(key[: n + 1]) in ref:
        n += 1
    return n


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_radix_tree_matches_reference(data: st.DataObject) -> None:
    alloc = SlotAllocator(POOL)
    tree = RadixCache(alloc)
    ref: dict[tuple[int, ...], int] = {}
    locked: list[tuple[list[int], object, list[int]]] = []  # (key, node, slots)
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["insert", "match", "lock", "unlock", "evict"]))
        key = data.draw(keys)
        if op == "insert":
            slots = alloc.alloc(len(key))
            if slots is None:
                continue
            n = tree.insert(key, slots)
            assert n == longest_cached(ref, key)
            alloc.free(slots[:n])  # duplicates of what the tree already holds
            for i in range(n, len(key)):
                ref[tuple(key[: i + 1])] = slots[i]
        elif op in ("match", "lock"):
            m = tree.match_prefix(key)
            n = longest_cached(ref, key)
            assert m.slots == [ref[tuple(key[: i + 1])] for i in range(n)]
            if op == "lock" and m.slots:
                tree.lock(m.node)
                locked.append((key[:n], m.node, m.slots))
        elif op == "unlock" and locked:
            _, node, _ = locked.pop(data.draw(st.integers(0, len(locked) - 1)))
            tree.unlock(node)
        elif op == "evict":
            want = data.draw(st.integers(1, POOL))
            before = tree.evictable_size
            freed = tree.evict(want)
            assert freed >= min(want, before) or tree.evictable_size == 0
            ref = {k: s for k, s in ref.items() if not alloc._is_free[s]}
        # invariants after every operation
        tree.check_integrity()
        assert alloc.available + tree.total_size == POOL
        assert len(ref) == tree.total_size
        assert all(k[:-1] in ref for k in ref if len(k) > 1), "cached prefixes are prefix-closed"
        for lkey, _, lslots in locked:  # locked prefixes survive everything
            assert tree.match_prefix(lkey).slots == lslots
    for _, node, _ in locked:
        tree.unlock(node)
    assert tree.protected_size == 0
    tree.evict(POOL)
    assert alloc.available == POOL


def test_split_keeps_locks() -> None:
    alloc = SlotAllocator(20)
    tree = RadixCache(alloc)
    tree.insert([1, 2, 3, 4], alloc.alloc(4))
    m = tree.match_prefix([1, 2, 3, 4])
    tree.lock(m.node)
    tree.match_prefix([1, 2, 9])  # splits the locked node
    tree.check_integrity()
    assert tree.evict(100) == 0
    tree.unlock(m.node)
    assert tree.evict(100) == 4


def test_eviction_log_names_each_evicted_leaf_and_what_stays() -> None:
    """Each evicted leaf is logged with its root path and the length the tree still holds; a reader's
    cursor skips what it saw, and entries that fell out of the bounded log are counted as lost."""
    alloc = SlotAllocator(POOL)
    tree = RadixCache(alloc)
    tree.insert([1, 2, 3], alloc.alloc(3))
    tree.insert([1, 2, 4, 5], alloc.alloc(4))  # splits: [1, 2] -> [3], [4, 5]
    assert tree.evict(1) == 1  # the LRU leaf: [3]
    events, lost, cursor = tree.evictions_since(0)
    assert [(e.path, e.kept) for e in events] == [([1, 2, 3], 2)] and lost == 0 and cursor == 1
    tree.evict(tree.total_size)  # [4, 5], then its parent [1, 2]
    events, lost, cursor = tree.evictions_since(cursor)
    assert [(e.path, e.kept) for e in events] == [([1, 2, 4, 5], 2), ([1, 2], 0)] and cursor == 3
    for _ in range(RadixCache.EVICTION_LOG):
        tree.insert([7], alloc.alloc(1))
        tree.evict(1)
    events, lost, cursor = tree.evictions_since(0)
    assert lost == 3 and len(events) == RadixCache.EVICTION_LOG and cursor == 3 + RadixCache.EVICTION_LOG
    tree.check_integrity()
