"""Where a batch-1 decode step's time goes outside the kernels: py-spy samples of the Engine's scheduler thread.

    pip install py-spy
    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_step_overhead.py [--threads 1] [--reps 6] [--rate 250]

Runs `--reps` greedy generations of 128 tokens after a 64-token prompt (the default model, native weights)
under `py-spy record --format raw` and sorts the scheduler thread's samples of decode steps (a step that
runs the unfused torch layers, i.e. a prefill chunk, is left out) into:
- kernels: the leaf frame is a call into the C++ extension (decode_stack / decode_layer, quant_linear, ...);
- model glue: the rest of the model's forward and compute_logits (embedding rows, rope lookup, norms' Python);
- sampler: sample_verify / sample / process_logits;
- scheduler and runner: everything else inside Scheduler.step (batch build, outputs, detokenize, bookkeeping).
Issue 14 asks the scheduler and sampler's Python to stay below 10% of a batch-1 step. py-spy samples wall
time of running (non-idle) threads, so a loaded machine inflates every share alike. JSON to
benchmarks/results/profile_step_overhead.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_CALLS = {"decode_stack", "decode_layer", "quant_linear", "decode_attention", "rms_norm", "gemv", "gemm"}


def worker(threads: int, reps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu import text_of
    from sgl.runtime.engine import Engine

    eng = Engine(num_threads=threads, max_total_tokens=65536, show_progress=False)
    greedy = {"temperature": 0, "ignore_eos": True}
    eng.generate(text_of(8, 0), {"max_new_tokens": 8, **greedy})
    prompt = eng.tokenizer.encode(text_of(80, 1))[:64]
    for _ in range(reps):
        eng.flush_cache()
        eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 128, **greedy})
    eng.shutdown()


def frame_name(frame: str) -> tuple[str, str]:
    """'func (path/file.py:line)' -> (func, path)."""
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    return (m.group(1), m.group(2)) if m else (frame, "")


def classify(raw: str) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = [frame_name(f) for f in stack.split(";")]
        names = [f for f, _ in frames]
        if "Scheduler.step" not in names or "LlamaDecoderLayer.forward" in names:
            continue
        leaf, leaf_path = frames[-1]
        if leaf in KERNEL_CALLS and "kernels/cpu/" in leaf_path:
            part = "kernels"
        elif "sample_verify" in names or "sample" in names:
            part = "sampler"
        elif "LlamaForCausalLM.forward" in names or "LlamaForCausalLM.compute_logits" in names:
            part = "model glue"
        else:
            part = "scheduler and runner"
        counts[part] += int(n)
    return dict(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.threads, args.reps)
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "raw.txt"
        t = time.perf_counter()
        subprocess.run([spy, "record", "-r", str(args.rate), "--format", "raw", "-o", str(out), "--", sys.executable,
                        __file__, "--worker", "--threads", str(args.threads), "--reps", str(args.reps)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        counts = classify(out.read_text())
    total = sum(counts.values())
    load = os.getloadavg()[0]
    print(f"batch-1 decode steps, {args.threads} thread(s), {total} scheduler-thread samples, "
          f"{time.perf_counter() - t:.0f} s, load {load:.1f}")
    for part in ("kernels", "model glue", "sampler", "scheduler and runner"):
        print(f"  {part:22s} {counts.get(part, 0) / total:6.1%}")
    py = counts.get("sampler", 0) + counts.get("scheduler and runner", 0)
    print(f"  scheduler + sampler Python: {py / total:.1%} of a step (issue 14: < 10%)")
    RESULTS.mkdir(exist_ok=True)
    dst = RESULTS / "profile_step_overhead.json"
    dst.write_text(json.dumps({"threads": args.threads, "load": load, "samples": counts,
                               "shares": {k: v / total for k, v in counts.items()},
                               "scheduler_and_sampler_share": py / total}, indent=1))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
