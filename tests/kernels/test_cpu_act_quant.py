"""The activations' quantization (q8: int8 per 32-block, quant_q8_blocks.h; q16: int16, quant_q16.h) gives the
scalar contract's values in whichever quantizer the build runs (AVX-512, AVX2 or scalar), read back bit for bit
through weights that copy them out: an identity (y_c = q_c * d, one fp32 rounding), Q4_0's identity (nibble 9 at
column c, 8 elsewhere: the -8 corrections c_l must cancel exactly) and Q4_1 with m = 1 on zero nibbles (y = the
blocks' sum terms s, summed in block order). Ties (x / d = k + 1/2 round to even), an all-zero block, outliers and
the clamp are in x. M = 1 (gemv), 9 (a tile) and, q8, 70 (prefill, in blocks of Q16_MAX_ROWS; q16 runs fp32 there)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from sgl.kernels.cpu import QuantWeight, quant_linear
from sgl.kernels.cpu.quant import Q16_MAX_ROWS
from tests.kernels.test_cpu_q16_batch import ext  # noqa: F401  (the skip fixture)

K = 96  # 3 blocks
QMAX = {"q8": 127, "q16": 32767}
ROWS = {"q8": (1, 9, Q16_MAX_ROWS + 6), "q16": (1, 9)}
F16_ONE = np.float16(1.0).reshape(1).view(np.uint8)


def activations(m: int, qmax: int, gen: np.random.Generator) -> np.ndarray:
    x = gen.standard_normal((m, K)).astype(np.float32)
    x[0, :32] = 0.0  # scale 0
    x[-1, 32:64] *= 1e4  # outliers
    x[m // 2, 64:96] = gen.integers(-qmax, qmax, 32) + 0.5  # amax = qmax - 0.5 or so: ties near every step
    x[m // 2, 64] = qmax  # the scale exactly 1, so x / d = k + 1/2 exactly: round to even
    return x


def scales(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (d [M, nb], q [M, K]) as the scalar quantizer computes them, in fp32."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(xb).max(-1) / np.float32(qmax)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)  # 1 / d in fp32, 0 for a zero block
    q = np.clip(np.rint(xb * inv[..., None]), -qmax, qmax).astype(np.float32)  # rint: half to even
    return d, q.reshape(x.shape)


def weight(qtype: str, cell: Callable[[int, int], np.ndarray]) -> QuantWeight:
    """A [K, K] weight of unit-scale blocks; cell(c, b) -> block b of column c's bytes after the header."""
    rows = []
    for c in range(K):
        blocks = []
        for b in range(K // 32):
            head = np.concatenate([F16_ONE, F16_ONE]) if qtype == "q4_1" else F16_ONE  # d = 1 (and m = 1)
            blocks.append(np.concatenate([head, cell(c, b)]))
        rows.append(np.concatenate(blocks))
    return QuantWeight.from_gguf(np.stack(rows).astype(np.uint8), qtype, (K, K))


def identity_q8_0(c: int, b: int) -> np.ndarray:
    body = np.zeros(32, np.uint8)
    if c // 32 == b:
        body[c % 32] = 1
    return body


def identity_q4_0(c: int, b: int) -> np.ndarray:
    nib = np.full(32, 8, np.uint8)  # weight = nibble - 8
    if c // 32 == b:
        nib[c % 32] = 9
    return (nib[:16] | (nib[16:] << 4)).astype(np.uint8)  # GGUF: byte j holds weights j (low) and j + 16 (high)


@pytest.mark.parametrize("act", ["q8", "q16"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_the_quantized_values_and_scales_are_the_contracts(act: str, qtype: str) -> None:
    if act == "q16" and qtype == "q4_0":
        pytest.skip("q16's Q4_0 -8 term is the exact fp32 sum, not a correction of the integers")
    gen = np.random.default_rng(7)
    w = weight(qtype, identity_q8_0 if qtype == "q8_0" else identity_q4_0)
    for m in ROWS[act]:
        x = activations(m, QMAX[act], gen)
        d, q = scales(x, QMAX[act])
        want = (q.reshape(m, -1, 32) * d[..., None]).reshape(m, K).astype(np.float32)  # one fp32 rounding
        got = quant_linear(torch.from_numpy(x), w, act_quant=act).numpy()
        assert np.array_equal(got, want), (act, qtype, m, np.abs(got - want).max())


@pytest.mark.parametrize("act", ["q8", "q16"])
def test_the_block_sum_terms_are_the_contracts(act: str) -> None:
    """Q4_1 with m = 1 and zero nibbles: y = sum over blocks (in order) of the block's sum term, q8's d * float(sum
    of q) (one rounding), q16's exact fp32 sum of x in order j = 0..31."""
    gen = np.random.default_rng(8)
    w = weight("q4_1", lambda c, b: np.zeros(16, np.uint8))
    for m in ROWS[act]:
        x = activations(m, QMAX[act], gen)
        d, q = scales(x, QMAX[act])
        want = np.zeros(m, np.float32)
        for r in range(m):
            acc = np.float32(0)
            for b in range(K // 32):
                if act == "q8":
                    term = np.float32(d[r, b] * np.float32(q[r, 32 * b : 32 * b + 32].sum()))
                else:
                    term = np.float32(0)
                    for v in x[r, 32 * b : 32 * b + 32]:
                        term = np.float32(term + v)
                acc = np.float32(acc + term)
            want[r] = acc
        got = quant_linear(torch.from_numpy(x), w, act_quant=act).numpy()
        assert np.array_equal(got, np.repeat(want[:, None], K, 1)), (act, m, np.abs(got - want[:, None]).max())
