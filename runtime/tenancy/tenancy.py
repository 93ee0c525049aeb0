"""The tenancy policy: who a bearer token is, whether it may run a request now, what it used.

    tenancy = Tenancy(keys, ledger, prices, api_key="sk-single")
    tenant = tenancy.authenticate("sk-alice")        # ApiKey, or None for an unknown token
    tenancy.admit(tenant)                            # OverLimit(429, retry_after_s) over budget or rate
    tenancy.record(tenant, Usage(...))               # after the request ran (aborted ones too)

Budget rule: a request is admitted while the tenant's tokens today are under its budget, so the
request that crosses the budget finishes and the next one is refused until local midnight.
"""

from __future__ import annotations

import hmac
import math
import threading
from collections import Counter
from typing import Any, Optional

from sgl.runtime.tenancy.keys import ApiKey, load_api_keys
from sgl.runtime.tenancy.ledger import Usage, UsageLedger
from sgl.runtime.tenancy.pricing import Prices
from sgl.runtime.tenancy.rate import RateLimiter, TokenRateLimiter

# The tenant of the single `--api-key`, and of everyone on a server without keys.
SINGLE_KEY_TENANT = ApiKey(name="api-key", admin=True)
ANONYMOUS = ApiKey(name="anonymous", admin=True)  # NOTE: an open server has no secrets to guard


class OverLimit(Exception):
    """A request refused before it ran: HTTP `status` with `Retry-After: retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float, reason: str, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after_s, self.reason, self.status = retry_after_s, reason, status

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class PromptOverLimit(ValueError):
    """A request whose prompt alone is over its key's cap: it can never run (HTTP 400)."""


