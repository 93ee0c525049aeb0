"""The fused decode paths (runtime/models/fused_decode.py: the layers in one C++ call, for one token or for up
to 64 token rows) against the unfused layer (LlamaDecoderLayer.forward, the reference) on tiny random models
with native weights: the same logits up to float rounding, the path really taken on decode steps, decode
batches and short steps' prompt tokens, a batch's rows bit-identical to each row alone, and not taken where it
does not apply (long prompt chunks, fp32 activations, fp32 models)."""

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
    and decode_rows' layers x rows. Short steps' prompt rows stay on the prefill path here (SHORT_STEP_ROWS 0), as
    these tests are about decode rows; test_short_steps_run_prompt_tokens_as_decode_rows is about them."""
    monkeypatch.setattr(fused_decode, "SHORT_STEP_ROWS", 0)
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
    assert count_fused[0] == (40 - 8) * cfg.num_hidden_layers  # every 1-token step, every layer
    # Both paths quantize activations to q16 (and the rope, silu and softmax roundings differ), which random
    # tiny weights amplify to ~1e-4 of the logits: so the fused error against the exact fp32 model must be
    # of the same size as the unfused one's (measured 0.9-1.1x), and both paths close to each other.
    exact = run(ref, prompts, fused=False)[0]
    err_fused, err_unfused = (got - exact).abs().max(), (want - exact).abs().max()
    assert err_fused <= 1.5 * err_unfused + 1e-6 * exact.abs().max(), (err_fused, err_unfused)
    assert_close(got, want, rel=1e-3)
    assert torch.equal(got[:8], want[:8])  # the prompt chunk takes the prefill path either way


def test_batches_fuse_and_each_row_has_its_bits_alone(count_fused: list[int]) -> None:
    """Two sequences decoding together (decode_rows) produce the logits of each decoding alone (decode_stack):
    bit for bit, so batch composition never changes a request's tokens. Prompt chunks stay unfused."""
    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    native, ref = quantized_pair(hf.state_dict(), ModelConfig.from_hf(hf.config), "q4_1")
    layers = native.config.num_hidden_layers
    prompts = random_prompts([9, 12], seed=2)
    batched = greedy_generate(native, prompts, 6)
    assert count_fused[0] == 2 * 5 * layers  # the decode steps' rows; not the prompts
    alone = [greedy_generate(native, [p], 6)[0] for p in prompts]
    assert alone == batched
    one_step = lambda b, step, left: 1 if step else 8  # noqa: E731
    rows = run_schedule(native, prompts, one_step, generated_from=8)  # steps after the chunk: decode batches
    solo = [run_schedule(native, [p], one_step, generated_from=8)[0] for p in prompts]
    assert all(torch.equal(r[8:], s[8:]) for r, s in zip(rows, solo))  # the same bits, batched or alone
    before = count_fused[0]
    greedy_generate(ref, prompts[:1], 4)  # an fp32 model never fuses
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


def test_q8_activations_fuse_too(count_fused: list[int]) -> None:
    """With q8 activations (--cpu-act-quant q8) decode steps take the fused kernels too (int8 activations: the q8
    contract), as close to the exact model as the unfused q8 layers are, and a decode batch's rows keep the bits
    of each row alone."""
    from sgl.kernels import cpu

    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    cfg = ModelConfig.from_hf(hf.config)
    native, ref = quantized_pair(hf.state_dict(), cfg, "q4_1")
    prompts = random_prompts([40], seed=7)
    exact = run(ref, prompts, fused=False)[0]
    cpu.set_act_quant("q8")
    try:
        want = run(native, prompts, fused=False)[0]
        assert count_fused[0] == 0
        got = run(native, prompts, fused=True)[0]
        assert count_fused[0] == (40 - 8) * cfg.num_hidden_layers
        one_step = lambda b, step, left: 1 if step else 8  # noqa: E731
        pair = random_prompts([9, 12], seed=2)
        rows = run_schedule(native, pair, one_step, generated_from=8)  # decode batches of 2 rows
        solo = [run_schedule(native, [p], one_step, generated_from=8)[0] for p in pair]
    finally:
        cpu.set_act_quant("q16")
    err_fused, err_unfused = (got - exact).abs().max(), (want - exact).abs().max()
    assert err_fused <= 1.5 * err_unfused + 1e-6 * exact.abs().max(), (err_fused, err_unfused)
    assert_close(got, want, rel=1e-3)  # the same matmul contract: only the rope, silu and softmax roundings differ
    assert not torch.equal(got, exact)  # q8 really ran
    assert all(torch.equal(r[8:], s[8:]) for r, s in zip(rows, solo))


