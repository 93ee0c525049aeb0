"""The host KV tier: slots in host memory that hold KV rows copied out of the device pool. No tensors here.

Two users, each with its own pool (and mover): swap preemption (runtime/scheduler/preemption.py: a
preempted request's KV, `--swap-space`) and the hierarchical prefix cache (hiradix_cache.py: radix-tree
nodes demoted instead of evicted, `--host-cache-tokens`). A `KVMover` does the copies (the runner's
tensors: runtime/executor/kv_mover.py; scheduler tests pass a recording fake).

Invariant (`check_integrity`): free host slots + the host slots held by its users == size.
"""

from __future__ import annotations

from typing import Optional, Protocol

from sgl.runtime.cache.allocator import SlotAllocator


class KVMover(Protocol):
    """Copies KV rows between the device pool and the host tier (all layers, K and V)."""

    bytes_per_slot: int

    def swap_out(self, device_slots: list[int], host_slots: list[int]) -> None: ...

    def swap_in(self, host_slots: list[int], device_slots: list[int]) -> None: ...


class HostPool:
    """Host-tier slots plus the mover that fills them; disabled (no mover or size 0) holds nothing."""

    def __init__(self, mover: Optional[KVMover], size: int) -> None:
        self.mover = mover
        self.host: Optional[SlotAllocator] = SlotAllocator(size) if mover is not None and size > 0 else None
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def size(self) -> int:
        return self.host.size if self.host is not None else 0

    @property
    def used(self) -> int:
        return self.host.size - self.host.available if self.host is not None else 0

    def can_hold(self, n: int) -> bool:
        return self.host is not None and self.host.available >= n

    def swap_out(self, device_slots: list[int]) -> list[int]:
        assert self.host is not None and self.mover is not None
        host = self.host.alloc(len(device_slots))
        assert host is not None, "call can_hold first"
        self.mover.swap_out(device_slots, host)
        self.bytes_out += len(host) * self.mover.bytes_per_slot
        return host

    def swap_in(self, host_slots: list[int], device_slots: list[int]) -> None:
        assert self.host is not None and self.mover is not None and len(host_slots) == len(device_slots)
        self.mover.swap_in(host_slots, device_slots)
        self.bytes_in += len(host_slots) * self.mover.bytes_per_slot
        self.host.free(host_slots)

    def release(self, host_slots: list[int]) -> None:
        """Host slots whose KV is no longer needed (a swapped request aborted, a host cache node dropped)."""
        if host_slots:
            assert self.host is not None
            self.host.free(host_slots)

    def check_integrity(self, held: int) -> None:
        """`held`: the host slots its users hold (swapped requests, or host cache nodes)."""
        total = (self.host.available if self.host is not None else 0) + held
        assert total == self.size, f"host KV leak: free {total - held} + held {held} != {self.size}"
