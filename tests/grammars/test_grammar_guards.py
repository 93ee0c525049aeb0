"""Semantic guards (grammars/guards.py) with the real tokenizer and llguidance: the keywords no grammar
enforces exactly are relaxed in the grammar and checked per closed value; a violation asks for a
rollback to where the failing value (or its last child) started and masks the token that opened it."""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest
import torch

from sgl.grammars.guards import GuardedMatcher
from sgl.grammars.json_tracker import JsonTracker

from .grammar_testlib import compact

pytestmark = pytest.mark.timeout(120)

CASES = [  # (schema, valid instances, (invalid instance, keyword))
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
      "required": ["tags"]}, [{"tags": ["a", "b"]}, {"tags": []}], [({"tags": ["a", "b", "a"]}, "uniqueItems")]),
    ({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "multipleOf": 2}]}, [3, -2],
     [(4, "oneOf")]),
    ({"type": "object", "properties": {"a": {"type": "string", "not": {"pattern": "^x"}}}}, [{"a": "yx"}],
     [({"a": "xy"}, "not")]),
    ({"type": "object", "properties": {"n": {"type": "string"}},
      "if": {"properties": {"n": {"pattern": "^[0-9]"}}}, "then": {"properties": {"n": {"maxLength": 2}}}},
     [{"n": "12"}, {"n": "abcd"}], [({"n": "123"}, "if")]),
    ({"type": "object", "properties": {"s": {"type": "string", "maxLength": 6,
                                             "allOf": [{"pattern": "^a"}, {"pattern": "b$"}]}}},
     [{"s": "ab"}, {"s": "axb"}], [({"s": "ax"}, "pattern")]),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}},
      "minProperties": 2, "maxProperties": 2}, [{"a": 1, "c": 2}], [({"a": 1}, "minProperties"),
                                                                   ({"a": 1, "b": 2, "c": 3}, "maxProperties")]),
    ({"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}}}, "uniqueItems": True},
     [[{"id": 1}, {"id": 2}]], [([{"id": 1}, {"id": 1}], "uniqueItems")]),
    # maxContains over a `contains` without a complement (a pattern): counted item by item
    ({"type": "array", "items": {"type": "string"}, "contains": {"pattern": "^a"}, "maxContains": 2},
     [["ab", "b", "ac"], ["a"]], [(["ab", "ac", "b", "ad"], "maxContains")]),
    # overlapping patternProperties: one alternation in the grammar, the key matching both checked against both
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}, "b$": {"minimum": 5}},
      "additionalProperties": False}, [{"ab": 7}, {"a": 1}, {"b": 9}], [({"ab": 3}, "patternProperties")]),
    # a long maxLength beside a format: the grammar keeps the format, the guard the length (mask speed)
    ({"type": "object", "properties": {"e": {"type": "string", "format": "email", "maxLength": 64}}},
     [{"e": "ab@cd.ef"}, {"e": "a" * 56 + "@cd.ef"}], [({"e": "a" * 64 + "@cd.ef"}, "maxLength")]),
    # a huge maxLength beside a counted pattern (Github_easy o21053): llguidance's lexer ran out of
    # expressions 4 tokens into the string; the guard checks the length
    ({"type": "object", "properties": {"q": {"type": "string", "minLength": 1, "maxLength": 5000,
                                             "pattern": "^$|(^(?:\\S+\\s+){0,99}\\S+$)"}}},
     [{"q": "What is the difference between a question and an answer?"}],
     [({"q": " ".join(["x" * 60] * 90)}, "maxLength")]),
    # more required matches than positions a grammar expands: the guard counts them when the array closes
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}, "minContains": 9},
     [[1] * 9], [([1] * 8, "contains")]),
]


def _compile(compiler, schema):
    g = compiler.compile("json_schema", json.dumps(schema))
    assert type(g).__name__ == "GuardedGrammar", "these keywords need guards"
    return g


def _walk(grammar, vocab, text: str) -> tuple[GuardedMatcher, Optional[int]]:
    """Feed `text` + EOS; stop at the first violation. Returns (matcher, token index of the violation)."""
    m = grammar.matcher()
    m.set_backtrack_budget(10 ** 6)  # a violation asks for its rollback, however long the value
    for i, t in enumerate(vocab.encode(text.encode()) + [vocab.eos_token_id]):
        assert m.accept(t), m.error
        if m.take_rollback() is not None:
            return m, i
    return m, None


@pytest.mark.parametrize("schema, valid, invalid", CASES)
def test_valid_pass_invalid_violate_with_keyword(compiler, vocab, schema, valid, invalid):
    g = _compile(compiler, schema)
    for x in valid:
        m, at = _walk(g, vocab, compact(x))
        assert at is None and m.is_finished(), (x, m.violation)
    for x, keyword in invalid:
        m, at = _walk(g, vocab, compact(x))
        assert at is not None, f"{x} should violate {keyword}"
        assert m.violation.keyword == keyword, m.violation


