"""Triton paged attention: the GPU path of `sgl.kernels.attention.paged_attention` (same arguments,
same semantics; see that module for the batch layout: decode rows with one query, extend segments
causal over their new tokens with full attention to the cached prefix, K/V read from token-slot
pools through per-sequence slot tables, GQA).

Two kernels, both online-softmax (flash) loops over key blocks gathered through the slot table:

- decode: one program per (sequence, kv head, split) computes the G query heads sharing that kv head
  as the rows of one `tl.dot` (GQA without repeating K/V). With `num_splits > 1` each program covers
  one slice of the keys (split-K) and writes a partial output plus its log-sum-exp; a second kernel
  merges the splits. Short contexts use one split and write the output directly.
- extend: one program per (sequence, query head, block of BLOCK_M new tokens); keys 0 ..
  prefix + last query of the block, masked causally (key_pos <= query_pos).

NOTE: `tl.dot` runs with input_precision="ieee": fp32 inputs get exact fp32 products like the
reference (the default "tf32" rounds q and k to 10 mantissa bits); fp16/bf16 inputs use tensor
cores either way, and "tf32" does not exist on most AMD targets.

`PagedIndex` holds the flat tensors the kernels read (padded [B, Lmax] slot matrices, lengths, query
rows); build it from lists (`PagedIndex.build`) or from an `AttentionMetadata` (`from_metadata`,
cached for the last metadata seen, so the layers of one step convert once). On a CUDA device:

    import torch
    from sgl.kernels.attention import AttentionMetadata
    k_buf, v_buf = (torch.randn(8, 1, 64, device="cuda") for _ in range(2))
    meta = AttentionMetadata.build([2, 1], [2, 3], [[0, 1], [5, 6, 7]], device="cuda")
    out = paged_attention(torch.randn(3, 2, 64, device="cuda"), k_buf, v_buf, meta, scale=0.125)  # [3, 2, 64]

Import this module only where triton is installed (`sgl.kernels.dispatch` does it lazily).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from sgl.kernels.attention import AttentionMetadata, SlotTable

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, q_stride_t, q_stride_h,  # q: [T, H, D]
    k_ptr, v_ptr, kv_stride_s, kv_stride_h,  # pools: [num_slots, Hkv, D], same strides
    o_ptr, o_stride_t, o_stride_h,  # out: [T, H, D] (written when NUM_SPLITS == 1)
    mid_o_ptr, mid_lse_ptr,  # [Bd, H, NUM_SPLITS, D], [Bd, H, NUM_SPLITS] fp32 (when NUM_SPLITS > 1)
    rows_ptr, slots_ptr, slots_stride, lens_ptr,  # [Bd], [Bd, Lmax], [Bd]
    scale_log2,  # softmax scale * log2(e): scores live in the log2 domain
    split_len,  # keys per split
    num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(rows_ptr + b).to(tl.int64)
    seq_len = tl.load(lens_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g  # [BLOCK_G] query heads of this kv head
    q = tl.load(q_ptr + row * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    kv_head = kvh.to(tl.int64) * kv_stride_h
    start = split * split_len
    end = tl.minimum(seq_len, start + split_len)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        slot = tl.load(slots_ptr + b.to(tl.int64) * slots_stride + pos, mask=ok, other=0).to(tl.int64)
        k = tl.load(k_ptr + slot[None, :] * kv_stride_s + kv_head + d[:, None],
                    mask=d_ok[:, None] & ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision="ieee") * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * kv_stride_s + kv_head + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + row * o_stride_t + heads[:, None] * o_stride_h + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # NOTE: a split past the end of a short sequence saw no key: l_i == 0, m_i == -inf; it
        # stores output 0 and lse -inf, which the merge weights by exp2(-inf) = 0.
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        mid = (b.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(mid_lse_ptr + mid, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr, mid_lse_ptr,  # [Bd, H, NUM_SPLITS, D], [Bd, H, NUM_SPLITS] fp32
    o_ptr, o_stride_t, o_stride_h,
    rows_ptr,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    d_ok = d < HEAD_DIM
    base = (b.to(tl.int64) * num_heads + h) * NUM_SPLITS
    lse = tl.load(mid_lse_ptr + base + s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]; split 0 is finite
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(mid_o_ptr + (base + s[:, None]) * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)  # [BLOCK_D]
    tl.store(o_ptr + row * o_stride_t + h * o_stride_h + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _extend_kernel(
    q_ptr, q_stride_t, q_stride_h,  # q: [T, H, D]
    k_ptr, v_ptr, kv_stride_s, kv_stride_h,  # pools: [num_slots, Hkv, D], same strides
    o_ptr, o_stride_t, o_stride_h,  # out: [T, H, D]
    q_starts_ptr, ext_lens_ptr, seq_lens_ptr, slots_ptr, slots_stride,  # [Be] x3, [Be, Lmax]
    scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    ext = tl.load(ext_lens_ptr + b)
    if mb * BLOCK_M >= ext:  # the grid covers the longest segment
        return
    q_start = tl.load(q_starts_ptr + b).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - ext
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] new-token index within the segment
    d = tl.arange(0, BLOCK_D)
    m_ok = m < ext
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + m)[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = prefix + m  # absolute positions; query i sees keys 0 .. prefix + i
    kv_head = (h // GROUP).to(tl.int64) * kv_stride_h
    end = tl.minimum(seq_len, prefix + (mb + 1) * BLOCK_M)  # past the block's last query: all masked
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        slot = tl.load(slots_ptr + b.to(tl.int64) * slots_stride + pos, mask=ok, other=0).to(tl.int64)
        k = tl.load(k_ptr + slot[None, :] * kv_stride_s + kv_head + d[:, None],
                    mask=d_ok[:, None] & ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision="ieee") * scale_log2  # [BLOCK_M, BLOCK_N]
        # NOTE: key 0 is visible to every row (padded rows included), so the first block gives
        # each row a finite max and later fully-masked rows only add exp2(-inf) = 0.
        s = tl.where(ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * kv_stride_s + kv_head + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (q_start + m)[:, None] * o_stride_t + h * o_stride_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class PagedIndex:
    """The flat index tensors of one step (int64, on the step's device), split by kernel."""

    num_tokens: int  # T, query rows
    decode_rows: torch.Tensor  # [Bd] query row of each decode sequence
    decode_slots: torch.Tensor  # [Bd, Ld] slot tables, right-padded (pads are never read)
    decode_lens: torch.Tensor  # [Bd] seq_len
    decode_max_len: int  # Ld (0 when Bd == 0)
    extend_q_starts: torch.Tensor  # [Be] first query row of each extend segment
    extend_lens: torch.Tensor  # [Be] extend_len (new tokens)
    extend_seq_lens: torch.Tensor  # [Be] seq_len = prefix_len + extend_len
    extend_slots: torch.Tensor  # [Be, Le] slot tables, right-padded
    extend_max_len: int  # longest extend_len (0 when Be == 0)

    @classmethod
    def build(
        cls,
        extend_lens: Sequence[int],
        seq_lens: Sequence[int],
        slot_tables: Sequence[SlotTable],
        device: Union[str, torch.device] = "cpu",
    ) -> "PagedIndex":
        """From per-sequence lists (the arguments of `AttentionMetadata.build`); queries are sequence-major."""
        assert len(extend_lens) == len(seq_lens) == len(slot_tables), "one extend_len, seq_len, slot table per sequence"
        dec_rows, dec_tables, ext_starts, ext_lens, ext_tables = [], [], [], [], []
        row = 0
        for ext, seq, table in zip(extend_lens, seq_lens, slot_tables):
            t = torch.as_tensor(table, dtype=torch.int64).to(device)
            assert 1 <= ext <= seq and t.numel() == seq, f"extend_len {ext}, seq_len {seq}, {t.numel()} slots"
            if ext == 1:
                dec_rows.append(row)
                dec_tables.append(t)
            else:
                ext_starts.append(row)
                ext_lens.append(ext)
                ext_tables.append(t)
            row += ext
        return cls._make(row, dec_rows, dec_tables, ext_starts, ext_lens, ext_tables, device)

    @classmethod
    def from_metadata(cls, meta: AttentionMetadata) -> "PagedIndex":
        """The same index from the reference's metadata; cached for the last `meta` (one per step)."""
        cached = _LAST_INDEX.get("meta")
        if cached is not None and cached() is meta:
            return _LAST_INDEX["index"]
        device = None
        d = meta.decode
        if d is not None:
            slots = d.slots.reshape(d.batch_size, d.max_len).contiguous()  # pads: the row's first slot
            device = slots.device
            lens = (torch.full((d.batch_size,), d.max_len, dtype=torch.int64, device=device) if d.mask is None
                    else d.mask.reshape(d.batch_size, d.max_len).sum(1))
            rows = d.rows if d.rows is not None else torch.arange(d.batch_size, device=device)
        ext_starts = [s.q_start for s in meta.extends]
        ext_lens = [s.q_end - s.q_start for s in meta.extends]
        ext_tables = [s.slots for s in meta.extends]
        if device is None:
            device = ext_tables[0].device if ext_tables else torch.device("cpu")
        index = cls._make(meta.num_tokens, [], [], ext_starts, ext_lens, ext_tables, device)
        if d is not None:  # the decode group is already padded: take its tensors as they are
            index = PagedIndex(meta.num_tokens, rows.to(torch.int64), slots, lens.to(torch.int64), d.max_len,
                               index.extend_q_starts, index.extend_lens, index.extend_seq_lens,
                               index.extend_slots, index.extend_max_len)
        _LAST_INDEX["meta"], _LAST_INDEX["index"] = weakref.ref(meta), index
        return index

    @classmethod
    def _make(cls, num_tokens: int, dec_rows: list[int], dec_tables: list[torch.Tensor], ext_starts: list[int],
              ext_lens: list[int], ext_tables: list[torch.Tensor], device: Union[str, torch.device]) -> "PagedIndex":
        def ints(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=device)

        def padded(tables: list[torch.Tensor]) -> torch.Tensor:  # [B, Lmax], pad 0 (never read)
            return (torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=0) if tables
                    else torch.zeros((0, 1), dtype=torch.int64, device=device))

        return cls(
            num_tokens=num_tokens,
            decode_rows=ints(dec_rows), decode_slots=padded(dec_tables),
            decode_lens=ints([t.numel() for t in dec_tables]),
            decode_max_len=max((t.numel() for t in dec_tables), default=0),
            extend_q_starts=ints(ext_starts), extend_lens=ints(ext_lens),
            extend_seq_lens=ints([t.numel() for t in ext_tables]), extend_slots=padded(ext_tables),
            extend_max_len=max(ext_lens, default=0),
        )


