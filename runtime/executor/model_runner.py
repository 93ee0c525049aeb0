"""The model runner: turns the scheduler's plain-data batch into tensors, runs the forward pass,
samples, and hands back plain results. The only place where scheduling meets torch.

Grammar masks overlap the forward pass (xgrammar's integration advice): the scheduler has accepted
every constrained row's previous token before `run`, so the rows' next-token masks depend only on
matcher state that nothing else touches during the step; one worker thread fills them while the
forward runs (torch ops and the matcher backends release the GIL), and sampling waits for it. The
worker is joined before `run` returns, so a matcher is never used by two threads at once (aborts and
jump-forward run on the scheduler thread between steps). `overlap_grammar=False` is the synchronous
path; both write identical masks.

A verify row (speculative decoding, `BatchRow.draft_len > 0`) gets logits at all of its 1 + k
positions; `verify.sample_verify` turns them into the row's produced tokens (RowResult.token_id, then
next_token_ids). A plain decode row is the case k = 0.

`capture_hidden` (MEDUSA/EAGLE drafters turn it on): each RowResult also carries the final-normed
hidden states of the row's kept input tokens (RowResult.hidden_states), copied out of the step; where the
model keeps some layers' outputs (`capture_layers`: an EAGLE-3 head's low, middle and high states), those
instead, side by side.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch

from sgl.kernels.cpu.quant import exact_activations
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.executor.sampler import logprobs_for_tokens
from sgl.runtime.executor.verify import VerifyMasks, fill_verify_bitmask, restore_fill_state, sample_verify
from sgl.runtime.executor.sampling_state import RowSamplingState
from sgl.runtime.lora.segmented import LoraBatch, StackCache, lora_order
from sgl.runtime.models.fused_decode import fuses_decode_tails
from sgl.runtime.scheduler.request import BatchRow, RowResult, ScheduledBatch


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: Any, num_slots: int, eos_token_ids: frozenset[int],
                 dtype: torch.dtype = torch.float32, device: str = "cpu", overlap_grammar: bool = True,
                 capture_hidden: bool = False) -> None:
        self.model = model
        self.capture_hidden = capture_hidden  # fill RowResult.hidden_states (speculative heads read them)
        # Called with (rows, results) after every run, results in row order (EAGLE files the states)
        self.hidden_observer: Optional[Callable[[list[BatchRow], list[RowResult]], None]] = None
        self.overlap_grammar = overlap_grammar
        # whether the scheduler appends the tokens a grammar forces by jump-forward: verification then takes them
        # from a draft the same way (verify.sample_verify); the Scheduler sets it from --disable-jump-forward
        self.jump_forward = True
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
        trees = [r.draft_parents for r in rows]
        fb = ForwardBatch.from_lists(
            input_ids=[r.input_ids for r in rows],
            slot_tables=[r.req.slots + r.new_slots for r in rows],
            device=self.device,
            trees=trees if any(t is not None for t in trees) else None,
            generated_only=all(r.start >= len(r.req.prompt_ids) for r in rows),
            decode_tails=[_decode_tail(r) for r in rows],
        )
        if order is not None:
            fb.lora = LoraBatch.from_rows(fb.extend_lens, [r.req.lora for r in rows], self._lora_stacks, self.device)
        exact = _lone_prompt_token(rows) and not fuses_decode_tails(self.model, fb, self.kv)
        results = self._run_exact(rows, fb) if exact else self._run(rows, fb)
        if order is not None:
            unsorted: list[RowResult] = [results[0]] * len(results)
            for j, i in enumerate(order):
                unsorted[i] = results[j]
            results = unsorted
        if self.hidden_observer is not None:
            self.hidden_observer(batch.rows, results)
        return results

    def _run_exact(self, rows: list[BatchRow], fb: ForwardBatch) -> list[RowResult]:
        """A prompt token computed alone runs exact fp32 activations (see _lone_prompt_token)."""
        with exact_activations():
            return self._run(rows, fb)

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

        # Sample positions: the last 1 + draft_len tokens of each sampling row, row after row.
        bases, pos = [], []
        for i in sample_rows:
            r = rows[i]
            bases.append(len(pos))
            first = offsets[i] + r.extend_len - 1 - r.draft_len
            pos.extend(range(first, first + 1 + r.draft_len))
        mask_job = self._start_bitmask([rows[i] for i in sample_rows], bases, len(pos))
        try:
            hidden = self.model(fb, self.kv)  # [T, H]
            if sample_rows:
                logits = self.model.compute_logits(
                    hidden.index_select(0, torch.tensor(pos, device=self.device)))  # [P, V] float32
        finally:  # NOTE: joined even when the forward raises: no matcher stays in use past the step
            masks = mask_job.result() if isinstance(mask_job, Future) else mask_job

        if sample_rows:
            states = [self._state(rows[i]) for i in sample_rows]
            top_nums = [rows[i].req.top_logprobs_num if rows[i].req.return_logprob else 0 for i in sample_rows]
            outs = sample_verify(logits, bases, [rows[i].draft for i in sample_rows], states,
                                 masks.bitmask if masks is not None else None, top_nums,
                                 parents=[rows[i].draft_parents for i in sample_rows],
                                 alive=masks.alive if masks is not None else None,
                                 want_logprobs=[rows[i].req.return_logprob for i in sample_rows],
                                 forced=masks.forced if masks is not None else None)
            for j, i in enumerate(sample_rows):
                res, out, g = results[i], outs[j], rows[i].req.grammar
                if masks is not None and g is not None and masks.fill_states[j] is not None:
                    last = out.path[-1] + 1 if out.path else 0  # the position of the last sample
                    restore_fill_state(g, masks.fill_states[j][last])
                if not out.token_ids:
                    res.error = (g.error if g is not None else None) or out.failure or \
                        "the constraint allows no token here (no continuation satisfies it)"
                    continue
                res.token_id, res.logprob, res.top_logprobs = out.token_ids[0], out.logprobs[0], out.top_logprobs[0]
                res.next_token_ids = out.token_ids[1:]
                res.next_logprobs = list(out.logprobs[1:])
                res.next_top_logprobs = out.top_logprobs[1:]
                res.draft_path = out.path

        if self.capture_hidden:
            # the model's kept layer outputs where it keeps some (EAGLE-3's), else its final-normed states
            captured = getattr(self.model, "captured", None) if getattr(self.model, "capture_layers", ()) else None
            states = hidden if captured is None else captured
            for i, r in enumerate(rows):
                res = results[i]
                if res.error is not None:
                    continue
                pending = r.extend_len - r.draft_len
                if r.draft_parents is None:  # prefill chunk, decode or chain: a contiguous run of inputs
                    kept = pending + (len(res.next_token_ids) if r.sample else 0)
                    res.hidden_states = states[offsets[i]:offsets[i] + kept].clone()  # [kept, H]
                else:  # tree: the pending token(s), then the accepted path's nodes
                    idx = [offsets[i] + x for x in list(range(pending)) + [pending + c for c in res.draft_path]]
                    res.hidden_states = states.index_select(0, torch.tensor(idx, device=self.device))

        if lp_index:
            top_k = max(rows[i].req.top_logprobs_num for i in set(lp_owner))
            # prompt logprobs: fp32 activations whatever the row count (q16 is for up to 64 sampling rows: see
            # LlamaForCausalLM.compute_logits), so a prompt's scores do not depend on how many rows ask for them
            with exact_activations():
                logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(lp_index, device=self.device)))
            lps, tops = logprobs_for_tokens(logits, torch.tensor(lp_targets, device=self.device), top_k)
            for j, i in enumerate(lp_owner):
                results[i].prompt_logprobs.append(float(lps[j]))
                k = rows[i].req.top_logprobs_num
                if tops is not None and k > 0:
                    results[i].prompt_top_logprobs.append(tops[j][:k])
        return results

    def _start_bitmask(self, rows: list[BatchRow], bases: list[int], num_positions: int,
                       ) -> "Optional[VerifyMasks] | Future[Optional[VerifyMasks]]":
        """The sample positions' masks: a Future filled on the worker thread (overlap on), the masks
        themselves (overlap off), or None when no row is constrained."""
        if not any(r.req.grammar is not None for r in rows):
            return None
        if not self.overlap_grammar:
            return self._bitmask(rows, bases, num_positions)
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgl-grammar-mask")
        return self._mask_worker.submit(self._bitmask, rows, bases, num_positions)

    def close(self) -> None:
        """Stop the mask worker thread (idempotent)."""
        if self._mask_worker is not None:
            self._mask_worker.shutdown(wait=True)
            self._mask_worker = None

    def _bitmask(self, rows: list[BatchRow], bases: list[int], num_positions: int) -> Optional[VerifyMasks]:
        """[P, ceil(V/32)] int32 for the constrained rows' positions (others: all ones), or None."""
        if not any(r.req.grammar is not None for r in rows):
            return None
        return fill_verify_bitmask([r.req.grammar for r in rows], bases, [r.draft for r in rows],
                                   num_positions, self.vocab_size, parents=[r.draft_parents for r in rows],
                                   jump_forward=self.jump_forward)


def _decode_tail(r: BatchRow) -> int:
    """How many of the row's last new tokens are sampled from like decode tokens (ForwardBatch.decode_tails)."""
    prompt = len(r.req.prompt_ids)
    if r.start >= prompt:
        return r.extend_len  # decode / verify
    return 1 if r.start + r.extend_len == prompt else 0  # the chunk that ends the prompt: its final token


def _lone_prompt_token(rows: list[BatchRow]) -> bool:
    """A step of one row holding one PROMPT token: the last prompt token recomputed after a full-prefix cache
    hit. The default q16 activations apply to one-row matmuls only (sgl.kernels.cpu.quant: set_q16_batches),
    so without this the same token would see q16 here but fp32 in a whole-prompt prefill, and a near-tie first
    output token would flip with the cache state (measured: a greedy chat answer changed on its second, cached
    run). Generated tokens keep q16. Where the model runs every final prompt token as a decode row
    (fused_decode.fuses_decode_tails: the prefill does so too), the token keeps that path instead."""
    return len(rows) == 1 and rows[0].extend_len == 1 and rows[0].start < len(rows[0].req.prompt_ids)
