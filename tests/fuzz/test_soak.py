"""A 60-second soak in CI (benchmarks/soak.py; `make soak` runs 30 minutes): mixed traffic (streams,
disconnects, aborts, constrained, chat, bad requests) on the tier's server, then: no 5xx, no client
error, fds and threads flat, RSS slope under a generous bound after the warm-up, KV integrity."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.soak import run, verdict
from tests.e2e.server_helpers import ServerHandle

pytestmark = pytest.mark.timeout(400)

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))


def test_soak(server: ServerHandle) -> None:
    res = run(server.url, server.proc.pid, SECONDS, warmup=20.0, interval=5.0, clients=3)
    summary = {k: v for k, v in res.items() if k not in ("samples", "integrity", "errors")}
    print("\n" + json.dumps(summary))
    # NOTE: 60 s is too short to tell a slow leak from allocator noise and from the first touch of KV-pool
    # pages as pool use grows (a clean-clone CI run measured 168 MB/min here); this bound catches a runaway
    # leak only, and the 30-minute run (`make soak`) reports the steady-state slope (issue 11 tracks it).
    assert not verdict(res, max_slope=600.0), verdict(res, 600.0)
    assert res["requests"] > 10
