"""Crash safety of one scheduler step: a batch whose forward raises is rerun row by row, so only the
request that fails alone ends (finish_reason abort, status 500) and the others' step goes on. No tensors.

Slot accounting: a row's `new_slots` are not yet in `req.slots` while the step runs, so every path
that drops a row's result hands them back to the allocator (`free_new_slots`), or they leak.
"""

from __future__ import annotations

from typing import Any, Protocol

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.scheduler.request import BatchRow, RowResult, ScheduledBatch


class _Runner(Protocol):
    def run(self, batch: ScheduledBatch) -> list[RowResult]: ...


def free_new_slots(allocator: SlotAllocator, rows: list[BatchRow]) -> None:
    for row in rows:
        allocator.free(row.new_slots)
        row.new_slots = []


def _failed(exc: BaseException) -> RowResult:
    return RowResult(None, error=f"internal error: {type(exc).__name__}: {exc}", internal=True)


def isolate_failure(runner: _Runner, allocator: SlotAllocator, stats: Any, batch: ScheduledBatch,
                    exc: Exception) -> list[RowResult]:
    """The batch raised `exc`: run its rows one at a time; a row that fails alone gets an internal-error
    result (its new KV is dropped, never cached). When every row of a batch of two or more fails alone,
    the step itself cannot run: re-raise (the engine counts consecutive such steps). A one-row batch's
    failure is that request's own (no rerun). `stats.num_isolated_failures` counts the failed requests."""
    if len(batch.rows) == 1:
        free_new_slots(allocator, batch.rows)
        stats.num_isolated_failures += 1
        return [_failed(exc)]
    results: list[RowResult] = []
    failed: list[BatchRow] = []
    for row in batch.rows:
        try:
            results.append(runner.run(ScheduledBatch([row]))[0])
        except Exception as e:  # noqa: BLE001 - this one request's failure, reported to it
            if getattr(e, "fatal", False):
                free_new_slots(allocator, batch.rows)
                raise
            failed.append(row)
            results.append(_failed(e))
    if len(failed) == len(batch.rows):
        free_new_slots(allocator, batch.rows)
        raise exc
    free_new_slots(allocator, failed)
    stats.num_isolated_failures += len(failed)
    return results
