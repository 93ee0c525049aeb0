"""The fuzz tier: one real server (the default model on 127.0.0.1) shared by the HTTP fuzz and limit
tests, with small limits so expensive requests are cheap to build. Every test that uses `server`
ends with the KV integrity check (tests/e2e/conftest.py)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.e2e.conftest import kv_integrity_after_each_test  # noqa: F401 (autouse fixture)
from tests.e2e.server_helpers import ServerHandle, running_server

# The limits the tier's server runs with (flags of runtime/config.py, checked by runtime/limits.py).
LIMITS = {"--max-request-new-tokens": 2048, "--max-prompt-tokens": 256, "--max-batch-size": 32,
          "--max-stop-strings": 8, "--max-stop-string-chars": 64, "--max-logit-bias": 64,
          "--max-grammar-bytes": 4096, "--grammar-max-size": 5000}
CONTEXT = 1024


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    flags = [x for kv in LIMITS.items() for x in (kv[0], str(kv[1]))]
    with running_server("--context-length", str(CONTEXT), "--max-running-requests", "8", *flags) as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]
