"""The q16 small-M GEMM is batch-invariant: every row of a batch (2 <= M <= 64) gets the SAME BITS as that
row alone (M = 1: the decode pool's gemv), for every block type, any thread split of the columns, with
bias and residual. So a request's logits do not depend on the batch it runs in, nor on speculation
verifying its tokens (kernels/cpu/quant_q16.h states the per-lane contract).
Above Q16_MAX_ROWS rows (prefill) gemm runs fp32 activations."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch

from sgl.kernels import cpu
from sgl.kernels.cpu import QuantWeight, quant_linear
from sgl.kernels.cpu.quant import BLOCK_BYTES, Q16_MAX_ROWS


@pytest.fixture(autouse=True)
def ext() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cpu.extension_available():
            pytest.skip("the C++ extension is not built (python -m sgl.kernels.cpu.build)")


def raw_weight(qtype: str, n: int, k: int, gen: np.random.Generator) -> QuantWeight:
    """Random raw blocks: every nibble/byte value, scales of both signs over 5 decades."""
    nb = n * k // 32
    raw = gen.integers(0, 256, size=(nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
    scale = gen.choice([1e-4, 0.01, 0.3, 4.0], size=nb) * gen.choice([-1.0, 1.0], size=nb)
    raw[:, 0:2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    if qtype == "q4_1":
        raw[:, 2:4] = (gen.standard_normal(nb) * 0.1).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return QuantWeight.from_gguf(raw.reshape(n, -1), qtype, (n, k))


def with_threads(n: int, fn):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        cpu.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(saved)
        cpu._threads = None  # back to torch.get_num_threads()



def outputs_with_and_without_tile(act: str, seed: int, ms: tuple[int, ...]) -> tuple[dict, dict]:
    """quant_linear(act_quant=act) over 70 x 160 weights of every block type at each of `ms` rows, run in two fresh
    processes: one as this CPU chooses, one forced onto the per-row path (SGL_CPU_Q16_NO_TILE=1). Returns their
    {'isa': the extension's isa(), 'outs': [results]}."""
    script = (
        "import numpy as np, torch, sys\n"
        "from sgl.kernels.cpu import QuantWeight, _ext, quant_linear\n"
        f"gen = np.random.default_rng({seed})\n"
        "outs = []\n"
        "for qt in ('q4_0', 'q4_1', 'q8_0'):\n"
        "    w = QuantWeight.quantize(torch.from_numpy(gen.standard_normal((70, 160)).astype(np.float32)), qt)\n"
        f"    for m in {ms!r}:\n"
        "        x = torch.from_numpy(gen.standard_normal((m, 160)).astype(np.float32))\n"
        f"        outs.append(quant_linear(x, w, act_quant={act!r}))\n"
        "torch.save({'isa': _ext.load().isa(), 'outs': outs}, sys.argv[1])\n")
    return run_with_and_without_tile(script)


def run_with_and_without_tile(script: str) -> tuple[dict, dict]:
    """Run `script` (it saves its results with torch.save to sys.argv[1]) in two fresh processes: as this CPU
    chooses, and with SGL_CPU_Q16_NO_TILE=1 (an AVX-512 VNNI CPU then runs the AVX2 kernels). Returns both results."""
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for env in ({}, {"SGL_CPU_Q16_NO_TILE": "1"}):
            path = os.path.join(tmp, f"{len(results)}.pt")
            subprocess.run([sys.executable, "-c", script, path], check=True, env={**os.environ, **env}, timeout=120)
            results.append(torch.load(path))
    return results[0], results[1]

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_every_row_of_a_batch_has_the_bits_of_that_row_alone(qtype: str, threads: int) -> None:
    gen = np.random.default_rng(11)
    # N = 301: 4-column tiles plus a tail, and a 2-thread split at column 151 (not a multiple of 4)
    for n, k in ((301, 96), (67, 1536)):
        w = raw_weight(qtype, n, k, gen)
        bias = torch.from_numpy(gen.standard_normal(n).astype(np.float32))
        for m in (2, 3, 8, 9, 17, Q16_MAX_ROWS):
            x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
            x[0, :32] = 0.0  # an all-zero block (scale 0)
            x[-1, 32:64] *= 1e4  # outliers in one block
            resid = torch.from_numpy(gen.standard_normal((m, n)).astype(np.float32))

            def run(rows: slice, use_bias: bool) -> torch.Tensor:
                return quant_linear(x[rows].contiguous(), w, bias=bias if use_bias else None,
                                    residual=resid[rows].clone(), act_quant="q16")

            for use_bias in (False, True):
                batch = with_threads(threads, lambda: run(slice(0, m), use_bias))
                for i in range(m):
                    alone = with_threads(threads, lambda: run(slice(i, i + 1), use_bias))
                    assert torch.equal(batch[i], alone[0]), (qtype, n, k, m, i, use_bias)


def test_q16_is_not_fp32_below_the_limit_and_is_fp32_above() -> None:
    """The batch really runs q16 (not the exact fp32 path, which would make the test above pass at M = 1 only
    by accident), and prefill-sized batches (> Q16_MAX_ROWS rows) run fp32 activations."""
    gen = np.random.default_rng(5)
    w = raw_weight("q4_1", 64, 256, gen)
    x = torch.from_numpy(gen.standard_normal((Q16_MAX_ROWS + 1, 256)).astype(np.float32))
    small = x[:5].contiguous()
    assert not torch.equal(quant_linear(small, w, act_quant="q16"), quant_linear(small, w, act_quant="none"))
    assert torch.equal(quant_linear(x, w, act_quant="q16"), quant_linear(x, w, act_quant="none"))


def test_the_default_mode_runs_batches_fp32_unless_q16_batches_is_on() -> None:
    """quant_linear without act_quant: q16 at one row, fp32 activations for batches (the engine's default,
    quant._q16_batches says why), the q16 tile once set_q16_batches(True)."""
    from sgl.kernels.cpu import get_act_quant, set_q16_batches

    assert get_act_quant() == "q16"
    gen = np.random.default_rng(6)
    w = raw_weight("q4_1", 64, 256, gen)
    x = torch.from_numpy(gen.standard_normal((4, 256)).astype(np.float32))
    assert torch.equal(quant_linear(x, w), quant_linear(x, w, act_quant="none"))
    assert torch.equal(quant_linear(x[:1].contiguous(), w), quant_linear(x[:1].contiguous(), w, act_quant="q16"))
    set_q16_batches(True)
    try:
        assert torch.equal(quant_linear(x, w), quant_linear(x, w, act_quant="q16"))
    finally:
        set_q16_batches(False)


def test_the_per_row_path_gives_the_tiles_bits() -> None:
    """A CPU without AVX-512 VNNI runs the q16 batch in the AVX2 2-column tile (dot_q16_pair); this one runs the
    AVX-512 4-column tile. Both give every row its M = 1 bits, so they agree bit for bit (the AVX2 path forced by
    env: SGL_CPU_Q16_NO_TILE=1)."""
    tile, rows = outputs_with_and_without_tile("q16", 7, (1, 2, 9, 13))
    assert "avx512-vnni" not in rows["isa"]  # the override took the AVX2 path
    if "avx512-vnni" not in tile["isa"]:
        pytest.skip("this CPU has no AVX-512 VNNI: both runs took the AVX2 path")
    for a, b in zip(tile["outs"], rows["outs"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_a_column_has_the_same_bits_in_every_kernel(qtype: str) -> None:
    """The block-dot contract (kernels/cpu/quant_q16.h) is computed by a 4-column vector kernel and, for the
    < 4 tail columns, by its scalar statement: dropping the first `off` weight rows moves every column between
    the two, and its bits must not change. Includes the extreme block (every nibble / byte at its maximum,
    x at +-32767 after quantization), where Q4's exact int-to-float trick is at its bound (|I| < 2^22)."""
    gen = np.random.default_rng(21)
    n, k = 11, 160
    nb_row = k // 32
    raw = gen.integers(0, 256, size=(n * nb_row, BLOCK_BYTES[qtype]), dtype=np.uint8)
    scale = gen.choice([1e-3, 0.3, 4.0], size=n * nb_row) * gen.choice([-1.0, 1.0], size=n * nb_row)
    raw[:, 0:2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    if qtype == "q4_1":
        raw[:, 2:4] = (gen.standard_normal(n * nb_row) * 0.1).astype(np.float16).reshape(-1, 1).view(np.uint8)
    hdr = 2 if qtype != "q4_1" else 4
    raw[0:nb_row, hdr:] = 0xFF if qtype != "q8_0" else 0x80  # column 0: nibbles 15 / bytes -128 in every block
    raw[nb_row:2 * nb_row, hdr:] = 0xFF if qtype != "q8_0" else 0x7F  # column 1: 15 / 127
    raw = raw.reshape(n, -1)
    for m in (1, 9):
        x = torch.from_numpy(gen.standard_normal((m, k)).astype(np.float32))
        x[0, :32] = 3.0  # a constant block: every int16 at 32767
        x[-1, 32:64] = -2.0  # and at -32767
        full = quant_linear(x, QuantWeight.from_gguf(raw, qtype, (n, k)), act_quant="q16")
        for off in (1, 2, 3):
            w = QuantWeight.from_gguf(np.ascontiguousarray(raw[off:]), qtype, (n - off, k))
            assert torch.equal(quant_linear(x, w, act_quant="q16"), full[:, off:]), (qtype, m, off)
