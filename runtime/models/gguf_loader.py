"""Loading a llama.cpp GGUF file: config, float32 weights under Hugging Face names, tokenizer, chat template.

Every tensor is dequantized to float32 at load time (F32, F16, BF16, Q8_0, Q4_0, Q4_1 in dequant.py,
every other type `gguf.quants` knows through it), so the forward pass sees exactly what transformers
loads from the same file. Two llama.cpp conventions are undone on the way:

* names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, and so on;
* rotary layout: llama.cpp's converter permutes the rows of q_proj/k_proj (and their biases) of
  "llama" models from Hugging Face's half-split rotary layout to the interleaved one
  (`convert_hf_to_gguf.py: LlamaModel.permute`); `unpermute_qk` is its exact inverse. Qwen2 files are
  not permuted.

    model = read_gguf(resolve_model_path("default"))
    model.config.num_hidden_layers             # 30
    for name, tensor in model.weights: ...     # ("model.embed_tokens.weight", float32 [49152, 576]), ...
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from sgl.runtime.models.config import ModelConfig, gemma3_layer_types
from sgl.runtime.models.dequant import dequantize
from sgl.runtime.models.gguf_file import GGUFFile, GGUFTensor
from sgl.runtime.models.native_weights import Payload, RawBlocks, native_qtype_supported
from sgl.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per layer (and per-head q/k norms): `ffn_norm` is its PRE-feedforward norm
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass
class GGUFModel:
    config: ModelConfig
    weights: Iterator[tuple[str, Payload]]  # (HF name, float32 tensor | RawBlocks), lazily, once
    quantized: bool  # some linear weight is in a block format the CPU kernels run (q4_0, q4_1, q8_0, f16)
    file: GGUFFile
    tokenizer: Tokenizer
    chat_template: Optional[str]

    def iter_weights(self, native: bool, show_progress: bool = True) -> Iterator[tuple[str, Payload]]:
        """A fresh pass over the weights (`weights` is the one read_gguf made, with its `native`)."""
        return _iter_weights(self.file, self.config, show_progress, native)

    def native_qtypes(self) -> dict[str, str]:
        """HF name -> qtype of each 2-D tensor, from the header (module-level native_qtypes)."""
        return native_qtypes(self.file, self.config.architecture)


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> Optional[str]:
    """The Hugging Face name of a GGUF tensor (None for tensors the HF model has no parameter for).

    >>> hf_tensor_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_tensor_name("rope_freqs.weight") is None
    True
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _GEMMA3_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m is None or m.group(2) not in names:
        return None
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def native_qtypes(file: GGUFFile, architecture: str) -> dict[str, str]:
    """HF name -> qtype ("q4_1", "q8_0", ...) of every 2-D tensor as native iteration yields it (RawBlocks),
    read from the header: what LlamaForCausalLM.load_native_weights lays its weight arena out by."""
    return {name: t.qtype.name.lower() for t in file.tensors
            if len(t.shape) == 2 and (name := hf_tensor_name(t.name, architecture)) is not None}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows (HF half-split rotary -> interleaved), as in convert_hf_to_gguf:
    per head, rows [x0..x_{d/2-1}, y0..y_{d/2-1}] become [x0, y0, x1, y1, ...]. w: [n_head * d, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The exact inverse of `permute_qk`: interleaved rows back to HF's half-split layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: GGUFTensor) -> np.ndarray:
    """A GGUF tensor as a new float32 numpy array of shape `tensor.shape` (row-major)."""
    return dequantize(tensor.data, tensor.qtype, tensor.shape)


def gguf_model_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.*` keys) and the tensors' row-major shapes."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_GGUF_ARCHITECTURES}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    rope_scaling = None
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        rope_scaling = {"rope_type": scaling, "factor": float(get("rope.scaling.factor", 1.0))}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    if "rope_freqs.weight" in shapes:
        logger.warning("GGUF has rope_freqs.weight (Llama 3.1 rope scaling); its factors are not applied")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    gemma: dict[str, Any] = {}
    if arch == "gemma3":  # llama.cpp's gemma3 hard-codes the 5:1 local/global interleave and local base 10000
        head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
        gemma = dict(
            layer_types=gemma3_layer_types(get("block_count")),
            sliding_window=int(get("attention.sliding_window")),
            rope_local_base_freq=10_000.0,
            query_pre_attn_scalar=float(head_dim),
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=shapes["model.embed_tokens.weight"][0],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=meta.get(f"{arch}.attention.key_length") or hidden // heads,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="lm_head.weight" not in shapes,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
        rope_scaling=rope_scaling,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (),
        **gemma,
    )


def unpermute_qk_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """`unpermute_qk` on the rows of raw block bytes (uint8 [N, row_bytes]; a row is whole blocks)."""
    n, width = rows.shape
    return np.ascontiguousarray(rows.reshape(n_head, n // n_head // 2, 2, width).transpose(0, 2, 1, 3)).reshape(n, width)


def _iter_weights(
    file: GGUFFile, config: ModelConfig, show_progress: bool, native: bool
) -> Iterator[tuple[str, Payload]]:
    permuted = config.architecture == "llama"  # only LlamaModel's converter permutes q/k
    gemma = config.architecture == "gemma3"
    for tensor in tqdm(file.tensors, desc="Loading GGUF weights", unit="tensor", disable=not show_progress):
        name = hf_tensor_name(tensor.name, config.architecture)
        if name is None:
            logger.debug("skipping GGUF tensor %s", tensor.name)
            continue
        if native and len(tensor.shape) == 2:  # a linear weight: its blocks as they are in the file
            rows = tensor.data
            if permuted and ".self_attn.q_proj." in name:
                rows = unpermute_qk_rows(rows, config.num_attention_heads)
            elif permuted and ".self_attn.k_proj." in name:
                rows = unpermute_qk_rows(rows, config.num_key_value_heads)
            yield name, RawBlocks(rows, tensor.qtype.name.lower(), (tensor.shape[0], tensor.shape[1]))
            file.drop_pages()  # consumed: copied by to_linear, or held as a view (q, k before v) that refaults
            continue
        weight = torch.from_numpy(dequantize_tensor(tensor))
        if gemma and name.endswith("norm.weight"):
            weight = weight - 1  # llama.cpp's converter stores Gemma's norm factors 1 + w; HF names hold w
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_qk(weight, config.num_key_value_heads)
        yield name, weight.contiguous()
        file.drop_pages()


def read_gguf(path: str, show_progress: bool = True, native: bool = False) -> GGUFModel:
    """Open a GGUF file: config and tokenizer now, weights lazily as (HF name, float32 tensor) pairs;
    with `native`, 2-D (linear) weights come as RawBlocks (views of the file's bytes) instead.

    >>> from sgl.runtime.models.default_model import resolve_model_path
    >>> model = read_gguf(resolve_model_path("default"), show_progress=False)
    >>> model.config.hidden_size, model.config.tie_word_embeddings
    (576, True)
    >>> name, w = next(model.weights); name, tuple(w.shape), w.dtype
    ('model.embed_tokens.weight', (49152, 576), torch.float32)
    """
    file = GGUFFile(path)
    meta = file.metadata
    arch = meta.get("general.architecture", "llama")
    shapes = {hf_tensor_name(t.name, arch) or t.name: t.shape for t in file.tensors}
    config = gguf_model_config(meta, shapes)
    if arch == "gemma3" and not meta.get("tokenizer.chat_template"):  # base-model files carry none
        from sgl.runtime.models.gemma3 import GEMMA3_CHAT_TEMPLATE

        meta = {**meta, "tokenizer.chat_template": GEMMA3_CHAT_TEMPLATE}
    tokenizer = Tokenizer.from_gguf(meta)
    tokenizer.name_or_path = path
    quantized = any(len(t.shape) == 2 and native_qtype_supported(t.qtype.name.lower()) for t in file.tensors)
    return GGUFModel(
        config=config,
        quantized=quantized,
        file=file,
        weights=_iter_weights(file, config, show_progress, native),
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
    )
