"""Running programs: text, variables, roles, defaults, parsing, errors, streaming (fake backend)."""

from __future__ import annotations

import asyncio

import pydantic
import pytest

import sgl
from fake_backend import SCRIPT
from sgl.runtime.protocol import RequestError

pytestmark = pytest.mark.timeout(30)


@sgl.function
def chat(s, question):
    s += sgl.system("Be brief.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=10))


def test_text_variables_and_messages(fake):
    st = chat.run(question="Hi?", temperature=0)
    prefix = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    expected_answer = (SCRIPT[len(prefix) % len(SCRIPT):] + SCRIPT)[:10]
    assert st["answer"] == expected_answer
    assert st.text() == prefix + expected_answer + "<|im_end|>\n"
    assert st.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                             {"role": "assistant", "content": expected_answer}]
    [req] = fake.requests
    assert req["text"] == prefix
    # gen's own max_tokens, run's temperature, the template's end-of-turn as a stop string
    assert req["sampling_params"] == {"max_new_tokens": 10, "temperature": 0, "stop": ["<|im_end|>"]}
    assert st.get_meta_info("answer")["finish_reason"] == {"type": "length", "length": 10}


def test_role_context_managers_and_begin_end(fake):
    @sgl.function
    def prog(s):
        with s.user():
            s += "Hello"
        s += sgl.assistant_begin()
        s += sgl.gen("a", max_tokens=3)
        s += sgl.assistant_end()

    st = prog.run()
    assert [m["role"] for m in st.messages()] == ["user", "assistant"]
    # the template's default system prompt precedes a first user turn
    assert st.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello")


def test_var_scope_and_set_var(fake):
    @sgl.function
    def prog(s):
        with s.var_scope("span"):
            s += "abc" + sgl.gen("g", max_tokens=2)
        s["manual"] = 5

    st = prog.run()
    assert st["span"] == "abc" + st["g"]
    assert st["manual"] == 5 and "span" in st


def test_parsed_values(fake):
    class Person(pydantic.BaseModel):
        name: str
        age: int

    @sgl.function
    def prog(s):
        s += sgl.gen_int("n") + sgl.gen("p", json_schema=Person) + sgl.gen("d", json_schema={"type": "object"})

    st = prog.run()
    assert st["n"] == "42" and st.parsed("n") == 42
    assert st.parsed("p") == Person(name="Ada", age=36)
    assert st.parsed("d") == {"name": "Ada", "age": 36}
    with pytest.raises(sgl.ProgramError, match="nothing to parse"):
        chat.run(question="q").parsed("answer")


def test_gen_n_returns_a_list(fake):
    @sgl.function
    def prog(s):
        s += "x" + sgl.gen("v", max_tokens=4, n=3, temperature=0.8)

    st = prog.run()
    assert isinstance(st["v"], list) and len(st["v"]) == 3
    assert st.text() == "x" + st["v"][0]


def test_program_error_raises_in_caller(fake):
    @sgl.function
    def prog(s):
        s += "x"
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        prog.run()


def test_backend_error_raises_with_the_program_line(fake):
    fake.fail_on = "FAIL"

    @sgl.function
    def prog(s):
        s += "FAIL " + sgl.gen("a", max_tokens=3)
        s += sgl.gen("b", max_tokens=3)

    with pytest.raises(RequestError, match="refusing") as info:
        prog.run()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "SglGen('a'" in notes and "test_run.py" in notes
    assert [r["text"] for r in fake.requests] == ["FAIL "]  # b never ran


def test_reading_a_variable_of_a_failed_program_raises(fake):
    fake.fail_on = "FAIL"

    @sgl.function
    def prog(s):
        s += "FAIL" + sgl.gen("a", max_tokens=3)
        return s["a"]

    with pytest.raises(RequestError):
        prog.run()


def test_invalid_merged_params_raise(fake):
    with pytest.raises(RequestError, match="temperature"):
        chat.run(question="q", temperature=-1)


def test_unknown_variable_and_nested_roles(fake):
    st = chat.run(question="q")
    with pytest.raises(KeyError, match="no variable 'nope'"):
        st["nope"]

    @sgl.function
    def nested(s):
        s += sgl.user_begin() + sgl.assistant_begin()

    with pytest.raises(sgl.ProgramError, match="cannot nest"):
        nested.run()


def test_missing_argument_is_a_type_error(fake):
    with pytest.raises(TypeError, match="question"):
        chat.run()


def test_bind(fake):
    st = chat.bind(question="Bound?").run(temperature=0)
    assert st.messages()[1]["content"] == "Bound?"
    with pytest.raises(TypeError, match="unknown"):
        chat.bind(nope=1)


def test_stream_text_iter_grows_to_the_final_text(fake):
    fake.stream_delay = 0.001
    st = chat.run(question="Hi?", stream=True, temperature=0)
    pieces = list(st.text_iter())
    assert len(pieces) > 3
    assert "".join(pieces) == st.text()
    st2 = chat.run(question="Hi?", stream=True, temperature=0)
    assert "".join(st2.text_iter("answer")) == st2["answer"] == st["answer"]


def test_stream_async_iter(fake):
    fake.stream_delay = 0.002

    async def collect():
        st = chat.run(question="Hi?", stream=True)
        return [p async for p in st.text_async_iter("answer")], st

    pieces, st = asyncio.run(collect())
    assert "".join(pieces) == st["answer"] and len(pieces) > 1


def test_stream_error_raises_from_the_iterator(fake):
    fake.fail_on = "Hi?"
    st = chat.run(question="Hi?", stream=True)
    with pytest.raises(RequestError):
        list(st.text_iter())


def test_no_backend_is_a_clear_error():
    from sgl.backends import base

    old = base._default_backend
    base._default_backend = None
    try:
        with pytest.raises(RuntimeError, match="set_default_backend"):
            chat.run(question="q")
    finally:
        base._default_backend = old
