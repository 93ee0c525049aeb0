"""Where a decode step of the default model spends its time (issue 14's profile), at batch 1 or more.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_decode_step.py [--threads 1] [--weight-format native]
        [--act q16] [--steps 80] [--batch 32]

Runs the model directly (no scheduler): a 64-token prompt, then `--steps` greedy decode steps, and
reports ms per token of the whole step (ForwardBatch build, forward, lm_head, argmax) and, in a second
pass, of each component (with the fused batch-1 layer, the default: the layer's one C++ call; --unfused:
the torch path's parts), timed by wrapping the functions the layer calls (the wrappers add ~1 us per
call, so the components' sum exceeds the unwrapped step slightly). Prints the load average: on a
shared machine read the numbers as shares of the step, not as speeds.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import sgl.runtime.models.fused_decode as fused_decode  # noqa: E402
import sgl.runtime.models.llama as llama  # noqa: E402
from sgl.kernels import cpu  # noqa: E402
from sgl.runtime.executor.forward_batch import ForwardBatch  # noqa: E402
from sgl.runtime.executor.kv_cache import KVCache  # noqa: E402
from sgl.runtime.models.loader import load_model  # noqa: E402


def decode(model, kv, steps: int, on_step=None, batch: int = 1) -> dict[str, float]:
    """ms per step of each phase over `steps` steps after 8 warm-up steps; `batch` rows of different lengths
    (row b: a 64 + 4b token prompt), as a continuous batch of that many requests decodes."""
    stride = 64 + 4 * batch + steps + 8  # slots per row
    ids = [list(range(100, 164 + 4 * b)) for b in range(batch)]
    slots = [list(range(b * stride, b * stride + len(ids[b]))) for b in range(batch)]
    with torch.inference_mode():
        h = model(ForwardBatch.from_lists(input_ids=ids, slot_tables=slots), kv)
        ends = torch.tensor([len(i) for i in ids]).cumsum(0) - 1
        toks = model.compute_logits(h[ends]).argmax(-1).tolist()
        t = collections.Counter()
        for step in range(steps + 8):
            for b in range(batch):
                slots[b].append(slots[b][-1] + 1)
            t0 = time.perf_counter()
            fb = ForwardBatch.from_lists(input_ids=[[tok] for tok in toks], slot_tables=slots, generated_only=True)
            t1 = time.perf_counter()
            h = model(fb, kv)
            t2 = time.perf_counter()
            logits = model.compute_logits(h)
            t3 = time.perf_counter()
            toks = logits.argmax(-1).tolist()
            t4 = time.perf_counter()
            if step == 7 and on_step is not None:
                on_step()
            if step >= 8:
                for k, v in (("batch build", t1 - t0), ("forward", t2 - t1), ("lm_head", t3 - t2), ("argmax", t4 - t3)):
                    t[k] += v
    return {k: v / steps * 1e3 for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weight-format", default="native", choices=["native", "fp32"])
    ap.add_argument("--act", default="q16", choices=list(cpu.ACT_QUANT))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--unfused", action="store_true",
                    help="run every layer's torch path (runtime/models/fused_decode.py off) instead of one C++ call")
    ap.add_argument("--batch", type=int, default=1, help="rows per decode step (rows of different lengths)")
    a = ap.parse_args()
    fused_decode.ENABLED = not a.unfused
    torch.set_num_threads(a.threads)
    cpu.set_num_threads(a.threads)
    cpu.set_act_quant(a.act)
    lm = load_model("default", dtype="float32", device="cpu", show_progress=False, weight_format=a.weight_format)
    model = lm.model
    kv = KVCache.for_model(lm.config, a.batch * (64 + 4 * a.batch + a.steps + 8), torch.float32, "cpu")
    whole = decode(model, kv, a.steps, batch=a.batch)
    total = sum(whole.values())
    print(f"{a.weight_format} act={a.act} {'unfused' if a.unfused else 'fused'} {a.threads} thread(s), batch {a.batch}, "
          f"load {os.getloadavg()[0]:.1f}: {total:.2f} ms/step ({a.batch * 1e3 / total:.1f} tok/s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in whole.items()))

    acc: collections.Counter = collections.Counter()

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            r = fn(*args, **kwargs)
            acc[name] += time.perf_counter() - t0
            return r
        return run

    def linear(x, w, bias=None, residual=None):
        t0 = time.perf_counter()
        r = orig_linear(x, w, bias, residual)
        acc[f"linear {tuple(w.shape)}"] += time.perf_counter() - t0
        return r

    orig_linear = llama.linear
    llama.linear = linear
    llama.paged_attention = timed("attention", llama.paged_attention)
    llama.rms_norm = timed("rms_norm", llama.rms_norm)
    llama.F = type("F", (), {"silu": staticmethod(timed("silu (then * up)", torch.nn.functional.silu))})
    kv.store = timed("kv store", kv.store)
    model.rope.apply = timed("rope", model.rope.apply)
    fused_decode.decode_layer = timed("fused layer (C++: norms, 4 matmuls, rope, kv, attention)",
                                      fused_decode.decode_layer)
    fused_decode.decode_stack = timed("fused layers (C++: every layer in one call)", fused_decode.decode_stack)
    parts = decode(model, kv, a.steps, on_step=acc.clear, batch=a.batch)
    print(f"components (wrapped run: {sum(parts.values()):.2f} ms/step):")
    for name, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {v / a.steps * 1e3:7.3f} ms/step")
    inside = sum(acc.values()) / a.steps * 1e3
    # the lm_head's linear runs outside forward (compute_logits): add it back when subtracting from forward
    lm_head = acc[f"linear {(lm.config.vocab_size, lm.config.hidden_size)}"] / a.steps * 1e3
    print(f"  {'rest of forward (Python, views)':28s} {parts['forward'] - inside + lm_head:7.3f} ms/step")


if __name__ == "__main__":
    main()
