"""Routing policies: pick one healthy worker for a request.

    policy = make_policy("cache_aware", balance_threshold=8, cache_threshold=0.5)
    worker, decision = policy.choose(["http://a", "http://b"], text, loads={"http://a": 0, "http://b": 2})
    policy.on_routed(worker, text)      # cache_aware: remember that worker now caches the prompt

cache_aware (sglang-router's policy): the worker with the longest prefix match in the approximate
tree, unless its load (in-flight requests) exceeds the least loaded worker's by more than
`balance_threshold` ("balance"), or the match covers less than `cache_threshold` of the prompt
("low_match": then the least loaded worker, ties to the smallest tree, which spreads distinct
prefixes over the workers). `decision` names the branch taken, counted in the router's /metrics.
"""

from __future__ import annotations

import itertools
import random
from typing import Optional, Protocol, Sequence

from sgl.runtime.router.tree import ApproxTree

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


class Policy(Protocol):
    name: str

    def choose(self, workers: Sequence[str], text: str, loads: dict[str, int]) -> tuple[str, str]: ...

    def on_routed(self, worker: str, text: str) -> None: ...

    def remove_worker(self, worker: str) -> None: ...

    def on_evicted(self, worker: str, text: str, kept: int, before: float) -> None: ...

    def clear(self) -> None: ...


class _Stateless:
    name = ""

    def on_routed(self, worker: str, text: str) -> None:
        pass

    def remove_worker(self, worker: str) -> None:
        pass

    def on_evicted(self, worker: str, text: str, kept: int, before: float) -> None:
        pass

    def clear(self) -> None:
        pass


class RoundRobin(_Stateless):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, workers: Sequence[str], text: str, loads: dict[str, int]) -> tuple[str, str]:
        return workers[next(self._counter) % len(workers)], "round_robin"


class Random(_Stateless):
    name = "random"

    def __init__(self, seed: Optional[int] = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, workers: Sequence[str], text: str, loads: dict[str, int]) -> tuple[str, str]:
        return self._rng.choice(list(workers)), "random"


class PowerOfTwo(_Stateless):
    """Two random workers, the less loaded of them."""
    name = "power_of_two"

    def __init__(self, seed: Optional[int] = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, workers: Sequence[str], text: str, loads: dict[str, int]) -> tuple[str, str]:
        if len(workers) == 1:
            return workers[0], "power_of_two"
        a, b = self._rng.sample(list(workers), 2)
        return (a if loads.get(a, 0) <= loads.get(b, 0) else b), "power_of_two"


class CacheAware:
    name = "cache_aware"

    def __init__(self, balance_threshold: int = 8, cache_threshold: float = 0.5,
                 max_tree_chars: int = 1 << 20) -> None:
        self.balance_threshold = balance_threshold
        self.cache_threshold = cache_threshold
        self.tree = ApproxTree(max_tree_chars)

    def choose(self, workers: Sequence[str], text: str, loads: dict[str, int]) -> tuple[str, str]:
        least = min(workers, key=lambda w: (loads.get(w, 0), self.tree.size(w)))
        matches = self.tree.match(text)
        # Longest match; among equal matches the least loaded (then the first listed).
        best = max(workers, key=lambda w: (matches.get(w, 0), -loads.get(w, 0)))
        if loads.get(best, 0) - loads.get(least, 0) > self.balance_threshold:
            return least, "balance"
        if not text or matches.get(best, 0) < self.cache_threshold * len(text):
            return least, "low_match"
        return best, "cache_hit"

    def on_routed(self, worker: str, text: str) -> None:
        if text:
            self.tree.insert(text, worker)

    def remove_worker(self, worker: str) -> None:
        self.tree.remove_worker(worker)

    def on_evicted(self, worker: str, text: str, kept: int, before: float) -> None:
        """The worker's cache holds `text[:kept]` but nothing under `text[:kept + 1]` any more (an
        eviction event); entries routed at or after `before` (monotonic) may be cached again and stay."""
        if kept < len(text):
            self.tree.forget(worker, text[:kept + 1], before)

    def clear(self) -> None:
        self.tree = ApproxTree(self.tree.max_chars)


def make_policy(name: str, balance_threshold: int = 8, cache_threshold: float = 0.5,
                max_tree_chars: int = 1 << 20, seed: Optional[int] = None) -> Policy:
    if name == "cache_aware":
        return CacheAware(balance_threshold, cache_threshold, max_tree_chars)
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return Random(seed)
    if name == "power_of_two":
        return PowerOfTwo(seed)
    raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
