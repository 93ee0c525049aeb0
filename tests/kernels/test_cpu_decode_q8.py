"""The fused decode kernels with q8 activations (act="q8": kernels/cpu/quant_q8_blocks.h's contract): decode_layer
against its fp32 reference within the int8 rounding, decode_rows giving every row the BITS of decode_stack on
that token alone (decode batches, a verify chain, 1 and 2 threads, every block type), the per-row path's bits
(what an AVX2-only CPU runs) equal to the VNNI tile's, and the q8 matmuls of the layer equal to quant_linear's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sgl.kernels import cpu
from sgl.kernels.cpu import quant
from sgl.kernels.cpu.decode_layer import decode_layer, decode_layer_reference, decode_stack
from tests.kernels.test_cpu_decode_layer import make_layer, rope_rows
from tests.kernels.test_cpu_decode_rows import (HEAD_DIM, HIDDEN, SLOTS, assert_same, clone, make_stack, rope,
                                              scattered_rows)
from tests.kernels.test_cpu_q16_batch import ext  # noqa: F401  (the skip fixture)

QTYPES = ["q4_0", "q4_1", "q8_0"]


def run_rows(stack, h, lists, positions):  # noqa: ANN001, ANN201  (test_cpu_decode_rows.run_rows with act="q8")
    from sgl.kernels.cpu.decode_layer import decode_rows

    cos, sin = rope(positions)
    addrs = torch.tensor([t.data_ptr() for t in lists], dtype=torch.int64)
    lens = torch.tensor([t.numel() for t in lists], dtype=torch.int64)
    return decode_rows(h, stack, cos, sin, addrs, lens, HEAD_DIM**-0.5, act="q8")


def run_one_by_one(stack, h, lists, positions):  # noqa: ANN001, ANN201
    for t, (slots, pos) in enumerate(zip(lists, positions)):
        cos, sin = rope([pos])
        decode_stack(h[t : t + 1], stack, cos[0], sin[0], slots, HEAD_DIM**-0.5, act="q8")
    return h


@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_layer_q8_matches_the_reference_within_int8_rounding(qtype: str) -> None:
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, hidden, inter, length = 8, 2, 16, 128, 160, 70
    w = make_layer(gen, qtype, hidden, heads, kv_heads, head_dim, inter, bias=True)
    k_buf, v_buf = torch.randn(400, kv_heads, head_dim, generator=gen), torch.randn(400, kv_heads, head_dim, generator=gen)
    slots = torch.randperm(400, generator=gen)[:length].contiguous()
    cos, sin = rope_rows(head_dim, length - 1)
    h = torch.randn(1, hidden, generator=gen)
    h_ref, h16 = h.clone(), h.clone()
    decode_layer_reference(h_ref, w, cos, sin, k_buf.clone(), v_buf.clone(), slots, head_dim**-0.5)
    decode_layer(h16, w, cos, sin, k_buf.clone(), v_buf.clone(), slots, head_dim**-0.5, act="q16")
    decode_layer(h, w, cos, sin, k_buf, v_buf, slots, head_dim**-0.5, act="q8")
    # int8 activations move each product by <= 1/254 of its block's max |x|: ~1e-2 of a unit-scale output
    torch.testing.assert_close(h, h_ref, rtol=0.05, atol=0.05)
    assert (h - h_ref).abs().max() > 10 * (h16 - h_ref).abs().max()  # it really ran q8


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [2, 9, 32])
def test_decode_rows_q8_rows_match_decode_stack_alone(qtype: str, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    stack = make_stack(rows, qtype)
    lists, positions = scattered_rows(rows, gen)
    h = torch.randn(rows, HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(stack, h, lists, positions)
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, lists, positions))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_q8_verify_chain_has_the_bits_of_its_decode_steps(threads: int) -> None:
    """1 + 8 rows of one sequence (row j sees rows < j), as a speculative verify step runs them, next to a decode
    row of another sequence: each row the bits of decode_stack on it alone, at 1 and 2 threads."""
    gen = torch.Generator().manual_seed(8)
    stack = make_stack(8, "q4_1")
    table = torch.randperm(SLOTS, generator=gen)[:49].contiguous()  # 40 cached + 9 new
    other = torch.randperm(SLOTS, generator=gen)[:30]
    other = other[~torch.isin(other, table)].contiguous()
    lists = [table[: 41 + j] for j in range(9)] + [other]
    positions = [40 + j for j in range(9)] + [other.numel() - 1]
    h = torch.randn(10, HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    old = quant._threads
    cpu._ext.load().set_adaptive(False)  # every multi-thread call really uses the pool's helpers
    try:
        cpu.set_num_threads(threads)
        run_rows(stack, h, lists, positions)
    finally:
        quant._threads = old
        cpu._ext.load().set_adaptive(True)
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, lists, positions))


def test_the_layers_q8_matmuls_are_quant_linears() -> None:
    """decode_layer's q8 qkv projection is quant_linear(act_quant="q8")'s (gemv's and gemm's): the new slot's v is
    the product's v part, and its k (at position 0, where RoPE is the identity) the k part."""
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, hidden, inter = 4, 2, 32, 64, 96
    w = make_layer(gen, "q4_1", hidden, heads, kv_heads, head_dim, inter, bias=False)
    k_buf, v_buf = torch.zeros(8, kv_heads, head_dim), torch.zeros(8, kv_heads, head_dim)
    slots = torch.tensor([3], dtype=torch.int64)
    cos, sin = rope_rows(head_dim, 0)  # position 0: cos 1, sin 0: k is the raw projection too
    h = torch.randn(1, hidden, generator=gen)
    decode_layer(h.clone(), w, cos, sin, k_buf, v_buf, slots, head_dim**-0.5, act="q8")
    from sgl.kernels.cpu.norm import rms_norm

    x = rms_norm(h, w.input_layernorm, w.eps)  # rms_norm.cpp: the layer's arithmetic
    qkv = cpu.quant_linear(x, w.qkv, act_quant="q8")[0]  # M = 1: the decode pool's gemv
    y = torch.empty(1, qkv.numel())  # the multi-row kernel (gemm, act_mode 1) on the same row: the same bits
    cpu._ext.load().gemm(x.data_ptr(), 1, w.qkv.data.data_ptr(), "q4_1", qkv.numel(), hidden, y.data_ptr(), 0, 0, 1, 1)
    assert torch.equal(y[0], qkv)
    kv = kv_heads * head_dim
    assert torch.equal(v_buf[3].reshape(-1), qkv[heads * head_dim + kv :])
    assert torch.equal(k_buf[3].reshape(-1), qkv[heads * head_dim : heads * head_dim + kv])


