"""Loading a Hugging Face folder (config.json + safetensors, single file or sharded)."""

from __future__ import annotations

import glob
import json

import pytest
import torch

from sgl.runtime.models.hf_loader import load_hf_model
from sgl.runtime.models.loader import load_model, resolve_dtype

from tests.runtime.tiny_llama_oracle import hf_logits, make_hf_model, random_prompts, rel_err, run_schedule, tiny_hf_configs

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name,shard", [("llama_gqa_untied", None), ("qwen2_bias_tied", "40KB"), ("llama3_rope", "40KB")])
def test_folder_roundtrip_matches_transformers(tmp_path, name: str, shard) -> None:
    hf = make_hf_model(tiny_hf_configs()[name])
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    files = glob.glob(str(tmp_path / "*.safetensors"))
    assert (len(files) > 1) == (shard is not None), files

    model, config = load_hf_model(str(tmp_path), dtype=torch.float32, show_progress=False)
    assert config.architecture == {"llama": "llama", "qwen2": "qwen2"}[hf.config.model_type]
    prompt = random_prompts([17], seed=0)[0]
    got = run_schedule(model, [prompt], lambda b, step, remaining: remaining)[0]
    assert rel_err(got, hf_logits(hf, prompt)) < 1e-4


def test_folder_loads_in_bfloat16(tmp_path) -> None:
    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_model(str(tmp_path), dtype=torch.bfloat16, show_progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    prompt = random_prompts([9], seed=1)[0]
    from sgl.runtime.executor.forward_batch import ForwardBatch
    from sgl.runtime.executor.kv_cache import KVCache

    kv = KVCache.for_model(model.config, num_slots=16, dtype=torch.bfloat16)
    fb = ForwardBatch.from_lists([prompt], [list(range(9))])
    logits = model.compute_logits(model.forward(fb, kv))
    assert logits.dtype == torch.float32
    assert rel_err(logits, hf_logits(hf, prompt)) < 5e-2  # bf16 rounding, same model


def test_folder_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(str(tmp_path))
    hf = make_hf_model(tiny_hf_configs()["llama_gqa_untied"])
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_model(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf_model(str(tmp_path))


def test_load_model_dispatch_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a Hugging Face folder nor a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    assert resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")


def test_load_model_on_a_folder_brings_its_tokenizer(tmp_path) -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = BackendTokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    hf = make_hf_model(tiny_hf_configs()["llama_mha_tied"])
    hf.save_pretrained(tmp_path)

    loaded = load_model(str(tmp_path), show_progress=False)
    assert loaded.model_path == str(tmp_path) and loaded.config.tie_word_embeddings
    ids = loaded.tokenizer.encode("w5 w17 w200", add_special_tokens=False)
    assert ids == [5, 17, 200]
    got = run_schedule(loaded.model, [ids], lambda b, step, remaining: remaining)[0]
    assert rel_err(got, hf_logits(hf, ids)) < 1e-4
