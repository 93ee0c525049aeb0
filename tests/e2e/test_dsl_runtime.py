"""The DSL end to end on the in-process engine (`sgl.Runtime`), default model, greedy decoding."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

import sgl
from sgl.runtime.protocol import RequestError

sys.path.insert(0, os.path.dirname(__file__))
from dsl_programs import (DOCS, GREEDY, chat, chosen_by_logprobs, constrained, extract_name,  # noqa: E402
                          shared_runtime, tips, yes_no)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def rt() -> Iterator["sgl.Runtime"]:
    runtime = shared_runtime()
    yield runtime
    runtime.engine.wait_idle()
    runtime.engine.check_integrity()  # no KV leaked by anything the DSL did


def test_chat_prompt_is_the_models_own_template(rt):
    st = chat.run(question="What is the capital of France?", backend=rt, **GREEDY)
    tok = rt.engine.tokenizer
    prompt = tok.apply_chat_template(st.messages()[:2], add_generation_prompt=True)
    assert st.text() == tok.apply_chat_template(st.messages(), add_generation_prompt=False)
    direct = rt.engine.generate(prompt, {"max_new_tokens": 16, "temperature": 0, "stop": ["<|im_end|>"]})
    assert st["answer"] == direct["text"] and st["answer"].strip()
    assert st.get_meta_info("answer")["completion_tokens"] == direct["meta_info"]["completion_tokens"]


def test_select_picks_what_the_logprobs_say(rt):
    choices = ["yes", "no", "maybe"]
    st = yes_no.run(question="Is the sky blue?", backend=rt)
    prompt = st.text()[: -len(st["verdict"] + "<|im_end|>\n")]
    def direct(body):  # straight to the engine, bypassing the DSL
        return rt.engine.generate(body["text"], body["sampling_params"], return_logprob=True,
                                  logprob_start_len=body["logprob_start_len"])

    expected, scores = chosen_by_logprobs(direct, rt.engine.tokenizer.encode, prompt, choices)
    assert st["verdict"] == expected
    # 5e-3: select first prefills the bare prompt, whose final token runs as a decode row (q16 activations,
    # fused_decode.split_decode_tails) and is cached so; the oracle's requests may recompute it in a prefill
    # chunk (fp32): the scores of the same tokens then differ by up to ~2e-3 at logprob -13
    assert st.get_meta_info("verdict")["normalized_prompt_logprobs"] == pytest.approx(scores, abs=5e-3)


@pytest.mark.parametrize("method", ["greedy_token_selection", "unconditional_likelihood_normalized"])
def test_other_choice_methods_run(rt, method):
    @sgl.function
    def prog(s):
        s += "The opposite of hot is" + sgl.select("w", choices=[" cold", " warm", " blue"], choices_method=method)

    st = prog.run(backend=rt)
    assert st["w"] in (" cold", " warm", " blue") and st.get_meta_info("w")["input_token_logprobs"]


def test_constrained_gen(rt):
    st = constrained.run(backend=rt, **GREEDY)
    assert isinstance(st.parsed("number"), int)
    person = st.parsed("person")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_fork_join_shares_the_prefix(rt):
    st = tips.run(topic="sleep", backend=rt, **GREEDY)
    assert len(st["tip"]) == 3 and all(isinstance(t, str) for t in st["tip"])
    metas = st.get_meta_info("tip")
    # the parent's text was prefilled once at the fork: every branch finds it in the radix cache
    assert all(m["cached_tokens"] >= m["prompt_tokens"] - 8 for m in metas), metas
    assert st["end"] is not None and st.messages()[-1]["role"] == "assistant"


def test_stream_yields_growing_text_equal_to_the_batch_result(rt):
    ref = chat.run(question="Name a fruit.", backend=rt, **GREEDY)
    st = chat.run(question="Name a fruit.", backend=rt, stream=True, **GREEDY)
    pieces = list(st.text_iter("answer"))
    assert len(pieces) > 1 and "".join(pieces) == ref["answer"] == st["answer"]


def test_run_batch_matches_single_runs_and_hits_the_cache(rt):
    rt.flush_cache()
    rt.reset_stats()
    states = extract_name.run_batch([{"doc": d} for d in DOCS], backend=rt, **GREEDY)
    stats = rt.reset_stats()
    assert stats.cached_tokens > 0  # the system-prompt prefix, prefilled once before the batch
    single = extract_name.run(doc=DOCS[2], backend=rt, **GREEDY)
    assert states[2]["name"] == single["name"]
    assert [st.messages()[1]["content"] for st in states] == DOCS


def test_engine_errors_raise_in_the_program(rt):
    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("v", regex="(unclosed", max_tokens=4)

    with pytest.raises((RequestError, sgl.BackendError)):
        bad.run(backend=rt)

    @sgl.function
    def too_long(s):
        s += "x" + sgl.gen("v", max_tokens=10**6)  # past the context length: rejected before it runs

    with pytest.raises(RequestError, match="context|max_new_tokens"):
        too_long.run(backend=rt)
