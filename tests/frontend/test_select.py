"""select scores every choice in one batched request, with token healing, by SGLang's three methods.

Expected decisions are computed here directly from the fake model's tokenizer and logprob function,
independently of the backend's windowing logic.
"""

from __future__ import annotations

import pytest

import sgl
from fake_backend import logprob, tokenize

pytestmark = pytest.mark.timeout(30)


def choice_tokens(prompt: str, choice: str) -> tuple[list[int], int]:
    """(token ids of prompt + choice, index where they stop matching the prompt's own tokens)."""
    full, p = tokenize(prompt + choice), tokenize(prompt)
    k = 0
    while k < min(len(full), len(p)) and full[k] == p[k]:
        k += 1
    return full, k


def expected_scores(prompt: str, choices: list[str]) -> list[float]:
    out = []
    for c in choices:
        full, k = choice_tokens(prompt, c)
        lps = [logprob(full[j - 1], full[j]) for j in range(k, len(full))]
        out.append(sum(lps) / len(lps))
    return out


def run_select(prompt: str, choices: list[str], method=sgl.token_length_normalized):
    @sgl.function
    def prog(s):
        s += prompt
        s += sgl.select("c", choices=choices, choices_method=method)

    return prog.run()


@pytest.mark.parametrize("prompt,choices", [
    ("The answer is", [" yes", " no", " maybe so"]),
    ("The answer is ", ["yes", "no", "maybe so"]),  # trailing space: " yes" is one token (healing)
    ("Pets: the", [" cat", " dog", " fish", " catfish"]),
])
def test_token_length_normalized_matches_direct_computation(fake, prompt, choices):
    st = run_select(prompt, choices)
    scores = expected_scores(prompt, choices)
    assert st["c"] == choices[scores.index(max(scores))]
    assert st.get_meta_info("c")["normalized_prompt_logprobs"] == pytest.approx(scores)
    assert st.text() == prompt + st["c"]


def test_healing_scores_only_the_choice_tokens(fake):
    st = run_select("The answer is ", ["yes", "no"])
    toks = st.get_meta_info("c")["input_token_logprobs"]
    assert [[t[2] for t in c] for c in toks] == [[" yes"], [" no"]]


def test_one_prefill_then_one_batch(fake):
    run_select("Question: the", [" cat", " dog", " yes"])
    assert fake.batches == [1, 4]  # prefill of the prompt, then [prompt] + 3 choices in one request
    pre, *scoring = fake.requests
    assert pre["sampling_params"] == {"max_new_tokens": 0}
    p = len(tokenize("Question: the"))
    assert all(r["logprob_start_len"] == p - 2 and r["return_logprob"] for r in scoring)
    assert all(r["sampling_params"]["max_new_tokens"] == 0 for r in scoring)


def test_greedy_token_selection(fake):
    prompt, choices = "Go:", ["ab", "ba", "ca"]
    st = run_select(prompt, choices, sgl.greedy_token_selection)
    first = [logprob(tokenize(prompt)[-1], tokenize(prompt + c)[len(tokenize(prompt))]) for c in choices]
    assert st["c"] == choices[first.index(max(first))]
    assert "greedy_logprob_matrix" in st.get_meta_info("c")


def test_unconditional_likelihood_normalized(fake):
    prompt, choices = "Pets: the", [" cat", " dog", " fish"]
    st = run_select(prompt, choices, "unconditional_likelihood_normalized")
    scores = []
    for c in choices:
        full, k = choice_tokens(prompt, c)
        diffs = []
        for j in range(k, len(full)):
            cond = logprob(full[j - 1], full[j])
            # unconditional: the same token after only the one token preceding the choice
            uncond = logprob(full[j - 1], full[j]) if j > k else logprob(full[k - 1], full[k])
            diffs.append(cond - uncond)
        scores.append(sum(diffs) / len(diffs))
    meta = st.get_meta_info("c")
    assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx(scores)
    assert st["c"] == choices[scores.index(max(scores))]
    assert fake.batches[-1] == 3  # the unconditional pass is one more batched request


def test_gen_choices_and_temperature(fake):
    @sgl.function
    def prog(s):
        s += "Pick:" + sgl.gen("c", choices=[" cat", " dog"])
        s += sgl.select("d", choices=[" yes", " no"], temperature=5.0)

    st = prog.run()
    assert st["c"] in (" cat", " dog") and st["d"] in (" yes", " no")


def test_select_errors(fake):
    with pytest.raises(ValueError, match="non-empty"):
        sgl.select("c", choices=[])
    with pytest.raises(ValueError, match="choices_method"):
        run_select("x", ["a"], "best")

    @sgl.function
    def empty(s):
        s += sgl.select("c", choices=["a", "b"])

    with pytest.raises(ValueError, match="no text"):
        empty.run()
