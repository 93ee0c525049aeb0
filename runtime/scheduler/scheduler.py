"""Continuous batching with chunked prefill, prefix caching and preemption. No tensors here.

One `step()`:
  1. decode: every running request with one pending token gets a KV slot (evict cache, then preempt
     the lowest-class, lowest-priority newest request when the pool is short);
  2. prefill: continue in-flight chunked prompts, then admit waiting requests (classes interleaved by
     weighted fair share, each class in policy order), each matched against the radix tree, under the
     per-step token budget (`max_prefill_tokens`, and `chunked_prefill_size` per step when chunking is
     on: Sarathi); a realtime request that finds the batch full (requests or KV) preempts lower-class
     work, which is swapped to the host tier (or recomputed later) and resumes by a copy back;
  3. run the batch on the model runner (an argument: tests drive the scheduler with a fake one);
  4. append sampled tokens, check finish, cache finished requests' KV in the tree, emit outputs.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.cache.hiradix_cache import HiRadixCache
from sgl.runtime.cache.host_pool import HostPool, KVMover
from sgl.runtime.cache.radix_cache import NoPrefixCache, RadixCache
from sgl.runtime.config import ServerArgs
from sgl.runtime.protocol import finish_reason_abort, finish_reason_internal_error, finish_reason_length
from sgl.runtime.scheduler.fair_share import CLASS_RANK, FairShare
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.policy import order_waiting
from sgl.runtime.scheduler.crash_safety import free_new_slots, isolate_failure
from sgl.runtime.scheduler.preemption import preemption_victim, swap_in
from sgl.runtime.scheduler.prefix_slots import cache_request, match_prefix, rematch_prefix, release_prefix
from sgl.runtime.scheduler.request import BatchRow, Req, ReqStatus, RowResult, ScheduledBatch
from sgl.runtime.scheduler.rollback import apply_guard
from sgl.runtime.scheduler.speculative_rows import make_speculative_rows, prediction_rows
from sgl.runtime.scheduler.stats import StepStats
from sgl.runtime.speculative import make_drafter
from sgl.runtime.speculative.drafter import Draft, Drafter
from sgl.runtime.speculative.verify_cost import step_clock

logger = logging.getLogger(__name__)


class ModelRunnerLike(Protocol):
    def run(self, batch: ScheduledBatch) -> list[RowResult]: ...


OutputCallback = Callable[[Req], None]


@dataclass
class _PrefillBudget:
    tokens: int  # prefill tokens this step may still schedule
    first: bool = True  # no prefill row yet (unchunked, a prompt over the budget may take a step alone)

    def take(self, n: int) -> None:
        self.tokens -= n
        self.first = False


class Scheduler:
    def __init__(self, args: ServerArgs, runner: ModelRunnerLike, output: OutputProcessor, pool_size: int,
                 on_output: OutputCallback, drafter: Optional[Drafter] = None, mover: Optional[KVMover] = None,
                 host_pool_size: int = 0, cache_mover: Optional[KVMover] = None) -> None:
        """`drafter`: speculative decoding (None: from --speculative-algorithm); `mover` + `host_pool_size`: the
        swap space (--preemption-mode swap); `cache_mover`: the host tier of --hierarchical-cache (its own pool
        of --host-cache-tokens slots). Tests pass the fake runner."""
        self.args = args
        self.runner = runner
        if hasattr(runner, "jump_forward"):  # verification takes forced tokens as jump-forward appends them
            runner.jump_forward = not args.disable_jump_forward
        self.output = output
        self.on_output = on_output
        self.allocator = SlotAllocator(pool_size)
        self.cache: RadixCache = (NoPrefixCache if args.disable_radix_cache else RadixCache)(self.allocator)
        if args.hierarchical_cache and not args.disable_radix_cache and cache_mover is not None:
            self.cache = HiRadixCache(self.allocator, HostPool(cache_mover, args.host_cache_tokens))
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.stats = StepStats()
        self.fair = FairShare(args.priority_weight_map)
        self.swap = HostPool(mover, host_pool_size if args.preemption_mode == "swap" else 0)
        self._arrival = itertools.count()
        self._vocab_size = getattr(runner, "vocab_size", None)  # the model's: a prediction's ids past it are dropped
        self.spec = make_speculative_rows(args, drafter or make_drafter(args), output.tokenizer,  # None: no speculation
                                          self._vocab_size)  # (until a prediction: add_request)

    # ---- requests in and out -----------------------------------------------------------
    def next_arrival(self) -> int:
        return next(self._arrival)

    def add_request(self, req: Req) -> None:
        need = len(req.prompt_ids) + req.params.max_new_tokens
        if need > self.allocator.size:
            req.finish_reason = finish_reason_abort(
                f"request needs {need} KV slots (prompt {len(req.prompt_ids)} + max_new_tokens "
                f"{req.params.max_new_tokens}) but the KV pool holds {self.allocator.size}; "
                "raise --max-total-tokens or lower max_new_tokens")
            self._finish(req)
            return
        if req.params.prediction and self.spec is None:
            # predicted outputs need no flag: the first request that carries one starts a PREDICTION-only rule
            self.spec = prediction_rows(self.args, self.output.tokenizer, self._vocab_size)
            logger.info("a request carries a prediction: drafting predictions (%d tokens a step)", self.spec.k)
        self.stats.prompt_tokens_total += len(req.prompt_ids)
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted by the client", internal: bool = False) -> bool:
        """End a queued or running request (`internal`: our failure, HTTP 500); False when no such request."""
        for req in self.waiting + self.running:
            if req.rid == rid and not req.finished:
                req.finish_reason = (finish_reason_internal_error if internal else finish_reason_abort)(message)
                self._finish(req)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def flush_cache(self) -> bool:
        """Drop every cached prefix; only when idle (a running request holds locks)."""
        if self.has_work:
            return False
        if isinstance(self.cache, HiRadixCache):
            self.cache.drop_all()
        else:
            self.cache.evict(self.cache.total_size)
        assert self.cache.total_size == 0
        if self.spec is not None:
            self.spec.flush()
        return True

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> None:
        batch = self._schedule()
        self._update_gauges()
        if not batch.rows:
            return
        clock = step_clock() if self.spec is not None and self.spec.observed is not None else None
        t0 = clock() if clock is not None else 0.0
        try:
            results = self.runner.run(batch)
        except Exception as exc:
            if getattr(exc, "fatal", False):
                free_new_slots(self.allocator, batch.rows)
                raise
            results = isolate_failure(self.runner, self.allocator, self.stats, batch, exc)
        except BaseException:
            free_new_slots(self.allocator, batch.rows)
            raise
        assert len(results) == len(batch.rows)
        if clock is not None:  # the adaptive rule's verify cost learns from batch-1 steps (speculative_rows.py)
            self.spec.observe_step(batch.rows, clock() - t0)
        self.stats.num_steps += 1
        for row, res in zip(batch.rows, results):
            self._process(row, res)
        self._update_gauges()

    def _schedule(self) -> ScheduledBatch:
        rows: list[BatchRow] = []
        # 1. decode: one slot per running request with one pending token.
        decoding = [r for r in self.running if r.pending_len == 1]
        drafts = self.spec.drafts(decoding) if self.spec is not None else {}
        if drafts and not self._ensure_free(len(decoding) + sum(len(d) for d in drafts.values())):
            drafts = {}  # NOTE: the pool is short: decode without drafts rather than preempt for them
        while decoding and not self._ensure_free(len(decoding)):
            victim = preemption_victim(self.running)
            assert victim is not None
            self._preempt(victim)
            if victim in decoding:
                decoding.remove(victim)
        for req in sorted(decoding, key=lambda r: r.arrival):
            draft = drafts.get(req)
            slots = self.allocator.alloc(1 + (len(draft) if draft is not None else 0))
            assert slots is not None
            rows.append(self._row(req, 1, slots, draft))
        # 2. prefill: in-flight chunks, then waiting requests (fair_share.py's order). A realtime request
        # at the head of that order goes first, and a step that admits one carries no lower-class prefill
        # (in-flight chunks included: they resume next step), so its TTFT is one short step. Lower classes
        # still get their turns: realtime is at the head only while its weighted share is not used up.
        budget = _PrefillBudget(self.args.max_prefill_tokens if self.args.chunk_size is None
                                else min(self.args.max_prefill_tokens, self.args.chunk_size))
        within = lambda q: order_waiting(q, self.args.schedule_policy, self.cache)  # noqa: E731
        order = self.fair.order(self.waiting, within)
        head = 0
        if not self.args.disable_latency_preemption:
            while head < len(order) and order[head].priority_class == "realtime":
                head += 1
        in_flight = [r for r in self.running if r.pending_len > 1]  # before admission adds new ones
        n_rows = len(rows)
        blocked = self._admit(order[:head], rows, budget)
        realtime_step = len(rows) > n_rows
        for req in in_flight:
            if req not in self.running:  # preempted by the realtime admission above
                continue
            if realtime_step and req.priority_class != "realtime":
                continue
            rematch_prefix(self.cache, req)
            row = self._extend_row(req, budget.tokens, budget.first)
            if row is None:
                break
            budget.take(row.extend_len)
            rows.append(row)
            self.fair.charge(req.priority_class, row.extend_len)
        if not realtime_step and not blocked:
            self._admit(order[head:], rows, budget)
        return ScheduledBatch(rows)

    def _admit(self, order: list[Req], rows: list[BatchRow], budget: "_PrefillBudget") -> bool:
        """Admit (or swap back in) waiting requests in `order` while they fit; True when one was blocked."""
        blocked = False  # an earlier request did not fit: only realtime ones (which may preempt) go on
        for req in order:
            if budget.tokens <= 0:
                break
            if not self._lora_fits(req):
                continue  # its adapter would exceed --max-loras-per-batch: it waits, others may go
            realtime = req.priority_class == "realtime"
            if blocked and not realtime:
                continue
            if len(self.running) >= self.args.max_running_requests and not self._preempt_for(req, rows):
                blocked = True
                continue
            if req.host_slots:
                if swap_in(self.swap, self.allocator, self._ensure_free, req):
                    self.waiting.remove(req)
                    req.status = ReqStatus.RUNNING
                    self.running.append(req)
                else:
                    blocked = True
                continue
            match_prefix(self.cache, self._ensure_free, req)
            n = self._piece_len(req, budget.tokens, budget.first)
            while n > 0 and not self._ensure_free(n) and self._preempt_for(req, rows):
                pass
            row = self._extend_row(req, budget.tokens, budget.first)
            if row is None:
                release_prefix(self.cache, req)
                blocked = True
                continue
            self.waiting.remove(req)
            req.status = ReqStatus.RUNNING
            self.running.append(req)
            if not req.admitted_once:
                req.admitted_once = True
                req.num_cached_tokens = req.cached_len
                self.stats.cached_tokens_total += req.cached_len
            budget.take(row.extend_len)
            rows.append(row)
            self.fair.charge(req.priority_class, row.extend_len)
        return blocked

    def _piece_len(self, req: Req, budget: int, first: bool) -> int:
        """Tokens of `req`'s next prefill piece within `budget` (0: it waits for another step)."""
        n = req.pending_len
        if self.args.chunk_size is not None:
            return min(n, budget)
        return 0 if n > budget and not first else n  # unchunked: a long prompt waits for a step of its own

    def _lora_fits(self, req: Req) -> bool:
        """Admitting `req` keeps the distinct adapters of the running set (a superset of any batch's)
        within --max-loras-per-batch."""
        if req.lora is None:
            return True
        active = {r.lora.uid for r in self.running if r.lora is not None}
        return req.lora.uid in active or len(active) < self.args.max_loras_per_batch

    def _extend_row(self, req: Req, budget: int, first: bool) -> Optional[BatchRow]:
        """The next prefill piece of `req` within `budget`, with its slots allocated, or None."""
        n = self._piece_len(req, budget, first)
        if n <= 0 or not self._ensure_free(n):
            return None
        draft: Optional[Draft] = None
        if self.spec is not None and n == req.pending_len and req.kv_len >= len(req.prompt_ids):
            # jump-forward text pending (forced tokens, free): drafts ride in the same row
            draft = self.spec.drafts([req]).get(req)
            if draft is not None and not self._ensure_free(n + len(draft)):
                draft = None
        slots = self.allocator.alloc(n + (len(draft) if draft is not None else 0))
        assert slots is not None
        return self._row(req, n, slots, draft)

    def _row(self, req: Req, n: int, slots: list[int], draft: Optional[Draft] = None) -> BatchRow:
        start = req.kv_len
        fill = req.fill_ids
        sample = start + n == len(fill) and len(req.output_ids) < req.params.max_new_tokens
        targets: list[tuple[int, int]] = []
        if req.return_logprob and req.logprob_start_len >= 0:
            # logits at position p score prompt token p + 1 (token 0 has no logprob)
            lo = max(start, req.logprob_start_len - 1, 0)
            hi = min(start + n, len(req.prompt_ids) - 1)
            targets = [(p - start, req.prompt_ids[p + 1]) for p in range(lo, hi)]
        draft = draft or Draft([])
        assert not len(draft) or sample, "drafts follow the row's last pending token"
        return BatchRow(req, fill[start:start + n] + draft.token_ids, start, slots, sample, targets, len(draft),
                        draft.parents)

    def _ensure_free(self, n: int) -> bool:
        short = n - self.allocator.available
        if short > 0:
            self.cache.evict(short)
        return self.allocator.available >= n

    # ---- preemption (preemption.py) ---------------------------------------------------------
    def _preempt(self, req: Req) -> None:
        """Free a running request's device KV and requeue it: swapped to the host tier when there is
        room (it resumes by a copy back), else handed to the tree (it recomputes what was evicted)."""
        # NOTE: the tree's part is copied too: unlocked, it may be evicted before the request resumes
        if req.kv_len > 0 and self.swap.can_hold(req.kv_len):
            req.host_slots = self.swap.swap_out(req.slots)
            if req.last_node is not None:
                self.cache.unlock(req.last_node)
            self.allocator.free(req.slots[req.cached_len:])
            req.last_node, req.slots, req.cached_len = None, [], 0
            self.stats.num_preemptions_swap += 1
        else:
            cache_request(self.cache, self.allocator, req, keep_locked=False)
            self.stats.num_preemptions_recompute += 1
        self.running.remove(req)
        req.status = ReqStatus.WAITING
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.append(req)

    def _preempt_for(self, req: Req, rows: list[BatchRow]) -> bool:
        """A realtime request preempts the lowest-class newest running request under its class (dropping
        that request's row from this step's batch); False when `req` may not or nobody is left."""
        if req.priority_class != "realtime" or self.args.disable_latency_preemption:
            return False
        victim = preemption_victim(self.running, below_rank=CLASS_RANK["realtime"])
        if victim is None:
            return False
        for row in [r for r in rows if r.req is victim]:
            self.allocator.free(row.new_slots)  # NOTE: not yet in victim.slots: the step has not run
            rows.remove(row)
        victim.num_latency_preemptions += 1
        self._preempt(victim)
        return True

    # ---- results ---------------------------------------------------------------------------
    def _process(self, row: BatchRow, res: RowResult) -> None:
        req = row.req
        req.slots.extend(row.new_slots)
        if row.start < len(req.prompt_ids):
            self.stats.prefill_tokens_computed += row.extend_len
        if row.logprob_targets:
            tops = res.prompt_top_logprobs or [None] * len(row.logprob_targets)
            if req.logprob_start_len == 0 and not req.input_logprobs:
                req.input_logprobs.append((None, req.prompt_ids[0]))
                req.input_top_logprobs.append(None)
            for (_, tid), lp, top in zip(row.logprob_targets, res.prompt_logprobs, tops):
                req.input_logprobs.append((lp, tid))
                req.input_top_logprobs.append(top)
        if req.finished:  # aborted while the step ran
            return
        if res.error is not None:
            req.finish_reason = (finish_reason_internal_error if res.internal else finish_reason_abort)(res.error)
            if row.draft_len:
                self.spec.trim_verify_row(self.allocator, row, res, 0)
        elif res.token_id is not None:
            appended = self._append_sampled(req, res)
            if row.draft_len:
                self.spec.trim_verify_row(self.allocator, row, res, appended)
            if req.grammar is not None:
                apply_guard(self, req)  # a semantic guard may roll the request back (or abort it)
            if req.grammar is not None and not req.finished and not self.args.disable_jump_forward:
                self._jump_forward(req)
        elif req.pending_len == 0 and req.params.max_new_tokens == 0:
            req.finish_reason = finish_reason_length(0)
        if req.finished:
            self._finish(req)
            return
        if row.extend_len - row.draft_len > 1 and not self.cache.disabled:
            # a prefill chunk: share what is computed now, not when the request finishes
            cache_request(self.cache, self.allocator, req, keep_locked=True)
        if req.stream and res.token_id is not None:
            self.on_output(req)

    def _append_sampled(self, req: Req, res: RowResult) -> int:
        """Append the row's sampled token(s) in order until the request finishes; -> how many."""
        tokens = [(res.token_id, res.logprob, res.top_logprobs)]
        tokens += zip(res.next_token_ids, res.next_logprobs, res.next_top_logprobs)
        appended = 0
        for tid, lp, top in tokens:
            if req.grammar is not None and not req.grammar.accept(tid):
                req.finish_reason = finish_reason_abort(req.grammar.error or f"the constraint rejected token {tid}")
                break
            self._append(req, tid, lp, top)
            appended += 1
            if req.finished or getattr(req.grammar, "pending", None) is not None:
                break  # NOTE: a guard violation: the rest of a verified draft is not kept (apply_guard rolls back)
        return appended

    def _append(self, req: Req, token_id: int, logprob: Optional[float],
                top: Optional[list[tuple[int, float]]]) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if req.return_logprob:
            req.output_logprobs.append(logprob if logprob is not None else 0.0)
            req.output_top_logprobs.append(top or [])
        self.stats.generation_tokens_total += 1
        self.output.on_token(req, token_id)

    def _jump_forward(self, req: Req) -> None:
        """Append the tokens the grammar forces (JSON keys, punctuation, consts) without sampling
        them; the next step computes their KV in one extend instead of one decode step each."""
        forced = req.grammar.jump_forward_tokens()
        room = req.params.max_new_tokens - len(req.output_ids)
        for tid in forced[: max(room, 0)]:
            if not req.grammar.accept(tid):  # the grammar guaranteed these; stop quietly if not
                break
            self.stats.jump_forward_tokens += 1
            # NOTE: a forced token was not sampled; its logprob is reported as 0 (probability 1 under the constraint).
            self._append(req, tid, 0.0, [])
            if apply_guard(self, req) or req.finished:
                break

    def _finish(self, req: Req) -> None:
        if req.status == ReqStatus.RUNNING:
            self.running.remove(req)
            cache_request(self.cache, self.allocator, req, keep_locked=False)
        elif req.status == ReqStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
            self.swap.release(req.host_slots)
            req.host_slots = []
        req.status = ReqStatus.FINISHED
        if req.lora is not None:
            req.lora.refs -= 1  # taken by the engine when it queued the request (AdapterPool.acquire)
        self.on_output(req)

    # ---- accounting --------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        s = self.stats
        s.num_running_reqs = len(self.running)
        s.num_queue_reqs = len(self.waiting)
        s.token_usage = 1.0 - self.allocator.available / self.allocator.size
        s.cache_hit_rate = s.cached_tokens_total / s.prompt_tokens_total if s.prompt_tokens_total else 0.0
        if self.spec is not None:
            self.spec.report(s)
        s.swap_out_bytes, s.swap_in_bytes = self.swap.bytes_out, self.swap.bytes_in
        s.host_kv_used_tokens, s.host_kv_total_tokens = self.swap.used, self.swap.size
        if isinstance(self.cache, HiRadixCache):
            s.host_cache_tokens = self.cache.host_size
            s.host_cache_promoted_tokens = self.cache.promoted_tokens
            s.host_cache_demoted_tokens = self.cache.demoted_tokens
        queues = {c: 0 for c in CLASS_RANK}
        for r in self.waiting:
            queues[r.priority_class] += 1
        s.per_class_queues = queues
        s.per_class_prefill_tokens = dict(self.fair.admitted_tokens)

    def check_integrity(self) -> None:
        """free + cached + held by requests == pool size, and the tree's own invariants."""
        self.cache.check_integrity()
        owned = sum(r.kv_len - r.cached_len for r in self.running)
        total = self.allocator.available + self.cache.total_size + owned
        assert total == self.allocator.size, (
            f"KV leak: free {self.allocator.available} + cached {self.cache.total_size} + "
            f"in-use {owned} = {total} != {self.allocator.size}")
        self.swap.check_integrity(sum(len(r.host_slots) for r in self.waiting))
        for r in self.waiting:
            assert not (r.host_slots and r.slots), f"{r.rid}: swapped yet holding device slots"
        if not self.has_work:
            assert self.cache.protected_size == 0, "idle, yet cache nodes are still locked"
