"""GGUF block-quantized linear weights on the CPU: the weight type, its torch reference, the launcher.

Layout of `QuantWeight.data` (uint8, contiguous): exactly the GGUF bytes, N rows of K/32 blocks
(ggml-common.h), so `from_gguf` is a zero-copy view and `nbytes` is the file's size of the tensor:
    q8_0: 34 B/block = f16 d, int8 qs[32]            w[j] = d * qs[j]
    q4_0: 18 B/block = f16 d, u8 qs[16]              w[j] = d * ((qs[j] & 15) - 8), w[j+16] = d * ((qs[j] >> 4) - 8)
    q4_1: 20 B/block = f16 d, f16 m, u8 qs[16]       w[j] = d * (qs[j] & 15) + m,   w[j+16] = d * (qs[j] >> 4) + m
    f16:  2 B/weight, row-major [N, K]
The kernels read the blocks in place (the per-block f16 scales cost one F16C convert each).
Activations: "q16" (the process default, set_act_quant) quantizes x per 32-block to int16 for integer
dots; "none" is exact fp32 (summation order aside); "q8" quantizes x per 32-block to int8 (the cheapest
per extra row: vpdpbusd dots, ~1/254 of a block's max; batch-invariant at any row count, prefill included:
kernels/cpu/quant_q8_blocks.h).

`dequantize` performs the same float32 operations in the same order as runtime/models/dequant.py
(bit-identical; kernels/ may not import runtime/, hence the copy). `quantize` is round-to-nearest per
32-block as llama.cpp's quantize_row_*_ref, bit-identical to gguf.quants.quantize.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from sgl.kernels.cpu import _ext

QTYPES = ("q4_0", "q4_1", "q8_0", "f16")
BLOCK = 32
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
ACT_QUANT = ("none", "q16", "q8")
_ACT_MODE = {"none": 0, "q8": 1, "q16": 2}  # the extension's act_mode codes
# Rows (M) from which the launcher dequantizes to fp32 tiles and calls MKL instead of the fused kernel
# (measured by benchmarks/bench_kernels_cpu.py; see the README's "CPU kernels" table).
PREFILL_M = int(os.environ.get("SGL_CPU_PREFILL_M", "96"))
# Rows up to which act_quant="q16" applies (quant_q16_tile.h's kQ16MaxRows): each row then gets the same bits
# as alone (batch-invariant decode batches and speculative verify rows); more rows run fp32 activations.
Q16_MAX_ROWS = 64

PREFILL_TILE = 1024
_threads: int | None = None
_act_quant = "q16"  # quant_linear's activation mode when the call names none (set_act_quant)
# Whether that process default q16 also covers calls of 2..Q16_MAX_ROWS rows (set_q16_batches). Off: a call that
# names no mode runs q16 at M = 1 only and fp32 activations for batches, as before the q16 small-M GEMM. Why
# off, although the tile gives each row its M = 1 bits: q16's rounding to int16 amplifies ~1e-7 differences
# to ~1e-5, and a cached prompt's last token is recomputed by another attention kernel than its prefill's
# (the C++ decode kernel, not SDPA), so its K/V differ by ~1e-7; with q16 batches a seeded request drifted
# with the cache state (tests/e2e/test_server_openai.py's n/seed test, token 6 of the third choice), and a
# verify row's SDPA attention flipped a seeded NGRAM draw. Reusing the cached K/V of that token (and one
# attention kernel for verify rows and decode) would let it be on; it saves ~10% of the matmuls at 32 rows.
_q16_batches = False


def row_bytes(qtype: str, k: int) -> int:
    return 2 * k if qtype == "f16" else k // BLOCK * BLOCK_BYTES[qtype]


@dataclass(frozen=True)
class QuantWeight:
    """A [N out, K in] linear weight kept in a GGUF block format (layout: the module docstring)."""
    qtype: str
    shape: tuple[int, int]
    data: torch.Tensor  # uint8 [N, row_bytes(qtype, K)], contiguous
    # act mode -> the packed copy `pack` made: quant_linear and the fused decode kernels read it instead of `data`, the
    # same bits
    packed: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ValueError(f"qtype must be one of {QTYPES}, got {self.qtype!r}")
        n, k = self.shape
        if n <= 0 or k <= 0 or (self.qtype != "f16" and k % BLOCK):
            raise ValueError(f"shape (N, K) = {self.shape}: need N, K > 0 and K % 32 == 0 for {self.qtype}")
        want = (n, row_bytes(self.qtype, k))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want or not self.data.is_contiguous():
            raise ValueError(f"data must be contiguous uint8 {want}, got {self.data.dtype} "
                             f"{tuple(self.data.shape)} contiguous={self.data.is_contiguous()}")

    @staticmethod
    def from_gguf(raw: torch.Tensor | np.ndarray, qtype: str, shape: tuple[int, int]) -> "QuantWeight":
        """raw = the tensor's bytes as stored in the GGUF file (N rows of K/32 blocks); no copy if contiguous."""
        if qtype not in QTYPES:
            raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
        n, k = int(shape[0]), int(shape[1])
        if isinstance(raw, np.ndarray):
            with warnings.catch_warnings():  # a read-only np.memmap of the GGUF: the weight is never written
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(np.ascontiguousarray(raw))
        else:
            t = raw.contiguous()
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        if k <= 0 or (qtype != "f16" and k % BLOCK) or t.numel() != n * row_bytes(qtype, k):
            raise ValueError(f"raw has {t.numel()} bytes, not the {qtype} size of shape {shape}")
        return QuantWeight(qtype, (n, k), t.reshape(n, row_bytes(qtype, k)))

    @staticmethod
    def quantize(w: torch.Tensor, qtype: str) -> "QuantWeight":
        """w fp32 [N, K] -> round-to-nearest per 32-block (llama.cpp's quantize_row_*_ref)."""
        if w.dim() != 2:
            raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
        if qtype not in QTYPES:
            raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
        n, k = w.shape
        a = w.detach().to(torch.float32).contiguous().numpy()
        if qtype == "f16":
            return QuantWeight.from_gguf(a.astype(np.float16).view(np.uint8), qtype, (n, k))
        if k % BLOCK:
            raise ValueError(f"K = {k} must be a multiple of 32 for {qtype}")
        return QuantWeight.from_gguf(_QUANTIZE[qtype](a.reshape(-1, BLOCK)), qtype, (n, k))

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K], bit-identical to runtime/models/dequant.py."""
        data = self.data.numpy().reshape(-1)
        if self.qtype == "f16":
            out = data.view(np.float16).astype(np.float32)
        else:
            out = _DEQUANTIZE[self.qtype](data)
        return torch.from_numpy(out.reshape(self.shape))

    def nbytes(self) -> int:
        return self.data.numel()

    def pack(self, act_quant: str, out: torch.Tensor | None = None) -> bool:
        """Keep a packed copy for `act_quant` (`pack_weight`: "q8" any block type, "q16" Q8_0), which quant_linear and
        the fused decode kernels then read for up to Q16_MAX_ROWS rows: the same bits, 1.2-2x faster (most where loads
        bound the kernel: a batch-1 step's matmuls, short verify rows, a draft head's small weights; PACKED_ROWS_MEASURED).
        Costs the weight's bytes once more: in `out` if given (uint8, the shape of `data`: a slice of a huge-page arena,
        runtime/models/native_weights.py's pack_into_arena), else a fresh tensor. Whether a copy exists (False where it
        cannot run: another qtype or mode, no AVX-512 VNNI tiles)."""
        if act_quant not in self.packed:
            copy = pack_weight(self, act_quant, out)
            if copy is None:
                return False
            self.packed[act_quant] = copy
        return True


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> float32 [n, 32]: low nibbles are weights 0..15, high nibbles 16..31."""
    out = np.empty((qs.shape[0], 32), dtype=np.float32)
    np.bitwise_and(qs, 15, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    return out


def _dq_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, 34)
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    return out


