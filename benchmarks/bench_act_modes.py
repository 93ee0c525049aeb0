"""The activation modes of the native CPU kernels through the Engine (default model, batch 1): q16 vs q8, same run.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_act_modes.py [--threads 1] [--act q16 q8]
        [--rounds 2] [--ngram] [--docs 4] [--tag NAME]

Per mode (`--cpu-act-quant`; engines alternate per round, the min over rounds is kept: CPU time is steady on a
shared machine, wall time is not):
  1. decode CPU ms per token at batch 1: process CPU time of 129 minus 17 greedy tokens after a 64-token prompt,
     / 112 (bench_cpu.py's decode_cpu_ms);
  2. one verify row of 1 + j tokens (forward + lm_head) over a 300-token context, j = 0..8: the engine's own
     start-up measurement (runtime/speculative/verify_cost.py) with more rounds: ms, and x the decode step of
     the same mode and of the first mode; and the same rows' WALL ms (min over 7 interleaved rounds: at 2
     threads the wall time is what a verify row costs the request, its CPU time what it costs the machine);
  3. with --ngram: workload (a) of bench_speculative.py (JSON extraction copying from ~300-token documents,
     greedy, 192 tokens) without speculation and with NGRAM (8 draft tokens, the adaptive rule): decode tokens
     per second (after each request's first token) as a ratio to the first mode without speculation, accept
     length, and outputs token-identical to no speculation of the same mode.
Prints a table; JSON to benchmarks/results/bench_act_modes[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = [(7 * i + 11) % 30000 + 100 for i in range(64)]  # 64 dummy prompt tokens
N1, N2 = 17, 129


def decode_cpu_ms(eng: Any) -> float:
    def cpu_of(n: int) -> float:
        eng.flush_cache()
        c = time.process_time()
        eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
        return time.process_time() - c
    return (cpu_of(N2) - cpu_of(N1)) / (N2 - N1) * 1e3


def one_round(act: str, threads: int, ngram: bool, docs: int) -> dict[str, Any]:
    from sgl.runtime.engine import Engine
    from sgl.runtime.speculative.verify_cost import measure_verify_cost

    out: dict[str, Any] = {}
    eng = Engine(model_path="default", num_threads=threads, max_total_tokens=16384, show_progress=False,
                 cpu_act_quant=act)
    try:
        runner = eng.scheduler.runner
        eng.wait_idle()
        cost = measure_verify_cost(runner.model, runner.kv, 8, runner.vocab_size, reps=5, context=300)
        out["verify_ms"] = {j: 1e3 * c * cost.decode_seconds for j, c in cost.points}
        out["verify_wall_ms"] = verify_wall_ms(runner, 8, context=300)
        out["decode_ms"] = decode_cpu_ms(eng)
        if ngram:
            out["a_none"] = workload_a(eng, docs)
    finally:
        eng.shutdown()
    if ngram:
        eng = Engine(model_path="default", num_threads=threads, max_total_tokens=16384, show_progress=False,
                     cpu_act_quant=act, speculative_algorithm="NGRAM", speculative_num_draft_tokens=8)
        try:
            out["a_ngram"] = workload_a(eng, docs)
        finally:
            eng.shutdown()
    return out


def verify_wall_ms(runner: Any, k: int, context: int, reps: int = 7) -> dict[int, float]:
    """Wall ms of one row of 1 + j tokens (forward + lm_head), j = 0..k, min over `reps` interleaved rounds after a
    warm-up: measure_verify_cost's rows (generated_only: the fused decode_stack / decode_rows) timed by the clock."""
    import torch

    from sgl.runtime.executor.forward_batch import ForwardBatch

    model, kv, vocab = runner.model, runner.kv, runner.vocab_size
    ctx = [(7 * i + 1) % vocab for i in range(context + 1 + k)]
    best = {j: float("inf") for j in range(k + 1)}
    with torch.inference_mode():
        model(ForwardBatch.from_lists([ctx[:context]], [list(range(context))]), kv)
        for rep in range(reps + 1):
            for j in best:
                fb = ForwardBatch.from_lists([ctx[context:context + 1 + j]], [list(range(context + 1 + j))],
                                             generated_only=True)
                t0 = time.perf_counter()
                model.compute_logits(model(fb, kv))
                if rep:
                    best[j] = min(best[j], 1e3 * (time.perf_counter() - t0))
    return best


