"""Requests per minute per tenant: a sliding 60 s window of admission times (in memory only).

    >>> rl = RateLimiter(clock=lambda: 100.0)
    >>> rl.try_acquire("alice", limit=1), rl.try_acquire("alice", limit=1)
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
