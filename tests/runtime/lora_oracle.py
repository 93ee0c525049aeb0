"""Helpers for the LoRA oracle tests: random PEFT adapters on a transformers model, and a driver
that runs our model on a batch whose rows use different adapters (as the model runner does)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.lora.adapter import LayerShapes, LoraAdapter, load_adapter
from sgl.runtime.lora.segmented import LoraBatch, StackCache, lora_order
from sgl.runtime.models.llama import LlamaForCausalLM

from tests.runtime.tiny_llama_oracle import SlotPool

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_random_adapters(hf_model, specs: dict[str, dict], out_dir: str, seed: int = 0, std: float = 0.2):
    """Wrap `hf_model` in PEFT with one adapter per spec (LoraConfig kwargs), A and B random (B not
    zero, so every adapter changes the output), each saved to out_dir/<name>. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    names = list(specs)
    peft_model = get_peft_model(hf_model, LoraConfig(**specs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(**specs[name]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if ".lora_A." in pname or ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.eval()
    for name in names:
        peft_model.save_pretrained(out_dir, selected_adapters=[name])
    return peft_model


def adapter_dir(out_dir: str, name: str) -> str:
    """save_pretrained puts each named (non-"default") adapter in its own subfolder."""
    return os.path.join(out_dir, name)


def load_ours(model: LlamaForCausalLM, name: str, path: str) -> LoraAdapter:
    cfg = model.config
    shapes = LayerShapes.for_llama(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim,
                                   cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size)
    return load_adapter(name, path, shapes, cfg.num_hidden_layers)


def peft_logits(peft_model, prompt: list[int], adapter: Optional[str]) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(input_ids=ids).logits[0].float()
        peft_model.set_adapter(adapter)
        return peft_model(input_ids=ids).logits[0].float()


def peft_greedy(peft_model, prompt: list[int], adapter: Optional[str], n: int) -> list[int]:
    out = list(prompt)
    for _ in range(n):  # full recompute per token: slow but obviously the reference
        out.append(int(peft_logits(peft_model, out, adapter)[-1].argmax()))
    return out[len(prompt):]


def mixed_batch_greedy(model: LlamaForCausalLM, prompts: Sequence[list[int]], adapters: Sequence[Optional[LoraAdapter]],
                       n: int, stacked: bool = False) -> tuple[list[torch.Tensor], list[list[int]]]:
    """One prefill step for all rows (mixed adapters), then n - 1 decode steps; rows are ordered by
    adapter as the model runner orders them. Returns (each row's prompt logits [L, V], its n greedy tokens).
    stacked: the decode steps use the padded batched form (StackedLoras) instead of the segment loop."""
    cache = StackCache() if stacked else None
    order = lora_order(adapters) or list(range(len(prompts)))
    prompts = [prompts[i] for i in order]
    adapters = [adapters[i] for i in order]
    kv = KVCache.for_model(model.config, num_slots=sum(map(len, prompts)) + len(prompts) * n, dtype=torch.float32)
    pool = SlotPool(kv.num_slots, seed=2)
    tables = [pool.take(len(p)) for p in prompts]
    fb = ForwardBatch.from_lists(prompts, tables)
    fb.lora = LoraBatch.from_rows(fb.extend_lens, adapters)
    logits = model.compute_logits(model.forward(fb, kv))
    prompt_logits, row = [], 0
    for p in prompts:
        prompt_logits.append(logits[row:row + len(p)])
        row += len(p)
    outputs = [[int(prompt_logits[b][-1].argmax())] for b in range(len(prompts))]
    for _ in range(n - 1):
        tables = [t + pool.take(1) for t in tables]
        fb = ForwardBatch.from_lists([[o[-1]] for o in outputs], tables)
        fb.lora = LoraBatch.from_rows(fb.extend_lens, adapters, cache, min_segments=2)
        assert (fb.lora.stacked is not None) == stacked
        for o, t in zip(outputs, model.compute_logits(model.forward(fb, kv)).argmax(-1).tolist()):
            o.append(t)
    back = [0] * len(order)
    for j, i in enumerate(order):
        back[i] = j
    return [prompt_logits[back[i]] for i in range(len(order))], [outputs[back[i]] for i in range(len(order))]
