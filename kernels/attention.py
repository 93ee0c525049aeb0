"""Paged attention over a token-slot KV pool: the torch reference, which is also the CPU path.

A batch mixes sequences in two states (the same call serves prefill, chunked prefill and decode):

- decode: one new query token (extend_len == 1) attending to all `seq_len` keys of its sequence;
- extend: `extend_len` new query tokens at positions `prefix_len .. seq_len - 1`, attending to the
  cached prefix in full and causally among themselves (query i sees keys 0 .. prefix_len + i);
- tree extend (speculative tree verification): the same, but among the new tokens a given
  `[extend_len, extend_len]` mask replaces causality (a draft node sees the prefix, the pending token
  and its own ancestors, never its siblings' branches).

K/V live in per-layer pools `[num_slots, Hkv, D]`; a sequence's keys are the rows of its slot table
(`[seq_len]` slot ids, the cached prefix first, then the new tokens' slots). The new tokens' K/V must
already be stored in the pool when `paged_attention` runs.

`AttentionMetadata.build` turns the per-sequence lists into padded index tensors ONCE per step; every
layer reuses them. Decode rows are batched into one padded `scaled_dot_product_attention` call;
each extend sequence (few per step under a prefill token budget) gets its own call.

    >>> import torch
    >>> k_buf, v_buf = torch.randn(8, 1, 4), torch.randn(8, 1, 4)        # 8 slots, 1 kv head, D=4
    >>> meta = AttentionMetadata.build(extend_lens=[2, 1], seq_lens=[2, 3],
    ...                                slot_tables=[[0, 1], [5, 6, 7]])
    >>> q = torch.randn(3, 2, 4)                                           # T=3 queries, 2 heads (GQA 2:1)
    >>> paged_attention(q, k_buf, v_buf, meta, scale=0.5).shape
    torch.Size([3, 2, 4])

`kernels` imports nothing from `sgl.runtime`: arguments are plain tensors and lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

SlotTable = Union[torch.Tensor, Sequence[int]]


@dataclass(frozen=True)
class DecodeGroup:
    """All extend_len == 1 sequences of a batch, padded to the longest one."""

    rows: Optional[torch.Tensor]  # [Bd] int64 query rows in the batch; None = the batch is rows 0..Bd-1
    slots: torch.Tensor  # [Bd * Lmax] int64, row-major padded slot tables (pad = a valid slot of the row)
    slot_start: Optional[int]  # Bd == 1 and slots == slot_start + arange(L): read a view, no gather
    batch_size: int  # Bd
    max_len: int  # Lmax
    mask: Optional[torch.Tensor]  # [Bd, 1, 1, Lmax] bool, True = attend; None when no row is padded
    lens: Optional[torch.Tensor] = None  # [Bd] int64 CPU, the rows' lengths (for sgl.kernels.cpu.decode_attention)


FOLD_MAX_ROWS = 64  # extends of at most this many queries with a mask take the grouped-query layout (_extend)


@dataclass(frozen=True)
class ExtendSegment:
    """One sequence with extend_len > 1: queries `q_start:q_end` of the batch."""

    q_start: int
    q_end: int
    slots: torch.Tensor  # [seq_len] int64
    slot_start: Optional[int]  # slots == slot_start + arange(seq_len): read a view, no gather
    mask: Optional[torch.Tensor]  # [E, seq_len] bool, True = attend; None = plain causal (no prefix)
    tree: bool = False  # the mask's last E columns are a tree mask, not causal (Triton: the torch path runs)
    # G -> the mask as an additive [G * E, seq_len] float bias, rows g-major (built by the first layer
    # of the step that needs it, shared by the others)
    _biases: dict = field(default_factory=dict, compare=False, repr=False)

    def grouped_bias(self, group: int, dtype: torch.dtype) -> torch.Tensor:
        key = (group, dtype)
        bias = self._biases.get(key)
        if bias is None:
            assert self.mask is not None
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            bias.masked_fill_(~self.mask, float("-inf"))
            bias = self._biases[key] = bias.repeat(group, 1)
        return bias


@dataclass(frozen=True)
class AttentionMetadata:
    num_tokens: int  # T, the number of query rows
    decode: Optional[DecodeGroup]
    extends: tuple[ExtendSegment, ...]

    @classmethod
    def build(
        cls,
        extend_lens: Sequence[int],
        seq_lens: Sequence[int],
        slot_tables: Sequence[SlotTable],
        device: Union[str, torch.device] = "cpu",
        sliding_window: Optional[int] = None,
        tree_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> "AttentionMetadata":
        """Index tensors for one step. `slot_tables[b]` has `seq_lens[b]` slots; queries are sequence-major.

        `sliding_window` W (Gemma's local layers, HF's semantics): the query at position p sees only keys
        at positions p - W < k <= p. Tables are cut to the keys some query of the step can see.

        `tree_masks[b]` ([extend_len, extend_len] bool, True = attend, or None = causal): which of its own
        new tokens each new token of sequence b sees (it always sees the whole prefix). Needs no window."""
        assert len(extend_lens) == len(seq_lens) == len(slot_tables), "one extend_len, seq_len, slot table per sequence"
        assert tree_masks is None or (len(tree_masks) == len(extend_lens) and sliding_window is None)
        tables = [_as_index(t, device) for t in slot_tables]
        decode_rows: list[int] = []
        decode_tables: list[torch.Tensor] = []
        extends: list[ExtendSegment] = []
        row = 0
        for b, (ext, seq, table) in enumerate(zip(extend_lens, seq_lens, tables)):
            tree = None if tree_masks is None else tree_masks[b]
            assert 1 <= ext <= seq, f"need 1 <= extend_len <= seq_len, got {ext}, {seq}"
            assert table.numel() == seq, f"slot table has {table.numel()} slots for seq_len {seq}"
            prefix = seq - ext
            first_key = 0 if sliding_window is None else max(0, prefix - sliding_window + 1)  # first query's window
            if first_key > 0:
                table = table[first_key:]
            if tree is not None and ext > 1:
                assert tree.shape == (ext, ext) and tree.dtype == torch.bool, f"tree mask of {tuple(tree.shape)} for {ext} tokens"
                mask = torch.cat([torch.ones(ext, seq - ext, dtype=torch.bool, device=device), tree.to(device)], 1)
                extends.append(ExtendSegment(row, row + ext, table, _contiguous_start(table), mask, tree=True))
            elif ext == 1:
                decode_rows.append(row)
                decode_tables.append(table)
            else:
                mask = None
                if prefix > 0 or (sliding_window is not None and ext > sliding_window):
                    # query i (position prefix + i) sees keys first_key .. prefix + i (and, windowed,
                    # only those with position > prefix + i - W)
                    key_pos = torch.arange(first_key, seq, device=device)
                    q_pos = torch.arange(prefix, seq, device=device)
                    mask = key_pos[None, :] <= q_pos[:, None]  # [E, L]
                    if sliding_window is not None:
                        mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
                extends.append(ExtendSegment(row, row + ext, table, _contiguous_start(table), mask))
            row += ext
        decode = _build_decode_group(decode_rows, decode_tables, row, device) if decode_rows else None
        return cls(num_tokens=row, decode=decode, extends=tuple(extends))


def _as_index(t: SlotTable, device: Union[str, torch.device]) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=torch.int64)
    return torch.tensor(t, dtype=torch.int64, device=device)


def _contiguous_start(table: torch.Tensor) -> Optional[int]:
    """table[0] when the slots are consecutive ascending ids, else None (always None off CPU: no sync)."""
    if table.device.type != "cpu":
        return None
    n = table.numel()
    first = int(table[0])
    if n == 1:
        return first
    if int(table[-1]) - first != n - 1:
        return None
    return first if bool((table[1:] - table[:-1] == 1).all()) else None


def _build_decode_group(
    rows: list[int], tables: list[torch.Tensor], num_tokens: int, device: Union[str, torch.device]
) -> DecodeGroup:
    lens = [t.numel() for t in tables]
    max_len = max(lens)
    bd = len(tables)
    start = None
    if bd == 1:
        slots, mask, start = tables[0], None, _contiguous_start(tables[0])
    else:
        padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=-1)  # [Bd, Lmax]
        # NOTE: pad with the row's first slot, which holds written K/V: masked scores of garbage
        # (NaN in a never-written slot) would still poison the softmax.
        slots = torch.where(padded < 0, padded[:, :1], padded).reshape(-1)
        mask = None
        if min(lens) != max_len:
            lens_t = torch.tensor(lens, device=device)
            mask = (torch.arange(max_len, device=device)[None, :] < lens_t[:, None]).view(bd, 1, 1, max_len)
    # rows None: the decode rows are exactly the batch, in order (a pure decode step)
    rows_t = None if bd == num_tokens else torch.tensor(rows, dtype=torch.int64, device=device)
    lens_cpu = torch.tensor(lens, dtype=torch.int64) if torch.device(device).type == "cpu" else None
    return DecodeGroup(rows=rows_t, slots=slots, slot_start=start, batch_size=bd, max_len=max_len, mask=mask,
                       lens=lens_cpu)


def paged_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the batch's new queries over their sequences' paged K/V.

    q: [T, H, D]; k_buf, v_buf: [num_slots, Hkv, D] (H % Hkv == 0, query head h reads kv head
    h // (H // Hkv)); returns [T, H, D] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    assert num_tokens == meta.num_tokens, f"q has {num_tokens} rows, metadata expects {meta.num_tokens}"
    assert num_heads % num_kv_heads == 0 and k_buf.shape == v_buf.shape and k_buf.shape[2] == head_dim
    group = num_heads // num_kv_heads

    d = meta.decode
    if d is not None and d.rows is None:  # pure decode: no scatter
        return _decode(q, k_buf, v_buf, d, scale, num_kv_heads, group)
    if d is None and len(meta.extends) == 1:  # one sequence (a prefill, a verify row): no scatter either
        return _extend(q, k_buf, v_buf, meta.extends[0], scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
    if d is not None:
        out.index_copy_(0, d.rows, _decode(q.index_select(0, d.rows), k_buf, v_buf, d, scale, num_kv_heads, group))
    for seg in meta.extends:
        out[seg.q_start : seg.q_end] = _extend(q[seg.q_start : seg.q_end], k_buf, v_buf, seg, scale)
    return out


def _read_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, start: Optional[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V rows of `slots` in the queries' dtype (a pool of another dtype, e.g. `--kv-cache-dtype fp16`
    under fp32 activations, is widened after the gather: exact)."""
    if start is not None:  # consecutive slots: a view of the pool
        k, v = k_buf[start : start + slots.numel()], v_buf[start : start + slots.numel()]
    else:
        k, v = k_buf.index_select(0, slots), v_buf.index_select(0, slots)
    return k.to(dtype), v.to(dtype)


