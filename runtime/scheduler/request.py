"""The scheduler's vocabulary: a request in flight and the plain-data batch handed to the runner.

Lengths of a request (all in tokens; `fill_ids = prompt_ids + output_ids`):

    | cached_len | owned by the request | not yet computed      |
    0         cached_len             kv_len            len(fill_ids)
    [ tree's slots, locked ][ slots only this req holds ][ next step's extend ]

`slots[:kv_len]` holds the KV slot of every computed token. The first `cached_len` belong to the
radix tree (locked through `last_node`); the rest belong to the request alone. Decode is just an
extend of length 1: after a token is sampled, `kv_len == len(fill_ids) - 1`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from sgl.runtime.cache.radix_cache import TreeNode
from sgl.runtime.protocol import GenerateRequest, SamplingParams


class ReqStatus(Enum):
    WAITING = "waiting"  # also a swapped-out request (host_slots non-empty): resumes by a copy
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecLane:
    """What the adaptive rule knows of one drafter on one request (runtime/scheduler/speculative_rows.py)."""

    accept_prob: Optional[float] = None  # estimated per-draft acceptance; None: the drafter's prior
    shadow: Any = None  # (len(output_ids) when drafted, Draft): a draft not verified, scored on the tokens that follow
    idle_steps: int = 0  # decode steps the rule kept this drafter from drafting, since its last draft
    called_at: int = 0  # len(fill_ids) when the drafter last ran for it (what a catch-up starts from)
    drafted: int = 0  # tokens this drafter proposed in the request's verify rows
    accepted: int = 0  # of them, those the target accepted


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: fcfs and "preempt the newest"
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    priority: int = 0
    priority_class: str = "standard"  # realtime | standard | batch (fair_share.py)
    grammar: Any = None  # a grammar matcher (opaque to the scheduler), or None
    lora: Any = None  # the LoRA adapter (sgl.runtime.lora.adapter.LoraAdapter) the request runs under, or None
    created_time: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    cached_len: int = 0
    last_node: Optional[TreeNode] = None
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: Optional[dict[str, Any]] = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    admitted_once: bool = False
    num_preemptions: int = 0
    num_latency_preemptions: int = 0  # of which for a realtime arrival (preemption.MAX_LATENCY_PREEMPTIONS)
    host_slots: list[int] = field(default_factory=list)  # swapped out: slots[:kv_len] live here in the host tier
    first_token_time: Optional[float] = None
    # logprobs, filled as computed: (logprob | None, token_id, top list)
    input_logprobs: list[tuple[Optional[float], int]] = field(default_factory=list)
    input_top_logprobs: list[Optional[list[tuple[int, float]]]] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # output processing state (owned by OutputProcessor)
    text: str = ""
    decoded_upto: int = 0  # output tokens whose text is final in `text`
    stop_checked_upto: int = 0
    sampling_state: Any = None  # the runner's per-request sampling state
    # speculative decoding (runtime/speculative/)
    draft_state: dict[str, Any] = field(default_factory=dict)  # drafter name -> its per-request state (the n-gram index)
    spec_verify_ct: int = 0  # verify steps this request ran with a draft
    spec_accepted_tokens: int = 0  # drafts the target accepted over those steps
    spec_lanes: dict[str, SpecLane] = field(default_factory=dict)  # drafter name -> the adaptive rule's state
    spec_drafted_by: Optional[str] = None  # the drafter of the request's draft in this step's verify row

    def __post_init__(self) -> None:
        assert len(self.prompt_ids) > 0, "a request needs at least one prompt token"

    @property
    def cache_namespace(self) -> Optional[int]:
        """The radix tree namespace of this request's KV: None for the base model, else the adapter's uid."""
        return None if self.lora is None else self.lora.uid

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def kv_len(self) -> int:
        return len(self.slots)

    @property
    def pending_len(self) -> int:
        """Tokens whose KV is still to compute (1 while decoding)."""
        return self.seq_len - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_prefix_len(self) -> int:
        """How much of fill_ids may come from the cache: at least one token must be computed (its
        logits give the next token), and prompt logprobs need the logits from logprob_start_len - 1."""
        limit = self.seq_len - 1
        if self.return_logprob and self.logprob_start_len >= 0 and self.kv_len < len(self.prompt_ids):
            limit = min(limit, max(self.logprob_start_len - 1, 0))
        return limit

    @classmethod
    def from_request(cls, r: GenerateRequest, prompt_ids: list[int], arrival: int) -> "Req":
        return cls(
            rid=r.rid,
            prompt_ids=prompt_ids,
            params=r.sampling_params,
            arrival=arrival,
            return_logprob=r.return_logprob,
            logprob_start_len=r.logprob_start_len,
            top_logprobs_num=r.top_logprobs_num,
            return_text_in_logprobs=r.return_text_in_logprobs,
            stream=r.stream,
            priority=r.priority,
            priority_class=r.priority_class or "standard",
        )


@dataclass
class BatchRow:
    """One request's share of a step: compute `input_ids` at positions [start, start+len)."""

    req: Req
    input_ids: list[int]
    start: int  # position of input_ids[0] (== req.kv_len before the step)
    new_slots: list[int]  # where the new tokens' KV goes
    sample: bool  # the last new token's logits produce the next token
    logprob_targets: list[tuple[int, int]]  # (offset in input_ids, target token) for prompt logprobs
    # A verify row (speculative decoding): input_ids = [pending token] + draft_len drafted tokens, one
    # new slot each; the row samples at every one of its 1 + draft_len positions, in order, while the
    # sampled token equals the next draft (runtime/executor/verify.py).
    draft_len: int = 0
    # A tree of drafts (None: a chain): draft node j's parent node, or -1 for the last pending token.
    # Node j's KV slot is new_slots[extend_len - draft_len + j]; it sits at position
    # start + extend_len - draft_len - 1 + depth(j) and attends to the prefix and its ancestors only.
    draft_parents: Optional[list[int]] = None

    @property
    def extend_len(self) -> int:
        return len(self.input_ids)

    @property
    def draft(self) -> list[int]:
        return self.input_ids[len(self.input_ids) - self.draft_len:] if self.draft_len else []


@dataclass
class ScheduledBatch:
    rows: list[BatchRow]

    @property
    def num_tokens(self) -> int:
        return sum(r.extend_len for r in self.rows)


@dataclass
class RowResult:
    token_id: Optional[int]  # None when the row did not sample
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    prompt_logprobs: list[float] = field(default_factory=list)  # one per logprob_target
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    error: Optional[str] = None  # the row could not sample (e.g. grammar allows no token)
    internal: bool = False  # `error` is a bug or kernel failure (HTTP 500), not the request's fault
    # A verify row's further tokens after token_id (accepted drafts, then the target's own token), in order.
    next_token_ids: list[int] = field(default_factory=list)
    next_logprobs: list[Optional[float]] = field(default_factory=list)
    next_top_logprobs: list[Optional[list[tuple[int, float]]]] = field(default_factory=list)
    draft_path: list[int] = field(default_factory=list)  # a verify row's accepted draft nodes, in order
    # The final-normed hidden states of the row's input tokens that stay in the sequence, [m, hidden]
    # float tensor (a copy): every input of a prefill chunk; for a verify row the pending token(s) and
    # the accepted drafts (m = extend_len - draft_len + len(draft_path)), so the last one is the
    # state that predicted the row's last produced token. Only when the runner's `capture_hidden` is
    # on (MEDUSA and EAGLE drafters read it); None otherwise or when the row failed.
    hidden_states: Any = None
