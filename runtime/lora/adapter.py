"""A LoRA adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors), laid out for
our fused linears.

PEFT stores, per targeted module, `lora_A.weight` [r, in] and `lora_B.weight` [out, r]; the module's
output gains `scale * x @ A^T @ B^T` with scale = lora_alpha / r (lora_alpha / sqrt(r) with
`use_rslora`). Our layers fuse q/k/v into `qkv` and gate/up into `gate_up`, so per layer and per
fused linear we keep ONE pair:

    A: [in, R]    the targeted parts' A^T side by side (R = sum of their ranks)
    B: [R, out]   block diagonal: part p's scaled B^T in its rank rows and its output columns

so that the whole update of a fused linear is `x @ A @ B` (parts that are not targeted are zero
blocks of B, absent from A). `lora_dropout` is a training-time op and is ignored.

    >>> LORA_TARGETS["k_proj"]
    ('qkv', 1)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # NOTE: torch is imported where used: the engine module must import without it
    import torch

# PEFT module name -> (our fused linear, index of the part inside it)
LORA_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_uids = itertools.count(1)  # a fresh uid per load: a reloaded name never reuses another load's KV


class AdapterError(ValueError):
    """The adapter cannot be served (missing files, unsupported option, shape mismatch); the message says why."""


def check_adapter_name(name: str) -> None:
    """A name requests can select: non-empty, no ':' (OpenAI's `model: "base:adapter"` splits there)."""
    if not isinstance(name, str) or not name or ":" in name or len(name) > 256 or name != name.strip():
        raise AdapterError(f"lora_name must be a non-empty string without ':' or surrounding spaces, got {name!r}")


def resolve_adapter_path(path: str) -> str:
    """The one place an adapter path is turned into a folder we read (a path-roots policy goes here).

    Paths come only from --lora-paths and POST /load_lora_adapter, never from a generate request."""
    if not isinstance(path, str) or not path:
        raise AdapterError("lora_path must be a non-empty string (a folder with adapter_config.json)")
    folder = os.path.realpath(os.path.expanduser(path))
    if not os.path.isdir(folder):
        raise AdapterError(f"lora_path {path!r} is not a folder (PEFT layout: adapter_config.json + adapter_model.safetensors)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise AdapterError(f"lora_path {path!r} has no {name} (PEFT layout; .bin checkpoints are not read)")
    return folder


@dataclass
class LayerShapes:
    """Per fused linear: (its input size, the output size of each of its parts), from the base model."""

    parts: dict[str, tuple[int, tuple[int, ...]]]

    @classmethod
    def for_llama(cls, hidden: int, q_size: int, kv_size: int, intermediate: int) -> "LayerShapes":
        return cls({"qkv": (hidden, (q_size, kv_size, kv_size)), "o": (q_size, (hidden,)),
                    "gate_up": (hidden, (intermediate, intermediate)), "down": (intermediate, (hidden,))})


@dataclass(eq=False)
class LoraAdapter:
    name: str
    path: str  # the resolved folder (reloaded from here after an LRU eviction)
    rank: int  # the largest rank of any module
    scaling: str  # how alpha was applied, for /v1/models and logs: "alpha/r" or "alpha/sqrt(r)"
    uid: int = field(default_factory=lambda: next(_uids))
    # per layer: fused linear -> (A [in, R], B [R, out]); None while evicted from the pool
    layers: Optional[list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = None
    refs: int = 0  # queued or running requests using it (never evicted while > 0)

    @property
    def resident(self) -> bool:
        return self.layers is not None

    def nbytes(self) -> int:
        if self.layers is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.layers for pair in layer.values() for t in pair)


def read_adapter_config(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise AdapterError("adapter_config.json must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not served: only LORA")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora) are not served")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapters with trained biases (bias={cfg.get('bias')!r}) are not served")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {cfg['modules_to_save']} are not served (full copies of base modules)")
    return cfg


def _alpha_for(cfg: dict[str, Any], module: str, rank: int) -> float:
    """lora_alpha, or alpha_pattern's entry whose key matches the module's name (PEFT: `(.*\\.)?key$`)."""
    for key, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(alpha)
    return float(cfg.get("lora_alpha", rank))


def load_adapter_weights(folder: str, cfg: dict[str, Any], shapes: LayerShapes, num_layers: int,
                         dtype: torch.dtype, max_rank: Optional[int] = None
                         ) -> tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], int]:
    """Read adapter_model.safetensors into per-layer fused (A, B) pairs; returns them and the max rank."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter weight {key!r} targets a module we do not serve "
                               f"(LoRA on {', '.join(LORA_TARGETS)} of the decoder layers only)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in LORA_TARGETS:
            raise AdapterError(f"adapter weight {key!r}: target {module!r} is not one of {', '.join(LORA_TARGETS)}")
        if layer >= num_layers:
            raise AdapterError(f"adapter weight {key!r}: the base model has {num_layers} layers")
        pairs.setdefault((layer, module), {})[ab] = t
    rslora = bool(cfg.get("use_rslora"))
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_layers)]
    top_rank = 0
    for layer in range(num_layers):
        for fused, (in_size, out_sizes) in shapes.parts.items():
            parts = [(name, idx) for name, (f, idx) in LORA_TARGETS.items() if f == fused and (layer, name) in pairs]
            if not parts:
                continue
            a_cols, b_blocks, r_total = [], [], 0
            for name, idx in parts:
                ab = pairs[(layer, name)]
                if set(ab) != {"A", "B"}:
                    raise AdapterError(f"layer {layer} {name}: needs both lora_A and lora_B")
                a, b = ab["A"].float(), ab["B"].float()  # [r, in], [out, r]
                r = a.shape[0]
                if a.shape != (r, in_size) or b.shape != (out_sizes[idx], r):
                    raise AdapterError(f"layer {layer} {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                                       f"fit the base model (expected [r, {in_size}] / [{out_sizes[idx]}, r])")
                if max_rank is not None and r > max_rank:
                    raise AdapterError(f"adapter rank {r} (layer {layer} {name}) exceeds --max-lora-rank {max_rank}")
                top_rank = max(top_rank, r)
                alpha = _alpha_for(cfg, f"model.layers.{layer}.{name}", r)
                scale = alpha / math.sqrt(r) if rslora else alpha / r
                a_cols.append(a.t())
                b_blocks.append((idx, r, b.t() * scale))
                r_total += r
            A = torch.cat(a_cols, dim=1).to(dtype).contiguous()  # [in, R]
            B = torch.zeros(r_total, sum(out_sizes), dtype=torch.float32)
            row = 0
            for idx, r, bt in b_blocks:
                col = sum(out_sizes[:idx])
                B[row:row + r, col:col + out_sizes[idx]] = bt
                row += r
            layers[layer][fused] = (A, B.to(dtype).contiguous())
    if top_rank == 0:
        raise AdapterError("the adapter has no LoRA weights")
    return layers, top_rank


def load_adapter(name: str, path: str, shapes: LayerShapes, num_layers: int, dtype: "Optional[torch.dtype]" = None,
                 max_rank: Optional[int] = None) -> LoraAdapter:
    """Read and check an adapter folder (resolve_adapter_path applies to `path`); weights in `dtype` (float32)."""
    import torch

    dtype = dtype or torch.float32
    check_adapter_name(name)
    folder = resolve_adapter_path(path)
    cfg = read_adapter_config(folder)
    layers, rank = load_adapter_weights(folder, cfg, shapes, num_layers, dtype, max_rank)
    return LoraAdapter(name=name, path=folder, rank=rank,
                       scaling="alpha/sqrt(r)" if cfg.get("use_rslora") else "alpha/r", layers=layers)
