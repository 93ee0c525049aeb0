"""sgl.kernels.cpu.decode_rows (the decoder stack for a batch of token rows) gives every row the BITS of
decode_stack on that token alone: decode batches of sequences of different lengths, verify rows of a chain
(each row sees the rows before it), tree rows, 1 and 2 threads, the row-pair tile and the per-row path."""

from __future__ import annotations

import pytest
import torch

from sgl.kernels import cpu
from sgl.kernels.cpu import _ext, quant
from sgl.kernels.cpu.decode_layer import (MAX_ROWS, DecodeLayerWeights, DecodeStack, decode_layer, decode_rows,
                                         decode_stack)
from tests.kernels.test_cpu_decode_layer import make_layer, mode  # noqa: F401  (mode: the ext / ref fixture)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, SLOTS = 64, 4, 2, 32, 96, 3, 256


def rope(positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from sgl.runtime.models.rotary import RotaryEmbedding

    r = RotaryEmbedding(HEAD_DIM, 10000.0, None, 4096)
    idx = torch.tensor(positions)
    return r.cos[idx].contiguous(), r.sin_signed[idx].contiguous()


def make_stack(seed: int, qtype: str) -> DecodeStack:
    gen = torch.Generator().manual_seed(seed)
    layers = [make_layer(gen, qtype, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, bias=i == 1) for i in range(LAYERS)]
    ks = [torch.randn(SLOTS, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    vs = [torch.randn(SLOTS, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    return DecodeStack(tuple(layers), tuple(ks), tuple(vs))


def clone(stack: DecodeStack) -> DecodeStack:
    return DecodeStack(stack.layers, tuple(k.clone() for k in stack.k_bufs), tuple(v.clone() for v in stack.v_bufs))


def run_rows(stack: DecodeStack, h: torch.Tensor, lists: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    cos, sin = rope(positions)
    addrs = torch.tensor([t.data_ptr() for t in lists], dtype=torch.int64)
    lens = torch.tensor([t.numel() for t in lists], dtype=torch.int64)
    return decode_rows(h, stack, cos, sin, addrs, lens, HEAD_DIM**-0.5)


def run_one_by_one(stack: DecodeStack, h: torch.Tensor, lists: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    for t, (slots, pos) in enumerate(zip(lists, positions)):
        cos, sin = rope([pos])
        decode_stack(h[t : t + 1], stack, cos[0], sin[0], slots, HEAD_DIM**-0.5)
    return h


def assert_same(a: DecodeStack, b: DecodeStack, ha: torch.Tensor, hb: torch.Tensor) -> None:
    assert torch.equal(ha, hb), f"max diff {(ha - hb).abs().max().item()}"
    for x, y in zip(a.k_bufs + a.v_bufs, b.k_bufs + b.v_bufs):
        assert torch.equal(x, y)



def scattered_rows(rows: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[int]]:
    """`rows` sequences of different lengths over randomly scattered slots: (their slot lists, last positions)."""
    perm = torch.randperm(SLOTS, generator=gen)
    lists, positions, used = [], [], 0
    for t in range(rows):
        n = 1 + (7 * t + 3) % 6 if rows == 32 else 1 + 13 * t % 40
        lists.append(perm[used : used + n].contiguous())
        positions.append(n - 1)
        used += n
    return lists, positions

@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 5, 32])
def test_decode_batch_rows_match_batch_one(mode: str, qtype: str, rows: int) -> None:
    """Sequences of different lengths, scattered slots: each row as decode_stack alone."""
    gen = torch.Generator().manual_seed(rows)
    stack = make_stack(rows, qtype)
    lists, positions = scattered_rows(rows, gen)
    h = torch.randn(rows, HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    out = run_rows(stack, h, lists, positions)
    assert out.data_ptr() == h.data_ptr()
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, lists, positions))


@pytest.mark.parametrize("act", ["q16", "q8"])
def test_rows_without_input_norm_are_decode_layer_per_row(mode: str, act: str) -> None:
    """A one-layer stack with no input norm (an EAGLE head's layer, its catch-up entries as rows: row j sees the
    entries before it) gives each row the bits of decode_stack on it alone, and differs from a unit norm's."""
    import dataclasses

    gen = torch.Generator().manual_seed(9)
    layer = dataclasses.replace(make_layer(gen, "q8_0", HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, bias=False),
                                input_layernorm=None)
    k, v = torch.randn(SLOTS, KV_HEADS, HEAD_DIM, generator=gen), torch.randn(SLOTS, KV_HEADS, HEAD_DIM, generator=gen)
    slots = torch.arange(30)
    lists, positions = [slots[: 27 + j] for j in range(3)], [26 + j for j in range(3)]
    h = 3 * torch.randn(3, HIDDEN, generator=gen)
    outs = []
    for w in (layer, dataclasses.replace(layer, input_layernorm=torch.ones(HIDDEN))):
        stack = DecodeStack((w,), (k.clone(),), (v.clone(),))
        ref, x, x_ref = clone(stack), h.clone(), h.clone()
        cos, sin = rope(positions)
        decode_rows(x, stack, cos, sin, torch.tensor([t.data_ptr() for t in lists]),
                    torch.tensor([t.numel() for t in lists]), HEAD_DIM**-0.5, act=act)
        for t in range(3):
            decode_stack(x_ref[t : t + 1], ref, cos[t], sin[t], lists[t], HEAD_DIM**-0.5, act=act)
        assert_same(stack, ref, x, x_ref)
        outs.append(x)
    assert not torch.allclose(outs[0], outs[1], rtol=1e-2, atol=1e-2)


def test_verify_chain_and_tree_rows(mode: str) -> None:
    """A chain of 1 + 4 rows of one sequence (row j sees rows < j: its list is the table up to its slot), and
    tree rows (node lists: prefix, ancestors, itself) next to a decode row of another sequence."""
    gen = torch.Generator().manual_seed(3)
    stack = make_stack(3, "q4_1")
    table = torch.randperm(SLOTS, generator=gen)[:45].contiguous()  # 40 cached + 5 new
    chain = [table[: 41 + j] for j in range(5)]
    h = torch.randn(5, HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(stack, h, chain, [40 + j for j in range(5)])
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, chain, [40 + j for j in range(5)]))

    # tree: pending p, nodes a (child of p) and b (child of p), c (child of a); plus another sequence's decode row
    other = torch.randperm(SLOTS, generator=gen)[:20]
    other = other[~torch.isin(other, table)].contiguous()
    pre, p, a, b, c = table[:40], table[40:41], table[41:42], table[42:43], table[43:44]
    lists = [torch.cat([pre, p]), torch.cat([pre, p, a]), torch.cat([pre, p, b]), torch.cat([pre, p, a, c]), other]
    positions = [40, 41, 41, 42, other.numel() - 1]
    h = torch.randn(5, HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(stack, h, lists, positions)
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, lists, positions))


def test_rows_past_max_rows_run_in_calls_of_max_rows_in_row_order(mode: str) -> None:
    """Chains of 1 + 14 rows of five sequences, 75 rows in one decode_rows (past MAX_ROWS: 8 requests verifying 8
    drafts are 72): calls of MAX_ROWS rows in row order, the last chain split between two of them, give every row
    and every K/V entry the bits of decode_stack on each token alone, in order. A second call attending before the
    first had stored its rows' K/V, or the rows in another order, would not."""
    gen = torch.Generator().manual_seed(11)
    stack = make_stack(3, "q4_1")
    perm = torch.randperm(SLOTS, generator=gen)
    tables = [perm[40 * b : 40 * b + 20 + 15].contiguous() for b in range(5)]  # 20 cached + 15 new each
    lists = [t[: 21 + j] for t in tables for j in range(15)]
    positions = [20 + j for _ in tables for j in range(15)]
    assert len(lists) > MAX_ROWS and MAX_ROWS % 15 != 0  # a chain straddles the calls' boundary
    h = torch.randn(len(lists), HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(stack, h, lists, positions)
    assert_same(stack, ref, h, run_one_by_one(ref, h_ref, lists, positions))


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_thread_counts_are_bit_identical(mode: str, threads: int) -> None:
    gen = torch.Generator().manual_seed(9)
    stack = make_stack(9, "q4_1")
    perm = torch.randperm(SLOTS, generator=gen)
    lists = [perm[8 * t : 8 * t + 1 + t % 8].contiguous() for t in range(12)]
    positions = [lst.numel() - 1 for lst in lists]
    h = torch.randn(12, HIDDEN, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    run_rows(ref, h_ref, lists, positions)
    old = quant._threads
    try:
        cpu.set_num_threads(threads)
        run_rows(stack, h, lists, positions)
    finally:
        quant._threads = old
    assert_same(stack, ref, h, h_ref)


def test_per_row_path_matches_tile(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SGL_CPU_Q16_NO_TILE (what an AVX2-only CPU runs) gives the same bits; checked in a subprocess because
    the choice is made once per process."""
    if mode == "ref":
        pytest.skip("the tile is the kernel's")
    import subprocess
    import sys

    code = ("import torch, tests.kernels.test_cpu_decode_rows as t;"
            "s = t.make_stack(4, 'q4_0'); g = torch.Generator().manual_seed(4);"
            "p = torch.randperm(t.SLOTS, generator=g); L = [p[10 * i: 10 * i + 3 + i].contiguous() for i in range(9)];"
            "h = torch.randn(9, t.HIDDEN, generator=g); t.run_rows(s, h, L, [x.numel() - 1 for x in L]);"
            "print(h.double().sum().item(), h.abs().double().sum().item())")
    outs = []
    for env in ({}, {"SGL_CPU_Q16_NO_TILE": "1"}):
        import os

        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                           timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1]


def test_rows_reject_bad_input(mode: str) -> None:
    stack = make_stack(1, "q8_0")
    lists = [torch.tensor([0, 1], dtype=torch.int64)]
    h = torch.randn(1, HIDDEN)
    with pytest.raises(ValueError, match="h must be"):
        run_rows(stack, torch.randn(1, HIDDEN + 1), lists, [1])
    with pytest.raises(ValueError, match="cos/sin"):
        run_rows(stack, torch.randn(2, HIDDEN), lists, [1])
    if mode == "ext":
        bad = [torch.tensor([0, SLOTS], dtype=torch.int64)]
        with pytest.raises(ValueError, match="slot out of range"):
            run_rows(stack, h, bad, [1])
    assert _ext is not None


@pytest.mark.parametrize("act", ["q16", "q8"])
@pytest.mark.parametrize("threads", [2, 3])
def test_verify_rows_split_over_threads_keep_the_bits(mode: str, act: str, threads: int) -> None:
    """How decode_rows splits a step over its threads changes no bit: a 1 + 8 verify chain, tree rows of a second
    sequence and a third sequence's decode row, on a head layout like the default model's (3 kv heads of 2 query
    heads; D = 16, so a qkv chunk holds several k / v heads and one straddles the q | k boundary). At 2 and 3
    threads each qkv chunk stores the k / v heads it holds, each gate/up chunk quantizes its own act blocks, every
    thread quantizes all rows for itself, and a group's attention splits by kv heads and rows (3 heads on 2
    threads); every row must still get decode_stack's bits at 1 thread."""
    if mode == "ref":
        pytest.skip("the split is the kernel's")
    hidden, heads, kv_heads, head_dim, inter, slots = 64, 6, 3, 16, 96, 128
    gen = torch.Generator().manual_seed(11)
    layers = [make_layer(gen, "q4_1", hidden, heads, kv_heads, head_dim, inter, bias=i == 0) for i in range(2)]
    stack = DecodeStack(tuple(layers), tuple(torch.randn(slots, kv_heads, head_dim, generator=gen) for _ in layers),
                        tuple(torch.randn(slots, kv_heads, head_dim, generator=gen) for _ in layers))
    perm = torch.randperm(slots, generator=gen)
    a, b, c = perm[:49], perm[49:73], perm[80:87]  # chain: 40 cached + 9 new; tree: 20 + p, n1, n2, n3; decode: 7
    pre, p, n1, n2, n3 = b[:20], b[20:21], b[21:22], b[22:23], b[23:24]
    lists = [a[: 41 + j] for j in range(9)]
    lists += [torch.cat(x) for x in ([pre, p], [pre, p, n1], [pre, p, n2], [pre, p, n1, n3])] + [c]
    lists = [x.contiguous() for x in lists]
    positions = [40 + j for j in range(9)] + [20, 21, 21, 22, 6]
    from sgl.runtime.models.rotary import RotaryEmbedding

    r = RotaryEmbedding(head_dim, 10000.0, None, 4096)
    cos, sin = r.cos[positions].contiguous(), r.sin_signed[positions].contiguous()
    h = torch.randn(len(lists), hidden, generator=gen)
    ref, h_ref = clone(stack), h.clone()
    for t, slot_list in enumerate(lists):  # each token alone, 1 thread
        decode_stack(h_ref[t : t + 1], ref, cos[t], sin[t], slot_list, head_dim**-0.5, act=act)
    addrs = torch.tensor([x.data_ptr() for x in lists], dtype=torch.int64)
    lens = torch.tensor([x.numel() for x in lists], dtype=torch.int64)
    old = quant._threads
    try:
        cpu.set_num_threads(threads)
        decode_rows(h, stack, cos, sin, addrs, lens, head_dim**-0.5, act=act)
    finally:
        quant._threads = old
    assert_same(stack, ref, h, h_ref)


def packed_copy(layer: DecodeLayerWeights) -> DecodeLayerWeights:
    """The same layer whose four weights carry their q8 packed copies (QuantWeight.pack)."""
    from dataclasses import replace

    from sgl.kernels.cpu.quant import QuantWeight

    def with_copy(w: QuantWeight) -> QuantWeight:
        p = QuantWeight(w.qtype, w.shape, w.data)
        assert p.pack("q8")
        return p

    return replace(layer, qkv=with_copy(layer.qkv), o=with_copy(layer.o), gate_up=with_copy(layer.gate_up),
                   down=with_copy(layer.down))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_layer_copies_give_the_same_bits(mode: str, qtype: str, threads: int) -> None:
    """A stack whose layers' weights carry q8 packed copies (the table's last 4 columns) computes the bits of the same
    stack without them: a batch-1 step (decode_stack, and decode_layer for one layer), decode batches up to the row
    limits (decode_rows reads the copies) and past them (the GGUF rows); under q16 the copies are not read (the same
    bits as before). A copy the kernel read as GGUF rows, or GGUF rows read as a copy, would change every output."""
    if mode == "ref":
        pytest.skip("the copies are the kernel's")
    if not _ext.load().packed_ok(1):  # q8
        pytest.skip("no q8 packed kernel here (no AVX2): no packed copies")
    plain = make_stack(21, qtype)
    packed = DecodeStack(tuple(packed_copy(w) for w in plain.layers), plain.k_bufs, plain.v_bufs)
    assert all(a != 0 for w in packed.layers for a in w.packed_args)
    assert all(a == 0 for w in plain.layers for a in w.packed_args)
    gen = torch.Generator().manual_seed(3)
    old = quant._threads
    try:
        cpu.set_num_threads(threads)
        for act in ("q8", "q16"):
            for rows in (1, 2, 5, 8, 9, 12):
                lists, positions = scattered_rows(rows, gen)
                h = torch.randn(rows, HIDDEN, generator=gen)
                a, b = clone(plain), clone(packed)
                ha, hb = h.clone(), h.clone()
                cos, sin = rope(positions)
                addrs = torch.tensor([t.data_ptr() for t in lists], dtype=torch.int64)
                lens = torch.tensor([t.numel() for t in lists], dtype=torch.int64)
                if rows == 1:
                    decode_stack(ha, a, cos[0], sin[0], lists[0], HEAD_DIM**-0.5, act=act)
                    decode_stack(hb, b, cos[0], sin[0], lists[0], HEAD_DIM**-0.5, act=act)
                    assert_same(a, b, ha, hb)
                    # one layer alone (decode_layer: an EAGLE head's step) reads its packed_args too
                    decode_layer(ha, a.layers[0], cos[0], sin[0], a.k_bufs[0], a.v_bufs[0], lists[0], HEAD_DIM**-0.5,
                                 act=act)
                    decode_layer(hb, b.layers[0], cos[0], sin[0], b.k_bufs[0], b.v_bufs[0], lists[0], HEAD_DIM**-0.5,
                                 act=act)
                else:
                    decode_rows(ha, a, cos, sin, addrs, lens, HEAD_DIM**-0.5, act=act)
                    decode_rows(hb, b, cos, sin, addrs, lens, HEAD_DIM**-0.5, act=act)
                assert_same(a, b, ha, hb)
    finally:
        quant._threads = old
