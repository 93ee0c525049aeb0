"""Rank 0 drives, the other ranks follow: each step's inputs are broadcast, every rank runs the same
forward, and the collectives inside it (all-reduces, the vocab gather) line up by construction.

    model = TPDriver(sharded_model, group)        # rank 0: the ModelRunner calls it like the model
    run_follower(sharded_model, local_config, group)   # ranks 1..tp-1: until rank 0 says stop

The wire: a header, int64 [4] = (kind, a, b, c), broadcast from rank 0, then the kind's payload:
    FORWARD (a=B sequences, b=T tokens, c=S slot-table entries): int64 [2B + 3T + S] = extend_lens,
        seq_lens, input_ids, positions, out_cache_loc, the slot tables end to end. Every rank runs the
        forward; followers drop the hidden states.
    LOGITS (a=N rows): the hidden rows [N, hidden] rank 0 selected; every rank runs compute_logits (its
        vocab shard, then the gather). Rows, not indices: the ranks' hidden states are equal after each
        all-reduce, and followers stay ignorant of sampling and logprob rows.
    PING: sent when idle for `heartbeat_s`, so a follower's wait never reaches the group timeout.
    STOP.
Tensors, not pickled objects: two small broadcasts per command (broadcast_object_list takes ~4x longer).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import torch

from sgl.runtime.distributed.errors import TensorParallelError
from sgl.runtime.distributed.group import TPGroup
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig

logger = logging.getLogger("sgl.distributed")


FORWARD, LOGITS, PING, STOP = 1, 2, 3, 4


def _header(kind: int, a: int = 0, b: int = 0, c: int = 0) -> torch.Tensor:
    return torch.tensor([kind, a, b, c], dtype=torch.int64)


def _pack(fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor(fb.extend_lens + fb.seq_lens, dtype=torch.int64)
    payload = torch.cat([lens, fb.input_ids, fb.positions, fb.out_cache_loc, *fb.slot_tables])
    return _header(FORWARD, fb.batch_size, fb.num_tokens, sum(fb.seq_lens)), payload


def _unpack(header: torch.Tensor, payload: torch.Tensor) -> ForwardBatch:
    b, t = int(header[1]), int(header[2])
    lens = payload[: 2 * b].tolist()
    ids, pos, out = payload[2 * b : 2 * b + 3 * t].split(t)
    tables = list(payload[2 * b + 3 * t :].split(lens[b:]))
    return ForwardBatch(input_ids=ids, positions=pos, out_cache_loc=out, extend_lens=lens[:b],
                        seq_lens=lens[b:], slot_tables=tables)


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

    def _send(self, header: torch.Tensor, payload: Optional[torch.Tensor] = None) -> None:
        self.group.broadcast_tensor(header)
        if payload is not None:
            self.group.broadcast_tensor(payload)
        self._last = time.monotonic()

    def __call__(self, fb: ForwardBatch, kv: KVCache) -> torch.Tensor:
        with self._lock:
            self._send(*_pack(fb))
            return self.model(fb, kv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._lock:
            hidden = hidden.contiguous()
            self._send(_header(LOGITS, hidden.shape[0]), hidden)
            return self.model.compute_logits(hidden)

    def _beat(self, every: float) -> None:
        while not self._closed.wait(every / 4):
            if time.monotonic() - self._last < every or self.group.failed is not None:
                continue
            with self._lock:
                if self._closed.is_set():
                    return
                try:
                    self._send(_header(PING))
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
                    self._send(_header(STOP))
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
    hidden_size, dtype = config.hidden_size, getattr(torch, dtype)
    while True:
        header = group.broadcast_tensor(torch.empty(4, dtype=torch.int64))
        kind = int(header[0])
        if kind == FORWARD:
            b, t, s = (int(x) for x in header[1:])
            payload = group.broadcast_tensor(torch.empty(2 * b + 3 * t + s, dtype=torch.int64))
            model(_unpack(header, payload), kv)  # the hidden states only feed the collectives
        elif kind == LOGITS:
            model.compute_logits(group.broadcast_tensor(torch.empty(int(header[1]), hidden_size, dtype=dtype)))
        elif kind == STOP:
            logger.info("tensor-parallel rank %d: stop", group.rank)
            return
        elif kind != PING:
            raise TensorParallelError(f"rank {group.rank}: unknown command {kind} from rank 0")
