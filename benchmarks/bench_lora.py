"""Multi-LoRA throughput on the default model: one batch of 32 requests spread over 1, 4 and 8
adapters, against the same 32 requests with no adapter and against the naive way (each adapter's
requests as a batch of their own, one after the other), all in the same run and engine.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_lora.py --threads 1 [--quick]

Adapters are random PEFT-layout folders (rank --rank on all seven targets, B not zero), written to a
temporary folder: their values do not change the cost. Each request: a ~48-token prompt, --new
greedy tokens with ignore_eos. Targets (issue 13): >= 0.8x the no-adapter throughput with 8
adapters and >= 2x the naive way. Prints a table of ratios and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from sgl.runtime.engine import Engine  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def write_random_adapter(folder: Path, engine: Engine, rank: int, seed: int) -> str:
    """A PEFT-layout adapter (adapter_config.json + adapter_model.safetensors) with random A and B."""
    from safetensors.torch import save_file

    c = engine.model_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    dims = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
            "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c.num_hidden_layers):
        for name, (n_in, n_out) in dims.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{kind}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none"}))
    return str(folder)


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(40)) + f" request {i}:" for i in range(n)]


def timed(engine: Engine, texts: list[str], loras: list, sp: dict) -> float:
    """Tokens/s of one batch (loras: one name or None per text)."""
    engine.flush_cache()  # every run computes its prompts: no run profits from an earlier one's KV
    t = time.perf_counter()
    outs = engine.generate(texts, sp, lora_path=loras)
    dt = time.perf_counter() - t
    return sum(o["meta_info"]["completion_tokens"] for o in outs) / dt


def naive(engine: Engine, texts: list[str], loras: list, sp: dict) -> float:
    """Each adapter's requests as a batch of their own, one batch after the other."""
    engine.flush_cache()
    t, tokens = time.perf_counter(), 0
    for name in dict.fromkeys(loras):
        idx = [i for i, lp in enumerate(loras) if lp == name]
        outs = engine.generate([texts[i] for i in idx], sp, lora_path=[name] * len(idx))
        tokens += sum(o["meta_info"]["completion_tokens"] for o in outs)
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new", type=int, default=32, help="new tokens per request")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternated runs; the median is reported")
    ap.add_argument("--segment-loop", action="store_true",
                    help="always the per-segment loop, never the padded batched matmul (for comparison)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat (a smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_lora.json"))
    args = ap.parse_args()
    if args.quick:
        args.new, args.repeats = 16, 1
    torch.set_num_threads(args.threads)
    engine = Engine(model_path="default", num_threads=args.threads, max_loras_per_batch=8, show_progress=False)
    if args.segment_loop:
        engine.scheduler.runner._lora_stacks = None  # LoraBatch.from_rows without a stack cache: the loop
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    for i in range(8):
        engine.load_lora_adapter(f"lora{i}", write_random_adapter(tmp / f"lora{i}", engine, args.rank, seed=i))
    texts = prompts(args.requests)
    sp = {"max_new_tokens": args.new, "temperature": 0, "ignore_eos": True}
    engine.generate(texts[:4], {**sp, "max_new_tokens": 4}, lora_path=["lora0", None, "lora1", None])  # warm-up

    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # alternated, so load changes hit every configuration alike
        runs.setdefault("none", []).append(timed(engine, texts, [None] * len(texts), sp))
        for k in (1, 4, 8):
            loras = [f"lora{i % k}" for i in range(len(texts))]
            runs.setdefault(f"batched_{k}", []).append(timed(engine, texts, loras, sp))
            if k > 1:
                runs.setdefault(f"naive_{k}", []).append(naive(engine, texts, loras, sp))
        print("run:", {name: round(v[-1], 1) for name, v in runs.items()}, file=sys.stderr, flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    engine.shutdown()

    load = os.getloadavg()[0]
    print(f"\n{'segment loop' if args.segment_loop else 'auto (stacked bmm from 3 segments)'}: "
          f"{args.requests} requests x {args.new} new tokens, rank {args.rank}, {args.threads} thread(s), "
          f"load {load:.1f}; median of {args.repeats} alternated runs")
    print(f"| adapters | batched tok/s | vs no adapter (>= 0.8x @ 8) | naive tok/s | batched vs naive (>= 2x @ 8) |")
    print("|---|---|---|---|---|")
    print(f"| none | {med['none']:.1f} | 1.00x | | |")
    rows = []
    for k in (1, 4, 8):
        b, n = med[f"batched_{k}"], med.get(f"naive_{k}")
        row = {"adapters": k, "batched_tok_s": b, "vs_none": b / med["none"],
               "naive_tok_s": n, "vs_naive": b / n if n else None}
        rows.append(row)
        print(f"| {k} | {b:.1f} | {b / med['none']:.2f}x | {f'{n:.1f}' if n else '(= batched)'} | "
              f"{f'{b / n:.2f}x' if n else ''} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"lora_update": "segment_loop" if args.segment_loop else "auto",
                                          "requests": args.requests, "new_tokens": args.new, "rank": args.rank,
                                          "threads": args.threads, "load_avg_1m": load, "repeats": args.repeats,
                                          "none_tok_s": med["none"], "rows": rows, "runs": runs}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
