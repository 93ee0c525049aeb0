"""Dequantization of the block types Gemma 3's GGUF uses (Q5_0, Q4_K, Q6_K; Q8_0 beside them) is
bit-identical to gguf.quants, the reference transformers' GGUF loader uses too.

Blocks are random bytes with finite random float16 scales, so every bit pattern of the packed fields occurs.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from sgl.runtime.models.dequant import dequantize

# where each block's float16 scale(s) sit (byte offsets)
F16_FIELDS = {Q.Q5_0: (0,), Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
              Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_bit_identical_to_gguf_quants(qtype: Q) -> None:
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = 24, 4 * 256
    n_blocks = rows * cols // block
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = rng.uniform(-2, 2, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, -1)
    want = gguf_dequantize(raw, qtype).reshape(rows, cols)
    got = dequantize(raw, qtype, (rows, cols))
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
