"""The `sgl` console entry: flags, `sgl generate`. (`sgl serve` runs the server of test_server_load.py.)"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from sgl.runtime.config import ServerArgs

pytestmark = pytest.mark.timeout(300)

SGL = str(pathlib.Path(sys.executable).parent / "sgl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def test_help_lists_every_server_flag() -> None:
    out = subprocess.run([SGL, "serve", "--help"], capture_output=True, text=True, check=True, env=ENV).stdout
    for f in dataclasses.fields(ServerArgs):
        assert "--" + f.name.replace("_", "-") in out, f.name
    top = subprocess.run([SGL, "--help"], capture_output=True, text=True, check=True, env=ENV).stdout
    assert "serve" in top and "generate" in top
    bad = subprocess.run([SGL, "serve", "--schedule-policy", "random"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "schedule-policy" in bad.stderr


def test_sgl_generate_prints_the_text() -> None:
    cmd = [SGL, "generate", "The capital of France is", "--max-new-tokens", "6", "--temperature", "0",
           "--num-threads", "1", "--max-total-tokens", "2048"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris" in done.stdout
    bad = subprocess.run([*cmd[:2], "x", "--top-p", "5", "--num-threads", "1", "--max-total-tokens", "2048"],
                         capture_output=True, text=True, timeout=240, env=ENV)
    assert bad.returncode == 2 and "top_p" in bad.stderr
