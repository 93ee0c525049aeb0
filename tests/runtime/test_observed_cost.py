"""What the adaptive rule learns of a drafting step's cost while it serves (runtime/speculative/verify_cost.py's
ObservedCost, runtime/scheduler/speculative_rows.py): the start-up curve scaled by the batch-1 steps the scheduler
runs, and a drafter's catch-up priced per drafting step and per token it is behind."""

from __future__ import annotations

from typing import Any

import pytest

import sgl.runtime.scheduler.scheduler as scheduler_module
from sgl.runtime.config import ServerArgs
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req, SpecLane
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.scheduler.speculative_rows import DECODE_PROBE_EVERY, SpeculativeRows, best_draft_len
from sgl.runtime.speculative.drafter import Draft
from sgl.runtime.speculative.verify_cost import MIN_OBSERVED, SCALE_RANGE, ObservedCost, VerifyCost

from .fake_runner import FakeRunner, FakeTokenizer, next_token, reference_output
from .test_adaptive_draft import OracleDrafter

# a row's drafts priced at 0.3 decode steps each: at a per-draft acceptance of 0.6 one draft pays (1.6 / 1.3 tokens
# per step), at three times that price none does (1.6 / 1.9)
CURVE = VerifyCost(((0, 1.0), (1, 1.3), (2, 1.6), (4, 2.2), (8, 3.4)), 0.01, "measured")


def test_the_observed_scale_multiplies_the_curves_extra_cost() -> None:
    obs = ObservedCost(VerifyCost(CURVE.points, 0.0, "measured"))  # no decode step measured at start-up
    for _ in range(MIN_OBSERVED - 1):
        obs.add(0, 2.0)
    obs.add(1, 10.0)  # no decode step to compare with yet: not a multiple
    assert obs.curve is obs.measured and not obs.multiples
    obs.add(0, 2.0)  # the decode step is now the observed median, the curve's shape unchanged
    assert obs.curve.decode_seconds == 2.0 and obs.curve.points == CURVE.points
    for j, seconds in [(1, 2.0 * 1.6), (2, 2.0 * 2.2), (4, 2.0 * 3.4)]:  # each row's extra cost twice the curve's
        obs.add(j, seconds)
    assert obs.scale == 1.0  # fewer than MIN_OBSERVED verify steps
    obs.add(8, 2.0 * 1000.0)  # an outlier: the median holds
    assert obs.scale == pytest.approx(2.0)
    assert obs.curve(1) == pytest.approx(1.6) and obs.curve(8) == pytest.approx(1.0 + 2.0 * 2.4)
    assert obs.curve.source == "measured" and obs.curve(0) == 1.0
    low = ObservedCost(CURVE)
    for _ in range(MIN_OBSERVED):
        low.add(0, 1.0)
    for _ in range(MIN_OBSERVED):
        low.add(2, 0.5)  # verify faster than decode (noise): bounded, and never below one decode step
    assert low.scale == SCALE_RANGE[0] and low.curve(2) > 1.0
    early = ObservedCost(CURVE)  # rows verified before any decode step: measured against the start-up decode step
    for _ in range(MIN_OBSERVED):
        early.add(1, CURVE.decode_seconds * 1.6)
    assert early.scale == pytest.approx(2.0) and early.curve.decode_seconds == CURVE.decode_seconds


def fake_clock_run(monkeypatch: pytest.MonkeyPatch, observe: bool, true_draft_cost: float,
                   max_new: int = 80, decode: float = 1.0, drafter: Any = None) -> tuple[Scheduler, Req]:
    """One request through a fake runner whose step of 1 + j tokens takes `decode` (1 + `true_draft_cost` j) units of
    the scheduler's step clock (the start-up curve's decode step is 1 unit), drafted by a drafter right on its first
    token every other step (per-draft acceptance ~0.5) or by `drafter`, under CURVE; `observe`: the engine's
    ObservedCost corrects CURVE."""
    now = [0.0]
    monkeypatch.setattr(scheduler_module, "step_clock", lambda: lambda: now[0])

    class Timed(FakeRunner):
        def run(self, batch):  # noqa: ANN001, ANN201 - the runner protocol
            now[0] += sum(decode * (1.0 + true_draft_cost * r.draft_len) for r in batch.rows)
            return super().run(batch)

    class HalfRight(OracleDrafter):
        def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
            drafts = super().propose(reqs, k)
            return [d if len(r.fill_ids) % 2 == 0 else Draft([(next_token(list(r.fill_ids)) % 50) + 1000] * len(d))
                    for r, d in zip(reqs, drafts)]

    args = ServerArgs(speculative_num_draft_tokens=4, speculative_max_batch=8)
    s = Scheduler(args, Timed(), OutputProcessor(FakeTokenizer()), 400, lambda r: None,
                  drafter=drafter or HalfRight(prior=0.6))
    s.spec.cost = VerifyCost(CURVE.points, 1.0, "measured")  # a decode step is one unit of the fake clock
    if observe:
        s.spec.observed = ObservedCost(s.spec.cost)
    req = Req(rid="r", prompt_ids=[3, 4, 5], params=SamplingParams(temperature=0, max_new_tokens=max_new),
              arrival=s.next_arrival())
    s.add_request(req)
    while s.has_work:
        s.step()
        s.check_integrity()
    assert req.finished and req.output_ids == reference_output([3, 4, 5], max_new)
    return s, req


