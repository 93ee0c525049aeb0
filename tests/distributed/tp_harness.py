"""Runs a tiny random model sharded over real ranks (gloo on 127.0.0.1, one process per rank) and
writes what rank 0 saw: the sharded logits against the unsharded model's, and both greedy sequences."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from sgl.kernels.cpu.quant import set_act_quant
from sgl.runtime.distributed.group import TPGroup
from sgl.runtime.distributed.sharding import ShardPlan, shard_model
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM

PROMPTS = [[5, 17, 3, 99, 42, 7], [200, 1, 64]]
NEW_TOKENS = 6


def build_model(spec: dict[str, Any]) -> LlamaForCausalLM:
    """The same random weights in every process (seeded); native: q8_0 blocks (HF-folder quantization)."""
    cfg = ModelConfig(architecture=spec.get("architecture", "llama"), vocab_size=spec.get("vocab", 250),
                      hidden_size=spec["hidden"], intermediate_size=spec["inter"], num_hidden_layers=2,
                      num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                      head_dim=spec["head_dim"], rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                      tie_word_embeddings=spec.get("tied", False), attention_bias=spec.get("bias", False))
    gen = torch.Generator().manual_seed(1234)
    model = LlamaForCausalLM(cfg, native=spec.get("native", False))
    shapes = model.hf_weight_shapes() if not model.native else None
    if model.native:  # the fp32 model's names and shapes, then quantized rows per part
        shapes = LlamaForCausalLM(cfg).hf_weight_shapes()
    weights = []
    for name, shape in sorted(shapes.items()):
        t = torch.randn(shape, generator=gen) * (0.2 if "norm" not in name else 0.1)
        weights.append((name, t + 1 if "norm" in name else t))
    if model.native:
        model.load_native_weights(iter(weights), quantize="q8_0")
    else:
        model.load_weights(iter(weights))
    return model.eval()


def greedy(model: LlamaForCausalLM, num_kv_heads: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Batched greedy decoding of PROMPTS: the tokens, and every step's [B, V] logits."""
    cfg = model.config
    kv = KVCache(cfg.num_hidden_layers, 64, num_kv_heads, cfg.head_dim)
    tables = [list(range(i * 32, i * 32 + len(p))) for i, p in enumerate(PROMPTS)]
    new = [list(p) for p in PROMPTS]
    out: list[list[int]] = [[] for _ in PROMPTS]
    all_logits = []
    for _ in range(NEW_TOKENS):
        fb = ForwardBatch.from_lists(input_ids=new, slot_tables=tables)
        logits = model.compute_logits(model(fb, kv)[fb.last_token_indices])
        all_logits.append(logits)
        toks = logits.argmax(-1).tolist()
        for i, t in enumerate(toks):
            out[i].append(t)
            tables[i] = tables[i] + [tables[i][-1] + 1]
        new = [[t] for t in toks]
    return out, all_logits


def run_rank(rank: int, world: int, port: int, spec: dict[str, Any], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # exact fp32 activations on both sides: q16's rounding would amplify the all-reduce's summation order
    # (~1e-7) past the bound; the sharding math is what this compares
    set_act_quant("none")
    group = TPGroup.init(rank, world, timeout_s=60)
    try:
        model = build_model(spec)
        plan = ShardPlan.for_model(model.config, rank, world)
        local = shard_model(model, plan, group)
        tokens, logits = greedy(model, local.num_key_value_heads)
        if rank == 0:
            ref_tokens, ref_logits = greedy(build_model(spec), model.config.num_key_value_heads)
            diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(logits, ref_logits))
            with open(out_path, "w") as f:
                json.dump({"tokens": tokens, "ref_tokens": ref_tokens, "rel_diff": diff,
                           "plan": [plan.q_heads, plan.kv_heads, plan.inter]}, f)
    finally:
        group.destroy()
