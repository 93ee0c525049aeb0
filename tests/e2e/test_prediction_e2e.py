"""Predicted outputs (`prediction`, runtime/speculative/prediction.py) on the default model: the output is the one
without a prediction (greedy token for token, seeded sampling too, constrained outputs valid), the prediction's
tokens are drafted and accepted where the output follows it, an edit in the middle costs only what it changes, and
the OpenAI SDK's `prediction` reaches the engine and comes back as `usage.completion_tokens_details`. KV integrity
after every test (conftest)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server

pytestmark = pytest.mark.timeout(600)

_DATA = Path(__file__).resolve().parents[2] / "examples/data"
_WORKLOAD = json.loads((_DATA / "person_extraction.json").read_text())
PERSON = _WORKLOAD["schema"]
COPY = ("<|im_start|>user\nList every person in this text with their city and year.\n\n"
        + (_DATA / "people.txt").read_text()[:500] + "<|im_end|>\n<|im_start|>assistant\n")
HAIKU = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
GREEDY = {"max_new_tokens": 64, "temperature": 0}
REQUESTS = [  # (prompt, sampling params)
    (HAIKU, GREEDY),
    (COPY, GREEDY),
    (_WORKLOAD["prompt"], {"json_schema": json.dumps(PERSON), "max_new_tokens": 128, "temperature": 0}),
    (COPY, {"max_new_tokens": 48, "temperature": 0.9, "top_p": 0.95, "sampling_seed": 7}),
]
EXACT = {"cpu_act_quant": "q16"}  # verify rows give a token the bits of its decode step (test_speculative_e2e.py)


@pytest.fixture(scope="module", autouse=True)
def _restore_act_quant() -> Iterator[None]:
    from sgl.kernels import cpu

    saved = cpu.get_act_quant()
    yield
    cpu.set_act_quant(saved)  # process-wide (Engine sets it): later modules get the default back


@pytest.fixture(scope="module")
def plain() -> Any:
    """An engine without speculation: the reference outputs (and a prediction it must ignore)."""
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192, show_progress=False, **EXACT)
    yield eng
    eng.shutdown()


def fresh(eng: Any, prompt: str, sp: dict) -> dict:
    """`prompt` on an empty cache: a cached prefix computes the prompt's K/V in other steps, whose last bits can
    flip a sampled token (and both engines must see the same)."""
    assert eng.flush_cache()
    return eng.generate(prompt, sp)


@pytest.fixture(scope="module")
def baseline(plain: Any) -> list[dict]:
    return [fresh(plain, p, sp) for p, sp in REQUESTS]


@pytest.fixture(scope="module")
def engine() -> Any:
    """NGRAM with its adaptive rule (the PREDICTION lane goes first): the rule decides what to verify."""
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192, show_progress=False,
                 speculative_algorithm="NGRAM", speculative_num_draft_tokens=8, **EXACT)
    yield eng
    eng.shutdown()


def test_a_right_prediction_is_accepted_and_changes_nothing(engine: Any, baseline: list[dict]) -> None:
    for (prompt, sp), base in zip(REQUESTS, baseline):
        out = fresh(engine, prompt, dict(sp, prediction=base["text"]))
        meta = out["meta_info"]
        assert out["output_ids"] == base["output_ids"], sp
        assert meta["finish_reason"] == base["meta_info"]["finish_reason"]
        n = meta["completion_tokens"]
        # most of the output came from the prediction, in far fewer steps than tokens. Under json_schema the grammar
        # forces ~a third of the tokens (jump-forward, not drafts), and the prediction's text tokenizes its `":"`
        # otherwise than the constrained output does (the lane re-synchronizes after each)
        share = 0.35 if "json_schema" in sp else 0.6
        assert meta["accepted_prediction_tokens"] >= share * n, (sp, meta)
        assert meta["spec_verify_ct"] <= n / 3, (sp, meta)
        by_ids = fresh(engine, prompt, dict(sp, prediction=base["output_ids"]))  # token ids: no re-tokenizing
        assert by_ids["output_ids"] == base["output_ids"], sp
        assert by_ids["meta_info"]["accepted_prediction_tokens"] >= share * n, (sp, by_ids["meta_info"])
    jsonschema.validate(json.loads(baseline[2]["text"]), PERSON)
    lanes = engine.get_server_info()["spec_per_drafter"]
    assert lanes["PREDICTION"]["accept_rate"] > 0.8


def test_an_edited_prediction_resumes_after_the_edit(engine: Any, baseline: list[dict]) -> None:
    """The prediction differs from the output in its middle: the output is unchanged, the lane stops drafting where
    they part and drafts again from the text after the change."""
    base = baseline[1]
    text = base["text"]
    cut = len(text) // 2
    edited = text[:cut] + " something else entirely, which the model will not write; " + text[cut + 12:]
    out = fresh(engine, COPY, dict(GREEDY, prediction=edited))
    meta = out["meta_info"]
    assert out["output_ids"] == base["output_ids"]
    assert meta["rejected_prediction_tokens"] > 0
    tail = engine.tokenizer.encode(text[cut + 12:], add_special_tokens=False)
    assert meta["accepted_prediction_tokens"] >= 0.6 * meta["completion_tokens"] - len(tail) / 2  # both halves
    assert meta["accepted_prediction_tokens"] > len(tail) / 2  # the half after the edit drafted too


def test_a_dsl_gen_with_a_prediction(engine: Any) -> None:
    """`sgl.gen(prediction=...)` in a program: the same answer as without it, mostly drafted."""
    import sgl

    @sgl.function
    def haiku(s, prediction):  # noqa: ANN001, ANN202 - a DSL program
        s += sgl.user("Write a haiku about the sea.")
        s += sgl.assistant(sgl.gen("poem", max_tokens=64, temperature=0, prediction=prediction))

    backend = sgl.Runtime(engine=engine)
    assert engine.flush_cache()
    plain = haiku.run(prediction=None, backend=backend)["poem"]
    assert engine.flush_cache()
    state = haiku.run(prediction=plain, backend=backend)
    assert state["poem"] == plain
    meta = state.get_meta_info("poem")
    assert meta["accepted_prediction_tokens"] >= 0.6 * meta["completion_tokens"], meta


def test_a_prediction_needs_no_speculative_algorithm(plain: Any, baseline: list[dict],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An engine started without --speculative-algorithm drafts predictions too: the first request that carries one
    starts a PREDICTION-only rule (the assumed verify cost, corrected by the steps it runs); the others run as
    before."""
    assert plain.scheduler.spec is None
    with caplog.at_level(logging.INFO):
        for (prompt, sp), base in zip(REQUESTS[:2], baseline):
            out = fresh(plain, prompt, dict(sp, prediction=base["text"]))
            assert out["output_ids"] == base["output_ids"]
            meta = out["meta_info"]
            assert meta["accepted_prediction_tokens"] >= 0.5 * meta["completion_tokens"], meta
            assert meta["spec_verify_ct"] <= meta["completion_tokens"] / 3, meta
    assert sum("drafting predictions" in r.getMessage() for r in caplog.records) == 1  # started once
    assert [lane.name for lane in plain.scheduler.spec.lanes] == ["PREDICTION"]
    again = fresh(plain, HAIKU, GREEDY)  # a request without a prediction: no drafts
    assert again["output_ids"] == baseline[0]["output_ids"] and "spec_verify_ct" not in again["meta_info"]


