"""sgl.kernels.cpu.decode_layer (one decoder layer for one token, C++ when built) against its torch reference
(dequantize + mm, torch softmax), and the M = 1 gemv against quant_linear's reference. Both modes: the
compiled kernel ("ext") and the path without the extension ("ref")."""

from __future__ import annotations

import warnings

import pytest
import torch

from sgl.kernels import cpu
from sgl.kernels.cpu import _ext, quant
from sgl.kernels.cpu.decode_layer import (DecodeLayerWeights, DecodeStack, decode_layer, decode_layer_reference,
                                         decode_stack)
from sgl.kernels.cpu.quant import QuantWeight, quant_linear, quant_linear_reference
from tests.kernels.test_cpu_quant import q16_bound


@pytest.fixture(params=["ext", "ref"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_ext, "disabled", request.param == "ref")
    if request.param == "ext":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not cpu.extension_available():
                pytest.skip("the C++ extension is not built (python -m sgl.kernels.cpu.build)")
        _ext.load().set_adaptive(False)  # every multi-thread call really uses the pool's helpers
        yield request.param
        _ext.load().set_adaptive(True)
        return
    yield request.param


def make_layer(gen: torch.Generator, qtype: str, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
               bias: bool) -> DecodeLayerWeights:
    def q(n: int, k: int) -> QuantWeight:
        return QuantWeight.quantize(torch.randn(n, k, generator=gen) * k**-0.5, qtype)

    qkv_n = (heads + 2 * kv_heads) * head_dim
    return DecodeLayerWeights(
        input_layernorm=1 + 0.1 * torch.randn(hidden, generator=gen),
        post_attention_layernorm=1 + 0.1 * torch.randn(hidden, generator=gen), eps=1e-5,
        qkv=q(qkv_n, hidden), qkv_bias=0.1 * torch.randn(qkv_n, generator=gen) if bias else None,
        o=q(hidden, heads * head_dim), o_bias=0.1 * torch.randn(hidden, generator=gen) if bias else None,
        gate_up=q(2 * inter, hidden), down=q(hidden, inter),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


def rope_rows(head_dim: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sgl.runtime.models.rotary import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, 10000.0, None, 4096)
    return rope.cos[position].contiguous(), rope.sin_signed[position].contiguous()


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,length,bias", [(9, 3, 64, 70, False), (4, 4, 32, 1, True),
                                                                 (8, 2, 16, 300, True)])
