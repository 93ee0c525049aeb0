"""Kernel dispatch: the Triton kernel where the tensors are on a CUDA device and triton imports,
the torch reference (which is the CPU path) everywhere else. The runtime calls kernels through here.

Triton modules are imported lazily, on the first CUDA call, so `sgl.kernels` imports without triton.
`SGL_DISABLE_TRITON=1` forces the torch references on CUDA too (to bisect a numerical difference).

    >>> import torch
    >>> logits = torch.zeros(1, 4)                            # CPU: the torch reference runs
    >>> apply_token_bitmask_(logits, torch.tensor([[0b0010]], dtype=torch.int32))
    >>> logits.tolist()
    [[-inf, 0.0, -inf, -inf]]
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Sequence

import torch

from sgl.kernels import attention as _attention_ref
from sgl.kernels import bitmask as _bitmask_ref
from sgl.kernels.attention import AttentionMetadata
from sgl.kernels.cpu import _ext as _cpu_ext
from sgl.kernels.cpu import attention as _cpu_attention


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports and `SGL_DISABLE_TRITON` is not set to 1."""
    if os.environ.get("SGL_DISABLE_TRITON", "0") == "1":
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # NOTE: not only ImportError: a broken triton install must not break the CPU path
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel over `t` runs in Triton: `t` on a CUDA device (also ROCm) and triton available."""
    return t.is_cuda and triton_available()


def paged_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """`sgl.kernels.attention.paged_attention` (same arguments and result), in Triton on CUDA."""
    if use_triton(q) and not any(seg.tree for seg in meta.extends):
        # NOTE: tree masks (speculative verification) take the torch reference below: the Triton extend
        # kernel only knows causal masks
        from sgl.kernels import triton_attention

        return triton_attention.paged_attention(q, k_buf, v_buf, meta, scale)
    d = meta.decode
    if (d is not None and d.rows is None and d.lens is not None and q.dtype == torch.float32
            and k_buf.dtype in _cpu_attention.KV_DTYPES and q.device.type == "cpu" and k_buf.is_contiguous()
            and v_buf.is_contiguous() and _cpu_ext.load() is not None):
        # a pure decode step on the CPU: the C++ kernel (one call instead of ~10 small torch ops per layer)
        return _cpu_attention.decode_attention(q.contiguous(), k_buf, v_buf, d.slots.view(d.batch_size, d.max_len),
                                               d.lens, scale, check=False)
    return _attention_ref.paged_attention(q, k_buf, v_buf, meta, scale)


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: Optional[Sequence[int]] = None
) -> None:
    """`sgl.kernels.bitmask.apply_token_bitmask_` (same arguments and semantics), in Triton on CUDA."""
    if use_triton(logits):
        from sgl.kernels import triton_bitmask

        triton_bitmask.apply_token_bitmask_(logits, bitmask, indices)
        return
    _bitmask_ref.apply_token_bitmask_(logits, bitmask, indices)


def store_kvcache(
    k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k_pool[slots] = k, v_pool[slots] = v (cast to the pool dtype). k_pool, v_pool: [num_slots, Hkv, D];
    slots: [T] int64; k, v: [T, Hkv, D]. The torch reference is `index_copy_`."""
    if use_triton(k_pool):
        from sgl.kernels import triton_kv_store

        head_dim = k.shape[-1]
        # the kernel copies one flat [Hkv * D] row per token: other layouts are copied first
        k = k if k.stride(-1) == 1 and k.stride(-2) == head_dim else k.contiguous()
        v = v if v.stride(-1) == 1 and v.stride(-2) == head_dim else v.contiguous()
        triton_kv_store.store_kvcache(k_pool, v_pool, slots, k, v)
        return
    k_pool.index_copy_(0, slots, k.to(k_pool.dtype))
    v_pool.index_copy_(0, slots, v.to(v_pool.dtype))
