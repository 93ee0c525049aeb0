"""What a verify row costs, in decode steps: measured on the engine's own model when it starts.

A verify row of 1 + j tokens (the pending token and j drafts) replaces one decode step of that
request; the adaptive rule (runtime/scheduler/speculative_rows.py) drafts only when the expected
tokens per row pay for cost(j). On a CPU cost(j) is nothing like 1: batch-1 decode runs a fused
path that a row of 2+ tokens may not take, and small-M matmuls still stream weights per row block
(measured on the default model, 1 thread, fused batch-1 decode vs the unfused verify row: 2.06x at
j = 1, 2.51x at 2, 3.09x at 4, 4.88x at 8). Kernels change (a multi-row fused decoder makes a row of
2-9 tokens cost much closer to one step), so the cost is not assumed but timed on the engine's own
model and KV pool before it serves (`measure_verify_cost`, ~0.7 s on 1 thread for the default model):

    cost(j) = time(forward + lm_head of one row of 1 + j new tokens) / time(the same for 1 token)

over a short dummy context, at j = 1..8, 16, 32, ... and k, linear in between. Each 1 + j row is timed right
after a 1-token row; cost(j) is the median of those paired ratios over REPS rounds, made non-decreasing in j (a
longer row does more work; `non_decreasing`) and >= 1. The estimator before (stop 30), each length's min over two
rounds divided by the 1-token rows' min, read a different curve at every start on an idle machine (1 + 1: 0.99 to
1.24 decode steps, 1 + 8: 1.57 to 2.18, four starts of a /tmp probe); the paired medians of 3 rounds stayed
within 1.00-1.09 and 1.72-1.89 in six. An engine that starts on a high curve drafts less for its whole life: in
one benchmark run MEDUSA's engine read 1 + 1 at 1.18x and EAGLE_TREE's at 1.24x, and both ran chat (workload b)
at 1.00x of no speculation, against 1.07x and 1.09x in the run before. Times are taken with `step_clock()`,
which the drafter's time is measured with too (speculative_rows.py):
  - 1 thread: the calling thread's CPU time (time.thread_time). On a shared machine wall time swung the ratios
    by 40% between two measurements a second apart (the other jobs' preemptions), CPU time hardly.
  - more threads: wall time (time.perf_counter). The calling thread's CPU time misses the helper's share and
    its sleeps differ between kernels (2 threads, default model, q8: a 1 + 1 row measured 0.89 decode steps,
    wall 1.12); the process's CPU time counts every thread's spinning (1.26), and with the other core busy one
    read of that clock took up to 5 ms (mean 0.26 ms over a request's steps, ~1.5 us for the thread's clock). `VerifyCost.assumed` is the old
fitted curve, for schedulers built without an engine (tests with fake runners) and tensor-parallel
engines (every rank would have to join the timing steps).

The start-up curve is then corrected by the steps the engine really runs (`ObservedCost`). It was timed on a
32-token dummy context, on one start's noise, and without what a step does besides forward and lm_head (building
the batch, sampling, acceptance): on the AVX2 machine the engines of one benchmark run read 1 + 1 at 1.10-1.58 decode
steps and 1 + 8 at 3.18-5.57, and some drafted at a loss (EAGLE ran chat at 0.89x of no speculation). So each
batch-1 step's `runner.run` is timed with `step_clock()`: a decode step's time joins a window of decode times, and a
verify step of 1 + j tokens gives the multiple s = (its time / the decode steps' median - 1) / (cost(j) - 1) by which
the curve misjudged its extra cost. The rule then uses 1 + s (cost(j) - 1) with s the median of the recent multiples
(the measured shape, the observed scale: a row's extra cost is mostly its extra arithmetic, which one factor
scales), and the decode steps' median as its decode step. A curve that prices rows too high is corrected only once a
row is verified (a shadow draft's copy phase, or a high acceptance); one that prices them too low, which is what
loses, is corrected by the rows it lets through.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

CONTEXT = 32  # dummy tokens before the timed rows: attention over a short prefix, as early in a request
ADAPTIVE_PROBE = 32  # calls an adaptive site of the CPU kernels probes before it settles (thread_pool.h: 2 x kProbe)
REPS = 3  # rounds of paired timings after a warm-up round; each length's median ratio is kept
OBSERVED_WINDOW = 32  # the newest batch-1 decode steps, and verify steps' multiples, that ObservedCost keeps
MIN_OBSERVED = 4  # steps of each kind before the observed scale (and decode step) replace the start-up curve's
SCALE_RANGE = (0.25, 4.0)  # the observed multiple's bounds (one slow step among few must not stop drafting for good)


@dataclass(frozen=True)
class VerifyCost:
    """cost(j): decode steps one verify row of 1 + j tokens costs; points[i] = (j, cost), j ascending, (0, 1.0) first."""

    points: tuple[tuple[int, float], ...]
    decode_seconds: float = 0.0  # one decode step as measured in step_clock() seconds (0: not measured)
    source: str = "assumed"  # "measured" | "assumed"

    def __post_init__(self) -> None:
        assert self.points and self.points[0] == (0, 1.0), "cost(0) is one decode step"
        assert all(a[0] < b[0] for a, b in zip(self.points, self.points[1:])), "j ascending"

    @classmethod
    def assumed(cls) -> "VerifyCost":
        """The curve 1 + 0.45 j^0.85 (fitted before batch-1 decode was fused; kept for tests and TP)."""
        return cls(tuple((j, 1.0 + 0.45 * j ** 0.85 if j else 1.0) for j in range(0, 17)))

    def __call__(self, j: int) -> float:
        pts = self.points
        for (j0, c0), (j1, c1) in zip(pts, pts[1:]):
            if j <= j1:
                return c0 + (c1 - c0) * (j - j0) / (j1 - j0)
        if len(pts) == 1:
            return 1.0
        (j0, c0), (j1, c1) = pts[-2], pts[-1]  # past the last point: its slope goes on
        return c1 + (c1 - c0) * (j - j1) / (j1 - j0)

    def describe(self) -> str:
        return ", ".join(f"1+{j}: {c:.2f}x" for j, c in self.points[1:]) + f" ({self.source})"

    def scaled(self, s: float, decode_seconds: float) -> "VerifyCost":
        """This curve with every cost over one decode step times `s`, in decode steps of `decode_seconds`."""
        return VerifyCost(tuple((j, 1.0 + s * (c - 1.0)) for j, c in self.points), decode_seconds, self.source)


class ObservedCost:
    """The start-up curve corrected by the engine's batch-1 steps (module docstring): `curve` is what the rule uses."""

    def __init__(self, measured: VerifyCost) -> None:
        self.measured = measured
        self.curve = measured
        self.decode: deque[float] = deque(maxlen=OBSERVED_WINDOW)  # seconds of recent decode steps
        self.verify: deque[tuple[float, float]] = deque(maxlen=OBSERVED_WINDOW)  # recent verify steps: (seconds,
        # the curve's extra cost for their length); priced against the decode steps' median when the curve is made,
        # so that steps verified before any decode step was timed (a drafter right from the first token) are priced
        # again once decode steps are: against the start-up decode step they read 1.6-2.6x (a 32-token context, an
        # idle minute), and a request that was always right stopped drafting

    @property
    def multiples(self) -> list[float]:
        """Per recent verify step, the multiple by which the curve misjudged its extra cost."""
        decode = self.decode_seconds
        return [(seconds / decode - 1.0) / extra for seconds, extra in self.verify] if decode > 0.0 else []

    @property
    def scale(self) -> float:
        """The factor on the curve's costs over one step (1.0 until MIN_OBSERVED verify steps)."""
        multiples = self.multiples
        if len(multiples) < MIN_OBSERVED:
            return 1.0
        return min(SCALE_RANGE[1], max(SCALE_RANGE[0], statistics.median(multiples)))

    @property
    def decode_seconds(self) -> float:
        """A decode step: the observed steps' median, or until MIN_OBSERVED of them the start-up one (a request that
        drafts from its first step on runs none)."""
        return statistics.median(self.decode) if len(self.decode) >= MIN_OBSERVED else self.measured.decode_seconds

    def add(self, draft_len: int, seconds: float) -> None:
        """One batch-1 step of 1 + `draft_len` tokens took `seconds` (step_clock)."""
        if not draft_len:
            self.decode.append(seconds)
        else:
            extra = self.measured(draft_len) - 1.0
            if self.decode_seconds <= 0.0 or extra < 0.05 or seconds <= 0.0:
                return  # no decode step to compare with, or a curve too flat to scale
            self.verify.append((seconds, extra))
        if self.decode_seconds > 0.0:
            self.curve = self.measured.scaled(self.scale, self.decode_seconds)


