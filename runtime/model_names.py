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

No torch here: the HTTP layer resolves names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

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
