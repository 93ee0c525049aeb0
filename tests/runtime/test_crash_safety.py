"""Crash safety: a runner failure caused by one request fails that request alone (HTTP 500 semantics,
its KV never cached) and the rest of the batch goes on; a step that fails for every row is re-raised
(the engine stops after two in a row). KV accounting checked after every step."""

from __future__ import annotations

from typing import Any

import pytest

from sgl.runtime.scheduler.request import ScheduledBatch

from .fake_runner import FakeRunner, reference_output
from .test_scheduler import add, make_scheduler


class PoisonRunner(FakeRunner):
    """Raises for any batch that holds a request whose rid starts with `poison` (a stand-in for a kernel bug
    that one request's shape or tokens trigger), or for every batch once `broken` is set."""

    broken = False

    def run(self, batch: ScheduledBatch) -> list[Any]:
        if self.broken or any(row.req.rid.startswith("poison") for row in batch.rows):
            raise RuntimeError("kernel exploded")
        return super().run(batch)


def poisoned(pool: int = 200, **kw: Any) -> tuple[Any, PoisonRunner, dict[str, Any]]:
    s, _, done = make_scheduler(pool, **kw)
    s.runner = runner = PoisonRunner()
    return s, runner, done


def drain(s: Any) -> None:
    for _ in range(1000):
        if not s.has_work:
            break
        s.step()
        s.check_integrity()
    assert not s.has_work
    s.check_integrity()


def test_one_bad_request_fails_alone_and_the_batch_goes_on() -> None:
    s, _, done = poisoned()
    prompts = {"a": [5, 6, 7, 8], "poison": [5, 6, 7, 9], "b": [1, 2, 3]}
    for rid, prompt in prompts.items():
        add(s, rid, prompt, 6)
    drain(s)
    bad = done["poison"].finish_reason
    assert bad["type"] == "abort" and bad["status_code"] == 500 and "kernel exploded" in bad["message"]
    for rid in ("a", "b"):
        assert done[rid].output_ids == reference_output(prompts[rid], 6), rid
        assert "status_code" not in done[rid].finish_reason
    assert s.stats.num_isolated_failures == 1
    # the failed request's KV was never cached: a later request with its prompt computes it afresh
    add(s, "again", prompts["poison"], 3)
    drain(s)
    assert done["again"].output_ids == reference_output(prompts["poison"], 3)


def test_a_step_that_fails_for_every_row_is_raised_with_no_leak() -> None:
    s, runner, done = poisoned()
    add(s, "a", [1, 2, 3], 4)
    add(s, "b", [4, 5, 6], 4)
    s.step()  # both prefilled
    runner.broken = True
    with pytest.raises(RuntimeError, match="kernel exploded"):
        s.step()
    s.check_integrity()  # the failed step's new slots went back to the pool
    runner.broken = False
    drain(s)  # and the requests are still whole: they finish normally
    assert done["a"].output_ids == reference_output([1, 2, 3], 4)


def test_a_request_failing_alone_in_its_step_is_its_own_failure() -> None:
    s, _, done = poisoned()
    add(s, "poison", [1, 2, 3], 4)
    drain(s)  # never raises: a one-row batch cannot tell a broken engine from a bad request
    assert done["poison"].finish_reason["status_code"] == 500
    add(s, "fine", [1, 2, 3], 4)
    drain(s)
    assert done["fine"].output_ids == reference_output([1, 2, 3], 4)
