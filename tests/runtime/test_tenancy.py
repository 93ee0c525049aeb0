"""Tenancy logic without a model: the key file, prices, the SQLite ledger (midnight reset on a fake
clock, persistence across reopen), the request-rate window and the admission rule."""

from __future__ import annotations

import datetime as dt
import json
import pathlib

import pytest

from sgl.runtime.config import ServerArgs
from sgl.runtime.tenancy import ApiKey, OverLimit, Prices, RateLimiter, Tenancy, Usage, UsageLedger, parse_api_keys
from sgl.runtime.tenancy import load_api_keys

PARIS = dt.timezone(dt.timedelta(hours=1))  # Europe/Paris in December (CET, no DST)


class FakeClock:
    def __init__(self, when: dt.datetime) -> None:
        self.t = when.timestamp()

    def __call__(self) -> float:
        return self.t


def test_parse_keys_defaults_and_fields() -> None:
    keys = parse_api_keys({"sk-a": {"name": "alice", "class": "realtime", "daily_token_budget": 100,
                                    "requests_per_minute": 5, "admin": False},
                           "sk-o": {"name": "ops", "admin": True}})
    assert keys["sk-a"] == ApiKey("alice", "realtime", 100, 5, False)
    assert keys["sk-o"] == ApiKey("ops", "standard", None, None, True)


@pytest.mark.parametrize("data,message", [
    ({}, "non-empty JSON object"),
    ({"sk": {"class": "batch"}}, '"name" is required'),
    ({"sk": {"name": "a", "class": "vip"}}, '"class" must be one of'),
    ({"sk": {"name": "a", "daily_token_budget": -1}}, '"daily_token_budget" must be a non-negative integer'),
    ({"sk": {"name": "a", "requests_per_minute": 1.5}}, '"requests_per_minute" must be'),
    ({"sk": {"name": "a", "admin": "yes"}}, '"admin" must be true or false'),
    ({"sk": {"name": "a", "budget": 1}}, "unknown field(s) ['budget']"),
    ({"sk1": {"name": "a"}, "sk2": {"name": "a"}}, "used twice"),
    ({"sk": "alice"}, "must be an object"),
])
def test_parse_keys_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_api_keys(data)
    assert message in str(info.value)
    assert "sk" not in str(info.value)  # the secret key itself never reaches an error or a log


