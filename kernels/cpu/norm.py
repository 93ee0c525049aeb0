"""RMSNorm rows on the CPU (C++ when built): `rms_norm(x, weight, eps)`, x [M, N] fp32 contiguous, weight [N].

The reference is HF's formula in torch (`rms_norm_reference`); the C++ kernel (rms_norm.cpp) saves the
4 small torch ops of a norm at decode, where each runs cold after the weight stream.
"""

from __future__ import annotations

import torch

from sgl.kernels.cpu import _ext


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if (x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu"
            or weight.dtype != torch.float32 or tuple(weight.shape) != (x.shape[1],) or not weight.is_contiguous()):
        raise ValueError(f"rms_norm needs contiguous float32 CPU x [M, N] and weight [N], got x {x.dtype} "
                         f"{tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    ext = _ext.load()
    if ext is None or x.shape[0] == 0:
        return rms_norm_reference(x, weight, eps)
    out = torch.empty_like(x)
    ext.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], float(eps))
    return out
