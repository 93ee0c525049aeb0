"""One Llama decoder layer for one token (batch-1 decode) in one C++ call: launcher + torch reference.

`DecodeLayerWeights` holds a layer's weights (GGUF blocks q4_0/q4_1/q8_0 for the four matmuls, fused as
llama.py lays them out: qkv rows [q | k | v], gate_up rows [gate | up]) and is validated once;
`decode_layer(h, w, cos, sin, k_buf, v_buf, slots, scale)` then runs, for h [1, hidden] (in place):

    x = rms_norm(h) * ln1;  q, k, v = x @ Wqkv^T (+ bias);  rope(q), rope(k) with the position's
    cos / signed-sin rows [D];  k_buf[slots[-1]] = k, v_buf[slots[-1]] = v;  attention of q over the
    slots (GQA: query head i reads kv head i // (H / Hkv));  h += attn @ Wo^T (+ bias);
    x = rms_norm(h) * ln2;  h += (silu(x @ Wgate^T) * (x @ Wup^T)) @ Wdown^T

`slots` [L] int64 is the row's slot table, the new token's slot last. The kernel (decode_layer.cpp)
quantizes activations as quant_linear's act_quant="q16" (the default) or "q8" does (`act`);
`decode_layer_reference` (dequantize + mm, torch softmax) is the oracle of tests/kernels/test_cpu_decode_layer.py
and the path without the extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.attention import KV_DTYPES, decode_attention_reference, kv_half
from sgl.kernels.cpu.norm import rms_norm_reference
from sgl.kernels.cpu.quant import QuantWeight, get_num_threads, quant_linear_reference

QTYPE_CODE = {"q4_0": 0, "q4_1": 1, "q8_0": 2}  # decode_layer.cpp's block_qtype
ACT_CODE = {"q8": 1, "q16": 2}  # decode_common.h's act_mode (gemm's act_mode codes)


def _act_code(act: str) -> int:
    if act not in ACT_CODE:
        raise ValueError(f"act must be one of {tuple(ACT_CODE)}, got {act!r}")
    return ACT_CODE[act]


def _vec(name: str, t: Optional[torch.Tensor], n: int) -> None:
    if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (n,) or not t.is_contiguous()
                          or t.device.type != "cpu"):
        raise ValueError(f"{name} must be a contiguous float32 CPU vector [{n}], got {t.dtype} {tuple(t.shape)}")


@dataclass(frozen=True)
class DecodeLayerWeights:
    input_layernorm: Optional[torch.Tensor]  # [hidden]; None: no input norm (an EAGLE head's layer; decode_layer only)
    post_attention_layernorm: torch.Tensor  # [hidden]
    eps: float
    qkv: QuantWeight  # [(H + 2 Hkv) D, hidden]
    qkv_bias: Optional[torch.Tensor]  # [(H + 2 Hkv) D]
    o: QuantWeight  # [hidden, H D]
    o_bias: Optional[torch.Tensor]  # [hidden]
    gate_up: QuantWeight  # [2 I, hidden]
    down: QuantWeight  # [hidden, I]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        if h <= 0 or hk <= 0 or h % hk or d <= 0 or d % 2 or d > 512:
            raise ValueError(f"heads {h}/{hk} x head_dim {d}: need H % Hkv == 0 and an even head_dim <= 512")
        for name in ("qkv", "o", "gate_up", "down"):
            w = getattr(self, name)
            if not isinstance(w, QuantWeight) or w.qtype not in QTYPE_CODE:
                raise ValueError(f"{name} must be a QuantWeight of {tuple(QTYPE_CODE)}, got {describe(w)}")
        hidden = self.qkv.shape[1]
        inter = self.gate_up.shape[0] // 2
        want = {"qkv": ((h + 2 * hk) * d, hidden), "o": (hidden, h * d), "gate_up": (2 * inter, hidden),
                "down": (hidden, inter)}
        for name, shape in want.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, the layer needs {shape}")
        _vec("input_layernorm", self.input_layernorm, hidden)
        _vec("post_attention_layernorm", self.post_attention_layernorm, hidden)
        _vec("qkv_bias", self.qkv_bias, (h + 2 * hk) * d)
        _vec("o_bias", self.o_bias, hidden)
        # the kernel's weight arguments, computed once (the decode hot path makes ~30 calls per token)
        object.__setattr__(self, "ext_args", (
            0 if self.input_layernorm is None else self.input_layernorm.data_ptr(),
            self.post_attention_layernorm.data_ptr(), float(self.eps),
            self.qkv.data.data_ptr(), QTYPE_CODE[self.qkv.qtype], 0 if self.qkv_bias is None else self.qkv_bias.data_ptr(),
            self.o.data.data_ptr(), QTYPE_CODE[self.o.qtype], 0 if self.o_bias is None else self.o_bias.data_ptr(),
            self.gate_up.data.data_ptr(), QTYPE_CODE[self.gate_up.qtype], self.down.data.data_ptr(),
            QTYPE_CODE[self.down.qtype], hidden, h, hk, d, inter))
        # the q8 kernels' oct-packed copies (QuantWeight.pack("q8")), 0: none; the gate/up halves are read from row I,
        # which must start a packed group
        copies = [w.packed.get("q8") for w in (self.qkv, self.o, self.gate_up, self.down)]
        if inter % 8:
            copies[2] = None
        object.__setattr__(self, "packed_args", tuple(0 if c is None else c.data_ptr() for c in copies))

    @property
    def hidden_size(self) -> int:
        return self.qkv.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.gate_up.shape[0] // 2


def describe(w: object) -> str:
    return f"QuantWeight {w.qtype}" if isinstance(w, QuantWeight) else type(w).__name__


def _check_call(h: torch.Tensor, w: DecodeLayerWeights, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
                v_buf: torch.Tensor, slots: torch.Tensor) -> None:
    if h.dtype != torch.float32 or tuple(h.shape) != (1, w.hidden_size) or not h.is_contiguous() or not h.is_cpu:
        raise ValueError(f"h must be a contiguous float32 CPU tensor [1, {w.hidden_size}], got {h.dtype} {tuple(h.shape)}")
    _vec("cos", cos, w.head_dim)
    _vec("sin", sin, w.head_dim)
    _check_bufs(w, k_buf, v_buf)
    if slots.dtype != torch.int64 or slots.dim() != 1 or slots.numel() < 1 or not slots.is_contiguous():
        raise ValueError(f"slots must be a contiguous int64 vector [L >= 1], got {slots.dtype} {tuple(slots.shape)}")


def _check_bufs(w: DecodeLayerWeights, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    shape = (w.num_kv_heads, w.head_dim)
    for name, t in (("k_buf", k_buf), ("v_buf", v_buf)):
        if t.dtype not in KV_DTYPES or t.dim() != 3 or tuple(t.shape[1:]) != shape or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"{name} must be a contiguous float32 or float16 CPU tensor [slots, {shape[0]}, {shape[1]}], "
                             f"got {t.dtype} {tuple(t.shape)}")
    if k_buf.shape != v_buf.shape or k_buf.dtype != v_buf.dtype:
        raise ValueError(f"k_buf {k_buf.dtype} {tuple(k_buf.shape)} and v_buf {v_buf.dtype} {tuple(v_buf.shape)} differ")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, D] -> x cos + rotate_half(x) sin, sin signed (rotary.py's layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * sin


def decode_layer_reference(h: torch.Tensor, w: DecodeLayerWeights, cos: torch.Tensor, sin: torch.Tensor,
                           k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """The oracle (fp32 activations, dequantized weights); writes k/v and h in place, returns h."""
    _check_call(h, w, cos, sin, k_buf, v_buf, slots)
    nh, nk, d = w.num_heads, w.num_kv_heads, w.head_dim
    x = h if w.input_layernorm is None else rms_norm_reference(h, w.input_layernorm, w.eps)
    qkv = quant_linear_reference(x, w.qkv, w.qkv_bias)[0]
    q = _rope(qkv[: nh * d].view(nh, d), cos, sin)
    k = _rope(qkv[nh * d : (nh + nk) * d].view(nk, d), cos, sin)
    slot = int(slots[-1])
    k_buf[slot] = k
    v_buf[slot] = qkv[(nh + nk) * d :].view(nk, d)
    attn = decode_attention_reference(q[None].contiguous(), k_buf, v_buf, slots[None], slots.new_tensor([slots.numel()]),
                                      scale)
    h.copy_(quant_linear_reference(attn.view(1, nh * d), w.o, w.o_bias, residual=h))
    x = rms_norm_reference(h, w.post_attention_layernorm, w.eps)
    gate_up = quant_linear_reference(x, w.gate_up)
    inter = w.intermediate_size
    act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    h.copy_(quant_linear_reference(act, w.down, residual=h))
    return h


def decode_layer(h: torch.Tensor, w: DecodeLayerWeights, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
                 v_buf: torch.Tensor, slots: torch.Tensor, scale: float, check: bool = True,
                 act: str = "q16") -> torch.Tensor:
    """The layer (module docstring) in place on h [1, hidden]; returns h. check=False skips the per-call
    Python checks (the caller built the tensors itself, as runtime/models/fused_decode.py); the kernel still
    rejects slots out of range. act: the matmuls' activations, "q16" or "q8" (quant_linear's modes; q8 reads the
    weights' packed copies where they have some, `packed_args`)."""
    code = _act_code(act)
    ext = _ext.load()
    if check or ext is None:
        _check_call(h, w, cos, sin, k_buf, v_buf, slots)
    if ext is None or not hasattr(ext, "decode_layer"):
        return decode_layer_reference(h, w, cos, sin, k_buf, v_buf, slots, scale)
    ext.decode_layer(h.data_ptr(), *w.ext_args, cos.data_ptr(), sin.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(),
                     k_buf.shape[0], slots.data_ptr(), slots.numel(), float(scale), kv_half(k_buf), get_num_threads(),
                     code, *w.packed_args)
    return h