def test_decode_layer_matches_reference(mode: str, qtype: str, heads: int, kv_heads: int, head_dim: int,
                                        length: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(heads * 1000 + length)
    hidden, inter = 64 * 3 if heads == 9 else 64, 160
    w = make_layer(gen, qtype, hidden, heads, kv_heads, head_dim, inter, bias)
    num_slots = 400
    k_buf, v_buf = torch.randn(num_slots, kv_heads, head_dim, generator=gen), torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_slots, generator=gen)[:length].contiguous()  # scattered, the new token's slot last
    cos, sin = rope_rows(head_dim, length - 1 + 7)
    h = torch.randn(1, hidden, generator=gen)
    k_ref, v_ref, h_ref = k_buf.clone(), v_buf.clone(), h.clone()
    decode_layer_reference(h_ref, w, cos, sin, k_ref, v_ref, slots, head_dim**-0.5)
    out = decode_layer(h, w, cos, sin, k_buf, v_buf, slots, head_dim**-0.5)
    assert out.data_ptr() == h.data_ptr()  # in place
    # q16 activations move a product by <= ~1.5e-5 of the block's max |x|: well inside these bounds
    torch.testing.assert_close(h, h_ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(k_buf, k_ref, rtol=2e-4, atol=2e-4)  # only the new token's slot changed
    torch.testing.assert_close(v_buf, v_ref, rtol=2e-4, atol=2e-4)
    assert not torch.equal(h, h_ref.new_zeros(h_ref.shape))


def test_decode_layer_without_input_norm(mode: str) -> None:
    """input_layernorm None (an EAGLE head's layer): the layer reads the stream itself, as the reference does,
    and differs from the same layer with a unit norm (which rescales it)."""
    import dataclasses

    gen = torch.Generator().manual_seed(5)
    w = dataclasses.replace(make_layer(gen, "q8_0", 64, 4, 2, 16, 96, False), input_layernorm=None)
    k_buf, v_buf = torch.randn(40, 2, 16, generator=gen), torch.randn(40, 2, 16, generator=gen)
    slots = torch.arange(12)
    cos, sin = rope_rows(16, 11)
    h = 3 * torch.randn(1, 64, generator=gen)
    outs = []
    for layer in (w, dataclasses.replace(w, input_layernorm=torch.ones(64))):
        for fn in (decode_layer_reference, decode_layer):
            x, k, v = h.clone(), k_buf.clone(), v_buf.clone()
            fn(x, layer, cos, sin, k, v, slots, 0.25)
            outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(outs[3], outs[2], rtol=2e-4, atol=2e-4)
    assert not torch.allclose(outs[0], outs[2], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_decode_stack_is_decode_layer_layer_by_layer(mode: str, qtype: str) -> None:
    """The whole stack in one call gives the bits of calling decode_layer per layer (h and every KV pool)."""
    gen = torch.Generator().manual_seed(11)
    hidden, heads, kv_heads, head_dim, inter, n, length, num_slots = 64, 4, 2, 32, 96, 3, 40, 64
    layers = [make_layer(gen, qtype, hidden, heads, kv_heads, head_dim, inter, bias=i == 1) for i in range(n)]
    ks = [torch.randn(num_slots, kv_heads, head_dim, generator=gen) for _ in range(n)]
    vs = [torch.randn(num_slots, kv_heads, head_dim, generator=gen) for _ in range(n)]
    slots = torch.randperm(num_slots, generator=gen)[:length].contiguous()
    cos, sin = rope_rows(head_dim, length - 1)
    h = torch.randn(1, hidden, generator=gen)
    h1, ks1, vs1 = h.clone(), [k.clone() for k in ks], [v.clone() for v in vs]
    for w, k, v in zip(layers, ks1, vs1):
        decode_layer(h1, w, cos, sin, k, v, slots, head_dim**-0.5)
    out = decode_stack(h, DecodeStack(tuple(layers), tuple(ks), tuple(vs)), cos, sin, slots, head_dim**-0.5)
    assert out.data_ptr() == h.data_ptr()
    assert torch.equal(h, h1)
    assert all(torch.equal(a, b) for a, b in zip(ks + vs, ks1 + vs1))


def test_decode_stack_rejects_layers_of_different_shapes() -> None:
    gen = torch.Generator().manual_seed(12)
    a = make_layer(gen, "q8_0", 64, 4, 2, 32, 96, bias=False)
    b = make_layer(gen, "q8_0", 64, 4, 2, 32, 128, bias=False)  # another intermediate size
    kv = [torch.zeros(8, 2, 32) for _ in range(2)]
    with pytest.raises(ValueError, match="layer 1's shape"):
        DecodeStack((a, b), tuple(kv), tuple(kv))
    with pytest.raises(ValueError, match="2 layers need as many"):
        DecodeStack((a, a), tuple(kv[:1]), tuple(kv))


def test_decode_layer_thread_counts_are_bit_identical(mode: str) -> None:
    gen = torch.Generator().manual_seed(5)
    w = make_layer(gen, "q4_1", 576, 9, 3, 64, 1536, False)
    k_buf, v_buf = torch.randn(200, 3, 64, generator=gen), torch.randn(200, 3, 64, generator=gen)
    slots = torch.arange(120, dtype=torch.int64)
    cos, sin = rope_rows(64, 119)
    h0 = torch.randn(1, 576, generator=gen)
    outs = []
    old = quant._threads
    try:
        for threads in (1, 2, 3):
            cpu.set_num_threads(threads)
            h, kb, vb = h0.clone(), k_buf.clone(), v_buf.clone()
            decode_layer(h, w, cos, sin, kb, vb, slots, 0.125)
            outs.append((h, kb[119], vb[119]))
    finally:
        quant._threads = old
    for h, k, v in outs[1:]:
        assert torch.equal(h, outs[0][0]) and torch.equal(k, outs[0][1]) and torch.equal(v, outs[0][2])


def test_decode_layer_rejects_bad_input(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    w = make_layer(gen, "q8_0", 64, 4, 2, 16, 96, False)
    kb = torch.zeros(10, 2, 16)
    cos, sin = rope_rows(16, 3)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="h must be"):
        decode_layer(torch.zeros(2, 64), w, cos, sin, kb, kb.clone(), slots, 0.25)
    with pytest.raises(ValueError, match="k_buf must be"):
        decode_layer(torch.zeros(1, 64), w, cos, sin, torch.zeros(10, 4, 16), kb, slots, 0.25)
    with pytest.raises(ValueError, match="slots must be"):
        decode_layer(torch.zeros(1, 64), w, cos, sin, kb, kb.clone(), slots.int(), 0.25)
    with pytest.raises(ValueError, match="down has shape"):
        DecodeLayerWeights(w.input_layernorm, w.post_attention_layernorm, 1e-5, w.qkv, None, w.o, None, w.gate_up,
                           w.o, 4, 2, 16)
    with pytest.raises(ValueError, match="must be a QuantWeight"):
        DecodeLayerWeights(w.input_layernorm, w.post_attention_layernorm, 1e-5, w.qkv, None, w.o, None, w.gate_up,
                           QuantWeight.quantize(torch.randn(64, 96), "f16"), 4, 2, 16)
    if mode == "ext":  # the kernel itself refuses a slot outside the pool (before touching memory)
        with pytest.raises(ValueError, match="slot out of range"):
            decode_layer(torch.zeros(1, 64), w, cos, sin, kb, kb.clone(), torch.tensor([0, 10]), 0.25, check=False)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (49152 // 16, 576)])
def test_gemv_matches_reference_and_gemm(mode: str, qtype: str, n: int, k: int) -> None:
    """quant_linear at M = 1 with q16 runs the pool gemv: equal to the reference within q16's error and
    bit-identical to the multi-row gemm kernel's q16 path, for 1 and 2 threads."""
    gen = torch.Generator().manual_seed(n + k)
    w = QuantWeight.quantize(torch.randn(n, k, generator=gen), qtype)
    x, r = torch.randn(1, k, generator=gen), torch.randn(1, n, generator=gen)
    want = quant_linear_reference(x, w, residual=r)
    old = quant._threads
    try:
        outs = []
        for threads in (1, 2):
            cpu.set_num_threads(threads)
            outs.append(quant_linear(x, w, residual=r, act_quant="q16"))
    finally:
        quant._threads = old
    assert bool(((outs[0] - want).abs() <= q16_bound(x, w) + 1e-6 * r.abs()).all())
    assert torch.equal(outs[0], outs[1])
    ext = _ext.load()
    if ext is not None:  # the multi-row kernel (gemm) on the same single row: the same bits
        y = torch.empty(1, n)
        ext.gemm(x.data_ptr(), 1, w.data.data_ptr(), qtype, n, k, y.data_ptr(), 0, r.data_ptr(), 2, 1)
        assert torch.equal(outs[0], y)


def test_adaptive_pool_keeps_results(mode: str) -> None:
    """The adaptive call sites (alone or with helpers, by measurement) give the same bits as always-helpers."""
    if mode != "ext":
        pytest.skip("the pool exists in the extension only")
    gen = torch.Generator().manual_seed(9)
    w = QuantWeight.quantize(torch.randn(256, 64, generator=gen), "q4_1")
    x = torch.randn(1, 64, generator=gen)
    old = quant._threads
    try:
        cpu.set_num_threads(2)
        forced = quant_linear(x, w, act_quant="q16")
        _ext.load().set_adaptive(True)
        for _ in range(80):  # through a probe of both ways and into the chosen one
            assert torch.equal(quant_linear(x, w, act_quant="q16"), forced)
    finally:
        quant._threads = old