def test_a_curve_that_prices_rows_too_low_is_corrected_by_the_rows_it_lets_through(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # CURVE prices a draft at 0.3 decode steps; the runner's rows cost 0.9 per draft: at ~0.5 acceptance every row the
    # rule verifies loses. Alone, CURVE verifies all through the request; corrected, the rule stops after a few rows.
    fixed, _ = fake_clock_run(monkeypatch, observe=False, true_draft_cost=0.9)
    corrected, _ = fake_clock_run(monkeypatch, observe=True, true_draft_cost=0.9)
    assert fixed.spec.stats.verify_ct > 20
    assert corrected.spec.observed.scale == pytest.approx(3.0)
    assert corrected.spec.cost(1) == pytest.approx(1.9) and corrected.spec.cost.decode_seconds == 1.0
    assert corrected.spec.stats.verify_ct <= 2 * MIN_OBSERVED + 2
    # rows priced right are kept: the same drafts at the curve's own price go on being verified
    right, _ = fake_clock_run(monkeypatch, observe=True, true_draft_cost=0.3)
    assert right.spec.observed.scale == pytest.approx(1.0) and right.spec.stats.verify_ct > 20


def test_rows_always_right_are_priced_against_a_decode_step_of_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drafter right from the first token (a prediction) leaves no decode step to time: the rows were priced
    against the start-up decode step, here 1.5x faster than the steps of now (a longer context, a busier minute),
    and a row's extra cost read ~2x what it is. Every DECODE_PROBE_EVERY rows one step decodes without a draft, and
    rows are priced against it, those verified before it too."""
    s, req = fake_clock_run(monkeypatch, observe=True, true_draft_cost=0.3, max_new=300, decode=1.5,
                            drafter=OracleDrafter(right=True, prior=0.9))
    observed = s.spec.observed
    assert observed.decode_seconds == pytest.approx(1.5) and observed.scale == pytest.approx(1.0)
    assert s.spec.cost(4) == pytest.approx(CURVE(4))  # the curve's own price: it was right all along
    rows, decodes = s.spec.stats.verify_ct, len(observed.decode)
    assert decodes >= MIN_OBSERVED and rows >= DECODE_PROBE_EVERY * (decodes - 1)  # a probe per 16 rows, no more
    assert s.spec.stats.accept_rate == 1.0 and req.spec_accepted_tokens > 0.7 * 300  # at most 4 of each 5 tokens


def test_catchup_tips_the_draft_length() -> None:
    assert best_draft_len(0.6, 8, CURVE) == 1  # 1.6 tokens for 1.3 steps
    assert best_draft_len(0.6, 8, CURVE, per_step=0.2) == 2  # a cost per step favours longer drafts: 1.96 for 1.8
    assert best_draft_len(0.6, 8, CURVE, per_step=0.5) == 0  # and a high one none (1.6 for 1.8, 1.96 for 2.1, ...)


class CatchingUp(OracleDrafter):
    """The oracle with EAGLE's catch-up report: 0.2 decode steps per call plus 0.05 per token it runs over (the
    tokens since its last call for the request; its whole prompt at the first)."""

    def __init__(self, decode_seconds: float) -> None:
        super().__init__(right=True, prior=0.9)
        self.decode_seconds = decode_seconds
        self.seen: dict[str, int] = {}
        self.catchup_seconds, self.catchup_tokens = 0.0, 0

    def propose(self, reqs, k):  # noqa: ANN001, ANN201 - the Drafter protocol
        self.catchup_tokens = sum(len(r.fill_ids) - self.seen.get(r.rid, 0) for r in reqs)
        self.catchup_seconds = self.decode_seconds * (0.2 * len(reqs) + 0.05 * self.catchup_tokens)
        self.seen.update({r.rid: len(r.fill_ids) for r in reqs})
        return super().propose(reqs, k)


def test_catchup_is_priced_per_drafting_step_and_per_token_behind() -> None:
    args = ServerArgs(speculative_num_draft_tokens=4, speculative_max_batch=8)
    drafter = CatchingUp(CURVE.decode_seconds)
    rows = SpeculativeRows(args, drafter, CURVE)
    lane = rows.lanes[0]
    req = Req(rid="r", prompt_ids=list(range(1, 41)), params=SamplingParams(temperature=0, max_new_tokens=64),
              arrival=0)
    reqs: list[Any] = [req]
    first = rows.drafts(reqs)  # the first call runs over the 40-token prompt: timed per token, not per step
    assert not lane.catchups and list(lane.catchup_token) == pytest.approx([CURVE.decode_seconds * 2.2 / 40])
    req.output_ids += first[req].token_ids[:2]  # two tokens later, the next call is a step's catch-up
    rows.drafts(reqs)
    assert list(lane.catchups) == pytest.approx([CURVE.decode_seconds * (0.2 + 0.05 * 2)])
    assert rows.per_step(lane, req) == pytest.approx(0.3)  # within a step's tokens: the step's catch-up alone
    req.output_ids += [7] * 25  # 25 tokens it did not draft for: 20 past a step's (k + 1 = 5) are priced per token
    assert rows.per_step(lane, req) == pytest.approx(0.3 + 20 * 2.2 / 40)
    assert SpecLane().called_at == 0
