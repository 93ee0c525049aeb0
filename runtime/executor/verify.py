"""Sampling a verify row (speculative decoding): logits at the pending token and at every draft node.

Row j of a step has positions 0..k_j: its pending token, then draft nodes 1..k_j. The drafts form a
tree given by parents (node i's parent node, or -1 = the pending token; a chain is parents
[-1, 0, 1, ...], the default). The sampler walks every live row of the batch together, one produced
token per row and iteration, from the pending token down the tree:

    t ~ target(· | tokens so far)              (the row's own sampling: greedy, penalties, seed, mask)
    if some live child c of the current node has token t: accept c, sample next at c's position
    else stop                                  (t is the target's own token: correction or bonus)

Each sampled token is appended to the row's sampling state before the next one is sampled, so
penalties, min_new_tokens and the row's generator see exactly the tokens accepted before, as without
speculation. Greedy rows follow the target's argmax chain; sampled rows draw one uniform per produced
token from their own generator, so a seeded request gives the SAME tokens with and without
speculation. For one-hot draft distributions this is the (multi-candidate) speculative-sampling rule
of SpecInfer/EAGLE: try the children in turn, accepting child c with min(1, p'(c)/1) where p' is the
residual after the earlier children were rejected (p with them removed, renormalized); child c is then
accepted with probability exactly p(c), and on rejection of all, the token comes from p restricted to
the non-children, renormalized: the same law as "draw t ~ p and accept the child equal to t".

Grammar rows: the mask at a node is the matcher's after accepting the node's path; the walk
(`fill_verify_bitmask`, on the mask thread) cuts every node the mask forbids with its subtree (such a
node can never be sampled), and rolls the matcher back to where it started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from sgl.kernels.bitmask import allocate_token_bitmask
from sgl.runtime.executor.sampler import sample
from sgl.runtime.executor.sampling_state import RowSamplingState


@dataclass
class RowOutcome:
    token_ids: list[int] = field(default_factory=list)  # produced tokens, in order
    logprobs: list[Optional[float]] = field(default_factory=list)
    top_logprobs: list[Optional[list[tuple[int, float]]]] = field(default_factory=list)
    failure: Optional[str] = None  # position 0 had no samplable token (the row produced nothing)
    failure_from_sampler: bool = False
    path: list[int] = field(default_factory=list)  # the accepted draft nodes, root first (len(token_ids) - 1)

    def add(self, token: int, logprob: Optional[float], top: Optional[list[tuple[int, float]]]) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top)


def _children(parents: Sequence[int], alive: Optional[Sequence[bool]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for c, par in enumerate(parents):
        if alive is None or alive[c]:
            out.setdefault(par, []).append(c)
    return out


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


def sample_verify(logits: torch.Tensor, bases: Sequence[int], drafts: Sequence[Sequence[int]],
                  states: Sequence[RowSamplingState], bitmask: Optional[torch.Tensor],
                  top_nums: Sequence[int], parents: Optional[Sequence[Optional[Sequence[int]]]] = None,
                  alive: Optional[Sequence[Optional[Sequence[bool]]]] = None,
                  want_logprobs: Optional[Sequence[bool]] = None,
                  forced: Optional[Sequence[Optional[Sequence[Sequence[int]]]]] = None) -> list[RowOutcome]:
    """logits: [P, V] float32, row j's positions at bases[j] (pending) .. bases[j] + len(drafts[j]);
    bitmask: [P, W] int32 or None (same row order); parents[j]: row j's tree (None: a chain);
    alive[j]: which nodes may be accepted (None: all); want_logprobs[j]: whether row j reports logprobs
    (None: every row); forced[j][c]: the tokens the grammar forces after node c (VerifyMasks.forced).
    Appends every sampled token to its state.

    Forced text: without speculation, the tokens the grammar forces after a sampled token are appended by
    jump-forward, never sampled (no draw from the row's generator, logprob 0, not in the sampling state).
    So after an accepted node with forced tokens F, the walk takes F from the draft the same way when the
    draft holds all of F on its path, and samples again after it; otherwise it stops at the node (the
    scheduler's jump-forward then appends F): the draws, and so a seeded request's tokens, stay those
    without speculation."""
    n = len(states)
    outs = [RowOutcome() for _ in range(n)]
    kids = [_children(chain_parents(len(drafts[j])) if parents is None or parents[j] is None else parents[j],
                      None if alive is None else alive[j]) for j in range(n)]
    cur = [-1] * n  # the node whose logits are sampled next (-1: the pending token)
    plain = [j for j in range(n) if _plain_greedy(states[j], top_nums[j], want_logprobs, j, bitmask, bases[j],
                                                  len(drafts[j]))]
    done = set(_walk_plain_greedy(logits, bases, drafts, states, kids, plain, outs)) if plain else set()
    live = [j for j in range(n) if j not in done]
    first = True
    while live:
        idx = [bases[j] + 1 + cur[j] for j in live]
        sel = torch.tensor(idx, dtype=torch.long)
        sub = logits if idx == list(range(logits.shape[0])) else logits.index_select(0, sel)
        mask = None if bitmask is None else (bitmask if sub is logits else bitmask.index_select(0, sel))
        res = sample(sub, [states[j] for j in live], mask, [top_nums[j] for j in live],
                     None if want_logprobs is None else [want_logprobs[j] for j in live])
        failed = set(res.failed_rows)
        nxt = []
        for a, j in enumerate(live):
            if a in failed:
                if first:  # nothing produced: the row fails as a plain decode would
                    outs[j].failure = res.failure_messages.get(a)
                    outs[j].failure_from_sampler = True
                continue  # later positions: stop; the next step meets the same state at the pending token
            tok = res.token_ids[a]
            states[j].append(tok)
            outs[j].add(tok, res.logprobs[a], res.top_logprobs[a] if res.top_logprobs is not None else None)
            child = next((c for c in kids[j].get(cur[j], ()) if drafts[j][c] == tok), None)
            if child is not None:
                outs[j].path.append(child)
                cur[j] = child
                span = forced[j][child] if forced is not None and forced[j] is not None else ()
                if not span or _take_forced(span, drafts[j], kids[j], cur, j, outs[j]):
                    nxt.append(j)
        live = nxt
        first = False
    return outs


def _take_forced(span: Sequence[int], draft: Sequence[int], kids: dict[int, list[int]], cur: list[int], j: int,
                 out: RowOutcome) -> bool:
    """Take the forced tokens `span` after node cur[j] from the draft as jump-forward would append them (not
    sampled: logprob 0, no top logprobs) when the draft's path holds all of them; True if it did (the walk
    samples on after them), False if not (the walk stops at cur[j])."""
    node, path = cur[j], []
    for t in span:
        node = next((c for c in kids.get(node, ()) if draft[c] == t), None)
        if node is None:
            return False
        path.append(node)
    for c in path:
        out.add(draft[c], 0.0, [])
        out.path.append(c)
    cur[j] = path[-1]
    return True


def _plain_greedy(state: RowSamplingState, top_num: int, want_logprobs: Optional[Sequence[bool]], j: int,
                  bitmask: Optional[torch.Tensor], base: int, k: int) -> bool:
    """Whether every token row j may produce is the plain argmax of its logits: greedy, nothing that
    process_logits would change at any of its positions (penalties, logit_bias, stop ids blocked before
    min_new_tokens or under ignore_eos, a grammar mask), and no logprobs to report."""
    if not state.is_greedy or top_num > 0 or (want_logprobs is None or want_logprobs[j]):
        return False
    if state.seen_tokens is not None or state.output_counts is not None or state.logit_bias_ids is not None:
        return False
    if len(state.output_ids) < state.params.min_new_tokens or state.params.ignore_eos:
        return False
    return bitmask is None or bool((bitmask[base:base + 1 + k] == -1).all())


def _walk_plain_greedy(logits: torch.Tensor, bases: Sequence[int], drafts: Sequence[Sequence[int]],
                       states: Sequence[RowSamplingState], kids: list[dict[int, list[int]]], rows: list[int],
                       outs: list[RowOutcome]) -> list[int]:
    """Rows of plain argmax (_plain_greedy): down each row's draft, the argmax of each position it reaches, one
    max over that logits row (sample()'s greedy choice: the first maximum) instead of a sample() call. -> the rows
    done; a row whose first position has no finite maximum is left to the general path (where sample() fails it);
    at a later position the row stops there, as the general path's walk does."""
    done = []
    for j in rows:
        node = -1
        while True:
            best, tok = logits[bases[j] + 1 + node].max(dim=0)
            if not math.isfinite(float(best)):
                break
            tok = int(tok)
            states[j].append(tok)
            outs[j].add(tok, None, None)
            child = next((c for c in kids[j].get(node, ()) if drafts[j][c] == tok), None)
            if child is None:
                break
            outs[j].path.append(child)
            node = child
        if outs[j].token_ids:
            done.append(j)
    return done


# ---- grammar masks along the drafts -------------------------------------------------------------
@dataclass
class VerifyMasks:
    bitmask: torch.Tensor  # [P, W] int32
    alive: list[Optional[list[bool]]]  # per row: the nodes that may be verified (None: no grammar, all)
    fill_states: list[Optional[list[Optional[tuple[Any, ...]]]]]  # per row, per position: budget state after its fill
    # per row, per draft node: the tokens the grammar forces after the node's path (jump-forward's), [] if none
    forced: list[Optional[list[list[int]]]] = field(default_factory=list)


_NO_ATTR = object()
_FILL_ATTRS = ("_budget_check_at", "budget_closed", "_closing", "_recent_paths")


def fill_state(g: Any) -> tuple[Any, ...]:
    # NOTE: fill_bitmask advances the matcher's budget countdown and its closing-path memory (the committed
    # path, the recent paths' lengths: sgl.grammars.budget / base); after verification they must be those of
    # the last position actually sampled, as without speculation. (Each attribute is replaced, never mutated
    # in place, so keeping references is a snapshot.)
    return tuple(getattr(g, a, _NO_ATTR) for a in _FILL_ATTRS)


def restore_fill_state(g: Any, state: tuple[Any, ...]) -> None:
    for a, v in zip(_FILL_ATTRS, state):
        if v is not _NO_ATTR:
            setattr(g, a, v)


def fill_verify_bitmask(grammars: Sequence[Any], bases: Sequence[int], drafts: Sequence[Sequence[int]],
                        num_positions: int, vocab_size: int,
                        parents: Optional[Sequence[Optional[Sequence[int]]]] = None,
                        jump_forward: bool = True) -> VerifyMasks:
    """Masks for every sample position (rows without a grammar: all ones). A node the mask of its
    parent forbids, or the matcher rejects, is cut with its subtree (alive False, its row unfilled).
    `jump_forward`: also each inner node's forced tokens (VerifyMasks.forced; else none)."""
    mask = allocate_token_bitmask(num_positions, vocab_size)
    alive_rows: list[Optional[list[bool]]] = []
    states: list[Optional[list[Optional[tuple[Any, ...]]]]] = []
    forced_rows: list[Optional[list[list[int]]]] = []
    for j, (g, base, draft) in enumerate(zip(grammars, bases, drafts)):
        if g is None:
            alive_rows.append(None)
            states.append(None)
            forced_rows.append(None)
            continue
        par = chain_parents(len(draft)) if parents is None or parents[j] is None else parents[j]
        kids = _children(par, None)
        alive = [False] * len(draft)
        forced: list[list[int]] = [[] for _ in draft]
        row_states: list[Optional[tuple[Any, ...]]] = [None] * (1 + len(draft))
        g.fill_bitmask(mask, base)
        row_states[0] = fill_state(g)

        def walk(node: int) -> None:  # the matcher has accepted the path to `node` and filled its row
            for c in kids.get(node, ()):
                restore_fill_state(g, row_states[1 + node])  # siblings start from the parent's countdown
                d = draft[c]
                if g.error is not None or not int(mask[base + 1 + node, d // 32]) >> (d % 32) & 1:
                    continue  # the mask forbids d: it can never be the sampled token here
                if not g.accept(d):
                    continue
                error_before = g.error
                g.fill_bitmask(mask, base + 1 + c)
                if g.error is not error_before:  # a speculative state must not end the request
                    g.error = error_before
                    g.rollback(1)
                    continue
                alive[c] = True
                row_states[1 + c] = fill_state(g)
                forced[c] = g.jump_forward_tokens() if jump_forward else []
                walk(c)
                g.rollback(1)

        walk(-1)
        alive_rows.append(alive)
        states.append(row_states)
        forced_rows.append(forced)
        restore_fill_state(g, row_states[0])
    return VerifyMasks(mask, alive_rows, states, forced_rows)
