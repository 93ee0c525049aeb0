"""MEDUSA self-distillation on a tiny random model: the heads fit the target's own greedy tokens two
and three steps ahead (accuracy over the data rises well above the identity start: a tiny random
model's greedy text gives too little to generalize from, the default model's run reports held-out
accuracy), and the written folder loads as a Medusa checkpoint."""

from __future__ import annotations

import argparse
import random

import torch

from sgl.runtime.speculative.distill_data import record_states
from sgl.runtime.speculative.medusa import load_medusa_heads
from sgl.runtime.speculative.train_medusa import accuracy, add_arguments, dense_lm_head, examples, train

from tests.runtime.test_speculative_verify import V, tiny_model


def _greedy_answers(model, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[int]]]:
    from sgl.runtime.executor.forward_batch import ForwardBatch
    from sgl.runtime.executor.kv_cache import KVCache

    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            kv = KVCache.for_model(model.config, len(seq), torch.float32)
            with torch.inference_mode():
                h = model(ForwardBatch.from_lists([seq], [list(range(len(seq)))]), kv)
                seq.append(int(model.compute_logits(h[-1:]).argmax()))
        out.append((p, seq[len(p):]))
    return out


def test_heads_fit_the_targets_own_future_tokens(tmp_path) -> None:
    model = tiny_model(11, hidden=32)
    with torch.no_grad():
        model.lm_head_t.mul_(8.0)  # confident logits, as a trained model's (a random one is near uniform)
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(3, 8))] for _ in range(60)]
    data = record_states(model, model.config, _greedy_answers(model, prompts, 12))
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--medusa-num-heads", "2", "--medusa-epochs", "30", "--medusa-batch-size", "64",
                          "--medusa-lr", "1e-2"])
    args.seed, args.out = 0, str(tmp_path / "heads")
    logs: list[str] = []
    out = train(data, model, args, logs.append)
    heads = load_medusa_heads(out, model.config.hidden_size, V)
    h, t = examples(data, 2, range(data.num_sequences))
    acc = accuracy(heads, dense_lm_head(model, model.config.hidden_size), h, t)
    before = [float(x) for x in logs[0].split("accuracy before: [")[1].rstrip("]").split(", ")]
    assert all(a > b + 0.15 for a, b in zip(acc, before)), (acc, before)
    assert min(acc) > 0.6, (acc, logs)