def _dq_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, 18)
    out = _nibbles(blocks[:, 2:])
    out -= 8
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    return out


def _dq_q4_1(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, 20)
    out = _nibbles(blocks[:, 4:])
    out *= blocks[:, :2].view(np.float16).astype(np.float32)
    out += blocks[:, 2:4].view(np.float16).astype(np.float32)
    return out


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) without float error: floor(|x|) + (frac >= 0.5), signed."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [n, 32] values 0..15 -> [n, 16]: weight j in the low nibble, j + 16 in the high one."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d).astype(np.float32)


def _q_q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    qs = _roundf(b * _inv(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)


def _q_q4_0(b: np.ndarray) -> np.ndarray:
    imax = np.abs(b).argmax(axis=1)[:, None]  # the signed value of largest magnitude maps to -8
    d = np.take_along_axis(b, imax, axis=1) / np.float32(-8)
    q = np.trunc(b * _inv(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def _q_q4_1(b: np.ndarray) -> np.ndarray:
    hi, lo = b.max(axis=1, keepdims=True), b.min(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.trunc((b - lo) * _inv(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8),
                           _pack_nibbles(q)], axis=1)


_DEQUANTIZE = {"q8_0": _dq_q8_0, "q4_0": _dq_q4_0, "q4_1": _dq_q4_1}
_QUANTIZE = {"q8_0": _q_q8_0, "q4_0": _q_q4_0, "q4_1": _q_q4_1}


def _check(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, residual: torch.Tensor | None,
           out: torch.Tensor | None = None) -> None:
    if not isinstance(w, QuantWeight):
        raise ValueError(f"w must be a QuantWeight, got {type(w).__name__}")
    n, k = w.shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"x must be a 2-D float32 CPU tensor [M, K], got {x.dtype} {tuple(x.shape)} on {x.device}")
    if x.shape[1] != k:
        raise ValueError(f"x has K = {x.shape[1]} columns but the weight is (N, K) = {w.shape}")
    if x.shape[0] <= 0:
        raise ValueError("x must have M > 0 rows")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (x.shape[0], n)),
                           ("out", out, (x.shape[0], n))):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous float32 {shape}, got {t.dtype} {tuple(t.shape)}")


