"""Batch-1 native decode: each Llama layer in ONE C++ call (sgl.kernels.cpu.decode_layer) where it applies.

`LlamaForCausalLM.forward` asks `fused_step(...)` once per step; it returns a runner for the step's layers
when the step is one decode token of one sequence, the model holds native GGUF weights, the activations
run in q16 (the process default; the kernel computes what the unfused q16 path computes), no LoRA, and
the extension has the kernel. Otherwise None, and every layer runs `LlamaDecoderLayer.forward` (the torch
path, which stays the reference the tests compare against). A layer whose weights cannot fuse (an fp32
fallback, f16 blocks, a tensor-parallel shard) runs its own forward inside a fused step.

Why: at batch 1 the unfused layer is ~15 small torch ops and 4 GEMV calls, each small op running cold after
a ~2 MB weight stream and each call a fork/join of the thread pool; profile: benchmarks/profile_decode_step.py.
`ENABLED = False` turns the path off (the profile's A/B and the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.decode_layer import QTYPE_CODE, DecodeLayerWeights, decode_layer
from sgl.kernels.cpu.quant import QuantWeight, get_act_quant
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.rotary import RopeTables

if TYPE_CHECKING:
    from sgl.runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM

ENABLED = True
LayerRunner = Callable[["LlamaDecoderLayer", torch.Tensor, int, RopeTables], torch.Tensor]


def layer_weights(layer: "LlamaDecoderLayer") -> Optional[DecodeLayerWeights]:
    """The layer's DecodeLayerWeights (built once, rebuilt if a weight was replaced), or None if it cannot fuse."""
    ws = tuple(layer.__dict__.get(name) for name in layer.LINEARS)
    cached = layer.__dict__.get("_fused_weights")
    if cached is not None and cached[0] == tuple(map(id, ws)):
        return cached[1]
    ok = (layer.all_reduce is None and all(type(w) is QuantWeight and w.qtype in QTYPE_CODE for w in ws)
          and layer.input_layernorm.dtype == torch.float32)
    built = None
    if ok:
        qkv, o, gate_up, down = ws
        built = DecodeLayerWeights(
            layer.input_layernorm.detach(), layer.post_attention_layernorm.detach(), float(layer.norm_consts.eps),
            qkv, None if layer.qkv_bias is None else layer.qkv_bias.detach(), o,
            None if layer.o_bias is None else layer.o_bias.detach(), gate_up, down,
            layer.num_heads, layer.num_kv_heads, layer.head_dim)
    layer.__dict__["_fused_weights"] = (tuple(map(id, ws)), built)
    return built


def fused_step(model: "LlamaForCausalLM", h: torch.Tensor, fb: ForwardBatch, kv: KVCache) -> Optional[LayerRunner]:
    """A runner `(layer, h, layer_id, rope_tables) -> h` for this step's layers, or None (run the torch path)."""
    if not (ENABLED and model.native and h.shape[0] == 1 and fb.lora is None):
        return None
    d = fb.attn.decode
    if d is None or d.batch_size != 1 or d.rows is not None or kv.dtype != torch.float32 or kv.device.type != "cpu":
        return None
    ext = _ext.load()
    if ext is None or not hasattr(ext, "decode_layer") or get_act_quant() != "q16":
        return None
    slots = fb.slot_tables[0]
    if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.device.type != "cpu":
        return None
    rows: list[torch.Tensor] = []  # the position's cos / signed-sin rows [D], taken from the first layer's tables

    def run(layer: "LlamaDecoderLayer", x: torch.Tensor, layer_id: int, rope_tables: RopeTables) -> torch.Tensor:
        w = layer_weights(layer)
        if w is None:
            return layer.forward(x, rope_tables, model.rope, fb, kv, layer_id)
        if not rows:
            rows.extend((rope_tables.cos.reshape(-1).contiguous(), rope_tables.sin_signed.reshape(-1).contiguous()))
        if not x.is_contiguous():
            x = x.contiguous()
        return decode_layer(x, w, rows[0], rows[1], kv.k_buffer(layer_id), kv.v_buffer(layer_id), slots, layer.scale,
                            check=False)

    return run
