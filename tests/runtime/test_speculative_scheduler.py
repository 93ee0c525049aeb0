"""Verify rows through the scheduler with the fake runner: outputs identical to the reference under
eviction, preemption and chunking; rejected drafts' KV slots freed at once (integrity after every
step); stop strings, stop ids and max_new_tokens cut a multi-token step exactly."""

from __future__ import annotations

import random

import pytest

from sgl.runtime.config import ServerArgs
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req, SpecLane
from sgl.runtime.scheduler.scheduler import Scheduler

from .fake_runner import FakeRunner, FakeTokenizer, NoisyOracleDrafter, next_token, reference_output
from .test_scheduler import random_workload


def make(pool: int, seed: int = 0, **kw) -> tuple[Scheduler, FakeRunner, dict[str, Req], NoisyOracleDrafter]:
    runner, done, drafter = FakeRunner(), {}, NoisyOracleDrafter(seed)

    def on_output(req: Req) -> None:
        if req.finished:
            assert req.rid not in done, "finished twice"
            done[req.rid] = req

    kw.setdefault("speculative_max_batch", 64)
    s = Scheduler(ServerArgs(**kw), runner, OutputProcessor(FakeTokenizer()), pool, on_output, drafter=drafter)
    return s, runner, done, drafter


def add(s: Scheduler, rid: str, prompt: list[int], **params) -> Req:
    params.setdefault("temperature", 0)
    req = Req(rid=rid, prompt_ids=prompt, params=SamplingParams(**params), arrival=s.next_arrival())
    s.add_request(req)
    return req


def sure(req: Req) -> Req:
    """The request's drafts are believed right: the adaptive rule drafts k for it."""
    req.spec_lanes[NoisyOracleDrafter.name] = SpecLane(accept_prob=1.0)
    return req


def drain(s: Scheduler) -> None:
    for _ in range(10_000):
        if not s.has_work:
            break
        s.step()
        s.check_integrity()  # after EVERY step: rejected drafts' slots are already free
    assert not s.has_work
    assert s.cache.protected_size == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("config", [
    dict(),
    dict(disable_radix_cache=True),
    dict(chunked_prefill_size=7, speculative_num_draft_tokens=2),
    dict(schedule_policy="priority", max_running_requests=3, speculative_num_draft_tokens=6),
])
def test_verify_rows_match_reference_under_pressure(seed: int, config: dict) -> None:
    rng = random.Random(seed)
    work = random_workload(rng, 25)
    pool = max(len(p) + m for p, m in work) + rng.randrange(0, 60)
    s, _, done, drafter = make(pool, seed, **config)
    for i, (prompt, max_new) in enumerate(work):
        add(s, f"r{i}", prompt, max_new_tokens=max_new)
        if rng.random() < 0.3:
            s.step()
            s.check_integrity()
    drain(s)
    for i, (prompt, max_new) in enumerate(work):
        req = done[f"r{i}"]
        assert req.output_ids == reference_output(prompt, max_new), f"r{i} differs"
        assert req.finish_reason == {"type": "length", "length": max_new}
    assert s.allocator.available + s.cache.total_size == pool
    st = s.stats
    assert st.spec_verify_ct > 0 and 0 < st.spec_accepted_tokens < st.spec_draft_tokens
    assert st.num_steps < sum(m for _, m in work) + len(work)  # drafts saved steps


def test_every_draft_accepted_takes_one_step_per_k_plus_one_tokens() -> None:
    s, runner, done, drafter = make(500, speculative_num_draft_tokens=3)
    drafter.p_wrong = 0.0
    drafter.rng = random.Random(0)
    drafter.rng.randrange = lambda a, b: b - 1  # always k drafts
    sure(add(s, "a", [1, 2, 3], max_new_tokens=17))  # the adaptive rule then drafts k
    drain(s)
    assert done["a"].output_ids == reference_output([1, 2, 3], 17)
    # 1 prefill step (token 1), then 4 tokens per verify step: 16 more tokens in 4 steps.
    assert len(runner.batches) == 5
    assert done["a"].spec_verify_ct == 4 and done["a"].spec_accepted_tokens == 12


def test_drafts_never_exceed_max_new_tokens() -> None:
    s, _, done, drafter = make(500, speculative_num_draft_tokens=8)
    drafter.p_wrong = 0.0
    for i, n in enumerate([1, 2, 3, 5, 9]):
        sure(add(s, f"m{i}", [7, 8, 9 + i], max_new_tokens=n))
    drain(s)
    for i, n in enumerate([1, 2, 3, 5, 9]):
        assert done[f"m{i}"].output_ids == reference_output([7, 8, 9 + i], n)


