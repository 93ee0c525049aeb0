"""Megatron sharding of a loaded Llama-family model, in place, for one tensor-parallel rank.

    plan = ShardPlan.for_model(config, rank=1, tp=2)
    local_config = shard_model(model, plan, group)     # the model now holds rank 1's slices

Per layer (Megatron-LM): qkv and gate_up are column-parallel (each rank keeps some output rows), o and
down row-parallel (each rank keeps the matching input columns and adds a partial sum that one
all-reduce per projection completes); norms are replicated. The lm_head is vocab-parallel (its output
rows split, the logits all-gathered); the embedding lookup stays whole on every rank (a gather of rows,
no matmul, so splitting it would only add an all-reduce).

Heads go to ranks in whole GQA groups (one kv head and the q heads reading it), so every rank's
attention is plain GQA with the model's group size:
  * num_kv_heads >= tp: contiguous ranges of groups, as even as possible (3 kv heads over 2 ranks:
    2 and 1; no kv head is stored twice);
  * num_kv_heads < tp: each kv head is replicated on tp / num_kv_heads ranks, which split its q heads
    (needs tp % num_kv_heads == 0 and the group size divisible by tp / num_kv_heads).
The MLP's intermediate dimension splits evenly in units of 32 (a GGUF block), so a row-parallel shard
of a quantized weight is whole blocks of its rows: a byte slice, no requantization. An input range
that is not whole blocks (e.g. a head_dim of 16) gets that shard dequantized to fp32: the values are
the file's, never requantized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sgl.kernels.cpu import QuantWeight
from sgl.kernels.cpu.quant import BLOCK, row_bytes
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.native_weights import LinearWeight, pack_quant_weights

if TYPE_CHECKING:
    from sgl.runtime.distributed.group import TPGroup
    from sgl.runtime.models.llama import LlamaForCausalLM


def even_bounds(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split [0, n) into `parts` contiguous ranges of whole `unit`s, sizes differing by at most one unit
    (the first ranges get the extra); n % unit == 0."""
    units = n // unit
    base, extra = divmod(units, parts)
    out, start = [], 0
    for p in range(parts):
        end = start + (base + (p < extra)) * unit
        out.append((start, end))
        start = end
    return out


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    tp: int
    q_heads: tuple[int, int]  # global q head range [start, end) on this rank
    kv_heads: tuple[int, int]  # global kv head range
    inter: tuple[int, int]  # intermediate columns of gate/up (and input rows of down)
    vocab_sizes: tuple[int, ...]  # lm_head rows per rank, rank-ordered
    head_dim: int

    @classmethod
    def for_model(cls, config: ModelConfig, rank: int, tp: int) -> "ShardPlan":
        h, hkv = config.num_attention_heads, config.num_key_value_heads
        group = h // hkv
        if hkv >= tp:
            kv = even_bounds(hkv, tp)[rank]
            q = (kv[0] * group, kv[1] * group)
        else:
            reps = tp // hkv
            if tp % hkv or group % reps:
                raise ValueError(f"tp_size {tp} cannot split {h} query heads over {hkv} kv heads: with fewer kv "
                                 f"heads than ranks, tp_size must be a multiple of num_key_value_heads and each kv "
                                 f"head's {group} query heads must split evenly over its {reps} ranks")
            per = group // reps
            q = (rank * per, (rank + 1) * per)
            kv = (rank // reps, rank // reps + 1)
        unit = BLOCK if config.intermediate_size % (BLOCK * tp) == 0 else 1
        vocab = even_bounds(config.vocab_size, tp)
        return cls(rank, tp, q, kv, even_bounds(config.intermediate_size, tp, unit)[rank],
                   tuple(b - a for a, b in vocab), config.head_dim)

    @property
    def vocab(self) -> tuple[int, int]:
        start = sum(self.vocab_sizes[: self.rank])
        return start, start + self.vocab_sizes[self.rank]

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The rank's view: its heads and intermediate columns (sizes the KV pool and the layers)."""
        return dataclasses.replace(config, num_attention_heads=self.q_heads[1] - self.q_heads[0],
                                   num_key_value_heads=self.kv_heads[1] - self.kv_heads[0],
                                   intermediate_size=self.inter[1] - self.inter[0])


def take_outputs(w: LinearWeight, rows: torch.Tensor) -> LinearWeight:
    """Column-parallel shard: the output features `rows` [n] int64 of w (a [N, K] QuantWeight or an fp32 [K, N])."""
    if isinstance(w, QuantWeight):
        return QuantWeight(w.qtype, (rows.numel(), w.shape[1]), w.data.index_select(0, rows).contiguous())
    return w.index_select(1, rows).contiguous()


def take_inputs(w: LinearWeight, start: int, end: int) -> LinearWeight:
    """Row-parallel shard: input features [start, end) of w. Whole blocks of a QuantWeight's rows are a
    byte slice; a range that cuts blocks becomes fp32 (the exact dequantized values)."""
    if isinstance(w, QuantWeight):
        if w.qtype == "f16" or (start % BLOCK == 0 and end % BLOCK == 0):
            a, b = row_bytes(w.qtype, start), row_bytes(w.qtype, end)
            return QuantWeight(w.qtype, (w.shape[0], end - start), w.data[:, a:b].contiguous())
        return w.dequantize()[:, start:end].t().contiguous()
    return w[start:end].contiguous()


def _ranges(*bounds: tuple[int, int]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in bounds])


