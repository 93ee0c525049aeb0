"""A tensor-parallel process group: gloo on CPU, NCCL on CUDA, every collective under one timeout.

    group = TPGroup.init(rank=0, world_size=2, timeout_s=120)   # MASTER_ADDR / MASTER_PORT from the env
    h = group.all_reduce(partial)          # sum over ranks, in place
    logits = group.gather_columns(shard, sizes)   # [M, V/tp] per rank -> [M, V] on every rank

A collective that raises or times out (a rank died, a peer hung) raises TensorParallelError naming the
operation, and the group is marked failed: torch.distributed gives no guarantee about a group after a
failed collective, so nothing runs on it again.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from sgl.runtime.distributed.errors import TensorParallelError

logger = logging.getLogger("sgl.distributed")
T = TypeVar("T")


class TPGroup:
    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.failed: Optional[str] = None

    @classmethod
    def init(cls, rank: int, world_size: int, timeout_s: float, device: str = "cpu") -> "TPGroup":
        """Join the default process group (env:// rendezvous: MASTER_ADDR, MASTER_PORT). Blocks until
        all `world_size` ranks have joined or `timeout_s` passes."""
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise TensorParallelError("tensor parallelism needs MASTER_PORT (and MASTER_ADDR) in the environment")
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 - rendezvous errors come in many types
            raise TensorParallelError(f"rank {rank}: joining the tensor-parallel group of {world_size} at "
                                      f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed: {e}") from e
        logger.info("tensor-parallel rank %d/%d joined (%s, timeout %.0fs)", rank, world_size, backend, timeout_s)
        return cls(rank, world_size, timeout_s)

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        if self.failed is not None:
            raise TensorParallelError(f"the tensor-parallel group already failed: {self.failed}")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError, DistBackendError, ...
            self.failed = f"{op} on rank {self.rank} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise TensorParallelError(f"tensor-parallel {self.failed} (a rank died or hung)") from e

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns x."""
        self._run("all_reduce", lambda: dist.all_reduce(x))
        return x

    def gather_columns(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """x [M, sizes[rank]] per rank -> [M, sum(sizes)] on every rank, rank-ordered columns.
        Ranks pad to max(sizes) (all_gather needs equal shapes) and the padding is dropped."""
        width = max(sizes)
        if x.shape[1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._run("all_gather", lambda: dist.all_gather(parts, x.contiguous()))
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    def broadcast_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype everywhere), in place."""
        self._run("broadcast", lambda: dist.broadcast(t, src=0))
        return t

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's picklable `obj` -> every rank (the others pass None and get rank 0's)."""
        box = [obj]
        self._run("broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def destroy(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort on the way out (a peer may be gone)
                pass
