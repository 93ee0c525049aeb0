"""The model runner: turns the scheduler's plain-data batch into tensors, runs the forward pass,
samples, and hands back plain results. The only place where scheduling meets torch.

Grammar masks overlap the forward pass (xgrammar's integration advice): the scheduler has accepted
every constrained row's previous token before `run`, so the rows' next-token masks depend only on
matcher state that nothing else touches during the step; one worker thread fills them while the
forward runs (torch ops and the matcher backends release the GIL), and sampling waits for it. The
worker is joined before `run` returns, so a matcher is never used by two threads at once (aborts and
jump-forward run on the scheduler thread between steps). `overlap_grammar=False` is the synchronous
path; both write identical masks.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch

from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.executor.sampler import logprobs_for_tokens, sample
from sgl.runtime.executor.sampling_state import RowSamplingState
from sgl.runtime.lora.segmented import LoraBatch, StackCache, lora_order
from sgl.runtime.scheduler.request import BatchRow, RowResult, ScheduledBatch
from sgl.kernels.bitmask import allocate_token_bitmask


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: Any, num_slots: int, eos_token_ids: frozenset[int],
                 dtype: torch.dtype = torch.float32, device: str = "cpu", overlap_grammar: bool = True) -> None:
        self.model = model
        self.overlap_grammar = overlap_grammar
        self._mask_worker: Optional[ThreadPoolExecutor] = None  # created on the first constrained step
        self.config = config
        self.device = torch.device(device)
        self.eos_token_ids = eos_token_ids
        self.kv = KVCache.for_model(config, num_slots, dtype, device)
        self.vocab_size = config.vocab_size
        self._lora_stacks = StackCache()  # stacked adapter weights of recent adapter sets (runtime/lora/segmented.py)

    def _state(self, row: BatchRow) -> RowSamplingState:
        req = row.req
        if req.sampling_state is None:
            req.sampling_state = RowSamplingState.create(req.params, req.prompt_ids, self.eos_token_ids)
        return req.sampling_state

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[RowResult]:
        rows = batch.rows
        # LoRA: rows grouped by adapter so each adapter's tokens are one segment; results go back in batch order
        order = lora_order([r.req.lora for r in rows])
        if order is not None:
            rows = [rows[i] for i in order]
        fb = ForwardBatch.from_lists(
            input_ids=[r.input_ids for r in rows],
            slot_tables=[r.req.slots + r.new_slots for r in rows],
            device=self.device,
        )
        if order is not None:
            fb.lora = LoraBatch.from_rows(fb.extend_lens, [r.req.lora for r in rows], self._lora_stacks, self.device)
        results = self._run(rows, fb)
        if order is None:
            return results
        unsorted: list[RowResult] = [results[0]] * len(results)
        for j, i in enumerate(order):
            unsorted[i] = results[j]
        return unsorted

    def _run(self, rows: list[BatchRow], fb: ForwardBatch) -> list[RowResult]:
        results = [RowResult(token_id=None) for _ in rows]

        # Which hidden rows need logits: the last token of sampling rows, and prompt-logprob positions.
        offsets, o = [], 0
        for r in rows:
            offsets.append(o)
            o += r.extend_len
        sample_rows = [i for i, r in enumerate(rows) if r.sample]
        lp_index: list[int] = []
        lp_targets: list[int] = []
        lp_owner: list[int] = []
        for i, r in enumerate(rows):
            for off, tid in r.logprob_targets:
                lp_index.append(offsets[i] + off)
                lp_targets.append(tid)
                lp_owner.append(i)

        mask_job = self._start_bitmask([rows[i] for i in sample_rows])
        try:
            hidden = self.model(fb, self.kv)  # [T, H]
            if sample_rows:
                idx = torch.tensor([offsets[i] + rows[i].extend_len - 1 for i in sample_rows], device=self.device)
                logits = self.model.compute_logits(hidden.index_select(0, idx))  # [S, V] float32
        finally:  # NOTE: joined even when the forward raises: no matcher stays in use past the step
            bitmask = mask_job.result() if isinstance(mask_job, Future) else mask_job

        if sample_rows:
            states = [self._state(rows[i]) for i in sample_rows]
            top_nums = [rows[i].req.top_logprobs_num if rows[i].req.return_logprob else 0 for i in sample_rows]
            out = sample(logits, states, bitmask, top_nums)
            failed = set(out.failed_rows)
            for j, i in enumerate(sample_rows):
                res = results[i]
                if j in failed:
                    g = rows[i].req.grammar
                    res.error = (g.error if g is not None else None) or out.failure_messages.get(j) or \
                        "the constraint allows no token here (no continuation satisfies it)"
                    continue
                res.token_id = out.token_ids[j]
                res.logprob = out.logprobs[j]
                res.top_logprobs = out.top_logprobs[j] if out.top_logprobs is not None else None
                states[j].append(res.token_id)

        if lp_index:
            top_k = max(rows[i].req.top_logprobs_num for i in set(lp_owner))
            logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(lp_index, device=self.device)))
            lps, tops = logprobs_for_tokens(logits, torch.tensor(lp_targets, device=self.device), top_k)
            for j, i in enumerate(lp_owner):
                results[i].prompt_logprobs.append(float(lps[j]))
                k = rows[i].req.top_logprobs_num
                if tops is not None and k > 0:
                    results[i].prompt_top_logprobs.append(tops[j][:k])
        return results

    def _start_bitmask(self, rows: list[BatchRow]) -> "Optional[torch.Tensor] | Future[Optional[torch.Tensor]]":
        """The sample rows' bitmask: a Future filled on the worker thread (overlap on), the tensor
        itself (overlap off), or None when no row is constrained."""
        if not any(r.req.grammar is not None for r in rows):
            return None
        if not self.overlap_grammar:
            return self._bitmask(rows, self.vocab_size)
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgl-grammar-mask")
        return self._mask_worker.submit(self._bitmask, rows, self.vocab_size)

    def close(self) -> None:
        """Stop the mask worker thread (idempotent)."""
        if self._mask_worker is not None:
            self._mask_worker.shutdown(wait=True)
            self._mask_worker = None

    def _bitmask(self, rows: list[BatchRow], vocab: int) -> Optional[torch.Tensor]:
        """[S, ceil(V/32)] int32 for the constrained rows (unconstrained rows: all ones), or None."""
        if not any(r.req.grammar is not None for r in rows):
            return None
        mask = allocate_token_bitmask(len(rows), vocab)
        for j, r in enumerate(rows):
            if r.req.grammar is not None:
                r.req.grammar.fill_bitmask(mask, j)
        return mask
