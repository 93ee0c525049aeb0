"""Speculative decoding (NGRAM) on the default model through the Engine: greedy outputs token-identical
to the same engine without speculation (oracle prompts, a copy-heavy extraction, a json_schema
request), seeded sampling identical too, constrained outputs valid, metrics and meta_info filled,
KV integrity after every test (conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from sgl.runtime.metrics import get_metrics

pytestmark = pytest.mark.timeout(600)

_DATA = Path(__file__).resolve().parents[2] / "examples/data"
_WORKLOAD = json.loads((_DATA / "person_extraction.json").read_text())
PERSON, PERSON_PROMPT = _WORKLOAD["schema"], _WORKLOAD["prompt"]
COPY_PROMPT = ("<|im_start|>user\nList every person in this text with their city and year.\n\n"
               + (_DATA / "people.txt").read_text()[:700] + "<|im_end|>\n<|im_start|>assistant\n")
PROMPTS = [  # tests/runtime/test_default_model_oracle.py's prompts, then the copy-heavy one
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
    COPY_PROMPT,
]
GREEDY = {"max_new_tokens": 48, "temperature": 0}
SAMPLED = [{"max_new_tokens": 32, "temperature": 0.9, "top_p": 0.95, "sampling_seed": s, "frequency_penalty": 0.3}
           for s in range(3)]
SCHEMA = {"json_schema": json.dumps(PERSON), "max_new_tokens": 128, "temperature": 0}
TIGHT = dict(SCHEMA, max_new_tokens=40)  # the grammar budget closes the JSON early: masks narrow near the end


# Both engines run q16 activations, where identity is exact by construction: decode_rows gives every verify row the
# bits decode_stack gives that token alone, matmuls and attention alike (tests/kernels/test_cpu_decode_rows.py).
# (They ran fp32 activations while a verify row's attention was torch SDPA: q16's rounding amplified its
# summation-order differences. fp32 in turn sums an M = 1 step (gemv) and a verify row (the small-M GEMM) in
# different orders: on an AMD EPYC (Zen 4) that flipped a temperature-0.9 draw of the sampled requests below.)
EXACT = {"cpu_act_quant": "q16"}
ALWAYS = {"speculative_always_draft": True}  # every decoding row drafts: the identity tests see verify rows whatever the cost


@pytest.fixture(scope="module", autouse=True)
def _restore_act_quant():
    from sgl.kernels import cpu

    saved = cpu.get_act_quant()
    yield
    cpu.set_act_quant(saved)  # process-wide (Engine sets it): later modules get the default back


def _requests() -> tuple[list[str], list[dict]]:
    prompts = PROMPTS + [COPY_PROMPT] * len(SAMPLED) + [PERSON_PROMPT] * 2
    return prompts, [GREEDY] * len(PROMPTS) + SAMPLED + [TIGHT, SCHEMA]


@pytest.fixture(scope="module")
def baseline() -> list[dict]:
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192, show_progress=False, **EXACT)
    try:
        prompts, params = _requests()
        return [eng.generate(p, sp) for p, sp in zip(prompts, params)]  # one at a time: batch 1
    finally:
        eng.check_integrity()
        eng.shutdown()


@pytest.fixture(scope="module")
def engine():
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192, show_progress=False,
                 speculative_algorithm="NGRAM", speculative_num_draft_tokens=4, **ALWAYS, **EXACT)
    yield eng
    eng.shutdown()


def test_ngram_outputs_identical_to_no_speculation(engine, baseline) -> None:
    prompts, params = _requests()
    outs = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
    for o, b, sp in zip(outs, baseline, params):
        assert o["output_ids"] == b["output_ids"], sp
        assert o["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    jsonschema.validate(json.loads(outs[-1]["text"]), PERSON)
    assert outs[-1]["meta_info"]["spec_verify_ct"] > 0  # drafts ran under the grammar
    assert outs[-2]["meta_info"].get("grammar_closed_early") == baseline[-2]["meta_info"].get("grammar_closed_early")
    copy = outs[len(PROMPTS) - 1]["meta_info"]
    assert copy["spec_verify_ct"] > 0 and copy["spec_accept_length"] > 1.3  # copying pays
    stats = engine.get_server_info()
    assert stats["speculative_algorithm"] == "NGRAM" and 0 < stats["spec_accept_rate"] <= 1
    assert b"sgl:spec_accept_length_count" in get_metrics().render()


def test_adaptive_rule_on_a_measured_cost(baseline) -> None:
    """The default (adaptive) engine times its verify rows at start (server_info), then drafts where that cost
    pays: the copy prompt's copy phases are found (shadow drafts) and verified; output identical."""
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                 speculative_algorithm="NGRAM", speculative_num_draft_tokens=4, **EXACT)
    try:
        info = eng.get_server_info()
        assert info["spec_verify_cost_source"] == "measured"
        assert [j for j, _ in info["spec_verify_cost"]] == [0, 1, 2, 3, 4] and info["spec_verify_cost"][0][1] == 1.0
        i = len(PROMPTS) - 1
        out = eng.generate(PROMPTS[i], GREEDY)
        assert out["output_ids"] == baseline[i]["output_ids"]
        assert out["meta_info"]["spec_verify_ct"] > 0, out["meta_info"]  # its copy phases drafted
        eng.wait_idle()
        eng.check_integrity()
        # the steps it ran corrected the start-up curve (verify_cost.ObservedCost): its shape, their scale
        after = eng.get_server_info()
        assert after["spec_verify_cost_measured"] == info["spec_verify_cost"]
        assert after["spec_observed_steps"]["decode"] > 0 and after["spec_observed_steps"]["verify"] > 0
        scale = after["spec_verify_cost_scale"]
        assert [c for _, c in after["spec_verify_cost"]] == pytest.approx(
            [1.0 + scale * (c - 1.0) for _, c in info["spec_verify_cost"]])
    finally:
        eng.shutdown()


