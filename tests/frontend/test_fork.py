"""fork/join: shared text, parallel branches, variable gathering, the shared prefix prefilled once."""

from __future__ import annotations

import time

import pytest

import sgl

pytestmark = pytest.mark.timeout(30)


@sgl.function
def tips(s, n):
    s += "Tips:\n"
    forks = s.fork(n)
    forks += lambda i: f"{i + 1}." + sgl.gen("tip", max_tokens=5) + sgl.gen("extra", max_tokens=2)
    forks.join()
    s += "Done."


def test_join_gathers_in_fork_order(fake):
    st = tips.run(n=3)
    assert len(st["tip"]) == 3 and len(st["extra"]) == 3
    # each fork's prompt differs in length ("1." vs "2." same length, so compare via requests)
    by_prompt = {r["text"]: r for r in fake.requests if r["sampling_params"].get("max_new_tokens") == 5}
    assert sorted(t[len("Tips:\n"):][:2] for t in by_prompt) == ["1.", "2.", "3."]
    assert st.text() == "Tips:\nDone."
    assert len(st.get_meta_info("tip")) == 3


def test_fork_prefills_the_shared_text_before_the_branches(fake):
    tips.run(n=2)
    first = fake.requests[0]
    assert first["text"] == "Tips:\n" and first["sampling_params"] == {"max_new_tokens": 0}
    branches = [r for r in fake.requests[1:] if r["sampling_params"].get("max_new_tokens") == 5]
    assert all(r["_t"] >= first["_t"] for r in branches)
    # the fake's prefix cache saw the shared text, so each branch's prompt reuses it
    assert fake.stats.cached_tokens >= 2 * len("Tips:\n") - 2


def test_single_fork_does_not_prefill(fake):
    tips.run(n=1)
    assert all(r["sampling_params"].get("max_new_tokens") != 0 for r in fake.requests)


def test_forks_run_in_parallel(fake):
    fake.latency = 0.2
    t0 = time.monotonic()
    tips.run(n=4)
    # prefill + 2 sequential gens per fork: ~0.6 s when the 4 forks overlap, ~1.8 s if they did not
    assert time.monotonic() - t0 < 1.2


def test_fork_variants_and_access(fake):
    @sgl.function
    def prog(s):
        s += "Q:"
        forks = s.fork(2)
        forks += [" a", " b"]
        for f in forks:
            f += sgl.gen("x", max_tokens=3)
        s += "A=" + forks[0]["x"] + " B=" + forks[1]["x"]
        forks.join("concate_and_append")

    st = prog.run()
    a, b = [r for r in fake.requests if r["sampling_params"].get("max_new_tokens") == 3]
    assert {a["text"], b["text"]} == {"Q: a", "Q: b"}
    assert st.text().startswith("Q:A=")
    assert st.text().endswith(" a" + st.stream_executor.children[0].variables["x"] + " b"
                              + st.stream_executor.children[1].variables["x"])


def test_copy_and_error_in_a_fork(fake):
    fake.fail_on = "bad"

    @sgl.function
    def prog(s):
        s += "x"
        forks = s.fork(2)
        forks += lambda i: ("ok" if i == 0 else "bad") + sgl.gen("v", max_tokens=2)
        forks.join()

    from sgl.runtime.protocol import RequestError

    with pytest.raises(RequestError):
        prog.run()

    @sgl.function
    def copier(s):
        s += "base"
        with s.copy() as c:
            c += sgl.gen("side", max_tokens=2)
        s += "!"

    st = copier.run()
    assert st.text() == "base!" and len(st["side"]) == 1


def test_appending_to_a_joined_fork_fails(fake):
    @sgl.function
    def prog(s):
        forks = s.fork(2)
        forks.join()
        forks[0] += "late"

    with pytest.raises(sgl.ProgramError, match="joined"):
        prog.run()
