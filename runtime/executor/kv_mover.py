"""The host KV tier's tensors and the copies between it and the device pool (scheduler/preemption.py's
`KVMover`).

The host tier is a second K/V pool, [num_layers, host_slots, Hkv, D] each, indexed by host slot. On CUDA
it would be pinned host memory; on CPU it is a separate tensor (pages are touched only when a slot is
first written, so an unused `--swap-space` costs no RSS) or, with `--swap-dir`, a memory-mapped file
(the kernel may page it out; unlinked as soon as it is mapped, so no file outlives the process). A copy moves whole rows: every layer's K and V of each
listed slot, so a request resumes with bit-identical KV.

    >>> import torch
    >>> kv = KVCache(num_layers=2, num_slots=8, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    >>> _ = kv.k.fill_(0); kv.k[:, 3] = 1.0
    >>> mover = HostKVMover(kv, host_slots=4)
    >>> mover.swap_out([3], [2]); kv.k[:, 3] = 0.0
    >>> mover.swap_in([2], [5]); bool((kv.k[:, 5] == 1.0).all())
    True
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from sgl.runtime.executor.kv_cache import KVCache


class HostKVMover:
    def __init__(self, kv: KVCache, host_slots: int, swap_dir: Optional[str] = None) -> None:
        assert host_slots >= 1
        self.kv = kv
        self.host_slots = host_slots
        shape = (kv.num_layers, host_slots, kv.num_kv_heads, kv.head_dim)
        numel = kv.num_layers * host_slots * kv.num_kv_heads * kv.head_dim
        self.bytes_per_slot = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv.k.element_size()
        if swap_dir is not None:
            fd, path = tempfile.mkstemp(prefix="sgl-swap-", suffix=".kv", dir=swap_dir)
            os.close(fd)
            try:
                # one file holds K then V; shared=True maps it (writes go to the file, not anonymous memory)
                flat = torch.from_file(path, shared=True, size=2 * numel, dtype=kv.dtype)
            finally:
                os.unlink(path)  # the mapping keeps the pages reachable
            self.k, self.v = flat[:numel].view(shape), flat[numel:].view(shape)
        else:
            self.k = torch.empty(shape, dtype=kv.dtype)
            self.v = torch.empty(shape, dtype=kv.dtype)

    @torch.inference_mode()
    def swap_out(self, device_slots: list[int], host_slots: list[int]) -> None:
        src = torch.tensor(device_slots, dtype=torch.long, device=self.kv.device)
        dst = torch.tensor(host_slots, dtype=torch.long)
        self.k.index_copy_(1, dst, self.kv.k.index_select(1, src).to("cpu"))
        self.v.index_copy_(1, dst, self.kv.v.index_select(1, src).to("cpu"))

    @torch.inference_mode()
    def swap_in(self, host_slots: list[int], device_slots: list[int]) -> None:
        src = torch.tensor(host_slots, dtype=torch.long)
        dst = torch.tensor(device_slots, dtype=torch.long, device=self.kv.device)
        self.kv.k.index_copy_(1, dst, self.k.index_select(1, src).to(self.kv.device))
        self.kv.v.index_copy_(1, dst, self.v.index_select(1, src).to(self.kv.device))

