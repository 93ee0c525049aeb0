"""Rank 0 drives, the other ranks follow: each step's inputs are broadcast, every rank runs the same
forward, and the collectives inside it (all-reduces, the vocab gather) line up by construction.

    model = TPDriver(sharded_model, group)        # rank 0: the ModelRunner calls it like the model
    run_follower(sharded_model, local_config, group)   # ranks 1..tp-1: until rank 0 says stop

The wire, one broadcast per command from rank 0 (picklable tuples):
    ("forward", ForwardBatch fields)  every rank runs model.forward; followers keep the hidden states
    ("logits", hidden rows [N, hidden])  every rank runs compute_logits (its vocab shard + the gather)
    ("ping",)  sent when idle for `heartbeat_s`, so a follower's wait never reaches the group timeout
    ("stop",)
Rank 0 sends the hidden rows it selected rather than their indices: the ranks' hidden states are equal
after each all-reduce, and this keeps the follower ignorant of sampling and logprob rows.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from sgl.runtime.distributed.errors import TensorParallelError
from sgl.runtime.distributed.group import TPGroup
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig

logger = logging.getLogger("sgl.distributed")


def _fields(fb: ForwardBatch) -> tuple[Any, ...]:
    return (fb.input_ids, fb.positions, fb.out_cache_loc, fb.extend_lens, fb.seq_lens, fb.slot_tables)


class TPDriver:
    """Rank 0's stand-in for the model: broadcasts each call, then runs it (ModelRunner sees a model)."""

    def __init__(self, model: torch.nn.Module, group: TPGroup, heartbeat_s: float) -> None:
        self.model, self.group = model, group
        self.config = model.config
        self._lock = threading.Lock()  # one command and its collectives at a time (steps vs heartbeat)
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), name="sgl-tp-heartbeat", daemon=True)
        self._heartbeat.start()

    def _send(self, cmd: tuple[Any, ...]) -> None:
        self.group.broadcast(cmd)
        self._last = time.monotonic()

    def __call__(self, fb: ForwardBatch, kv: KVCache) -> torch.Tensor:
        with self._lock:
            self._send(("forward", _fields(fb)))
            return self.model(fb, kv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._send(("logits", hidden))
            return self.model.compute_logits(hidden)

    def _beat(self, every: float) -> None:
        while not self._closed.wait(every / 4):
            if time.monotonic() - self._last < every or self.group.failed is not None:
                continue
            with self._lock:
                if self._closed.is_set():
                    return
                try:
                    self._send(("ping",))
                except TensorParallelError as e:
                    logger.error("%s", e)  # the next step raises the same error and the engine stops
                    return

    def close(self) -> None:
        """Tell the followers to exit (best effort: a failed group has no one to tell)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if self.group.failed is None:
                try:
                    self._send(("stop",))
                except TensorParallelError:
                    pass


@torch.inference_mode()
def run_follower(model: torch.nn.Module, config: ModelConfig, group: TPGroup) -> None:
    """A follower's whole life after loading: receive the KV pool size, then execute commands until
    ("stop",). Raises TensorParallelError when rank 0 is gone or silent past the timeout."""
    num_slots, dtype = group.broadcast(None)
    kv = KVCache.for_model(config, num_slots, getattr(torch, dtype))
    logger.info("tensor-parallel rank %d ready: %d heads, %d kv heads, KV pool %d slots",
                group.rank, config.num_attention_heads, config.num_key_value_heads, num_slots)
    while True:
        cmd = group.broadcast(None)
        kind = cmd[0]
        if kind == "forward":
            input_ids, positions, out_loc, extend_lens, seq_lens, tables = cmd[1]
            fb = ForwardBatch(input_ids=input_ids, positions=positions, out_cache_loc=out_loc,
                              extend_lens=extend_lens, seq_lens=seq_lens, slot_tables=tables)
            model(fb, kv)  # the hidden states only feed the collectives; rank 0 sends the rows it needs
        elif kind == "logits":
            model.compute_logits(cmd[1])
        elif kind == "stop":
            logger.info("tensor-parallel rank %d: stop", group.rank)
            return
        elif kind != "ping":
            raise TensorParallelError(f"rank {group.rank}: unknown command {kind!r} from rank 0")
