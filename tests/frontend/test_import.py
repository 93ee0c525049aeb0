"""`import sgl` loads no torch (nor httpx/openai); heavy pieces resolve lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_import_sgl_is_light():
    code = ("import sys, sgl\n"
            "heavy = sorted(m for m in ('torch', 'httpx', 'openai', 'numpy', 'transformers') if m in sys.modules)\n"
            "print(heavy)\n"
            "assert callable(sgl.gen) and 'Engine' in dir(sgl)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lazy_names_resolve():
    import sgl
    from sgl.backends.runtime_endpoint import RuntimeEndpoint

    assert sgl.RuntimeEndpoint is RuntimeEndpoint
    assert sgl.OpenAI.__name__ == "OpenAI"
    with pytest.raises(AttributeError):
        sgl.NoSuchThing
