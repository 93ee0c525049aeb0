"""The `--api-keys FILE` format: one JSON object mapping each key to its tenant.

    {"sk-alice": {"name": "alice", "class": "realtime", "daily_token_budget": 100000,
                  "requests_per_minute": 60, "max_prompt_tokens": 4096,
                  "prompt_tokens_per_minute": 20000, "admin": false},
     "sk-ops":   {"name": "ops", "admin": true}}

Every field but `name` is optional (no budget, no rate limit, class `standard`, not admin). Names are
unique: usage is accounted per name, so a key can be rotated by giving the new key the old name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from sgl.runtime.protocol import PRIORITY_CLASSES

_FIELDS = {"name", "class", "daily_token_budget", "requests_per_minute", "max_prompt_tokens",
           "prompt_tokens_per_minute", "admin"}


@dataclass(frozen=True)
class ApiKey:
    name: str
    priority_class: str = "standard"  # the default `priority_class` of this key's requests (a body field wins)
    daily_token_budget: Optional[int] = None  # prompt + completion tokens per local day; None = unlimited
    requests_per_minute: Optional[int] = None  # sliding 60 s window; None = unlimited
    admin: bool = False  # may read /v1/usage
    max_prompt_tokens: Optional[int] = None  # prompt tokens of one HTTP request (prompts x n); over = 400
    prompt_tokens_per_minute: Optional[int] = None  # sliding 60 s window of admitted prompt tokens; over = 429


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_api_keys(data: Any, source: str = "api keys") -> dict[str, ApiKey]:
    """The file's JSON object -> {key: ApiKey}; a bad entry raises ValueError naming key and field."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{source}: expected a non-empty JSON object {{\"<key>\": {{\"name\": ...}}, ...}}")
    out: dict[str, ApiKey] = {}
    names: dict[str, str] = {}
    for i, (key, entry) in enumerate(data.items()):
        where = f"{source}: entry {i + 1}"  # NOTE: never echo the key itself into logs or errors
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{where}: the key must be a non-empty string")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: the value must be an object with at least \"name\"")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: \"name\" is required and must be a non-empty string")
        if name in names:
            raise ValueError(f"{where}: name {name!r} is used twice (usage is accounted per name)")
        cls = entry.get("class", "standard")
        if cls not in PRIORITY_CLASSES:
            raise ValueError(f"{where} ({name}): \"class\" must be one of {PRIORITY_CLASSES}, got {cls!r}")
        for field in ("daily_token_budget", "requests_per_minute", "max_prompt_tokens", "prompt_tokens_per_minute"):
            value = entry.get(field)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{where} ({name}): \"{field}\" must be a non-negative integer, got {value!r}")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where} ({name}): \"admin\" must be true or false, got {admin!r}")
        names[name] = key
        out[key] = ApiKey(name=name, priority_class=cls, daily_token_budget=entry.get("daily_token_budget"),
                          requests_per_minute=entry.get("requests_per_minute"),
                          max_prompt_tokens=entry.get("max_prompt_tokens"),
                          prompt_tokens_per_minute=entry.get("prompt_tokens_per_minute"), admin=admin)
    return out


def load_api_keys(path: str) -> dict[str, ApiKey]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"--api-keys {path}: cannot read the file: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--api-keys {path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    return parse_api_keys(data, f"--api-keys {path}")
