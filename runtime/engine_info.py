"""What the engine reports: its stats (for /metrics, /server_info), the KV pool split, the radix tree's
eviction log (for a data-parallel router), and its model and server info.

A mixin of `sgl.runtime.engine.Engine`, which provides `scheduler`, `tokenizer`, `model_config`,
`model_path`, `context_length`, `server_args`, `lora_pool` and `_call` (run a function on the scheduler
thread: reads that must not race a step go through it).
"""

from __future__ import annotations

from typing import Any, Callable

from sgl.runtime.protocol import PRIORITY_CLASSES


class EngineInfoMixin:
    scheduler: Any
    tokenizer: Any
    model_config: Any
    model_path: str
    context_length: int
    server_args: Any
    lora_pool: Any
    _call: Callable[..., Any]

    def get_stats(self) -> dict[str, Any]:
        s = self.scheduler.stats
        stats = dict(vars(s), max_total_tokens=self.scheduler.allocator.size)
        # NOTE: the step gauges go stale once the engine idles (no step runs to refresh them); the counts
        # are read live (len() of a list is atomic under the GIL) so /metrics and /server_info drop to 0.
        stats["num_running_reqs"] = len(self.scheduler.running)
        waiting = list(self.scheduler.waiting)
        stats["num_queue_reqs"] = len(waiting)
        stats["per_class_queues"] = {c: sum(r.priority_class == c for r in waiting) for c in PRIORITY_CLASSES}
        stats["lora_adapters"] = self.lora_pool.names()
        stats["lora_loads"], stats["lora_evictions"] = self.lora_pool.num_loads, self.lora_pool.num_evictions
        return stats

    def get_cache_stats(self) -> dict[str, int]:
        """KV pool split (free + cached + in use == total) and the radix tree's size (nodes, tokens).

        NOTE: read on the scheduler thread (the tree changes under a step); costs one tree walk.
        """
        def read() -> dict[str, int]:
            sched = self.scheduler
            # in use = held by requests or locked tree nodes; cached = evictable tree nodes
            free, cached = sched.allocator.available, sched.cache.evictable_size
            return {"kv_total_tokens": sched.allocator.size, "kv_free_tokens": free,
                    "kv_cached_tokens": cached, "kv_in_use_tokens": sched.allocator.size - free - cached,
                    "radix_num_nodes": len(sched.cache._nodes()) - len(sched.cache.roots), "radix_num_tokens": sched.cache.total_size}
        return self._call(read, timeout=10)

    def cache_evictions(self, cursor: int) -> dict[str, Any]:
        """The radix tree's evictions since `cursor` as text (for a data-parallel router's approximate tree):
        {"cursor": next cursor, "lost": evictions that fell out of the log, "events": [{"text", "kept"}]},
        where the tree no longer holds anything under `text[:kept + 1]` (chars of the decoded path)."""
        events, lost, nxt = self.scheduler.cache.evictions_since(cursor)  # any thread: no wait for a step
        out = []
        for e in events:
            kept = len(self.tokenizer.decode(e.path[:e.kept]))
            out.append({"text": self.tokenizer.decode(e.path), "kept": kept})
        return {"cursor": nxt, "lost": lost, "events": out}

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.server_args.tokenizer_path or self.model_path,
            "served_model_name": self.server_args.served_model_name or self.server_args.model_path,
            "is_generation": True,
            "context_length": self.context_length,
            "vocab_size": self.model_config.vocab_size,
            "chat_template": self.tokenizer.chat_template,
        }

    def get_server_info(self) -> dict[str, Any]:
        info = {k: v for k, v in vars(self.server_args).items() if k != "api_key"}
        info.update(self.get_stats())
        kv = getattr(self.scheduler.runner, "kv", None)  # NOTE: first-touched KV pages (reads smaps: not in get_stats)
        info["kv_pool_resident_bytes"] = kv.resident_bytes() if hasattr(kv, "resident_bytes") else 0
        if kv is not None:  # what --kv-cache-dtype auto resolved to (kv_cache_dtype above is the flag)
            info["kv_cache_dtype_resolved"] = str(kv.dtype).removeprefix("torch.")
        spec = getattr(self.scheduler, "spec", None)
        if spec is not None:  # decode steps a verify row of 1 + j tokens costs: [[j, cost], ...] (verify_cost.py)
            info["spec_verify_cost"] = [list(p) for p in spec.cost.points]
            info["spec_verify_cost_source"] = spec.cost.source
            if spec.observed is not None:  # the start-up curve, and the factor the steps run since put on its costs
                info["spec_verify_cost_measured"] = [list(p) for p in spec.observed.measured.points]
                info["spec_verify_cost_scale"] = spec.observed.scale
                info["spec_observed_steps"] = {"decode": len(spec.observed.decode),  # (the newest OBSERVED_WINDOW)
                                               "verify": len(spec.observed.verify)}
        info["version"] = "0.1.0"
        return info
