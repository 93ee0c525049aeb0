"""The one interface every drafter implements, and the draft it returns.

A drafter is deterministic here: it proposes tokens, not distributions, so the draft distribution q
is one-hot and the speculative-sampling rule "accept d with min(1, p(d)/q(d)), else resample from
norm(max(0, p - q))" becomes "draw t ~ p; accept d iff t == d" (runtime/executor/verify.py): both
accept d with probability p(d) and, on rejection, give a token from p with d removed, renormalized.

A draft is a chain or a token tree: `parents[j]` is node j's parent node (an earlier index), or -1
for the request's pending token; None means a chain (parents [-1, 0, 1, ...]). Trees are verified
in one row with a tree attention mask; the walk accepts one root-to-node path (verify.py).

A drafter may score its nodes: `scores[j]` is its estimate that the target takes node j given that it took
node j's parent (EAGLE: the head's probability of the token, renormalized under the grammar). A head trained
with cross-entropy against the target's greedy token estimates exactly that; measured on workload (b), drafts
the head gave 0.1-0.2 were accepted 17% of the time, 0.5-0.6: 64%, 0.9-1.0: 95% (README "Drafts cut by
their own scores"). The adaptive rule then cuts each draft, within the request's length, where its expected
tokens per cost peak (speculative_rows.scored_cut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch

from sgl.runtime.scheduler.request import Req


def d2t_offsets(ids: torch.Tensor) -> torch.Tensor:
    """A draft vocabulary's target ids [Vd] (ascending) as EAGLE-3's `d2t` offsets: draft id d is target id d + d2t[d].
    EAGLE's and MEDUSA's head files both store a draft vocabulary this way."""
    return ids - torch.arange(ids.numel())


def d2t_ids(d2t: torch.Tensor) -> torch.Tensor:
    """The target ids [Vd] int64 of `d2t` offsets (d2t_offsets' inverse)."""
    return torch.arange(d2t.numel()) + d2t.long()


def draft_quantize(target: Any) -> Optional[str]:
    """The block type a draft head's linears take on `target`: q8_0 on a quantized (native) target, whose kernels
    read blocks (a draft step then reads ~4x fewer bytes); None (fp32) otherwise."""
    return "q8_0" if getattr(target, "native", False) else None


@dataclass(frozen=True)
class Draft:
    """Proposed tokens following the request's pending token (may be empty): a chain or a tree."""

    token_ids: list[int]
    parents: Optional[list[int]] = None  # None: a chain
    scores: Optional[list[float]] = None  # per node: P(taken | parent taken), the drafter's estimate; None: none

    def __post_init__(self) -> None:
        assert self.parents is None or (len(self.parents) == len(self.token_ids)
                                         and all(-1 <= p < j for j, p in enumerate(self.parents)))
        assert self.scores is None or len(self.scores) == len(self.token_ids)

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
            n = max(0, min(max_depth, len(self.token_ids), max_depth if max_nodes is None else max_nodes))
            return self.subset(list(range(n)))
        kept: list[int] = []
        keep: set[int] = set()
        for j, (d, p) in enumerate(zip(self.depths(), self.parents)):
            if d > max_depth or (p >= 0 and p not in keep) or (max_nodes is not None and len(kept) >= max_nodes):
                continue
            keep.add(j)
            kept.append(j)
        return self.subset(kept)

    def subset(self, nodes: list[int]) -> "Draft":
        """The draft of `nodes` (ascending, each node's parent among them), renumbered."""
        index = {j: i for i, j in enumerate(nodes)}
        parents = [-1 if p < 0 else index[p] for p in (self.parents[j] if self.parents is not None else j - 1
                                                       for j in nodes)]
        return Draft([self.token_ids[j] for j in nodes],
                     parents if any(p != i - 1 for i, p in enumerate(parents)) else None,
                     None if self.scores is None else [self.scores[j] for j in nodes])

    def path_probs(self) -> list[float]:
        """Per node, the drafter's estimate that the target takes it: the product of the scores on its path
        (requires scores)."""
        assert self.scores is not None
        out: list[float] = []
        for j, s in enumerate(self.scores):
            p = j - 1 if self.parents is None else self.parents[j]
            out.append(s * (out[p] if p >= 0 else 1.0))
        return out


class Drafter(Protocol):
    name: str
    accept_prior: float  # a request's per-draft acceptance estimate before its first observation
    # Optional: `catchup_seconds`, the seconds (verify_cost.step_clock) of the last `propose` spent catching up on the tokens
    # produced since the drafter last ran (EAGLE's head entries, and jump-forward text teacher-forced through
    # them): what following the sequence costs, paid once per token whenever it drafts, not a cost of the drafted
    # tokens. The adaptive rule (speculative_rows.py) leaves it out of the drafter's time per drafted token and
    # prices it per drafting step instead, from calls that caught up on no more than a step's tokens: with it,
    # `catchup_tokens`, the tokens caught up on (all requests').
    # Optional: `scores_drafts = True` when its drafts carry scores (Draft.scores): the rule then cuts each draft by
    # its scores; it sets `stop_below` before each call, a path probability under which a drafted token cannot pay
    # for its place in the verify row (the drafter may stop drafting a chain there).

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        """At most `k` tokens per request, continuing `req.fill_ids` (whose last token is pending).
        Called on the scheduler thread; may keep per-request state in `req.draft_state[self.name]`."""
        ...
