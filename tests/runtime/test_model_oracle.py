"""Our Llama-family forward pass against transformers on tiny random models (fp32).

Logits must match to 1e-4 relative error however the tokens are scheduled: one prefill, a prefix
then mixed chunks (chunked prefill next to decode rows), or token by token; greedy generation must
produce the same 64 tokens as transformers' generate.
"""

from __future__ import annotations

import random

import pytest
import torch

from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM

from tests.runtime.tiny_llama_oracle import (
    greedy_generate,
    hf_greedy,
    hf_logits,
    make_hf_model,
    ours_from_hf,
    random_prompts,
    rel_err,
    run_schedule,
    tiny_hf_configs,
)

pytestmark = pytest.mark.timeout(300)

CONFIGS = tiny_hf_configs()
LENGTHS = [7, 1, 23, 50, 2]  # beyond llama3_rope's original 32 positions


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    torch.set_num_threads(1)
    hf = make_hf_model(CONFIGS[request.param], seed=hash(request.param) % 1000)
    return request.param, hf, ours_from_hf(hf)


def _schedules(seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    prefix = {b: rng.choice([0, 1, 5, 20]) for b in range(len(LENGTHS))}
    chunks = {}

    def prefix_then_chunks(b: int, step: int, remaining: int) -> int:
        if step == 0:
            return prefix[b]  # 0: this sequence joins at step 1
        return chunks.setdefault((b, step), rng.choice([1, 1, 2, 3, 8]))

    return {
        "one_prefill": lambda b, step, remaining: remaining,
        "prefix_then_chunks": prefix_then_chunks,
        "token_by_token": lambda b, step, remaining: 1,
    }


@pytest.mark.parametrize("schedule", ["one_prefill", "prefix_then_chunks", "token_by_token"])
def test_logits_match_transformers(models, schedule: str) -> None:
    name, hf, ours = models
    prompts = random_prompts(LENGTHS, seed=1)
    got = run_schedule(ours, prompts, _schedules(seed=2)[schedule], seed=3)
    for prompt, logits in zip(prompts, got):
        want = hf_logits(hf, prompt)
        assert logits.shape == want.shape
        err = rel_err(logits, want)
        assert err < 1e-4, f"{name}/{schedule}: prompt of {len(prompt)} tokens, relative error {err:.2e}"


def test_greedy_generation_matches_transformers(models) -> None:
    name, hf, ours = models
    prompts = random_prompts([5, 12, 1, 30], seed=4)
    got = greedy_generate(ours, prompts, max_new_tokens=64)
    for prompt, tokens in zip(prompts, got):
        want = hf_greedy(hf, prompt, max_new_tokens=64)
        assert tokens == want, f"{name}: greedy tokens differ for a prompt of {len(prompt)} tokens"


def test_load_weights_names_missing_and_unexpected() -> None:
    hf = make_hf_model(CONFIGS["llama_gqa_untied"])
    cfg = ModelConfig.from_hf(hf.config)
    state = dict(hf.state_dict())

    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        LlamaForCausalLM(cfg).load_weights(missing.items())

    extra = dict(state, **{"model.layers.0.mlp.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected weights.*model\.layers\.0\.mlp\.extra\.weight"):
        LlamaForCausalLM(cfg).load_weights(extra.items())

    wrong = dict(state, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight: checkpoint shape \(3,\)"):
        LlamaForCausalLM(cfg).load_weights(wrong.items())

    # rotary inv_freq buffers of older checkpoints are ignored
    ok = dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})
    LlamaForCausalLM(cfg).load_weights(ok.items())


def test_tied_model_loads_without_lm_head_entry() -> None:
    hf = make_hf_model(CONFIGS["llama_mha_tied"])
    ours = LlamaForCausalLM(ModelConfig.from_hf(hf.config))
    ours.load_weights((k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight")
    assert ours.embed_weight.data_ptr() == ours.lm_head_t.data_ptr()  # one tensor
    prompt = random_prompts([9], seed=5)[0]
    got = run_schedule(ours, [prompt], lambda b, step, remaining: remaining)[0]
    assert rel_err(got, hf_logits(hf, prompt)) < 1e-4


def test_unsupported_rope_type_is_named() -> None:
    cfg = ModelConfig.from_hf(dict(CONFIGS["llama_gqa_untied"].to_dict(), rope_scaling={"rope_type": "longrope", "factor": 2.0}))
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'longrope'"):
        LlamaForCausalLM(cfg)