def test_engine_decode_takes_the_fused_path(count_fused: list[int]) -> None:
    """Through the real scheduler and runner (default model, native, 2 threads): the final prompt token and
    the decode steps run fused, and the greedy tokens equal the unfused layers' (and the KV stays intact)."""
    from sgl.runtime.engine import Engine

    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    eng = Engine(model_path="default", num_threads=2, max_total_tokens=2048, show_progress=False)
    try:
        out = eng.generate("The capital of France is", params)
        fused = out["output_ids"]
        layers = 30  # SmolLM2-135M
        want = 12 * layers  # the final prompt token (a decode row) and every decode step, every layer
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


def test_a_decode_row_beside_a_prefill_chunk_keeps_its_bits(count_fused: list[int]) -> None:
    """A step mixing one sequence's decode token with another's prompt chunk (ForwardBatch.decode_tails) runs
    the chunk first, then the decode token as a decode row: its logits are those of decoding alone."""
    from sgl.runtime.executor.forward_batch import ForwardBatch
    from sgl.runtime.executor.kv_cache import KVCache

    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    native, _ = quantized_pair(hf.state_dict(), ModelConfig.from_hf(hf.config), "q4_1")
    pa, pb = random_prompts([12, 20], seed=4)
    table_a, table_b = list(range(0, 13)), list(range(40, 60))

    def step(mixed: bool) -> torch.Tensor:
        kv = KVCache.for_model(native.config, num_slots=64, dtype=torch.float32)
        native.forward(ForwardBatch.from_lists([pa], [table_a[:12]]), kv)
        if not mixed:
            fb = ForwardBatch.from_lists([[7]], [table_a], generated_only=True, decode_tails=[1])
            return native.compute_logits(native.forward(fb, kv))[0]
        fb = ForwardBatch.from_lists([[7], pb], [table_a, table_b], decode_tails=[1, 0])
        return native.compute_logits(native.forward(fb, kv)[:1])[0]

    alone = step(mixed=False)
    before = count_fused[0]
    mixed = step(mixed=True)
    assert count_fused[0] - before == native.config.num_hidden_layers  # the decode row, fused; the chunk not
    assert torch.equal(mixed, alone)


@pytest.mark.parametrize("n,new,chunk", [(5, 16, 0), (5, 16, 20), (1, 1, 100), (2, 9, 100)])
def test_generated_rows_past_max_rows_keep_each_tokens_bits(count_fused: list[int], n: int, new: int,
                                                            chunk: int) -> None:
    """n sequences' rows of `new` generated tokens in one step, beside another prompt's chunk of `chunk` tokens, get the
    logits each token gets when decoded one per step, bit for bit, past decode_rows' MAX_ROWS of 64 too (8 requests
    verifying 8 drafts are 72 rows): the rows run as decode rows in chunks, in row order, and their final norm is the
    decode step's. Before, a 72-row verify step ran the prefill path (88% of such greedy outputs differed from no
    speculation's), and a decode row beside a prompt chunk of 64+ tokens got the torch norm's bits (an ulp apart)."""
    from sgl.runtime.executor.forward_batch import ForwardBatch
    from sgl.runtime.executor.kv_cache import KVCache

    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    native, _ = quantized_pair(hf.state_dict(), ModelConfig.from_hf(hf.config), "q4_1")
    layers = native.config.num_hidden_layers
    prompts = random_prompts([6, 9, 7, 11, 8][:n], seed=6)
    follow = random_prompts([new] * n, seed=7)
    tables = [list(range(100 * b, 100 * b + len(p) + new)) for b, p in enumerate(prompts)]
    other, other_table = random_prompts([chunk], seed=8)[0] if chunk else [], list(range(600, 600 + chunk))

    def prefilled() -> KVCache:
        kv = KVCache.for_model(native.config, num_slots=800, dtype=torch.float32)
        for p, t in zip(prompts, tables):
            native.forward(ForwardBatch.from_lists([p], [t[: len(p)]]), kv)
        return kv

    kv = prefilled()
    one_by_one: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for j in range(new):  # decode steps of one token per sequence (a decode batch: each row its bits alone)
        fb = ForwardBatch.from_lists([[f[j]] for f in follow], [t[: len(p) + j + 1] for p, t in zip(prompts, tables)],
                                     generated_only=True)
        for b, row in enumerate(native.compute_logits(native.forward(fb, kv))):
            one_by_one[b].append(row)
    kv = prefilled()
    before = count_fused[0]
    full = [t[: len(p) + new] for p, t in zip(prompts, tables)]
    if chunk:
        fb = ForwardBatch.from_lists(follow + [other], full + [other_table], decode_tails=[new] * n + [0])
        logits = native.compute_logits(native.forward(fb, kv)[: n * new])
    else:
        fb = ForwardBatch.from_lists(follow, full, generated_only=True, decode_tails=[new] * n)
        logits = native.compute_logits(native.forward(fb, kv))
    assert count_fused[0] - before == n * new * layers  # every generated row fused (the prompt chunk not)
    for b in range(n):
        assert torch.equal(logits[b * new:(b + 1) * new], torch.stack(one_by_one[b])), b


