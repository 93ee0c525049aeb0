"""Is EAGLE's head probability its acceptance? And what could a rule that reads it gain? (issue 9)

    OMP_WAIT_POLICY=PASSIVE python benchmarks/eagle_calibration.py --threads 1 [--workload b] [--k 8]

Runs bench_speculative.py's workload (b) (chat; or (c), json_schema) through an Engine with EAGLE drafting k tokens
on every row (`speculative_always_draft`) and pairs each verify row's draft scores (Draft.scores: the head's
probability of each token) with how many of its tokens the target accepted. Prints
  1. calibration: per bin of the head's probability, the share of drafted tokens accepted (a token is counted up to
     the first rejection in its row: the ones after it were never tested),
  2. per chain level, the mean probability and the acceptance,
  3. a replay of the rows under cut policies, in decode steps at the engine's measured verify cost plus
     `--head-step` decode steps per head step: every fixed length, path-probability thresholds, and the rate-optimal
     cut (speculative_rows.scored_cut). A replay: greedy verification accepts the same prefix of a shorter chain,
     but the real rule's rows fall at other positions, and catch-up and scheduling costs are left out, so the
     ratios are upper bounds of what each policy could reach, to compare policies, not engine figures.
Writes benchmarks/results/eagle_calibration_<workload>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_speculative import workloads  # noqa: E402

from sgl.runtime.engine import Engine  # noqa: E402
from sgl.runtime.scheduler.request import Req  # noqa: E402
from sgl.runtime.scheduler.speculative_rows import scored_cut  # noqa: E402
from sgl.runtime.speculative.drafter import Draft  # noqa: E402
from sgl.runtime.speculative.verify_cost import VerifyCost  # noqa: E402

Row = tuple[list[float], int]  # (the draft's scores, tokens accepted)


def collect(threads: int, workload: str, k: int) -> tuple[list[Row], VerifyCost]:
    """Every verify row's (scores, accepted) under forced k-token EAGLE drafts, and the engine's verify cost."""
    name = {"b": "b_chat", "c": "c_schema"}[workload]
    prompts, params, _ = workloads(False)[name]
    eng = Engine("default", speculative_algorithm="EAGLE", speculative_num_draft_tokens=k,
                 speculative_always_draft=True, num_threads=threads, cpu_act_quant="q8", show_progress=False)
    rows: list[Row] = []
    try:
        spec = eng.scheduler.spec
        drafter, record = spec.lanes[0].drafter, spec.record
        last: dict[Req, Draft] = {}
        propose = drafter.propose

        def stash(reqs: Sequence[Req], n: int) -> list[Draft]:
            drafts = propose(reqs, n)
            last.update(zip(reqs, drafts))
            return drafts

        def pair(req: Req, draft_len: int, accepted: int, depth: Optional[int] = None) -> None:
            d = last.pop(req, None)
            # rows whose draft was changed after proposing (forced text added, cut by the room) are left out
            if d is not None and d.scores is not None and len(d) == draft_len:
                rows.append((list(d.scores), accepted))
            record(req, draft_len, accepted, depth)

        drafter.propose, spec.record = stash, pair
        for p in prompts:
            eng.generate(p, params)
        # the verify cost as bench_speculative.py --verify-cost times it (an always-drafting engine measures none)
        from sgl.runtime.speculative.verify_cost import measure_verify_cost

        runner = eng.scheduler.runner
        eng.wait_idle()
        return rows, measure_verify_cost(runner.model, runner.kv, k, runner.vocab_size, reps=15, context=300)
    finally:
        eng.shutdown()


def calibration(rows: list[Row]) -> list[dict[str, Any]]:
    bins = [[0, 0] for _ in range(10)]
    for scores, accepted in rows:
        for j, p in enumerate(scores[: accepted + 1]):  # tested: up to the first rejection
            b = bins[min(9, int(p * 10))]
            b[0] += 1
            b[1] += j < accepted
    return [{"p_lo": i / 10, "p_hi": (i + 1) / 10, "n": n, "accepted": a / n if n else None}
            for i, (n, a) in enumerate(bins)]


def replay(rows: list[Row], cost: VerifyCost, head_step: float, policy: Callable[[list[float]], int]) -> float:
    """Tokens per decode step over the rows if each had been cut to policy(scores) tokens (0: a plain decode step,
    still paying one head step to learn its first score)."""
    tokens = steps = 0.0
    for scores, accepted in rows:
        j = policy(scores)
        tokens += 1 + min(j, accepted)
        steps += cost(j) + head_step * max(j, 1)
    return tokens / steps


def threshold(floor: float) -> Callable[[list[float]], int]:
    def cut(scores: list[float]) -> int:
        path, j = 1.0, 0
        for p in scores:
            path *= p
            if path < floor:
                break
            j += 1
        return j
    return cut


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workload", default="b", choices=["b", "c"])
    ap.add_argument("--k", type=int, default=8, help="tokens drafted on every row")
    ap.add_argument("--head-step", type=float, default=0.05, help="decode steps per head step in the replay")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows, cost = collect(args.threads, args.workload, args.k)
    cal = calibration(rows)
    print(f"workload ({args.workload}), {len(rows)} verify rows of {args.k} drafts, {args.threads} thread(s)")
    print("| head probability | drafted tokens tested | accepted |\n|---|---|---|")
    for b in cal:
        if b["n"]:
            print(f"| {b['p_lo']:.1f}-{b['p_hi']:.1f} | {b['n']} | {b['accepted']:.3f} |")
    levels = []
    for level in range(args.k):
        tested = [(s[level], level < a) for s, a in rows if len(s) > level and level <= a]
        if tested:
            levels.append({"level": level + 1, "n": len(tested), "mean_p": sum(p for p, _ in tested) / len(tested),
                           "accepted": sum(ok for _, ok in tested) / len(tested)})
            print(f"level {level + 1}: {len(tested)} tested, mean probability {levels[-1]['mean_p']:.3f}, "
                  f"accepted {levels[-1]['accepted']:.3f}")
    policies: dict[str, Callable[[list[float]], int]] = {f"fixed {j}": (lambda s, j=j: min(j, len(s)))
                                                          for j in range(1, args.k + 1)}
    policies |= {f"path >= {f}": threshold(f) for f in (0.1, 0.2, 0.3, 0.5)}
    policies["rate-optimal (scored_cut)"] = lambda s: len(scored_cut(Draft([0] * len(s), scores=s), cost,
                                                                     args.head_step * len(s)))
    ratios = {name: replay(rows, cost, args.head_step, pol) for name, pol in policies.items()}
    print(f"replay at the engine's verify cost ({cost.describe()}) + {args.head_step} decode steps per head step, "
          "tokens per decode step (an upper bound, not an engine figure):")
    for name, r in ratios.items():
        print(f"  {name:28s} {r:.3f}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"eagle_calibration_{args.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"workload": args.workload, "k": args.k, "threads": args.threads, "rows": len(rows),
                               "calibration": cal, "levels": levels, "head_step": args.head_step,
                               "verify_cost": [[j, cost(j)] for j in range(args.k + 1)], "replay": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
