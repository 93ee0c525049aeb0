"""Rows that share a slot prefix (a verify step's 1 + k chain rows of one sequence, tree rows) attend as one group
(kernels/cpu/attention_rows.h), reading the shared K/V once: every row's result must have the BITS of that row
attended alone (attend_heads), which is what makes speculative greedy output identical to plain decoding.
Checked through decode_attention (the group vs a call per row) and decode_rows (a chain vs decode_stack per token)."""

from __future__ import annotations

import pytest
import torch

from sgl.kernels import cpu
from sgl.kernels.cpu import quant
from sgl.kernels.cpu.attention import decode_attention
from sgl.kernels.cpu.decode_layer import DecodeStack
from tests.kernels.test_cpu_decode_rows import assert_same, clone, make_stack, run_one_by_one, run_rows


@pytest.fixture(params=[1, 2, 3])
def threads(request: pytest.FixtureRequest) -> int:
    """The C++ kernels (the torch reference has no groups to check) at 1, 2 and 3 threads (a group splits by kv
    heads, and by rows too when the kv heads do not divide among the threads)."""
    if not cpu.extension_available():
        pytest.skip("the C++ extension is not built (python -m sgl.kernels.cpu.build)")
    old = quant._threads
    cpu.set_num_threads(request.param)
    yield request.param
    quant._threads = old


def batch(lists: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [B, Lmax] (padded with -1: never read) and lens [B]."""
    slots = torch.full((len(lists), max(x.numel() for x in lists)), -1, dtype=torch.int64)
    for b, x in enumerate(lists):
        slots[b, : x.numel()] = x
    return slots, torch.tensor([x.numel() for x in lists], dtype=torch.int64)


def each_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([decode_attention(q[b : b + 1], k, v, *batch([x]), q.shape[-1] ** -0.5)
                      for b, x in enumerate(lists)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 80), (6, 2, 20)])
@pytest.mark.parametrize("prefix", [1, 2, 3, 6, 45, 301])
def test_chain_group_is_bit_identical_to_each_row_alone(threads: int, dtype: torch.dtype, heads: int,
                                                        kv_heads: int, head_dim: int, prefix: int) -> None:
    """1 + 8 chain rows (row j: the table up to prefix + j) next to another sequence's decode row; GQA and MHA,
    D = 64 / 80 (not a multiple of 64) / 20 (not of 16: dot's scalar tail), lengths below 4 and ragged tails."""
    gen = torch.Generator().manual_seed(prefix * 7 + head_dim)
    slots = 700
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(slots, generator=gen)
    table = perm[: prefix + 9]
    lists = [table[: prefix + 1 + j] for j in range(9)] + [perm[prefix + 9 : prefix + 9 + 37]]
    q = torch.randn(len(lists), heads, head_dim, generator=gen)
    got = decode_attention(q, k, v, *batch(lists), head_dim**-0.5)
    want = each_alone(q, k, v, lists)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 80), (6, 2, 20), (8, 2, 128), (2, 1, 272)])
