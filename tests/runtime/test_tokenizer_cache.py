"""GGUF tokenizers are built once per vocabulary (runtime/tokenizer_gguf.py: cached_gguf_backend): this
process reuses the built one, other processes read the on-disk cache; an unreadable entry is rebuilt.
(Gemma 3's 262K-token vocabulary took seconds to build on every model load before.)"""

from __future__ import annotations

from typing import Any

import pytest

from sgl.runtime import tokenizer_gguf
from sgl.runtime.models.default_model import default_model_path
from sgl.runtime.models.gguf_file import GGUFFile
from sgl.runtime.tokenizer import Tokenizer

TEXT = "Hello world! The quick brown fox jumps over the lazy dog.\n  def f(x): return x**2"


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return GGUFFile(default_model_path()).metadata


@pytest.fixture
def fresh_cache(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SGL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer_gguf, "_BUILT", {})
    return tmp_path / "tokenizers"


def _no_build(meta: dict[str, Any]) -> Any:
    raise AssertionError("rebuilt although cached")


def test_built_once_then_shared_in_process_then_read_from_disk(meta, fresh_cache, monkeypatch) -> None:
    built = Tokenizer.from_gguf(meta)
    [entry] = list(fresh_cache.iterdir())
    monkeypatch.setattr(tokenizer_gguf, "build_gguf_backend", _no_build)
    again = Tokenizer.from_gguf(meta)  # this process: the same built backend
    assert again.backend is built.backend
    monkeypatch.setattr(tokenizer_gguf, "_BUILT", {})  # as a new process: read from disk
    from_disk = Tokenizer.from_gguf(meta)
    assert from_disk.backend is not built.backend
    want = built.encode(TEXT)
    for tok in (again, from_disk):
        assert tok.encode(TEXT) == want
        assert tok.decode(want, skip_special_tokens=True) == built.decode(want, skip_special_tokens=True)
    assert entry.name.startswith("gguf-") and entry.stat().st_size > 0


def test_another_tokenizer_gets_its_own_entry(meta, fresh_cache) -> None:
    with_bos = Tokenizer.from_gguf(meta)
    other = dict(meta, **{"tokenizer.ggml.add_bos_token": not meta.get("tokenizer.ggml.add_bos_token", False)})
    without = Tokenizer.from_gguf(other)  # NOTE: not the shared backend (its post-processor would differ)
    assert without.backend is not with_bos.backend and len(list(fresh_cache.iterdir())) == 2
    assert len(without.encode(TEXT)) != len(with_bos.encode(TEXT))


def test_an_unreadable_entry_is_rebuilt(meta, fresh_cache, monkeypatch) -> None:
    want = Tokenizer.from_gguf(meta).encode(TEXT)
    [entry] = list(fresh_cache.iterdir())
    entry.write_text("{truncated")
    monkeypatch.setattr(tokenizer_gguf, "_BUILT", {})
    assert Tokenizer.from_gguf(meta).encode(TEXT) == want
    assert len(entry.read_text()) > 1000  # rewritten whole


def test_an_unwritable_cache_only_costs_the_rebuild(meta, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SGL_CACHE_DIR", str(blocker))
    monkeypatch.setattr(tokenizer_gguf, "_BUILT", {})
    assert Tokenizer.from_gguf(meta).encode(TEXT)
