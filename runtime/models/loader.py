"""One entry point for every model source: "default", a *.gguf file, or a Hugging Face folder.

    >>> loaded = load_model("default")                       # doctest: +SKIP
    >>> loaded.config.architecture, loaded.tokenizer.vocab_size  # doctest: +SKIP
    ('llama', 49152)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any  # sgl.runtime.tokenizer.Tokenizer
    model_path: str  # the resolved path (a .gguf file or a folder)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto" is float32 on CPU (fast fp32 GEMV, no bf16 emulation) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_path: str, dtype: str = "auto", device: str = "cpu", show_progress: bool = True) -> LoadedModel:
    """Load model weights and tokenizer. GGUF tensors are dequantized at load into `dtype`."""
    # NOTE: lazy imports: the GGUF loader and the tokenizer are optional at import time of this module.
    from sgl.runtime.models.default_model import resolve_model_path

    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(model_path)
    if os.path.isdir(path):
        from sgl.runtime.models.hf_loader import load_hf_model
        from sgl.runtime.tokenizer import Tokenizer

        model, config = load_hf_model(path, dtype=torch_dtype, device=device, show_progress=show_progress)
        return LoadedModel(model, config, Tokenizer.from_folder(path), path)
    if path.endswith(".gguf"):
        from sgl.runtime.models.gguf_loader import read_gguf

        gguf = read_gguf(path, show_progress=show_progress)
        model = LlamaForCausalLM(gguf.config, dtype=torch_dtype, device=device)
        model.load_weights(gguf.weights)
        return LoadedModel(model.eval(), gguf.config, gguf.tokenizer, path)
    raise ValueError(f"model path {path!r} is neither a Hugging Face folder nor a .gguf file")