@dataclass(frozen=True)
class DecodeStack:
    """Several layers' DecodeLayerWeights with their KV pools, for `decode_stack`: a batch-1 decode step's whole
    decoder in one call. Built (and validated) once; `table` is the kernel's int64 [n, 18] argument rows
    (decode_common.h's stack_layer reads them; the last 4 columns: the weights' q8 packed copies, read by the q8
    kernels for up to 8 rows)."""
    layers: tuple[DecodeLayerWeights, ...]
    k_bufs: tuple[torch.Tensor, ...]  # per layer [slots, Hkv, D]
    v_bufs: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.layers or not len(self.layers) == len(self.k_bufs) == len(self.v_bufs):
            raise ValueError(f"{len(self.layers)} layers need as many k/v buffers, got {len(self.k_bufs)}/{len(self.v_bufs)}")
        w0 = self.layers[0]
        shape = (w0.hidden_size, w0.num_heads, w0.num_kv_heads, w0.head_dim, w0.intermediate_size, w0.eps)
        for i, (w, k, v) in enumerate(zip(self.layers, self.k_bufs, self.v_bufs)):
            if (w.hidden_size, w.num_heads, w.num_kv_heads, w.head_dim, w.intermediate_size, w.eps) != shape:
                raise ValueError(f"layer {i}'s shape or eps differs from layer 0's: one stack takes one shape")
            _check_bufs(w, k, v)
            if k.shape[0] != self.k_bufs[0].shape[0] or k.dtype != self.k_bufs[0].dtype:
                raise ValueError(f"layer {i}'s KV pool ({k.shape[0]} slots of {k.dtype}) differs from layer 0's "
                                 f"({self.k_bufs[0].shape[0]} of {self.k_bufs[0].dtype})")
        rows = [[a[0], a[1], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], k.data_ptr(), v.data_ptr(),
                 *w.packed_args] for w, a, k, v in ((w, w.ext_args, k, v)
                                                    for w, k, v in zip(self.layers, self.k_bufs, self.v_bufs))]
        object.__setattr__(self, "table", torch.tensor(rows, dtype=torch.int64))  # [n, 18]
        object.__setattr__(self, "_parts", {})

    def part(self, lo: int, hi: int) -> "DecodeStack":
        """Layers [lo, hi) as a stack of their own (built once per range): a forward that keeps some layers'
        outputs (EAGLE-3's target states) runs the stack in segments."""
        if (lo, hi) == (0, len(self.layers)):
            return self
        part = self._parts.get((lo, hi))
        if part is None:
            part = self._parts[(lo, hi)] = DecodeStack(self.layers[lo:hi], self.k_bufs[lo:hi], self.v_bufs[lo:hi])
        return part


