"""Multi-process tier: tensor-parallel ranks over gloo on 127.0.0.1. Engine and server tests end with
the KV integrity check (the e2e tier's fixture)."""

from tests.e2e.conftest import kv_integrity_after_each_test  # noqa: F401 - an autouse fixture
