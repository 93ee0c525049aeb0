"""LoRA on Gemma 3 against PEFT: a tiny random Gemma 3 (local + global layers) and two random adapters
(B not zero), one mixed batch of base / adapter-1 / adapter-2 rows; our logits and greedy tokens equal
PEFT's row by row. Gemma's LoRA deltas go in before its post-attention / post-feedforward norms."""

from __future__ import annotations

import pytest
import torch

from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.gemma3 import Gemma3ForCausalLM
from tests.runtime.lora_oracle import (ALL_TARGETS, adapter_dir, add_random_adapters, load_ours, mixed_batch_greedy,
                                       peft_greedy, peft_logits)
from tests.runtime.test_gemma3 import tiny_gemma3_config
from tests.runtime.tiny_llama_oracle import make_hf_model, random_prompts, rel_err

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(300)

SPECS = {"a1": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS),
         "a2": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_rslora=True)}
ROWS = ["a1", None, "a2", "a1"]
NEW = 6


def test_mixed_adapter_batch_equals_peft(tmp_path) -> None:
    torch.set_num_threads(1)
    hf = make_hf_model(tiny_gemma3_config(), seed=13)
    ours = Gemma3ForCausalLM(ModelConfig.from_hf(hf.config))
    ours.load_weights(hf.state_dict().items())  # before PEFT wraps the modules
    peft_model = add_random_adapters(hf, SPECS, str(tmp_path), seed=3, std=0.1)
    adapters = {n: load_ours(ours, n, adapter_dir(str(tmp_path), n)) for n in SPECS}
    prompts = random_prompts([9, 4, 14, 7], seed=2)  # past the window (6): local layers cut their keys
    logits, tokens = mixed_batch_greedy(ours, prompts, [adapters[a] if a else None for a in ROWS], NEW)
    base = peft_logits(peft_model, prompts[0], None)
    for prompt, name, got_logits, got_tokens in zip(prompts, ROWS, logits, tokens):
        want = peft_logits(peft_model, prompt, name)
        if name is not None:  # the adapter matters: an oracle passing with it ignored would be void
            assert rel_err(peft_logits(peft_model, prompts[0], name), base) > 1e-2
        assert rel_err(got_logits, want) < 1e-4, f"row with adapter {name}: rel err {rel_err(got_logits, want):.2e}"
        assert got_tokens == peft_greedy(peft_model, prompt, name, NEW), f"adapter {name}"
