"""run_batch (with the constant prefix prefilled once) and tracing into IR."""

from __future__ import annotations

import pytest

import sgl
from sgl.tracer import TracingError

pytestmark = pytest.mark.timeout(30)


@sgl.function
def extract(s, doc):
    s += sgl.system("Extract the name.")
    s += sgl.user("Document: " + doc)
    s += sgl.assistant(sgl.gen("name", max_tokens=6))


def test_run_batch_keeps_order_and_prefills_prefix_once(fake, capsys):
    docs = [f"doc {i}" for i in range(6)]
    states = extract.run_batch([{"doc": d} for d in docs], temperature=0, progress_bar=True, num_threads=3)
    assert [st.messages()[1]["content"] for st in states] == [f"Document: {d}" for d in docs]
    prefix = "<|im_start|>system\nExtract the name.<|im_end|>\n<|im_start|>user\nDocument: "
    first = fake.requests[0]
    assert first["text"] == prefix and first["sampling_params"] == {"max_new_tokens": 0}
    assert sum(1 for r in fake.requests if r["sampling_params"] == {"max_new_tokens": 0}) == 1
    gens = [r for r in fake.requests if r["sampling_params"].get("max_new_tokens") == 6]
    assert len(gens) == 6 and all(r["sampling_params"]["temperature"] == 0 for r in gens)
    assert "6/6" in capsys.readouterr().err  # the tqdm bar


def test_run_batch_positional_and_errors(fake):
    assert [st.messages()[1]["content"] for st in extract.run_batch([("a",), ("b",)])] == ["Document: a", "Document: b"]
    fake.fail_on = "Document: bad"
    items = [{"doc": "ok"}, {"doc": "bad"}, {"doc": "fine"}]
    from sgl.runtime.protocol import RequestError

    with pytest.raises(RequestError):
        extract.run_batch(items)
    out = extract.run_batch(items, return_exceptions=True)
    assert isinstance(out[1], RequestError) and out[0]["name"] and out[2]["name"]
    with pytest.raises(TypeError):
        extract.run_batch([{"nope": 1}])


EXPECTED_TRACE = """\
program agent(task)
    0* SglRoleBegin('system')
    1* SglConstantText('You plan.')
    2* SglRoleEnd('system')
    3* SglRoleBegin('user')
    4* SglConstantText('Task: ')
    5  SglArgument('task')
    6  SglRoleEnd('user')
    7  SglRoleBegin('assistant')
    8  SglGen('plan', max_new_tokens=16, stop='\\n')
    9  SglRoleEnd('assistant')
   10  SglFork(2)
         [0] SglConstantText('Step 1 of ')
         [0] SglVariable('plan', fork=0)
         [0] SglConstantText(': ')
         [0] SglGen('step', max_new_tokens=8)
         [1] SglConstantText('Step 2 of ')
         [1] SglVariable('plan', fork=1)
         [1] SglConstantText(': ')
         [1] SglGen('step', max_new_tokens=8)
   11  SglJoin('gather_variable')
   12  SglSelect('verdict', choices=[' good', ' bad'], method=token_length_normalized)
constant prefix: nodes 0-4 (prefilled once per batch)"""


@sgl.function
def agent(s, task):
    s += sgl.system("You plan.")
    s += sgl.user(f"Task: {task}")
    s += sgl.assistant(sgl.gen("plan", max_tokens=16, stop="\n"))
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Step {i + 1} of {f['plan']}: " + sgl.gen("step", max_tokens=8)
    forks.join()
    s += sgl.select("verdict", choices=[" good", " bad"])


def test_trace_is_stable_and_finds_the_prefix():
    tr = agent.trace()
    assert str(tr) == EXPECTED_TRACE
    assert str(agent.trace()) == EXPECTED_TRACE  # no global counters: tracing twice prints the same
    assert [type(n).__name__ for n in tr.gens()] == ["SglGen", "SglGen", "SglGen", "SglSelect"]


def test_trace_with_concrete_argument_extends_the_prefix():
    tr = agent.trace(task="write")
    # 'Task: write' is constant now, and so are the user turn's end and the assistant turn's start
    assert [repr(n) for n in tr.constant_prefix[4:]] == [
        "SglConstantText('Task: write')", "SglRoleEnd('user')", "SglRoleBegin('assistant')"]


def test_trace_errors_say_how_to_fix():
    @sgl.function
    def computes(s, items):
        for it in items:
            s += it

    with pytest.raises(TracingError, match=r"computes.trace\(arg=...\)"):
        computes.trace()
    assert str(computes.trace(items=["a", "b"])).count("SglConstantText") == 2


def test_constant_prefix_text_uses_the_backend_template(fake):
    assert agent.constant_prefix_text(fake) == "<|im_start|>system\nYou plan.<|im_end|>\n<|im_start|>user\nTask: "
    assert agent.cache(fake) == agent.constant_prefix_text(fake)
    assert fake.requests[-1]["sampling_params"] == {"max_new_tokens": 0}
