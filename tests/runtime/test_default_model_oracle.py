"""The default model (SmolLM2-135M-Instruct GGUF, dequantized to fp32) against transformers.

transformers builds the model from its OWN reading of the GGUF config (AutoConfig with gguf_file),
and gets our dequantized weights; logits must agree to 1e-4 and 64 greedy tokens must be identical.
"""

from __future__ import annotations

import os

import pytest
import torch

from sgl.runtime.models.default_model import default_model_path
from sgl.runtime.models.gguf_loader import read_gguf
from sgl.runtime.models.llama import LlamaForCausalLM

from tests.runtime.tiny_llama_oracle import greedy_generate, hf_greedy, hf_logits, rel_err, run_schedule

pytestmark = pytest.mark.timeout(300)

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    path = default_model_path()
    gguf = read_gguf(path, show_progress=False)
    weights = dict(gguf.weights)
    ours = LlamaForCausalLM(gguf.config)
    ours.load_weights(weights.items())

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, LlamaForCausalLM as HFLlama
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder, name = os.path.split(path)
    hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    hf_config._attn_implementation = "sdpa"
    hf = HFLlama(hf_config).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, weights["model.embed_tokens.weight"])
    hf.generation_config.eos_token_id = None  # exactly 64 tokens on both sides
    hf.generation_config.pad_token_id = 0
    del weights
    prompts = [gguf.tokenizer.encode(p) for p in PROMPTS]
    return ours, hf, prompts


def test_config_matches_transformers_reading(models) -> None:
    ours, hf, _ = models
    c, h = ours.config, hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads)
    assert c.rope_theta == h.rope_parameters["rope_theta"] and c.rms_norm_eps == pytest.approx(h.rms_norm_eps)


def test_logits_match_transformers(models) -> None:
    ours, hf, prompts = models
    # one batch with all prompts, and the same prompts split into a prefix step plus chunks
    for schedule in (lambda b, step, remaining: remaining, lambda b, step, remaining: 4 if step == 0 else 3):
        got = run_schedule(ours, prompts, schedule)
        for prompt, logits in zip(prompts, got):
            err = rel_err(logits, hf_logits(hf, prompt))
            assert err < 1e-4, f"prompt of {len(prompt)} tokens: relative error {err:.2e}"


def test_greedy_64_tokens_match_transformers(models) -> None:
    ours, hf, prompts = models
    prompts = prompts[1:]  # NOTE: two prompts keep the test near 30 s (transformers decodes ~15 tok/s)
    got = greedy_generate(ours, prompts, max_new_tokens=64)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf, prompt, max_new_tokens=64), f"greedy tokens differ for {len(prompt)}-token prompt"
