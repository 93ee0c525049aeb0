"""Verify rows on a real (tiny, random) model: the scheduler, the model runner and the sampler
together. Greedy and seeded sampling give the SAME tokens with and without drafts, with penalties,
logit_bias, min_new_tokens and logprobs; the output distribution under temperature 1 equals the
target's (chi-square over many seeds, small vocabulary)."""

from __future__ import annotations

import random
from typing import Sequence

import pytest
import torch
from scipy.stats import chisquare

from sgl.runtime.config import ServerArgs
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.executor.model_runner import ModelRunner
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.speculative.drafter import Draft
from sgl.runtime.speculative.draft_model import DraftModelDrafter
from sgl.runtime.speculative.ngram import NgramDrafter


pytestmark = pytest.mark.timeout(300)
V = 6


class Tok:
    def __init__(self, eos: frozenset[int]) -> None:
        self.eos_token_ids = eos

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in ids)


class RandomDrafter:
    """Random drafts over the small vocabulary: many accepted, many rejected."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        return [Draft([self.rng.randrange(V) for _ in range(self.rng.randrange(k + 1))]) for _ in reqs]


def tiny_model(seed: int, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=V, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False))
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model(3)


def run(model, prompts: list[list[int]], params: list[SamplingParams], drafter=None, eos=frozenset({1}),
        logprobs: bool = False, **kw) -> tuple[list[Req], Scheduler]:
    pool = 4096
    runner = ModelRunner(model, model.config, pool, eos)
    done: dict[str, Req] = {}
    args = ServerArgs(speculative_max_batch=256, max_running_requests=256, **kw)
    s = Scheduler(args, runner, OutputProcessor(Tok(eos)), pool,
                  lambda r: done.__setitem__(r.rid, r) if r.finished else None, drafter=drafter)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        s.add_request(Req(rid=str(i), prompt_ids=p, params=sp, arrival=s.next_arrival(),
                          return_logprob=logprobs, top_logprobs_num=2 if logprobs else 0))
    while s.has_work:
        s.step()
        s.check_integrity()
    return [done[str(i)] for i in range(len(prompts))], s


PARAMS = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3),
    dict(temperature=0, logit_bias={"2": 1.5}, min_new_tokens=12),
    dict(temperature=1.0, sampling_seed=11),
    dict(temperature=0.8, top_p=0.9, top_k=4, sampling_seed=12, frequency_penalty=0.5),
    dict(temperature=1.2, min_p=0.05, sampling_seed=13, repetition_penalty=1.2, min_new_tokens=8,
         logit_bias={"3": -1.0}),
]


def _drafter(name: str, model: LlamaForCausalLM):  # noqa: ANN202 - any Drafter
    if name == "random":
        return RandomDrafter(1)
    if name == "ngram":
        return NgramDrafter(1, 3)
    if name == "ngram_tree":  # several continuations as one tree, finished requests' sequences too
        return NgramDrafter(1, 3, max_breadth=3, capacity=2000)
    if name == "draft_self":  # the target as its own draft: greedy drafts all accepted
        return DraftModelDrafter(model, model.config, 4096)
    small = tiny_model(7, layers=1, hidden=16)  # another model with the same vocabulary
    return DraftModelDrafter(small, small.config, 4096)


@pytest.mark.parametrize("drafter", ["random", "ngram", "ngram_tree", "draft_self", "draft_small"])
def test_same_tokens_and_logprobs_with_and_without_drafts(model, drafter: str) -> None:
    rng = random.Random(0)
    prompts, params = [], []
    for i in range(24):
        prompts.append([rng.randrange(V) for _ in range(rng.randrange(2, 12))])
        params.append(SamplingParams(max_new_tokens=rng.randrange(1, 30), **PARAMS[i % len(PARAMS)]))
    base, _ = run(model, prompts, params, logprobs=True)
    d = _drafter(drafter, model)
    spec, s = run(model, prompts, params, drafter=d, logprobs=True, speculative_num_draft_tokens=4)
    assert s.stats.spec_verify_ct > 0 and s.stats.spec_accepted_tokens > 0
    assert s.stats.spec_accepted_tokens < s.stats.spec_draft_tokens  # sampled rows reject some
    if drafter.startswith("draft"):
        d.propose([], 1)  # sweeps the finished requests' states
        assert d.used_slots == 0, "the draft pool leaked"

    for a, b in zip(base, spec):
        assert b.output_ids == a.output_ids, (a.rid, a.params)
        assert b.finish_reason == a.finish_reason
        assert b.output_logprobs == pytest.approx(a.output_logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in b.output_top_logprobs] == \
            [[t for t, _ in top] for top in a.output_top_logprobs]
    assert s.allocator.available + s.cache.total_size == s.allocator.size


def test_target_as_its_own_draft_accepts_every_greedy_draft(model) -> None:
    """The draft model's KV bookkeeping (catch-up, rejected tails dropped) is right iff a model
    drafting for itself has every greedy draft accepted."""
    rng = random.Random(4)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(2, 9))] for _ in range(8)]
    params = [SamplingParams(max_new_tokens=rng.randrange(5, 40), temperature=0) for _ in prompts]
    base, _ = run(model, prompts, params, eos=frozenset())
    d = DraftModelDrafter(model, model.config, 4096)
    spec, s = run(model, prompts, params, drafter=d, eos=frozenset(), speculative_num_draft_tokens=3)
    assert [r.output_ids for r in spec] == [r.output_ids for r in base]
    assert s.stats.spec_draft_tokens > 50 and s.stats.spec_accepted_tokens == s.stats.spec_draft_tokens


def _target_probs(model, prompt: list[int], prefix: list[int]) -> torch.Tensor:
    """p(· | prompt + prefix) under temperature 1, no filters: [V] float64 (one plain forward)."""
    seq = prompt + prefix
    kv = KVCache.for_model(model.config, len(seq), torch.float32)
    fb = ForwardBatch.from_lists([seq], [list(range(len(seq)))])
    with torch.inference_mode():
        logits = model.compute_logits(model(fb, kv)[-1:])[0].double()
    return torch.softmax(logits, dim=-1)


def assert_tokens_2_3_follow_target(model, prompt: list[int], outs: list) -> None:
    """Chi-square of output tokens 2-3 (joint counts over the runs `outs`) against the exact target
    probabilities sum_t1 p(t1) p(t2|t1) p(t3|t1,t2); cells with expected counts < 5 are left out."""
    n = len(outs)
    counts = torch.zeros(V, V, dtype=torch.float64)
    for r in outs:
        counts[r.output_ids[1], r.output_ids[2]] += 1
    expected = torch.zeros(V, V, dtype=torch.float64)
    p1 = _target_probs(model, prompt, [])
    for a in range(V):
        p2 = _target_probs(model, prompt, [a])
        for b in range(V):
            expected[b] += p1[a] * p2[b] * _target_probs(model, prompt, [a, b])
    keep = expected.flatten() * n >= 5  # chi-square needs expected counts >= 5 per cell
    obs, exp = counts.flatten()[keep], expected.flatten()[keep] * n
    exp *= obs.sum() / exp.sum()
    stat = chisquare(obs.numpy(), exp.numpy())
    assert stat.pvalue > 1e-3, stat


def test_distribution_equals_target_chi_square(model) -> None:
    """Tokens 2 and 3 of temperature-1 samples (token 1 comes from the prefill; tokens 2-3 from a
    verify row [t1, d] that accepts or rejects d): joint counts over 4000 seeds vs the exact
    target probabilities sum_t1 p(t1) p(t2|t1) p(t3|t1,t2)."""
    prompt = [2, 4, 0, 3]
    n = 4000
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, sampling_seed=10_000 + i) for i in range(n)]
    outs, s = run(model, [prompt] * n, params, drafter=RandomDrafter(5), eos=frozenset(),
                  speculative_num_draft_tokens=2)
    assert s.stats.spec_accepted_tokens > 300 and s.stats.spec_draft_tokens - s.stats.spec_accepted_tokens > 1000
    assert_tokens_2_3_follow_target(model, prompt, outs)
