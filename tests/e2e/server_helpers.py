"""Start a real `python -m sgl.launch_server` on 127.0.0.1 (a free port) for the server tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import httpx

from sgl.runtime.processes import free_port, stop_processes, wait_healthy

# Small pool: the tests' requests are short, and CI memory is shared.
BASE_ARGS = ["--model-path", "default", "--num-threads", "1", "--max-total-tokens", "16384",
             "--enable-metrics", "--log-level", "info"]
STARTUP_TIMEOUT_S = 240.0


@dataclass
class ServerHandle:
    url: str
    proc: subprocess.Popen
    log_path: str
    api_key: Optional[str] = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stats(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/server_info", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()["internal_states"][0]

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until no request is running or queued; returns the last stats."""
        end = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.get("num_running_reqs", 0) == 0 and s.get("num_queue_reqs", 0) == 0:
                return s
            if time.monotonic() > end:
                raise AssertionError(f"server did not become idle: {s}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        stop_processes([self.proc], timeout)
        return self.proc.returncode


LAUNCH_MODULE = [sys.executable, "-m", "sgl.launch_server"]


def start_server(*extra: str, api_key: Optional[str] = None, command: Optional[list[str]] = None) -> ServerHandle:
    """Start a server with BASE_ARGS + `extra` (by default `python -m sgl.launch_server`)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="sgl-server-", suffix=".log", delete=False)
    cmd = [*(command or LAUNCH_MODULE), *BASE_ARGS, "--port", str(port), *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    handle = ServerHandle(f"http://127.0.0.1:{port}", proc, log.name, api_key)
    try:
        wait_healthy(handle.url, proc, timeout=STARTUP_TIMEOUT_S)
    except RuntimeError as e:
        handle.stop()
        raise RuntimeError(f"{e}:\n{handle.log()[-4000:]}") from None
    return handle


@contextmanager
def running_server(*extra: str, api_key: Optional[str] = None,
                   command: Optional[list[str]] = None) -> Iterator[ServerHandle]:
    handle = start_server(*extra, api_key=api_key, command=command)
    try:
        yield handle
    finally:
        code = handle.stop()
        if code != 0:
            print(f"server exit code {code}; log tail:\n{handle.log()[-4000:]}", file=sys.stderr)


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """Parse `data: ...` SSE lines; yields decoded JSON objects and the string '[DONE]'."""
    for line in lines:
        if not line.startswith("data:"):
            assert line.strip() == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data:"):].strip()
        yield payload if payload == "[DONE]" else json.loads(payload)