def decode_stack(h: torch.Tensor, stack: DecodeStack, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 scale: float, check: bool = True, act: str = "q16") -> torch.Tensor:
    """decode_layer for every layer of `stack` in order, in place on h [1, hidden]; returns h. The same bits
    as calling decode_layer layer by layer (the kernel runs the same per-layer code)."""
    code = _act_code(act)
    ext = _ext.load()
    w0 = stack.layers[0]
    if check or ext is None:
        _check_call(h, w0, cos, sin, stack.k_bufs[0], stack.v_bufs[0], slots)
    if ext is None or not hasattr(ext, "decode_layers"):
        for w, k, v in zip(stack.layers, stack.k_bufs, stack.v_bufs):
            decode_layer(h, w, cos, sin, k, v, slots, scale, check=False, act=act)
        return h
    ext.decode_layers(h.data_ptr(), stack.table.data_ptr(), len(stack.layers), float(w0.eps), w0.hidden_size,
                      w0.num_heads, w0.num_kv_heads, w0.head_dim, w0.intermediate_size, cos.data_ptr(), sin.data_ptr(),
                      stack.k_bufs[0].shape[0], slots.data_ptr(), slots.numel(), float(scale), kv_half(stack.k_bufs[0]),
                      get_num_threads(), code)
    return h


