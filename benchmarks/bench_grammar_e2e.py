"""End-to-end part of bench_grammar.py: decode tokens/s with and without a JSON-schema constraint on
the default model, and forward passes saved by jump-forward on a JSON extraction with fixed keys.

    python benchmarks/bench_grammar_e2e.py      # ~3 min on one thread; writes results/bench_grammar_e2e.json

Constrained and unconstrained batches are interleaved and length-matched per request (the unconstrained
one uses ignore_eos with each constrained output's length), so they run the same number of rows per step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# The 6-field extraction workload, shared with tests/e2e/test_constrained_e2e.py.
_WORKLOAD = json.loads((Path(__file__).resolve().parents[1] / "examples/data/person_extraction.json").read_text())
SCHEMA, PROMPT = _WORKLOAD["schema"], _WORKLOAD["prompt"]


def _rate(eng: Any, params: list[dict]) -> tuple[float, int, int, list[int]]:
    """(generated tokens per CPU second, tokens, forward steps, per-request lengths) for one batch."""
    eng.flush_cache()
    steps0 = eng.get_stats()["num_steps"]
    # NOTE: CPU seconds of this process (all threads), not wall time: the machine is shared, and other
    # processes' load would otherwise decide the ratio
    t0 = time.process_time()
    outs = eng.generate([PROMPT] * len(params), params)
    dt = time.process_time() - t0
    lens = [o["meta_info"]["completion_tokens"] for o in outs]
    return sum(lens) / dt, sum(lens), eng.get_stats()["num_steps"] - steps0, lens


def run_e2e(batch: int = 8, reps: int = 3) -> dict:
    from sgl.runtime.engine import Engine

    res: dict = {}
    for jf in (False, True):
        eng = Engine(model_path="default", num_threads=1, max_total_tokens=16384, disable_jump_forward=not jf)
        try:
            cons = [{"json_schema": json.dumps(SCHEMA), "max_new_tokens": 160, "temperature": 1.0, "sampling_seed": s}
                    for s in range(batch)]
            _rate(eng, cons[:1])  # warm-up (and the grammar cache)
            c, u = [], []
            for _ in range(reps):  # interleaved, so load from other processes hits both alike
                c.append(_rate(eng, cons))
                # NOTE: the same per-request lengths, so both batches shrink alike as requests finish
                free = [{"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True, "sampling_seed": s}
                        for s, n in enumerate(c[-1][3])]
                u.append(_rate(eng, free))
            key = "jump_forward" if jf else "no_jump_forward"
            res[key] = {"constrained_tok_per_cpu_s": max(x[0] for x in c),
                        "unconstrained_tok_per_cpu_s": max(x[0] for x in u),
                        "constrained_steps": c[-1][2], "constrained_tokens": c[-1][1]}
            res[key]["ratio"] = res[key]["constrained_tok_per_cpu_s"] / res[key]["unconstrained_tok_per_cpu_s"]
        finally:
            eng.shutdown()
    a, b = res["jump_forward"], res["no_jump_forward"]
    res["forward_passes_saved"] = 1 - (a["constrained_steps"] / max(a["constrained_tokens"], 1)) / \
        (b["constrained_steps"] / max(b["constrained_tokens"], 1))
    return res


if __name__ == "__main__":
    from pathlib import Path
    res = run_e2e()
    out = Path(__file__).resolve().parent / "results" / "bench_grammar_e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
