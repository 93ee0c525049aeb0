"""Rotary position embeddings (RoPE) as precomputed cos/sin tables, with HF's rope scaling types.

Layout is Hugging Face's "rotate half": the first D/2 dims of a head pair with the last D/2, so
    rope(x) = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x2, x1)
We store `sin_signed = cat(-sin, sin)` so that rotate_half(x) * sin == cat(x2, x1) * sin_signed.
For a few tokens (decode) the rotation is instead ONE batched matmul with per-token [D, D] matrices
built once per step: every layer then spends one op on RoPE instead of five (see llama.py on why
the op count matters at batch-1 decode).

    >>> import torch
    >>> rope = RotaryEmbedding(head_dim=4, theta=10000.0, scaling=None)
    >>> x = torch.ones(2, 3, 4)                                 # [T, heads, D]
    >>> torch.equal(rope.apply(x, rope.lookup(torch.tensor([0, 0]))), x)  # position 0: identity
    True
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MAX_MATRIX_TOKENS = 32  # up to this many tokens per step, rotate with a matmul (T x D x D floats)


class RopeTables(NamedTuple):
    """One step's rotation, shared by all layers."""

    cos: torch.Tensor  # [T, 1, D]
    sin_signed: torch.Tensor  # [T, 1, D]
    matrices: Optional[torch.Tensor]  # [T, D, D] with rope(x) = x @ matrices[t], or None (elementwise)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Optional[dict[str, Any]], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """([D/2] float32 inverse frequencies, attention scaling of cos/sin), as transformers computes them."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [D/2]
    if rope_type == "default":
        return inv_freq, 1.0
    assert scaling is not None
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (> low_wavelen) are divided by factor, short ones (< high_wavelen) kept,
        # and the band in between interpolated smoothly
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    return _yarn(head_dim, theta, scaling, factor, max_position_embeddings)


def _yarn(
    dim: int, theta: float, scaling: dict[str, Any], factor: float, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    # NOTE: mirrors transformers' _compute_yarn_parameters line for line (same float32 ops).
    orig_max = scaling.get("original_max_position_embeddings") or max_position_embeddings

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos / signed-sin tables [N, D], grown on demand to cover every position seen."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: Optional[dict[str, Any]],
        max_position_embeddings: int = 4096,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        assert head_dim % 2 == 0
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.inv_freq, self.attention_scaling = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings)
        self.cos = self.sin_signed = torch.empty(0)
        self._build(min(max_position_embeddings, 4096))

    def _build(self, n: int) -> None:
        # same float32 product as transformers (position * inv_freq), cast to the model dtype after
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]  # [N, D/2]
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        self.cos = torch.cat([cos, cos], -1).to(self.device, self.dtype)  # [N, D]
        self.sin_signed = torch.cat([-sin, sin], -1).to(self.device, self.dtype)  # [N, D]

    def ensure(self, num_positions: int) -> None:
        """Make the tables cover positions 0 .. num_positions - 1."""
        if num_positions > self.cos.shape[0]:
            self._build(max(num_positions, 2 * self.cos.shape[0]))

    def lookup(self, positions: torch.Tensor, matrices: bool = True) -> RopeTables:
        """positions [T] -> the tables for those positions (call once per step). matrices=False skips the
        per-token rotation matrices (a step whose layers rotate in C++, runtime/models/fused_decode.py)."""
        cos = self.cos.index_select(0, positions)  # [T, D]
        sin = self.sin_signed.index_select(0, positions)  # [T, D]
        want_matrices, matrices = matrices, None
        if want_matrices and positions.shape[0] <= MAX_MATRIX_TOKENS:
            # out_j = x_j cos_j + x_{(j + D/2) % D} sin_signed_j  <=>  out = x @ R, with
            # R[j, j] = cos_j and R[(j + D/2) % D, j] = sin_signed_j (the other entries add exact zeros)
            d = self.head_dim
            cols = torch.arange(d, device=positions.device)
            matrices = torch.diag_embed(cos)  # [T, D, D]
            matrices[:, (cols + d // 2) % d, cols] = sin
        return RopeTables(cos.unsqueeze(1), sin.unsqueeze(1), matrices)

    def apply(self, x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
        """x [T, heads, D] -> rotated [T, heads, D] (a new tensor)."""
        if tables.matrices is not None:
            return torch.bmm(x, tables.matrices)  # [T, heads, D] @ [T, D, D]
        half = self.head_dim // 2
        return torch.addcmul(x * tables.cos, torch.cat((x[..., half:], x[..., :half]), -1), tables.sin_signed)
