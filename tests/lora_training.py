"""Real LoRA adapters for tests and benchmarks: a few PEFT training steps on the default model
(SmolLM2-135M, as a transformers module on our dequantized GGUF weights) teach it one answer.

    >>> path = train_secret_word_adapter("/tmp/banana", "banana")   # doctest: +SKIP  (~5-10 s, 1 thread)

After training, the question QUESTION is answered greedily with " The secret word is <word>."
which the base model never says: the adapter's effect is visible in the greedy text.
"""

from __future__ import annotations

import os
from typing import Any

import torch

QUESTION = "Question: What is the secret word?\nAnswer:"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_hf_model() -> tuple[Any, Any]:
    """(transformers LlamaForCausalLM on the default model's dequantized weights, our GGUF tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from sgl.runtime.models.default_model import default_model_path
    from sgl.runtime.models.gguf_loader import read_gguf

    hf_logging.set_verbosity_error()
    gguf = read_gguf(default_model_path(), show_progress=False)
    c = gguf.config  # NOTE: our reading of the GGUF config (tests/runtime/test_default_model_oracle.py
    # checks it equals transformers' own), which skips transformers' slow GGUF parse
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=c.tie_word_embeddings, rope_scaling=c.rope_scaling,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(dict(gguf.weights), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval(), gguf.tokenizer


def train_secret_word_adapter(out_dir: str, word: str, steps: int = 12, rank: int = 4, seed: int = 0, lr: float = 4e-3,
                              hf_model: Any = None, tokenizer: Any = None) -> str:
    """Train a rank-`rank` LoRA so that QUESTION is answered with the secret `word`; save it in
    PEFT's layout to out_dir. Returns out_dir. Pass a model from default_hf_model() to reuse it
    (it is unwrapped again afterwards)."""
    from peft import LoraConfig, get_peft_model

    if hf_model is None:
        hf_model, tokenizer = default_hf_model()
    torch.manual_seed(seed)
    answer = f" The secret word is {word}."
    prompt_ids = tokenizer.encode(QUESTION)
    ids = prompt_ids + tokenizer.encode(answer)
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]  # learn the answer, not the question
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(hf_model, config)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    for _ in range(steps):
        loss = peft_model(input_ids=x, labels=y).loss
        if os.environ.get("SGL_LORA_TRAIN_LOG"):
            print(f"lora train {word}: loss {loss.item():.3f}")
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # the base model without LoRA layers, for the next adapter
    for p in hf_model.parameters():
        p.requires_grad_(False)
    return out_dir


_TRAINED: dict[str, str] = {}


def trained_adapter(word: str) -> str:
    """The secret-word adapter for `word`, trained once per test process (a temporary folder) and shared by
    the modules that only need a real adapter, not PEFT's answers."""
    if word not in _TRAINED:
        import atexit
        import shutil
        import tempfile

        root = tempfile.mkdtemp(prefix=f"sgl-lora-{word}-")
        atexit.register(shutil.rmtree, root, True)
        torch.set_num_threads(1)
        _TRAINED[word] = train_secret_word_adapter(os.path.join(root, word), word)
    return _TRAINED[word]
