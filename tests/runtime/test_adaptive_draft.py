"""The adaptive draft length (runtime/scheduler/speculative_rows.py) over a verify cost
(runtime/speculative/verify_cost.py): no draft where the cost says none pays, k where it does;
shadow drafts find a copy phase without verify rows; `speculative_always_draft` ignores the cost;
outputs stay the reference's either way. The cost is measured on a real (tiny) model."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from sgl.runtime.config import ServerArgs
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.scheduler.speculative_rows import SpeculativeRows, best_draft_len, followed, make_speculative_rows
from sgl.runtime.speculative.drafter import Draft
from sgl.runtime.speculative.verify_cost import VerifyCost, draft_lengths, measure_verify_cost

from .fake_runner import FakeRunner, FakeTokenizer, next_token, reference_output
from .test_speculative_verify import tiny_model

# The default model's verify rows on 1 thread before a multi-row fused decoder (benchmarks/speculative_history.md):
# no draft pays below ~0.8
MEASURED = VerifyCost(((0, 1.0), (1, 2.06), (2, 2.51), (4, 3.09), (8, 4.88)), 0.01, "measured")
CHEAP = VerifyCost(((0, 1.0), (1, 1.02), (8, 1.16)), 0.01, "measured")  # verify nearly free
EXPENSIVE = VerifyCost(((0, 1.0), (1, 2.0)), 0.01, "measured")  # a row of 1 + j costs 1 + j steps: never pays


def test_cost_interpolates_and_extrapolates() -> None:
    assert MEASURED(0) == 1.0 and MEASURED(4) == pytest.approx(3.09)
    assert MEASURED(3) == pytest.approx((2.51 + 3.09) / 2)
    assert MEASURED(6) == pytest.approx((3.09 + 4.88) / 2)
    assert EXPENSIVE(5) == pytest.approx(6.0)  # the last slope goes on
    assert draft_lengths(8) == list(range(1, 9)) and draft_lengths(3) == [1, 2, 3]
    assert draft_lengths(40) == list(range(1, 9)) + [16, 32, 40]


@pytest.mark.parametrize("a", [0.0, 0.5, 0.9, 0.999])
def test_no_draft_when_the_cost_says_none_pays(a: float) -> None:
    assert best_draft_len(a, 8, EXPENSIVE) == 0


def test_drafts_when_it_pays() -> None:
    assert best_draft_len(1.0, 8, EXPENSIVE) == 0  # even a sure draft only breaks even
    assert best_draft_len(0.9, 8, CHEAP) == 8  # cheap verify rows: the whole k
    assert best_draft_len(0.6, 8, MEASURED) == 0  # chat-like acceptance does not pay a 2x row
    assert best_draft_len(0.97, 8, MEASURED) >= 4  # copying does
    assert best_draft_len(0.97, 8, MEASURED, per_draft=1.0) == 0  # unless drafting itself costs a step per token


def test_followed_scores_chains_and_trees() -> None:
    chain = Draft([5, 6, 7])
    assert followed(chain, []) == (0, False)
    assert followed(chain, [5, 6]) == (2, False)
    assert followed(chain, [5, 9, 7]) == (1, True)
    assert followed(chain, [5, 6, 7, 8]) == (3, True)
    tree = Draft([5, 6, 8, 9], [-1, 0, -1, 2])  # 5 -> 6 and 8 -> 9
    assert followed(tree, [8, 9]) == (2, True)  # a leaf: final
    assert followed(tree, [8]) == (1, False)
    assert followed(tree, [7]) == (0, True)


class OracleDrafter:
    """The fake target's true continuation (every draft accepted), or a wrong one."""

    name = "oracle"

    def __init__(self, right: bool = True, prior: float = 0.5) -> None:
        self.right, self.accept_prior, self.calls = right, prior, 0

    def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
        self.calls += 1
        out = []
        for req in reqs:
            seq, draft = list(req.fill_ids), []
            for _ in range(k):
                t = next_token(seq) if self.right else (next_token(seq) % 50) + 1000
                draft.append(t)
                seq.append(t)
            out.append(Draft(draft))
        return out


