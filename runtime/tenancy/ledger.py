"""Usage per tenant per local day, in SQLite (`--usage-db`; in memory when unset).

A day is the calendar date in `--usage-timezone` (zoneinfo name, default UTC), so budgets reset at
local midnight without any timer: a new date is a new row. The table is the source of truth; an
in-memory copy of today's rows makes the per-request budget check a dict lookup.

    >>> ledger = UsageLedger(":memory:", "Europe/Paris")
    >>> ledger.record("alice", Usage(prompt_tokens=10, cached_tokens=4, completion_tokens=5), cost=0.01)
    >>> ledger.today("alice").total_tokens
    15
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,              -- local date, ISO (YYYY-MM-DD) in the ledger's timezone
    name TEXT NOT NULL,             -- the tenant's name from --api-keys
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,     -- includes cached_tokens
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, name)
)
"""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0  # includes cached_tokens
    cached_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        """What a daily token budget counts: prompt (cached or not) + completion."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.cached_tokens + other.cached_tokens,
                     self.completion_tokens + other.completion_tokens, self.requests + other.requests,
                     round(self.cost + other.cost, 10))


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"usage_timezone: unknown time zone {name!r} (an IANA name such as 'UTC' or "
                         "'Europe/Paris')") from None


class UsageLedger:
    """Thread-safe; `clock` returns POSIX seconds (tests pass a fake one to cross midnight)."""

    def __init__(self, path: str = ":memory:", timezone: str = "UTC",
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.tz, self.clock = path, zone(timezone), clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if path != ":memory:":
            # NOTE: WAL + NORMAL: a commit per request without an fsync each; a crash loses at most the
            # last moments of usage, never corrupts the file.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._day: Optional[str] = None
        self._cache: dict[str, Usage] = {}  # name -> today's usage, for self._day only

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), self.tz)

    def day(self) -> str:
        return self.now().date().isoformat()

    def seconds_until_reset(self) -> float:
        """Seconds until the next local midnight (DST-aware: midnight is found by wall-clock date)."""
        now = self.now()
        midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(0), self.tz)
        return max(midnight.timestamp() - now.timestamp(), 0.0)

    def _refresh(self) -> str:
        """Today's date; on a new day, today's rows are (re)loaded from the table. Call under the lock."""
        day = self.day()
        if day != self._day:
            rows = self._db.execute("SELECT name, prompt_tokens, cached_tokens, completion_tokens, requests, cost "
                                    "FROM usage WHERE day = ?", (day,)).fetchall()
            self._cache = {r[0]: Usage(*r[1:]) for r in rows}
            self._day = day
        return day

    def record(self, name: str, usage: Usage, cost: float = 0.0, requests: int = 1) -> None:
        add = Usage(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, requests, cost)
        with self._lock:
            day = self._refresh()
            self._db.execute(
                "INSERT INTO usage (day, name, requests, prompt_tokens, cached_tokens, completion_tokens, cost) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, name) DO UPDATE SET "
                "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "cached_tokens = cached_tokens + excluded.cached_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, cost = cost + excluded.cost",
                (day, name, add.requests, add.prompt_tokens, add.cached_tokens, add.completion_tokens, add.cost))
            self._cache[name] = self._cache.get(name, Usage()) + add

    def today(self, name: str) -> Usage:
        with self._lock:
            self._refresh()
            return self._cache.get(name, Usage())

    def all_today(self) -> dict[str, Usage]:
        with self._lock:
            self._refresh()
            return dict(self._cache)

    def close(self) -> None:
        with self._lock:
            self._db.close()