def test_a_batch_verifying_more_than_64_rows_changes_nothing(plain: Any) -> None:
    """8 requests in one batch, each drafting its 8 predicted tokens every step: verify steps of 72 rows, past the
    fused decode rows' 64 (--speculative-max-batch 8), under q8 activations (the crossover benchmark's). Each greedy
    output is the one of the same batch without speculation (the 8 prompts prefilled in one step: alone, a short
    prompt runs as decode rows, other bits); when such a step ran the prefill path, 6 of these 8 differed."""
    from sgl.kernels import cpu
    from sgl.runtime.engine import Engine

    topics = ["rivers", "birds", "metals", "planets", "colors", "trees", "oceans", "fruits"]
    prompts = [f"<|im_start|>user\nName three {t} and say one thing about each.<|im_end|>\n<|im_start|>assistant\n"
               for t in topics]
    sp = {"max_new_tokens": 64, "temperature": 0}
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192, show_progress=False,
                 speculative_algorithm="NGRAM", speculative_num_draft_tokens=8, speculative_max_batch=8,
                 speculative_always_draft=True, cpu_act_quant="q8")
    try:
        assert cpu.get_act_quant() == "q8"  # process-wide: `plain` runs q8 too until the finally
        assert plain.flush_cache()
        want = [o["output_ids"] for o in plain.generate(prompts, [sp] * len(prompts))]
        outs = eng.generate(prompts, [dict(sp, prediction=ids) for ids in want])
        assert [o["output_ids"] for o in outs] == want
        # every row drafted its prediction: most tokens came from it, in long rows
        meta = [o["meta_info"] for o in outs]
        assert sum(m["accepted_prediction_tokens"] for m in meta) >= 0.7 * sum(map(len, want)), meta
        assert max(m["spec_verify_ct"] for m in meta) <= 12, meta
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()
        cpu.set_act_quant(EXACT["cpu_act_quant"])


def test_a_prediction_must_be_a_string(plain: Any) -> None:
    from sgl.runtime.protocol import RequestError, SamplingParams

    with pytest.raises(RequestError, match="sampling_params.prediction must be a string"):
        SamplingParams.from_dict({"prediction": ["not", "a", "string"]})


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with running_server("--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8",
                        "--cpu-act-quant", "q16") as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


def test_openai_sdk_prediction(server: ServerHandle) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages: Any = [{"role": "user", "content": "Write a haiku about the sea."}]
    plain = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0)
    assert plain.usage is not None and plain.usage.completion_tokens_details is None  # no prediction: no details
    text = plain.choices[0].message.content or ""
    for content in (text, [{"type": "text", "text": text[:20]}, {"type": "text", "text": text[20:]}]):
        httpx.post(server.url + "/flush_cache", timeout=60)
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0,
                                           prediction={"type": "content", "content": content})
        assert r.choices[0].message.content == text
        details = r.usage.completion_tokens_details if r.usage is not None else None
        assert details is not None and details.accepted_prediction_tokens is not None
        assert details.accepted_prediction_tokens >= 0.6 * r.usage.completion_tokens
    comp = client.completions.create(model="default", prompt="The capital of France is", max_tokens=16, temperature=0)
    again = client.completions.create(model="default", prompt="The capital of France is", max_tokens=16, temperature=0,
                                      extra_body={"prediction": {"type": "content", "content": comp.choices[0].text}})
    assert again.choices[0].text == comp.choices[0].text
    for bad in ({"type": "file", "content": "x"}, {"type": "content", "content": 5},
                {"type": "content", "content": [{"type": "image_url"}]}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "default", "messages": messages, "max_tokens": 4, "prediction": bad})
        assert r.status_code == 400 and "prediction" in r.json()["error"]["message"], (bad, r.text)