def quant_linear_reference(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: dequantize + torch.mm (+ bias) (+ residual)."""
    _check(x, w, bias, residual)
    y = torch.mm(x, w.dequantize().T)
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual
    return y


def quant_linear(x: torch.Tensor, w: QuantWeight, out: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 act_quant: str | None = None) -> torch.Tensor:
    """y = x @ w.dequantize().T (+ bias) (+ residual); x fp32 [M, K] contiguous -> fp32 [M, N].

    act_quant="q16" quantizes x (M <= Q16_MAX_ROWS rows; the process default only at M = 1 unless
    set_q16_batches(True)) per 32-block to int16
    (scale amax/32767) for int16 dot products: the affine part (Q4_1's m, Q4_0's -8) stays exact fp32 and the
    rest moves by <= ~1.5e-5 of the block's max |x|; ~2x fewer cycles per weight than fp32 activations at
    M = 1. Each row gets the same bits as alone (batch-invariant); more rows (prefill) and f16 weights run
    fp32 activations. act_quant="q8" quantizes x per 32-block to int8 (scale amax/127) for vpdpbusd dots:
    cheapest per extra row, ~1e-2 relative error; at any row count each row gets the bits of that row alone (the
    q8 contract, kernels/cpu/quant_q8_blocks.h; more than Q16_MAX_ROWS rows, prefill, run in blocks of that many).
    Tolerances: tests/kernels/test_cpu_quant.py.
    (Without the extension every mode runs the exact reference.) None: the process default (set_act_quant).
    `out` may alias `residual` (the sum is then done in place)."""
    if act_quant is None:
        act_quant = _act_quant
        if act_quant == "q16" and not _q16_batches and x.dim() == 2 and x.shape[0] > 1:
            act_quant = "none"  # batches run fp32 activations unless set_q16_batches(True) (see _q16_batches)
    ext = _ext.load()
    # The decode hot path (~120 calls per token): the cheapest checks that prove the full ones would pass.
    if (ext is not None and type(w) is QuantWeight and x.dtype is torch.float32 and x.dim() == 2
            and x.is_contiguous() and x.shape[1] == w.shape[1] and 0 < x.shape[0] < PREFILL_M
            and bias is None and x.is_cpu and act_quant in _ACT_MODE):
        m, n = x.shape[0], w.shape[0]
        if out is None:
            out = torch.empty(m, n, dtype=torch.float32)
        elif not (out.dtype is torch.float32 and out.shape == (m, n) and out.is_contiguous()):
            _check(x, w, bias, residual, out)
        if residual is not None and not (residual.dtype is torch.float32 and residual.shape == (m, n)
                                         and residual.is_contiguous()):
            _check(x, w, bias, residual, out)
        packed = w.packed.get(act_quant) if w.packed else None
        if packed is not None and (m <= Q16_MAX_ROWS or act_quant == "q8"):  # (q16 past it: fp32 activations)
            return _gemm_packed(ext, x, w, packed, out, residual, act_quant, _threads or torch.get_num_threads())
        if m == 1 and act_quant in _GEMV_ACT and w.qtype in _GEMV_QTYPE and _has_gemv(ext):
            # one row (batch-1 decode, the lm_head): the decode pool's gemv, the same bits as gemm's path
            ext.gemv(x.data_ptr(), w.data.data_ptr(), _GEMV_QTYPE[w.qtype], n, w.shape[1], out.data_ptr(), 0,
                     0 if residual is None else residual.data_ptr(), _threads or torch.get_num_threads(),
                     _ACT_MODE[act_quant])
            return out
        ext.gemm(x.data_ptr(), m, w.data.data_ptr(), w.qtype, n, w.shape[1], out.data_ptr(), 0,
                 0 if residual is None else residual.data_ptr(), _ACT_MODE[act_quant],
                 _threads or torch.get_num_threads())
        return out
    _check(x, w, bias, residual, out)
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    if ext is None:
        y = quant_linear_reference(x, w, bias, residual)
        if out is None:
            return y
        return out.copy_(y)
    m, (n, k) = x.shape[0], w.shape
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    threads = get_num_threads()
    packed = w.packed.get(act_quant) if w.packed and bias is None else None
    if packed is not None and act_quant == "q8":  # prefill under q8 from the copy too, in blocks of Q16_MAX_ROWS rows
        return _gemm_packed(ext, x, w, packed, out, residual, act_quant, threads)
    if m < PREFILL_M or (act_quant == "q8" and w.qtype != "f16"):  # q8: its contract at any M (prefill included)
        ext.gemm(x.data_ptr(), m, w.data.data_ptr(), w.qtype, n, k, out.data_ptr(),
                 0 if bias is None else bias.data_ptr(), 0 if residual is None else residual.data_ptr(),
                 _ACT_MODE[act_quant], threads)
        return out
    if PREFILL_WHOLE and n * k <= PREFILL_WHOLE_MAX:
        # Prefill, a layer-sized weight: dequantize it whole into a reused per-thread scratch, then ONE MKL
        # call writing `out` directly (residual fused by addmm): no per-tile output copies, no fresh
        # multi-MB allocation (page faults) per call.
        wf = _scratch(n * k).view(n, k)
        ext.dequant(w.data.data_ptr(), w.qtype, n, k, wf.data_ptr(), threads)
        if residual is None:
            torch.mm(x, wf.T, out=out)
        elif residual.data_ptr() == out.data_ptr():
            out.addmm_(x, wf.T)
        else:
            torch.addmm(residual, x, wf.T, out=out)
        if bias is not None:
            out += bias
        return out
    # Prefill, a large weight (the lm_head of a big vocabulary): MKL on fp32 tiles of PREFILL_TILE output rows.
    scratch = _scratch(min(n, PREFILL_TILE) * k).view(-1, k)
    for n0 in range(0, n, PREFILL_TILE):
        n1 = min(n, n0 + PREFILL_TILE)
        tile = scratch[: n1 - n0]
        ext.dequant(w.data[n0:n1].data_ptr(), w.qtype, n1 - n0, k, tile.data_ptr(), threads)
        y = torch.mm(x, tile.T)
        if bias is not None:
            y += bias[n0:n1]
        if residual is not None:
            y += residual[:, n0:n1]
        out[:, n0:n1] = y
    return out


def _gemm_packed(ext: object, x: torch.Tensor, w: QuantWeight, packed: torch.Tensor, out: torch.Tensor,
                 residual: torch.Tensor | None, act_quant: str, threads: int) -> torch.Tensor:
    """out = x @ w^T (+ residual) from w's packed copy, in blocks of Q16_MAX_ROWS rows (gemm_packed's most): each row's
    bits are its bits alone in both modes' contracts, so the blocks change none. out may alias residual."""
    n, k = w.shape
    for r0 in range(0, x.shape[0], Q16_MAX_ROWS):
        r1 = min(x.shape[0], r0 + Q16_MAX_ROWS)
        ext.gemm_packed(x[r0:r1].data_ptr(), r1 - r0, packed.data_ptr(), w.qtype, n, k, out[r0:r1].data_ptr(),
                        0 if residual is None else residual[r0:r1].data_ptr(), _ACT_MODE[act_quant], threads)
    return out


