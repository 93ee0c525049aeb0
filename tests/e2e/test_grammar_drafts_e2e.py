"""Drafts that follow the grammar (runtime/speculative/grammar_walk.py) on the default model with the shipped
heads: json_schema extractions through EAGLE (a chain, a token tree) and MEDUSA, every row drafting. The
outputs are token-identical to no speculation and valid; verification's own walk cuts NO drafted node (each
was drafted under the mask verification applies), while the same head drafting blind gets nodes cut; and
the grammar-following chain produces more tokens per verify step than the blind one.

Seeded sampling under a grammar: the same tokens with every algorithm as without speculation (verification
takes forced text from a draft as jump-forward appends it: no draw from the request's generator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import sgl.runtime.executor.model_runner as model_runner
import sgl.runtime.speculative.grammar_walk as grammar_walk

pytestmark = pytest.mark.timeout(600)

_DATA = Path(__file__).resolve().parents[2] / "examples/data"
PERSON = json.loads((_DATA / "person_extraction.json").read_text())["schema"]
PEOPLE = (_DATA / "people.txt").read_text().splitlines()[:3]
PARAMS = {"json_schema": json.dumps(PERSON), "max_new_tokens": 160, "temperature": 0}


def _prompt(line: str) -> str:
    return f"<|im_start|>user\nExtract the person as JSON: {line}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", autouse=True)
def _restore_act_quant():
    from sgl.kernels import cpu

    saved = cpu.get_act_quant()
    yield
    cpu.set_act_quant(saved)  # process-wide (Engine sets it): later modules get the default back


def _run(params: dict = PARAMS, act: str = "q16", logprobs: bool = False,
         **kw: Any) -> tuple[list[dict], list[list[bool]], dict]:
    """(outputs, the verify walk's alive flags of every constrained row with a draft, server info)."""
    from sgl.runtime.engine import Engine

    alive: list[list[bool]] = []
    fill = model_runner.fill_verify_bitmask

    def spy(grammars, bases, drafts, *a, **k):  # noqa: ANN001, ANN202
        masks = fill(grammars, bases, drafts, *a, **k)
        alive.extend(list(al) for g, d, al in zip(grammars, drafts, masks.alive) if g is not None and len(d))
        return masks

    model_runner.fill_verify_bitmask = spy
    # q16 activations by default: a verify row's tokens get the bits of a decode step (test_speculative_e2e.py's
    # EXACT); fp32's M = 1 step and small-M GEMM sum in different orders
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                 cpu_act_quant=act, **kw)
    try:
        outs = [eng.generate(_prompt(line), dict(params, sampling_seed=i), return_logprob=logprobs)
                for i, line in enumerate(PEOPLE)]
        info = eng.get_server_info()
        eng.wait_idle()
        eng.check_integrity()
    finally:
        model_runner.fill_verify_bitmask = fill
        eng.shutdown()
    return outs, alive, info


@pytest.fixture(scope="module")
def baseline() -> list[dict]:
    return _run()[0]


def _identical_and_valid(outs: list[dict], baseline: list[dict]) -> None:
    for o, b in zip(outs, baseline):
        assert o["output_ids"] == b["output_ids"]
        jsonschema.validate(json.loads(o["text"]), PERSON)


@pytest.mark.parametrize("kw", [
    dict(speculative_algorithm="EAGLE", speculative_num_draft_tokens=4),
    dict(speculative_algorithm="EAGLE", speculative_num_draft_tokens=6, speculative_eagle_topk=3,
         speculative_num_steps=3),
    dict(speculative_algorithm="MEDUSA", speculative_num_draft_tokens=8),
], ids=["eagle-chain", "eagle-tree", "medusa"])
def test_drafts_follow_the_grammar(baseline: list[dict], kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    outs, alive, info = _run(speculative_always_draft=True, **kw)
    _identical_and_valid(outs, baseline)
    assert alive and all(all(a) for a in alive), [a for a in alive if not all(a)][:5]
    if kw.get("speculative_eagle_topk") or kw["speculative_algorithm"] == "MEDUSA":
        return
    # the same head drafting blind: verification cuts some of its nodes, and fewer tokens come per step
    monkeypatch.setattr(grammar_walk, "ENABLED", False)
    blind_outs, blind_alive, blind_info = _run(speculative_always_draft=True, **kw)
    _identical_and_valid(blind_outs, baseline)
    assert any(not all(a) for a in blind_alive)
    assert info["spec_accept_length"] > blind_info["spec_accept_length"], (info, blind_info)




def test_seeded_sampling_under_a_grammar_keeps_its_tokens() -> None:
    """temperature 0.8, a seed per request, q16 (batch-invariant verify rows): every algorithm, every row drafting,
    gives the tokens and logprobs of no speculation. Before verification took forced text the way jump-forward does, a verify
    row sampled the grammar's forced tokens (a draw each) and the seeded outputs drifted (NGRAM 15 of 18, MEDUSA
    9 of 18 identical on 18 people)."""
    sampled = dict(PARAMS, temperature=0.8)  # _run adds a seed per request
    base = _run(sampled, logprobs=True)[0]
    for kw in (dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=6),
               dict(speculative_algorithm="EAGLE", speculative_num_draft_tokens=6, speculative_eagle_topk=3,
                    speculative_num_steps=3),
               dict(speculative_algorithm="MEDUSA", speculative_num_draft_tokens=8)):
        outs, alive, _ = _run(sampled, logprobs=True, speculative_always_draft=True, **kw)
        _identical_and_valid(outs, base)
        assert alive, kw  # verify rows ran under the grammar
        # logprobs too: the forced tokens' are 0 either way (taken from the draft or by jump-forward)
        for o, b in zip(outs, base):
            assert o["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"], kw