class Tenancy:
    def __init__(self, keys: Optional[dict[str, ApiKey]] = None, ledger: Optional[UsageLedger] = None,
                 prices: Prices = Prices(), api_key: Optional[str] = None,
                 rate: Optional[RateLimiter] = None) -> None:
        self.keys = dict(keys or {})
        self.ledger = ledger or UsageLedger()
        self.prices = prices
        self.api_key = api_key
        self.rate = rate or RateLimiter()
        self.prompt_rate = TokenRateLimiter(self.rate.clock)
        self.rejections: Counter[str] = Counter()  # reason -> count (the budget rejection metric)
        self._lock = threading.Lock()
        self._by_name = {k.name: k for k in self.keys.values()}

    @classmethod
    def from_args(cls, args: Any) -> "Tenancy":
        """From ServerArgs: api_keys, api_key, usage_db, usage_timezone, price_input/output/cached."""
        keys = load_api_keys(args.api_keys) if getattr(args, "api_keys", None) else {}
        ledger = UsageLedger(getattr(args, "usage_db", None) or ":memory:", getattr(args, "usage_timezone", "UTC"))
        prices = Prices(input=getattr(args, "price_input", 0.0) or 0.0,
                        output=getattr(args, "price_output", 0.0) or 0.0,
                        cached=getattr(args, "price_cached", None))
        return cls(keys, ledger, prices, api_key=getattr(args, "api_key", None))

    @property
    def uses_key_file(self) -> bool:
        return bool(self.keys)

    @property
    def auth_required(self) -> bool:
        return bool(self.keys) or bool(self.api_key)

    def authenticate(self, token: Optional[str]) -> Optional[ApiKey]:
        """The tenant of `token` (the bearer value), or None when auth is on and it matches no key."""
        if not self.auth_required:
            return ANONYMOUS
        if token is None:
            return None
        found: Optional[ApiKey] = None
        # NOTE: compare against every key in constant time each, so timing does not reveal a prefix.
        for key, tenant in self.keys.items():
            if hmac.compare_digest(token.encode(), key.encode()):
                found = tenant
        if self.api_key and hmac.compare_digest(token.encode(), self.api_key.encode()):
            found = found or SINGLE_KEY_TENANT
        return found

    def tenant_named(self, name: str) -> Optional[ApiKey]:
        return self._by_name.get(name)

    def admit(self, tenant: ApiKey) -> None:
        """Raise OverLimit when `tenant` is over its daily token budget or its request rate."""
        if tenant.daily_token_budget is not None:
            used = self.ledger.today(tenant.name).total_tokens
            if used >= tenant.daily_token_budget:
                self._reject("tokens")
                raise OverLimit(f"daily token budget exceeded for key {tenant.name!r}: {used} of "
                                f"{tenant.daily_token_budget} tokens used today; it resets at midnight "
                                f"({self.ledger.tz.key})", self.ledger.seconds_until_reset(), "tokens")
        if tenant.requests_per_minute is not None:
            wait = self.rate.try_acquire(tenant.name, tenant.requests_per_minute)
            if wait > 0:
                self._reject("rate")
                raise OverLimit(f"rate limit exceeded for key {tenant.name!r}: "
                                f"{tenant.requests_per_minute} requests per minute", wait, "rate")

    def admit_prompt(self, tenant: ApiKey, prompt_tokens: int) -> None:
        """Once the request is tokenized: PromptOverLimit (400) over the key's `max_prompt_tokens`;
        OverLimit (429) over its `prompt_tokens_per_minute` (then the tokens do not count)."""
        if tenant.max_prompt_tokens is not None and prompt_tokens > tenant.max_prompt_tokens:
            self._reject("prompt_tokens")
            raise PromptOverLimit(f"the request has {prompt_tokens} prompt tokens (prompts x n); key {tenant.name!r} "
                                  f"may send at most {tenant.max_prompt_tokens} per request (max_prompt_tokens)")
        if tenant.prompt_tokens_per_minute is not None:
            wait = self.prompt_rate.try_acquire(tenant.name, prompt_tokens, tenant.prompt_tokens_per_minute)
            if wait == math.inf:
                self._reject("prompt_tokens")
                raise PromptOverLimit(f"the request has {prompt_tokens} prompt tokens (prompts x n), more than key "
                                      f"{tenant.name!r} may send in a minute ({tenant.prompt_tokens_per_minute}, "
                                      "prompt_tokens_per_minute)")
            if wait > 0:
                self._reject("prompt_tokens")
                raise OverLimit(f"prompt token rate exceeded for key {tenant.name!r}: "
                                f"{tenant.prompt_tokens_per_minute} prompt tokens per minute", wait, "prompt_tokens")

    def _reject(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1

    def reject_queue_full(self, depth: int, limit: int) -> OverLimit:
        self._reject("queue_full")
        return OverLimit(f"the server's queue is full ({depth} requests waiting, --max-queue-depth {limit}); "
                         "retry shortly", 1.0, "queue_full", status=503)

    def cost(self, usage: Usage) -> float:
        return self.prices.cost(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)

    def record(self, tenant: ApiKey, usage: Usage) -> None:
        self.ledger.record(tenant.name, usage, cost=self.cost(usage))

    def usage_report(self, name: Optional[str] = None) -> dict[str, Any]:
        """Today's usage of one tenant (by name) or of every tenant with a key or usage today."""
        today = self.ledger.all_today()
        names = [name] if name is not None else sorted(set(self._by_name) | set(today))
        rows = []
        for n in names:
            u, tenant = today.get(n, Usage()), self._by_name.get(n)
            budget = tenant.daily_token_budget if tenant else None
            rows.append({"name": n, "class": tenant.priority_class if tenant else None,
                         "requests": u.requests, "prompt_tokens": u.prompt_tokens, "cached_tokens": u.cached_tokens,
                         "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
                         "cost": round(u.cost, 10), "daily_token_budget": budget,
                         "remaining_tokens": None if budget is None else max(budget - u.total_tokens, 0),
                         "requests_per_minute": tenant.requests_per_minute if tenant else None})
        return {"object": "usage", "date": self.ledger.day(), "timezone": self.ledger.tz.key,
                "resets_in_s": round(self.ledger.seconds_until_reset(), 3), "keys": rows}

    def close(self) -> None:
        self.ledger.close()
