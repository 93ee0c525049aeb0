"""SGLang's own frontend (the `sglang==0.5.23` wheel, installed with --no-deps) as a client of our server.

`import sglang` runs sglang/__init__.py, which imports SGLang's GPU runtime (torch, triton, ...). The
frontend itself (`sglang.lang`) needs none of that, so we register a bare `sglang` package pointing
at the installed folder and import `sglang.lang` from it: the frontend code runs unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Iterator

import pytest

from tests.e2e.server_helpers import ServerHandle, running_server

pytestmark = pytest.mark.timeout(300)


def import_sglang_frontend() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.submodule_search_locations, \
        "sglang is not installed: pip install --no-deps sglang==0.5.23 (see the Makefile's setup)"
    if "sglang.lang.api" not in sys.modules:
        pkg = types.ModuleType("sglang")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules.setdefault("sglang", pkg)
    from sglang.lang import api
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    return types.SimpleNamespace(api=api, RuntimeEndpoint=RuntimeEndpoint)


@pytest.fixture(scope="module")
def sgl_frontend() -> types.SimpleNamespace:
    return import_sglang_frontend()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with running_server() as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


@pytest.fixture(scope="module")
def backend(sgl_frontend: Any, server: ServerHandle) -> Any:
    be = sgl_frontend.RuntimeEndpoint(server.url)
    sgl_frontend.api.set_default_backend(be)
    return be


def test_runtime_endpoint_connects(sgl_frontend: Any, backend: Any) -> None:
    assert backend.get_model_name().endswith(".gguf")
    info = backend.get_server_info()
    assert "internal_states" in info
    backend.flush_cache()


def test_program_gen_select_fork_join(sgl_frontend: Any, backend: Any) -> None:
    sgl = sgl_frontend.api

    @sgl.function
    def program(s: Any, city: str) -> None:
        s += f"Q: Which country is {city} in?\nA:" + sgl.gen("country", max_tokens=12, stop="\n", temperature=0)
        s += "\nQ: Is it in Europe? Answer yes or no.\nA: " + sgl.select("europe", choices=["yes", "no"])
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"\nFact {i + 1} about {city}:" + sgl.gen("fact", max_tokens=8, stop="\n", temperature=0)
        forks.join()
        s += "\nNumber of letters in the name: " + sgl.gen("letters", max_tokens=4, dtype=int, temperature=0)

    state = program.run(city="Paris")
    assert state.error() is None, state.error()
    assert "France" in state["country"] and "\n" not in state["country"]
    assert state["europe"] in ("yes", "no")
    assert isinstance(state["fact"], list) and len(state["fact"]) == 2
    assert all(isinstance(f, str) and "\n" not in f for f in state["fact"])
    # dtype=int sends SGLang's integer regex: the answer must parse as an int
    int(state["letters"].strip())
    assert state.text().startswith("Q: Which country is Paris in?\nA:")


def test_select_prefers_the_likely_answer(sgl_frontend: Any, backend: Any) -> None:
    sgl = sgl_frontend.api

    @sgl.function
    def pick(s: Any) -> None:
        s += "The capital of France is" + sgl.select("city", choices=[" Paris", " Banana", " Xylophone"])

    state = pick.run()
    assert state.error() is None, state.error()
    assert state["city"] == " Paris"


def test_streaming_gen(sgl_frontend: Any, backend: Any) -> None:
    sgl = sgl_frontend.api

    @sgl.function
    def count(s: Any) -> None:
        s += "Count: 1, 2, 3," + sgl.gen("rest", max_tokens=8, temperature=0)

    state = count.run(stream=True)
    pieces = list(state.text_iter(var_name="rest"))
    assert "".join(pieces) == state["rest"] and state["rest"]


def test_run_batch_and_chat_roles(sgl_frontend: Any, backend: Any) -> None:
    sgl = sgl_frontend.api

    @sgl.function
    def chat(s: Any, question: str) -> None:
        s += sgl.system("You answer briefly.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))

    states = chat.run_batch([{"question": "What is 2+2?"}, {"question": "Name a color."}], num_threads=2)
    assert len(states) == 2
    for st in states:
        assert st.error() is None, st.error()
        assert isinstance(st["answer"], str)
