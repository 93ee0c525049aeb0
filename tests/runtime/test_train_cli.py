"""The documented training command end to end, for each algorithm: `python -m sgl.runtime.speculative.train`
(train.main) loads the target from a model path, reads a distillation data file and hands both to the
algorithm's trainer, which writes a head that loads. On a tiny random Llama folder; the data file comes from
record_states over the target's own greedy answers (the shape the generating engine writes)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from sgl.runtime.models.loader import load_model
from sgl.runtime.speculative import train as train_cli
from sgl.runtime.speculative.distill_data import record_states
from sgl.runtime.speculative.eagle_io import load_head
from sgl.runtime.speculative.medusa import load_medusa_heads

from tests.runtime.test_native_weights import _save_tiny_tokenizer
from tests.runtime.tiny_llama_oracle import make_hf_model, tiny_hf_configs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def target_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, object]:
    """(a tiny model folder, a distillation data file for it, its config)."""
    root = tmp_path_factory.mktemp("train_cli")
    folder = root / "model"
    make_hf_model(tiny_hf_configs()["llama_mha_tied"]).save_pretrained(folder)
    _save_tiny_tokenizer(folder)
    model = load_model(str(folder), show_progress=False, weight_format="fp32").model
    rng = random.Random(0)
    seqs = []
    for _ in range(24):
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(rng.randrange(2, 6))]
        seq = list(prompt)
        for _ in range(8):
            seq.append(int(record_states(model, model.config, [(seq, [])]).argmax[-1]))
        seqs.append((prompt, seq[len(prompt):]))
    path = root / "distill.safetensors"
    record_states(model, model.config, seqs).save(path, {"model": str(folder)})
    return str(folder), str(path), model.config


def test_the_command_trains_medusa_heads(target_and_data, tmp_path: Path) -> None:
    folder, data, config = target_and_data
    out = tmp_path / "medusa"
    assert train_cli.main(["--algorithm", "medusa", "--model-path", folder, "--data", data, "--out", str(out),
                           "--threads", "1", "--medusa-epochs", "1", "--medusa-batch-size", "64"]) == 0
    heads = load_medusa_heads(str(out), config.hidden_size, config.vocab_size)
    assert heads.num_heads == 3


def test_the_command_trains_an_eagle_head(target_and_data, tmp_path: Path) -> None:
    folder, data, config = target_and_data
    out = tmp_path / "eagle.safetensors"
    assert train_cli.main(["--algorithm", "eagle", "--model-path", folder, "--data", data, "--out", str(out),
                           "--threads", "1", "--eagle-epochs", "1", "--eagle-draft-vocab", "16"]) == 0
    head = load_head(out, config)
    assert head.config.draft_vocab_size == 16 and head.fc.weight.dtype == torch.float32
