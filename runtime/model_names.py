"""Served model names: `--model-path NAME=PATH` specs, the `--models` file, and the one function that maps a
request's `model` field onto a served model.

    >>> parse_model_spec("small=default")
    ModelSpec(name='small', model_path='default', overrides={})
    >>> parse_model_spec("/models/gemma.gguf").name
    '/models/gemma.gguf'
    >>> resolve_model_name("small:my-adapter", ["small", "big"])
    ('small', 'my-adapter')
    >>> resolve_model_name(None, ["small", "big"])
    ('small', None)
    >>> resolve_model_adapter("banana", ["small", "big"], {"small": [], "big": ["banana"]})
    ('big', 'banana')

No torch here: the HTTP layer resolves names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from sgl.runtime.protocol import RequestError

AUTO_MODEL = "auto"  # `model: "auto"`: the model router picks (runtime/model_router.py)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the served model name (what `model` fields and /v1/models say)
    model_path: str  # "default", "gemma3-270m", a .gguf file or a Hugging Face folder
    overrides: dict[str, Any] = field(default_factory=dict)  # per-model ServerArgs fields (--models file)


def parse_model_spec(spec: str) -> ModelSpec:
    """`NAME=PATH` or a bare PATH (served under the path itself, as a single model is today). The split is
    at the first "=" only when the part before it is a plain name (no path separator)."""
    name, sep, path = spec.partition("=")
    if sep and name and os.sep not in name and "/" not in name and path:
        return ModelSpec(name=name, model_path=path)
    return ModelSpec(name=spec, model_path=spec)


def read_models_file(path: str) -> list[ModelSpec]:
    """`--models FILE`: a JSON list of objects `{"name": ..., "model_path": ..., <ServerArgs fields>...}`,
    e.g. `[{"name": "small", "model_path": "default", "max_total_tokens": 4096}]`."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"models: cannot read {path!r}: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"models: {path!r} must hold a non-empty JSON list of model objects")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("model_path"), str):
            raise ValueError(f"models[{i}]: an object with a string model_path is needed")
        rest = {k: v for k, v in entry.items() if k not in ("name", "model_path")}
        specs.append(ModelSpec(name=str(entry.get("name") or entry["model_path"]), model_path=entry["model_path"],
                               overrides=rest))
    return specs


def check_unique(specs: Sequence[ModelSpec]) -> None:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
    if AUTO_MODEL in names:
        raise ValueError(f"{AUTO_MODEL!r} is reserved for the model router; serve the model under another name")


def resolve_model_name(requested: Optional[str], served: Sequence[str]) -> tuple[str, Optional[str]]:
    """A request's `model` -> (served model name, LoRA adapter name or None).

    None or "" -> the first served model. "base:adapter" -> (base, adapter) when base is served (OpenAI-style
    adapter addressing). Anything else unknown is a RequestError naming the field and the served models.
    ("auto" is handled by the model router before this.)
    """
    if not requested:
        return served[0], None
    if requested in served:
        return requested, None
    base, sep, adapter = requested.partition(":")
    if sep and base in served and adapter:
        return base, adapter
    raise RequestError(f"model: {requested!r} is not served; served models: {', '.join(served)}"
                       + (f" (or {AUTO_MODEL!r})" if len(served) > 1 else ""))


def resolve_model_adapter(requested: Optional[str], served: Sequence[str], adapters: Mapping[str, Sequence[str]],
                          check: bool = True) -> tuple[str, Optional[str]]:
    """A request's `model` -> (served model, LoRA adapter or None), adapters being each model's loaded ones.

    None/"" -> (served[0], None); a served name -> (name, None); "base:adapter" -> (base, adapter), a
    RequestError when base holds no adapter of that name; a bare adapter name -> the one model holding it (a
    RequestError when several do: "base:adapter" says which). Anything else is a RequestError naming the served
    models, unless `check` is False (one model served: the field is not checked, as OpenAI clients send their
    own model names): then any "x:adapter" of a loaded adapter selects it, and anything else is the model.
    """
    if not requested or requested in served:
        return (requested or served[0]), None
    holders = [m for m in served if requested in adapters.get(m, ())]
    if len(holders) == 1:
        return holders[0], requested
    if len(holders) > 1:
        raise RequestError(f"model: adapter {requested!r} is loaded on several models ({', '.join(holders)}); "
                           f"say which with \"base:adapter\", e.g. {holders[0] + ':' + requested!r}")
    base, sep, adapter = requested.rpartition(":")
    if not check and len(served) == 1:
        base = served[0] if sep and base else base
    if sep and base in served and adapter:
        loaded = list(adapters.get(base, ()))
        if adapter not in loaded:
            raise RequestError(f"model: no LoRA adapter named {adapter!r} is loaded on {base!r} "
                               f"(loaded there: {', '.join(loaded) or 'none'})")
        return base, adapter
    if not check:
        return served[0], None
    raise RequestError(f"model: {requested!r} is not served; served models: {', '.join(served)}"
                       + (f" (or {AUTO_MODEL!r})" if len(served) > 1 else ""))
