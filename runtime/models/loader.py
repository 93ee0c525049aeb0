"""One entry point for every model source: "default", a *.gguf file, or a Hugging Face folder.

    >>> loaded = load_model("default")                       # doctest: +SKIP
    >>> loaded.config.architecture, loaded.tokenizer.vocab_size  # doctest: +SKIP
    ('llama', 49152)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)
WEIGHT_FORMATS = ("auto", "fp32", "native")  # the same tuples as runtime/config.py's flags
QUANTIZE_TYPES = ("q8_0", "q4_0")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any  # sgl.runtime.tokenizer.Tokenizer
    model_path: str  # the resolved path (a .gguf file or a folder)
    weight_format: str = "fp32"  # what ran: "fp32" or "native" (see resolve_weight_format)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto" is float32 on CPU (fast fp32 GEMV, no bf16 emulation) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_weight_format(
    weight_format: str, device: str, torch_dtype: torch.dtype, quantized_file: bool, quantize: Optional[str]
) -> str:
    """"fp32" or "native". auto = native when the CPU kernels are built and there is something quantized to
    run (a GGUF with q4_0/q4_1/q8_0/f16 linear weights, or --quantize), on CPU with float32 activations;
    else fp32 (every weight dequantized at load). Explicit "native" runs even without the extension
    (the kernels' torch reference: correct, slow; the kernels warn once)."""
    from sgl.kernels.cpu import extension_available

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if weight_format == "fp32":
        return "fp32"
    cpu_fp32 = torch.device(device).type == "cpu" and torch_dtype == torch.float32
    if weight_format == "native":
        if not cpu_fp32:
            raise ValueError("weight_format native runs on the CPU with dtype float32 (or auto)")
        if not quantized_file and quantize is None:
            raise ValueError("weight_format native needs quantized weights: a GGUF file with q4_0/q4_1/q8_0/f16 "
                             "tensors, or --quantize q8_0|q4_0 for a Hugging Face folder")
        return "native"
    return "native" if cpu_fp32 and (quantized_file or quantize is not None) and extension_available() else "fp32"


def load_model(
    model_path: str,
    dtype: str = "auto",
    device: str = "cpu",
    show_progress: bool = True,
    weight_format: str = "auto",
    quantize: Optional[str] = None,
) -> LoadedModel:
    """Load model weights and tokenizer. fp32 format: GGUF tensors are dequantized at load into `dtype`;
    native: linear weights stay in their GGUF blocks (`quantize`: a Hugging Face folder's are quantized)."""
    # NOTE: lazy imports: the GGUF loader and the tokenizer are optional at import time of this module.
    from sgl.runtime.models.default_model import resolve_model_path

    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(model_path)
    if quantize is not None and quantize not in QUANTIZE_TYPES:
        raise ValueError(f"quantize must be one of {QUANTIZE_TYPES}, got {quantize!r}")
    if os.path.isdir(path):
        from sgl.runtime.models.hf_loader import load_hf_model
        from sgl.runtime.tokenizer import Tokenizer

        fmt = resolve_weight_format(weight_format, device, torch_dtype, False, quantize)
        model, config = load_hf_model(path, dtype=torch_dtype, device=device, show_progress=show_progress,
                                      quantize=quantize if fmt == "native" else None)
        return LoadedModel(model, config, Tokenizer.from_folder(path), path, fmt)
    if path.endswith(".gguf"):
        from sgl.runtime.models.gguf_loader import read_gguf

        if quantize is not None:
            raise ValueError("quantize applies to Hugging Face folders; a GGUF file runs in its own block formats")
        gguf = read_gguf(path, show_progress=show_progress)
        if gguf.config.architecture == "gemma3":  # every block type dequantized at load (no native kernels)
            from sgl.runtime.models.gemma3 import Gemma3ForCausalLM

            if weight_format == "native":
                raise ValueError("weight_format native is not supported for Gemma 3; use fp32 (or auto)")
            gemma = Gemma3ForCausalLM(gguf.config, dtype=torch_dtype, device=device)
            gemma.load_weights(gguf.weights)
            return LoadedModel(gemma.eval(), gguf.config, gguf.tokenizer, path, "fp32")  # type: ignore[arg-type]
        fmt = resolve_weight_format(weight_format, device, torch_dtype, gguf.quantized, None)
        model = LlamaForCausalLM(gguf.config, dtype=torch_dtype, device=device, native=fmt == "native")
        if fmt == "native":
            kept = model.load_native_weights(gguf.iter_weights(native=True, show_progress=show_progress),
                                             part_qtypes=gguf.native_qtypes())
            if kept:
                logger.warning("native weights: no CPU kernel for %s; kept as fp32", "; ".join(kept))
        else:
            model.load_weights(gguf.weights)
        return LoadedModel(model.eval(), gguf.config, gguf.tokenizer, path, fmt)
    raise ValueError(f"model path {path!r} is neither a Hugging Face folder nor a .gguf file")