def _decode(
    q: torch.Tensor,  # [Bd, H, D]
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    d: DecodeGroup,
    scale: float,
    num_kv_heads: int,
    group: int,
) -> torch.Tensor:
    bd, num_heads, head_dim = q.shape
    # NOTE: one query per sequence, so the G query heads sharing a kv head become G query rows of
    # that kv head: GQA without repeating K/V. index_select is ~4x faster than advanced indexing.
    k, v = _read_kv(k_buf, v_buf, d.slots, d.slot_start, q.dtype)  # [Bd * L, Hkv, D]
    k = k.view(bd, d.max_len, num_kv_heads, head_dim).transpose(1, 2)  # [Bd, Hkv, L, D]
    v = v.view(bd, d.max_len, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.view(bd, num_kv_heads, group, head_dim)  # [Bd, Hkv, G, D]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=d.mask, scale=scale)  # [Bd, Hkv, G, D]
    return o.reshape(bd, num_heads, head_dim)


def _extend(
    q: torch.Tensor,  # [E, H, D]
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg: ExtendSegment,
    scale: float,
) -> torch.Tensor:
    k, v = _read_kv(k_buf, v_buf, seg.slots, seg.slot_start, q.dtype)  # [L, Hkv, D]
    k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if seg.mask is not None and num_q <= FOLD_MAX_ROWS:
        # NOTE: a few queries over a cached prefix (speculative verify rows, short chunks): the G query
        # heads of a kv head become G * E query rows of that kv head (no K/V repeat), with the mask as an
        # additive bias. 15-35% less than enable_gqa with a bool mask on the CPU at E = 5-9 (L 300-1000).
        group = num_heads // num_kv_heads
        qg = q.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * num_q, head_dim)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=seg.grouped_bias(group, q.dtype), scale=scale)
        o = o.view(num_kv_heads, group, num_q, head_dim).permute(2, 0, 1, 3)  # [E, Hkv, G, D]
        return o.contiguous().view(num_q, num_heads, head_dim)  # NOTE: contiguous: callers view it as [E, H * D]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, E, D]
    o = F.scaled_dot_product_attention(
        qh, k, v, attn_mask=seg.mask, is_causal=seg.mask is None, scale=scale, enable_gqa=True
    )  # [1, H, E, D]
    return o[0].transpose(0, 1)  # [E, H, D]
