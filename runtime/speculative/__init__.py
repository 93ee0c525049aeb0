"""Speculative decoding: drafters propose tokens, the target verifies them all in one forward pass.

    drafter.propose(reqs, k) -> one draft per request (runtime/speculative/drafter.py)
    scheduler: a verify row [pending token] + draft, one KV slot each (runtime/scheduler/speculative_rows.py)
    runner: logits at every position; the sampler walks them in order (runtime/executor/verify.py)
    scheduler: appends the produced tokens, frees the rejected drafts' slots at once

One module per algorithm; `make_drafter` picks it from `--speculative-algorithm`.
"""

from __future__ import annotations

from typing import Optional

from sgl.runtime.config import ServerArgs
from sgl.runtime.speculative.drafter import Drafter


def make_drafter(args: ServerArgs) -> Optional[Drafter]:
    """The drafter `args.speculative_algorithm` names, or None when speculation is off."""
    if args.speculative_algorithm is None:
        return None
    if args.speculative_algorithm == "NGRAM":
        from sgl.runtime.speculative.ngram import NgramDrafter

        return NgramDrafter(args.speculative_ngram_min_match_window_size,
                            args.speculative_ngram_max_match_window_size)
    raise ValueError(f"unknown speculative algorithm {args.speculative_algorithm!r}")
