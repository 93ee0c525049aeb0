"""Which served base model a LoRA adapter belongs to when several are served (runtime/model_pool.py).

An adapter's A/B shapes fit one architecture's layer sizes, so an adapter belongs to the base models it fits:

* `--lora-paths BASE:NAME=PATH` (or /load_lora_adapter's `base`) names the base: an adapter that does not
  fit it is refused with a message naming the first misfit (a 400 on the route, an error at startup);
* `--lora-paths NAME=PATH` without a base: the model named by the adapter's own `base_model_name_or_path`
  (adapter_config.json) when that is a served name or path and fits, else every served model it fits (the
  same adapter on two copies of one base is then addressed as "base:adapter"); fitting none is an error;
* a `--models FILE` entry's own `lora_paths` belong to that model.

The fit is read from the safetensors header (shapes only, no weights, no torch), so it is known before a
model is loaded; the engine's loader checks the same shapes again when it reads the weights.

    >>> split_base("gemma:banana=/adapters/banana")
    ('gemma', 'banana=/adapters/banana')
    >>> split_base("banana=/adapters/banana")
    (None, 'banana=/adapters/banana')
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Optional, Sequence

from sgl.runtime.lora.adapter import _KEY, LORA_TARGETS, AdapterError, read_adapter_config, resolve_adapter_path


def split_base(entry: str) -> tuple[Optional[str], str]:
    """`BASE:NAME=PATH` -> (BASE, "NAME=PATH"); anything else -> (None, entry). Adapter names have no ':'
    (check_adapter_name), so a ':' before the '=' can only separate a base."""
    head, sep, _ = entry.partition("=")
    base, colon, name = head.partition(":")
    if sep and colon and base and name and "/" not in head:
        return base, entry[len(base) + 1:]
    return None, entry


def _expected(config: Any) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in, out) of the base linear it adapts."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def _tensor_shapes(folder: str) -> dict[str, list[int]]:
    """adapter_model.safetensors' header: tensor name -> shape (8-byte little-endian length, then JSON)."""
    with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def fit_error(folder: str, config: Any) -> Optional[str]:
    """Why the adapter in `folder` cannot run on a base model of `config` (the first misfit), or None."""
    expected = _expected(config)
    for key, shape in sorted(_tensor_shapes(folder).items()):
        m = _KEY.match(key)
        if m is None or m.group(2) not in LORA_TARGETS:
            return f"weight {key!r} targets a module we do not serve"
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_hidden_layers:
            return f"{key}: the base model has {config.num_hidden_layers} layers"
        in_size, out_size = expected[module]
        want = [shape[0], in_size] if ab == "A" else [out_size, shape[-1]]
        if list(shape) != want:
            return f"layer {layer} {module} lora_{ab} is {list(shape)}, the base model needs {want}"
    return None


def declared_base(folder: str) -> Optional[str]:
    """The adapter's own `base_model_name_or_path` (adapter_config.json), if any."""
    value = read_adapter_config(folder).get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def _matches(declared: str, name: str, model_path: str, resolved: str) -> bool:
    stem = os.path.splitext(os.path.basename(resolved.rstrip("/")))[0]
    return declared in (name, model_path, resolved) or os.path.basename(declared.rstrip("/")) in (name, stem)


def choose_bases(adapter: str, path: str, models: Mapping[str, tuple[str, str, Any]],
                 base: Optional[str] = None) -> list[str]:
    """The served models adapter `adapter` (folder `path`) belongs to. models: name -> (model_path as given,
    resolved path, ModelConfig). Raises AdapterError naming the field and the misfit."""
    folder = resolve_adapter_path(path)
    if base is not None:
        if base not in models:
            raise AdapterError(f"base: {base!r} is not a served model (served: {', '.join(models)})")
        err = fit_error(folder, models[base][2])
        if err is not None:
            raise AdapterError(f"lora_path: adapter {adapter!r} does not fit base model {base!r}: {err}")
        return [base]
    errors = {name: fit_error(folder, cfg) for name, (_, _, cfg) in models.items()}
    fitting = [name for name, err in errors.items() if err is None]
    if not fitting:
        why = "; ".join(f"{name}: {err}" for name, err in errors.items())
        raise AdapterError(f"lora_path: adapter {adapter!r} fits none of the served models ({why})")
    declared = declared_base(folder)
    if declared is not None:
        named = [n for n in fitting if _matches(declared, n, models[n][0], models[n][1])]
        if len(named) == 1:
            return named
    return fitting


def place_lora_paths(entries: Optional[Sequence[str]], models: Mapping[str, tuple[str, str, Any]]
                     ) -> dict[str, list[str]]:
    """Global `--lora-paths` entries -> each served model's own `NAME=PATH` list (see the module docstring)."""
    from sgl.runtime.lora.pool import parse_lora_paths

    placed: dict[str, list[str]] = {name: [] for name in models}
    for entry in entries or []:
        base, rest = split_base(entry)
        [(name, path)] = parse_lora_paths([rest])
        for model in choose_bases(name, path, models, base):
            placed[model].append(f"{name}={path}")
    return placed
