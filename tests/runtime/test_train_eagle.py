"""The EAGLE trainer on a tiny random target: the held-out first-token accuracy rises, the file it
writes loads (fp16, d2t) and drafts through the scheduler with outputs identical to no speculation;
the soft-label loss is minimised by the target's own distribution."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from sgl.runtime.protocol import SamplingParams
from sgl.runtime.speculative import train as train_cli
from sgl.runtime.speculative.distill_data import record_states
from sgl.runtime.speculative.eagle_io import load_head
from sgl.runtime.speculative.train_eagle import evaluate, init_head, soft_label_loss, train

from .test_eagle import run
from .test_speculative_verify import tiny_model


def test_training_raises_accuracy_and_the_file_drafts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(3)
    rng = random.Random(0)
    seqs = []
    for _ in range(48):  # the target's own greedy continuations of random prompts
        prompt = [rng.randrange(6) for _ in range(rng.randrange(2, 8))]
        seq = list(prompt)
        for _ in range(16):
            seq.append(int(record_states(model, model.config, [(seq, [])]).argmax[-1]))
        seqs.append((prompt, seq[len(prompt):]))
    data = record_states(model, model.config, seqs)
    args = argparse.Namespace(eagle_epochs=10, eagle_lr=3e-3, eagle_batch_size=8, eagle_draft_vocab=5,
                              eagle_ce_weight=0.5, eagle_noise=0.1, eagle_depth=2, eagle_soft=1.0,
                              eagle_temperature=1.0, out=str(tmp_path / "head.safetensors"))
    logs: list[str] = []
    out = train(data, model, args, logs.append)
    accs = [float(line.rsplit("accuracy ", 1)[1].split()[0]) for line in logs if "accuracy" in line]
    assert accs[-1] > accs[0] + 0.2, logs  # 0.24 -> 0.56-0.62 when written
    head = load_head(out, model.config)
    assert head.config.draft_vocab_size == 5 and head.fc.weight.dtype == torch.float32
    prompts = [p for p, _ in seqs[:6]]
    params = [SamplingParams(temperature=0, max_new_tokens=20)] * 6
    base, _, _ = run(model, prompts, params)
    spec, s, _ = run(model, prompts, params, head=head, speculative_num_draft_tokens=3)
    assert [r.output_ids for r in spec] == [r.output_ids for r in base]
    assert s.stats.spec_accepted_tokens > 0


def test_cli_lists_both_algorithms() -> None:
    ap = train_cli.parser()
    assert set(ap._option_string_actions["--algorithm"].choices) == {"eagle", "medusa"}
    assert "--eagle-draft-vocab" in ap._option_string_actions


def test_soft_label_loss_is_minimised_by_the_targets_distribution() -> None:
    torch.manual_seed(0)
    target = torch.randn(2, 5, 7) * 3  # [B, L, Vd]
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padding: not scored
    best = soft_label_loss(target, target, mask)
    p = target.softmax(-1)
    entropy = float(-(p * p.log()).sum(-1)[mask.bool()].mean())
    assert abs(float(best) - entropy) < 1e-5  # at the optimum: the target's entropy
    assert abs(float(soft_label_loss(target + 4.0, target, mask)) - float(best)) < 1e-5  # a shift changes nothing
    logits = target.clone().requires_grad_(True)
    soft_label_loss(logits, target, mask).backward()
    assert float(logits.grad.abs().max()) < 1e-6  # a stationary point ...
    for _ in range(20):  # ... and the minimum: every other distribution, even the argmax's one-hot, costs more
        other = target + torch.randn_like(target)
        assert float(soft_label_loss(other, target, mask)) > float(best)
    one_hot = torch.nn.functional.one_hot(target.argmax(-1), 7).float() * 30
    assert float(soft_label_loss(one_hot, target, mask)) > float(best) + 0.1
    # masked positions do not count: changing the logits there changes nothing
    moved = target.clone()
    moved[1, 3:] = torch.randn(2, 7) * 10
    assert abs(float(soft_label_loss(moved, target, mask)) - float(best)) < 1e-5