def draft_lengths(k: int) -> list[int]:
    """The lengths timed: every j up to 8 (kernels pick tiles by row count: on the default model a row of
    1 + 4 cost 4.1 decode steps and one of 1 + 2 cost 2.4, so no straight line fits), then powers of two, and k."""
    out = list(range(1, min(k, 8) + 1))
    j = 16
    while j < k:
        out.append(j)
        j *= 2
    return out + ([k] if k > 8 else [])


def step_clock() -> Callable[[], float]:
    """The clock verify rows and drafts are timed with (module docstring): the thread's CPU time on 1 thread,
    wall time on more."""
    from sgl.kernels.cpu.quant import get_num_threads

    return time.thread_time if get_num_threads() == 1 else time.perf_counter


def measure_verify_cost(model: Any, kv: Any, k: int, vocab_size: int, reps: int = REPS,
                        context: int = CONTEXT) -> VerifyCost:
    """Time one row of 1 + j tokens for j in 0 and draft_lengths(k) on `model` over pool `kv`.

    Writes K/V into slots [0, context + 1 + k) of the pool: call it before the pool holds anything
    (the engine does, before its scheduler thread starts); later writes overwrite them."""
    import torch

    from sgl.kernels.cpu.quant import get_num_threads
    from sgl.runtime.executor.forward_batch import ForwardBatch

    context = min(context, kv.num_slots - 1 - k)
    if context < 1:  # a pool too small to time in: the assumed curve
        return VerifyCost.assumed()
    lengths = draft_lengths(k)
    ctx = [(7 * i + 1) % vocab_size for i in range(context + 1 + k)]  # dummy ids
    clock = step_clock()

    def timed(j: int) -> float:
        # generated_only: the scheduler's decode and verify rows are (model_runner), and it routes them to the
        # fused C++ decoder (decode_stack / decode_rows); without it a 1 + j row took the prefill path, ~1.5-2x
        # dearer than the verify steps really are, and the rule drafted too little
        fb = ForwardBatch.from_lists([ctx[context:context + 1 + j]], [list(range(context + 1 + j))],
                                     generated_only=True)
        t0 = clock()
        model.compute_logits(model(fb, kv))
        return clock() - t0

    ratios: dict[int, list[float]] = {j: [] for j in lengths}
    steps: list[float] = []
    with torch.inference_mode():
        model(ForwardBatch.from_lists([ctx[:context]], [list(range(context))]), kv)
        # With helper threads the kernels' adaptive sites (thread_pool.h) first time their calls alone, then with
        # the helpers, ADAPTIVE_PROBE calls in all: a decode step timed then ran its lm_head alone (2 threads, q8:
        # 3.1 ms instead of 1.7), and a 1 + 1 row measured 0.86 decode steps. Steps of 1 and 2 tokens get past it.
        warm = ADAPTIVE_PROBE if get_num_threads() > 1 else 0
        for j in [0, 1] * warm + [0] + lengths:  # warms every path (first calls allocate)
            timed(j)
        for _ in range(reps):
            for j in lengths:
                step = timed(0)
                ratios[j].append(timed(j) / step)
                steps.append(step)
    costs = non_decreasing([max(1.0, statistics.median(ratios[j])) for j in lengths])
    return VerifyCost(tuple([(0, 1.0)] + list(zip(lengths, costs))), statistics.median(steps), "measured")


def non_decreasing(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit of `values` (pool-adjacent-violators): a run that decreases is
    replaced by its mean."""
    pools: list[tuple[float, int]] = []  # (mean, count)
    for v in values:
        pools.append((v, 1))
        while len(pools) > 1 and pools[-2][0] > pools[-1][0]:
            (m2, n2), (m1, n1) = pools.pop(), pools.pop()
            pools.append(((m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2))
    return [m for m, n in pools for _ in range(n)]
