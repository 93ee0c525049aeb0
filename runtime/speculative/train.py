"""Train a draft head for the default model (or any Llama-family target) by self-distillation.

    OMP_WAIT_POLICY=PASSIVE python -m sgl.runtime.speculative.train --algorithm eagle \
        [--model-path default] [--out runtime/speculative/heads/smollm2-135m-eagle.safetensors]

Stage 1 (runtime/speculative/distill_data.py): the target answers the shipped prompts, and its hidden
states are recorded; the result is cached under ~/.cache/sgl/distill/, so reruns skip it.
Stage 2: the algorithm's trainer (train_eagle.py, train_medusa.py) fits the head on that data and
writes one small fp16 safetensors file with its config in the metadata.
The algorithm modules are imported lazily: each provides
    add_arguments(parser) and train(data, target, args, log) -> the saved path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Optional

import torch

from sgl.runtime.speculative.distill_data import DistillSpec, load_or_generate

TRAINERS = {"eagle": "sgl.runtime.speculative.train_eagle", "medusa": "sgl.runtime.speculative.train_medusa"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sgl.runtime.speculative.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", required=True, choices=sorted(TRAINERS))
    ap.add_argument("--model-path", default="default")
    ap.add_argument("--out", default=None, help="the head file to write (default: the algorithm's shipped path)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--num-chat", type=int, default=DistillSpec.num_chat, help="chat prompts to distill")
    ap.add_argument("--num-extraction", type=int, default=DistillSpec.num_extraction,
                    help="extraction prompts to distill (free-form and constrained, each)")
    ap.add_argument("--max-new-tokens", type=int, default=DistillSpec.max_new_tokens)
    ap.add_argument("--cpu-act-quant", default=DistillSpec.cpu_act_quant, choices=("q16", "q8"),
                    help="the generating engine's activations (q8: the fastest)")
    ap.add_argument("--data", default=None, help="a distillation data file to use or create (default: the cache)")
    ap.add_argument("--seed", type=int, default=0)
    for module in TRAINERS.values():  # each trainer adds its own options (help shows them all)
        try:
            importlib.import_module(module).add_arguments(ap)
        except ModuleNotFoundError:
            continue  # not built yet (the two trainers land separately)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0, c0 = time.monotonic(), time.process_time()

    def log(msg: str) -> None:
        # NOTE: wall time and this process's CPU time (all its threads): on a shared machine the CPU time
        # over the thread count is what the run would take on its own cores
        print(f"[{time.monotonic() - t0:6.0f} s, cpu {time.process_time() - c0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    try:
        trainer = importlib.import_module(TRAINERS[args.algorithm])
    except ModuleNotFoundError as e:
        print(f"error: the {args.algorithm} trainer is not available ({e})", file=sys.stderr)
        return 2
    spec = DistillSpec(model_path=args.model_path, num_chat=args.num_chat, num_extraction=args.num_extraction,
                       max_new_tokens=args.max_new_tokens, cpu_act_quant=args.cpu_act_quant, threads=args.threads)
    from pathlib import Path

    data = load_or_generate(spec, log, Path(args.data) if args.data else None)
    from sgl.runtime.models.loader import load_model

    target = load_model(args.model_path, show_progress=False, weight_format="fp32")  # trainers read fp32 weights
    out = trainer.train(data, target.model, args, log)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
