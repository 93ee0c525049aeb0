"""Packed weight copies (QuantWeight.pack) vs the GGUF rows, in one run (same process, same thread).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_packed_weights.py [--threads 1] [--acts q8 q16] [--rounds 5]

Part 1, the kernels: the default model's lm_head (49,152 x 576 Q8_0) and, under q8, one step's worth of its layer
weights (the 120 Q4_1 matmuls of 30 layers: qkv, o, gate_up, down) for 1, 2, 4, 5, 8 and 9 rows (a batch-1 step,
verify rows), cold (a 256 MB write before each pass evicts them, as a step's other weights do); median of --iters.
Part 2, the engine: batch-1 greedy decode of --tokens tokens after chat prompts (workload (b)'s first questions),
an engine with packing (the default) and one with --disable-cpu-weight-packing in alternating rounds (--rounds
each), tokens per second of the decode phase (after each request's first token: bench_speculative.py's decode
rate), the median round. The outputs of both must be identical (a copy gives the same bits).
Prints tables of ratios (packed / GGUF rows) and writes benchmarks/results/bench_packed_weights.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speculative import chat  # noqa: E402
from fork_join_agent import questions  # noqa: E402

from sgl.kernels.cpu.quant import QuantWeight, quant_linear  # noqa: E402
from sgl.runtime.models.native_weights import pack_into_arena  # noqa: E402
from sgl.runtime.engine import Engine  # noqa: E402

ROWS = (1, 2, 4, 5, 8, 9)


def median_ms(fn: Callable[[], Any], iters: int, evict: torch.Tensor | None) -> float:
    times = []
    for _ in range(iters):
        if evict is not None:
            evict.add_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_table(name: str, weights: list[QuantWeight], act: str, iters: int) -> list[dict[str, Any]]:
    """Each row count: the weights' matmuls from their GGUF rows and from their packed copies, alternating."""
    plain = [QuantWeight(w.qtype, w.shape, w.data) for w in weights]  # the GGUF rows alone
    packed = [QuantWeight(w.qtype, w.shape, w.data) for w in weights]
    pack_into_arena(packed, act)  # as the engine packs them: one huge-page buffer in the order of use
    if not all(act in p.packed for p in packed):
        raise SystemExit(f"no {act} packed copies on this CPU (q8: AVX2 or AVX-512 VNNI; q16: AVX-512 VNNI)")
    evict = torch.ones(64 << 20)
    rows = []
    for m in ROWS:
        xs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}
        a = lambda: [quant_linear(xs[w.shape[1]], w, act_quant=act) for w in plain]  # noqa: E731
        b = lambda: [quant_linear(xs[w.shape[1]], w, act_quant=act) for w in packed]  # noqa: E731
        assert all(torch.equal(u, v) for u, v in zip(a(), b())), f"{name}: a packed copy changed a bit"
        ra, rb = median_ms(a, iters, evict), median_ms(b, iters, evict)
        rows.append({"weights": name, "act": act, "rows": m, "gguf_rows_ms": ra, "packed_ms": rb, "speedup": ra / rb})
    return rows


def decode_round(eng: Engine, prompts: list[str], tokens: int) -> tuple[float, list[list[int]]]:
    outs = [eng.generate(p, {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}) for p in prompts]
    decode_s = sum(o["meta_info"]["e2e_latency"] - o["meta_info"]["first_token_latency"] for o in outs)
    n = sum(o["meta_info"]["completion_tokens"] - 1 for o in outs)
    return n / decode_s, [o["output_ids"] for o in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--acts", nargs="+", default=["q8", "q16"], choices=["q8", "q16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_packed_weights.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    kernels: list[dict[str, Any]] = []
    decode: dict[str, dict[str, Any]] = {}
    prompts = [chat(q) for q in questions(a.prompts)]
    for act in a.acts:
        engines = {pk: Engine(model_path="default", num_threads=a.threads, cpu_act_quant=act, show_progress=False,
                              disable_cpu_weight_packing=not pk) for pk in (False, True)}
        try:
            model = engines[False].scheduler.runner.model
            kernels += kernel_table("lm_head", [model.lm_head], act, a.iters)
            if act == "q8":  # q16 packs Q8_0 only: the layers' Q4_1 weights have no q16 copy
                layers = [getattr(layer, n) for layer in model.layers for n in layer.LINEARS]
                kernels += kernel_table("layers", layers, act, a.iters)
            rates: dict[bool, list[float]] = {True: [], False: []}
            ids: dict[bool, list[list[int]]] = {}
            for eng in engines.values():
                eng.generate(chat("Hello"), {"max_new_tokens": 8, "temperature": 0})  # warm-up (packs the copies)
            for _ in range(a.rounds):
                for packed in (False, True):
                    rate, out = decode_round(engines[packed], prompts, a.tokens)
                    rates[packed].append(rate)
                    ids[packed] = out
            assert ids[True] == ids[False], f"packing changed an output ({act})"
        finally:
            for eng in engines.values():
                eng.shutdown()
        med = {k: statistics.median(v) for k, v in rates.items()}
        decode[act] = {"gguf_rows": rates[False], "packed": rates[True], "ratio": med[True] / med[False],
                       "median": {"gguf_rows": med[False], "packed": med[True]}}
    load_after = os.getloadavg()
    print(f"packed weights, {a.threads} thread(s), cold, median of {a.iters} passes; "
          f"load {load[0]:.1f} -> {load_after[0]:.1f}")
    print("| weights | act | rows | GGUF rows ms | packed ms | speedup |\n|---|---|---|---|---|---|")
    for r in kernels:
        print(f"| {r['weights']} | {r['act']} | {r['rows']} | {r['gguf_rows_ms']:.3f} | {r['packed_ms']:.3f} | "
              f"{r['speedup']:.2f}x |")
    print(f"\nbatch-1 decode, {a.prompts} chat prompts x {a.tokens} tokens, {a.rounds} rounds each (median), "
          "outputs identical")
    print("| act | no packing tok/s | packed tok/s | ratio |\n|---|---|---|---|")
    for act, d in decode.items():
        print(f"| {act} | {d['median']['gguf_rows']:.1f} | {d['median']['packed']:.1f} | {d['ratio']:.2f}x |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": a.threads, "load": [load[0], load_after[0]], "kernel": kernels,
                                       "decode_tok_s": decode}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
