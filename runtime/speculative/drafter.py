"""The one interface every drafter implements, and the draft it returns.

A drafter is deterministic here: it proposes tokens, not distributions, so the draft distribution q
is one-hot and the speculative-sampling rule "accept d with min(1, p(d)/q(d)), else resample from
norm(max(0, p - q))" becomes "draw t ~ p; accept d iff t == d" (runtime/executor/verify.py): both
accept d with probability p(d) and, on rejection, give a token from p with d removed, renormalized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from sgl.runtime.scheduler.request import Req


@dataclass(frozen=True)
class Draft:
    """A chain of proposed tokens following the request's pending token (may be empty)."""

    token_ids: list[int]


class Drafter(Protocol):
    name: str

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        """At most `k` tokens per request, continuing `req.fill_ids` (whose last token is pending).
        Called on the scheduler thread; may keep per-request state in `req.draft_state`."""
        ...
