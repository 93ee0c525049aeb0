"""Frontend unit tests run the DSL against `FakeBackend` (a deterministic stand-in for the runtime)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_backend import FakeBackend  # noqa: E402

import sgl  # noqa: E402
from sgl.backends import base as _base  # noqa: E402


@pytest.fixture
def fake() -> FakeBackend:
    """A fresh fake backend, installed as the default backend for the test."""
    fb = FakeBackend()
    old = _base.get_default_backend()
    sgl.set_default_backend(fb)
    yield fb
    _base._default_backend = old
