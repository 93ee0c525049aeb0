"""apply_token_bitmask_ against its four-line reference loop, and the pack/unpack helpers."""

from __future__ import annotations

import pytest
import torch

from sgl.kernels.bitmask import (allocate_token_bitmask, apply_token_bitmask_, bitmask_width,
                                 pack_token_bitmask, unpack_token_bitmask)

pytestmark = pytest.mark.timeout(60)


def reference_apply(logits: torch.Tensor, bitmask: torch.Tensor, indices=None) -> torch.Tensor:
    """The docstring's semantics, literally."""
    out = logits.clone()
    for i in (indices if indices is not None else range(out.shape[0])):
        for t in range(out.shape[1]):
            if t >= 32 * bitmask.shape[1] or not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                out[i, t] = float("-inf")
    return out


def random_bitmask(B: int, V: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack_token_bitmask(torch.rand(B, V, generator=g) < p)


def test_width_and_allocate():
    assert bitmask_width(1) == 1 and bitmask_width(32) == 1 and bitmask_width(33) == 2
    assert bitmask_width(49152) == 1536
    m = allocate_token_bitmask(3, 70)
    assert m.shape == (3, 3) and m.dtype == torch.int32 and bool((m == -1).all())
    assert bool(unpack_token_bitmask(m, 70).all())


@pytest.mark.parametrize("V", [1, 31, 32, 33, 100])
def test_pack_unpack_roundtrip(V):
    g = torch.Generator().manual_seed(V)
    allowed = torch.rand(4, V, generator=g) < 0.5
    allowed[0, -1] = True  # the highest bit of a word (sign bit when it is bit 31)
    packed = pack_token_bitmask(allowed)
    assert packed.shape == (4, bitmask_width(V)) and packed.dtype == torch.int32
    assert torch.equal(unpack_token_bitmask(packed, V), allowed)
    # tokens past 32 * W are reported as not allowed
    wide = unpack_token_bitmask(packed, 32 * packed.shape[1] + 5)
    assert not bool(wide[:, 32 * packed.shape[1]:].any())


def test_bit_31_is_token_31():
    mask = torch.zeros(1, 2, dtype=torch.int32)
    mask[0, 0] = -(2**31)  # only bit 31 set
    logits = torch.zeros(1, 64)
    apply_token_bitmask_(logits, mask)
    assert logits[0].isfinite().nonzero().flatten().tolist() == [31]


@pytest.mark.parametrize("indices", [None, [1], [0, 2], [2, 0]])
def test_matches_reference(indices):
    B, V = 3, 70
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1))
    mask = random_bitmask(B, V, 0.4, seed=2)
    mask[1] = -1  # an unconstrained row
    expected = reference_apply(logits, mask, indices)
    apply_token_bitmask_(logits, mask, indices)
    assert torch.equal(logits, expected)


def test_allowed_logits_are_unchanged_bit_for_bit():
    logits = torch.randn(2, 96, generator=torch.Generator().manual_seed(3)) * 100
    before = logits.clone()
    mask = random_bitmask(2, 96, 0.5, seed=4)
    apply_token_bitmask_(logits, mask)
    allowed = unpack_token_bitmask(mask, 96)
    assert torch.equal(logits[allowed], before[allowed])
    assert bool((logits[~allowed] == float("-inf")).all())


def test_logits_wider_than_bitmask_are_masked_for_every_row():
    V, covered = 100, 64  # e.g. a model vocabulary padded beyond the tokenizer's
    logits = torch.randn(3, V)
    mask = allocate_token_bitmask(3, covered)  # all ones: unconstrained rows
    mask[2] = random_bitmask(1, covered, 0.5, seed=5)[0]
    expected = reference_apply(logits, mask)
    apply_token_bitmask_(logits, mask)
    assert torch.equal(logits, expected)
    assert bool((logits[:, covered:] == float("-inf")).all())
    assert bool(logits[:2, :covered].isfinite().all())


def test_bitmask_wider_than_logits_ignores_extra_bits():
    logits = torch.randn(2, 40)
    mask = random_bitmask(2, 96, 0.5, seed=6)  # 3 words cover 96 tokens
    expected = reference_apply(logits, mask)
    apply_token_bitmask_(logits, mask)
    assert torch.equal(logits, expected)


def test_non_contiguous_logits_view():
    big = torch.randn(3, 80, generator=torch.Generator().manual_seed(7))
    before = big.clone()
    view = big[:, 8:72]  # [3, 64], row stride 80
    mask = random_bitmask(3, 64, 0.5, seed=8)
    expected = reference_apply(view, mask, [0, 2])
    apply_token_bitmask_(view, mask, [0, 2])
    assert torch.equal(view, expected)
    assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(big[:, 72:], before[:, 72:])
    assert torch.equal(big[1], before[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    logits = torch.randn(2, 50).to(dtype)
    mask = random_bitmask(2, 50, 0.5, seed=9)
    expected = reference_apply(logits, mask)
    apply_token_bitmask_(logits, mask)
    assert torch.equal(logits, expected)


def test_bad_arguments_raise_with_a_reason():
    logits = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask_(logits, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices"):
        apply_token_bitmask_(logits, allocate_token_bitmask(2, 32), indices=[2])
    with pytest.raises(ValueError, match="rows"):
        apply_token_bitmask_(logits, allocate_token_bitmask(1, 32))


def test_docstring_examples():
    import doctest

    import sgl.kernels.bitmask as module
    assert doctest.testmod(module).failed == 0
