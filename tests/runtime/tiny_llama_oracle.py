"""Helpers for oracle tests: tiny transformers models and a driver that runs our model step by step."""

from __future__ import annotations

import random
from typing import Callable, Optional

import torch

from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512)


def tiny_hf_configs() -> dict[str, object]:
    """name -> transformers config; each exercises one family feature."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama_gqa_untied": LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        "llama_mha_tied": LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
        "llama_attention_bias": LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
        "llama3_rope": LlamaConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32},
        ),
        "llama_linear_rope": LlamaConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}
        ),
        "llama_yarn_rope": LlamaConfig(
            **COMMON, num_attention_heads=4, num_key_value_heads=2,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        ),
        "qwen2_bias_tied": Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        # head_dim 32 * 4 heads != hidden 64: q_size differs from hidden_size
        "mistral_head_dim": MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                          sliding_window=None, tie_word_embeddings=False),
    }


def make_hf_model(hf_config, seed: int = 0):
    """A transformers model with every parameter random (norm weights near 1, nonzero biases), so
    that swapped norms or dropped biases change the output. Large weights make argmax margins wide."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def ours_from_hf(hf_model) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf(hf_model.config), dtype=torch.float32)
    model.load_weights(hf_model.state_dict().items())
    return model


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def hf_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([prompt])).logits[0].float()  # [L, V]


class SlotPool:
    """Hands out KV slots in a shuffled order, so sequences get non-contiguous, interleaved slots."""

    def __init__(self, num_slots: int, seed: int = 0) -> None:
        self.free = list(range(num_slots))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free), "test pool exhausted"
        out, self.free = self.free[:n], self.free[n:]
        return out


# chunk(seq_index, step, remaining) -> how many of that sequence's tokens to feed this step (0 = skip)
ChunkFn = Callable[[int, int, int], int]


def run_schedule(model: LlamaForCausalLM, prompts: list[list[int]], chunk: ChunkFn, seed: int = 0,
                 generated_from: Optional[int] = None) -> list[torch.Tensor]:
    """Feed every prompt through our model in steps decided by `chunk`; one batch per step mixing all
    sequences that have tokens left. Returns each prompt's logits [L, V], one row per token. Tokens from
    index `generated_from` on count as generated ones (ForwardBatch.generated_only: decode steps)."""
    cfg = model.config
    kv = KVCache.for_model(cfg, num_slots=sum(map(len, prompts)) + 64, dtype=torch.float32)
    pool = SlotPool(kv.num_slots, seed)
    done = [0] * len(prompts)
    tables: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while any(d < len(p) for d, p in zip(done, prompts)):
        batch = []
        for b, p in enumerate(prompts):
            n = min(chunk(b, step, len(p) - done[b]), len(p) - done[b])
            if n > 0:
                tables[b] = tables[b] + pool.take(n)
                batch.append((b, p[done[b] : done[b] + n]))
        step += 1
        if not batch:
            continue
        generated = generated_from is not None and all(done[b] >= generated_from for b, _ in batch)
        fb = ForwardBatch.from_lists([ids for _, ids in batch], [tables[b] for b, _ in batch], generated_only=generated)
        logits = model.compute_logits(model.forward(fb, kv))  # [T, V]
        row = 0
        for b, ids in batch:
            rows[b].append(logits[row : row + len(ids)])
            row += len(ids)
            done[b] += len(ids)
    return [torch.cat(r) for r in rows]


def greedy_generate(model: LlamaForCausalLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Batched greedy decoding: one prefill step for all prompts, then one decode step per token."""
    kv = KVCache.for_model(model.config, num_slots=sum(map(len, prompts)) + len(prompts) * max_new_tokens, dtype=torch.float32)
    pool = SlotPool(kv.num_slots, seed=1)
    tables = [pool.take(len(p)) for p in prompts]
    fb = ForwardBatch.from_lists(prompts, tables)
    next_ids = model.compute_logits(model.forward(fb, kv)[fb.last_token_indices]).argmax(-1).tolist()
    outputs = [[t] for t in next_ids]
    for _ in range(max_new_tokens - 1):
        tables = [t + pool.take(1) for t in tables]
        fb = ForwardBatch.from_lists([[o[-1]] for o in outputs], tables, generated_only=True)
        next_ids = model.compute_logits(model.forward(fb, kv)).argmax(-1).tolist()
        for o, t in zip(outputs, next_ids):
            o.append(t)
    return outputs


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, **kwargs,
        )
    return out[0, len(prompt):].tolist()