def test_rollback_masks_the_opening_token_and_walks_on(compiler, vocab):
    g = _compile(compiler, CASES[0][0])
    text = compact({"tags": ["a", "b", "a"]})
    m, at = _walk(g, vocab, text)
    keep = m.take_rollback()
    tokens = vocab.encode(text.encode())
    # the duplicate is the last item: roll back to the token holding its first content byte
    start = text.index('"a"]') + 1
    assert len(vocab.decode(tokens[:keep])) <= start < len(vocab.decode(tokens[:keep + 1]))
    bad = tokens[keep]
    m.rollback(at + 1 - keep)
    assert m.take_rollback() is None and m.violation is None
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    m.fill_bitmask(mask, 0)
    allowed = lambda t: bool(int(mask[0, t // 32]) >> (t % 32) & 1)  # noqa: E731
    assert not allowed(bad), "the token that opened the failing value must be masked at its position"
    # another ending is fine
    rest = compact({"tags": ["a", "b", "c"]}).encode()[len(vocab.decode(tokens[:keep])):]
    for t in vocab.encode(rest) + [vocab.eos_token_id]:
        assert m.accept(t) and m.take_rollback() is None
    assert m.is_finished() and m.backtracked_tokens == at + 1 - keep


def test_rollback_through_eos(compiler, vocab):
    """A guarded matcher rolls back the EOS its backend took (or did not record) and the token before it like
    any others: its masks are those of the text before, and the same ending is accepted again."""
    g = _compile(compiler, CASES[0][0])
    tokens = vocab.encode(compact({"tags": ["a", "b"]}).encode())
    m = g.matcher()
    for t in tokens[:-1]:
        assert m.accept(t)

    def mask() -> torch.Tensor:
        out = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
        m.fill_bitmask(out, 0)
        return out

    before = mask()
    assert m.accept(tokens[-1]) and m.accept(vocab.eos_token_id) and m.is_finished()
    m.rollback(2)
    assert torch.equal(mask(), before) and m.error is None and m.tokens == tokens[:-1]
    assert m.accept(tokens[-1]) and m.accept(vocab.eos_token_id) and m.is_finished()


def test_too_short_object_is_reopened_first(compiler, vocab):
    g = _compile(compiler, CASES[5][0])  # minProperties
    text = compact({"a": 1})
    m, at = _walk(g, vocab, text)
    keep = m.take_rollback()
    tokens = vocab.encode(text.encode())
    assert vocab.decode(tokens[:keep + 1]).endswith(b"}"), "only the closing token is taken back"
    m.rollback(at + 1 - keep)
    rest = compact({"a": 1, "b": 2}).encode()[len(vocab.decode(tokens[:keep])):]
    for t in vocab.encode(rest) + [vocab.eos_token_id]:
        assert m.accept(t) and m.take_rollback() is None
    assert m.is_finished()


def test_budget_spent_fails_naming_the_keyword(compiler, vocab):
    g = _compile(compiler, CASES[0][0])
    m = g.matcher()
    m.set_backtrack_budget(1)
    for t in vocab.encode(compact({"tags": ["a", "b", "a"]}).encode()):
        if not m.accept(t):
            break
    assert m.error is not None and "uniqueItems" in m.error and "backtrack budget" in m.error
    assert m.take_rollback() is None


def test_stable_tokens_hold_back_open_guarded_values(compiler, vocab):
    g = _compile(compiler, CASES[0][0])
    m = g.matcher()
    text = '{"tags":["a",'
    toks = vocab.encode(text.encode())
    for t in toks:
        assert m.accept(t)
    held = vocab.decode(toks[:m.stable_tokens()]).decode()
    assert text.startswith(held) and "[" not in held  # the open array (guarded) is not stable yet


@pytest.mark.parametrize("chunks, expect", [
    ([b'{"a":[1,', b'2],"b":"x\\"y"}'], [(("a", 0), b"1"), (("a", 1), b"2"), (("a",), b"[1,2]"),
                                          (("b",), b'"x\\"y"'), ((), None)]),
    ([b"[tr", b"ue, 1.5e", b"3 ]"], [((0,), b"true"), ((1,), b"1.5e3"), ((), None)]),
])
def test_tracker_paths_and_spans(chunks: list[bytes], expect: list[tuple[Any, Optional[bytes]]]):
    t = JsonTracker()
    closed = [c for ch in chunks for c in t.feed(ch)] + t.finish()
    data = b"".join(chunks)
    got = [(c.path, data[c.start:c.end]) for c in closed]
    assert [p for p, _ in got] == [p for p, _ in expect]
    for (_, span), (_, want) in zip(got, expect):
        assert want is None or span == want
    assert closed[-1].start == 0 and closed[-1].end == len(data) and t.done
