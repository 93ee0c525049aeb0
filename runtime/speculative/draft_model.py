"""DRAFT: a separate small model (same tokenizer) drafts k tokens greedily, on its own KV pool,
inside the scheduler's step (before the target's verify forward).

Per request the drafter keeps `_DraftSeq`: the tokens whose KV its pool holds and their slots. Each
`propose`:
  1. keeps the longest prefix of those tokens that still equals the request's `fill_ids` (drafts the
     target rejected are dropped, their slots freed);
  2. one batched extend computes the missing tokens up to and including the pending one -> d_1;
  3. k - 1 batched decode steps -> d_2..d_k (their KV stays: accepted drafts are reused next step).
Greedy drafts are deterministic (q one-hot), which is what the verify rule assumes (drafter.py).
A request's state is released when it finishes (swept at the next `propose`), or dropped when the
draft pool runs short (that request then just gets no draft).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.drafter import Draft


@dataclass
class _DraftSeq:
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the draft pool
    slots: list[int] = field(default_factory=list)  # [len(tokens)]


class DraftModelDrafter:
    name = "DRAFT"
    accept_prior = 0.7  # per-draft acceptance before a request has any (speculative_rows.py): a model agrees often

    def __init__(self, model: Any, config: Any, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.kv = KVCache.for_model(config, num_slots, dtype, device)
        self.allocator = SlotAllocator(num_slots)
        self.vocab_size = config.vocab_size
        self._seqs: dict[Req, _DraftSeq] = {}

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        self._sweep()
        live: list[tuple[Req, _DraftSeq]] = []
        for req in reqs:
            seq = self._sync(req)
            if seq is not None:
                live.append((req, seq))
        drafts: dict[Req, list[int]] = {req: [] for req in reqs}
        # Step 1: extend each sequence to the pending token; steps 2..k: decode the previous draft.
        new_ids = {req: req.fill_ids[len(seq.tokens):] for req, seq in live}
        for _ in range(k):
            if not live:
                break
            batch = []
            for req, seq in live:
                slots = self.allocator.alloc(len(new_ids[req]))
                if slots is None:
                    continue  # draft pool full: this request stops drafting here
                batch.append((req, seq, new_ids[req], slots))
            if not batch:
                break
            fb = ForwardBatch.from_lists([ids for _, _, ids, _ in batch],
                                         [seq.slots + slots for _, seq, _, slots in batch], device=self.device)
            hidden = self.model(fb, self.kv)  # [T, H]
            nxt = self.model.compute_logits(hidden.index_select(0, fb.last_token_indices)).argmax(-1).tolist()
            live = []
            for (req, seq, ids, slots), tok in zip(batch, nxt):
                seq.tokens += ids
                seq.slots += slots
                drafts[req].append(int(tok))
                new_ids[req] = [int(tok)]
                live.append((req, seq))
        return [Draft(drafts[req]) for req in reqs]

    def _sync(self, req: Req) -> "_DraftSeq | None":
        """The request's draft sequence, cut to its longest prefix still in `fill_ids`."""
        seq = self._seqs.get(req)
        if seq is None:
            seq = self._seqs[req] = _DraftSeq()
        fill = req.fill_ids
        n = 0
        limit = min(len(seq.tokens), len(fill) - 1)  # the pending token is always recomputed
        while n < limit and seq.tokens[n] == fill[n]:
            n += 1
        self.allocator.free(seq.slots[n:])
        del seq.tokens[n:], seq.slots[n:]
        if len(fill) - n > self.allocator.available:
            self._drop(req)
            return None
        return seq

    def _drop(self, req: Req) -> None:
        seq = self._seqs.pop(req, None)
        if seq is not None:
            self.allocator.free(seq.slots)

    def _sweep(self) -> None:
        for req in [r for r in self._seqs if r.finished]:
            self._drop(req)

    @property
    def used_slots(self) -> int:
        return self.allocator.size - self.allocator.available
