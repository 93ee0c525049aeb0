"""Load a Hugging Face model folder: config.json plus one or many *.safetensors files.

Tensors stream from the files straight into the fused parameters (one tensor in memory at a time).

    >>> model, config = load_hf_model("/models/SmolLM2-135M-Instruct", dtype=torch.float32)  # doctest: +SKIP
    >>> config.architecture, next(model.parameters()).dtype                                    # doctest: +SKIP
    ('llama', torch.float32)
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM


def read_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no config.json; a Hugging Face model folder needs one")
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f))


def safetensors_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder!r} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    return files


def iter_safetensors(files: list[str], show_progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, in file order, with a progress bar over tensors."""
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            total += len(list(f.keys()))
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=not show_progress) as bar:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def load_hf_model(
    folder: str,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    show_progress: bool = True,
    quantize: Optional[str] = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model from `folder`'s config.json and fill it from its safetensors (cast to `dtype`).
    `quantize` ("q8_0" | "q4_0"): native weights, each linear weight quantized at load (fp32 activations)."""
    config = read_hf_config(folder)
    weights = iter_safetensors(safetensors_files(folder), show_progress)
    if config.architecture == "gemma3":
        from sgl.runtime.models.gemma3 import Gemma3ForCausalLM

        if quantize is not None:
            raise ValueError("--quantize is not supported for Gemma 3 (its weights run as float32/bfloat16)")
        # the text model of a Gemma3ForConditionalGeneration checkpoint is under language_model.
        gemma = Gemma3ForCausalLM(config, dtype=dtype, device=device)
        gemma.load_weights((name.replace("language_model.", "", 1), t) for name, t in weights)
        return gemma.eval(), config  # type: ignore[return-value]
    model = LlamaForCausalLM(config, dtype=dtype, device=device, native=quantize is not None)
    if quantize is None:
        model.load_weights(weights)
    else:
        model.load_native_weights(((name, t.float()) for name, t in weights), quantize=quantize)
    return model.eval(), config
