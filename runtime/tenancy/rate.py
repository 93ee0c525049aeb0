"""Requests (and prompt tokens) per minute per tenant: sliding 60 s windows of admissions (in memory).

    >>> rl = RateLimiter(clock=lambda: 100.0)
    >>> rl.try_acquire("alice", limit=1), rl.try_acquire("alice", limit=1)
    (0.0, 60.0)
    >>> tl = TokenRateLimiter(clock=lambda: 100.0)
    >>> tl.try_acquire("alice", 300, limit=500), tl.try_acquire("alice", 300, limit=500)
    (0.0, 60.0)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

WINDOW_S = 60.0


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._times: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def try_acquire(self, name: str, limit: int) -> float:
        """0.0 and the request counts, or the seconds until the window has room (nothing counted)."""
        now = self.clock()
        with self._lock:
            times = self._times.setdefault(name, deque())
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
            if len(times) >= limit:
                # invariant: len(times) <= limit, so the oldest admission frees the first place
                return WINDOW_S if not times else max(times[0] + WINDOW_S - now, 0.001)
            times.append(now)
            return 0.0


class TokenRateLimiter:
    """A sliding 60 s window of (time, tokens) per tenant: admits `amount` while the window's sum plus it
    stays within `limit`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._sums: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, name: str, amount: int, limit: int) -> float:
        """0.0 and `amount` counts, or the seconds until enough of the window expires (nothing counted).
        An `amount` over `limit` alone never fits: the caller refuses it (math.inf)."""
        if amount > limit:
            return float("inf")
        now = self.clock()
        with self._lock:
            events = self._events.setdefault(name, deque())
            total = self._sums.get(name, 0)
            while events and events[0][0] <= now - WINDOW_S:
                total -= events.popleft()[1]
            if total + amount > limit:
                # invariant: the window's sum is total; expire the oldest until the amount fits
                freed, wait = total, WINDOW_S
                for t, n in events:
                    freed -= n
                    if freed + amount <= limit:
                        wait = max(t + WINDOW_S - now, 0.001)
                        break
                self._sums[name] = total
                return wait
            events.append((now, amount))
            self._sums[name] = total + amount
            return 0.0
