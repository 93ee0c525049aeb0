"""Prometheus metrics with SGLang's names (`sgl:` prefix). No torch here.

One process-wide `ServerMetrics` (its own registry, so tests that build several apps in one process
do not collide on the global registry). The HTTP server observes per-request timings; gauges are
refreshed from `Engine.get_stats()` at scrape time; the engine may record grammar compilation and
speculative acceptance through the two module functions at the bottom.

    >>> m = get_metrics()
    >>> m.observe_finished(model="m", prompt_tokens=5, completion_tokens=3, e2e_latency=0.2)
    >>> b"sgl:prompt_tokens_total" in m.render()
    True
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Mapping, Optional

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

# NOTE: the `*_created` timestamp series double the scrape size and no dashboard reads them.
disable_created_metrics()

# NOTE: CPU serving is slower than SGLang's GPU defaults; the buckets reach further out.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
GRAMMAR_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SPEC_BUCKETS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)

# Engine.get_stats() key -> gauge name (without the prefix).
GAUGE_KEYS = ("num_running_reqs", "num_queue_reqs", "token_usage", "cache_hit_rate")
LABELS = ("model_name",)
# Engine.get_stats() cumulative key -> (counter, label value): scrapes add the growth since the last one.
PREEMPTION_KEYS = {"num_preemptions_swap": "swap", "num_preemptions_recompute": "recompute"}
SWAP_BYTES_KEYS = {"swap_out_bytes": "out", "swap_in_bytes": "in"}


class RecentLatencies:
    """The last `window_s` seconds of raw TTFT / ITL samples, for the console's percentiles
    (Prometheus histograms are cumulative since start and bucketed)."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 20_000) -> None:
        self.window_s = window_s
        self.ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (monotonic time, seconds)
        self.itl: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, which: "deque[tuple[float, float]]", seconds: float, count: int = 1) -> None:
        now = time.monotonic()
        which.extend((now, seconds) for _ in range(min(count, 256)))

    def percentiles(self, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, Any]:
        """{"ttft": {"p50": s, ...} or {}, "itl": {...}, "window_s": w}; nearest-rank percentiles."""
        cutoff = time.monotonic() - self.window_s
        out: dict[str, Any] = {"window_s": self.window_s}
        for name, samples in (("ttft", self.ttft), ("itl", self.itl)):
            while samples and samples[0][0] < cutoff:
                samples.popleft()
            values = sorted(v for _, v in list(samples))
            out[name] = {f"p{round(q * 100)}": values[min(int(q * len(values)), len(values) - 1)]
                         for q in qs} if values else {}
            out[name + "_samples"] = len(values)
        return out


