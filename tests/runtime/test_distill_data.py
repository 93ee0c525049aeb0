"""Self-distillation data (runtime/speculative/distill_data.py) on the default model: the states captured
while the engine generates equal a second forward pass, the argmax agrees with the engine's own greedy
answers, and a rerun reads the cache instead of generating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgl.runtime.speculative import distill_data
from sgl.runtime.speculative.distill_data import DistillSpec, load_or_generate, record_states


def test_held_out_prompts_are_not_the_benchmarks() -> None:
    import sys

    sys.path.insert(0, str(distill_data.ROOT / "examples"))
    from fork_join_agent import questions

    bench = {distill_data.chat(q) for q in questions(50)}
    people = (distill_data.DATA_DIR / "people.txt").read_text().splitlines()[:distill_data.HELD_OUT_PEOPLE]
    prompts = [p for p, _ in DistillSpec().prompts()]
    assert not bench & set(prompts)
    assert not any(person in p for person in people for p in prompts)


def test_the_defaults_distill_the_new_templates_after_the_first_heads_prompts() -> None:
    first = len(distill_data.TEMPLATES) * len(distill_data.TOPICS)
    prompts = distill_data.chat_prompts(first + 50)
    qs = [tpl.format(t=t) for t in distill_data.TOPICS for tpl in distill_data.TEMPLATES]
    assert {distill_data.chat(q) for q in qs} == set(prompts[:first])  # the first heads' prompts, as before
    more = {distill_data.chat(tpl.format(t=t)) for t in distill_data.TOPICS for tpl in distill_data.MORE_TEMPLATES}
    assert set(prompts[first:]) <= more
    assert len(set(distill_data.chat_prompts(10_000))) == (len(distill_data.TEMPLATES)
                                                           + len(distill_data.MORE_TEMPLATES)) * len(distill_data.TOPICS)
    assert DistillSpec().num_chat <= len(distill_data.chat_prompts(10_000))


@pytest.mark.parametrize("act", ["q16", "q8"])
def test_states_match_greedy_answers_and_cache(act: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGL_CACHE_DIR", str(tmp_path))
    spec = DistillSpec(num_chat=3, num_extraction=1, max_new_tokens=12, batch_size=4, cpu_act_quant=act)
    logs: list[str] = []
    data = load_or_generate(spec, logs.append)
    assert data.num_sequences == 5 and data.hidden.shape == (len(data.tokens), 576)
    # The states captured while generating equal a second forward pass over the same sequences (up to the
    # decode steps' q16 or q8 activations vs the prefill's fp32), and so do the prompt positions' argmax.
    from sgl.runtime.models.loader import load_model

    model = load_model("default", show_progress=False).model
    seqs = []
    for s in range(data.num_sequences):
        tokens, _, _ = data.sequence(s)
        p = int(data.prompt_lens[s])
        seqs.append((tokens[:p].tolist(), tokens[p:].tolist()))
    ref = record_states(model, model.config, seqs)
    assert ref.tokens.tolist() == data.tokens.tolist()
    cos = torch.nn.functional.cosine_similarity(ref.hidden.float(), data.hidden.float(), dim=-1)
    assert cos.min() > (0.999 if act == "q16" else 0.99), cos.min()
    same = total = 0
    for s in range(data.num_sequences):
        tokens, hidden, argmax = data.sequence(s)
        p = int(data.prompt_lens[s])
        _, _, ref_argmax = ref.sequence(s)
        if act == "q16":  # q16's greedy tokens are fp32's
            assert argmax[:p - 1].tolist() == ref_argmax[:p - 1].tolist()
            if s < data.num_sequences - 1:  # the last one is grammar-constrained: its produced token may be masked
                assert argmax[p - 1:].tolist() == ref_argmax[p - 1:].tolist()
        same += int((argmax[:p - 1] == ref_argmax[:p - 1]).sum())
        total += p - 1
        # inside the answer the greedy choice is the next answer token
        assert argmax[p - 1:-1].tolist() == tokens[p:].tolist()
    assert same >= 0.9 * total, (same, total)  # q8: near-ties flip (llama.cpp's precision), filing errors would not
    again = load_or_generate(spec, logs.append)
    assert any("cached" in line for line in logs)
    assert again.tokens.tolist() == data.tokens.tolist()
    assert len(list((tmp_path / "distill").glob("*.safetensors"))) == 1
