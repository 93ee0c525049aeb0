"""The lm_head from its oct-packed Q8_0 copy vs the GGUF rows, q8 activations, in one run (same process, same thread).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_lm_head_packed.py [--threads 1] [--rounds 5] [--tokens 128]

Part 1, the kernel: the default model's lm_head (49,152 x 576 Q8_0) for 1, 2, 5 and 9 rows, cold (a 256 MB write
between calls evicts it, as a decode step's 80 MB of layer weights do) and hot; median of --iters calls.
Part 2, the engine: batch-1 greedy decode of --tokens tokens after a chat prompt (workload (b)'s first questions),
q8 activations, the packed copy on and off in alternating rounds (--rounds each), tokens per second of the
decode phase (after each request's first token: bench_speculative.py's decode rate), the median round. The
outputs of both must be identical (the packed copy gives the same bits).
Prints tables of ratios (packed / rows) and writes benchmarks/results/bench_lm_head_packed.json.
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
from sgl.runtime.engine import Engine  # noqa: E402


def median_ms(fn: Callable[[], Any], iters: int, evict: torch.Tensor | None) -> float:
    times = []
    for _ in range(iters):
        if evict is not None:
            evict.add_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_table(lm_head: Any, act: str, iters: int) -> list[dict[str, Any]]:
    plain = QuantWeight(lm_head.qtype, lm_head.shape, lm_head.data)  # the GGUF rows alone
    packed = QuantWeight(lm_head.qtype, lm_head.shape, lm_head.data)
    if not packed.pack(act):
        raise SystemExit("no AVX-512 VNNI tiles on this CPU: the lm_head has no packed copy here")
    evict = torch.ones(64 << 20)
    rows = []
    for m in (1, 2, 5, 9):
        x = torch.randn(m, lm_head.shape[1])
        a = lambda: quant_linear(x, plain, act_quant=act)  # noqa: E731
        b = lambda: quant_linear(x, packed, act_quant=act)  # noqa: E731
        assert torch.equal(a(), b())
        for cold in (True, False):
            ra, rb = median_ms(a, iters, evict if cold else None), median_ms(b, iters, evict if cold else None)
            rows.append({"act": act, "rows": m, "cold": cold, "gguf_rows_ms": ra, "packed_ms": rb, "speedup": ra / rb})
    return rows


def decode_round(eng: Engine, prompts: list[str], tokens: int, packed: bool, act: str) -> tuple[float, list[list[int]]]:
    model = eng.scheduler.runner.model
    model.__dict__["_lm_head_packed"] = {(id(model.lm_head), act)}  # compute_logits packs nothing more itself
    if packed:
        model.lm_head.pack(act)
    else:
        model.lm_head.packed.pop(act, None)  # the GGUF rows
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
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_lm_head_packed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    kernels: list[dict[str, Any]] = []
    decode: dict[str, dict[str, Any]] = {}
    prompts = [chat(q) for q in questions(a.prompts)]
    for act in a.acts:
        eng = Engine(model_path="default", num_threads=a.threads, cpu_act_quant=act, show_progress=False)
        try:
            kernels += kernel_table(eng.scheduler.runner.model.lm_head, act, a.iters)
            eng.generate(chat("Hello"), {"max_new_tokens": 8, "temperature": 0})  # warm-up
            rates: dict[bool, list[float]] = {True: [], False: []}
            ids: dict[bool, list[list[int]]] = {}
            for _ in range(a.rounds):
                for packed in (False, True):
                    rate, out = decode_round(eng, prompts, a.tokens, packed, act)
                    rates[packed].append(rate)
                    ids[packed] = out
            assert ids[True] == ids[False], f"the packed lm_head changed an output ({act})"
        finally:
            eng.shutdown()
        med = {k: statistics.median(v) for k, v in rates.items()}
        decode[act] = {"gguf_rows": rates[False], "packed": rates[True], "ratio": med[True] / med[False],
                       "median": {"gguf_rows": med[False], "packed": med[True]}}
    load_after = os.getloadavg()
    print(f"lm_head 49152 x 576 Q8_0, {a.threads} thread(s), median of {a.iters} calls; "
          f"load {load[0]:.1f} -> {load_after[0]:.1f}")
    print("| act | rows | cache | GGUF rows ms | packed ms | speedup |\n|---|---|---|---|---|---|")
    for r in kernels:
        print(f"| {r['act']} | {r['rows']} | {'cold' if r['cold'] else 'hot'} | {r['gguf_rows_ms']:.3f} | "
              f"{r['packed_ms']:.3f} | {r['speedup']:.2f}x |")
    print(f"\nbatch-1 decode, {a.prompts} chat prompts x {a.tokens} tokens, {a.rounds} rounds each (median), "
          "outputs identical")
    print("| act | GGUF rows tok/s | packed tok/s | ratio |\n|---|---|---|---|")
    for act, d in decode.items():
        print(f"| {act} | {d['median']['gguf_rows']:.1f} | {d['median']['packed']:.1f} | {d['ratio']:.2f}x |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": a.threads, "load": [load[0], load_after[0]], "kernel": kernels,
                                       "decode_tok_s": decode}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
