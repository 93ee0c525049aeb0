"""Token bitmasks: the layout grammars fill and the sampler applies (torch reference = CPU path).

Layout (xgrammar's): an int32 tensor ``[B, W]`` with ``W = ceil(V / 32)``; bit ``t % 32`` of word
``t // 32`` of row ``i`` is set iff token ``t`` is allowed for row ``i``. An unconstrained row has
every bit set (every word is -1). Row ``i`` of the bitmask belongs to row ``i`` of the logits.

    >>> import torch
    >>> mask = allocate_token_bitmask(1, 40)                  # [1, 2] int32, all tokens allowed
    >>> mask[0].zero_(); mask[0, 1] = 1 << 3                  # allow token 35 only
    tensor([0, 0], dtype=torch.int32)
    >>> logits = torch.zeros(1, 64)                           # logits wider than the 2 words
    >>> apply_token_bitmask_(logits, mask)
    >>> logits[0].isfinite().nonzero().flatten().tolist()
    [35]

A Triton version may live next to this one; it must keep `apply_token_bitmask_`'s name and semantics.
`kernels` imports nothing from `sgl.runtime`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)  # [32] bit position of token 32*w + j inside word w
_NEG_INF_BITS = int(torch.tensor(float("-inf"), dtype=torch.float32).view(torch.int32).item())


def bitmask_width(vocab_size: int) -> int:
    """Words per row: ``ceil(vocab_size / 32)``.

    >>> bitmask_width(49152), bitmask_width(49153)
    (1536, 1537)
    """
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A ``[batch, ceil(vocab_size / 32)]`` int32 bitmask with every token allowed (all bits set)."""
    return torch.full((batch, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, W]`` int32 -> ``[B, vocab_size]`` bool (True = allowed); tokens past ``32 * W`` are False.

    >>> unpack_token_bitmask(torch.tensor([[0b101]], dtype=torch.int32), 4).tolist()
    [[True, False, True, False]]
    """
    _check_bitmask(bitmask)
    B, W = bitmask.shape
    bits = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(B, W * 32).bool()  # [B, 32W]
    if vocab_size <= W * 32:
        return bits[:, :vocab_size]
    return torch.cat([bits, bits.new_zeros(B, vocab_size - W * 32)], dim=1)


def pack_token_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` bool (True = allowed) -> ``[B, ceil(V / 32)]`` int32 bitmask (padding bits zero).

    >>> pack_token_bitmask(torch.tensor([[True, False, True, False]])).tolist()
    [[5]]
    """
    if allowed.dim() != 2:
        raise ValueError(f"allowed must be [B, V], got shape {tuple(allowed.shape)}")
    B, V = allowed.shape
    W = bitmask_width(V)
    padded = allowed.new_zeros(B, W * 32, dtype=torch.bool)
    padded[:, :V] = allowed
    words = (padded.view(B, W, 32).to(torch.int64) << _SHIFTS.to(torch.int64)).sum(-1)  # [B, W] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's-complement int32
    return words.to(torch.int32)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor,
                         indices: Optional[Sequence[int]] = None) -> None:
    """Set the logits of disallowed tokens to -inf, in place. Semantics::

        for i in (indices if indices is not None else range(logits.shape[0])):
            for t in range(logits.shape[1]):
                if t >= 32 * bitmask.shape[1] or not (bitmask[i, t // 32] >> (t % 32)) & 1:
                    logits[i, t] = -inf

    logits: ``[B, V]`` float; bitmask: ``[B', W]`` int32 with ``B' >= B`` rows; indices: the rows to
    mask (each ``< B``), or None for all rows. Bits past column ``V`` are ignored; logits past
    ``32 * W`` (a model vocabulary padded beyond the tokenizer's) are masked.

    >>> logits = torch.zeros(2, 4)
    >>> apply_token_bitmask_(logits, torch.tensor([[0b0110], [0]], dtype=torch.int32), indices=[0])
    >>> logits.tolist()
    [[-inf, 0.0, 0.0, -inf], [0.0, 0.0, 0.0, 0.0]]
    """
    _check_bitmask(bitmask)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a [B, V] float tensor, got {logits.dtype} {tuple(logits.shape)}")
    if bitmask.device != logits.device:
        raise ValueError(f"bitmask is on {bitmask.device} but logits are on {logits.device}")
    B, V = logits.shape
    rows = list(range(B)) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < B for i in rows):
        raise ValueError(f"indices must be in [0, {B}), got {rows}")
    if bitmask.shape[0] < B:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows, logits have {B}")
    if not rows:
        return
    n = min(V, 32 * bitmask.shape[1])  # columns the bitmask covers
    if n < V:  # NOTE: columns past the bitmask are never allowed
        if _is_all(rows, B):
            logits[:, n:] = float("-inf")
        else:
            for i in rows:
                logits[i, n:] = float("-inf")
    # Unconstrained rows (every word -1) need nothing more: skip their unpacking.
    idx = torch.tensor(rows, dtype=torch.long)
    words = bitmask.index_select(0, idx)  # [R, W]
    constrained = (words != -1).any(dim=1).tolist()
    rows = [i for i, c in zip(rows, constrained) if c]
    if not rows:
        return
    words = words[torch.tensor(constrained)] if len(rows) < len(constrained) else words
    if logits.dtype == torch.float32:
        add = _neg_inf_where_clear(words).view(torch.float32)[:, :n]  # [R, n]: 0.0 or -inf
        if _is_all(rows, B):
            logits[:, :n].add_(add)
        else:
            for r, i in enumerate(rows):
                logits[i, :n].add_(add[r])
    else:
        masked = (((words.unsqueeze(-1) >> _SHIFTS) & 1) == 0).view(len(rows), -1)[:, :n]  # [R, n]
        for r, i in enumerate(rows):
            logits[i, :n].masked_fill_(masked[r], float("-inf"))


def _neg_inf_where_clear(words: torch.Tensor) -> torch.Tensor:
    """[R, W] int32 -> [R, 32W] int32 holding the bits of float32 -inf where the token's bit is clear
    and 0 (the bits of 0.0) where it is set.

    NOTE: masked_fill_/where with a bool mask run ~5x slower on CPU than these 4 integer passes
    plus one float add. Adding 0.0 leaves allowed logits unchanged; adding -inf masks (a +inf logit
    at a masked token would become nan: logits are finite in practice). Bit j of a word w is moved
    to the sign bit by `w << (31 - j)` and smeared over the word by the arithmetic `>> 31`.
    """
    R, W = words.shape
    out = (~words).unsqueeze(-1) << (31 - _SHIFTS)  # [R, W, 32]; sign bit = "token masked"
    out >>= 31  # -1 (all ones) where masked, 0 where allowed
    out &= _NEG_INF_BITS
    return out.view(R, W * 32)


def _is_all(rows: list[int], B: int) -> bool:
    return len(rows) == B and rows == list(range(B))


def _check_bitmask(bitmask: torch.Tensor) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"bitmask must be a [B, W] int32 tensor, got {bitmask.dtype} {tuple(bitmask.shape)}")
