"""Who is preempted, and the swap space that holds a preempted request's KV. No tensors here.

`--preemption-mode swap` copies the victim's computed KV (`slots[:kv_len]`) to host slots through a
`KVMover` (the runner's tensors; tests pass a recording fake), frees its device slots and requeues it;
it resumes by copying the rows back into fresh device slots, so nothing is recomputed and its output is
token-identical (the sampling state, seeded generator included, stays on the request). `recompute`
(or a full host tier) hands the KV to the radix tree and the request prefills again on resume.

Host-slot invariant (`check_integrity`): free host slots + the host slots of swapped requests == size.
"""

from __future__ import annotations

from typing import Optional, Protocol

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.scheduler.fair_share import CLASS_RANK
from sgl.runtime.scheduler.request import Req


class KVMover(Protocol):
    """Copies KV rows between the device pool and the host tier (all layers, K and V)."""

    bytes_per_slot: int

    def swap_out(self, device_slots: list[int], host_slots: list[int]) -> None: ...

    def swap_in(self, host_slots: list[int], device_slots: list[int]) -> None: ...


# A request is preempted for a realtime arrival at most this often; then it runs to its end (KV shortage
# may still preempt it). Without the cap a realtime load over capacity starves batch work: fair share
# admits a batch request, the next realtime arrival preempts it, and so on forever.
MAX_LATENCY_PREEMPTIONS = 1


def preemption_victim(running: list[Req], below_rank: Optional[int] = None) -> Optional[Req]:
    """The lowest class first, then the lowest `priority`, then the newest arrival. With `below_rank` (a
    realtime arrival): only classes ranked under it, and only requests not yet preempted for latency."""
    cands = [r for r in running if below_rank is None or (
        CLASS_RANK[r.priority_class] < below_rank and r.num_latency_preemptions < MAX_LATENCY_PREEMPTIONS)]
    return min(cands, key=lambda r: (CLASS_RANK[r.priority_class], r.priority, -r.arrival), default=None)


class SwapSpace:
    """The host tier's slot bookkeeping plus the mover; disabled (size 0) in recompute mode."""

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
        """A swapped request ended (aborted) without resuming."""
        if host_slots:
            assert self.host is not None
            self.host.free(host_slots)

    def check_integrity(self, swapped_slots: int) -> None:
        total = (self.host.available if self.host is not None else 0) + swapped_slots
        assert total == self.size, f"host KV leak: free + swapped = {total} != {self.size}"
