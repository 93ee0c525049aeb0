"""Finds and loads the compiled extension (built ahead by `python -m sgl.kernels.cpu.build`, never JIT).

Missing, stale or unloadable -> None after one warning, and the launchers use the torch reference.
SGL_DISABLE_CPU_EXT=1 (read at import) forces the reference path (tests run both)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import pathlib
import platform
import warnings
from types import ModuleType

import torch  # noqa: F401  (the extension links libtorch: torch must be loaded first)

HERE = pathlib.Path(__file__).resolve().parent
NAME = "_sgl_cpu_quant"
_UNSET = object()
_mod: object = _UNSET


def built_path() -> pathlib.Path | None:
    found = sorted(HERE.glob(NAME + "*.so")) + sorted(HERE.glob(NAME + "*.pyd"))
    return found[0] if found else None


def _cpu_has(flags: list[str]) -> bool:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    have = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return all(f in have for f in flags)


def _load() -> ModuleType | None:
    path = built_path()
    if path is None:
        warnings.warn("sgl.kernels.cpu: the C++ extension is not built (run `make setup` or "
                      "`python -m sgl.kernels.cpu.build`); using the slow torch reference path", stacklevel=3)
        return None
    info_path = HERE / "_build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    need = {"avx2": ["avx2", "fma", "f16c"], "avx2+avxvnni": ["avx2", "fma", "f16c", "avx_vnni"]}.get(info.get("isa"), [])
    if need and platform.machine() in ("x86_64", "AMD64") and not _cpu_has(need):
        warnings.warn(f"sgl.kernels.cpu: {path.name} was built for {'/'.join(need)}, which this CPU lacks; "
                      "rebuild with `python -m sgl.kernels.cpu.build`; using the torch reference path",
                      stacklevel=3)
        return None
    try:
        spec = importlib.util.spec_from_file_location(NAME, path,
                                                      loader=importlib.machinery.ExtensionFileLoader(NAME, str(path)))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as e:  # a stale build against another torch, a missing symbol, ...
        warnings.warn(f"sgl.kernels.cpu: cannot load {path.name} ({e}); rebuild with "
                      "`python -m sgl.kernels.cpu.build`; using the torch reference path", stacklevel=3)
        return None
    return mod


# Read once (os.environ.get costs ~1 us, and load() runs on every call); tests flip `disabled` directly.
disabled: bool = os.environ.get("SGL_DISABLE_CPU_EXT", "") not in ("", "0")


def load() -> ModuleType | None:
    """The extension module, or None (reference path). Warns at most once per process."""
    global _mod
    if disabled:
        return None
    if _mod is _UNSET:
        _mod = _load()
    return _mod  # type: ignore[return-value]