def workload_a(eng: Any, docs: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_speculative import run_workload, workloads  # the coordinator's workload (a), as it runs it

    prompts, params, batch = workloads(quick=False)["a_copy_extraction"]
    r = run_workload(eng, prompts[:docs], params, batch)
    return {k: r[k] for k in ("decode_seconds", "decode_tokens", "decode_tok_s", "cpu_seconds", "tokens",
                              "accept_length", "output_ids")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--act", nargs="+", default=["q16", "q8"], choices=["q16", "q8", "none"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ngram", action="store_true", help="also workload (a) with and without NGRAM")
    ap.add_argument("--docs", type=int, default=4, help="documents of workload (a)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in args.act}
    for rnd in range(args.rounds):
        for act in args.act:
            r = one_round(act, args.threads, args.ngram, args.docs)
            runs[act].append(r)
            print(f"round {rnd} {act}: decode {r['decode_ms']:.2f} ms/token, verify 1+8 {r['verify_ms'][8]:.2f} ms; "
                  f"wall: 1 token {r['verify_wall_ms'][0]:.2f} ms, 1+8 {r['verify_wall_ms'][8]:.2f} ms", flush=True)
    best: dict[str, dict[str, Any]] = {}
    for act, rs in runs.items():
        b: dict[str, Any] = {"decode_ms": min(r["decode_ms"] for r in rs),
                             "verify_ms": {j: min(r["verify_ms"][j] for r in rs) for j in rs[0]["verify_ms"]},
                             "verify_wall_ms": {j: min(r["verify_wall_ms"][j] for r in rs) for j in rs[0]["verify_wall_ms"]}}
        if args.ngram:
            b["a_none_decode_tok_s"] = max(r["a_none"]["decode_tok_s"] for r in rs)
            b["a_ngram_decode_tok_s"] = max(r["a_ngram"]["decode_tok_s"] for r in rs)
            b["a_none_tok_cpu_s"] = max(r["a_none"]["tokens"] / r["a_none"]["cpu_seconds"] for r in rs)
            b["a_ngram_tok_cpu_s"] = max(r["a_ngram"]["tokens"] / r["a_ngram"]["cpu_seconds"] for r in rs)
            b["a_accept_length"] = rs[-1]["a_ngram"]["accept_length"]
            b["a_identical"] = all(r["a_ngram"]["output_ids"] == r["a_none"]["output_ids"] for r in rs)
        best[act] = b
    base = best[args.act[0]]
    print(f"\n{args.threads} thread(s), load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}; min CPU ms over "
          f"{args.rounds} rounds; x = ratio to {args.act[0]}'s decode step")
    print("\n| act | decode ms/token | verify 1+1 | 1+4 | 1+8 (ms, x) | per draft token (1+8) |")
    print("|---|---|---|---|---|---|")
    for act, b in best.items():
        v = b["verify_ms"]
        slope = (v[8] - v[0]) / 8
        print(f"| {act} | {b['decode_ms']:.2f} ({b['decode_ms'] / base['decode_ms']:.2f}x) | {v[1]:.2f} | {v[4]:.2f} | "
              f"{v[8]:.2f} ({v[8] / base['verify_ms'][0]:.2f}x) | {slope:.2f} ms ({slope / base['verify_ms'][0]:.3f}x) |")
    print(f"\nwall ms of a row (forward + lm_head), min over {args.rounds} rounds x 7; x = ratio to its mode's 1 token")
    print("\n| act | 1 token | 1+1 | 1+4 | 1+8 (ms, x) | per draft token (1+8) |")
    print("|---|---|---|---|---|---|")
    for act, b in best.items():
        w = b["verify_wall_ms"]
        slope = (w[8] - w[0]) / 8
        print(f"| {act} | {w[0]:.2f} | {w[1]:.2f} | {w[4]:.2f} | {w[8]:.2f} ({w[8] / w[0]:.2f}x) | {slope:.2f} ms "
              f"({slope / w[0]:.3f}x) |")
    if args.ngram:
        print(f"\n| act | (a) decode tok/s: none | NGRAM | vs {args.act[0]} none | tok per CPU-s vs {args.act[0]} none "
              "| accept length | identical |")
        print("|---|---|---|---|---|---|---|")
        for act, b in best.items():
            print(f"| {act} | {b['a_none_decode_tok_s']:.1f} | {b['a_ngram_decode_tok_s']:.1f} | "
                  f"{b['a_ngram_decode_tok_s'] / base['a_none_decode_tok_s']:.2f}x | "
                  f"{b['a_ngram_tok_cpu_s'] / base['a_none_tok_cpu_s']:.2f}x | {b['a_accept_length']:.2f} | "
                  f"{b['a_identical']} |")
    for rs in runs.values():
        for r in rs:
            for k in ("a_none", "a_ngram"):
                if k in r:
                    r[k].pop("output_ids", None)
    info = {"threads": args.threads, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    RESULTS.mkdir(exist_ok=True)
    name = "bench_act_modes" + (f"_{args.tag}" if args.tag else "") + ".json"
    (RESULTS / name).write_text(json.dumps({"info": info, "best": best, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
