"""The approximate tree and the routing policies, without servers."""

from __future__ import annotations

import random

import pytest

from sgl.runtime.config import ROUTER_POLICIES, ServerArgs
from sgl.runtime.router.config import RouterArgs
from sgl.runtime.router.policy import POLICIES, CacheAware, make_policy
from sgl.runtime.router.tree import ApproxTree


def brute_match(records: dict[str, list[str]], text: str) -> dict[str, int]:
    out = {}
    for w, texts in records.items():
        best = 0
        for t in texts:
            k = 0
            while k < min(len(t), len(text)) and t[k] == text[k]:
                k += 1
            best = max(best, k)
        if best:
            out[w] = best
    return out


def test_match_equals_brute_force_on_random_strings() -> None:
    rng = random.Random(0)
    tree, records = ApproxTree(), {"a": [], "b": [], "c": []}
    for _ in range(300):
        w = rng.choice("abc")
        t = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 12)))
        tree.insert(t, w)
        records[w].append(t)
        q = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 14)))
        assert tree.match(q) == brute_match(records, q)
    for w in "abc":  # chars[w] == size of w's union of prefixes
        assert tree.size(w) == len({t[:i] for t in records[w] for i in range(1, len(t) + 1)})


def test_prune_drops_least_recent_and_remove_worker() -> None:
    tree = ApproxTree(max_chars=10)
    tree.insert("aaaaaa", "w", now=1.0)
    tree.insert("bbbbbb", "w", now=2.0)  # 12 chars > 10: the older "aaaaaa" goes
    assert tree.size("w") <= 10 and tree.match("aaaaaa") == {} and tree.match("bbbbbb") == {"w": 6}
    tree.insert("bbbbbbcc", "v")
    tree.remove_worker("w")
    assert tree.match("bbbbbbcc") == {"v": 8} and tree.size("w") == 0


def test_cache_aware_prefers_longest_match_then_balances() -> None:
    p = CacheAware(balance_threshold=2, cache_threshold=0.5)
    ws = ["A", "B"]
    first, d1 = p.choose(ws, "system one: hello", {"A": 0, "B": 0})
    p.on_routed(first, "system one: hello")
    other, d2 = p.choose(ws, "another two: hi", {"A": 0, "B": 0})  # no match -> smallest tree
    p.on_routed(other, "another two: hi")
    assert (d1, d2) == ("low_match", "low_match") and first != other
    again, d = p.choose(ws, "system one: hello again", {"A": 1, "B": 1})
    assert (again, d) == (first, "cache_hit")
    loads = {first: 3, other: 0}  # 3 - 0 > 2: spread
    assert p.choose(ws, "system one: hello again", loads) == (other, "balance")
    loads = {first: 2, other: 0}  # within the threshold: still the cache
    assert p.choose(ws, "system one: hello again", loads) == (first, "cache_hit")


def test_other_policies() -> None:
    rr = make_policy("round_robin")
    assert [rr.choose(["A", "B"], "", {})[0] for _ in range(4)] == ["A", "B", "A", "B"]
    rnd = make_policy("random", seed=1)
    assert {rnd.choose(["A", "B"], "", {})[0] for _ in range(50)} == {"A", "B"}
    p2 = make_policy("power_of_two", seed=1)
    assert all(p2.choose(["A", "B"], "", {"A": 5, "B": 0})[0] == "B" for _ in range(20))
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("nope")


def test_config_validation() -> None:
    assert ROUTER_POLICIES == POLICIES
    assert ServerArgs(dp_size=2).dp_size == 2
    with pytest.raises(ValueError, match="dp_size"):
        ServerArgs(dp_size=0)
    with pytest.raises(ValueError, match="router_policy"):
        ServerArgs(router_policy="x")
    with pytest.raises(ValueError, match="worker_urls"):
        RouterArgs(worker_urls=["localhost:1"])
    with pytest.raises(ValueError, match="balance_threshold"):
        RouterArgs(worker_urls=[], balance_threshold=-1)


def test_forget_equals_brute_force_on_random_strings() -> None:
    """An eviction event drops the worker's entries under the prefix that it last used before the poll."""
    rng = random.Random(1)
    tree, records = ApproxTree(), {"a": [], "b": []}  # worker -> [(text, time)]
    clock = 0.0
    for _ in range(400):
        clock += 1.0
        w = rng.choice("ab")
        if rng.random() < 0.6:
            t = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 10)))
            tree.insert(t, w, now=clock)
            records[w].append((t, clock))
        else:
            prefix = "".join(rng.choice("xyz") for _ in range(rng.randint(1, 5)))
            before = clock - rng.choice([0.0, 5.0, 20.0])
            tree.forget(w, prefix, before)
            records[w] = [(t[:len(prefix) - 1], s) if t.startswith(prefix) and s < before else (t, s)
                          for t, s in records[w]]
        texts = {k: [t for t, _ in v if t] for k, v in records.items()}
        q = "".join(rng.choice("xyz") for _ in range(rng.randint(0, 12)))
        assert tree.match(q) == brute_match(texts, q)
        for k in "ab":
            assert tree.size(k) == len({t[:i] for t in texts[k] for i in range(1, len(t) + 1)})


def test_cache_aware_follows_evictions() -> None:
    """After the worker reports evicting a prompt, the policy no longer routes that prompt by cache."""
    policy = CacheAware(cache_threshold=0.5)
    policy.tree.insert("system prompt A: question 1", "w1", now=1.0)
    policy.tree.insert("another prompt B: question 1", "w2", now=1.0)
    assert policy.choose(["w1", "w2"], "system prompt A: question 2", {})[0] == "w1"
    policy.on_evicted("w1", "system prompt A: question 1", kept=7, before=2.0)  # kept "system "
    assert policy.tree.match("system prompt A: question 2") == {"w1": 7}
    assert policy.choose(["w1", "w2"], "system prompt A: question 2", {})[1] == "low_match"
