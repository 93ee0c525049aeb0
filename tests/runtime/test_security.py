"""runtime/security.py and the server's security flags: the path resolver (`..`, absolute paths,
symlinks), the bind policy (a real `sgl serve` refusing 0.0.0.0 without a key), key fingerprints in
logs (never the key), CORS off by default and on with --cors-allow-origins."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl.runtime.config import ServerArgs
from sgl.runtime.security import (PathNotAllowed, check_bind_policy, is_loopback, key_fingerprint,
                                  resolve_allowed_path)
from sgl.runtime.server.launch import check_security
from tests.runtime.test_web_console import client

SGL = str(pathlib.Path(sys.executable).parent / "sgl")


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "adapters"
    (allowed / "a1").mkdir(parents=True)
    (allowed / "a1" / "adapter_config.json").write_text("{}")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("x")
    (allowed / "escape").symlink_to(secret)  # a symlink inside the root that points out of it
    return allowed, secret


def test_paths_inside_the_roots_resolve(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    assert resolve_allowed_path("a1", str(allowed)) == allowed / "a1"
    assert resolve_allowed_path(str(allowed / "a1" / "adapter_config.json"), [str(allowed)]) == \
        allowed / "a1" / "adapter_config.json"
    assert resolve_allowed_path("a1/../a1", f"/nonexistent,{allowed}") == allowed / "a1"
    assert resolve_allowed_path("not-yet-there", str(allowed)) == allowed / "not-yet-there"


@pytest.mark.parametrize("bad", ["../secret/key.txt", "a1/../../secret", "/etc/passwd", "escape/key.txt",
                                 "escape", "/", "..", "a1/\x00x", ""])
def test_paths_outside_the_roots_are_refused(roots: tuple[Path, Path], bad: str) -> None:
    allowed, secret = roots
    with pytest.raises(PathNotAllowed, match="lora_path"):
        resolve_allowed_path(bad, str(allowed), field="lora_path")
    with pytest.raises(PathNotAllowed, match="lora_path"):
        resolve_allowed_path(str(secret / "key.txt"), str(allowed), field="lora_path")


def test_unresolvable_paths_are_refused_not_raised(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    (allowed / "loop").symlink_to(allowed / "loop")  # a symlink loop
    for bad in ("x" * 300, "\uffff" * 200, "loop", "loop/x"):  # (found by atheris: ENAMETOOLONG escaped)
        with pytest.raises(PathNotAllowed, match="lora_path"):
            resolve_allowed_path(bad, str(allowed), field="lora_path")


def test_no_roots_means_no_path_loads(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    for no_roots in (None, "", [], " , "):
        with pytest.raises(PathNotAllowed, match="--allowed-path-roots"):
            resolve_allowed_path(str(allowed / "a1"), no_roots)
    with pytest.raises(PathNotAllowed):
        resolve_allowed_path(["a1"], str(allowed))  # type: ignore[arg-type]  # a JSON list, not a path


def test_bind_policy() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "0.0.0.0", "::", "10.0.0.2",
                                     "example.com")] == [True] * 4 + [False] * 4
    check_bind_policy("127.0.0.1", None, None, False)
    check_bind_policy("0.0.0.0", "k", None, False)
    check_bind_policy("0.0.0.0", None, "keys.json", False)
    check_bind_policy("0.0.0.0", None, None, True)
    with pytest.raises(ValueError, match="--allow-unauthenticated"):
        check_bind_policy("0.0.0.0", None, None, False)


def test_serve_refuses_a_public_bind_without_a_key_before_loading() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([SGL, "serve", "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "without an API key" in done.stderr and "--allow-unauthenticated" in done.stderr
    assert "loading model" not in done.stderr


def test_the_key_is_never_logged_or_printed(caplog: pytest.LogCaptureFixture) -> None:
    args = ServerArgs(model_path="stub", host="0.0.0.0", api_key="sk-very-secret")
    with caplog.at_level(logging.INFO, logger="sgl"):
        check_security(args)
    assert key_fingerprint("sk-very-secret") in caplog.text and "sk-very-secret" not in caplog.text
    assert "sk-very-secret" not in repr(args)
    c = client(api_key="sk-very-secret")
    info = c.get("/server_info", headers={"Authorization": "Bearer sk-very-secret"})
    assert "sk-very-secret" not in info.text
    assert "sk-very-secret" not in c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).text


def test_cors_off_by_default_and_on_for_listed_origins() -> None:
    origin = {"Origin": "https://app.example"}
    r = client().get("/health", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    c = client(api_key="k", cors_allow_origins="https://app.example, https://b.example")
    ok = c.get("/health", headers=origin)
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    other = c.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # a browser's preflight carries no key: answered by CORS; the real request still needs the key
    pre = c.options("/v1/models", headers={**origin, "Access-Control-Request-Method": "GET",
                                           "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    assert c.get("/v1/models", headers=origin).status_code == 401


_PARTS = st.sampled_from(["a1", "..", ".", "escape", "loop", "/", "//", "x" * 300, "\x00", "~", "adapters", "secret",
                          "a1/adapter_config.json", "/etc", "/tmp"])


@given(parts=st.lists(_PARTS, min_size=1, max_size=8), sep=st.sampled_from(["/", ""]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_resolved_paths_are_always_inside_the_root(roots: tuple[Path, Path], parts: list[str], sep: str) -> None:
    """Property (also fuzzed by atheris): any string resolves inside the root or is PathNotAllowed."""
    allowed, _ = roots
    if not (allowed / "loop").is_symlink():
        (allowed / "loop").symlink_to(allowed / "loop")
    try:
        got = resolve_allowed_path(sep.join(parts), str(allowed))
    except PathNotAllowed:
        return
    assert got == allowed.resolve() or got.is_relative_to(allowed.resolve()), (parts, got)
