"""The scheduler's counters (totals since start) and gauges (refreshed every step): what /server_info,
/v1/stats, /metrics and the engine's `get_stats()` report. No tensors here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepStats:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefill_tokens_computed: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_isolated_failures: int = 0  # requests failed alone after their batch raised (crash safety)
    jump_forward_tokens: int = 0
    # speculative decoding (all 0 when off); spec_accept_rate = accepted / proposed drafts
    spec_verify_ct: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accept_rate: float = 0.0
    spec_accept_length: float = 0.0
    # per drafter (several with --speculative-ngram-first): {name: {verify_ct, draft_tokens, accepted_tokens, accept_rate}}
    spec_per_drafter: dict[str, dict[str, float]] = field(default_factory=dict)
    num_preemptions_swap: int = 0
    num_preemptions_recompute: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    host_kv_used_tokens: int = 0
    host_kv_total_tokens: int = 0
    host_cache_tokens: int = 0  # --hierarchical-cache: prefix tokens held in the host tier
    host_cache_promoted_tokens: int = 0  # copied back instead of prefilled
    host_cache_demoted_tokens: int = 0
    per_class_queues: dict[str, int] = field(default_factory=dict)  # waiting requests per priority class
    per_class_prefill_tokens: dict[str, int] = field(default_factory=dict)  # prefill tokens admitted per class
    num_backtracks: int = 0  # semantic-guard rollbacks (runtime/scheduler/rollback.py)
    backtracked_tokens: int = 0  # output tokens thrown away by them
