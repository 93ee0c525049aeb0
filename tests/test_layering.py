"""The import directions of DESIGN.md, checked by parsing every module of ours."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"sgl": "sgl", "runtime": "sgl.runtime", "grammars": "sgl.grammars", "kernels": "sgl.kernels"}


def modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([pkg, *parts]), path))
    return out


def imports(path: pathlib.Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also look inside top-level try/if blocks
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nodes += [n for top in tree.body if isinstance(top, ast.ClassDef) for n in top.body
                  if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = []
    for n in nodes:
        if isinstance(n, ast.Import):
            names += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names.append(n.module)
    return names


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("mod,path", modules(), ids=lambda x: str(x))
def test_import_directions(mod: str, path: pathlib.Path) -> None:
    every = imports(path, top_level_only=False)
    for name in every:
        assert name.split(".")[0] not in ("runtime", "grammars", "kernels"), \
            f"{path}: bare import of {name!r}; use sgl.{name}"
    top = imports(path, top_level_only=True)
    if under(mod, "sgl.grammars") or under(mod, "sgl.kernels"):
        ours = [n for n in every if under(n, "sgl")]
        bad = [n for n in ours if not (under(n, "sgl.grammars") or under(n, "sgl.kernels"))]
        assert not bad, f"{path}: grammars/kernels may import only each other, not {bad}"
    elif not under(mod, "sgl.runtime"):  # the frontend
        assert not [n for n in top if under(n, "torch")], f"{path}: the DSL must not import torch at import time"
        bad = [n for n in top if under(n, "sgl.runtime") and n not in ("sgl.runtime.protocol", "sgl.runtime.config")]
        assert not bad, f"{path}: the DSL talks to the runtime only through protocol types or HTTP, not {bad}"
    if under(mod, "sgl.runtime.server"):
        assert not [n for n in top if under(n, "torch")], f"{path}: the HTTP layer must not import torch"


@pytest.mark.parametrize("module", ["sgl", "sgl.runtime.server", "sgl.runtime.protocol"])
def test_module_loads_without_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_pyproject_lists_every_package() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, pkg in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([pkg, *rel]))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"
