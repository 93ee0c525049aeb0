"""Per-key prompt-token caps of the --api-keys file: parsing, the sliding token window, admission."""

from __future__ import annotations

import math

import pytest

from sgl.runtime.tenancy import OverLimit, PromptOverLimit, Tenancy, parse_api_keys
from sgl.runtime.tenancy.rate import RateLimiter, TokenRateLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_fields_parse_and_are_validated() -> None:
    keys = parse_api_keys({"sk-a": {"name": "a", "max_prompt_tokens": 100, "prompt_tokens_per_minute": 500}})
    assert (keys["sk-a"].max_prompt_tokens, keys["sk-a"].prompt_tokens_per_minute) == (100, 500)
    for bad in (-1, "10", 1.5, True):
        with pytest.raises(ValueError, match="max_prompt_tokens"):
            parse_api_keys({"sk-a": {"name": "a", "max_prompt_tokens": bad}})


def test_errors_never_echo_the_key() -> None:
    with pytest.raises(ValueError) as info:
        parse_api_keys({"sk-secret-key": {"name": "a", "prompt_tokens_per_minute": "x"}})
    assert "sk-secret-key" not in str(info.value) and "prompt_tokens_per_minute" in str(info.value)


def test_token_window_slides() -> None:
    clock = Clock()
    tl = TokenRateLimiter(clock)
    assert tl.try_acquire("a", 30, limit=50) == 0.0
    clock.t += 20
    assert tl.try_acquire("a", 15, limit=50) == 0.0
    assert tl.try_acquire("a", 10, limit=50) == pytest.approx(40.0)  # when the first 30 expire
    assert tl.try_acquire("b", 50, limit=50) == 0.0  # per tenant
    assert tl.try_acquire("a", 51, limit=50) == math.inf
    clock.t += 40.0
    assert tl.try_acquire("a", 35, limit=50) == 0.0  # 15 + 35 in the window
    assert tl.try_acquire("a", 1, limit=50) > 0


def test_admit_prompt() -> None:
    clock = Clock()
    keys = parse_api_keys({"sk-a": {"name": "a", "max_prompt_tokens": 40, "prompt_tokens_per_minute": 50},
                           "sk-b": {"name": "b"}})
    t = Tenancy(keys, rate=RateLimiter(clock))
    a, b = keys["sk-a"], keys["sk-b"]
    with pytest.raises(PromptOverLimit, match="max_prompt_tokens"):
        t.admit_prompt(a, 41)
    t.admit_prompt(a, 30)
    with pytest.raises(OverLimit) as info:
        t.admit_prompt(a, 30)
    assert info.value.status == 429 and info.value.retry_after_s == pytest.approx(60.0)
    clock.t += 60.5
    t.admit_prompt(a, 30)
    t.admit_prompt(b, 10**6)  # no caps
    assert t.rejections["prompt_tokens"] == 2
