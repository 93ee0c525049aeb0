"""Semantic-guard rollback in the scheduler (runtime/scheduler/rollback.py), driven by the recorded-KV
fake runner: every slot a request reads must hold its own (position, token), and KV integrity is
checked after every step. The runner is deterministic, so a request rolled back and regenerated must
end with exactly the output of a run without rollbacks."""

from __future__ import annotations

from typing import Optional

import pytest

from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler

from .test_scheduler import add, make_scheduler, run_to_end


class ScriptedGuard:
    """A matcher stand-in with the guard interface the scheduler uses: after the `c`-th accepted token
    it asks (once) to keep only `keep` tokens; `forced[c]` are jump-forward tokens after `c` tokens."""

    def __init__(self, triggers: dict[int, int], forced: Optional[dict[int, list[int]]] = None,
                 fail_at: Optional[int] = None) -> None:
        self.triggers = dict(triggers)
        self.forced = forced or {}
        self.fail_at = fail_at
        self.accepted: list[int] = []
        self.pending: Optional[int] = None
        self.error: Optional[str] = None
        self.rollbacks: list[tuple[int, int]] = []  # (length before, tokens dropped)

    def accept(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        keep = self.triggers.pop(len(self.accepted), None)
        if keep is not None:
            self.pending = keep
        if self.fail_at is not None and len(self.accepted) == self.fail_at:
            self.error = "semantic guard for JSON Schema keyword 'uniqueItems' failed: budget spent"
        return True

    def take_rollback(self) -> Optional[int]:
        return self.pending

    def rollback(self, n: int) -> None:
        self.rollbacks.append((len(self.accepted), n))
        del self.accepted[len(self.accepted) - n:]
        self.pending = None

    def is_finished(self) -> bool:
        return False

    def jump_forward_tokens(self) -> list[int]:
        return list(self.forced.get(len(self.accepted), []))


def _run(s: Scheduler, reqs: list[Req]) -> None:
    run_to_end(s)
    for r in reqs:
        assert r.text == s.output.tokenizer.decode(r.output_ids)
        assert r.grammar.accepted == r.output_ids, "matcher and output disagree after rollbacks"


CONFIGS = [dict(), dict(chunked_prefill_size=5), dict(disable_radix_cache=True), dict(disable_jump_forward=True)]


@pytest.mark.parametrize("config", CONFIGS)
def test_rollback_regenerates_the_same_output_and_keeps_kv_whole(config: dict) -> None:
    prompts = [list(range(1, 23)), list(range(1, 15)) + [40, 41], list(range(30, 42))]
    forced = {3: [50, 51, 52], 9: [60, 61]}  # extends of > 1 token: cached in the tree with the lock kept
    # keep=0 drops the last prompt token's KV (in the tree once the prompt was cached); keep=3 and 9
    # drop tree-cached forced runs (they are forced again); 11 drops the last token only
    triggers = [{6: 3, 12: 0}, {5: 2, 14: 9, 15: 11}, {}]

    base, _, done_a = make_scheduler(400, **config)
    plain = [add(base, f"r{i}", p, 16, grammar=ScriptedGuard({}, forced)) for i, p in enumerate(prompts)]
    _run(base, plain)

    s, _, done_b = make_scheduler(400, **config)
    reqs = [add(s, f"r{i}", p, 16, grammar=ScriptedGuard(t, forced)) for i, (p, t) in enumerate(zip(prompts, triggers))]
    _run(s, reqs)
    for a, b in zip(plain, reqs):
        assert b.output_ids == a.output_ids and b.finish_reason == a.finish_reason
    assert s.stats.num_backtracks == 5
    assert [n for _, n in reqs[0].grammar.rollbacks] == [3, 12]
    assert s.stats.backtracked_tokens == 3 + 12 + 3 + 5 + 4


def test_rollback_with_logprobs_truncates_them() -> None:
    s, _, _ = make_scheduler(200)
    r = add(s, "a", list(range(1, 10)), 8, grammar=ScriptedGuard({5: 1}), return_logprob=True)
    run_to_end(s)
    assert len(r.output_ids) == len(r.output_logprobs) == len(r.output_top_logprobs) == 8


def test_guard_giving_up_aborts_with_the_keyword() -> None:
    s, _, done = make_scheduler(200)
    add(s, "a", list(range(1, 10)), 8, grammar=ScriptedGuard({}, fail_at=4))
    run_to_end(s)
    fr = done["a"].finish_reason
    assert fr["type"] == "abort" and "uniqueItems" in fr["message"]
    assert len(done["a"].output_ids) == 4
