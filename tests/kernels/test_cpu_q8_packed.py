"""Packed copies of block weights (QuantWeight.pack, kernels/cpu/quant.py: pack_weight; q8 activations' layouts for
q4_0, q4_1 and q8_0: oct-packed with AVX-512 VNNI, quant_q8_zmm.h's pack_oct, else quad-packed for the AVX2 kernel,
quant_q8_blocks.h's pack_quad8; q16's Q8_0 one, quant_q16.h's pack_q8_0_lanes: 4 rows with AVX-512 VNNI, else 2),
which quant_linear reads for up to Q16_MAX_ROWS rows (q8: any count, in blocks of that many): every row
count and thread split gives the SAME BITS as the GGUF rows' path of that mode, so a verify row's logits stay its
decode step's; rows past the last whole group stay GGUF rows in the copy; extreme blocks (the byte -128, int8
+-127 activations) included; where a copy cannot run, pack says False; the default model's lm_head takes its copy at
the first logits. The fused decode kernels' reads of the layers' copies: tests/kernels/test_cpu_decode_rows.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgl.kernels.cpu import QuantWeight, quant_linear
from sgl.kernels.cpu.quant import _ACT_MODE as ACT_MODE
from sgl.kernels.cpu.quant import Q16_MAX_ROWS, pack_weight
from tests.kernels.test_cpu_q16_batch import raw_weight, run_with_and_without_tile, with_threads
from tests.kernels.test_cpu_q8_batch import unit_scale_weight

ACTS = ["q8", "q16"]
CASES = [("q8", "q8_0"), ("q8", "q4_1"), ("q8", "q4_0"), ("q16", "q8_0")]  # (act, block type) pairs that pack


def with_copy(w: QuantWeight, act: str) -> QuantWeight:
    """The same bytes with a packed copy for `act` (w itself keeps none)."""
    p = QuantWeight(w.qtype, w.shape, w.data)
    assert p.pack(act) and act in p.packed and not w.packed
    return p


@pytest.fixture(scope="module", autouse=True)
def packed_kernel() -> None:
    from sgl.kernels.cpu import _ext

    ext = _ext.load()
    if ext is None or not hasattr(ext, "packed_ok"):
        pytest.skip("no extension with packed copies here")


def group_of(act: str) -> int:
    """Rows per group of `act`'s copies here (q8: 8 oct-packed with AVX-512 VNNI, else 4 quad-packed; q16: 4), after
    skipping where the mode has no packed kernel (q16 without AVX-512 VNNI: pack_weight returns None)."""
    from sgl.kernels.cpu import _ext

    mode = ACT_MODE[act]
    if not _ext.load().packed_ok(mode):
        pytest.skip(f"no {act} packed kernel on this CPU: pack_weight returns None and the lm_head keeps the GGUF rows")
    return _ext.load().packed_group(mode)


@pytest.mark.parametrize("act,qtype", CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k", [(8, 32), (301, 96), (1035, 576)])  # 301, 1035: rows past the last whole group
def test_the_packed_copy_gives_the_modes_bits(n: int, k: int, threads: int, act: str, qtype: str) -> None:
    group = group_of(act)
    gen = np.random.default_rng(n + k)
    w = raw_weight(qtype, n, k, gen)
    p = with_copy(w, act)
    copy = p.packed[act]
    assert copy.shape == w.data.shape  # the same bytes reordered
    assert torch.equal(copy[n // group * group:], w.data[n // group * group:])  # the last rows as they are
    for m in (1, 2, 3, 5, 9, 12, 13, 33, Q16_MAX_ROWS, 65, 130):  # past 64: q8 prefill in 64-row blocks
        x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
        x[0, :32] = 0.0  # an all-zero block (scale 0)
        x[-1, :32] *= 1e4  # outliers in one block
        want = with_threads(threads, lambda: quant_linear(x, w, act_quant=act))
        got = with_threads(threads, lambda: quant_linear(x, p, act_quant=act))
        assert torch.equal(got, want), (n, k, m, threads, act, qtype)


@pytest.mark.parametrize("act,qtype", CASES)
def test_extreme_blocks_give_the_modes_bits(act: str, qtype: str) -> None:
    """d = 1 weights with the extreme codes (Q8_0: the byte -128 and 127 columns; Q4: 0 and 15), integer activations at
    +-127 (q8: the exact integer dot)."""
    group_of(act)
    gen = np.random.default_rng(5)
    w, ints = unit_scale_weight(qtype, 16, 160, gen)
    x = gen.integers(-127, 128, size=(3, 160)).astype(np.int64)
    x[:, ::32] = 127
    x[-1, 32:64] = -127
    x[-1, 32] = 127
    xf = torch.from_numpy(x.astype(np.float32))
    got = quant_linear(xf, with_copy(w, act), act_quant=act)
    assert torch.equal(got, quant_linear(xf, w, act_quant=act))
    if act == "q8":
        assert torch.equal(got, (torch.from_numpy(x) @ ints.T).to(torch.float32))


def test_what_does_not_pack_says_none_and_bad_rows_are_refused() -> None:
    group_of("q8")
    gen = np.random.default_rng(1)
    assert pack_weight(raw_weight("q4_1", 64, 64, gen), "q16") is None  # q16 packs Q8_0 only
    assert pack_weight(raw_weight("q8_0", 3, 64, gen), "q8") is None  # not one group of 4 (8) rows
    assert pack_weight(raw_weight("q8_0", 7, 64, gen), "q8") is not None or group_of("q8") == 8  # 1 group of 4 + 3
    from sgl.kernels.cpu import _ext

    q16 = pack_weight(raw_weight("q8_0", 7, 64, gen), "q16")  # one group of 4, 3 GGUF rows (AVX-512 VNNI only)
    assert (q16 is not None) == _ext.load().packed_ok(ACT_MODE["q16"])
    assert pack_weight(raw_weight("q8_0", 64, 64, gen), "none") is None  # fp32 activations: no packed path
    assert pack_weight(QuantWeight.quantize(torch.randn(64, 64), "f16"), "q8") is None
    assert not raw_weight("q4_1", 64, 64, gen).pack("q16")
    with pytest.raises(ValueError, match="q16 takes q8_0"):  # the extension refuses what pack_weight never asks
        _ext.load().pack_weight(0, "q4_1", 8, 64, 0, 2)
    w = with_copy(raw_weight("q8_0", 16, 64, gen), "q8")  # a bias: the GGUF rows
    x, bias = torch.randn(9, 64), torch.randn(16)
    plain = QuantWeight(w.qtype, w.shape, w.data)
    assert torch.equal(quant_linear(x, w, bias=bias, act_quant="q8"), quant_linear(x, plain, bias=bias, act_quant="q8"))


@pytest.mark.parametrize("act", ACTS)
def test_the_default_models_lm_head_logits_are_unchanged(act: str) -> None:
    """compute_logits takes the mode's packed copy (built once per mode): the logits of 1 and 5 rows are the mode's."""
    from sgl.kernels import cpu
    from sgl.runtime.models.loader import load_model

    from sgl.kernels.cpu import _ext

    packs = _ext.load().packed_ok(ACT_MODE[act])
    model = load_model("default", show_progress=False).model
    assert isinstance(model.lm_head, QuantWeight) and model.lm_head.qtype == "q8_0"
    saved = cpu.get_act_quant()
    cpu.set_act_quant(act)
    try:
        torch.manual_seed(0)
        for m in (1, 5):
            h = torch.randn(m, model.config.hidden_size)
            plain = QuantWeight(model.lm_head.qtype, model.lm_head.shape, model.lm_head.data)
            assert torch.equal(model.compute_logits(h), quant_linear(h, plain, act_quant=act))
        assert (act in model.lm_head.packed) == packs
    finally:
        cpu.set_act_quant(saved)


def test_the_avx2_copies_give_the_bits_of_every_kernel() -> None:
    """The AVX2 kernels' copies (q8: pack_quad8, 4 rows; q16: pack_q8_0_lanes<2>, Q8_0 in pairs of rows: the layouts
    of an AVX2 CPU; SGL_CPU_Q16_NO_TILE=1 turns an AVX-512 VNNI CPU onto them) give, at 1 to 13 rows, the bits of the
    GGUF rows in that process and of this process's kernels (the AVX-512 tiles where they run): every block type
    under q8, Q8_0 under q16, a tail of rows past the last group (67 rows)."""
    script = (
        "import numpy as np, torch, sys\n"
        "from sgl.kernels.cpu import QuantWeight, _ext, quant_linear\n"
        "gen = np.random.default_rng(9)\n"
        "res = {'group': [_ext.load().packed_group(1), _ext.load().packed_group(2)], 'plain': [], 'packed': []}\n"
        "for act, qt in (('q8', 'q4_0'), ('q8', 'q4_1'), ('q8', 'q8_0'), ('q16', 'q8_0')):\n"
        "    w = QuantWeight.quantize(torch.from_numpy(gen.standard_normal((67, 160)).astype(np.float32)), qt)\n"
        "    p = QuantWeight(w.qtype, w.shape, w.data)\n"
        "    assert p.pack(act)\n"
        "    for m in (1, 2, 4, 5, 9, 13):\n"
        "        x = torch.from_numpy(gen.standard_normal((m, 160)).astype(np.float32))\n"
        "        res['plain'].append(quant_linear(x, w, act_quant=act))\n"
        "        res['packed'].append(quant_linear(x, p, act_quant=act))\n"
        "torch.save(res, sys.argv[1])\n")
    here, avx2 = run_with_and_without_tile(script)
    assert avx2["group"] == [4, 2]  # q8's quad layout, q16's pairs
    for a, b, c in zip(avx2["packed"], avx2["plain"], here["plain"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(here["packed"], here["plain"]):
        assert torch.equal(a, b)