def _set_param(module: torch.nn.Module, name: str, value: "torch.nn.Parameter | None") -> None:
    # NOTE: both places: weight_arena.pack_parameters shadows parameters in __dict__ (fast attribute
    # reads), and nn.Module.__setattr__ with None would leave that shadow in place.
    module._parameters[name] = module.__dict__[name] = value


@torch.no_grad()
def shard_model(model: "LlamaForCausalLM", plan: ShardPlan, group: "TPGroup") -> ModelConfig:
    """Replace `model`'s linear weights by this rank's shards and install the collectives; returns the
    rank's ModelConfig (for its KV pool). Quantized shards are re-packed into one buffer and the
    unsharded one is released (fp32 parameters stay in their packed buffer: see README)."""
    config = model.config
    d, q_size, kv_size, inter = plan.head_dim, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim, config.intermediate_size
    (q0, q1), (k0, k1), (i0, i1) = plan.q_heads, plan.kv_heads, plan.inter
    qkv_rows = _ranges((q0 * d, q1 * d), (q_size + k0 * d, q_size + k1 * d), (q_size + kv_size + k0 * d, q_size + kv_size + k1 * d))
    gate_up_rows = _ranges((i0, i1), (inter + i0, inter + i1))
    local = plan.local_config(config)
    for layer in model.layers:
        for name, w in (("qkv", take_outputs(layer.qkv, qkv_rows)), ("o", take_inputs(layer.o, q0 * d, q1 * d)),
                        ("gate_up", take_outputs(layer.gate_up, gate_up_rows)), ("down", take_inputs(layer.down, i0, i1))):
            layer.__dict__[name] = w
        if layer.qkv_bias is not None:
            _set_param(layer, "qkv_bias", torch.nn.Parameter(layer.qkv_bias.index_select(0, qkv_rows), requires_grad=False))
        if layer.o_bias is not None and plan.rank != 0:
            _set_param(layer, "o_bias", None)  # added once, by the rank that also adds the residual
        layer.num_heads, layer.num_kv_heads = local.num_attention_heads, local.num_key_value_heads
        layer.q_size, layer.kv_size = layer.num_heads * d, layer.num_kv_heads * d
        layer.intermediate_size = local.intermediate_size
        layer.qk_v_sizes = (layer.q_size + layer.kv_size, layer.kv_size)
        layer.q_k_heads = (layer.num_heads, layer.num_kv_heads)
        layer.all_reduce, layer.residual_here = group.all_reduce, plan.rank == 0
    v0, v1 = plan.vocab
    model.__dict__["lm_head"] = take_outputs(model.lm_head, torch.arange(v0, v1, dtype=torch.int64))
    sizes = list(plan.vocab_sizes)
    model.gather_vocab = lambda logits: group.gather_columns(logits, sizes)
    if model.native:  # one buffer of this rank's blocks, in forward order; the full model's is freed
        slots = [(layer, name) for layer in model.layers for name in layer.LINEARS] + [(model, "embed"), (model, "lm_head")]
        model._weights_buffer_native = pack_quant_weights(slots)
    return local