def run(drafter: OracleDrafter, cost: VerifyCost, max_new: int = 60, first: Optional[OracleDrafter] = None,
        **kw) -> tuple[Scheduler, Req]:
    """One request through the fake runner with `drafter` (behind `first`'s lane if given: what
    --speculative-ngram-first builds with NGRAM), its output checked."""
    args = ServerArgs(speculative_num_draft_tokens=4, speculative_max_batch=8, **kw)
    s = Scheduler(args, FakeRunner(), OutputProcessor(FakeTokenizer()), 400, lambda r: None, drafter=drafter)
    if first is not None:
        s.spec = SpeculativeRows(args, drafter, lanes=[first, drafter])
    s.spec.cost = cost
    req = Req(rid="r", prompt_ids=[3, 4, 5], params=SamplingParams(temperature=0, max_new_tokens=max_new),
              arrival=s.next_arrival())
    s.add_request(req)
    for _ in range(500):
        if not s.has_work:
            break
        s.step()
        s.check_integrity()
    assert req.finished and req.output_ids == reference_output([3, 4, 5], max_new)
    return s, req


def test_shadow_drafts_find_a_copy_phase_below_the_prior() -> None:
    # prior 0.5 under MEASURED: no draft pays; the shadows score 4/4 and the request starts drafting
    s, req = run(OracleDrafter(right=True, prior=0.5), MEASURED)
    assert req.spec_verify_ct > 0 and req.spec_lanes["oracle"].accept_prob > 0.9
    assert s.spec.stats.accepted_tokens == s.spec.stats.draft_tokens  # verified drafts were all right
    assert s.stats.num_steps < 60 / 2


def test_wrong_drafts_never_reach_a_verify_row() -> None:
    s, req = run(OracleDrafter(right=False, prior=0.5), MEASURED)
    assert s.spec.stats.verify_ct == 0 and req.spec_lanes["oracle"].accept_prob < 0.5
    assert s.spec.drafter.calls > 10  # it kept shadowing (NGRAM-cheap), learning nothing pays


class AskedDrafter(OracleDrafter):
    """The oracle, recording the sequence lengths it was asked at."""

    def __init__(self, right: bool = True, prior: float = 0.5) -> None:
        super().__init__(right, prior)
        self.asked: list[int] = []

    def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
        self.asked += [len(r.fill_ids) for r in reqs]
        return super().propose(reqs, k)


class SometimesDrafter(AskedDrafter):
    """The oracle's draft where the sequence's length is even, none elsewhere (a lane that finds a match half the
    time)."""

    name = "sometimes"

    def __init__(self, right: bool = True, prior: float = 0.8) -> None:
        super().__init__(right, prior)

    def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
        drafts = super().propose(reqs, k)
        return [d if len(r.fill_ids) % 2 == 0 else Draft([]) for r, d in zip(reqs, drafts)]


def test_the_next_lane_drafts_only_where_the_first_has_no_draft() -> None:
    first, model = SometimesDrafter(), AskedDrafter()
    s, req = run(model, CHEAP, first=first)
    lanes = {lane.name: lane for lane in s.spec.lanes}
    assert lanes["sometimes"].stats.verify_ct > 0 and lanes["oracle"].stats.verify_ct > 0
    assert s.spec.stats.verify_ct == lanes["sometimes"].stats.verify_ct + lanes["oracle"].stats.verify_ct
    assert model.asked and all(n % 2 == 1 for n in model.asked)  # never a request the first lane drafted for
    assert s.stats.spec_per_drafter["oracle"]["accept_rate"] == 1.0


def test_a_lane_whose_drafts_fail_leaves_its_requests_to_the_next() -> None:
    # the first lane (prior 0.8: it drafts under MEASURED) is always wrong; the model lane (prior 0.5: no draft pays)
    # learns from its shadows that it is right, and drafts
    first = AskedDrafter(right=False, prior=0.8)
    first.name = "first"
    s, req = run(OracleDrafter(right=True, prior=0.5), MEASURED, first=first)
    lanes = {lane.name: lane for lane in s.spec.lanes}
    assert 0 < lanes["first"].stats.verify_ct < 5 and lanes["first"].stats.accepted_tokens == 0
    assert req.spec_lanes["first"].accept_prob < 0.5 and req.spec_lanes["oracle"].accept_prob > 0.9
    assert lanes["oracle"].stats.verify_ct > 0
    assert lanes["oracle"].stats.accepted_tokens == lanes["oracle"].stats.draft_tokens
    assert s.stats.num_steps < 60 / 2


