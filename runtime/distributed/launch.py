"""Starting the tensor-parallel ranks, on one machine or across machines.

One machine (`sgl serve --tp-size 2`, or `sgl.Engine(tp_size=2)`): rank 0 is the calling process; it
spawns ranks 1..tp-1 as `python -m sgl.runtime.distributed.worker SPEC.json` BEFORE loading its own
weights (all ranks load at once), each with max(1, num_threads // tp) threads, and a rendezvous on a
free 127.0.0.1 port. A watchdog thread follows the children: one that exits brings the engine down
(`on_fatal`) with a log line naming the rank and its exit code; a follower whose parent vanishes exits.

Across machines (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK):
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
        -m sgl.launch_server --tp-size 2 --model-path default --host 0.0.0.0
    (the same on HOST1 with --node-rank 1.) RANK 0 serves HTTP; the others run the follower loop.
There a dead rank shows up as a failed collective (connection closed) or, if it hangs, the group
timeout (--dist-timeout), and rank 0 stops the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from sgl.runtime.distributed.driver import TPDriver
from sgl.runtime.distributed.group import TPGroup
from sgl.runtime.distributed.sharding import ShardPlan, shard_model
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.processes import free_port

logger = logging.getLogger("sgl.distributed")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def threads_per_rank(args: Any) -> int:
    return max(1, args.resolved_num_threads // args.tp_size)


@dataclass
class TensorParallel:
    """Rank 0's handle on the group: spawned followers (one machine), the group, the driver."""
    args: Any
    procs: list[subprocess.Popen] = field(default_factory=list)
    group: Optional[TPGroup] = None
    driver: Optional[TPDriver] = None
    spec_path: Optional[str] = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def spawn(cls, args: Any) -> "TensorParallel":
        """Start ranks 1..tp-1 on this machine (nothing under torchrun: they are started there)."""
        tp = cls(args)
        if launched_by_torchrun():
            if int(os.environ["WORLD_SIZE"]) != args.tp_size or int(os.environ["RANK"]) != 0:
                raise ValueError(f"torchrun WORLD_SIZE={os.environ['WORLD_SIZE']} RANK={os.environ['RANK']}: the engine "
                                 f"runs on rank 0 of a world of exactly --tp-size {args.tp_size}")
            return tp
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        threads = threads_per_rank(args)
        spec = tempfile.NamedTemporaryFile("w", prefix="sgl-tp-", suffix=".json", delete=False)
        json.dump(dataclasses.asdict(args), spec)  # each rank takes threads_per_rank(args)
        spec.close()
        tp.spec_path = spec.name
        for rank in range(1, args.tp_size):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(args.tp_size), "OMP_NUM_THREADS": str(threads),
                   "OMP_WAIT_POLICY": "PASSIVE", "SGL_TP_PARENT_PID": str(os.getpid())}
            tp.procs.append(subprocess.Popen([sys.executable, "-m", "sgl.runtime.distributed.worker", spec.name],
                                             env=env, stdin=subprocess.DEVNULL))
        logger.info("tensor parallel: spawned ranks 1..%d (%d thread(s) each)", args.tp_size - 1, threads)
        return tp

    def attach(self, model: torch.nn.Module, num_slots: int, dtype: torch.dtype,
               on_fatal: Callable[[str], None], keep_lm_head: bool = False) -> tuple[TPDriver, ModelConfig]:
        """Join the group as rank 0, shard `model`, tell the followers the KV pool size; returns the
        driver (to hand to the ModelRunner as the model) and rank 0's ModelConfig (for its KV pool).
        `keep_lm_head`: the driver also keeps the unsharded lm_head (TPDriver.lm_head), whose rows EAGLE's and
        MEDUSA's draft vocabularies are read from; drop it (`driver.whole_lm_head = None`) once they are."""
        whole_lm_head = model.lm_head if keep_lm_head else None  # shard_model replaces the attribute, not the object
        watchdog = threading.Thread(target=self._watch, args=(on_fatal,), name="sgl-tp-watchdog", daemon=True)
        watchdog.start()  # a rank that dies while loading must not leave rank 0 waiting at the rendezvous
        self.group = TPGroup.init(0, self.args.tp_size, self.args.dist_timeout)
        local = shard_model(model, ShardPlan.for_model(model.config, 0, self.args.tp_size), self.group)
        self.group.broadcast((num_slots, str(dtype).removeprefix("torch.")))
        self.driver = TPDriver(model, self.group, heartbeat_s=max(1.0, self.args.dist_timeout / 4),
                               whole_lm_head=whole_lm_head)
        return self.driver, local

    def _watch(self, on_fatal: Callable[[str], None]) -> None:
        while not self._stopping.wait(0.2):
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None:
                    return self._died(rank, p, on_fatal)

    def diagnose(self, error: str, wait_s: float = 2.0) -> str:
        """A failed collective's message, or (better) which spawned rank exited: a peer's death reaches
        rank 0 as a reset connection slightly before its exit status does, so wait a moment for it."""
        end = time.monotonic() + wait_s
        while self.procs:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None:
                    return self._death_message(rank, p) + f" ({error})"
            if time.monotonic() > end:
                break
            time.sleep(0.05)
        return error

    def _death_message(self, rank: int, p: subprocess.Popen) -> str:
        return f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.returncode}: the model is split " \
               f"over all {self.args.tp_size} ranks, so nothing more can run; shutting down"

    def _died(self, rank: int, p: subprocess.Popen, on_fatal: Callable[[str], None]) -> None:
        if self._stopping.is_set():
            return
        msg = self._death_message(rank, p)
        if self.group is not None and self.group.failed is None:
            self.group.failed = f"rank {rank} exited with code {p.returncode}"
        on_fatal(msg)

    def shutdown(self) -> None:
        """Stop the followers (the stop command, then SIGTERM, then SIGKILL) and leave the group. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.driver is not None:
            self.driver.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.group is not None:
            self.group.destroy()
        if self.spec_path is not None and os.path.exists(self.spec_path):
            os.unlink(self.spec_path)
