"""Launching the server: build the engine, serve the app with uvicorn, shut down gracefully.

    from sgl.runtime.config import ServerArgs
    launch_server(ServerArgs(model_path="default", port=30000))   # blocks; SIGTERM/SIGINT -> exit 0

On SIGTERM or SIGINT the server stops accepting connections, lets in-flight requests finish for up
to `GRACEFUL_SHUTDOWN_S` seconds, aborts the rest (their KV is freed), then shuts the engine down.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
from typing import Any, Optional

import uvicorn

from sgl.runtime.security import check_bind_policy, key_fingerprint
from sgl.runtime.server.app import create_app

logger = logging.getLogger("sgl.server")

GRACEFUL_SHUTDOWN_S = 30.0


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("sgl").setLevel(level.upper())


class _Server(uvicorn.Server):
    """uvicorn's server, plus the line that tells the user where to call."""

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.config.host, self.config.port
        for server in getattr(self, "servers", []):
            for sock in getattr(server, "sockets", []) or []:
                host, port = sock.getsockname()[:2]
                break
        url = f"http://{host}:{port}"
        logger.info("sgl server ready at %s  (OpenAI API: %s/v1, try: curl %s/generate -d "
                    "'{\"text\": \"Hello\", \"sampling_params\": {\"max_new_tokens\": 16}}')", url, url, url)


def check_security(server_args: Any) -> None:
    """The bind policy (runtime/security.py), checked before the model loads; logs the key's fingerprint."""
    check_bind_policy(server_args.host, server_args.api_key, getattr(server_args, "api_keys", None),
                      getattr(server_args, "allow_unauthenticated", False))
    if server_args.api_key:
        logger.info("API key required (%s)", key_fingerprint(server_args.api_key))  # NOTE: never the key itself
    elif getattr(server_args, "allow_unauthenticated", False):
        logger.warning("serving %s WITHOUT an API key (--allow-unauthenticated)", server_args.host)


def serve(engine: Any, server_args: Any) -> None:
    """Serve an already built engine until SIGTERM/SIGINT; the caller owns `engine.shutdown()`."""
    check_bind_policy(server_args.host, server_args.api_key, getattr(server_args, "api_keys", None),
                      getattr(server_args, "allow_unauthenticated", False))
    app = create_app(engine, server_args)
    config = uvicorn.Config(app, host=server_args.host, port=server_args.port, log_config=None,
                            log_level=server_args.log_level, access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = _Server(config)
    # NOTE: uvicorn re-raises the captured SIGTERM/SIGINT after its graceful shutdown, with the handlers
    # it found installed. Ours ignore that echo, so the process goes on to shut the engine down and exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_server(server_args: Any) -> int:
    """Build the engine from `server_args` (a ServerArgs), serve it, shut it down on exit. Returns the
    exit code: 0, or 1 when the engine stopped on a fatal error (a tensor-parallel rank died)."""
    configure_logging(server_args.log_level)
    check_security(server_args)  # NOTE: fail before the model loads, not after
    from sgl.runtime.engine import Engine  # NOTE: function-local: the HTTP layer imports no torch

    if server_args.model_paths or server_args.models:
        from sgl.runtime.model_handles import build_multi_model_engine

        engine: Any = build_multi_model_engine(server_args)
    else:
        logger.info("loading model %s", server_args.model_path)
        engine = Engine(**dataclasses.asdict(server_args))
        # a fatal engine error stops the server as SIGTERM would (uvicorn's graceful shutdown)
        engine.on_fatal = lambda message: os.kill(os.getpid(), signal.SIGTERM)
    try:
        serve(engine, server_args)
    finally:
        logger.info("shutting down the engine")
        engine.shutdown()
    if getattr(engine, "fatal_error", None) is not None:
        logger.error("server stopped: %s", engine.fatal_error)
        return 1
    logger.info("server stopped")
    return 0