def test_ngram_first_goes_with_a_model_drafter() -> None:
    for algo in (None, "NGRAM"):
        with pytest.raises(ValueError, match="speculative_ngram_first"):
            ServerArgs(speculative_algorithm=algo, speculative_ngram_first=True)
    args = ServerArgs(speculative_algorithm="EAGLE", speculative_ngram_first=True, speculative_ngram_max_bfs_breadth=3)
    rows = make_speculative_rows(args, OracleDrafter())
    assert [lane.name for lane in rows.lanes] == ["NGRAM", "oracle"] and rows.lanes[0].drafter.max_breadth == 3
    assert [lane.name for lane in make_speculative_rows(ServerArgs(), OracleDrafter()).lanes] == ["oracle"]


def test_the_corpus_lane_comes_after_ngram_and_before_a_model() -> None:
    from sgl.runtime.speculative.ngram import NgramDrafter

    tok = FakeTokenizer()
    tok.encode_batch = lambda texts: [[1, 2, 3]] * len(texts)  # the shipped corpus's texts: any ids will do here
    names = lambda rows: [lane.name for lane in rows.lanes]  # noqa: E731
    model = ServerArgs(speculative_algorithm="EAGLE", speculative_ngram_corpus="default")
    assert names(make_speculative_rows(model, OracleDrafter(), tok)) == ["PREDICTION", "CORPUS", "oracle"]
    both = ServerArgs(speculative_algorithm="EAGLE", speculative_ngram_corpus="default", speculative_ngram_first=True)
    assert names(make_speculative_rows(both, OracleDrafter(), tok)) == ["PREDICTION", "NGRAM", "CORPUS", "oracle"]
    ngram = ServerArgs(speculative_algorithm="NGRAM", speculative_ngram_corpus="default")
    rows = make_speculative_rows(ngram, NgramDrafter(2, 4), tok)
    assert names(rows) == ["PREDICTION", "NGRAM", "CORPUS"] and rows.drafter is rows.lanes[1].drafter
    with pytest.raises(ValueError, match="speculative_ngram_corpus needs"):
        ServerArgs(speculative_ngram_corpus="default")


def test_always_draft_ignores_the_cost() -> None:
    s, req = run(OracleDrafter(right=False, prior=0.5), EXPENSIVE, speculative_always_draft=True)
    assert s.spec.stats.verify_ct > 50 and s.spec.stats.accepted_tokens == 0


def test_measured_cost_on_a_tiny_model() -> None:
    model = tiny_model(0)
    kv = KVCache.for_model(model.config, 64, torch.float32, "cpu")
    cost = measure_verify_cost(model, kv, 4, model.config.vocab_size, reps=1)
    assert cost.source == "measured" and cost.decode_seconds > 0
    assert [j for j, _ in cost.points] == [0, 1, 2, 3, 4]
    assert all(c > 0 for _, c in cost.points)


def test_a_pool_too_small_to_time_in_keeps_the_assumed_curve() -> None:
    model = tiny_model(0)
    kv = KVCache.for_model(model.config, 6, torch.float32, "cpu")
    assert measure_verify_cost(model, kv, 8, model.config.vocab_size).source == "assumed"
    assert measure_verify_cost(model, KVCache.for_model(model.config, 12, torch.float32, "cpu"), 8,
                               model.config.vocab_size, reps=1).source == "measured"  # a shorter context


def test_the_cost_times_rows_as_the_scheduler_runs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler's decode and verify rows are generated-only batches (model_runner), which take the fused
    C++ decoder; the timed rows must be too (they were timed as prompt rows: the prefill path, ~2x dearer)."""
    from sgl.runtime.executor.forward_batch import ForwardBatch

    built: list[tuple[int, bool]] = []
    original = ForwardBatch.from_lists.__func__

    def spy(cls, input_ids, slot_tables, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append((len(input_ids[0]), bool(kwargs.get("generated_only", False))))
        return original(cls, input_ids, slot_tables, *args, **kwargs)

    monkeypatch.setattr(ForwardBatch, "from_lists", classmethod(spy))
    model = tiny_model(0)
    kv = KVCache.for_model(model.config, 64, torch.float32, "cpu")
    measure_verify_cost(model, kv, 4, model.config.vocab_size, reps=1)
    context, *rows = built
    assert not context[1]  # the context is a prompt
    assert sorted({n for n, _ in rows}) == [1, 2, 3, 4, 5] and all(g for _, g in rows)


@pytest.mark.parametrize("threads", [1, 2])
def test_with_helper_threads_the_timed_steps_come_after_the_kernels_adaptive_probe(
        threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With helper threads the CPU kernels' adaptive sites time their first ADAPTIVE_PROBE calls alone, then with
    the helpers: a decode step timed there ran its lm_head alone (2 threads, q8: 3.1 ms instead of 1.7) and a 1 + 1
    row measured 0.86 decode steps. Steps of 1 and 2 tokens run first, enough to get past the probe; the clock is
    wall time (the thread's CPU time misses the helper's share), the thread's CPU time on 1 thread."""
    import time

    from sgl.kernels.cpu import quant
    from sgl.runtime.speculative import verify_cost

    monkeypatch.setattr(quant, "_threads", threads)
    rows: list[int] = []  # the rows' token counts, in order
    model = tiny_model(0)
    forward = model.forward

    def counted(fb, kv):  # type: ignore[no-untyped-def]
        rows.append(fb.num_tokens)
        return forward(fb, kv)

    monkeypatch.setattr(model, "forward", counted)
    assert verify_cost.step_clock() is (time.thread_time if threads == 1 else time.perf_counter)
    kv = KVCache.for_model(model.config, 64, torch.float32, "cpu")
    cost = measure_verify_cost(model, kv, 4, model.config.vocab_size, reps=1)
    assert cost.source == "measured"
    probe = [1, 2] * verify_cost.ADAPTIVE_PROBE if threads > 1 else []
    # the context, the probe's steps, the warm-up round, the timed round: each 1 + j row right after a 1-token row
    assert rows == [32] + probe + [1, 2, 3, 4, 5] + [1, 2, 1, 3, 1, 4, 1, 5]