@pytest.mark.parametrize("act", ["q8"])  # q16, the default, is EXACT: the tests above
def test_default_activations_identical_to_no_speculation(act: str) -> None:
    """--cpu-act-quant q8 activations, verify rows through decode_rows (each token row the bits of a batch-1
    decode step: runtime/models/fused_decode.py). Greedy, seeded and json_schema outputs equal no speculation's.
    The bit-identity itself is tests/kernels/test_cpu_decode_q8.py's."""
    from sgl.runtime.engine import Engine

    seeded = {"max_new_tokens": 48, "temperature": 0.6, "top_p": 0.95, "sampling_seed": 7}  # copies: drafts match
    picks = [(COPY_PROMPT, GREEDY), (COPY_PROMPT, seeded), (PERSON_PROMPT, SCHEMA)]
    outs = {}
    for name, kw in (("none", {}), ("ngram", dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=7, **ALWAYS))):
        eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                     cpu_act_quant=act, **kw)
        try:
            outs[name] = [eng.generate(p, sp) for p, sp in picks]
            eng.wait_idle()
            eng.check_integrity()
        finally:
            eng.shutdown()
    for o, b, (_, sp) in zip(outs["ngram"], outs["none"], picks):
        assert o["output_ids"] == b["output_ids"], sp
    assert [o["meta_info"].get("spec_verify_ct", 0) > 0 for o in outs["ngram"]] == [True, True, True], \
        [o["meta_info"] for o in outs["ngram"]]
    jsonschema.validate(json.loads(outs["ngram"][-1]["text"]), PERSON)


def test_ngram_constrained_batch_valid(engine) -> None:
    """A batch of sampled json_schema requests (speculation on for each row, masks along the drafts)."""
    params = [dict(SCHEMA, temperature=1.0, sampling_seed=s) for s in range(4)]
    outs = engine.generate([PERSON_PROMPT] * len(params), params)
    for o in outs:
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
        jsonschema.validate(json.loads(o["text"]), PERSON)