class ServerMetrics:
    """All `sgl:*` metrics in one registry."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.gauges = {
            "num_running_reqs": Gauge("sgl:num_running_reqs", "Requests in the running batch", LABELS, registry=r),
            "num_queue_reqs": Gauge("sgl:num_queue_reqs", "Requests waiting in the queue", LABELS, registry=r),
            "token_usage": Gauge("sgl:token_usage", "Fraction of KV token slots in use", LABELS, registry=r),
            "cache_hit_rate": Gauge("sgl:cache_hit_rate", "Prefix-cache hit rate (cached / prompt tokens)",
                                    LABELS, registry=r),
        }
        self.prompt_tokens = Counter("sgl:prompt_tokens", "Prompt tokens processed", LABELS, registry=r)
        self.generation_tokens = Counter("sgl:generation_tokens", "Tokens generated", LABELS, registry=r)
        self.cached_tokens = Counter("sgl:cached_tokens", "Prompt tokens served from the prefix cache",
                                     LABELS, registry=r)
        self.num_requests = Counter("sgl:num_requests", "Requests finished", LABELS, registry=r)
        self.num_aborted_requests = Counter("sgl:num_aborted_requests", "Requests aborted", LABELS, registry=r)
        self.ttft = Histogram("sgl:time_to_first_token_seconds", "Time to first token", LABELS,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("sgl:inter_token_latency_seconds", "Time between output tokens", LABELS,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("sgl:e2e_request_latency_seconds", "Request latency from arrival to finish", LABELS,
                             buckets=E2E_BUCKETS, registry=r)
        self.grammar_compilation_time = Histogram(
            "sgl:grammar_compilation_time_seconds", "Time to compile a grammar (cache misses only)",
            buckets=GRAMMAR_BUCKETS, registry=r)
        self.spec_accept_length = Histogram(
            "sgl:spec_accept_length", "Tokens accepted per speculative verification step",
            buckets=SPEC_BUCKETS, registry=r)
        self.recent = RecentLatencies()
        # Priority classes and the host KV tier (runtime/scheduler/fair_share.py, preemption.py)
        self.class_queue = Gauge("sgl:num_queue_reqs_by_class", "Requests waiting, per priority class",
                                 LABELS + ("priority_class",), registry=r)
        self.class_ttft = Histogram("sgl:time_to_first_token_by_class_seconds", "Time to first token per class",
                                    LABELS + ("priority_class",), buckets=TTFT_BUCKETS, registry=r)
        self.preemptions = Counter("sgl:num_preemptions", "Running requests preempted, by how their KV was freed",
                                   LABELS + ("mode",), registry=r)
        self.swap_bytes = Counter("sgl:swap_bytes", "KV bytes copied between the device pool and the host tier",
                                  LABELS + ("direction",), registry=r)
        self.host_kv_used = Gauge("sgl:host_kv_used_tokens", "Host-tier KV slots holding swapped requests",
                                  LABELS, registry=r)
        self.host_kv_total = Gauge("sgl:host_kv_total_tokens", "Host-tier KV slots (--swap-space)", LABELS,
                                   registry=r)
        self._seen: dict[tuple[str, str], float] = {}  # (model, stats key) -> value at the last scrape
        # several models (runtime/model_pool.py): per served model, from get_stats()["models"]
        self.model_gauges = {
            "loaded": Gauge("sgl:model_loaded", "1 when the model is resident", LABELS, registry=r),
            "loads": Gauge("sgl:model_loads", "Times the model was loaded", LABELS, registry=r),
            "unloads": Gauge("sgl:model_unloads", "Times the model was unloaded (LRU, memory budget)", LABELS, registry=r),
            "load_seconds_total": Gauge("sgl:model_load_seconds_total", "Seconds spent loading the model", LABELS,
                                        registry=r),
            "last_load_seconds": Gauge("sgl:model_last_load_seconds", "Seconds the last load took", LABELS, registry=r),
            "size_bytes": Gauge("sgl:model_size_bytes", "Weights + KV pool bytes (measured once loaded)", LABELS,
                                registry=r),
        }

    def observe_first_token(self, model: str, seconds: float, priority_class: Optional[str] = None) -> None:
        self.ttft.labels(model).observe(seconds)
        if priority_class:
            self.class_ttft.labels(model, priority_class).observe(seconds)
        self.recent.add(self.recent.ttft, seconds)

    def observe_inter_token(self, model: str, seconds: float, num_tokens: int = 1) -> None:
        """`num_tokens` arrived together after `seconds`: each gets an equal share of the gap."""
        if num_tokens <= 0:
            return
        per = seconds / num_tokens
        h = self.itl.labels(model)
        for _ in range(num_tokens):
            h.observe(per)
        self.recent.add(self.recent.itl, per, num_tokens)

    def observe_finished(self, model: str, prompt_tokens: int, completion_tokens: int, e2e_latency: float,
                         cached_tokens: int = 0, aborted: bool = False) -> None:
        self.prompt_tokens.labels(model).inc(max(prompt_tokens, 0))
        self.generation_tokens.labels(model).inc(max(completion_tokens, 0))
        self.cached_tokens.labels(model).inc(max(cached_tokens, 0))
        self.num_requests.labels(model).inc()
        if aborted:
            self.num_aborted_requests.labels(model).inc()
        self.e2e.labels(model).observe(e2e_latency)

    def update_from_stats(self, model: str, stats: Mapping[str, Any]) -> None:
        """Set the gauges from `Engine.get_stats()`; missing keys leave a gauge unchanged."""
        for key in GAUGE_KEYS:
            value = stats.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.gauges[key].labels(model).set(value)
        for cls, depth in (stats.get("per_class_queues") or {}).items():
            self.class_queue.labels(model, cls).set(depth)
        for keys, counter in ((PREEMPTION_KEYS, self.preemptions), (SWAP_BYTES_KEYS, self.swap_bytes)):
            for key, label in keys.items():
                value = stats.get(key)
                if isinstance(value, (int, float)):
                    grew = value - self._seen.get((model, key), 0)
                    self._seen[(model, key)] = value
                    if grew > 0:  # NOTE: the engine's counts only grow; a restart with a new engine resets them
                        counter.labels(model, label).inc(grew)
        if "host_kv_total_tokens" in stats:
            self.host_kv_used.labels(model).set(stats.get("host_kv_used_tokens") or 0)
            self.host_kv_total.labels(model).set(stats["host_kv_total_tokens"])
        for name, entry in (stats.get("models") or {}).items():
            for key, gauge in self.model_gauges.items():
                value = entry.get(key)
                if isinstance(value, (int, float)):  # bools too: loaded -> 1/0
                    gauge.labels(name).set(float(value))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST


_LOCK = threading.Lock()
_METRICS: Optional[ServerMetrics] = None


def get_metrics() -> ServerMetrics:
    """The process-wide metrics (created on first use)."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = ServerMetrics()
        return _METRICS


def record_grammar_compilation(seconds: float) -> None:
    """Engine hook: a grammar was compiled (not served from the cache) in `seconds`."""
    get_metrics().grammar_compilation_time.observe(seconds)


def record_spec_accept_length(num_tokens: float) -> None:
    """Engine hook: one speculative verification step accepted `num_tokens` tokens."""
    get_metrics().spec_accept_length.observe(num_tokens)