MAX_ROWS = 64  # decode_rows.cpp's kQ16MaxRows (quant_q16_tile.h)


def decode_rows(h: torch.Tensor, stack: DecodeStack, cos: torch.Tensor, sin: torch.Tensor, row_slots: torch.Tensor,
                row_lens: torch.Tensor, scale: float, act: str = "q16") -> torch.Tensor:
    """The stack for M token rows, in place on h [M, hidden]; returns h. Row t is one token with its position's
    cos / signed-sin rows (cos, sin [M, D]) and its slot list: `row_slots[t]` is the ADDRESS of a contiguous int64
    slot list of `row_lens[t]` entries, the token's own slot last (a decode row: its sequence's slot table; verify
    row j of a chain: the table up to its own slot). Up to MAX_ROWS rows run as one kernel call, every row's K/V
    stored before any row attends; more run in calls of MAX_ROWS rows in row order, so a row's list may name only
    rows before it (or itself) among them (a chain's rows are in order; 8 requests verifying 8 drafts are 72 rows).
    Each row gets the bits decode_stack computes for that token alone (tests/kernels/test_cpu_decode_rows.py). The
    caller keeps the slot lists alive for the call. Without the kernel: one decode_stack per row, in order (the same
    result). act: "q16" or "q8", as decode_stack."""
    code = _act_code(act)
    ext = _ext.load()
    w0 = stack.layers[0]
    m = h.shape[0]
    if not (h.dtype == torch.float32 and h.is_contiguous() and h.dim() == 2 and m >= 1
            and h.shape[1] == w0.hidden_size):
        raise ValueError(f"h must be a contiguous float32 [M, {w0.hidden_size}] tensor, got {tuple(h.shape)}")
    if tuple(cos.shape) != (m, w0.head_dim) or tuple(sin.shape) != (m, w0.head_dim) or not (
            cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"cos/sin must be contiguous [{m}, {w0.head_dim}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    for name, t in (("row_slots", row_slots), ("row_lens", row_lens)):
        if t.dtype != torch.int64 or tuple(t.shape) != (m,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 [{m}] tensor, got {t.dtype} {tuple(t.shape)}")
    if m > MAX_ROWS and ext is not None and hasattr(ext, "decode_rows"):
        for r0 in range(0, m, MAX_ROWS):  # a call's rows read the K/V the calls before it stored
            r1 = min(m, r0 + MAX_ROWS)
            decode_rows(h[r0:r1], stack, cos[r0:r1], sin[r0:r1], row_slots[r0:r1], row_lens[r0:r1], scale, act)
        return h
    if ext is None or not hasattr(ext, "decode_rows"):
        for t in range(m):
            n = int(row_lens[t])
            slots = _slot_list(int(row_slots[t]), n)
            decode_stack(h[t : t + 1], stack, cos[t], sin[t], slots, scale, act=act)
        return h
    ext.decode_rows(h.data_ptr(), m, stack.table.data_ptr(), len(stack.layers), float(w0.eps), w0.hidden_size,
                    w0.num_heads, w0.num_kv_heads, w0.head_dim, w0.intermediate_size, cos.data_ptr(), sin.data_ptr(),
                    row_slots.data_ptr(), row_lens.data_ptr(), stack.k_bufs[0].shape[0], float(scale),
                    kv_half(stack.k_bufs[0]), get_num_threads(), code)
    return h


def _slot_list(addr: int, n: int) -> torch.Tensor:
    """The int64 [n] slot list at `addr` (a copy), for the path without the kernel."""
    import ctypes

    return torch.tensor((ctypes.c_int64 * n).from_address(addr)[:], dtype=torch.int64)
