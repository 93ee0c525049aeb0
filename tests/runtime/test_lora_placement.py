"""Which base model an adapter belongs to when several are served (runtime/lora/placement.py): by an
explicit base, by its declared base_model_name_or_path, else every base its shapes fit; a misfit is an
error naming the module and both shapes. Adapters here are hand-written PEFT folders (shapes only matter)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import save_file

from sgl.runtime.lora.adapter import AdapterError
from sgl.runtime.lora.placement import choose_bases, fit_error, place_lora_paths, split_base

SMALL = SimpleNamespace(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, num_hidden_layers=2)
WIDE = SimpleNamespace(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=12, num_hidden_layers=3)


def write_adapter(folder: str, cfg: Any, r: int = 2, base: Optional[str] = None, layers: Optional[int] = None) -> str:
    """A rank-r adapter on q_proj and down_proj of every layer, shaped for `cfg`."""
    os.makedirs(folder, exist_ok=True)
    q = cfg.num_attention_heads * cfg.head_dim
    tensors = {}
    for i in range(layers if layers is not None else cfg.num_hidden_layers):
        p = f"base_model.model.model.layers.{i}"
        tensors[f"{p}.self_attn.q_proj.lora_A.weight"] = torch.randn(r, cfg.hidden_size)
        tensors[f"{p}.self_attn.q_proj.lora_B.weight"] = torch.randn(q, r)
        tensors[f"{p}.mlp.down_proj.lora_A.weight"] = torch.randn(r, cfg.intermediate_size)
        tensors[f"{p}.mlp.down_proj.lora_B.weight"] = torch.randn(cfg.hidden_size, r)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "base_model_name_or_path": base,
                   "target_modules": ["q_proj", "down_proj"]}, f)
    return folder


MODELS = {"small": ("default", "/m/smol.gguf", SMALL), "twin": ("default", "/m/smol.gguf", SMALL),
          "wide": ("gemma3-270m", "/m/gemma-3-270m-q4_k_m.gguf", WIDE)}


def test_split_base() -> None:
    assert split_base("wide:sql=/a/sql") == ("wide", "sql=/a/sql")
    assert split_base("sql=/a/b:c") == (None, "sql=/a/b:c")  # a ':' in the path is not a base
    assert split_base("/a/sql") == (None, "/a/sql")


def test_fit_error_names_the_module_and_the_shapes(tmp_path) -> None:
    small = write_adapter(str(tmp_path / "s"), SMALL)
    assert fit_error(small, SMALL) is None
    assert fit_error(small, WIDE) == "layer 0 down_proj lora_B is [32, 2], the base model needs [48, 2]"
    deep = write_adapter(str(tmp_path / "d"), SMALL, layers=3)
    assert "the base model has 2 layers" in fit_error(deep, SMALL)


def test_bases_by_fit_by_declared_base_and_explicit(tmp_path) -> None:
    small = write_adapter(str(tmp_path / "s"), SMALL)
    assert choose_bases("s", small, MODELS) == ["small", "twin"]  # fits both copies of the small model
    assert choose_bases("s", small, MODELS, base="twin") == ["twin"]
    assert choose_bases("w", write_adapter(str(tmp_path / "w"), WIDE), MODELS) == ["wide"]
    declared = write_adapter(str(tmp_path / "g"), SMALL, base="small")
    assert choose_bases("g", declared, MODELS) == ["small"]  # its base_model_name_or_path names one
    hub = write_adapter(str(tmp_path / "h"), WIDE, base="google/gemma-3-270m")
    assert choose_bases("h", hub, MODELS) == ["wide"]


def test_misfits_are_errors_naming_the_base(tmp_path) -> None:
    small = write_adapter(str(tmp_path / "s"), SMALL)
    with pytest.raises(AdapterError, match="lora_path: adapter 's' does not fit base model 'wide': layer 0"):
        choose_bases("s", small, MODELS, base="wide")
    with pytest.raises(AdapterError, match="base: 'nope' is not a served model"):
        choose_bases("s", small, MODELS, base="nope")
    odd = SimpleNamespace(**{**vars(SMALL), "hidden_size": 40})
    with pytest.raises(AdapterError, match="fits none of the served models"):
        choose_bases("o", write_adapter(str(tmp_path / "o"), odd), MODELS)


def test_place_global_lora_paths(tmp_path) -> None:
    small = write_adapter(str(tmp_path / "s"), SMALL)
    wide = write_adapter(str(tmp_path / "w"), WIDE)
    placed = place_lora_paths([f"sql={small}", f"twin:only={small}", f"chat={wide}"], MODELS)
    assert placed == {"small": [f"sql={small}"], "twin": [f"sql={small}", f"only={small}"], "wide": [f"chat={wide}"]}