_LAST_INDEX: dict = {}  # {"meta": weakref to the last AttentionMetadata converted, "index": its PagedIndex}


def paged_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    meta: Union[AttentionMetadata, PagedIndex],
    scale: float,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Triton `paged_attention`: q [T, H, D]; k_buf, v_buf [num_slots, Hkv, D]; returns [T, H, D] in q's dtype.

    `num_splits`: key splits per decode sequence (split-K); None picks one from the batch shape.
    """
    index = meta if isinstance(meta, PagedIndex) else PagedIndex.from_metadata(meta)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if index.decode_rows.numel():
        paged_decode_attention(q, k_buf, v_buf, index, scale, out, num_splits)
    if index.extend_lens.numel():
        paged_extend_attention(q, k_buf, v_buf, index, scale, out)
    return out


def _check(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, index: PagedIndex, out: torch.Tensor) -> None:
    assert q.dim() == 3 and k_buf.dim() == 3, f"q {tuple(q.shape)}, k_buf {tuple(k_buf.shape)}"
    num_tokens, num_heads, head_dim = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype, f"out {out.dtype} {tuple(out.shape)} for q {q.dtype}"
    assert num_tokens == index.num_tokens, f"q has {num_tokens} rows, the index expects {index.num_tokens}"
    assert k_buf.shape == v_buf.shape and k_buf.shape[2] == head_dim, f"k_buf {tuple(k_buf.shape)}, v_buf {tuple(v_buf.shape)}"
    assert num_heads % k_buf.shape[1] == 0, f"{num_heads} query heads over {k_buf.shape[1]} kv heads"
    assert head_dim >= 16, f"head_dim {head_dim} < 16: tl.dot needs K >= 16"
    assert q.dtype == k_buf.dtype == v_buf.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"dtypes q {q.dtype}, k {k_buf.dtype}, v {v_buf.dtype}: one of fp32/fp16/bf16"
    assert k_buf.stride() == v_buf.stride(), f"k/v pools strides differ: {k_buf.stride()} vs {v_buf.stride()}"
    for name, t in (("q", q), ("k_buf", k_buf), ("out", out)):
        assert t.stride(2) == 1, f"{name} needs a unit head_dim stride, strides {t.stride()}"
    assert len({t.device for t in (q, k_buf, v_buf, out, index.decode_slots, index.extend_slots)}) == 1, \
        "q, pools and index on one device"
    for t in (index.decode_rows, index.decode_lens, index.extend_q_starts, index.extend_lens, index.extend_seq_lens):
        assert t.dtype == torch.int64 and t.is_contiguous()
    for t in (index.decode_slots, index.extend_slots):
        assert t.dtype == torch.int64 and t.dim() == 2 and t.stride(1) == 1


def _default_block(dtype: torch.dtype) -> int:
    # NOTE: fp32 tiles take twice the shared memory: 64x64 tiles with head_dim 128 need ~116 KB
    # (over the 99 KB of sm_86/89), 32x32 ones ~54 KB; fp16/bf16 64x64 ~41 KB (compiled for sm_80).
    return 32 if dtype == torch.float32 else 64


def _auto_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int) -> int:
    """Enough programs to fill a GPU (~128) without splits shorter than 4 key blocks."""
    want = triton.cdiv(128, batch * num_kv_heads)
    return max(1, min(want, max_len // (4 * block_n), 16))


def paged_decode_attention(
    q: torch.Tensor,  # [T, H, D]; reads the decode rows
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    index: PagedIndex,
    scale: float,
    out: torch.Tensor,  # [T, H, D]; writes the decode rows
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
) -> None:
    _check(q, k_buf, v_buf, index, out)
    block_n = block_n or _default_block(q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buf.shape[1]
    group = num_heads // num_kv_heads
    batch = index.decode_rows.numel()
    if num_splits is None:
        num_splits = _auto_splits(batch, num_kv_heads, index.decode_max_len, block_n)
    assert num_splits >= 1
    split_len = triton.cdiv(triton.cdiv(index.decode_max_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(index.decode_max_len, split_len)  # no split that is empty for every row
    mid_o = mid_lse = out  # unread placeholders when there is one split
    if num_splits > 1:
        mid_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, q.stride(0), q.stride(1),
        k_buf, v_buf, k_buf.stride(0), k_buf.stride(1),
        out, out.stride(0), out.stride(1),
        mid_o, mid_lse,
        index.decode_rows, index.decode_slots, index.decode_slots.stride(0), index.decode_lens,
        scale * _LOG2E, split_len, num_heads,
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits,
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1), index.decode_rows, num_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits))


def paged_extend_attention(
    q: torch.Tensor,  # [T, H, D]; reads the extend rows
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    index: PagedIndex,
    scale: float,
    out: torch.Tensor,  # [T, H, D]; writes the extend rows
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> None:
    _check(q, k_buf, v_buf, index, out)
    block_m = block_m or _default_block(q.dtype)
    block_n = block_n or _default_block(q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_buf.shape[1]
    batch = index.extend_lens.numel()
    _extend_kernel[(batch, num_heads, triton.cdiv(index.extend_max_len, block_m))](
        q, q.stride(0), q.stride(1),
        k_buf, v_buf, k_buf.stride(0), k_buf.stride(1),
        out, out.stride(0), out.stride(1),
        index.extend_q_starts, index.extend_lens, index.extend_seq_lens,
        index.extend_slots, index.extend_slots.stride(0), scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
    )