def test_stop_in_the_middle_of_a_verify_step() -> None:
    s, _, done, drafter = make(500, speculative_num_draft_tokens=6)
    drafter.p_wrong = 0.0
    ref = reference_output([1, 2, 3], 20)
    sure(add(s, "s", [1, 2, 3], max_new_tokens=20, stop=[f"<{ref[6]}>"]))
    sure(add(s, "t", [1, 2, 3], max_new_tokens=20, stop_token_ids=[ref[4]]))
    drain(s)
    assert done["s"].finish_reason == {"type": "stop", "matched": f"<{ref[6]}>"}
    assert done["s"].text == "".join(f"<{t}>" for t in ref[: ref.index(ref[6])])
    assert done["t"].output_ids == ref[: ref.index(ref[4]) + 1]


def test_no_drafts_above_max_batch() -> None:
    s, runner, done, drafter = make(2000, speculative_max_batch=2)
    for i in range(3):
        add(s, f"b{i}", [3, 4, 5 + i], max_new_tokens=6)
    drain(s)
    assert s.stats.spec_verify_ct == 0 and drafter.proposed == []
    for i in range(3):
        assert done[f"b{i}"].output_ids == reference_output([3, 4, 5 + i], 6)


def test_meta_info_reports_verify_steps_and_accept_length() -> None:
    s, _, done, drafter = make(500, speculative_num_draft_tokens=3)
    drafter.p_wrong = 0.0
    drafter.rng.randrange = lambda a, b: b - 1  # always k drafts, all right
    sure(add(s, "a", [1, 2, 3], max_new_tokens=9))
    drain(s)
    meta = s.output.build(done["a"])["meta_info"]
    assert meta["spec_verify_ct"] == 2 and meta["spec_accept_length"] == 4.0  # 1 + 4 + 4 tokens
    assert s.stats.spec_accept_rate == 1.0


def test_adaptive_rule_stops_drafting_for_a_request_whose_drafts_fail() -> None:
    s, _, done, drafter = make(2000, speculative_num_draft_tokens=4)
    drafter.p_wrong = 1.0  # every draft wrong
    drafter.rng.randrange = lambda a, b: b - 1
    add(s, "w", [1, 2, 3], max_new_tokens=60)
    drain(s)
    assert done["w"].output_ids == reference_output([1, 2, 3], 60)
    # a few verify rows teach it that drafts fail; then it drafts only when the estimate drifts back
    assert s.stats.spec_verify_ct < 20 and s.stats.spec_accepted_tokens == 0


class ForcingGrammar:
    """A stand-in matcher (the fake runner never asks for masks): every third accepted token, it
    forces the reference's next two tokens, as jump-forward text would be."""

    budget_closed = False

    def __init__(self, prompt: list[int]) -> None:
        self.seq = list(prompt)
        self.error = None

    def accept(self, token_id: int) -> bool:
        assert token_id == next_token(self.seq), "only the reference continuation is accepted"
        self.seq.append(token_id)
        return True

    def is_finished(self) -> bool:
        return False

    def jump_forward_tokens(self) -> list[int]:
        if len(self.seq) % 3:
            return []
        a = next_token(self.seq)
        return [a, next_token(self.seq + [a])]


def test_drafts_ride_after_jump_forward_tokens() -> None:
    s, runner, done, drafter = make(2000, seed=3, speculative_num_draft_tokens=3)
    for i in range(4):
        prompt = [5, 6, 7 + i]
        req = Req(rid=f"g{i}", prompt_ids=prompt, params=SamplingParams(max_new_tokens=40, temperature=0),
                  arrival=s.next_arrival(), grammar=ForcingGrammar(prompt))
        s.add_request(req)
    drain(s)
    for i in range(4):
        assert done[f"g{i}"].output_ids == reference_output([5, 6, 7 + i], 40)
    assert s.stats.jump_forward_tokens > 0
    assert any(pending > 1 for _, pending, _ in runner.verify_rows)  # forced tokens AND drafts in one row


@pytest.mark.parametrize("kw,message", [
    (dict(speculative_algorithm="MAGIC"), "speculative_algorithm must be one of"),
    (dict(speculative_algorithm="DRAFT"), "DRAFT needs speculative_draft_model_path"),
    (dict(speculative_algorithm="NGRAM", speculative_medusa_choices="[[0]]"), "goes with speculative_algorithm MEDUSA"),
    (dict(speculative_algorithm="MEDUSA", speculative_medusa_choices="[[0], []]"), "JSON list of non-empty"),
    (dict(speculative_algorithm="MEDUSA", speculative_medusa_choices="[[0"), "JSON list of non-empty"),
    (dict(speculative_draft_model_path="default"), "speculative_draft_model_path goes with"),
    (dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=0), "speculative_num_draft_tokens"),
    (dict(speculative_ngram_min_match_window_size=5), "speculative_ngram_min_match_window_size"),
])
def test_speculative_flags_are_validated(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs(**kw)
