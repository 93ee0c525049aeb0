"""Turning sampled tokens into text: finish checks (EOS, stop ids, stop strings, length) and the
`/generate` response dict. Runs in the scheduler thread; knows the tokenizer, no tensors."""

from __future__ import annotations

import time
from typing import Any, Optional, Protocol

from sgl.runtime.protocol import finish_reason_length, finish_reason_stop
from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.prediction import PredictionDrafter


class TokenizerLike(Protocol):
    eos_token_ids: frozenset[int]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class OutputProcessor:
    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self._token_text_cache: dict[int, str] = {}

    def on_token(self, req: Req, token_id: int) -> None:
        """Record a sampled token and set `req.finish_reason` if the request is done."""
        req.output_ids.append(token_id)
        p = req.params
        if req.grammar is not None and req.grammar.is_finished():
            if getattr(req.grammar, "budget_closed", False):  # completed early because of max_new_tokens
                req.finish_reason = finish_reason_length(p.max_new_tokens)
            else:
                req.finish_reason = finish_reason_stop(token_id if token_id in self.tokenizer.eos_token_ids else None)
        elif token_id in self.tokenizer.eos_token_ids and not p.ignore_eos:
            req.finish_reason = finish_reason_stop(token_id)
        elif p.stop_token_ids and token_id in p.stop_token_ids:
            req.finish_reason = finish_reason_stop(token_id)
        self._update_text(req)
        if req.finish_reason is None and len(req.output_ids) >= p.max_new_tokens:
            req.finish_reason = finish_reason_length(p.max_new_tokens)

    def rewind(self, req: Req) -> None:
        """Recompute the text state after `req.output_ids` was truncated (runtime/scheduler/rollback.py)."""
        req.decoded_upto = min(req.decoded_upto, len(req.output_ids))
        req.stop_checked_upto = 0
        self._update_text(req)

    def _update_text(self, req: Req) -> None:
        p = req.params
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=p.skip_special_tokens)
        # NOTE: a multi-byte character split across tokens decodes to U+FFFD until complete.
        final = text.rstrip("\ufffd") if req.finish_reason is None else text
        if p.stop and req.finish_reason is None:
            longest = max(len(s) for s in p.stop)
            begin = max(0, req.stop_checked_upto - longest + 1)
            hit: Optional[tuple[int, str]] = None
            for s in p.stop:
                i = final.find(s, begin)
                if i != -1 and (hit is None or i < hit[0]):
                    hit = (i, s)
            if hit is not None:
                i, s = hit
                final = final[: i + len(s)] if p.no_stop_trim else final[:i]
                req.finish_reason = finish_reason_stop(s)
            req.stop_checked_upto = len(final)
        req.text = final

    def token_text(self, token_id: int) -> str:
        t = self._token_text_cache.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text_cache[token_id] = t
        return t

    def _triple(self, lp: Optional[float], tid: int, with_text: bool) -> list[Any]:
        return [lp, tid, self.token_text(tid) if with_text else None]

    def build(self, req: Req) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": req.finish_reason,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.num_cached_tokens,
            "e2e_latency": time.monotonic() - req.created_time,
            "priority_class": req.priority_class,
        }
        if req.num_preemptions:
            meta["num_preemptions"] = req.num_preemptions
        if req.grammar is not None and getattr(req.grammar, "budget_closed", False):
            meta["grammar_closed_early"] = True  # the constraint was closed to fit max_new_tokens
        elif req.grammar is not None and req.finish_reason is not None and req.finish_reason.get("type") == "length" \
                and not req.grammar.is_finished():
            # NOTE: no valid completion fitted in max_new_tokens (or budget closing is off): the text does not parse
            meta["grammar_incomplete"] = True
        if req.spec_verify_ct:  # speculative decoding (SGLang's names): verify steps, tokens per verify step
            meta["spec_verify_ct"] = req.spec_verify_ct
            meta["spec_accept_length"] = (req.spec_accepted_tokens + req.spec_verify_ct) / req.spec_verify_ct
        if req.params.prediction:  # OpenAI's names: prediction tokens the output took, and those it did not
            lane = req.spec_lanes.get(PredictionDrafter.name)
            meta["accepted_prediction_tokens"] = 0 if lane is None else lane.accepted
            meta["rejected_prediction_tokens"] = 0 if lane is None else lane.drafted - lane.accepted
        if getattr(req.grammar, "num_backtracks", 0):  # semantic-guard rollbacks (grammars/guards.py)
            meta["grammar_backtracks"] = req.grammar.num_backtracks
            meta["grammar_backtracked_tokens"] = req.grammar.backtracked_tokens
        if req.first_token_time is not None:  # lets a client time TTFT without per-token outputs
            meta["first_token_latency"] = req.first_token_time - req.created_time
        if req.return_logprob:
            t = req.return_text_in_logprobs
            meta["input_token_logprobs"] = [self._triple(lp, tid, t) for lp, tid in req.input_logprobs]
            meta["input_top_logprobs"] = [
                None if top is None else [self._triple(lp, tid, t) for tid, lp in top] for top in req.input_top_logprobs
            ]
            meta["output_token_logprobs"] = [
                self._triple(lp, tid, t) for lp, tid in zip(req.output_logprobs, req.output_ids)
            ]
            meta["output_top_logprobs"] = [
                [self._triple(lp, tid, t) for tid, lp in top] for top in req.output_top_logprobs
            ]
        text, ids = req.text, list(req.output_ids)
        stable = getattr(req.grammar, "stable_tokens", None) if req.finish_reason is None else None
        if stable is not None:
            # NOTE: a streamed chunk never shows output a semantic guard may still roll back
            n = stable()
            if n < len(ids):
                ids = ids[:n]
                text = self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens).rstrip("\ufffd")
                for k in ("output_token_logprobs", "output_top_logprobs"):
                    if k in meta:
                        meta[k] = meta[k][:n]
        return {"text": text, "output_ids": ids, "meta_info": meta}
