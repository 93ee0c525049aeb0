"""RouterArgs: the flags of `sgl router` (and of the front that `sgl serve --dp-size N` starts)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from sgl.runtime.router.policy import POLICIES


@dataclass(frozen=True)
class RouterArgs:
    worker_urls: list[str] = field(default_factory=list)
    prefill: str | None = None  # prefill/decode disaggregation: the prefill server (runtime/router/pd.py)
    decode: str | None = None  # ... and its decode server
    policy: str = "cache_aware"
    balance_threshold: int = 8  # in-flight requests above the least loaded worker's before cache_aware balances
    cache_threshold: float = 0.5  # share of the prompt a match must cover to count as a cache hit
    max_tree_chars: int = 1 << 20  # per worker, in the approximate tree (LRU pruned beyond)
    health_check_interval: float = 2.0  # seconds between /health probes of each worker
    health_failures: int = 2  # consecutive failed probes before a worker is taken out
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None  # the workers' key for the router's own calls (eviction polls); clients' pass through
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.balance_threshold < 0:
            raise ValueError(f"balance_threshold must be >= 0, got {self.balance_threshold}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.health_check_interval <= 0:
            raise ValueError(f"health_check_interval must be positive, got {self.health_check_interval}")
        if self.health_failures < 1:
            raise ValueError(f"health_failures must be >= 1, got {self.health_failures}")
        if (self.prefill is None) != (self.decode is None):
            raise ValueError("prefill and decode go together: --prefill URL --decode URL")
        if self.prefill is not None and self.worker_urls:
            raise ValueError("--worker-urls or --prefill/--decode, not both")
        for url in [*self.worker_urls, *(u for u in (self.prefill, self.decode) if u is not None)]:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"worker_urls: {url!r} is not an http(s):// URL")

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--worker-urls", nargs="+", default=[], help="the servers to route to")
        p.add_argument("--prefill", default=None, help="PD disaggregation: the --disaggregation-mode prefill server")
        p.add_argument("--decode", default=None, help="PD disaggregation: the --disaggregation-mode decode server")
        p.add_argument("--policy", choices=POLICIES, default="cache_aware")
        p.add_argument("--balance-threshold", type=int, default=8)
        p.add_argument("--cache-threshold", type=float, default=0.5)
        p.add_argument("--max-tree-chars", type=int, default=1 << 20)
        p.add_argument("--health-check-interval", type=float, default=2.0)
        p.add_argument("--health-failures", type=int, default=2)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=30000)
        p.add_argument("--log-level", default="info")
        p.add_argument("--api-key", default=None, help="the workers' --api-key, for the router's own eviction polls "
                                                       "(clients' Authorization headers pass through)")

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "RouterArgs":
        if not ns.worker_urls and ns.prefill is None:
            raise ValueError("give --worker-urls, or --prefill URL --decode URL")
        return cls(worker_urls=[u.rstrip("/") for u in ns.worker_urls], policy=ns.policy,
                   prefill=ns.prefill.rstrip("/") if ns.prefill else None,
                   decode=ns.decode.rstrip("/") if ns.decode else None,
                   balance_threshold=ns.balance_threshold, cache_threshold=ns.cache_threshold,
                   max_tree_chars=ns.max_tree_chars, health_check_interval=ns.health_check_interval,
                   health_failures=ns.health_failures, host=ns.host, port=ns.port, log_level=ns.log_level,
                   api_key=ns.api_key)
