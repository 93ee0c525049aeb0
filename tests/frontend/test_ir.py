"""IR nodes and expression building."""

from __future__ import annotations

import sgl
from sgl.ir import (SglArgument, SglConstantText, SglExprList, SglGen, SglRoleBegin, SglRoleEnd, SglVariable,
                    split_markers)


def test_concatenation_flattens():
    e = "a" + sgl.gen("x") + "b" + ("c" + sgl.gen("y"))
    assert isinstance(e, SglExprList)
    kinds = [type(n).__name__ for n in e.flatten()]
    assert kinds == ["SglConstantText", "SglGen", "SglConstantText", "SglConstantText", "SglGen"]


def test_roles_wrap_expressions():
    nodes = sgl.user("hi " + sgl.gen("x")).flatten()
    assert isinstance(nodes[0], SglRoleBegin) and isinstance(nodes[-1], SglRoleEnd)
    assert [type(n) for n in sgl.assistant().flatten()] == [SglRoleBegin, SglRoleEnd]
    assert sgl.user_begin().role == "user" and sgl.assistant_end().role == "assistant"


def test_gen_with_choices_is_a_select():
    node = sgl.gen("c", choices=["a", "b"])
    assert type(node).__name__ == "SglSelect" and node.choices == ["a", "b"]


def test_placeholders_survive_fstrings():
    nodes = split_markers(f"Q: {SglArgument('q')} / {SglVariable('v', 1)}.")
    assert repr(nodes) == ("[SglConstantText('Q: '), SglArgument('q'), SglConstantText(' / '), "
                           "SglVariable('v', fork=1), SglConstantText('.')]")


def test_reprs_are_stable():
    assert repr(sgl.gen("x", max_tokens=3, stop="\n")) == "SglGen('x', max_new_tokens=3, stop='\\n')"
    assert repr(SglConstantText("a")) == "SglConstantText('a')"
    assert isinstance(sgl.gen("x"), SglGen)
