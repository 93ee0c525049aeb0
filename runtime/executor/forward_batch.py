"""The inputs of one forward step: new tokens of a batch of sequences over a paged KV pool.

Lengths, per sequence b (mini-sglang's vocabulary):
    seq_len    = tokens of the sequence after this step (cached prefix + new)
    extend_len = new tokens this step (1 for decode; the whole prompt for a prefill without cache hit)
    prefix_len = seq_len - extend_len, tokens whose K/V are already in the pool
Token rows are sequence-major: sequence 0's new tokens, then sequence 1's, and so on.

    >>> fb = ForwardBatch.from_lists(input_ids=[[5, 6, 7], [9]], slot_tables=[[0, 1, 2], [10, 11, 12, 13]])
    >>> fb.extend_lens, fb.seq_lens, fb.positions.tolist(), fb.out_cache_loc.tolist()
    ([3, 1], [3, 4], [0, 1, 2, 3], [0, 1, 2, 13])
    >>> fb.last_token_indices.tolist()   # rows whose hidden state predicts each sequence's next token
    [2, 3]

A tree verify row (speculative decoding) ends in draft nodes given by their parents (-1 = the pending
token before them): node j sits at position pending + depth(j) and sees only the prefix, the pending
token(s) and its own ancestors. Below: pending 7, then nodes 8 and 9 both children of 7 (depth 1).

    >>> fb = ForwardBatch.from_lists(input_ids=[[7, 8, 9]], slot_tables=[[0, 1, 2, 3]], trees=[[-1, -1]])
    >>> fb.positions.tolist(), fb.tree_masks[0].int().tolist()
    ([1, 2, 2], [[1, 0, 0], [1, 1, 0], [1, 0, 1]])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from sgl.kernels.attention import AttentionMetadata


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens of all sequences, sequence-major
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: KV slots where the new tokens' K/V are written
    extend_lens: list[int]  # [B] new tokens per sequence (1 = decode)
    seq_lens: list[int]  # [B] total tokens per sequence after this step (prefix + new)
    slot_tables: list[torch.Tensor]  # [B], each [seq_len] int64: prefix slots, then out_cache_loc's segment
    lora: Optional[Any] = field(default=None, repr=False)  # a LoraBatch (runtime/lora/segmented.py) or None
    # [B] each None (causal) or [extend_len, extend_len] bool: which new tokens each new token sees (trees)
    tree_masks: Optional[list[Optional[torch.Tensor]]] = field(default=None, repr=False)
    # Every new token is a generated one (decode steps, speculative verify rows), none a prompt token: such a
    # step may run the fused multi-row decoder (runtime/models/fused_decode.py), whose rows compute what a
    # batch-1 decode step computes; prompt tokens keep the prefill path (one numerics per prompt token).
    generated_only: bool = False
    # [B] or None: how many of sequence b's last new tokens are sampled from like decode tokens: all of a
    # generated sequence's (decode, verify), 1 for a chunk that ends its prompt (the FINAL prompt token, whose
    # logits start its generation), else 0. Where the fused path applies, these run as decode rows after the
    # step's other tokens (runtime/models/fused_decode.py: split_decode_tails), so their K/V and logits have
    # the bits of a batch-1 decode step whatever else is in the step and whether the prompt was cached.
    decode_tails: Optional[list[int]] = None
    # Derived once per step, shared by every layer:
    attn: AttentionMetadata = field(init=False, repr=False)
    last_token_indices: torch.Tensor = field(init=False, repr=False)  # [B] int64 row of each sequence's last token

    def __post_init__(self) -> None:
        num_tokens = self.input_ids.shape[0]
        assert self.input_ids.dim() == 1 and self.input_ids.dtype == torch.int64, "input_ids: [T] int64"
        assert self.positions.shape == (num_tokens,) and self.out_cache_loc.shape == (num_tokens,)
        assert len(self.extend_lens) == len(self.seq_lens) == len(self.slot_tables) >= 1
        assert sum(self.extend_lens) == num_tokens, f"sum(extend_lens)={sum(self.extend_lens)} != T={num_tokens}"
        for ext, seq, table in zip(self.extend_lens, self.seq_lens, self.slot_tables):
            assert 1 <= ext <= seq, f"need 1 <= extend_len <= seq_len, got {ext}, {seq}"
            assert table.shape == (seq,), f"slot table of {tuple(table.shape)} for seq_len {seq}"
        self.attn = AttentionMetadata.build(self.extend_lens, self.seq_lens, self.slot_tables, self.input_ids.device,
                                            tree_masks=self.tree_masks)
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0) - 1
        self.last_token_indices = ends.to(self.input_ids.device)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prefix_lens(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens, self.extend_lens)]

    @property
    def is_decode(self) -> bool:
        return all(e == 1 for e in self.extend_lens)

    @classmethod
    def from_lists(
        cls,
        input_ids: Sequence[Sequence[int]],
        slot_tables: Sequence[Union[Sequence[int], torch.Tensor]],
        device: Union[str, torch.device] = "cpu",
        trees: Optional[Sequence[Optional[Sequence[int]]]] = None,
        generated_only: bool = False,
        decode_tails: Optional[list[int]] = None,
    ) -> "ForwardBatch":
        """Build from per-sequence new token ids and whole-sequence slot tables.

        `slot_tables[b]` covers the whole sequence (prefix + new), so seq_len = its length and the new
        tokens sit at positions prefix_len .. seq_len - 1 in the slots at its tail. `trees[b]` (None = a
        chain): the parents of sequence b's last len(trees[b]) new tokens, a draft tree (module docstring).
        """
        assert len(input_ids) == len(slot_tables), "one slot table per sequence"
        tables = [
            t.to(device=device, dtype=torch.int64) if isinstance(t, torch.Tensor)
            else torch.tensor(t, dtype=torch.int64, device=device)
            for t in slot_tables
        ]
        extend_lens = [len(ids) for ids in input_ids]
        seq_lens = [t.numel() for t in tables]
        flat_ids = [tok for ids in input_ids for tok in ids]
        positions: list[int] = []
        masks: Optional[list[Optional[torch.Tensor]]] = None
        for b, (e, s) in enumerate(zip(extend_lens, seq_lens)):
            parents = None if trees is None else trees[b]
            if not parents:
                positions.extend(range(s - e, s))
                continue
            pos, mask = tree_layout(e - len(parents), parents)
            positions.extend(s - e + p for p in pos)
            masks = masks if masks is not None else [None] * len(extend_lens)
            masks[b] = mask.to(device)
        if len(tables) == 1:
            out_loc = tables[0][seq_lens[0] - extend_lens[0]:]
        else:
            out_loc = torch.cat([t[s - e:] for t, e, s in zip(tables, extend_lens, seq_lens)])
        return cls(
            input_ids=torch.tensor(flat_ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            out_cache_loc=out_loc,
            extend_lens=extend_lens,
            seq_lens=seq_lens,
            slot_tables=tables,
            tree_masks=masks,
            generated_only=generated_only,
            decode_tails=decode_tails,
        )


def tree_layout(num_pending: int, parents: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """Offsets (from the first new token) and the [E, E] attention mask of `num_pending` causal
    tokens followed by tree nodes; parents[j] < j is node j's parent node, -1 the last pending token."""
    assert num_pending >= 1
    e = num_pending + len(parents)
    mask = torch.ones(e, e, dtype=torch.bool).tril_()
    mask[num_pending:, num_pending:] = False
    depth: list[int] = []  # node j's depth below the last pending token (its children: 1)
    for j, par in enumerate(parents):
        assert -1 <= par < j, f"node {j}: parent {par} must be -1 or an earlier node"
        row = num_pending + j
        if par >= 0:
            mask[row, num_pending:] = mask[num_pending + par, num_pending:]  # the parent's ancestors
        mask[row, row] = True
        depth.append(1 + (depth[par] if par >= 0 else 0))
    return list(range(num_pending)) + [num_pending - 1 + d for d in depth], mask