def test_load_keys_file_errors(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_api_keys(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing.json"))


def test_prices() -> None:
    p = Prices(input=0.5, output=1.5, cached=0.05)
    # 200 uncached * 0.5 + 1000 cached * 0.05 + 100 completion * 1.5, per 1K
    assert p.cost(prompt_tokens=1200, cached_tokens=1000, completion_tokens=100) == pytest.approx(0.3)
    assert Prices(input=1.0).cost(1000, 500, 0) == pytest.approx(1.0)  # cached price defaults to input
    assert not Prices().enabled and Prices(output=0.1).enabled


def test_ledger_resets_at_local_midnight() -> None:
    clock = FakeClock(dt.datetime(2026, 12, 2, 23, 59, 0, tzinfo=PARIS))
    ledger = UsageLedger(":memory:", "Europe/Paris", clock=clock)
    ledger.record("alice", Usage(prompt_tokens=10, cached_tokens=2, completion_tokens=5), cost=0.25)
    ledger.record("alice", Usage(prompt_tokens=1, completion_tokens=1))
    today = ledger.today("alice")
    assert (today.prompt_tokens, today.cached_tokens, today.completion_tokens, today.requests) == (11, 2, 6, 2)
    assert today.total_tokens == 17 and today.cost == pytest.approx(0.25)
    assert ledger.seconds_until_reset() == pytest.approx(60.0)
    clock.t += 59.0  # 23:59:59 local: still the same day
    assert ledger.today("alice").total_tokens == 17
    clock.t += 1.0  # 00:00:00 local (23:00 UTC: the reset follows the configured zone, not UTC)
    assert ledger.day() == "2026-12-03"
    assert ledger.today("alice") == Usage()
    assert ledger.seconds_until_reset() == pytest.approx(86400.0)


def test_ledger_midnight_across_dst_change() -> None:
    # 2026-03-29: Paris skips 02:00 -> 03:00, so that local day has 23 hours
    clock = FakeClock(dt.datetime(2026, 3, 29, 0, 0, 0, tzinfo=PARIS))
    ledger = UsageLedger(":memory:", "Europe/Paris", clock=clock)
    assert ledger.seconds_until_reset() == pytest.approx(23 * 3600.0)


def test_ledger_persists_across_reopen(tmp_path: pathlib.Path) -> None:
    db = str(tmp_path / "usage.db")
    clock = FakeClock(dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc))
    first = UsageLedger(db, "UTC", clock=clock)
    first.record("alice", Usage(prompt_tokens=30, cached_tokens=10, completion_tokens=7), cost=0.5)
    first.record("bob", Usage(prompt_tokens=3, completion_tokens=1))
    first.close()
    again = UsageLedger(db, "UTC", clock=clock)
    assert again.today("alice") == Usage(30, 10, 7, 1, 0.5)
    assert set(again.all_today()) == {"alice", "bob"}
    again.record("alice", Usage(prompt_tokens=1))
    assert again.today("alice").prompt_tokens == 31
    clock.t += 86400
    assert again.today("alice") == Usage()  # yesterday's row stays in the file, today's is new


def test_rate_limiter_sliding_window() -> None:
    clock = FakeClock(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    rl = RateLimiter(clock=clock)
    assert [rl.try_acquire("a", 2) for _ in range(2)] == [0.0, 0.0]
    assert rl.try_acquire("a", 2) == pytest.approx(60.0)  # refused; not counted
    assert rl.try_acquire("b", 2) == 0.0  # per tenant
    clock.t += 30
    assert rl.try_acquire("a", 2) == pytest.approx(30.0)
    clock.t += 30
    assert rl.try_acquire("a", 2) == 0.0  # the first two left the window
    assert rl.try_acquire("z", 0) == pytest.approx(60.0)


def test_admission_budget_then_rate() -> None:
    clock = FakeClock(dt.datetime(2026, 12, 2, 22, 0, tzinfo=dt.timezone.utc))
    keys = parse_api_keys({"sk-a": {"name": "alice", "daily_token_budget": 20},
                           "sk-r": {"name": "rita", "requests_per_minute": 1}})
    tenancy = Tenancy(keys, UsageLedger(":memory:", "UTC", clock=clock), Prices(input=1.0, output=2.0),
                      rate=RateLimiter(clock=clock))
    alice, rita = tenancy.authenticate("sk-a"), tenancy.authenticate("sk-r")
    assert alice is not None and alice.name == "alice" and tenancy.authenticate("sk-x") is None
    assert tenancy.authenticate(None) is None
    tenancy.admit(alice)
    tenancy.record(alice, Usage(prompt_tokens=15, completion_tokens=10))  # crosses the budget: 25 >= 20
    with pytest.raises(OverLimit) as info:
        tenancy.admit(alice)
    assert info.value.status == 429 and info.value.reason == "tokens"
    assert info.value.retry_after_header == str(2 * 3600)  # until midnight UTC
    assert "25 of 20 tokens" in str(info.value)
    tenancy.admit(rita)
    with pytest.raises(OverLimit) as info:
        tenancy.admit(rita)
    assert info.value.reason == "rate" and info.value.retry_after_header == "60"
    assert tenancy.rejections == {"tokens": 1, "rate": 1}
    report = tenancy.usage_report("alice")
    assert report["keys"][0]["total_tokens"] == 25 and report["keys"][0]["remaining_tokens"] == 0
    assert report["keys"][0]["cost"] == pytest.approx((15 * 1.0 + 10 * 2.0) / 1000)
    assert {r["name"] for r in tenancy.usage_report()["keys"]} == {"alice", "rita"}
    clock.t += 2 * 3600  # midnight: the budget is back
    tenancy.admit(alice)


def test_single_api_key_and_open_server() -> None:
    single = Tenancy(api_key="sk-one")
    assert single.authenticate("sk-one").admin and single.authenticate("sk-two") is None
    assert Tenancy().authenticate(None).name == "anonymous"


def test_server_args_validate_tenancy_flags(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="usage_timezone"):
        ServerArgs(usage_timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="price_output"):
        ServerArgs(price_output=-1.0)
    with pytest.raises(ValueError, match="max_queue_depth"):
        ServerArgs(max_queue_depth=0)
    with pytest.raises(ValueError, match="api_keys: no such file"):
        ServerArgs(api_keys=str(tmp_path / "nope.json"))
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk": {"name": "a"}}))
    args = ServerArgs(api_keys=str(path), usage_timezone="Europe/Paris", price_input=0.1)
    assert Tenancy.from_args(args).keys["sk"].name == "a"
