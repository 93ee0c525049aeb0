"""Running the router: `sgl router --worker-urls ...`, and `sgl serve --dp-size N` (N replicas + the router).

    launch_router(RouterArgs(worker_urls=[...], port=30000))     # blocks until SIGTERM/SIGINT
    launch_dp(ServerArgs(model_path="default", dp_size=2))       # spawns 2 replicas, then the router

Each replica is `python -m sgl.runtime.router.replica ARGS.json` on its own free port with
max(1, num_threads // dp_size) threads; the parent waits until all answer /health (a replica that
exits during start-up stops the launch with its log tail), serves the router on --host/--port, and
SIGTERMs the replicas when the router stops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvicorn

from sgl.runtime.processes import free_port, stop_processes, wait_healthy
from sgl.runtime.router.app import create_router_app
from sgl.runtime.router.pd import create_pd_app
from sgl.runtime.router.config import RouterArgs

logger = logging.getLogger("sgl.router")
REPLICA_STARTUP_TIMEOUT_S = 300.0


def launch_router(args: RouterArgs) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request and probe otherwise
    logger.info("sgl router (%s) at http://%s:%d over %s", "prefill/decode" if args.prefill else args.policy,
                args.host, args.port, f"prefill {args.prefill}, decode {args.decode}" if args.prefill
                else ", ".join(args.worker_urls))
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        app = create_pd_app(args) if args.prefill is not None else create_router_app(args)
        uvicorn.run(app, host=args.host, port=args.port, log_config=None,
                    log_level=args.log_level, access_log=False, timeout_graceful_shutdown=10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_dp(server_args: Any) -> None:
    """`sgl serve --dp-size N`: N replica processes behind one router on server_args.host/port."""
    n = server_args.dp_size
    threads = max(1, server_args.resolved_num_threads // n)
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        for i in range(n):
            port = free_port(server_args.host)
            replica = dataclasses.replace(server_args, dp_size=1, port=port, num_threads=threads,
                                          random_seed=server_args.random_seed + i)
            spec = tempfile.NamedTemporaryFile("w", prefix=f"sgl-replica{i}-port{port}-", suffix=".json", delete=False)
            json.dump(dataclasses.asdict(replica), spec)
            spec.close()
            procs.append(subprocess.Popen([sys.executable, "-m", "sgl.runtime.router.replica", spec.name],
                                          env=env, stdin=subprocess.DEVNULL))
            urls.append(f"http://{server_args.host}:{port}")
            logger.info("replica %d: %s (%d threads)", i, urls[-1], threads)
        end = time.monotonic() + REPLICA_STARTUP_TIMEOUT_S  # NOTE: one deadline: they start in parallel
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc, timeout=max(1.0, end - time.monotonic()))
        launch_router(RouterArgs(worker_urls=urls, policy=server_args.router_policy,
                                 balance_threshold=server_args.router_balance_threshold,
                                 host=server_args.host, port=server_args.port, log_level=server_args.log_level,
                                 api_key=server_args.api_key))  # the router's own polls (/cache_evictions)
    finally:
        stop_processes(procs)