def test_short_steps_run_prompt_tokens_as_decode_rows(count_fused: list[int], monkeypatch) -> None:
    """A step of at most SHORT_STEP_ROWS tokens runs its prompt tokens as decode rows too: each prompt token gets the
    bits it gets when it is fed one token per step (a row's bits depend on its own slot list only), so a short
    prompt's logits do not depend on how it was chunked; close to the prefill path's; longer steps keep it."""
    monkeypatch.setattr(fused_decode, "SHORT_STEP_ROWS", 16)
    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    native, _ = quantized_pair(hf.state_dict(), ModelConfig.from_hf(hf.config), "q4_1")
    layers = native.config.num_hidden_layers
    prompts = random_prompts([12], seed=5)
    whole = run_schedule(native, prompts, lambda b, step, left: 12 if step == 0 else 1)[0]  # one 12-token step
    assert count_fused[0] == 12 * layers  # the prompt's rows, fused
    by_token = run_schedule(native, prompts, lambda b, step, left: 1)[0]
    assert torch.equal(whole, by_token)
    monkeypatch.setattr(fused_decode, "SHORT_STEP_ROWS", 8)  # a 12-token step: the prefill path
    before = count_fused[0]
    prefill = run_schedule(native, prompts, lambda b, step, left: 12 if step == 0 else 1)[0]
    assert count_fused[0] == before
    assert_close(whole, prefill, rel=1e-3)


def test_packed_layer_weights_change_no_token() -> None:
    """Under q8 activations the engine gives the layers' block weights their packed copies (QuantWeight.pack: the fused
    kernels and quant_linear read them for up to 8 rows) unless --disable-cpu-weight-packing: the default model's
    greedy tokens and logprobs are the same either way, for a batch-1 request and a decode batch of 3, and the KV
    stays intact. The engine without packing keeps no copy."""
    from sgl.kernels.cpu import _ext
    from sgl.runtime.engine import Engine

    if not _ext.load().packed_ok(1):  # q8
        pytest.skip("no q8 packed kernel here (no AVX2): no packed copies")
    from sgl.kernels import cpu

    params = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
    prompts = ["The capital of France is", "List three colors:", "def add(a, b):"]
    outs = {}
    saved = cpu.get_act_quant()  # the engine sets the process's mode: later tests expect the default back
    for pack in (True, False):
        eng = Engine(model_path="default", num_threads=1, max_total_tokens=2048, show_progress=False,
                     cpu_act_quant="q8", disable_cpu_weight_packing=not pack)
        try:
            solo = eng.generate(prompts[0], params, return_logprob=True)
            batch = eng.generate(prompts, [params] * 3, return_logprob=True)
            model = eng.scheduler.runner.model
            copies = [bool(w.packed) for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            assert all(copies) if pack else not any(copies)
            assert bool(model.lm_head.packed) == pack
            outs[pack] = [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in [solo, *batch]]
            eng.wait_idle()
            eng.check_integrity()
        finally:
            eng.shutdown()
            cpu.set_act_quant(saved)
    assert outs[True] == outs[False]


def test_pack_into_arena_puts_the_copies_in_one_huge_page_buffer() -> None:
    """pack_into_arena gives each block weight its q8 copy (the bits of a copy made alone) in ONE buffer, back to back
    in the order given, from a 2 MiB boundary; weights that already have one, or cannot pack (f16), are left."""
    from sgl.kernels.cpu import _ext
    from sgl.kernels.cpu.quant import QuantWeight, pack_weight
    from sgl.runtime.models.native_weights import pack_into_arena
    from sgl.runtime.models.weight_arena import HUGE_PAGE

    if not _ext.load().packed_ok(1):  # q8
        pytest.skip("no q8 packed kernel here (no AVX2): no packed copies")
    torch.manual_seed(0)
    shapes = ((24, "q4_1"), (40, "q8_0"), (16, "f16"), (8, "q4_0"))
    ws = [QuantWeight.quantize(torch.randn(n, 64), q) for n, q in shapes]
    had = QuantWeight.quantize(torch.randn(8, 64), "q4_1")
    had.pack("q8")
    before = had.packed["q8"]
    size = pack_into_arena([*ws, had], "q8")
    assert had.packed["q8"] is before and "q8" not in ws[2].packed
    copies = [w.packed["q8"] for w in (ws[0], ws[1], ws[3])]
    assert copies[0].data_ptr() % HUGE_PAGE == 0
    assert size == sum((c.numel() + 63) // 64 * 64 for c in copies)
    for w, c, nxt in zip((ws[0], ws[1]), copies, copies[1:]):
        assert nxt.data_ptr() == c.data_ptr() + (c.numel() + 63) // 64 * 64  # back to back
    for w, c in zip((ws[0], ws[1], ws[3]), copies):
        assert torch.equal(c, pack_weight(QuantWeight(w.qtype, w.shape, w.data), "q8"))
