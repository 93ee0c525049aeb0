"""Child server processes (data-parallel replicas, tensor-parallel ranks, the servers that tests and
benchmarks start): a free port, waiting until /health answers, stopping with SIGTERM then SIGKILL.
No torch here: the router and the HTTP layer import it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterable, Optional

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may still take it before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0, interval: float = 0.25) -> None:
    """Poll `url`/health until it answers 200. Raises RuntimeError when `proc` exits first or after
    `timeout` seconds (the caller decides whether to stop it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server process exited with {proc.returncode} during startup")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f}s")


def stop_processes(procs: Iterable[subprocess.Popen], timeout: float = 60.0) -> None:
    """SIGTERM every live process (graceful shutdown), then wait; SIGKILL what is still alive after
    `timeout` seconds."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def start_server(args: list[str], num_threads: Optional[int] = 1, stdout: Any = None,
                 module: str = "sgl.launch_server") -> tuple[subprocess.Popen, str]:
    """Start `python -m <module> --port <free port> *args` on 127.0.0.1 with `num_threads` OpenMP
    threads (None: the caller's environment), without waiting; -> (process, base URL)."""
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # NOTE: PASSIVE whenever torch may use >1 thread
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
        args = [*args, "--num-threads", str(num_threads)]
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    return proc, f"http://127.0.0.1:{port}"


def start_healthy_server(args: list[str], num_threads: Optional[int] = 1,
                         timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`start_server`, then wait until it answers /health; a server that does not is killed and the
    error raised."""
    proc, url = start_server(args, num_threads)
    try:
        wait_healthy(url, proc, timeout)
    except RuntimeError:
        stop_processes([proc], timeout=10)
        raise
    return proc, url
