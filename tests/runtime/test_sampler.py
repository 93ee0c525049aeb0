"""The sampler: greedy, filtered distributions (chi-square against the analytic distribution), seeded
determinism across batch compositions, penalties against references, masks, failures, logprobs."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch
from scipy import stats

from sgl.kernels.bitmask import allocate_token_bitmask, pack_token_bitmask
from sgl.runtime.executor.logit_processors import process_logits
from sgl.runtime.executor.sampler import logprobs_for_tokens, sample
from sgl.runtime.executor.sampling_state import RowSamplingState
from sgl.runtime.protocol import SamplingParams

pytestmark = pytest.mark.timeout(120)

EOS = 0


def state(prompt: Optional[list[int]] = None, eos: frozenset[int] = frozenset({EOS}), **params) -> RowSamplingState:
    return RowSamplingState.create(SamplingParams.from_dict(params), prompt or [1, 2, 3], eos)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------------------------
# Analytic reference: the filtered, renormalized distribution (float64, full sort, numpy).
def reference_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                    min_p: float = 0.0) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    if 0 < top_k < len(p):
        ps[top_k:] = 0.0
        ps /= ps.sum()  # top-p applies to the distribution renormalized after top-k
    if top_p < 1.0:
        exclusive = np.cumsum(ps) - ps
        ps[exclusive > top_p] = 0.0
    if min_p > 0.0:
        ps[ps < min_p * ps.max()] = 0.0
    out = np.zeros_like(p)
    out[order] = ps / ps.sum()
    return out


def reference_token(logits: torch.Tensor, params: dict, u: float) -> int:
    """Inverse CDF with the same uniform, in float64: index order for unfiltered rows, descending
    probability order for filtered ones (what the sampler documents)."""
    x = logits.double().numpy()
    filtered = params.get("top_k", -1) > 0 or params.get("top_p", 1.0) < 1.0 or params.get("min_p", 0.0) > 0.0
    p = reference_probs(x, params.get("temperature", 1.0), params.get("top_k", -1),
                        params.get("top_p", 1.0), params.get("min_p", 0.0))
    order = np.argsort(-p, kind="stable") if filtered else np.arange(len(p))
    cdf = np.cumsum(p[order])
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(order[min(j, len(p) - 1)])


def draw_many(logits_row: torch.Tensor, n: int, **params) -> np.ndarray:
    """n samples of one distribution: n rows with distinct seeds in one batch."""
    rows = [state(sampling_seed=1000 + i, **params) for i in range(n)]
    res = sample(logits_row.unsqueeze(0).expand(n, -1).contiguous(), rows, None, [0] * n)
    assert not res.failed_rows
    return np.bincount(np.array(res.token_ids), minlength=logits_row.shape[0])


SMALL = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.2, -0.3, -1.0, -2.0])  # V = 8, no ties

FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.7),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, min_p=0.3),
    dict(temperature=1.2, top_k=5, top_p=0.8),
    dict(temperature=1.0, top_k=3, top_p=0.7),  # top-p after renormalizing the top 3 keeps 2 tokens, not 3
    dict(temperature=1.0, top_k=6, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_filtered_distribution_chi_square(params):
    n = 3000
    counts = draw_many(SMALL, n, **params)
    expected = reference_probs(SMALL.numpy(), params.get("temperature", 1.0), params.get("top_k", -1),
                               params.get("top_p", 1.0), params.get("min_p", 0.0))
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled filtered-out tokens: {counts} vs {expected}"
    assert support.sum() >= 2  # the configs are chosen so the test has something to check
    p_value = stats.chisquare(counts[support], n * expected[support]).pvalue
    assert p_value > 1e-3, (counts, n * expected)


def test_chi_square_has_power():
    """The same test rejects the unfiltered distribution for top-p samples (so it can fail)."""
    counts = draw_many(SMALL, 3000, temperature=1.0, top_p=0.9)
    unfiltered = reference_probs(SMALL.numpy())
    assert stats.chisquare(counts, 3000 * unfiltered).pvalue < 1e-6


@pytest.mark.parametrize("V,params", [
    (2048, dict(temperature=1.0)),                     # plain: blocked inverse CDF over the vocabulary
    (1000, dict(temperature=0.7)),                     # plain, vocabulary not a multiple of the block
    (3000, dict(temperature=1.0, top_p=0.95)),         # flat: the K ladder climbs to the whole vocabulary
    (3000, dict(temperature=0.3, top_p=0.9)),          # peaked: the first K suffices
    (3000, dict(temperature=1.0, top_k=200, top_p=0.5)),
    (3000, dict(temperature=1.0, min_p=0.002)),        # min-p with more than 64 survivors
])
def test_draw_equals_inverse_cdf_reference(V, params):
    """Every row inverts the CDF of its filtered distribution with one uniform from its generator."""
    n = 40
    scale = 0.3 if params.get("temperature") == 1.0 and "top_p" in params and "top_k" not in params else 3.0
    logits = randn(n, V, seed=V, scale=scale)
    rows = [state(sampling_seed=i, **params) for i in range(n)]
    res = sample(logits, rows, None, [0] * n)
    for i in range(n):
        u = torch.rand((), generator=torch.Generator().manual_seed(i), dtype=torch.float64).item()
        assert res.token_ids[i] == reference_token(logits[i], params, u), i


# --------------------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_ties_pick_the_first():
    logits = randn(6, 50, seed=1)
    logits[5, 7] = logits[5, 30] = 100.0  # a tie
    rows = [state(temperature=0.0) for _ in range(6)]
    res = sample(logits, rows, None, [0] * 6)
    assert res.token_ids == logits.argmax(dim=-1).tolist()
    assert res.token_ids[5] == 7
    assert res.top_logprobs is None and res.failed_rows == []


def test_only_rows_that_want_logprobs_get_them_and_tokens_do_not_change():
    logits = randn(4, 30, seed=5, scale=2.0)
    rows = [state(temperature=0.0), state(temperature=0.9, sampling_seed=3), state(temperature=0.0),
            state(temperature=0.0)]
    every = sample(logits, rows)
    rows = [state(temperature=0.0), state(temperature=0.9, sampling_seed=3), state(temperature=0.0),
            state(temperature=0.0)]
    some = sample(logits, rows, None, [0, 0, 0, 2], want_logprobs=[False, True, False, False])
    assert some.token_ids == every.token_ids
    # row 3 asked for top logprobs only: it still gets its own token's logprob
    assert some.logprobs[0] is None and some.logprobs[2] is None
    assert some.logprobs[1] == every.logprobs[1] and some.logprobs[3] == every.logprobs[3]
    with pytest.raises(ValueError, match="want_logprobs"):
        sample(logits, rows, None, None, want_logprobs=[True])


def test_top_k_1_is_greedy_whatever_the_temperature():
    logits = randn(4, 30, seed=2)
    rows = [state(temperature=1.5, top_k=1, sampling_seed=i) for i in range(4)]
    assert sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_logprobs_are_raw_log_softmax_and_top_logprobs_sorted():
    logits = randn(3, 40, seed=3, scale=2.0)
    rows = [state(temperature=0.0, repetition_penalty=1.5, logit_bias={"5": 3.0}),
            state(temperature=0.7, top_p=0.8, sampling_seed=1, frequency_penalty=1.0),
            state(temperature=2.0, sampling_seed=2)]
    rows[1].append(4)
    res = sample(logits, rows, None, [3, 0, 5])
    raw = torch.log_softmax(logits.double(), dim=-1)
    for i, t in enumerate(res.token_ids):
        assert res.logprobs[i] == pytest.approx(raw[i, t].item(), abs=1e-5)
    assert [len(t) for t in res.top_logprobs] == [3, 0, 5]
    for i, top in enumerate(res.top_logprobs):
        lps = [lp for _, lp in top]
        assert lps == sorted(lps, reverse=True)
        ref_vals, ref_ids = raw[i].topk(len(top))
        assert [t for t, _ in top] == ref_ids.tolist()
        assert lps == pytest.approx(ref_vals.tolist(), abs=1e-5)


def test_sample_does_not_modify_logits():
    logits = randn(3, 64, seed=4)
    before = logits.clone()
    rows = [state(temperature=0.5, sampling_seed=1, repetition_penalty=1.3, min_new_tokens=3),
            state(temperature=0.0, logit_bias={"3": -5}), state(temperature=0.9, top_k=5, sampling_seed=2)]
    mask = allocate_token_bitmask(3, 64)
    mask[1] = pack_token_bitmask(torch.arange(64).unsqueeze(0) % 3 == 0)[0]
    sample(logits, rows, mask, [2, 2, 2])
    assert torch.equal(logits, before)


def test_no_processing_returns_the_same_tensor():
    logits = randn(2, 16)
    assert process_logits(logits, [state(), state(temperature=0.0)], allocate_token_bitmask(2, 16)) is logits


# --------------------------------------------------------------------------------------------------
SEEDED = [
    dict(temperature=0.9, sampling_seed=11),
    dict(temperature=1.0, top_p=0.8, sampling_seed=12),
    dict(temperature=0.7, top_k=20, min_p=0.05, sampling_seed=13, frequency_penalty=0.5),
    dict(temperature=1.3, repetition_penalty=1.2, presence_penalty=0.4, sampling_seed=14),
]


@pytest.mark.parametrize("params", SEEDED, ids=lambda p: str(p["sampling_seed"]))
def test_seeded_row_is_independent_of_batch_composition(params):
    V, steps = 4096, 6
    logits_per_step = [randn(6, V, seed=100 + s, scale=2.5) for s in range(steps)]

    def run(batch_builder) -> list[int]:
        me = state(**params)
        others = batch_builder()
        pos = len(others) // 2
        for s in range(steps):
            batch = others[:pos] + [me] + others[pos:]
            logits = logits_per_step[s][: len(batch)].clone()
            logits[pos] = logits_per_step[s][5]  # my row's logits are the same in every setup
            res = sample(logits, batch, None, [0] * len(batch))
            for row, tok in zip(batch, res.token_ids):
                row.append(tok)
        return me.output_ids

    alone = run(lambda: [])
    crowded = run(lambda: [state(temperature=0.0), state(temperature=1.0), state(top_p=0.5, min_p=0.1),
                           state(top_k=3, temperature=0.5), state(temperature=1.1, sampling_seed=5)])
    pair = run(lambda: [state(temperature=0.6, top_p=0.95)])
    assert alone == crowded == pair
    assert len(set(alone)) > 1  # it really sampled


def test_unseeded_rows_differ_and_seeded_rows_repeat():
    logits = randn(1, 1000, scale=0.1)
    a = [sample(logits, [state(temperature=1.0)]).token_ids[0] for _ in range(8)]
    b = [sample(logits, [state(temperature=1.0, sampling_seed=3)]).token_ids[0] for _ in range(8)]
    assert len(set(a)) > 1 and len(set(b)) == 1


# --------------------------------------------------------------------------------------------------
def test_repetition_penalty_matches_hf():
    transformers = pytest.importorskip("transformers.generation.logits_process")
    V = 50
    logits = randn(1, V, seed=5, scale=3.0)
    st = state(prompt=[3, 7, 7, 12], repetition_penalty=1.7)
    for t in (12, 20, 3, 20):
        st.append(t)
    ours = process_logits(logits, [st])
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([st.prompt_ids + st.output_ids]), logits.clone())
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)
    # by hand: positive logits divided, negative multiplied, once per distinct seen token
    expected = logits.clone()
    for t in {3, 7, 12, 20}:
        x = expected[0, t]
        expected[0, t] = x / 1.7 if x > 0 else x * 1.7
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_frequency_and_presence_penalties_over_output_only():
    V = 30
    logits = randn(2, V, seed=6)
    a = state(prompt=[1, 2, 5], frequency_penalty=0.5, presence_penalty=0.25)
    b = state(frequency_penalty=-1.0)
    for t in (5, 5, 9, 5):
        a.append(t)
    b.append(2)
    ours = process_logits(logits, [a, b])
    expected = logits.clone()
    for t, c in {5: 3, 9: 1}.items():
        expected[0, t] -= 0.5 * c + 0.25
    expected[1, 2] += 1.0
    torch.testing.assert_close(ours, expected)
    assert ours[0, 1] == logits[0, 1] and ours[0, 2] == logits[0, 2]  # prompt tokens are not penalized


def test_penalties_apply_in_order_repetition_then_frequency_then_bias():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    st = state(prompt=[1], repetition_penalty=2.0, frequency_penalty=1.0, logit_bias={"0": 0.5, "99": 3.0})
    st.append(0)
    ours = process_logits(logits, [st])
    # token 0: 2.0 / 2 (repetition) - 1.0 (frequency) + 0.5 (bias); token 1: -1 * 2 (prompt, repetition)
    assert ours.tolist() == [[0.5, -2.0, 0.5, 0.0]]


def test_logit_bias_steers_greedy_and_ignores_out_of_range_ids():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 1.0
    res = sample(logits, [state(temperature=0.0, logit_bias={"7": 5.0, "1000": 100.0})])
    assert res.token_ids == [7] and res.failed_rows == []
    assert res.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 7].item())


def test_min_new_tokens_blocks_eos_and_stop_ids_then_releases():
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 4], logits[0, 6] = 10.0, 9.0, 1.0
    st = state(temperature=0.0, min_new_tokens=2, stop_token_ids=[4])
    first = sample(logits, [st]).token_ids[0]
    assert first == 6
    st.append(first)
    assert sample(logits, [st]).token_ids[0] == 6
    st.append(6)
    assert sample(logits, [st]).token_ids[0] == EOS


def test_ignore_eos_masks_eos_always_but_not_stop_ids():
    logits = torch.zeros(1, 10)
    logits[0, 8], logits[0, 4], logits[0, 6] = 10.0, 9.0, 1.0
    st = state(eos=frozenset({8, 9}), temperature=0.0, ignore_eos=True, stop_token_ids=[4])
    for _ in range(3):
        tok = sample(logits, [st]).token_ids[0]
        assert tok == 4
        st.append(tok)


def test_bitmask_restricts_greedy_and_sampled_rows_and_masks_past_its_width():
    V, covered = 100, 64
    logits = randn(3, V, seed=7)
    logits[:, covered:] += 50.0  # the padded tail would win if it were not masked
    allowed = torch.zeros(3, covered, dtype=torch.bool)
    allowed[0, [3, 10, 40]] = True
    allowed[1] = True  # an unconstrained row: only the tail is masked
    allowed[2, 5::7] = True
    mask = pack_token_bitmask(allowed)
    rows = [state(temperature=0.0), state(temperature=1.0, sampling_seed=1), state(temperature=2.0, sampling_seed=2)]
    seen = [set(), set(), set()]
    for _ in range(30):
        res = sample(logits, rows, mask, [0, 0, 0])
        for i, t in enumerate(res.token_ids):
            seen[i].add(t)
    cand = [3, 10, 40]
    assert seen[0] == {cand[int(logits[0, cand].argmax())]}
    assert all(t < covered for t in seen[1]) and len(seen[1]) > 3
    assert seen[2] <= set(range(5, covered, 7)) and len(seen[2]) > 1


def test_all_masked_rows_fail_with_a_message_and_get_eos():
    V = 64
    logits = randn(3, V, seed=8)
    allowed = torch.ones(3, V, dtype=torch.bool)
    allowed[1] = False  # the grammar allows nothing
    allowed[2] = False
    allowed[2, 9] = True  # the grammar allows only EOS (9) but min_new_tokens forbids it
    rows = [state(temperature=0.0), state(temperature=1.0, sampling_seed=1, eos=frozenset({9, 4})),
            state(temperature=0.0, min_new_tokens=1, eos=frozenset({9}))]
    res = sample(logits, rows, pack_token_bitmask(allowed), [2, 2, 2])
    assert res.failed_rows == [1, 2]
    assert res.token_ids[0] == int(logits[0].argmax()) and res.token_ids[1] == 4 and res.token_ids[2] == 9
    assert "grammar allows no" in res.failure_messages[1]
    assert "min_new_tokens" in res.failure_messages[2]
    assert len(res.logprobs) == 3 and all(math.isfinite(x) for x in res.logprobs)


def test_nan_logits_fail_the_row_only():
    logits = randn(2, 16, seed=9)
    logits[1, 3] = float("nan")
    res = sample(logits, [state(temperature=0.5, sampling_seed=1), state(temperature=0.0)])
    assert res.failed_rows == [1] and "non-finite" in res.failure_messages[1]
    assert 0 <= res.token_ids[0] < 16


def test_mismatched_arguments_raise():
    with pytest.raises(ValueError, match="sampling states"):
        sample(torch.zeros(2, 8), [state()])
    with pytest.raises(ValueError, match="top_logprobs_nums"):
        sample(torch.zeros(1, 8), [state()], None, [1, 2])


def test_empty_batch():
    res = sample(torch.empty(0, 8), [], None, [])
    assert res.token_ids == [] and res.logprobs == [] and res.top_logprobs is None


def test_state_counters_stay_in_sync():
    st = state(prompt=[4, 4, 5], repetition_penalty=1.1, frequency_penalty=0.1)
    for t in [7] * 70 + list(range(100, 180)):  # grows past the initial capacity
        st.append(t)
    counts = dict(zip(st.output_counts.ids().tolist(), st.output_counts.counts().tolist()))
    assert counts[7] == 70.0 and counts[150] == 1.0 and len(counts) == 81
    assert sorted(st.seen_tokens.ids().tolist()) == sorted({4, 5, 7, *range(100, 180)})
    plain = state(prompt=[1])
    plain.append(5)
    assert plain.seen_tokens is None and plain.output_counts is None  # no penalty: nothing kept
    assert plain.output_ids == [5]


# --------------------------------------------------------------------------------------------------
def test_docstring_examples():
    import doctest

    from sgl.runtime.executor import logit_processors, sampler, sampling_state
    for module in (sampler, sampling_state, logit_processors):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_logprobs_for_tokens_matches_log_softmax_across_chunks():
    N, V = 600, 16  # more rows than one chunk
    logits = randn(N, V, seed=10, scale=2.0)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(11))
    lps, tops = logprobs_for_tokens(logits, ids, top_k=3)
    raw = torch.log_softmax(logits, dim=-1)
    assert lps == pytest.approx(raw.gather(1, ids.unsqueeze(1)).squeeze(1).tolist(), abs=1e-5)
    assert len(tops) == N and all(len(t) == 3 for t in tops)
    assert [t for t, _ in tops[599]] == raw[599].topk(3).indices.tolist()
    assert logprobs_for_tokens(logits[:2], [0, 1]).top_logprobs is None
