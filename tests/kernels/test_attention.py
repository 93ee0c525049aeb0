"""kernels.attention.paged_attention against a naive per-sequence, per-head softmax attention."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sgl.kernels import attention
from sgl.kernels.attention import AttentionMetadata, paged_attention

pytestmark = pytest.mark.timeout(120)


def naive_attention(q, k_buf, v_buf, extend_lens, seq_lens, slot_tables, scale):
    """Loop over sequences, query tokens and heads; float64 softmax. q: [T, H, D] -> [T, H, D]."""
    num_heads, num_kv_heads = q.shape[1], k_buf.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q, dtype=torch.float64)
    row = 0
    for ext, seq, table in zip(extend_lens, seq_lens, slot_tables):
        prefix = seq - ext
        k = k_buf[torch.tensor(table)].double()  # [L, Hkv, D]
        v = v_buf[torch.tensor(table)].double()
        for i in range(ext):
            visible = prefix + i + 1  # causal: keys 0 .. prefix + i
            for h in range(num_heads):
                kv = h // group
                scores = (k[:visible, kv] @ q[row + i, h].double()) * scale  # [visible]
                out[row + i, h] = torch.softmax(scores, 0) @ v[:visible, kv]
        row += ext
    return out


def random_batch(rng: random.Random, num_slots: int, max_seq: int, decode_only: bool = False, contiguous: bool = False):
    batch = rng.randint(1, 5)
    slots = list(range(num_slots))
    if contiguous:  # each sequence owns a run of consecutive slots (the view fast path)
        slots.reverse()
    else:
        rng.shuffle(slots)  # sequences own disjoint, non-contiguous slots
    extend_lens, seq_lens, tables = [], [], []
    for _ in range(batch):
        seq = rng.randint(1, max_seq)
        if decode_only:
            ext = 1
        else:
            # prefix lengths 0..seq-1: pure prefill, chunked extend and decode all occur
            ext = rng.choice([1, seq, rng.randint(1, seq)])
        extend_lens.append(ext)
        seq_lens.append(seq)
        tables.append([slots.pop() for _ in range(seq)])
    return extend_lens, seq_lens, tables


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1), (9, 3)])
@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("fold", [True, False])
def test_paged_attention_matches_naive(num_heads: int, num_kv_heads: int, decode_only: bool, contiguous: bool,
                                       fold: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not fold:  # every extend through enable_gqa with a bool mask (else: short ones in the grouped layout)
        monkeypatch.setattr(attention, "FOLD_MAX_ROWS", 0)
    rng = random.Random(1000 * num_heads + 10 * num_kv_heads + decode_only + 2 * contiguous)
    torch.manual_seed(rng.randint(0, 2**31))
    head_dim, num_slots = 16, 256
    for _ in range(8):
        extend_lens, seq_lens, tables = random_batch(rng, num_slots, 20, decode_only, contiguous)
        # NaN in never-used slots: a padded or out-of-table read would show up in the output
        k_buf = torch.full((num_slots, num_kv_heads, head_dim), float("nan"))
        v_buf = torch.full((num_slots, num_kv_heads, head_dim), float("nan"))
        for table in tables:
            idx = torch.tensor(table)
            k_buf[idx] = torch.randn(len(table), num_kv_heads, head_dim)
            v_buf[idx] = torch.randn(len(table), num_kv_heads, head_dim)
        q = torch.randn(sum(extend_lens), num_heads, head_dim)
        scale = 1 / math.sqrt(head_dim)
        meta = AttentionMetadata.build(extend_lens, seq_lens, tables)
        if contiguous:
            assert all(seg.slot_start == t[0] for seg, t in zip(meta.extends, [t for e, t in zip(extend_lens, tables) if e > 1]))
        got = paged_attention(q, k_buf, v_buf, meta, scale)
        want = naive_attention(q, k_buf, v_buf, extend_lens, seq_lens, tables, scale)
        assert got.shape == q.shape and got.dtype == q.dtype
        assert got.is_contiguous()  # NOTE: the layers view it as [T, H * D]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"{extend_lens=} {seq_lens=}")


def test_metadata_accepts_tensor_tables_and_marks_pure_decode() -> None:
    meta = AttentionMetadata.build([1, 1], [3, 2], [torch.tensor([4, 5, 6]), [7, 8]])
    assert meta.num_tokens == 2 and not meta.extends
    assert meta.decode is not None and meta.decode.rows is None  # whole batch is decode, no scatter
    assert meta.decode.slots.tolist() == [4, 5, 6, 7, 8, 7]  # padding repeats a valid slot of the row
    assert meta.decode.slot_start is None  # batched decode always gathers
    assert meta.decode.mask is not None and meta.decode.mask.view(2, 3).tolist() == [[True] * 3, [True, True, False]]


def test_metadata_rejects_inconsistent_lengths() -> None:
    with pytest.raises(AssertionError):
        AttentionMetadata.build([3], [2], [[0, 1]])  # extend_len > seq_len
    with pytest.raises(AssertionError):
        AttentionMetadata.build([1], [3], [[0, 1]])  # slot table shorter than seq_len


def test_single_decode_reads_consecutive_slots_as_a_view() -> None:
    assert AttentionMetadata.build([1], [3], [[4, 5, 6]]).decode.slot_start == 4
    assert AttentionMetadata.build([1], [3], [[6, 5, 4]]).decode.slot_start is None
    assert AttentionMetadata.build([1], [3], [[4, 6, 6]]).decode.slot_start is None
