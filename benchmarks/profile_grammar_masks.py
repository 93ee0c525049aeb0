"""Where the slow masks are: bench_grammar.py's random walks (3 per schema, <= 200 steps, uniform over
the allowed tokens, half the time among short closing tokens) over one subset with our default
compiler, timing `fill_bitmask` and `accept` per step in this thread's CPU time, then the p50/p90/p99
and the p99 steps (schema, step, allowed-token count, the text before, matcher type).

    OMP_NUM_THREADS=1 python benchmarks/profile_grammar_masks.py --subset Github_trivial --n 60
    OMP_NUM_THREADS=1 python benchmarks/profile_grammar_masks.py --subset Github_trivial --n 60 --off

`--keep-long-bounds` keeps a long maxLength beside a format/pattern in the grammar instead of the guard
(grammars/schema_relax.py `guard_long_format_bound`). `--off` turns off the two earlier mask levers for
an A/B in the same conditions: the masks cached after the first HEAD_TOKENS tokens (grammars/base.py)
and dropping patterns every string matches (grammars/json_schema.py). `--out F` appends the summary
line (JSON) to F. Run on and off alternately: on a shared machine p99 moves by ~20% run to run.
"""
from __future__ import annotations

import argparse
import os
import random
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGL_SHARED_DATA", ROOT.parent / "shared" / "data")) / "jsonschemabench-dev"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", default="Github_trivial")
    p.add_argument("--n", type=int, default=60, help="schemas (a seeded sample of the subset)")
    p.add_argument("--off", action="store_true", help="disable the head-mask cache and the vacuous-pattern drop")
    p.add_argument("--keep-long-bounds", action="store_true",
                   help="keep long maxLength bounds beside a format/pattern in the grammar (no guard)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="append the summary as one JSON line to this file")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import sys

    import numpy as np
    import torch

    import sgl.grammars.base as base
    import sgl.grammars.json_schema as js
    from sgl.grammars import GrammarCompiler, Vocabulary

    sys.path.insert(0, str(ROOT / "tests" / "grammars"))
    from grammar_testlib import load_default_tokenizer  # noqa: E402

    torch.set_num_threads(1)
    if args.keep_long_bounds:
        import sgl.grammars.schema_relax as relax
        relax._LONG_STRING = relax._HUGE_STRING = 1 << 62
    if args.off:
        base.HEAD_TOKENS = 0
        js.matches_every_string = lambda pattern: False
    tok, eos = load_default_tokenizer()
    vocab = Vocabulary.from_tokenizer(tok, eos, None)
    compiler = GrammarCompiler(vocab, backend="llguidance", compile_timeout_s=60, num_threads=1)
    files = random.Random(0).sample(sorted((DATA / args.subset).glob("*.json")), args.n)
    closing = np.array([bool(b) and len(b) <= 3 and any(c in b for c in b'"}],') for b in vocab.token_bytes]
                       + [False] * (vocab.vocab_size_padded - vocab.vocab_size))
    mask = torch.zeros(1, (vocab.vocab_size_padded + 31) // 32, dtype=torch.int32)
    rows = []  # (us, fill us, accept us, file, step, allowed, text before, matcher)
    for f in files:
        try:
            g = compiler.compile_spec(compiler.to_spec("json_schema", f.read_text()))
        except Exception:  # noqa: BLE001 - rejected schemas have no masks
            continue
        rng = random.Random(1)
        for _ in range(3):
            m, out = g.matcher(), []
            for step in range(200):
                c0 = time.thread_time_ns()
                m.fill_bitmask(mask, 0)
                fill = (time.thread_time_ns() - c0) / 1e3
                if m.error:
                    break
                bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: vocab.vocab_size_padded].astype(bool)
                allowed = np.flatnonzero(bits)
                if bits[vocab.eos_token_id] and (len(allowed) == 1 or rng.random() < 0.5):
                    break
                close = np.flatnonzero(bits & closing)
                pool = close if len(close) and rng.random() < 0.5 else allowed
                t = int(pool[rng.randrange(len(pool))])
                if t == vocab.eos_token_id:
                    break
                c1 = time.thread_time_ns()
                ok = m.accept(t)
                acc = (time.thread_time_ns() - c1) / 1e3
                rows.append((fill + acc, fill, acc, f.name, step, len(allowed), vocab.decode(out[-6:])[-30:],
                             type(m).__name__))
                if not ok:
                    break
                out.append(t)
                keep = m.take_rollback() if hasattr(m, "take_rollback") else None
                if keep is not None:
                    m.rollback(len(out) - keep)
                    del out[keep:]
    us = sorted(r[0] for r in rows)
    pct = {q: us[int(q * (len(us) - 1))] for q in (0.5, 0.9, 0.99)}
    mode = ("off" if args.off else "on") + (", long bounds kept" if args.keep_long_bounds else "")
    print(f"{args.subset} ({mode}): {len(rows)} steps over {len(files)} schemas, thread CPU us "
          f"p50 {pct[0.5]:.1f} p90 {pct[0.9]:.1f} p99 {pct[0.99]:.1f} (load {os.getloadavg()[0]:.1f})")
    if args.out:
        import json
        with open(args.out, "a") as f:
            f.write(json.dumps({"subset": args.subset, "mode": mode, "schemas": len(files), "steps": len(rows),
                                "thread_cpu_us": {str(q): round(v, 1) for q, v in pct.items()},
                                "steps_over_200us": sum(r[0] > 200 for r in rows), "load": os.getloadavg()[0],
                                "threads": 1}) + "\n")
    for r in sorted((r for r in rows if r[0] >= pct[0.99]), reverse=True)[: args.top]:
        print(f"{r[0]:7.0f} us (fill {r[1]:.0f}, accept {r[2]:.0f})  {r[3]} step {r[4]}  allowed {r[5]}  {r[6]!r}  {r[7]}")


if __name__ == "__main__":
    main()
