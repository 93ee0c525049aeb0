"""The trace (IR) of every example program is stable: it matches the snapshot in snapshots/.

Regenerate after an intended change: SGL_UPDATE_SNAPSHOTS=1 pytest tests/frontend/test_example_traces.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest

import sgl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SNAPSHOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots")
EXAMPLES = ["quickstart", "json_extraction_job", "fork_join_agent"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # examples only define programs at import; main() is not run
    return mod


def programs():
    for ex in EXAMPLES:
        mod = load(ex)
        for attr, value in sorted(vars(mod).items()):
            if isinstance(value, sgl.SglFunction):
                yield ex, attr, value


@pytest.mark.parametrize("example,name,fn", list(programs()), ids=lambda x: x if isinstance(x, str) else "")
def test_trace_matches_snapshot(example, name, fn):
    text = str(fn.trace()) + "\n"
    path = os.path.join(SNAPSHOTS, f"{example}.{name}.txt")
    if os.environ.get("SGL_UPDATE_SNAPSHOTS"):
        os.makedirs(SNAPSHOTS, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()
    assert str(fn.trace()) + "\n" == text  # tracing is deterministic
