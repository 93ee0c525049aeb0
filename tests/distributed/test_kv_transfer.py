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


def test_a_kv_is_read_once_and_its_segment_reused() -> None:
    t = SharedMemoryTransfer(timeout_s=30)
    try:
        kv = torch.randn(2, 3, 5, 1, 4)
        handle = t.put(kv)
        assert handle["name"] in _segments() and handle["shape"] == [2, 3, 5, 1, 4]
        assert t.pending() == 1
        assert torch.equal(t.take(handle), kv)
        assert t.pending() == 0
        with pytest.raises(KVTransferError, match="is gone"):
            t.take(handle)
        again = t.put(kv[:, :2])  # smaller: the free segment is reused (its pages are already touched)
        assert again["name"] == handle["name"] and again["generation"] == handle["generation"] + 1
        with pytest.raises(KVTransferError, match="is gone"):
            t.take(handle)  # an old handle never reads the new contents
        assert torch.equal(t.take(again), kv[:, :2])
    finally:
        t.close()
    assert handle["name"] not in _segments()  # close() unlinks


def test_an_untaken_kv_expires() -> None:
    t = SharedMemoryTransfer(timeout_s=0.3, read_margin_s=0.2)
    try:
        handle = t.put(torch.ones(2, 1, 3, 1, 2))
        time.sleep(0.4)
        with pytest.raises(KVTransferError, match="is gone"):  # past its deadline: no reader starts
            t.take(handle)
        time.sleep(0.6)  # + the margin: the reaper frees it for reuse
        assert t.pending() == 0
        assert t.put(torch.ones(4))["name"] == handle["name"]
    finally:
        t.close()


def test_bad_handles_name_the_problem() -> None:
    t = SharedMemoryTransfer(timeout_s=30)
    try:
        with pytest.raises(KVTransferError, match="needs name, generation, shape and dtype"):
            t.take({"name": "sgl-kv-x"})
        with pytest.raises(KVTransferError, match="not a KV segment"):
            t.take({"name": "etc-passwd", "generation": 1, "shape": [1], "dtype": "float32"})
        with pytest.raises(KVTransferError, match="does not exist"):
            t.take({"name": "sgl-kv-nope", "generation": 1, "shape": [1], "dtype": "float32"})
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
