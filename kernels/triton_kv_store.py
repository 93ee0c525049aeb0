"""Triton KV store: write the K/V of T new tokens into a layer's token-slot pool (the GPU path of
`KVCache.store`; the torch reference is `index_copy_`).

One program per token copies its `Hkv * D` K and V values (one contiguous row each) to row `slot` of
the pools, casting to the pool dtype. A negative slot skips the token (nano-vllm's convention for
padded rows; the reference has no such rows). On a CUDA device:

    import torch
    k_pool = torch.zeros(8, 2, 64, device="cuda")     # [num_slots, Hkv, D]
    v_pool = torch.zeros_like(k_pool)
    k = torch.randn(3, 2, 64, device="cuda")          # [T, Hkv, D]
    store_kvcache(k_pool, v_pool, torch.tensor([5, 0, 7], device="cuda"), k, k)
    assert torch.equal(k_pool[5], k[0])

Import this module only where triton is installed (`sgl.kernels.dispatch` does it lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    k_ptr,  # [T, Hkv * D] rows (a row is contiguous; rows are k_row_stride apart)
    k_row_stride,
    v_ptr,
    v_row_stride,
    k_pool_ptr,  # [num_slots, Hkv * D] contiguous rows
    v_pool_ptr,
    slots_ptr,  # [T] int64
    ROW: tl.constexpr,  # Hkv * D
    BLOCK: tl.constexpr,  # next power of two >= ROW
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    cols = tl.arange(0, BLOCK)
    in_row = cols < ROW
    src = token.to(tl.int64)
    k = tl.load(k_ptr + src * k_row_stride + cols, mask=in_row)
    v = tl.load(v_ptr + src * v_row_stride + cols, mask=in_row)
    dst = slot * ROW + cols
    tl.store(k_pool_ptr + dst, k.to(k_pool_ptr.dtype.element_ty), mask=in_row)
    tl.store(v_pool_ptr + dst, v.to(v_pool_ptr.dtype.element_ty), mask=in_row)


def store_kvcache(
    k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k_pool[slots[t]] = k[t] and v_pool[slots[t]] = v[t] for each of the T tokens (cast to the pool dtype).

    k_pool, v_pool: [num_slots, Hkv, D], each slot's [Hkv, D] block contiguous; slots: [T] int32/int64
    (negative = skip); k, v: [T, Hkv, D] with contiguous [Hkv, D] blocks (any token stride, e.g. a
    view into a fused qkv projection).
    """
    assert k_pool.dim() == 3 and k_pool.shape == v_pool.shape, f"pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
    assert k_pool.dtype == v_pool.dtype and k_pool.dtype.is_floating_point, f"pool dtype {k_pool.dtype}"
    num_slots, num_kv_heads, head_dim = k_pool.shape
    row = num_kv_heads * head_dim
    assert k.dim() == 3 and k.shape == v.shape and k.shape[1:] == (num_kv_heads, head_dim), \
        f"k {tuple(k.shape)}, v {tuple(v.shape)} for pool rows [{num_kv_heads}, {head_dim}]"
    assert k.dtype.is_floating_point and v.dtype.is_floating_point, f"k {k.dtype}, v {v.dtype}"
    assert slots.dim() == 1 and slots.numel() == k.shape[0], f"slots {tuple(slots.shape)} for {k.shape[0]} tokens"
    assert slots.dtype in (torch.int32, torch.int64), f"slots dtype {slots.dtype}"
    # NOTE: the kernel reads one flat row of Hkv * D values per token and writes one per slot.
    for name, t in (("k", k), ("v", v), ("k_pool", k_pool), ("v_pool", v_pool)):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, f"{name} rows must be contiguous, strides {t.stride()}"
    assert k_pool.stride(0) == row and v_pool.stride(0) == row, "pool slots must be packed"
    assert slots.is_contiguous()
    assert len({t.device for t in (k_pool, v_pool, slots, k, v)}) == 1, "all tensors on one device"
    if k.shape[0] == 0:
        return
    _store_kvcache_kernel[(k.shape[0],)](
        k, k.stride(0), v, v.stride(0), k_pool, v_pool, slots, ROW=row, BLOCK=triton.next_power_of_2(row)
    )
