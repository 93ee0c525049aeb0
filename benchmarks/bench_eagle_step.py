"""The cost of one EAGLE draft step vs one target decode step, batch 1, same process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_eagle_step.py --threads 1 [--head PATH]

Times (mean of --iters after 5 warm-ups, a 200-token context in both): the default model's decode
step (native weights, greedy token included), the shipped head's step with fp32 weights and with
q8_0 weights (what a native target uses: runtime/speculative/eagle.py), each with its draft-vocabulary
logits and argmax, and the target's full lm_head alone. Prints a table, writes
benchmarks/results/bench_eagle_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from sgl.runtime.executor.forward_batch import ForwardBatch  # noqa: E402
from sgl.runtime.executor.kv_cache import KVCache  # noqa: E402
from sgl.runtime.models.loader import load_model  # noqa: E402
from sgl.runtime.models.native_weights import linear  # noqa: E402
from sgl.runtime.speculative.eagle import EagleDrafter  # noqa: E402
from sgl.runtime.speculative.eagle_head import HeadKV, head_extend  # noqa: E402
from sgl.runtime.speculative.eagle_io import DEFAULT_HEAD, load_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CTX = 200


def timed(fn: Callable[[], None], iters: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--head", default=str(DEFAULT_HEAD))
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_eagle_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    target = load_model("default", show_progress=False)
    m = target.model
    kv = KVCache.for_model(target.config, 512, torch.float32)
    with torch.inference_mode():
        m(ForwardBatch.from_lists([list(range(100, 100 + CTX))], [list(range(CTX))]), kv)

    @torch.inference_mode()
    def target_step() -> None:
        h = m(ForwardBatch.from_lists([[5]], [list(range(CTX + 1))]), kv)
        m.compute_logits(h).argmax(-1)

    def head_step(quantize: Optional[str]) -> Callable[[], None]:
        head = load_head(args.head, target.config)
        drafter = EagleDrafter(head, m, quantize=quantize)
        cache = HeadKV.empty(head.config, 512)
        H = head.config.hidden_size
        head_extend(head, torch.randn(CTX, H), torch.randn(CTX, H), torch.arange(CTX), [cache], [CTX])
        feat = torch.randn(1, H)

        @torch.inference_mode()
        def step() -> None:
            cache.truncate(CTX)
            g = head_extend(head, drafter._embed([5]), feat, torch.tensor([CTX]), [cache], [1])
            drafter.d2t.index_select(0, linear(g, drafter.lm_head).argmax(-1))
        return step

    rows = {"target decode step": timed(target_step, args.iters),
            "EAGLE draft step, fp32 head": timed(head_step(None), args.iters),
            "EAGLE draft step, q8_0 head": timed(head_step("q8_0"), args.iters),
            "target lm_head alone": timed(lambda: m.compute_logits(torch.randn(1, target.config.hidden_size)),
                                          args.iters)}
    base = rows["target decode step"]
    print(f"threads {args.threads}, load before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    for name, ms in rows.items():
        print(f"{name:30s} {ms:8.2f} ms  {ms / base:6.1%} of a target step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "load_before": load_before,
                                          "load_after": os.getloadavg(), "ms": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
