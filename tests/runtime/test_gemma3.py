"""Gemma 3 against transformers' Gemma3ForCausalLM on a tiny random config (fp32).

The window (6) is far shorter than the prompts (up to 40 tokens), so local layers must cut their keys;
chunked schedules put a cached prefix in front of extend chunks, the case where the window mask and the
causal mask combine. Norm weights are random (near 1), so a missed 1 + w or a swapped norm shows.
"""

from __future__ import annotations

import importlib
import os
import random
import sys

import pytest
import torch

from sgl.kernels.attention import AttentionMetadata, paged_attention
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.gemma3 import Gemma3ForCausalLM, gemma_rms_norm
from tests.runtime.tiny_llama_oracle import (VOCAB, greedy_generate, hf_greedy, hf_logits, make_hf_model,
                                             random_prompts, rel_err, run_schedule)

pytestmark = pytest.mark.timeout(300)
WINDOW = 6
LENGTHS = [7, 1, 23, 40, 2]


def import_transformers_gemma3() -> None:
    """Import transformers' hub-kernel glue (which Gemma 3's modeling imports) with the repo root off
    sys.path: our `kernels/` folder would otherwise shadow the PyPI `kernels` package it imports."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        importlib.import_module("transformers.integrations.hub_kernels")
        importlib.import_module("transformers.models.gemma3.modeling_gemma3")
    finally:
        sys.path[:] = saved


def tiny_gemma3_config():
    import_transformers_gemma3()
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=12, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    hf = make_hf_model(tiny_gemma3_config(), seed=13)
    ours = Gemma3ForCausalLM(ModelConfig.from_hf(hf.config))
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def test_config_from_hf_reads_gemma_fields() -> None:
    cfg = ModelConfig.from_hf(tiny_gemma3_config())
    assert cfg.architecture == "gemma3" and cfg.sliding_window == WINDOW
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1e6, 1e4, 12.0)


def _schedules(seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    prefix = {b: rng.choice([0, 1, 5, 20]) for b in range(len(LENGTHS))}
    chunks: dict = {}

    def prefix_then_chunks(b: int, step: int, remaining: int) -> int:
        return prefix[b] if step == 0 else chunks.setdefault((b, step), rng.choice([1, 2, 3, 8]))

    return {"one_prefill": lambda b, step, remaining: remaining, "prefix_then_chunks": prefix_then_chunks,
            "token_by_token": lambda b, step, remaining: 1}


@pytest.mark.parametrize("schedule", ["one_prefill", "prefix_then_chunks", "token_by_token"])
def test_logits_match_transformers(models, schedule: str) -> None:
    hf, ours = models
    prompts = random_prompts(LENGTHS, seed=1)
    got = run_schedule(ours, prompts, _schedules(seed=2)[schedule], seed=3)
    for prompt, logits in zip(prompts, got):
        err = rel_err(logits, hf_logits(hf, prompt))
        assert err < 1e-4, f"{schedule}: prompt of {len(prompt)} tokens, relative error {err:.2e}"


def test_greedy_generation_matches_transformers(models) -> None:
    hf, ours = models
    for prompt in random_prompts([5, 12], seed=4):  # 32 new tokens: well past the window
        assert greedy_generate(ours, [prompt], max_new_tokens=32)[0] == hf_greedy(hf, prompt, max_new_tokens=32)


def test_gemma_rms_norm_is_one_plus_w() -> None:
    x, w = torch.randn(3, 8), torch.randn(8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    torch.testing.assert_close(gemma_rms_norm(x, 1 + w, 1e-6), want)


@pytest.mark.parametrize("ext,seq", [(1, 20), (9, 9), (5, 17), (12, 30)])
def test_sliding_window_attention_matches_a_dense_masked_reference(ext: int, seq: int) -> None:
    torch.manual_seed(0)
    window, heads, kv_heads, d = 4, 2, 1, 8
    slots = torch.randperm(64)[:seq]
    k_buf, v_buf = torch.randn(64, kv_heads, d), torch.randn(64, kv_heads, d)
    q = torch.randn(ext, heads, d)
    meta = AttentionMetadata.build([ext], [seq], [slots], sliding_window=window)
    got = paged_attention(q, k_buf, v_buf, meta, scale=0.3)
    q_pos, k_pos = torch.arange(seq - ext, seq)[:, None], torch.arange(seq)[None, :]
    mask = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [E, L]
    k, v = k_buf[slots, 0], v_buf[slots, 0]  # [L, D]
    scores = (q @ k.T * 0.3).masked_fill(~mask[:, None, :], float("-inf"))  # [E, H, L]
    torch.testing.assert_close(got, scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)
