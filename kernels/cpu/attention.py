"""Decode attention on the CPU (one query token per sequence over the paged KV pool): launcher + reference.

`decode_attention(q, k_buf, v_buf, slots, lens, scale)`: q [B, H, D] fp32, k_buf/v_buf [num_slots, Hkv, D]
fp32 or fp16 (the pool of `--kv-cache-dtype fp16`: read widened to fp32, exactly), slots [B, Lmax] int64 (row b attends to the keys in its first lens[b] slots; the rest is padding and
never read), lens [B] int64 -> [B, H, D]. Query head h reads kv head h // (H // Hkv).
The C++ kernel (decode_attention.cpp) runs where the extension is built; `decode_attention_reference`
(gather + softmax in torch) is the oracle of tests/kernels/test_cpu_attention.py and the fallback.
"""

from __future__ import annotations

import torch

from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.quant import get_num_threads

KV_DTYPES = (torch.float32, torch.float16)  # the KV pool element types the C++ kernels read and write


def kv_half(k_buf: torch.Tensor) -> int:
    """The kernels' KV element flag: 1 for an fp16 pool, 0 for fp32."""
    return int(k_buf.dtype == torch.float16)


def _check(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor) -> None:
    for name, t, dtypes in (("q", q, (torch.float32,)), ("k_buf", k_buf, KV_DTYPES), ("v_buf", v_buf, KV_DTYPES)):
        if t.dtype not in dtypes or t.dim() != 3 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous 3-D {' or '.join(map(str, dtypes))} CPU tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
    b, h, d = q.shape
    if k_buf.dtype != v_buf.dtype or k_buf.shape != v_buf.shape or k_buf.shape[2] != d or h % k_buf.shape[1]:
        raise ValueError(f"k_buf/v_buf must be [slots, Hkv, {d}] with H % Hkv == 0, got {tuple(k_buf.shape)}, "
                         f"{tuple(v_buf.shape)} for q {tuple(q.shape)}")
    if slots.dtype != torch.int64 or slots.dim() != 2 or slots.shape[0] != b or not slots.is_contiguous():
        raise ValueError(f"slots must be contiguous int64 [B={b}, Lmax], got {slots.dtype} {tuple(slots.shape)}")
    if lens.dtype != torch.int64 or tuple(lens.shape) != (b,) or not lens.is_contiguous():
        raise ValueError(f"lens must be contiguous int64 [B={b}], got {lens.dtype} {tuple(lens.shape)}")


def decode_attention_reference(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The oracle: per row, gather its K/V, softmax(q k^T * scale) v with GQA by repeating kv heads."""
    _check(q, k_buf, v_buf, slots, lens)
    group = q.shape[1] // k_buf.shape[1]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lens[b])
        k = k_buf[slots[b, :n]].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_buf[slots[b, :n]].float().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * scale, dim=-1)  # [H, n]
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, check: bool = True) -> torch.Tensor:
    """[B, H, D] attention outputs (layout: the module docstring). check=False skips the shape checks
    (the caller built the tensors itself, e.g. sgl.kernels.dispatch from AttentionMetadata); the kernel
    still rejects out-of-range lengths and slots."""
    ext = _ext.load()
    if check or ext is None:
        _check(q, k_buf, v_buf, slots, lens)
    if ext is None:
        return decode_attention_reference(q, k_buf, v_buf, slots, lens, scale)
    b, h, d = q.shape
    out = torch.empty_like(q)
    ext.decode_attention(q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), slots.data_ptr(), lens.data_ptr(),
                         out.data_ptr(), b, h, k_buf.shape[1], d, slots.shape[1], k_buf.shape[0], float(scale),
                         kv_half(k_buf), get_num_threads())
    return out
