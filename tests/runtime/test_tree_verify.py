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
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.speculative.drafter import Draft

from tests.runtime.test_speculative_verify import PARAMS, V, assert_tokens_2_3_follow_target, run, tiny_model


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


class RandomTreeDrafter:
    """Random trees over the small vocabulary (siblings may repeat a token: the walk takes the first)."""

    name = "random_tree"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def propose(self, reqs, k: int):  # noqa: ANN001, ANN201 - the Drafter protocol
        out = []
        for _ in reqs:
            tokens, parents = random_tree(self.rng, self.rng.randrange(k + 1))
            out.append(Draft(tokens, parents))
        return out


class GreedyTreeDrafter:
    """The target's own greedy path, three deep, with a wrong sibling after every path node (best
    first, as the adaptive rule's node budget keeps the first nodes): every path node must be found
    among its siblings and accepted. (Paths through later siblings: the random-tree tests.)"""

    name = "greedy_tree"

    def __init__(self, model) -> None:  # noqa: ANN001
        self.model = model

    def propose(self, reqs, k: int):  # noqa: ANN001, ANN201
        out = []
        for req in reqs:
            seq = list(req.fill_ids)
            tokens, parents, parent = [], [], -1
            for _ in range(3):
                nxt = int(_greedy(self.model, seq))
                tokens += [nxt, (nxt + 1) % V]
                parents += [parent, parent]
                parent = len(tokens) - 2
                seq.append(nxt)
            out.append(Draft(tokens, parents))
        return out


def _greedy(model, seq: list[int]) -> int:  # noqa: ANN001
    kv = KVCache.for_model(model.config, len(seq), torch.float32)
    with torch.inference_mode():
        return int(model.compute_logits(model(ForwardBatch.from_lists([seq], [list(range(len(seq)))]), kv)[-1:]).argmax())


@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_and_logprobs_with_and_without_tree_drafts(seed: int) -> None:
    model = tiny_model(3)
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(24):
        prompts.append([rng.randrange(V) for _ in range(rng.randrange(2, 12))])
        params.append(SamplingParams(max_new_tokens=rng.randrange(1, 30), **PARAMS[i % len(PARAMS)]))
    base, _ = run(model, prompts, params, logprobs=True)
    spec, s = run(model, prompts, params, drafter=RandomTreeDrafter(seed), logprobs=True,
                  speculative_num_draft_tokens=6)  # run() checks KV integrity after every step
    assert s.stats.spec_verify_ct > 0 and 0 < s.stats.spec_accepted_tokens < s.stats.spec_draft_tokens
    for a, b in zip(base, spec):
        assert b.output_ids == a.output_ids, (a.rid, a.params)
        assert b.finish_reason == a.finish_reason
        assert b.output_logprobs == pytest.approx(a.output_logprobs, abs=1e-4)
    assert s.allocator.available + s.cache.total_size == s.allocator.size


def test_greedy_path_hidden_among_siblings_is_accepted_whole() -> None:
    model = tiny_model(3)
    rng = random.Random(2)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(2, 9))] for _ in range(6)]
    params = [SamplingParams(max_new_tokens=rng.randrange(8, 30), temperature=0) for _ in prompts]
    base, _ = run(model, prompts, params, eos=frozenset())
    spec, s = run(model, prompts, params, drafter=GreedyTreeDrafter(model), eos=frozenset(),
                  speculative_num_draft_tokens=6)
    assert [r.output_ids for r in spec] == [r.output_ids for r in base]
    # every verify row accepts the whole path its node budget kept: all of them once the acceptance
    # estimate asks for 6 nodes (rows cut short by max_new_tokens or the budget ramp excepted)
    assert s.stats.spec_accepted_tokens == sum(r.spec_accepted_tokens for r in spec)
    assert s.stats.spec_accepted_tokens >= 3 * s.stats.spec_verify_ct - 6 * len(prompts)
    assert s.stats.spec_accepted_tokens > 2 * s.stats.spec_verify_ct


def test_tree_distribution_equals_target_chi_square() -> None:
    """Tokens 2 and 3 of temperature-1 samples, verified through random trees (several candidate
    children per node): joint counts over 4000 seeds vs the exact target probabilities."""
    model = tiny_model(3)
    prompt = [2, 4, 0, 3]
    n = 4000
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, sampling_seed=10_000 + i) for i in range(n)]
    outs, s = run(model, [prompt] * n, params, drafter=RandomTreeDrafter(5), eos=frozenset(),
                  speculative_num_draft_tokens=5)
    assert s.stats.spec_accepted_tokens > 300 and s.stats.spec_draft_tokens - s.stats.spec_accepted_tokens > 1000
    assert_tokens_2_3_follow_target(model, prompt, outs)


@pytest.mark.parametrize("seed", range(4))
def test_plain_greedy_rows_take_one_batched_argmax_with_the_general_paths_tokens(seed: int) -> None:
    """sample_verify resolves plain greedy rows (no penalties, bias, mask or logprobs) with one batched max: the
    same tokens and paths as the general per-position path (the rows asking for logprobs), ties to the first
    maximum, a row with a NaN position left to the general path (which fails it as sample() does)."""
    from sgl.runtime.executor.sampling_state import RowSamplingState
    from sgl.runtime.executor.verify import sample_verify

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    V, drafts, parents, bases, P = 12, [], [], [], 0
    for j in range(5):
        n = 4 if j == 3 else rng.randrange(0, 6)
        par = random_tree(rng, n)[1] if n and j in (1, 2) else None
        drafts.append([rng.randrange(3) for _ in range(n)])  # few distinct tokens: drafts often match
        parents.append(par)
        bases.append(P)
        P += 1 + n
    logits = torch.randint(0, 3, (P, V), generator=gen).float()  # many ties: the first maximum must win
    logits[:, :3] += 2.0
    drafts[3][0] = int(logits[bases[3]].max(0).indices)  # row 3 (a chain) reaches its first draft node...
    logits[bases[3] + 1] = float("nan")  # ...whose logits are NaN: the row stops there (one token)
    logits[bases[4]] = float("nan")  # row 4 fails at its pending token (sample()'s failure)

    def outcomes(logprobs: bool) -> list:
        states = [RowSamplingState.create(SamplingParams(temperature=0, max_new_tokens=9), [0], frozenset({1})) for _ in bases]
        return sample_verify(logits, bases, drafts, states, None, [0] * len(bases), parents=parents,
                             want_logprobs=[logprobs] * len(bases))

    fast, general = outcomes(False), outcomes(True)
    for f, g in zip(fast, general):
        assert (f.token_ids, f.path, f.failure) == (g.token_ids, g.path, g.failure)
    assert any(len(f.path) for f in fast)
    assert len(fast[3].token_ids) == 1 and fast[3].path == [0] and not fast[4].token_ids and fast[4].failure
