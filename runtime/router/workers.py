"""The router's view of its workers: health, in-flight load, request counts, and the health probe loop.

A worker is taken out after `health_failures` failed /health probes in a row, or at once when a
proxied request to it fails at the transport level; `down` is then set, which fails that worker's
in-flight requests with a 502 (never a hang). A probe that succeeds again puts it back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import httpx

logger = logging.getLogger("sgl.router")


@dataclass
class Worker:
    url: str
    healthy: bool = True
    inflight: int = 0
    requests: int = 0  # routed to it, ever
    errors: int = 0  # requests failed because it went away
    failures: int = 0  # consecutive failed probes
    down: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerPool:
    def __init__(self, urls: list[str], on_down: Callable[[str], None], failures: int = 2) -> None:
        self.workers = {u: Worker(u) for u in urls}
        self._on_down = on_down
        self._failures = failures

    def healthy(self) -> list[str]:
        return [u for u, w in self.workers.items() if w.healthy]

    def loads(self) -> dict[str, int]:
        return {u: w.inflight for u, w in self.workers.items()}

    def mark_down(self, url: str, reason: str) -> None:
        w = self.workers[url]
        if w.healthy:
            logger.warning("worker %s taken out: %s", url, reason)
            w.healthy = False
            w.down.set()
            self._on_down(url)

    def mark_up(self, url: str) -> None:
        w = self.workers[url]
        w.failures = 0
        if not w.healthy:
            logger.info("worker %s is healthy again", url)
            w.down = asyncio.Event()
            w.healthy = True

    async def probe_once(self, client: httpx.AsyncClient, timeout: float) -> None:
        async def one(url: str) -> None:
            try:
                ok = (await client.get(url + "/health", timeout=timeout)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                self.mark_up(url)
            else:
                w = self.workers[url]
                w.failures += 1
                if w.failures >= self._failures:
                    self.mark_down(url, f"{w.failures} failed /health probes")
        await asyncio.gather(*(one(u) for u in self.workers))
