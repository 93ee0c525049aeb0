"""sgl.kernels.cpu.norm.rms_norm (C++ when built) against HF's formula, and the model's rms_norm on both paths."""

from __future__ import annotations

import warnings

import pytest
import torch

from sgl.kernels import cpu
from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.norm import rms_norm, rms_norm_reference


@pytest.fixture(params=["ext", "ref"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(_ext, "disabled", request.param == "ref")
    if request.param == "ext":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not cpu.extension_available():
                pytest.skip("the C++ extension is not built (python -m sgl.kernels.cpu.build)")
    return request.param


@pytest.mark.parametrize("m,n", [(1, 576), (7, 64), (64, 33)])
def test_rms_norm_matches_reference(mode: str, m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, n, generator=gen) * torch.logspace(-3, 3, m).unsqueeze(1)  # rows of very different scale
    w = torch.randn(n, generator=gen)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="rms_norm needs"):
        rms_norm(x, w[:-1], 1e-5)


def test_model_rms_norm_uses_the_kernel_and_agrees_with_torch(mode: str) -> None:
    from sgl.runtime.models.llama import NormConsts, rms_norm as model_rms_norm

    consts = NormConsts(96, 1e-6, "cpu")
    x, w = torch.randn(3, 96), torch.randn(96)
    torch.testing.assert_close(model_rms_norm(x, w, consts), rms_norm_reference(x, w, 1e-6), rtol=2e-6, atol=1e-7)
    big = torch.randn(100, 96)  # prefill-sized: the torch ops
    torch.testing.assert_close(model_rms_norm(big, w, consts), rms_norm_reference(big, w, 1e-6), rtol=2e-6, atol=1e-7)
