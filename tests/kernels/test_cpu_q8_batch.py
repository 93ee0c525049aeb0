"""The q8 block-dot contract (kernels/cpu/quant_q8_blocks.h) of quant_linear(act_quant="q8") at any row count
(prefill in blocks of Q16_MAX_ROWS): the integer block dots are exact (vpdpbusd with Q8_0's weights shifted to
unsigned and shifted back), the result stays within the int8 rounding bound of the exact product, every row of a
batch gets the SAME BITS as that row alone (M = 1: the decode pool's gemv) for every block type and thread split,
and the AVX-512 VNNI tile, its tail columns (the scalar kernel) and the per-row AVX2 kernel (what an AVX2-only
CPU runs) agree bit for bit (the --scalar build runs these tests on the scalar kernel alone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgl.kernels.cpu import QuantWeight, quant_linear
from sgl.kernels.cpu.quant import BLOCK_BYTES, Q16_MAX_ROWS
from tests.kernels.test_cpu_q16_batch import ext  # noqa: F401  (the skip fixture)
from tests.kernels.test_cpu_q16_batch import outputs_with_and_without_tile, raw_weight, with_threads

QTYPES = ["q4_0", "q4_1", "q8_0"]


def unit_scale_weight(qtype: str, n: int, k: int, gen: np.random.Generator) -> tuple[QuantWeight, torch.Tensor]:
    """Random blocks with d = 1 (and Q4_1's m = 0), columns 0 and 1 at the integer extremes; -> (the weight, its
    integers [n, k] as int64: the nibble - 8 for Q4_0, the nibble for Q4_1, the signed byte for Q8_0)."""
    nb = n * k // 32
    raw = gen.integers(0, 256, size=(nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    raw[:, 0:2] = np.float16(1.0).reshape(1, 1).view(np.uint8)
    hdr = 2
    if qtype == "q4_1":
        raw[:, 2:4] = np.float16(0.0).reshape(1, 1).view(np.uint8)
        hdr = 4
    per_row = k // 32
    raw[:per_row, hdr:] = 0xFF if qtype != "q8_0" else 0x80  # nibbles 15 / bytes -128
    raw[per_row : 2 * per_row, hdr:] = 0x00 if qtype != "q8_0" else 0x7F  # nibbles 0 / bytes 127
    w = QuantWeight.from_gguf(raw.reshape(n, -1), qtype, (n, k))
    if qtype == "q8_0":
        ints = raw[:, 2:].view(np.int8).astype(np.int64)
    else:
        qs = raw[:, hdr:].astype(np.int64)
        ints = np.concatenate([qs & 15, qs >> 4], axis=1) - (8 if qtype == "q4_0" else 0)
    return w, torch.from_numpy(ints.reshape(n, k))


@pytest.mark.parametrize("qtype", QTYPES)
def test_the_integer_block_dots_are_exact(qtype: str) -> None:
    """With d = 1 and x integers whose every block holds +-127 (so the int8 scale is exactly 1 and q = x), the
    contract's output is the exact integer dot (Q4_0's -8 term is the exact fp32 block sum): any lost or doubled
    product, or a wrong Q8_0 shift-back, shows. M = 1 (gemv) and 9 (the tile), N = 11 (4-column tiles + tail)."""
    gen = np.random.default_rng(3)
    n, k = 11, 160
    w, ints = unit_scale_weight(qtype, n, k, gen)
    for m in (1, 9):
        x = gen.integers(-127, 128, size=(m, k)).astype(np.int64)
        x[:, ::32] = 127
        x[0, :32] = 127  # a constant block at the int8 maximum
        x[-1, 32:64] = -127  # and the minimum (with the byte -128 weights: the extreme products)
        x[-1, 32] = 127
        want = (torch.from_numpy(x) @ ints.T).to(torch.float32)  # |y| < 2^24: exact in fp32
        got = quant_linear(torch.from_numpy(x.astype(np.float32)), w, act_quant="q8")
        assert torch.equal(got, want), (qtype, m, (got - want).abs().max().item())


@pytest.mark.parametrize("qtype", QTYPES)
def test_q8_is_within_the_int8_rounding_bound(qtype: str) -> None:
    """|y - x @ W^T| <= sum over blocks b of amax_b / 254 * ||w_b||_1 (each x_j moves by at most half a step,
    amax_b / 254), plus fp32 summation slop; and the mode really is q8 (its error is larger than q16's)."""
    gen = np.random.default_rng(4)
    n, k, m = 67, 256, 9
    w = raw_weight(qtype, n, k, gen)
    x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
    x[0, :32] = 0.0
    x[-1, 32:64] *= 1e3
    wd = w.dequantize().double()
    exact = x.double() @ wd.T
    amax = x.double().abs().view(m, k // 32, 32).amax(-1)  # [m, nb]
    wl1 = wd.abs().view(n, k // 32, 32).sum(-1)  # [n, nb]
    bound = amax / 254 @ wl1.T + 1e-5 * (x.double().abs() @ wd.abs().T)
    for rows in (slice(0, 1), slice(0, m)):
        y = quant_linear(x[rows].contiguous(), w, act_quant="q8").double()
        err = (y - exact[rows]).abs()
        assert (err <= bound[rows]).all(), (qtype, (err / bound[rows]).max().item())
    e8 = (quant_linear(x, w, act_quant="q8").double() - exact).abs().max()
    e16 = (quant_linear(x, w, act_quant="q16").double() - exact).abs().max()
    assert e8 > 10 * e16


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", QTYPES)
def test_every_row_of_a_batch_has_the_bits_of_that_row_alone(qtype: str, threads: int) -> None:
    gen = np.random.default_rng(12)
    for n, k in ((301, 96), (67, 1536)):  # a 2-thread split at column 151: not a multiple of 4
        w = raw_weight(qtype, n, k, gen)
        bias = torch.from_numpy(gen.standard_normal(n).astype(np.float32))
        for m in (2, 9, 17, Q16_MAX_ROWS, 130):  # 130: prefill (the prefill path's size), blocks of 64 rows
            x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
            x[0, :32] = 0.0  # an all-zero block (scale 0)
            x[-1, 32:64] *= 1e4  # outliers in one block
            resid = torch.from_numpy(gen.standard_normal((m, n)).astype(np.float32))

            def run(rows: slice, use_bias: bool) -> torch.Tensor:
                return quant_linear(x[rows].contiguous(), w, bias=bias if use_bias else None,
                                    residual=resid[rows].clone(), act_quant="q8")

            for use_bias in (False, True):
                batch = with_threads(threads, lambda: run(slice(0, m), use_bias))
                for i in range(m):
                    alone = with_threads(threads, lambda: run(slice(i, i + 1), use_bias))
                    assert torch.equal(batch[i], alone[0]), (qtype, n, k, m, i, use_bias)


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_column_has_the_same_bits_in_the_tile_and_the_tail(qtype: str) -> None:
    """Dropping the first `off` weight rows moves every column between the 4-column vector kernel and the scalar
    statement of the contract (the < 4 tail columns): its bits must not change. Extreme blocks included."""
    gen = np.random.default_rng(22)
    n, k = 11, 160
    w, _ = unit_scale_weight(qtype, n, k, gen)
    raw = w.data.numpy()
    scaled = raw_weight(qtype, n, k, gen).data.numpy().copy()  # real scales, the extreme integers of w
    hdr = 4 if qtype == "q4_1" else 2
    for b in range(k // 32):
        o = b * BLOCK_BYTES[qtype]
        scaled[:2, o + hdr : o + BLOCK_BYTES[qtype]] = raw[:2, o + hdr : o + BLOCK_BYTES[qtype]]
    for m in (1, 9):
        x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
        x[0, :32] = 3.0  # a constant block: every int8 at 127
        x[-1, 32:64] = -2.0  # and at -127
        full = quant_linear(x, QuantWeight.from_gguf(scaled, qtype, (n, k)), act_quant="q8")
        for off in (1, 2, 3):
            part = QuantWeight.from_gguf(np.ascontiguousarray(scaled[off:]), qtype, (n - off, k))
            assert torch.equal(quant_linear(x, part, act_quant="q8"), full[:, off:]), (qtype, m, off)


def test_the_per_row_path_gives_the_tiles_bits() -> None:
    """A CPU without AVX-512 VNNI (or SGL_CPU_Q16_NO_TILE=1) runs the rows one at a time through the AVX2
    4-column kernel (and the scalar one for the < 4 tail columns: N = 70); this one runs the VNNI tile. The same
    bits, M = 1 and a batch, every block type."""
    tile, rows = outputs_with_and_without_tile("q8", 8, (1, 9))
    assert "avx512-vnni" not in rows["isa"]  # the override took the per-row path
    if "avx512-vnni" not in tile["isa"]:
        pytest.skip("this CPU has no AVX-512 VNNI: both runs took the per-row path")
    for a, b in zip(tile["outs"], rows["outs"]):
        assert torch.equal(a, b)
