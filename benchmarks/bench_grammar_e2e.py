"""End-to-end part of bench_grammar.py: decode tokens/s with and without a JSON-schema constraint on
the default model, and forward passes saved by jump-forward on a JSON extraction with fixed keys.

    python benchmarks/bench_grammar_e2e.py      # ~2 min on one thread
"""
from __future__ import annotations

import json
import time
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "artist", "other"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 15}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "skills", "active"],
    "additionalProperties": False,
}
PROMPT = ("<|im_start|>user\nExtract the person as JSON: Ada Lovelace, 36, engineer from London (zip 12345), "
          "skills: math, poetry. She is active.<|im_end|>\n<|im_start|>assistant\n")


def _rate(eng: Any, params: list[dict]) -> tuple[float, int, int]:
    """(generated tokens per second, tokens, forward steps) for one batch of identical prompts."""
    eng.flush_cache()
    steps0 = eng.get_stats()["num_steps"]
    t0 = time.perf_counter()
    outs = eng.generate([PROMPT] * len(params), params)
    dt = time.perf_counter() - t0
    toks = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return toks / dt, toks, eng.get_stats()["num_steps"] - steps0


def run_e2e(batch: int = 8, reps: int = 2) -> dict:
    from sgl.runtime.engine import Engine

    res: dict = {}
    for jf in (False, True):
        eng = Engine(model_path="default", num_threads=1, max_total_tokens=16384, disable_jump_forward=not jf)
        try:
            cons = [{"json_schema": json.dumps(SCHEMA), "max_new_tokens": 160, "temperature": 1.0, "sampling_seed": s}
                    for s in range(batch)]
            _rate(eng, cons[:1])  # warm-up (and the grammar cache)
            c = [_rate(eng, cons) for _ in range(reps)]
            n_tok = max(1, c[-1][1] // batch)
            free = [{"max_new_tokens": n_tok, "temperature": 1.0, "ignore_eos": True, "sampling_seed": s}
                    for s in range(batch)]
            u = [_rate(eng, free) for _ in range(reps)]
            key = "jump_forward" if jf else "no_jump_forward"
            res[key] = {"constrained_tok_s": max(x[0] for x in c), "unconstrained_tok_s": max(x[0] for x in u),
                        "constrained_steps": c[-1][2], "constrained_tokens": c[-1][1]}
            res[key]["ratio"] = res[key]["constrained_tok_s"] / res[key]["unconstrained_tok_s"]
        finally:
            eng.shutdown()
    a, b = res["jump_forward"], res["no_jump_forward"]
    res["forward_passes_saved"] = 1 - (a["constrained_steps"] / max(a["constrained_tokens"], 1)) / \
        (b["constrained_steps"] / max(b["constrained_tokens"], 1))
    return res


if __name__ == "__main__":
    print(json.dumps(run_e2e(), indent=1))
