"""On-model coverage for bench_grammar.py (`--on-model N`): the default model, greedy, at most 512 new
tokens, our default constraint mode (exact encodings + semantic guards with backtracking), N schemas per
JSONSchemaBench subset (the first N of bench_grammar's fixed random sample order, seeded).

Per subset: coverage = compiled AND the output validates with jsonschema (format checked); invalid =
outputs that do not validate (must be 0); backtracks per 1K generated tokens; aborts (a guard's budget
spent, or a constraint the model could not satisfy). Expensive on a CPU: ~5-40 s per schema.
"""
from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any


def run_on_model(n: int, seed: int, subsets: list[str], data: Path, max_new_tokens: int = 512) -> dict:
    import jsonschema

    from sgl.runtime.engine import Engine
    from sgl.runtime.protocol import RequestError

    warnings.simplefilter("ignore")
    rng = random.Random(seed)
    files = {s: sorted((data / s).glob("*.json")) for s in subsets}
    sample = {s: rng.sample(fs, min(n, len(fs))) for s, fs in files.items()}
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=16384)
    out: dict[str, Any] = {"n_per_subset": n, "max_new_tokens": max_new_tokens, "subsets": {}}
    try:
        for subset in subsets:
            rows = []
            for path in sample[subset]:
                text = path.read_text()
                schema = json.loads(text)
                t0 = time.perf_counter()
                try:
                    res = eng.generate("Produce a JSON document that matches this JSON schema:\n" + text[:2000] + "\nJSON:",
                                       {"json_schema": text, "max_new_tokens": max_new_tokens, "temperature": 0})
                except RequestError as e:
                    rows.append({"file": path.name, "status": "rejected", "error": str(e)[:200]})
                    continue
                meta = res["meta_info"]
                try:
                    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
                    valid = cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(json.loads(res["text"]))
                except Exception:  # noqa: BLE001 - not JSON (an abort's partial text)
                    valid = False
                rows.append({"file": path.name, "status": meta["finish_reason"]["type"], "valid": valid,
                             "tokens": meta["completion_tokens"] + meta.get("grammar_backtracked_tokens", 0),
                             "backtracks": meta.get("grammar_backtracks", 0), "s": time.perf_counter() - t0,
                             "error": meta["finish_reason"].get("message", "")[:200]})
                print(f"    on-model {subset:15s} {path.name:40s} {rows[-1]['status']:7s} valid={valid} "
                      f"bt={rows[-1]['backtracks']} {rows[-1]['s']:.1f}s", flush=True)
            gen = [r for r in rows if r["status"] != "rejected"]
            toks = sum(r["tokens"] for r in gen)
            out["subsets"][subset] = {
                "n": len(rows), "rejected": len(rows) - len(gen),
                "coverage": round(sum(r["valid"] for r in gen) / max(len(rows), 1), 4),
                "invalid": sum(not r["valid"] and r["status"] != "abort" for r in gen),
                "aborts": sum(r["status"] == "abort" for r in gen),
                "backtracks_per_1k_tokens": round(1000 * sum(r["backtracks"] for r in gen) / max(toks, 1), 2),
                "tokens": toks, "rows": rows,
            }
        eng.check_integrity()
    finally:
        eng.shutdown()
    return out


def print_on_model(res: dict) -> None:
    print(f"on the default model (greedy, <= {res['max_new_tokens']} tokens, {res['n_per_subset']} schemas per subset):")
    print(f"{'subset':15s} {'n':>3s} {'cov%':>6s} {'invalid':>7s} {'aborts':>6s} {'rejected':>8s} {'bt/1k':>6s}")
    for s, x in res["subsets"].items():
        print(f"{s:15s} {x['n']:3d} {100 * x['coverage']:6.1f} {x['invalid']:7d} {x['aborts']:6d} {x['rejected']:8d} "
              f"{x['backtracks_per_1k_tokens']:6.2f}")
