"""The fused decode paths (runtime/models/fused_decode.py: the layers in one C++ call, for one token or for up
to 64 token rows) against the unfused layer (LlamaDecoderLayer.forward, the reference) on tiny random models
with native weights: the same logits up to float rounding, the path really taken on decode steps, batches and
short chunks, a batch's rows bit-identical to each row alone, and not taken where it does not apply (fp32
activations, fp32 models, chunks of more than 64 rows)."""

from __future__ import annotations

import pytest
import torch

import sgl.runtime.models.fused_decode as fused_decode
from sgl.kernels.cpu import extension_available
from sgl.runtime.models.config import ModelConfig

from .test_native_weights import assert_close, quantized_pair
from .tiny_llama_oracle import greedy_generate, make_hf_model, random_prompts, run_schedule, tiny_hf_configs

pytestmark = pytest.mark.skipif(not extension_available(), reason="the sgl.kernels.cpu extension is not built")


@pytest.fixture
def count_fused(monkeypatch) -> list[int]:
    """Counts the token-layers the fused kernels run (the real kernels run): decode_stack's layers, decode_layer's,
    and decode_rows' layers x rows."""
    calls = [0]
    real_layer, real_stack, real_rows = fused_decode.decode_layer, fused_decode.decode_stack, fused_decode.decode_rows

    def counted_layer(*args, **kwargs):
        calls[0] += 1
        return real_layer(*args, **kwargs)

    def counted_stack(h, stack, *args, **kwargs):
        calls[0] += len(stack.layers)
        return real_stack(h, stack, *args, **kwargs)

    def counted_rows(h, stack, *args, **kwargs):
        calls[0] += len(stack.layers) * h.shape[0]
        return real_rows(h, stack, *args, **kwargs)

    monkeypatch.setattr(fused_decode, "decode_layer", counted_layer)
    monkeypatch.setattr(fused_decode, "decode_rows", counted_rows)
    monkeypatch.setattr(fused_decode, "decode_stack", counted_stack)
    return calls


def run(model, prompts, fused: bool) -> list[torch.Tensor]:
    chunk = lambda b, step, left: 8 if step == 0 else 1  # noqa: E731  (a prefill chunk, then 1-token steps)
    saved = fused_decode.ENABLED
    fused_decode.ENABLED = fused
    try:
        return run_schedule(model, prompts, chunk)
    finally:
        fused_decode.ENABLED = saved


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_bias_tied", "llama_attention_bias"])
def test_fused_decode_equals_unfused_layers(name: str, qtype: str, count_fused: list[int]) -> None:
    hf = make_hf_model(tiny_hf_configs()[name])
    cfg = ModelConfig.from_hf(hf.config)
    native, ref = quantized_pair(hf.state_dict(), cfg, qtype)
    prompts = random_prompts([40], seed=7)
    want = run(native, prompts, fused=False)[0]
    assert count_fused[0] == 0
    got = run(native, prompts, fused=True)[0]
    assert count_fused[0] == 40 * cfg.num_hidden_layers  # the 8-token chunk (decode_rows) and every 1-token step
    # Both paths quantize activations to q16 (and the rope, silu and softmax roundings differ), which random
    # tiny weights amplify to ~1e-4 of the logits: so the fused error against the exact fp32 model must be
    # of the same size as the unfused one's (measured 0.9-1.1x), and both paths close to each other.
    exact = run(ref, prompts, fused=False)[0]
    err_fused, err_unfused = (got - exact).abs().max(), (want - exact).abs().max()
    assert err_fused <= 1.5 * err_unfused + 1e-6 * exact.abs().max(), (err_fused, err_unfused)
    assert_close(got, want, rel=1e-3)


def test_batches_fuse_and_each_row_has_its_bits_alone(count_fused: list[int]) -> None:
    """Two sequences decoding together (decode_rows) produce the logits of each decoding alone (decode_stack):
    bit for bit, so batch composition never changes a request's tokens. A 70-token chunk stays unfused."""
    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    native, ref = quantized_pair(hf.state_dict(), ModelConfig.from_hf(hf.config), "q4_1")
    layers = native.config.num_hidden_layers
    prompts = random_prompts([9, 12], seed=2)
    batched = greedy_generate(native, prompts, 6)
    assert count_fused[0] == (9 + 12 + 2 * 5) * layers
    alone = [greedy_generate(native, [p], 6)[0] for p in prompts]
    assert alone == batched
    one_step = lambda b, step, left: 1 if step else 8  # noqa: E731
    rows = run_schedule(native, prompts, one_step)  # per-step logits of both sequences, decoded together
    solo = [run_schedule(native, [p], one_step)[0] for p in prompts]
    assert all(torch.equal(r, s) for r, s in zip(rows, solo))  # the chunk and every decode step: the same bits
    before = count_fused[0]
    greedy_generate(ref, prompts[:1], 4)  # an fp32 model never fuses
    greedy_generate(native, random_prompts([70], seed=3), 1)  # 70 rows: the torch path (decode_rows takes <= 64)
    assert count_fused[0] == before


def test_fused_decode_off_with_fp32_activations(count_fused: list[int]) -> None:
    from sgl.kernels import cpu

    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    native, _ = quantized_pair(hf.state_dict(), ModelConfig.from_hf(hf.config), "q8_0")
    cpu.set_act_quant("none")
    try:
        greedy_generate(native, random_prompts([5], seed=1), 3)
    finally:
        cpu.set_act_quant("q16")
    assert count_fused[0] == 0  # the kernel computes q16 activations: exact mode keeps the unfused path


def test_engine_decode_takes_the_fused_path(count_fused: list[int]) -> None:
    """Through the real scheduler and runner (default model, native, 2 threads): the prompt and the decode
    steps run fused, and the greedy tokens equal the unfused layers' (and the KV stays intact)."""
    from sgl.runtime.engine import Engine

    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    eng = Engine(model_path="default", num_threads=2, max_total_tokens=2048, show_progress=False)
    try:
        out = eng.generate("The capital of France is", params)
        fused, prompt = out["output_ids"], out["meta_info"]["prompt_tokens"]
        layers = 30  # SmolLM2-135M
        want = (prompt + 12 - 1) * layers  # the short prompt's chunk (decode_rows) and every decode step, every layer
        assert count_fused[0] == want, count_fused[0]
        fused_decode.ENABLED = False
        try:
            eng.flush_cache()
            unfused = eng.generate("The capital of France is", params)["output_ids"]
        finally:
            fused_decode.ENABLED = True
        assert count_fused[0] == want
        assert fused == unfused
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()
