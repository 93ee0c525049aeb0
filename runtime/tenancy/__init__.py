"""Tenancy: API keys from a file, daily token budgets and request rates per key, usage and cost.

    tenancy = Tenancy.from_args(server_args)        # --api-keys, --usage-db, --usage-timezone, --price-*
    tenant = tenancy.authenticate("sk-alice")       # None: unknown key
    tenancy.admit(tenant)                           # raises OverLimit(retry_after_s, reason) -> HTTP 429
    tenancy.admit_prompt(tenant, prompt_tokens=812)  # per-key prompt caps: PromptOverLimit (400) / OverLimit
    tenancy.record(tenant, Usage(prompt_tokens=12, cached_tokens=0, completion_tokens=8))

No torch here, and nothing of the HTTP layer: runtime/server/tenancy_routes.py wires it into the app.
"""

from sgl.runtime.tenancy.keys import PRIORITY_CLASSES, ApiKey, load_api_keys, parse_api_keys
from sgl.runtime.tenancy.ledger import Usage, UsageLedger
from sgl.runtime.tenancy.pricing import Prices
from sgl.runtime.tenancy.rate import RateLimiter
from sgl.runtime.tenancy.tenancy import OverLimit, PromptOverLimit, Tenancy

__all__ = ["PRIORITY_CLASSES", "ApiKey", "load_api_keys", "parse_api_keys", "Usage", "UsageLedger", "Prices",
           "RateLimiter", "OverLimit", "PromptOverLimit", "Tenancy"]
