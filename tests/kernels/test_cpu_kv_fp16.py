"""An fp16 KV pool (`--kv-cache-dtype fp16`) in the CPU decode kernels: they store K/V with the bits torch's
`.to(torch.float16)` gives (so the torch prefill path and the kernels fill the pool alike), read them widened
exactly (so attention over an fp16 pool equals attention over its fp32 widening), and keep decode_rows'
contract: every row the bits of decode_stack on that token alone."""

from __future__ import annotations

import pytest
import torch

from sgl.kernels.attention import AttentionMetadata, paged_attention
from sgl.kernels.cpu.attention import decode_attention
from sgl.kernels.cpu.decode_layer import DecodeStack, decode_layer, decode_layer_reference
from tests.kernels.test_cpu_decode_layer import make_layer, mode, rope_rows  # noqa: F401  (mode: ext / ref)
from tests.kernels.test_cpu_decode_rows import (SLOTS, assert_same, clone, make_stack, run_one_by_one, run_rows)


def half_stack(stack: DecodeStack) -> DecodeStack:
    return DecodeStack(stack.layers, tuple(k.half() for k in stack.k_bufs), tuple(v.half() for v in stack.v_bufs))


@pytest.mark.parametrize("heads,kv_heads,head_dim,length", [(9, 3, 64, 70), (8, 2, 16, 300), (4, 4, 24, 5)])
def test_decode_attention_over_fp16_equals_its_fp32_widening(mode: str, heads: int, kv_heads: int, head_dim: int,
                                                              length: int) -> None:
    gen = torch.Generator().manual_seed(length)
    k16 = torch.randn(400, kv_heads, head_dim, generator=gen).half()
    v16 = torch.randn(400, kv_heads, head_dim, generator=gen).half()
    q = torch.randn(3, heads, head_dim, generator=gen)
    slots = torch.stack([torch.randperm(400, generator=gen)[:length] for _ in range(3)])
    lens = torch.tensor([length, max(1, length // 2), 1])
    out16 = decode_attention(q, k16, v16, slots, lens, head_dim**-0.5)
    out32 = decode_attention(q, k16.float(), v16.float(), slots, lens, head_dim**-0.5)
    assert torch.equal(out16, out32)  # the widening is exact and the arithmetic after it the same


def test_torch_attention_reads_fp16_pool_widened() -> None:
    """The torch path (prefill, extend rows): fp32 queries over an fp16 pool = over the widened pool."""
    gen = torch.Generator().manual_seed(0)
    k16, v16 = (torch.randn(32, 2, 16, generator=gen).half() for _ in range(2))
    q = torch.randn(7, 4, 16, generator=gen)  # a 6-token extend over a 4-token prefix and a decode row
    meta = AttentionMetadata.build(extend_lens=[6, 1], seq_lens=[10, 5],
                                   slot_tables=[list(range(10)), [20, 21, 22, 23, 24]])
    out = paged_attention(q, k16, v16, meta, 0.25)
    assert out.dtype == torch.float32
    assert torch.equal(out, paged_attention(q, k16.float(), v16.float(), meta, 0.25))


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_decode_layer_stores_torch_half_bits(mode: str, qtype: str) -> None:
    """The new token's K/V in an fp16 pool are the fp32 pool's values rounded as torch rounds them, and the
    layer's output is the fp32-pool layer's over the rounded pool (within the reference tolerance)."""
    gen = torch.Generator().manual_seed(3)
    w = make_layer(gen, qtype, 64, 4, 2, 32, 96, bias=True)
    k32, v32 = torch.randn(64, 2, 32, generator=gen), torch.randn(64, 2, 32, generator=gen)
    k16, v16 = k32.half(), v32.half()
    slots = torch.randperm(64, generator=gen)[:20]
    cos, sin = rope_rows(32, 19)
    h = torch.randn(1, 64, generator=gen)
    h32, h16 = h.clone(), h.clone()
    decode_layer(h32, w, cos, sin, k32, v32, slots, 32**-0.5)
    decode_layer(h16, w, cos, sin, k16, v16, slots, 32**-0.5)
    s = int(slots[-1])
    assert torch.equal(k16[s], k32[s].half()) and torch.equal(v16[s], v32[s].half())
    ref = decode_layer_reference(h.clone(), w, cos, sin, k32.half().float(), v32.half().float(), slots, 32**-0.5)
    torch.testing.assert_close(h16, ref, rtol=0, atol=3e-2)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_decode_rows_fp16_pool_rows_match_batch_one(mode: str, rows: int) -> None:
    """decode_rows over an fp16 pool: every row and every stored K/V the bits of decode_stack alone."""
    gen = torch.Generator().manual_seed(10 + rows)
    stack = half_stack(make_stack(rows, "q4_1"))
    perm = torch.randperm(SLOTS, generator=gen)
    lists, positions, used = [], [], 0
    for t in range(rows):
        n = 1 + 11 * t % 30
        lists.append(perm[used : used + n].contiguous())
        positions.append(n - 1)
        used += n
    h = torch.randn(rows, 64, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(stack, h, lists, positions)
    assert all(k.dtype == torch.float16 for k in stack.k_bufs)
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, lists, positions))


def test_decode_stack_rejects_mixed_kv_dtypes() -> None:
    stack = make_stack(0, "q4_1")
    with pytest.raises(ValueError, match="differs from layer 0"):
        DecodeStack(stack.layers, (stack.k_bufs[0],) + tuple(k.half() for k in stack.k_bufs[1:]),
                    (stack.v_bufs[0],) + tuple(v.half() for v in stack.v_bufs[1:]))
    with pytest.raises(ValueError, match="float32 or float16"):
        DecodeStack(stack.layers, tuple(k.bfloat16() for k in stack.k_bufs), tuple(v.bfloat16() for v in stack.v_bufs))