def test_an_fp16_pool_reads_as_its_fp32_copy(threads: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """An fp16 pool's values widen exactly, so attention over it must give the BITS of attention over its fp32 copy:
    the kernels' fp16 loads must not change what they compute, which a comparison of the fp16 paths with each other
    (the group vs each row alone) cannot see. Chains (grouped rows), lone rows, GQA and MHA, D not a multiple of 64
    or of 16, and a wide head (272)."""
    gen = torch.Generator().manual_seed(heads * 31 + head_dim)
    slots = 600
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(torch.float16)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(torch.float16)
    perm = torch.randperm(slots, generator=gen)
    table = perm[:200]
    lists = [table[: 150 + j] for j in range(9)] + [perm[200:203], perm[300:437], perm[437:438]]
    q = torch.randn(len(lists), heads, head_dim, generator=gen)
    got = decode_attention(q, k, v, *batch(lists), head_dim**-0.5)
    want = decode_attention(q, k.float(), v.float(), *batch(lists), head_dim**-0.5)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"


def test_groups_trees_and_lone_rows_in_one_batch(threads: int) -> None:
    """Two chains, tree rows (prefix, ancestors, itself: private parts that are not prefixes of each other), lone
    decode rows, and rows sharing only a short cached prompt with long own parts (kept apart: kMaxOwnKeys)."""
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(1200, 3, 64, generator=gen)
    v = torch.randn(1200, 3, 64, generator=gen)
    perm = torch.randperm(1200, generator=gen)
    a, b, t, prompt = perm[:130], perm[130:190], perm[190:300], perm[300:310]
    pre, p, n1, n2, n3 = t[:100], t[100:101], t[101:102], t[102:103], t[103:104]
    tree = [torch.cat(x) for x in ([pre, p], [pre, p, n1], [pre, p, n2], [pre, p, n1, n3])]
    own = [torch.cat([prompt, perm[310 + 100 * i : 410 + 100 * i]]) for i in range(3)]
    lists = [a[:121 + j] for j in range(5)] + [perm[900:911]] + tree + [b[:55 + j] for j in range(6)] + own
    q = torch.randn(len(lists), 9, 64, generator=gen)
    got = decode_attention(q, k, v, *batch(lists), 0.125)
    assert torch.equal(got, each_alone(q, k, v, lists))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefix", [1, 3, 120])
def test_decode_rows_chain_matches_decode_stack_per_token(threads: int, kv_dtype: torch.dtype, prefix: int) -> None:
    """decode_rows over a 1 + 8 chain (the verify step's rows) gives every row and every stored K/V the bits of
    decode_stack (the M = 1 decode step) token by token."""
    from tests.kernels.test_cpu_decode_rows import SLOTS

    gen = torch.Generator().manual_seed(prefix)
    s = make_stack(prefix, "q4_1")
    stack = DecodeStack(s.layers, tuple(x.to(kv_dtype) for x in s.k_bufs), tuple(x.to(kv_dtype) for x in s.v_bufs))
    table = torch.randperm(SLOTS, generator=gen)[: prefix + 9].contiguous()
    chain = [table[: prefix + 1 + j] for j in range(9)]
    positions = [prefix + j for j in range(9)]
    h = torch.randn(9, s.layers[0].hidden_size, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(stack, h, chain, positions)
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, chain, positions))


def _avx512() -> bool:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512vl", "avx512dq"} <= set(flags)


def test_avx512_loops_give_the_avx2_bits() -> None:
    """The AVX-512 row loops (attention_zmm.h) and the AVX2 ones (what an AVX2-only CPU runs,
    SGL_CPU_ATTN_NO_ZMM=1) give the same bits: lone rows (lengths 1..301, so every key and D tail), groups, fp32
    and fp16, D = 64 / 80 / 20, odd head counts (head pairs across kv heads). In subprocesses: the choice is
    made once per process."""
    if not cpu.extension_available() or not _avx512():
        pytest.skip("needs the C++ extension on an AVX-512 CPU")
    import os
    import subprocess
    import sys

    code = """
import hashlib, torch
import tests.kernels.test_cpu_attention_rows as t
from sgl.kernels.cpu.attention import decode_attention
for H, K, D in ((9, 3, 64), (5, 5, 80), (6, 2, 20)):
    for dt in (torch.float32, torch.float16):
        g = torch.Generator().manual_seed(D)
        p = torch.randperm(900, generator=g)
        L = [p[:n] for n in (1, 2, 3, 5, 16, 17, 33, 64, 301)] + [p[400:520 + j] for j in range(9)]
        k, v = (torch.randn(900, K, D, generator=g).to(dt) for _ in range(2))
        o = decode_attention(torch.randn(len(L), H, D, generator=g), k, v, *t.batch(L), D ** -0.5)
        print(hashlib.sha256(o.numpy().tobytes()).hexdigest())
"""
    outs = []
    for env in ({}, {"SGL_CPU_ATTN_NO_ZMM": "1"}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1]
