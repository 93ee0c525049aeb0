"""Multi-LoRA against PEFT: a tiny random model and two random adapters (B not zero, different
ranks, targets and scalings), one mixed batch of base / adapter-1 / adapter-2 rows; our logits and
greedy tokens must equal PEFT's row by row, for fp32 and native (quantized) linear weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sgl.runtime.lora.adapter import AdapterError
from sgl.runtime.lora.segmented import LoraBatch, LoraSegment, StackedLoras, lora_delta_reference, stack_adapters

from tests.runtime.lora_oracle import (ALL_TARGETS, add_random_adapters, adapter_dir, load_ours, mixed_batch_greedy,
                                       peft_greedy, peft_logits)
from tests.runtime.tiny_llama_oracle import make_hf_model, ours_from_hf, random_prompts, rel_err, tiny_hf_configs

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(300)

SPECS = {
    # every target, alpha/r
    "a1": dict(r=4, lora_alpha=8, target_modules=ALL_TARGETS, lora_dropout=0.1),
    # a subset (k and up not targeted: zero blocks of the fused B), rank 2, rsLoRA's alpha/sqrt(r)
    "a2": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], use_rslora=True),
}
ROW_ADAPTERS = ["a1", None, "a2", "a1", None, "a2"]  # interleaved on purpose: the runner groups them
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"], seed=5)
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = ours_from_hf(hf)  # before PEFT wraps the modules
    out = str(tmp_path_factory.mktemp("adapters"))
    peft_model = add_random_adapters(hf, SPECS, out, seed=7)
    adapters = {name: load_ours(ours, name, adapter_dir(out, name)) for name in SPECS}
    prompts = random_prompts([11, 5, 17, 3, 9, 6], seed=4)
    return ours, peft_model, adapters, prompts, base_state, out


def _check_against_peft(model, setup, tol: float = 1e-4, stacked: bool = False) -> None:
    _, peft_model, adapters, prompts, _, _ = setup
    rows = [adapters[a] if a else None for a in ROW_ADAPTERS]
    logits, tokens = mixed_batch_greedy(model, prompts, rows, NEW_TOKENS, stacked)
    for prompt, name, got_logits, got_tokens in zip(prompts, ROW_ADAPTERS, logits, tokens):
        want = peft_logits(peft_model, prompt, name)
        assert rel_err(got_logits, want) < tol, f"row with adapter {name}: rel err {rel_err(got_logits, want):.2e}"
        assert got_tokens == peft_greedy(peft_model, prompt, name, NEW_TOKENS), f"adapter {name}"


def test_adapters_change_the_output(setup) -> None:
    _, peft_model, _, prompts, _, _ = setup
    base = peft_logits(peft_model, prompts[0], None)
    for name in SPECS:  # B is not zero: an oracle that passes with the adapter ignored would be void
        assert rel_err(peft_logits(peft_model, prompts[0], name), base) > 1e-2


@pytest.mark.parametrize("stacked", [False, True], ids=["segment_loop", "stacked_bmm"])
def test_mixed_batch_equals_peft_fp32(setup, stacked: bool) -> None:
    _check_against_peft(setup[0], setup, stacked=stacked)


def test_mixed_batch_equals_peft_native_weights(setup) -> None:
    """Native q8_0 linears + LoRA vs PEFT on the same dequantized base weights."""
    from tests.runtime.test_native_weights import quantized_pair

    ours, peft_model, _, _, base_state, out = setup
    native, ref = quantized_pair(base_state, ours.config, "q8_0")
    # PEFT's base layers get exactly the dequantized values the native blocks hold
    deq = ref.hf_weights()
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "base_layer") and f"{name}.weight" in deq:
                module.base_layer.weight.copy_(deq[f"{name}.weight"])
        peft_model.base_model.model.lm_head.weight.copy_(deq["lm_head.weight"])
        peft_model.base_model.model.model.embed_tokens.weight.copy_(deq["model.embed_tokens.weight"])
    try:
        adapters = {name: load_ours(native, name, adapter_dir(out, name)) for name in SPECS}
        _check_against_peft(native, (native, peft_model, adapters, setup[3], None, None), stacked=True)
    finally:
        with torch.no_grad():  # restore the fp32 base for the other tests of the module
            for name, module in peft_model.base_model.model.named_modules():
                if hasattr(module, "base_layer") and f"{name}.weight" in base_state:
                    module.base_layer.weight.copy_(base_state[f"{name}.weight"])
            peft_model.base_model.model.lm_head.weight.copy_(base_state["lm_head.weight"])
            peft_model.base_model.model.model.embed_tokens.weight.copy_(base_state["model.embed_tokens.weight"])


def test_segmented_update_equals_token_by_token_reference(setup) -> None:
    _, _, adapters, _, _, _ = setup
    torch.manual_seed(0)
    a1, a2 = adapters["a1"].layers, adapters["a2"].layers
    per_row = [None, None, a1, a1, a1, a2, a2, None]  # token rows, grouped as the runner groups them
    segments = [LoraSegment(2, 5, a1), LoraSegment(5, 7, a2)]
    stacked = StackedLoras(segments, stack_adapters([a1, a2]), torch.device("cpu"))  # a2 padded from 2 to 3 rows
    for batch in (LoraBatch(segments), LoraBatch(segments, stacked)):
        for linear, n_in, n_out in (("qkv", 64, 128), ("o", 64, 64), ("gate_up", 64, 192), ("down", 96, 64)):
            x = torch.randn(len(per_row), n_in)
            out = torch.zeros(len(per_row), n_out)
            batch.apply(out, x, 1, linear)
            torch.testing.assert_close(out, lora_delta_reference(x, per_row, 1, linear, n_out), rtol=1e-5, atol=1e-6)


def test_bad_adapters_are_refused_with_the_reason(setup, tmp_path) -> None:
    ours, _, _, _, _, out = setup
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_ours(ours, "x", str(tmp_path))
    bad = tmp_path / "dora"
    bad.mkdir()
    cfg = json.load(open(os.path.join(out, "a1", "adapter_config.json")))
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes(open(os.path.join(out, "a1", "adapter_model.safetensors"), "rb").read())
    with pytest.raises(AdapterError, match="DoRA"):
        load_ours(ours, "x", str(bad))
    with pytest.raises(AdapterError, match="lora_name"):
        load_ours(ours, "a:b", os.path.join(out, "a1"))
