"""Sampling a verify row (speculative decoding): logits at the pending token and at every draft.

Row j of a step has positions 0..k_j (its pending token, then drafts d_1..d_k). The sampler walks the
positions in order, all live rows of the batch together at each position:

    t_p ~ target(· | tokens so far)            (the row's own sampling: greedy, penalties, seed, mask)
    if p == k_j or t_p != d_{p+1}: stop        (t_p is the target's own token: correction or bonus)

Each sampled token is appended to the row's sampling state before position p + 1 is sampled, so
penalties, min_new_tokens and the row's generator see exactly the tokens accepted before p, as
without speculation. Greedy rows produce the target's argmax chain; sampled rows draw one uniform
per produced token from their own generator, so a seeded request gives the SAME tokens with and
without speculation. For a one-hot draft distribution this is the speculative-sampling rule
(accept d with min(1, p(d)/q(d)) = p(d); else a token from norm(max(0, p - q)) = p without d).

Grammar rows: the mask at position p is the matcher's after accepting d_1..d_p; the walk
(`fill_verify_bitmask`, on the mask thread) stops at the first draft the mask forbids, so later
drafts are never verified, and rolls the matcher back to where it started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from sgl.kernels.bitmask import allocate_token_bitmask
from sgl.runtime.executor.sampler import sample
from sgl.runtime.executor.sampling_state import RowSamplingState


@dataclass
class RowOutcome:
    token_ids: list[int] = field(default_factory=list)  # produced tokens, in order
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[Optional[list[tuple[int, float]]]] = field(default_factory=list)
    failure: Optional[str] = None  # position 0 had no samplable token (the row produced nothing)
    failure_from_sampler: bool = False


def sample_verify(logits: torch.Tensor, bases: Sequence[int], drafts: Sequence[Sequence[int]],
                  states: Sequence[RowSamplingState], bitmask: Optional[torch.Tensor],
                  top_nums: Sequence[int]) -> list[RowOutcome]:
    """logits: [P, V] float32, row j's positions at bases[j] .. bases[j] + len(drafts[j]);
    bitmask: [P, W] int32 or None (same row order). Appends every produced token to its state."""
    n = len(states)
    outs = [RowOutcome() for _ in range(n)]
    live = list(range(n))
    p = 0
    while live:
        idx = [bases[j] + p for j in live]
        sel = torch.tensor(idx, dtype=torch.long)
        sub = logits if idx == list(range(logits.shape[0])) else logits.index_select(0, sel)
        mask = None if bitmask is None else (bitmask if sub is logits else bitmask.index_select(0, sel))
        res = sample(sub, [states[j] for j in live], mask, [top_nums[j] for j in live])
        failed = set(res.failed_rows)
        nxt = []
        for a, j in enumerate(live):
            if a in failed:
                if p == 0:  # nothing produced: the row fails as a plain decode would
                    outs[j].failure = res.failure_messages.get(a)
                    outs[j].failure_from_sampler = True
                continue  # later positions: stop; the next step meets the same state at position 0
            tok = res.token_ids[a]
            states[j].append(tok)
            outs[j].token_ids.append(tok)
            outs[j].logprobs.append(res.logprobs[a])
            outs[j].top_logprobs.append(res.top_logprobs[a] if res.top_logprobs is not None else None)
            if p < len(drafts[j]) and tok == drafts[j][p]:
                nxt.append(j)
        live = nxt
        p += 1
    return outs


# ---- grammar masks along the drafts -------------------------------------------------------------
@dataclass
class VerifyMasks:
    bitmask: torch.Tensor  # [P, W] int32
    drafts: list[list[int]]  # per row: the drafts that may be verified (cut at the first forbidden one)
    fill_states: list[Optional[list[tuple[Any, Any]]]]  # per row: matcher budget state after each fill


def _fill_state(g: Any) -> tuple[Any, Any]:
    # NOTE: fill_bitmask advances the matcher's budget countdown (sgl.grammars.budget); after
    # verification the countdown must be the one of the last position actually sampled.
    return getattr(g, "_budget_check_at", None), getattr(g, "budget_closed", None)


def restore_fill_state(g: Any, state: tuple[Any, Any]) -> None:
    check_at, closed = state
    if check_at is not None:
        g._budget_check_at = check_at
    if closed is not None:
        g.budget_closed = closed


def fill_verify_bitmask(grammars: Sequence[Any], bases: Sequence[int], drafts: Sequence[Sequence[int]],
                        num_positions: int, vocab_size: int) -> VerifyMasks:
    """Masks for every sample position (rows without a grammar: all ones)."""
    mask = allocate_token_bitmask(num_positions, vocab_size)
    cut: list[list[int]] = []
    states: list[Optional[list[tuple[Any, Any]]]] = []
    for g, base, draft in zip(grammars, bases, drafts):
        if g is None:
            cut.append(list(draft))
            states.append(None)
            continue
        g.fill_bitmask(mask, base)
        row_states = [_fill_state(g)]
        accepted = 0
        for p, d in enumerate(draft):
            if g.error is not None or not int(mask[base + p, d // 32]) >> (d % 32) & 1:
                break  # the mask forbids d: it can never be the sampled token at p
            if not g.accept(d):
                break
            accepted += 1
            error_before = g.error
            g.fill_bitmask(mask, base + p + 1)
            if g.error is not error_before:  # a speculative state must not end the request
                g.error = error_before
                accepted_ok = accepted - 1
                g.rollback(1)
                accepted = accepted_ok
                break
            row_states.append(_fill_state(g))
        g.rollback(accepted)
        cut.append(list(draft[:accepted]))
        states.append(row_states)
        restore_fill_state(g, row_states[0])
    return VerifyMasks(mask, cut, states)
