"""Rank 0 drives, the other ranks follow: each step's inputs are broadcast, every rank runs the same
forward, and the collectives inside it (all-reduces, the vocab gather) line up by construction.

    model = TPDriver(sharded_model, group)        # rank 0: the ModelRunner calls it like the model
    run_follower(sharded_model, local_config, group)   # ranks 1..tp-1: until rank 0 says stop

The wire: a header, int64 [HEADER] = (kind, a, b, c, d, e), broadcast from rank 0, then the kind's payload:
    FORWARD (a=B sequences, b=T tokens, c=S slot-table entries, d=M tree-mask entries, e=flags): int64
        [2B + 3T + S (+ B) (+ B + M)] = extend_lens, seq_lens, input_ids, positions, out_cache_loc, the slot
        tables end to end, then decode_tails (flag TAILS), then each sequence's mask size and the tree masks
        flattened (M > 0: a verify row of a draft tree; without its mask a follower's attention ran causal
        over the tree and the all-reduced logits were wrong); flag GENERATED: generated_only. Every rank runs
        the same forward (the fused decoder where rank 0 does); followers drop the hidden states.
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
from typing import Any, Optional

import torch

from sgl.runtime.distributed.errors import TensorParallelError
from sgl.runtime.distributed.group import TPGroup
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig

logger = logging.getLogger("sgl.distributed")


FORWARD, LOGITS, PING, STOP = 1, 2, 3, 4
HEADER = 6
GENERATED, TAILS = 1, 2  # FORWARD's flags


def _header(kind: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0, e: int = 0) -> torch.Tensor:
    return torch.tensor([kind, a, b, c, d, e], dtype=torch.int64)


def _pack(fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [torch.tensor(fb.extend_lens + fb.seq_lens, dtype=torch.int64), fb.input_ids, fb.positions,
             fb.out_cache_loc, *fb.slot_tables]
    flags = GENERATED * fb.generated_only + TAILS * (fb.decode_tails is not None)
    if fb.decode_tails is not None:
        parts.append(torch.tensor(fb.decode_tails, dtype=torch.int64))
    masks = fb.tree_masks if fb.tree_masks is not None and any(m is not None for m in fb.tree_masks) else None
    m = 0
    if masks is not None:
        sizes = [0 if mask is None else mask.numel() for mask in masks]
        parts.append(torch.tensor(sizes, dtype=torch.int64))
        parts += [mask.flatten().long() for mask in masks if mask is not None]
        m = sum(sizes)
    return _header(FORWARD, fb.batch_size, fb.num_tokens, sum(fb.seq_lens), m, flags), torch.cat(parts)


def _payload_size(header: torch.Tensor) -> int:
    b, t, s, m, flags = (int(x) for x in header[1:])
    return 2 * b + 3 * t + s + (b if flags & TAILS else 0) + (b + m if m else 0)


def _unpack(header: torch.Tensor, payload: torch.Tensor) -> ForwardBatch:
    b, t, s, m, flags = (int(x) for x in header[1:])
    lens = payload[: 2 * b].tolist()
    ids, pos, out = payload[2 * b : 2 * b + 3 * t].split(t)
    o = 2 * b + 3 * t
    tables = list(payload[o : o + s].split(lens[b:]))
    o += s
    tails = None
    if flags & TAILS:
        tails, o = payload[o : o + b].tolist(), o + b
    masks: Optional[list[Optional[torch.Tensor]]] = None
    if m:
        sizes, o = payload[o : o + b].tolist(), o + b
        masks = []
        for e, n in zip(lens[:b], sizes):
            masks.append(payload[o : o + n].view(e, e).bool() if n else None)
            o += n
    return ForwardBatch(input_ids=ids, positions=pos, out_cache_loc=out, extend_lens=lens[:b],
                        seq_lens=lens[b:], slot_tables=tables, tree_masks=masks,
                        generated_only=bool(flags & GENERATED), decode_tails=tails)


class TPDriver:
    """Rank 0's stand-in for the model: broadcasts each call, then runs it (ModelRunner sees a model)."""

    def __init__(self, model: torch.nn.Module, group: TPGroup, heartbeat_s: float,
                 whole_lm_head: Optional[Any] = None) -> None:
        """`whole_lm_head`: the lm_head before sharding, for a head drafter to read its rows (`lm_head`)."""
        self.model, self.group = model, group
        self.config = model.config
        self.whole_lm_head = whole_lm_head
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

    # What EAGLE's and MEDUSA's drafters read of the target on rank 0 (runtime/speculative/): the embedding is whole
    # on every rank (sharding.py), the lm_head only if the engine kept it whole (TensorParallel.attach).
    @property
    def embed(self) -> Any:
        return self.model.embed

    @property
    def native(self) -> bool:
        return bool(getattr(self.model, "native", False))

    @property
    def lm_head(self) -> Any:
        if self.whole_lm_head is None:
            raise AttributeError("this rank holds 1/tp of the lm_head's rows: attach(keep_lm_head=True) keeps them all")
        return self.whole_lm_head

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
        header = group.broadcast_tensor(torch.empty(HEADER, dtype=torch.int64))
        kind = int(header[0])
        if kind == FORWARD:
            payload = group.broadcast_tensor(torch.empty(_payload_size(header), dtype=torch.int64))
            model(_unpack(header, payload), kv)  # the hidden states only feed the collectives
        elif kind == LOGITS:
            model.compute_logits(group.broadcast_tensor(torch.empty(int(header[1]), hidden_size, dtype=dtype)))
        elif kind == STOP:
            logger.info("tensor-parallel rank %d: stop", group.rank)
            return
        elif kind != PING:
            raise TensorParallelError(f"rank {group.rank}: unknown command {kind} from rank 0")