def test_draft_model_default_as_its_own_draft(baseline) -> None:
    """DRAFT with the default model drafting for itself: greedy outputs identical to no speculation,
    and (same weights, greedy) nearly every draft accepted."""
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                 speculative_algorithm="DRAFT", speculative_draft_model_path="default",
                 speculative_num_draft_tokens=3, **ALWAYS, **EXACT)
    try:
        prompts, params = _requests()
        picks = [0, len(PROMPTS) - 1, len(prompts) - 1]  # an oracle prompt, the copy prompt, json_schema
        for i in picks:
            out = eng.generate(prompts[i], params[i])
            assert out["output_ids"] == baseline[i]["output_ids"], params[i]
        stats = eng.get_server_info()
        assert stats["spec_verify_ct"] > 0 and stats["spec_accept_rate"] > 0.8, stats
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kw", [
    dict(speculative_algorithm="MEDUSA"),  # the shipped self-distilled heads, a static tree
    dict(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=3, speculative_ngram_capacity=4096),
], ids=["medusa", "ngram_tree"])
def test_tree_drafts_identical_to_no_speculation(baseline, kw: dict) -> None:
    """Token trees on the default model (tree attention mask, path acceptance, path slots kept): greedy
    and json_schema outputs identical to no speculation, the constrained one valid. (Seeded identity under
    trees: the tiny-model tests, and test_grammar_drafts_e2e.py on the default model.)"""
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                 speculative_num_draft_tokens=6, **kw, **ALWAYS, **EXACT)
    try:
        prompts, params = _requests()
        picks = [1, len(PROMPTS) - 1, len(prompts) - 1]  # haiku, copy, json_schema
        outs = [eng.generate(prompts[i], params[i]) for i in picks]
        for i, out in zip(picks, outs):
            assert out["output_ids"] == baseline[i]["output_ids"], params[i]
        jsonschema.validate(json.loads(outs[-1]["text"]), PERSON)
        stats = eng.get_server_info()
        assert stats["spec_verify_ct"] > 0, stats  # trees ran (MEDUSA's acceptance: the benchmark's accept lengths)
        assert stats["spec_accepted_tokens"] > 0, stats  # the copy prompt's trees accept; MEDUSA's heads guess some
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_ngram_corpus_drafts_where_the_request_has_no_match(baseline) -> None:
    """`--speculative-ngram-corpus default` (the model's own answers to held-out prompts, a CORPUS lane after
    NGRAM's): a chat answer, which repeats little of its own text, gets many more accepted drafts with it; outputs
    identical to no speculation, the constrained one valid."""
    from sgl.runtime.engine import Engine

    chat = "<|im_start|>user\nWhat should a pilot know about sleep?<|im_end|>\n<|im_start|>assistant\n"
    greedy = {"max_new_tokens": 64, "temperature": 0}
    plain = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False, **EXACT)
    try:
        expected = plain.generate(chat, greedy)["output_ids"]
    finally:
        plain.shutdown()
    prompts, params = _requests()
    accepted = {}
    for corpus in (None, "default"):
        eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                     speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=3,
                     speculative_ngram_corpus=corpus, **ALWAYS, **EXACT)
        try:
            out = eng.generate(chat, greedy)
            assert out["output_ids"] == expected
            schema = eng.generate(prompts[-1], params[-1])
            assert schema["output_ids"] == baseline[-1]["output_ids"]
            jsonschema.validate(json.loads(schema["text"]), PERSON)
            meta = out["meta_info"]
            accepted[corpus] = round(meta.get("spec_verify_ct", 0) * (meta.get("spec_accept_length", 1.0) - 1))
            lanes = eng.get_server_info()["spec_per_drafter"]
            assert list(lanes) == ["PREDICTION"] + (["NGRAM", "CORPUS"] if corpus else ["NGRAM"]), lanes
            eng.wait_idle()
            eng.check_integrity()
        finally:
            eng.shutdown()
    assert accepted["default"] > 2 * accepted[None] + 5, accepted


def test_the_corpus_command_writes_the_models_answers(tmp_path) -> None:
    """`python -m sgl.runtime.speculative.ngram_corpus` at a tiny size: each line is a prompt followed by the default
    model's greedy answer (the constrained one valid JSON), and the file loads as the CORPUS lane reads it."""
    from sgl.runtime.speculative.distill_data import DistillSpec
    from sgl.runtime.speculative.ngram_corpus import CorpusDrafter, main, read_texts
    from sgl.runtime.tokenizer import Tokenizer

    out = tmp_path / "corpus.jsonl.gz"
    assert main(["--out", str(out), "--num-chat", "2", "--num-extraction", "1", "--max-new-tokens", "48",
                 "--threads", "1"]) == 0
    texts = read_texts(out)
    prompts = DistillSpec(num_chat=2, num_extraction=1, max_new_tokens=48).prompts()
    assert len(texts) == len(prompts) == 4
    for text, (prompt, _) in zip(texts, prompts):
        assert text.startswith(prompt) and len(text) > len(prompt)
    json.loads(texts[-1][len(prompts[-1][0]):])  # the json_schema answer
    tok = Tokenizer.load("default")
    drafter = CorpusDrafter(tok.encode_batch(texts), 2, 4)
    assert drafter.index.num_tokens == sum(len(ids) for ids in tok.encode_batch(texts))