def test_the_per_row_path_gives_the_tiles_bits() -> None:
    """SGL_CPU_Q16_NO_TILE=1 (what an AVX2-only CPU runs: rows one at a time, the AVX2 4-column kernel and the
    scalar quantization of x) gives the same bits for a q8 decode_rows call and a q8 decode_stack step; in
    subprocesses (the choice is made once)."""
    code = ("import torch, tests.kernels.test_cpu_decode_q8 as t;"
            "outs = []\n"
            "for qt in ('q4_0', 'q4_1', 'q8_0'):\n"
            "    s = t.make_stack(4, qt); g = torch.Generator().manual_seed(4)\n"
            "    p = torch.randperm(t.SLOTS, generator=g); L = [p[10 * i: 10 * i + 3 + i].contiguous() for i in range(9)]\n"
            "    h = torch.randn(9, t.HIDDEN, generator=g); t.run_rows(s, h, L, [x.numel() - 1 for x in L])\n"
            "    h1 = torch.randn(1, t.HIDDEN, generator=g); t.run_one_by_one(s, h1, L[:1], [L[0].numel() - 1])\n"
            "    outs += [h.double().sum().item(), h.abs().double().sum().item(), h1.double().sum().item()]\n"
            "print(outs)")
    outs = []
    for env in ({}, {"SGL_CPU_Q16_NO_TILE": "1"}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                           timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1]


def test_a_bad_act_mode_is_rejected() -> None:
    stack = make_stack(1, "q8_0")
    cos, sin = rope([1])
    with pytest.raises(ValueError, match="act must be one of"):
        decode_stack(torch.randn(1, HIDDEN), stack, cos[0], sin[0], torch.tensor([0, 1]), 1.0, act="q4")
    ext_mod = cpu._ext.load()
    with pytest.raises(ValueError, match="act modes"):  # the kernel checks too (a caller past the launcher)
        ext_mod.gemv(0, 0, 0, 4, 32, 0, 0, 0, 1, 0)
