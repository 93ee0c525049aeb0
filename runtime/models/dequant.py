"""Whole-tensor numpy dequantization of the GGML block formats the default model uses.

`gguf.quants.dequantize` is the reference; it works on groups of 16 rows and costs ~2.5 s for
SmolLM2's 135M weights. These do each tensor in a few whole-array passes (~0.4 s in total) and give
bit-identical results (same float32 operations in the same order). Other types fall back to gguf.

Block layouts (ggml-common.h), 32 weights per block, `d`/`m` are float16:
    Q8_0: d, int8 qs[32]                       x[j] = d * qs[j]
    Q4_0: d, uint8 qs[16]                      x[j] = d * ((qs[j] & 15) - 8), x[j+16] = d * ((qs[j] >> 4) - 8)
    Q4_1: d, m, uint8 qs[16]                   x[j] = d * (qs[j] & 15) + m,   x[j+16] = d * (qs[j] >> 4) + m
    Q5_0: d, uint32 qh, uint8 qs[16]           x[j] = d * ((qs[j] & 15 | bit j of qh << 4) - 16),
                                               x[j+16] = d * ((qs[j] >> 4 | bit j+16 of qh << 4) - 16)
Q4_K and Q6_K (256-weight super-blocks, Gemma 3's GGUF) go through `gguf.quants` on the whole tensor at
once (its block code is already whole-array numpy; tests/runtime/test_gguf_loader.py checks every type).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> float32 [n, 32]: low nibbles are weights 0..15, high nibbles 16..31."""
    out = np.empty((qs.shape[0], 32), dtype=np.float32)
    np.bitwise_and(qs, 15, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    return out


def _q8_0(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, 34)
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    return out


def _q4_0(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, 18)
    out = _nibbles(blocks[:, 2:])
    out -= 8
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    return out


def _q4_1(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, 20)
    out = _nibbles(blocks[:, 4:])
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    out += blocks[:, 2:4].view(np.float16).astype(np.float32)
    return out


def _q5_0(data: np.ndarray) -> np.ndarray:
    # ~3x gguf.quants' version: the 32 high bits unpacked in one pass instead of 32 uint32 shifts
    blocks = data.reshape(-1, 22)
    high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")  # [n, 32]: bit j of the little-endian qh
    out = _nibbles(blocks[:, 6:])
    out += high * np.float32(16)
    out -= 16  # exact small integers so far; then the one float32 product gguf computes
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    return out


_FAST = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0}


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF tensor bytes (uint8, any shape) -> a new, writable float32 array of `shape`.

    >>> import numpy as np
    >>> raw = np.array([0, 60, 0, 0] + [0x21] * 16, dtype=np.uint8)   # Q4_1: d = 1.0, m = 0.0
    >>> dequantize(raw, Q.Q4_1, (32,))[[0, 16]].tolist()
    [1.0, 2.0]
    """
    data = np.ascontiguousarray(data).reshape(-1)
    if qtype == Q.F32:
        out = data.view(np.float32).copy()
    elif qtype == Q.F16:
        out = data.view(np.float16).astype(np.float32)
    elif qtype == Q.BF16:
        out = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype in _FAST:
        out = _FAST[qtype](data)
    else:
        out = np.array(gguf_dequantize(data.reshape(1, -1), qtype), dtype=np.float32)
    return out.reshape(shape)
