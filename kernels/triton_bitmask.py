"""Triton `apply_token_bitmask_`: the GPU path of `sgl.kernels.bitmask.apply_token_bitmask_`, same
name, arguments and semantics (see that function's docstring: bit `t % 32` of word `t // 32` set =
token `t` allowed; logits past `32 * W` are masked; only the rows in `indices` are touched).

The kernel only writes: each program covers BLOCK columns of one row and stores -inf at the
disallowed ones; allowed logits are never read or rewritten. On a CUDA device:

    import torch
    logits = torch.zeros(2, 40, device="cuda")
    mask = torch.tensor([[1 << 3, 0], [-1, -1]], dtype=torch.int32, device="cuda")
    apply_token_bitmask_(logits, mask, indices=[0])            # row 0: token 3 only
    logits[0].isfinite().nonzero().flatten().tolist()          # [3]; row 1 untouched

Import this module only where triton is installed (`sgl.kernels.dispatch` does it lazily).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,  # [B, V], unit column stride
    logits_row_stride,
    bitmask_ptr,  # [B', W] int32, unit column stride
    bitmask_row_stride,
    rows_ptr,  # [R] int64 rows to mask (read only when HAS_ROWS)
    vocab_size,  # V
    num_words,  # W
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,  # columns per program, a multiple of 32
):
    r = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + r).to(tl.int64)
    else:
        row = r.to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] token ids
    words = tl.load(bitmask_ptr + row * bitmask_row_stride + cols // 32, mask=cols < num_words * 32, other=0)
    allowed = ((words >> (cols % 32)) & 1) != 0  # tokens past 32 * W read word 0: disallowed
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * logits_row_stride + cols, neg_inf, mask=(cols < vocab_size) & ~allowed)


def apply_token_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    indices: Optional[Union[Sequence[int], torch.Tensor]] = None,
    block: int = 1024,
) -> None:
    """Set the logits of disallowed tokens to -inf, in place (semantics of the torch reference).

    logits: [B, V] float (unit column stride); bitmask: [B', W] int32 with B' >= B (unit column
    stride); indices: rows to mask (each < B), or None for all rows. `block`: columns per program.
    """
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"bitmask must be a [B, W] int32 tensor, got {bitmask.dtype} {tuple(bitmask.shape)}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a [B, V] float tensor, got {logits.dtype} {tuple(logits.shape)}")
    if bitmask.device != logits.device:
        raise ValueError(f"bitmask is on {bitmask.device} but logits are on {logits.device}")
    B, V = logits.shape
    if bitmask.shape[0] < B:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows, logits have {B}")
    assert logits.stride(1) == 1 or V == 1, f"logits need unit column stride, strides {logits.stride()}"
    assert bitmask.stride(1) == 1 or bitmask.shape[1] == 1, f"bitmask needs unit column stride, strides {bitmask.stride()}"
    assert block % 32 == 0 and block & (block - 1) == 0, "block: a power of two >= 32"
    rows: Optional[torch.Tensor] = None
    num_rows = B
    if indices is not None:
        # NOTE: the range check costs one host sync for a device tensor; a bad row would write out of bounds.
        rows = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).to(logits.device)
        num_rows = rows.numel()
        if num_rows and not (0 <= int(rows.min()) and int(rows.max()) < B):
            raise ValueError(f"indices must be in [0, {B}), got {rows.tolist()}")
    if num_rows == 0 or V == 0:
        return
    _apply_token_bitmask_kernel[(num_rows, triton.cdiv(V, block))](
        logits, logits.stride(0), bitmask, bitmask.stride(0),
        rows if rows is not None else bitmask,  # unread placeholder when HAS_ROWS is False
        V, bitmask.shape[1], HAS_ROWS=rows is not None, BLOCK=block,
    )
