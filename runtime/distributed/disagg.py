"""Prefill/decode disaggregation, the engine's side: export a prompt's KV from the radix tree, import
it into another engine's tree.

    # prefill server (--disaggregation-mode prefill), after running the prompt for its first token:
    ids, handle = engine.disagg.export_prompt(request)
    # decode server (--disaggregation-mode decode), before generating for the same ids:
    engine.disagg.import_prompt(ids, handle)    # the prompt's KV now sits in this engine's radix tree

The decode server then serves the request as usual: its prefix match covers the prompt but its last
token, which it recomputes (one token; the scheduler always runs at least one new token to get the
logits), so its greedy output equals a single server's. Imported KV is plain cached prefix: evictable
under pressure (then simply recomputed), counted by the integrity check like any cached slot.
Tensor shapes: the pools are [layers, slots, Hkv, D]; a transferred KV is [2 (k, v), layers, L, Hkv, D].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sgl.runtime.distributed.kv_transfer import KVTransferError, SharedMemoryTransfer
from sgl.runtime.protocol import GenerateRequest, RequestError

if TYPE_CHECKING:
    from sgl.runtime.engine import Engine


class Disaggregation:
    def __init__(self, engine: "Engine", mode: str, timeout_s: float) -> None:
        if engine.server_args.disable_radix_cache:
            raise ValueError("disaggregation_mode needs the radix cache (the KV moves through it)")
        if engine.server_args.tp_size > 1:
            raise ValueError("disaggregation_mode with tp_size > 1 is not supported yet")
        self.engine, self.mode = engine, mode
        self.transfer = SharedMemoryTransfer(timeout_s)

    def export_prompt(self, req: GenerateRequest) -> tuple[list[int], dict[str, Any]]:
        """The prompt's token ids and a handle to its KV (which the prompt's run left in the radix tree)."""
        ids = self.engine._tokenize(req)
        sch = self.engine.scheduler

        pool = sch.runner.kv

        def gather() -> dict[str, Any]:  # on the scheduler thread: nothing evicts while we read
            m = sch.cache.match_prefix(ids)
            if len(m.slots) < len(ids):
                raise KVTransferError(f"only {len(m.slots)} of the prompt's {len(ids)} tokens are cached (evicted "
                                      f"under memory pressure); retry")
            idx = torch.tensor(m.slots, dtype=torch.int64)

            def fill(buf: torch.Tensor) -> None:  # straight from the pool into the segment: one copy
                torch.index_select(pool.k, 1, idx, out=buf[0])
                torch.index_select(pool.v, 1, idx, out=buf[1])

            shape = (2, pool.num_layers, len(ids), pool.num_kv_heads, pool.head_dim)
            return self.transfer.put_with(shape, pool.dtype, fill)

        return ids, self.engine._call(gather)

    def import_prompt(self, ids: list[int], handle: Any) -> int:
        """Read the KV behind `handle` and insert it under `ids` into the radix tree; returns the tokens
        newly stored (0 when the tree already had them). Raises KVTransferError (gone, wrong shape) or
        RequestError (bad ids)."""
        if not isinstance(handle, dict):
            raise RequestError("kv must be the handle object that /disagg/prefill returned")
        if not ids or not all(isinstance(t, int) and 0 <= t < self.engine.model_config.vocab_size for t in ids):
            raise RequestError("input_ids must be the prompt's token ids that /disagg/prefill returned")
        sch = self.engine.scheduler
        pool = sch.runner.kv
        want = (2, pool.num_layers, len(ids), pool.num_kv_heads, pool.head_dim)
        with self.transfer.opened(handle) as kvt:  # read in place: one copy, segment -> pool
            if tuple(kvt.shape) != want:
                raise KVTransferError(f"KV of shape {tuple(kvt.shape)} does not fit this model and prompt {want}")
            return self.engine._call(lambda: self._insert(ids, kvt))

    def _insert(self, ids: list[int], kvt: torch.Tensor) -> int:
        """On the scheduler thread: store kvt's tokens the tree lacks into fresh slots, insert them under ids."""
        sch = self.engine.scheduler
        pool = sch.runner.kv
        m = sch.cache.match_prefix(ids)
        have = len(m.slots)
        need = len(ids) - have
        if need == 0:
            return 0
        sch.cache.lock(m.node)  # the matched part must survive the eviction below
        try:
            if not sch._ensure_free(need):
                raise KVTransferError(f"the KV pool has no room for {need} imported tokens")
            slots = sch.allocator.alloc(need)
        finally:
            sch.cache.unlock(m.node)
        assert slots is not None
        idx = torch.tensor(slots, dtype=torch.int64)
        pool.k.index_copy_(1, idx, kvt[0, :, have:].to(pool.dtype))
        pool.v.index_copy_(1, idx, kvt[1, :, have:].to(pool.dtype))
        assert sch.cache.insert(ids, m.slots + slots) == have
        return need

    def close(self) -> None:
        self.transfer.close()