def test_the_measured_cost_is_a_median_of_paired_ratios_and_never_decreases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each 1 + j row is timed against the 1-token row just before it; one slow call (here: the 1 + 1 row five times
    too slow in one round, the 1-token row before it three times too slow in another) moves one ratio of three, not
    the median; the curve is made non-decreasing and >= 1. (Per-length mins divided by the 1-token rows' min moved
    every ratio with the luck of that one min: 1 + 1 read 0.99-1.24 decode steps on an idle machine.)"""
    from sgl.runtime.speculative import verify_cost

    now, calls = [0.0], [0]
    monkeypatch.setattr(verify_cost, "step_clock", lambda: lambda: now[0])
    model = tiny_model(0)
    forward = model.forward

    def timed(fb, kv):  # type: ignore[no-untyped-def]
        calls[0] += 1
        j = fb.num_tokens - 1  # drafts in the row; the true cost is 1 + 0.1 j (j = 4 reads less: see below)
        now[0] += (1.0 + 0.1 * j) * (5.0 if calls[0] == 8 else 3.0 if calls[0] == 15 else 1.0)
        now[0] -= 0.2 if j == 4 else 0.0  # a row cheaper than the one before it: the fit pools them
        return forward(fb, kv)

    monkeypatch.setattr(model, "forward", timed)
    kv = KVCache.for_model(model.config, 64, torch.float32, "cpu")
    cost = measure_verify_cost(model, kv, 4, model.config.vocab_size, reps=3)
    got = [round(c, 6) for _, c in cost.points]
    assert got == [1.0, 1.1, 1.2, 1.25, 1.25] and cost.decode_seconds == 1.0
    assert verify_cost.non_decreasing([1.0, 1.3, 1.1, 1.2, 1.5]) == pytest.approx([1.0, 1.2, 1.2, 1.2, 1.5])


@pytest.mark.parametrize("slow", [0, 1, 2])
def test_one_slow_propose_call_does_not_stop_a_cheap_lane(monkeypatch: pytest.MonkeyPatch, slow: int) -> None:
    """The drafter's time per token is the median of its recent calls: one slow call (a GIL wait under wall time, a
    full garbage collection) must not make a microsecond drafter look dear for good. (As an average, one 1 s call made
    every draft cost ~5 decode steps: the rule stopped drafting and, with no more calls, never measured it again. As
    the median of the calls so far, a slow FIRST call did the same: slow = 0 failed before TIMED_CALLS.)"""
    import sgl.runtime.scheduler.speculative_rows as rows

    now = [0.0]
    monkeypatch.setattr(rows, "step_clock", lambda: lambda: now[0])

    class Timed(OracleDrafter):
        def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
            now[0] += 1.0 if self.calls == slow else 1e-6  # call `slow` takes a second, the others a microsecond
            return super().propose(reqs, k)

    drafter = Timed(right=True, prior=0.9)
    s, req = run(drafter, CHEAP, max_new=80)
    assert next(lane for lane in s.spec.lanes if lane.drafter is drafter).draft_seconds < 1e-5
    assert s.spec.stats.verify_ct > 10 and s.stats.num_steps < 80 / 2  # it kept drafting after the slow call
