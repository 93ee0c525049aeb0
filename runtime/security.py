"""Security rules of the server, in one place: key fingerprints for logs, the bind policy, and the ONE
function that turns an admin-supplied path into a file we may read.

    >>> key_fingerprint("sk-secret")
    'sha256:746b4ad1'
    >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0"), is_loopback("localhost")
    (True, False, True)

Rules (README "Hardening"):
- API keys are compared with `hmac.compare_digest` (app.py, tenancy.py) and never logged or echoed;
  logs name a key by `key_fingerprint` (a short SHA-256 prefix).
- No request field reaches the filesystem. Model and adapter paths come from the command line, or
  from admin-only load routes that pass them through `resolve_allowed_path` (inside `--allowed-path-roots`).
- A non-loopback bind needs an API key (`--api-key` / `--api-keys`) or `--allow-unauthenticated`.
- CORS is off unless `--cors-allow-origins` lists origins.
No torch here (the HTTP layer imports it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union


class PathNotAllowed(ValueError):
    """A path outside every allowed root (or no roots configured). The message names the field."""


def key_fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for a secret key, fit for logs: 'sha256:<8 hex>'."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_roots(roots: Union[None, str, Sequence[str]]) -> list[Path]:
    """`--allowed-path-roots` ("dir1,dir2" or a list) -> absolute, symlink-resolved directories."""
    if roots is None:
        return []
    items = roots.split(",") if isinstance(roots, str) else list(roots)
    return [Path(os.path.expanduser(r.strip())).resolve() for r in items if r and r.strip()]


def resolve_allowed_path(path: Any, roots: Union[None, str, Sequence[str]], field: str = "path") -> Path:
    """The real path of `path` if it lies inside one of `roots`, else PathNotAllowed naming `field`.

    Relative paths are taken relative to each root in turn (the first root where it exists wins); absolute
    paths must resolve inside a root. Symlinks and `..` are resolved BEFORE the containment check, so
    `root/../etc/passwd` and a symlink in a root pointing out of it are both refused. The file need not
    exist (the caller reports a missing file in its own words). NUL bytes and non-strings are refused.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PathNotAllowed(f"{field} must be a non-empty path string")
    allowed = parse_roots(roots)
    if not allowed:
        raise PathNotAllowed(f"{field}: loading from a path is disabled; start the server with "
                             "--allowed-path-roots DIR[,DIR...] to allow paths inside those directories")
    expanded = Path(path)
    candidates = [expanded] if expanded.is_absolute() else [root / expanded for root in allowed]
    try:
        # NOTE: resolve(strict=False) follows the symlinks that exist and normalizes `..` before the check
        inside = [real for real in (c.resolve() for c in candidates)
                  if any(real == root or real.is_relative_to(root) for root in allowed)]
        for real in inside:
            if real.exists():
                return real
    except (OSError, RuntimeError, ValueError) as exc:  # name too long (found by atheris), symlink loop
        raise PathNotAllowed(f"{field}: {path[:200]!r} cannot be resolved: {exc.__class__.__name__}") from None
    if inside:
        return inside[0]
    raise PathNotAllowed(f"{field}: {path!r} is outside the allowed roots (--allowed-path-roots)")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, 'localhost'."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind_policy(host: str, api_key: Optional[str], api_keys_file: Optional[str],
                      allow_unauthenticated: bool) -> None:
    """Raise ValueError when the server would listen beyond this machine without any API key."""
    if is_loopback(host) or api_key or api_keys_file or allow_unauthenticated:
        return
    raise ValueError(f"refusing to listen on {host!r} without an API key: anyone who can reach it could use "
                     "the model. Set --api-key KEY (or --api-keys FILE), bind --host 127.0.0.1, or pass "
                     "--allow-unauthenticated if a proxy in front of the server authenticates.")
