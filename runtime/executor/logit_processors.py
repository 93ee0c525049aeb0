"""Logit processors run before sampling: penalties, logit bias, EOS/stop masks, the grammar bitmask.

Each `apply_*_` function edits a contiguous ``[B, V]`` float32 tensor in place through flat indices
``row * V + token``, so one call serves every row of the batch that needs it. `process_logits` runs
them in the sampler's order and only for the rows that need them; it returns the input tensor itself
when no row needs any of them (no copy on the common path).

    >>> logits = torch.tensor([[2.0, -2.0, 1.0]])
    >>> apply_repetition_penalty_(logits, torch.tensor([0, 1]), torch.tensor([2.0, 2.0]))
    >>> logits.tolist()    # HF semantics: positive logits divided, negative multiplied
    [[1.0, -4.0, 1.0]]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sgl.kernels.dispatch import apply_token_bitmask_  # Triton on CUDA, the torch reference on CPU
from sgl.runtime.executor.sampling_state import RowSamplingState


def apply_repetition_penalty_(logits: torch.Tensor, flat_ids: torch.Tensor, penalties: torch.Tensor) -> None:
    """HF `RepetitionPenaltyLogitsProcessor`: x -> x / p if x > 0 else x * p, at each (row, token) once.

    logits: [B, V] contiguous; flat_ids: [N] long, row * V + token, no duplicates; penalties: [N].
    """
    flat = logits.view(-1)  # [B * V]
    x = flat.index_select(0, flat_ids)  # [N]
    flat.index_copy_(0, flat_ids, torch.where(x < 0, x * penalties, x / penalties))


def apply_frequency_presence_penalty_(logits: torch.Tensor, flat_ids: torch.Tensor, counts: torch.Tensor,
                                      frequency: torch.Tensor, presence: torch.Tensor) -> None:
    """OpenAI semantics: x -= count * frequency_penalty + presence_penalty, for tokens already output.

    flat_ids: [N] long (no duplicates); counts: [N] float32 >= 1; frequency, presence: [N].
    """
    logits.view(-1).index_add_(0, flat_ids, -(counts * frequency + presence))


def apply_logit_bias_(logits: torch.Tensor, flat_ids: torch.Tensor, bias: torch.Tensor) -> None:
    """x += bias at each (row, token). flat_ids: [N] long; bias: [N] float32."""
    logits.view(-1).index_add_(0, flat_ids, bias)


def mask_tokens_(logits: torch.Tensor, flat_ids: torch.Tensor) -> None:
    """x = -inf at each (row, token). flat_ids: [N] long."""
    logits.view(-1).index_fill_(0, flat_ids, float("-inf"))


def _gather_flat(pairs: Sequence[tuple[int, torch.Tensor, Optional[torch.Tensor]]], V: int,
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[(row, ids [n], values [n, ...] | None)] -> (flat ids [N], values [N, ...] | None): token ids
    of each row become indices into a flat [B * V] view; ids outside [0, V) are dropped."""
    flat_ids, values = [], []
    for row, ids, vals in pairs:
        keep = (ids >= 0) & (ids < V)
        flat_ids.append(ids[keep] + row * V)
        if vals is not None:
            values.append(vals[keep])
    return torch.cat(flat_ids), (torch.cat(values) if values else None)


def process_logits(logits: torch.Tensor, rows: Sequence[RowSamplingState],
                   token_bitmask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply, in order: repetition penalty (prompt + output tokens), frequency/presence penalties
    (output tokens), logit_bias, EOS/stop masks (min_new_tokens, ignore_eos), the grammar bitmask.

    logits: [B, V] float32, not modified. Returns a processed copy, or `logits` itself if no row
    needs anything.
    """
    B, V = logits.shape
    rep = [(i, r) for i, r in enumerate(rows) if r.needs_repetition_penalty]
    freq = [(i, r) for i, r in enumerate(rows) if r.needs_frequency_penalty]
    bias = [(i, r) for i, r in enumerate(rows) if r.logit_bias_ids is not None]
    blocked = [(i, ids) for i, r in enumerate(rows) if (ids := r.blocked_stop_ids()) is not None]
    use_mask = token_bitmask is not None and (
        32 * token_bitmask.shape[1] < V or bool((token_bitmask[:B] != -1).any()))
    if not (rep or freq or bias or blocked or use_mask):
        return logits
    work = logits.clone(memory_format=torch.contiguous_format)  # [B, V]

    if rep:
        ids, pen = _gather_flat([(i, r.seen_tokens.ids(), torch.full((len(r.seen_tokens),),
                                 float(r.params.repetition_penalty))) for i, r in rep], V)
        apply_repetition_penalty_(work, ids, pen)
    if freq:
        ids, vals = _gather_flat([(i, r.output_counts.ids(), torch.stack([
            r.output_counts.counts(),
            torch.full((len(r.output_counts),), float(r.params.frequency_penalty)),
            torch.full((len(r.output_counts),), float(r.params.presence_penalty))], dim=1)) for i, r in freq], V)
        apply_frequency_presence_penalty_(work, ids, vals[:, 0], vals[:, 1], vals[:, 2])
    if bias:
        ids, vals = _gather_flat([(i, r.logit_bias_ids, r.logit_bias_values) for i, r in bias], V)
        apply_logit_bias_(work, ids, vals)
    if blocked:
        ids, _ = _gather_flat([(i, t, None) for i, t in blocked], V)
        mask_tokens_(work, ids)
    if use_mask:
        apply_token_bitmask_(work, token_bitmask)
    return work