# PACKED_ROWS_MEASURED: a packed copy is read for every call of up to Q16_MAX_ROWS rows (gemm_packed's limit), as it is
# faster at every row count measured (1 thread, cold, GGUF rows / packed ms, median of 9 passes; a tile of 4 or more
# rows prefetches every cache line of a record, quant_q16_zmm.h's kPrefetchAllRows): the default model's 120 layer
# weights (Q4_1) with its lm_head, q8: 1 row 10.04 / 5.13, 4 rows 11.25 / 5.87, 8 rows 13.78 / 9.76, 16 rows 25.70 /
# 19.23, 64 rows 103.9 / 85.3; the lm_head (Q8_0), q16: 1 row 3.54 / 1.37, 4 rows 3.04 / 2.27, 8 rows 4.59 / 4.16,
# 12 rows 7.66 / 7.18, 32 rows 20.2 / 15.8 (16 rows 8.96 / 9.79: the machine's spread).


def pack_weight(w: QuantWeight, act_quant: str, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The packed copy of a block weight for quant_linear under `act_quant` (QuantWeight.pack keeps it), the same bytes
    reordered and as many, written to `out` (uint8, w.data's shape) or a new tensor: "q8": 8 rows' block b as one
    record (quant_q8_zmm.h's pack_oct; q4_0, q4_1, q8_0); "q16": 4 rows' (quant_q16_zmm.h's kQuadRecord; q8_0). Rows
    past the last whole group stay GGUF rows. None where it would not run: another qtype or mode, fewer rows than a
    group, no extension or no AVX-512 VNNI tiles."""
    if not can_pack(w, act_quant):
        return None
    n, k = w.shape
    if out is None:
        out = torch.empty_like(w.data)
    elif out.dtype != torch.uint8 or out.shape != w.data.shape or not out.is_contiguous():
        raise ValueError(f"out must be contiguous uint8 {tuple(w.data.shape)}, got {out.dtype} {tuple(out.shape)}")
    _ext.load().pack_weight(w.data.data_ptr(), w.qtype, n, k, out.data_ptr(), _ACT_MODE[act_quant])
    return out


def can_pack(w: QuantWeight, act_quant: str) -> bool:
    """Whether pack_weight makes a copy of `w` for `act_quant` here (its block type and mode, a whole group of rows,
    the extension's kernels for the mode: q8 AVX2 or AVX-512 VNNI, q16 AVX-512 VNNI)."""
    ext = _ext.load()
    return (w.qtype in PACKED_QTYPES.get(act_quant, ()) and ext is not None and hasattr(ext, "pack_weight")
            and ext.packed_ok(_ACT_MODE[act_quant]) and w.shape[0] >= ext.packed_group(_ACT_MODE[act_quant]))


PACKED_QTYPES = {"q8": ("q4_0", "q4_1", "q8_0"), "q16": ("q8_0",)}  # the block types pack_weight packs per mode
_GEMV_QTYPE = {"q4_0": 0, "q4_1": 1, "q8_0": 2}  # decode_layer.cpp's qtype codes
_GEMV_ACT = ("q16", "q8")  # the act modes of the fused kernels (decode_common.h's act_mode)


def _has_gemv(ext: object) -> bool:
    # An extension built before decode_layer.cpp existed has no gemv: gemm serves (the same numbers).
    return hasattr(ext, "gemv")


PREFILL_WHOLE = True  # (a switch for benchmarks/bench_kernels_cpu.py's comparison)
PREFILL_WHOLE_MAX = 4 << 20  # weights up to 4M elements (16 MB fp32) are dequantized whole
_tls = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer of >= numel elements, grown on demand and reused across calls."""
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _tls.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def release_scratch() -> int:
    """Drop the calling thread's prefill scratch (the next prefill allocates it again); returns its bytes.

    NOTE: it is as large as the largest layer weight in fp32 (the default model's gate_up: 7 MB) and would
    otherwise stay resident for the life of the thread; the engine drops it when it goes idle."""
    buf = getattr(_tls, "buf", None)
    _tls.buf = None
    return 0 if buf is None else buf.numel() * buf.element_size()


def extension_available() -> bool:
    """True when the compiled extension loaded (and SGL_DISABLE_CPU_EXT is not set)."""
    return _ext.load() is not None


def set_num_threads(n: int) -> None:
    """Threads the kernel splits output columns over (default: torch.get_num_threads())."""
    global _threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {n!r}")
    _threads = n


def set_act_quant(mode: str) -> None:
    """The activation mode quant_linear uses when a call names none ("none" = exact fp32, "q16", "q8")."""
    global _act_quant
    if mode not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {mode!r}")
    _act_quant = mode


def get_act_quant() -> str:
    return _act_quant


@contextlib.contextmanager
def exact_activations() -> Iterator[None]:
    """set_act_quant("none") for the block, the previous mode restored after it (also when it raises)."""
    mode = _act_quant
    set_act_quant("none")
    try:
        yield
    finally:
        set_act_quant(mode)


def set_q16_batches(on: bool) -> None:
    """Whether the default q16 mode also applies to calls of 2..Q16_MAX_ROWS rows (off by default: see
    _q16_batches). A call naming act_quant="q16" always gets it."""
    global _q16_batches
    _q16_batches = bool(on)


def get_num_threads() -> int:
    return _threads if _threads is not None else torch.get_num_threads()
