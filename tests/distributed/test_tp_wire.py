"""The tensor-parallel wire (runtime/distributed/driver.py): a step's ForwardBatch reaches the followers whole."""

from __future__ import annotations

import pytest
import torch

from sgl.runtime.distributed.driver import HEADER, _pack, _payload_size, _unpack
from sgl.runtime.executor.forward_batch import ForwardBatch


def _batches() -> list[ForwardBatch]:
    prefill = ForwardBatch.from_lists([[5, 6, 7], [8]], [[0, 1, 2], [3, 4, 5, 6]])
    # a verify row of a draft tree (2 pending tokens, then nodes 0 <- 1 and 0 <- 2) beside a decode row
    verify = ForwardBatch.from_lists([[9, 10, 11, 12, 13], [14]], [list(range(10, 17)), [20, 21]],
                                     trees=[[-1, 0, 0], None], generated_only=True, decode_tails=[5, 1])
    return [prefill, verify]


@pytest.mark.parametrize("index", [0, 1])
def test_a_forward_batch_round_trips_with_its_tree_masks_and_decode_path(index: int) -> None:
    """(Before the masks went on the wire, a follower ran a tree's verify row causal: its heads' part of the
    all-reduced logits was wrong, and MEDUSA at --tp-size 2 changed greedy outputs.)"""
    fb = _batches()[index]
    header, payload = _pack(fb)
    assert header.shape == (HEADER,) and payload.numel() == _payload_size(header)
    got = _unpack(header, payload)
    for name in ("input_ids", "positions", "out_cache_loc"):
        assert torch.equal(getattr(got, name), getattr(fb, name))
    assert (got.extend_lens, got.seq_lens) == (fb.extend_lens, fb.seq_lens)
    assert all(torch.equal(a, b) for a, b in zip(got.slot_tables, fb.slot_tables))
    assert (got.generated_only, got.decode_tails) == (fb.generated_only, fb.decode_tails)
    if fb.tree_masks is None:
        assert got.tree_masks is None
    else:
        assert len(got.tree_masks) == len(fb.tree_masks)
        for a, b in zip(got.tree_masks, fb.tree_masks):
            assert (a is None and b is None) or torch.equal(a, b)
