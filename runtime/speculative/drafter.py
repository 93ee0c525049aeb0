"""The one interface every drafter implements, and the draft it returns.

A drafter is deterministic here: it proposes tokens, not distributions, so the draft distribution q
is one-hot and the speculative-sampling rule "accept d with min(1, p(d)/q(d)), else resample from
norm(max(0, p - q))" becomes "draw t ~ p; accept d iff t == d" (runtime/executor/verify.py): both
accept d with probability p(d) and, on rejection, give a token from p with d removed, renormalized.

A draft is a chain or a token tree: `parents[j]` is node j's parent node (an earlier index), or -1
for the request's pending token; None means a chain (parents [-1, 0, 1, ...]). Trees are verified
in one row with a tree attention mask; the walk accepts one root-to-node path (verify.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from sgl.runtime.scheduler.request import Req


@dataclass(frozen=True)
class Draft:
    """Proposed tokens following the request's pending token (may be empty): a chain or a tree."""

    token_ids: list[int]
    parents: Optional[list[int]] = None  # None: a chain

    def __post_init__(self) -> None:
        assert self.parents is None or (len(self.parents) == len(self.token_ids)
                                         and all(-1 <= p < j for j, p in enumerate(self.parents)))

    def __len__(self) -> int:
        return len(self.token_ids)

    def depths(self) -> list[int]:
        """Node j's depth below the pending token (its children: 1)."""
        if self.parents is None:
            return list(range(1, len(self.token_ids) + 1))
        out: list[int] = []
        for p in self.parents:
            out.append(1 + (out[p] if p >= 0 else 0))
        return out

    def cut(self, max_depth: int, max_nodes: Optional[int] = None) -> "Draft":
        """The nodes at depth <= max_depth (their subtrees go with them), the first max_nodes of them."""
        if self.parents is None:
            n = max(0, min(max_depth, len(self.token_ids) if max_nodes is None else max_nodes))
            return Draft(self.token_ids[:n])
        keep: dict[int, int] = {}  # old index -> new index
        ids: list[int] = []
        parents: list[int] = []
        for j, (d, p) in enumerate(zip(self.depths(), self.parents)):
            if d > max_depth or (p >= 0 and p not in keep) or (max_nodes is not None and len(ids) >= max_nodes):
                continue
            keep[j] = len(ids)
            ids.append(self.token_ids[j])
            parents.append(keep[p] if p >= 0 else -1)
        return Draft(ids, parents if any(p != j - 1 for j, p in enumerate(parents)) else None)


class Drafter(Protocol):
    name: str
    accept_prior: float  # a request's per-draft acceptance estimate before its first observation
    # Optional: `catchup_seconds`, the seconds (verify_cost.step_clock) of the last `propose` spent catching up on the tokens
    # produced since the drafter last ran (EAGLE's head entries, and jump-forward text teacher-forced through
    # them): what following the sequence costs, paid once per token whenever it drafts, not a cost of the drafted
    # tokens. The adaptive rule (speculative_rows.py) leaves it out of the drafter's time per drafted token.

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        """At most `k` tokens per request, continuing `req.fill_ids` (whose last token is pending).
        Called on the scheduler thread; may keep per-request state in `req.draft_state[self.name]`."""
        ...
