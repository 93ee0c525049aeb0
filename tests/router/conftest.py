"""One `sgl serve --dp-size 2` (2 replicas of the default model, 1 thread each, behind the router) for
the tier, extra `sgl router` processes over the same replicas, and the KV integrity check of every
replica after each test that used them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from sgl.runtime.processes import stop_processes, wait_healthy
from tests.e2e.server_helpers import ServerHandle, free_port, start_server

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class DP:
    handle: ServerHandle  # the router front of `sgl serve --dp-size 2`
    workers: list[str]  # replica URLs
    def replica_pid(self, url: str) -> int:
        """The pid of the replica serving `url` (a child of the dp process; its argv names the port)."""
        port = url.rsplit(":", 1)[1]
        for proc in pathlib.Path("/proc").iterdir():
            try:
                if (proc / "cmdline").read_bytes().find(f"-port{port}-".encode()) >= 0:
                    return int(proc.name)
            except (OSError, ValueError):
                continue
        raise LookupError(f"no replica process for {url}")


@pytest.fixture(scope="session")
def dp() -> Iterator[DP]:
    handle = start_server("--dp-size", "2", "--num-threads", "2")
    d = DP(handle, [])
    try:
        info = httpx.get(handle.url + "/server_info", timeout=30).json()
        d.workers = [w["url"] for w in info["router"]["workers"]]
        yield d
    finally:
        handle.stop()


def check_workers(urls: list[str]) -> None:
    for url in urls:
        end = time.monotonic() + 60
        while True:
            st = httpx.get(url + "/server_info", timeout=30).json()["internal_states"][0]
            if st.get("num_running_reqs", 0) == 0 and st.get("num_queue_reqs", 0) == 0:
                break
            assert time.monotonic() < end, f"{url} did not become idle: {st}"
            time.sleep(0.1)
        r = httpx.get(url + "/check_integrity", timeout=60)
        assert r.status_code == 200 and r.json()["ok"] is True, f"KV integrity check failed on {url}: {r.text}"


@pytest.fixture(autouse=True)
def kv_integrity_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "dp" in request.fixturenames:
        check_workers(request.getfixturevalue("dp").workers)


@dataclass
class RouterProc:
    url: str
    proc: subprocess.Popen

    def info(self) -> dict:
        return httpx.get(self.url + "/server_info", timeout=30).json()["router"]

    def counts(self) -> dict[str, int]:
        return {w["url"]: w["requests"] for w in self.info()["workers"]}


def start_router(workers: list[str], *extra: str) -> RouterProc:
    port = free_port()
    cmd = [sys.executable, "-m", "sgl.cli", "router", "--worker-urls", *workers, "--port", str(port),
           "--health-check-interval", "0.3", "--health-failures", "1", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=30, interval=0.1)
    except RuntimeError:
        proc.kill()
        raise
    return RouterProc(url, proc)


def stop_router(r: RouterProc) -> None:
    stop_processes([r.proc], timeout=20)