"""The KV transfer segment (shared memory) and the scale-out flags' validation: no model, no server."""

from __future__ import annotations

import os
import time

import pytest
import torch

from sgl.runtime.config import ServerArgs
from sgl.runtime.distributed.kv_transfer import KVTransferError, SharedMemoryTransfer
from sgl.runtime.router.config import RouterArgs


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sgl-kv-")}


def test_a_segment_is_read_once_then_gone() -> None:
    t = SharedMemoryTransfer(timeout_s=30)
    try:
        kv = torch.randn(2, 3, 5, 1, 4)
        handle = t.put(kv)
        assert handle["name"] in _segments() and handle["shape"] == [2, 3, 5, 1, 4]
        assert torch.equal(t.take(handle), kv)
        assert handle["name"] not in _segments()
        with pytest.raises(KVTransferError, match="is gone"):
            t.take(handle)
    finally:
        t.close()


def test_an_untaken_segment_expires_and_close_frees_the_rest() -> None:
    t = SharedMemoryTransfer(timeout_s=0.3)
    handle = t.put(torch.ones(2, 1, 3, 1, 2))
    time.sleep(1.0)  # the reaper runs every timeout / 4
    assert handle["name"] not in _segments() and t.pending() == 0
    t.close()
    t2 = SharedMemoryTransfer(timeout_s=60)
    h2 = t2.put(torch.ones(2))
    t2.close()  # shutting down frees what nobody took
    assert h2["name"] not in _segments()


def test_bad_handles_name_the_problem() -> None:
    t = SharedMemoryTransfer(timeout_s=30)
    try:
        with pytest.raises(KVTransferError, match="needs name, shape and dtype"):
            t.take({"name": "sgl-kv-x"})
        with pytest.raises(KVTransferError, match="not a KV segment"):
            t.take({"name": "etc-passwd", "shape": [1], "dtype": "float32"})
        h = t.put(torch.ones(4))
        with pytest.raises(KVTransferError, match="smaller than its shape"):
            t.take({**h, "shape": [4, 4]})
    finally:
        t.close()


def test_scale_out_flags_are_validated() -> None:
    with pytest.raises(ValueError, match="tp_size must be >= 1"):
        ServerArgs(tp_size=0)
    with pytest.raises(ValueError, match="not supported"):
        ServerArgs(tp_size=2, dp_size=2)
    with pytest.raises(ValueError, match="disaggregation_mode must be one of"):
        ServerArgs(disaggregation_mode="both")
    with pytest.raises(ValueError, match="dist_timeout"):
        ServerArgs(dist_timeout=0)
    with pytest.raises(ValueError, match="prefill and decode go together"):
        RouterArgs(prefill="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="not both"):
        RouterArgs(worker_urls=["http://127.0.0.1:2"], prefill="http://127.0.0.1:1", decode="http://127.0.0.1:3")
