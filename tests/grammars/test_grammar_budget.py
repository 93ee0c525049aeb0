"""Budget-aware closing (sgl.grammars.budget) on the default backend with the real tokenizer: a
"model" that never wants to stop (it always picks a long, non-closing allowed token) still ends within
`max_new_tokens` with output that parses and validates."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from sgl.grammars.budget import closing_path

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "object", "properties": {"k": {"type": "string"}, "n": {"type": "integer"}}, "required": ["k", "n"]}}},
    "required": ["name", "tags"]}


def _stubborn_walk(grammar, vocab, budget: int, prefer: bytes) -> tuple[list[int], bool]:
    """Decode `budget` tokens, each time the allowed token whose bytes contain `prefer` most often
    (ties: longest), never EOS unless it is the only choice. Returns (tokens, closed_early)."""
    m = grammar.matcher()
    m.set_token_budget(budget)
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    out: list[int] = []
    while len(out) < budget and not m.is_finished():
        m.fill_bitmask(mask, 0)
        bits = mask[0].numpy().view("uint32")
        allowed = [w * 32 + j for w in bits.nonzero()[0] for j in range(32) if bits[w] >> j & 1]
        allowed = [t for t in allowed if t < vocab.vocab_size]
        non_eos = [t for t in allowed if t not in vocab.eos_token_ids]
        if not non_eos:
            break
        t = max(non_eos, key=lambda t: ((vocab.token_bytes[t] or b"").count(prefer), len(vocab.token_bytes[t] or b"")))
        assert m.accept(t), vocab.token_bytes[t]
        out.append(t)
    return out, m.budget_closed


@pytest.mark.parametrize("budget", [12, 40])
@pytest.mark.parametrize("prefer", [b"a", b"{"])
def test_json_closes_within_budget(compiler, vocab, budget, prefer):
    grammar = compiler.compile("json_schema", SCHEMA, timeout=30)
    toks, closed = _stubborn_walk(grammar, vocab, budget, prefer)
    assert len(toks) <= budget
    doc = json.loads(vocab.decode(toks).decode("utf-8"))
    jsonschema.validate(doc, SCHEMA)
    assert closed


def test_regex_closes_within_budget(compiler, vocab):
    grammar = compiler.compile("regex", r"\((x|y)+\)")
    toks, closed = _stubborn_walk(grammar, vocab, 9, b"x")
    assert re.fullmatch(r"\((x|y)+\)", vocab.decode(toks).decode()) and closed


def test_closing_path_leaves_state(compiler, vocab):
    grammar = compiler.compile("json_schema", SCHEMA, timeout=30)
    m = grammar.matcher()
    for t in vocab.encode(b'{"name":"ab'):
        assert m.accept(t)
    p1 = closing_path(m, 64)
    assert p1 is not None and closing_path(m, 64) == p1  # rolled back: the same path again
    assert json.loads(vocab.decode(vocab.encode(b'{"name":"ab') + p1).decode())["name"] == "ab"


def test_no_budget_means_no_narrowing(compiler, vocab):
    grammar = compiler.compile("json_schema", SCHEMA, timeout=30)
    m = grammar.matcher()
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    for t in vocab.encode(b'{"name":"ab'):
        m.accept(t)
    m.fill_bitmask(mask, 0)
    assert sum(bin(int(w)).count("1") for w in mask[0].numpy().view("uint32")) > 1000  # any string char
    assert not m.budget_closed


def test_deep_nesting_closes_within_budget(compiler, vocab):
    """Replay a real greedy output that keeps nesting `[{"type":...,"items":[{...` (the model's ids,
    recorded on Github_easy/o53002) wherever the mask allows it, else the mask's one token: one free
    token lengthened the closing path by more than the old 2-token margin, and the output ended unparsed."""
    import numpy as np
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "budget_deep_nesting_ids.json").read_text())
    schema = {"type": "object", "properties": {"direction": {"type": "string"}, "items": {
        "type": "array", "items": {"type": "object"}}, "limit": {"type": "integer"}, "total": {"type": "integer"}}}
    m = compiler.compile("json_schema", json.dumps(schema)).matcher()
    m.set_token_budget(rec["max_new_tokens"])
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    out: list[int] = []
    while len(out) < rec["max_new_tokens"]:
        m.fill_bitmask(mask, 0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little").astype(bool)
        want = rec["ids"][len(out)] if len(out) < len(rec["ids"]) else None
        t = want if want is not None and bits[want] else int(np.flatnonzero(bits)[0])
        if t == vocab.eos_token_id:
            break
        assert m.accept(t)
        out.append(t)
    jsonschema.validate(json.loads(vocab.decode(out).decode()), schema)
    assert m.budget_closed


@pytest.mark.parametrize("schema, prefix", [
    # the model wrote digits into a `time`'s fraction: only "Z" or an offset ends it (greedy: "0" forever)
    ({"type": "object", "properties": {"t": {"type": "string", "format": "time"}}, "required": ["t"]},
     '{"t":"20:00:00.0000000000000000000'),
    # a key that must match a pattern with "://": greedy picked letters ("null") forever
    ({"type": "object", "patternProperties": {'^[a-zA-Z]+://[^ "]+$': {}}, "additionalProperties": False},
     '{"onOneVersionOneVersionOneVersion'),
])
def test_closing_path_when_the_greedy_walk_loops(compiler, vocab, schema, prefix):
    """Recorded from the on-model benchmark (Glaiveai2K create_calendar_event, Github_trivial o88603):
    these outputs ended on length unparsed; the seeded fallback walks find a completion."""
    m = compiler.compile("json_schema", schema, timeout=30).matcher()
    for t in vocab.encode(prefix.encode()):
        assert m.accept(t)
    path = closing_path(m, 64)
    assert path is not None and len(path) <= 64
    # NOTE: no format checker: the grammar's `time` allows any fraction length; jsonschema's checker (the
    # format guard) wants at most 6 digits, which no completion of this prefix can give
    jsonschema.validate(json.loads(prefix + vocab.decode(path).decode()), schema)
    assert m._num_accepted == len(vocab.encode(prefix.encode()))  # the matcher is where it was


@pytest.mark.parametrize("budget", [24, 48])
def test_pattern_key_closes_within_budget(compiler, vocab, budget):
    """A stubborn writer of letters into a key that needs "://" (Github_trivial o88603 on the model): the
    closing path comes from the fallback walks, and once narrowing starts it is followed to the end."""
    schema = {"type": "object", "patternProperties": {'^[a-zA-Z]+://[^ "]+$': {}}, "additionalProperties": False}
    m = compiler.compile("json_schema", schema, timeout=30).matcher()
    m.set_token_budget(budget)
    out = vocab.encode(b'{"onOne')
    for t in out:
        assert m.accept(t)
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    letters = vocab.encode(b"Version")[0]
    while len(out) < budget and not m.is_finished():
        m.fill_bitmask(mask, 0)
        allowed = lambda t: bool(mask[0, t // 32].item() >> (t % 32) & 1)  # noqa: E731
        t = letters if allowed(letters) else next(w * 32 + j for w in range(mask.shape[1]) for j in range(32)
                                                  if mask[0, w].item() >> j & 1)
        if t in vocab.eos_token_ids:
            break
        assert m.accept(t)
        out.append(t)
    assert len(out) <= budget and m.budget_closed
    jsonschema.validate(json.loads(vocab.decode(out).decode("utf-8")), schema)


def test_closing_path_survives_jump_forward(compiler, vocab):
    """Replay a real greedy output (Github_trivial o9816 on the default model: `"data-type":"json"` over
    and over under an object-or-array oneOf with a key pattern) in the scheduler's order: the forced
    tokens (jump-forward) are accepted without a mask, then the mask, then the recorded id if allowed.
    The forced `"` after `,` used to drop the committed closing path, no new one fit in the budget left,
    and the output ended on length unparsed."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "budget_jump_forward_ids.json").read_text())
    key = {"^[0-9a-zA-Z_-]{1,255}$": {"type": ["string", "number", "boolean", "null"]}}
    row = {"type": "object", "patternProperties": key, "additionalProperties": False}
    schema = {"oneOf": [row, {"type": "array", "items": row}]}
    m = compiler.compile("json_schema", json.dumps(schema)).matcher()
    out = _replay_with_jump_forward(m, vocab, rec["ids"], rec["max_new_tokens"])
    jsonschema.validate(json.loads(vocab.decode(out).decode()), schema)
    assert m.budget_closed


def test_closing_commits_by_the_longest_recent_path(compiler, vocab):
    """Replay a real greedy output (Glaiveai2K generate_invoice on the default model: the same order item
    over and over). `},` and a forced `{"price` open a new item whose required keys must all be written,
    and the closing path grows from ~5 to ~15 tokens in one step: committing by the current path's
    length (+6) came too late and the output ended on length unparsed."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "budget_required_item_ids.json").read_text())
    item = {"type": "object", "properties": {"price": {"type": "number"}, "product_name": {"type": "string"},
                                             "quantity": {"type": "integer"}},
            "required": ["product_name", "quantity", "price"]}
    schema = {"type": "object", "properties": {"customer_name": {"type": "string"},
                                               "order_items": {"type": "array", "items": item}},
              "required": ["customer_name", "order_items"]}
    m = compiler.compile("json_schema", json.dumps(schema)).matcher()
    out = _replay_with_jump_forward(m, vocab, rec["ids"], rec["max_new_tokens"])
    jsonschema.validate(json.loads(vocab.decode(out).decode()), schema)
    assert m.budget_closed


def test_closing_commits_by_the_paths_of_the_last_tokens(compiler, vocab):
    """Replay a real greedy output (Github_easy o45164 on the default model: an array of items with 6
    required keys each). `},{"` lengthens the closing path from 2 to 37 tokens once per ~80 tokens; near
    the end a path is computed every token, so the last 8 paths (the old memory) no longer held the 37:
    closing never started and the output ended on length unparsed."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "budget_item_period_ids.json").read_text())
    m = compiler.compile("json_schema", json.dumps(rec["schema"])).matcher()
    out = _replay_with_jump_forward(m, vocab, rec["ids"], rec["max_new_tokens"])
    jsonschema.validate(json.loads(vocab.decode(out).decode()), rec["schema"])
    assert m.budget_closed


def test_overlapping_oneof_replay_ends_valid(compiler, vocab):
    """Replay a real greedy output (Glaiveai2K calculate_area_4c8e9fd1 on the default model:
    `{"dimensions":{"properties":{"properties":...` under a oneOf whose branches differ by an optional
    `shape` const). As a guard, the object closed by budget closing matched every branch; the rollback
    (~490 tokens) exceeded the backtrack budget and the request aborted. Exact now: the grammar
    itself keeps exactly one branch, and the output validates."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "guard_oneof_abort_ids.json").read_text())
    m = compiler.compile("json_schema", json.dumps(rec["schema"])).matcher()
    out = _replay_with_jump_forward(m, vocab, rec["ids"], rec["max_new_tokens"])
    assert m.error is None, m.error
    jsonschema.validate(json.loads(vocab.decode(out).decode()), rec["schema"])


def _replay_with_jump_forward(m, vocab, ids: list[int], budget: int) -> list[int]:
    """The scheduler's order: forced tokens (jump-forward) without a mask, then the mask, then the
    recorded id if the mask allows it, else the mask's first token; a guard's rollback as the
    scheduler does it (runtime/scheduler/rollback.py)."""
    import numpy as np

    m.set_token_budget(budget)
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    out: list[int] = []
    while len(out) < budget and not m.is_finished():
        for t in m.jump_forward_tokens()[: budget - len(out)]:  # as Scheduler._jump_forward
            assert m.accept(t)
            out.append(t)
        if len(out) >= budget or m.is_finished():
            break
        m.fill_bitmask(mask, 0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little").astype(bool)
        want = ids[len(out)] if len(out) < len(ids) else None
        t = want if want is not None and bits[want] else int(np.flatnonzero(bits)[0])
        if t in vocab.eos_token_ids:
            break
        assert m.accept(t)
        out.append(t)
        keep = m.take_rollback() if hasattr(m, "take_rollback") else None
        if keep is not None:
            m.rollback(len(out) - keep)
            del out[keep:]
    return out


def test_closing_path_writes_pattern_witnesses(compiler, vocab):
    """Recorded from the on-model benchmark (Github_easy o12621): digits forever inside a string whose
    unanchored pattern is a timestamp, and a second such string still required. No one-token walk spells
    the pattern; the witness walks write a matching suffix here and the whole witness in `modified`."""
    pattern = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}.\d{6}"
    schema = {"type": "object", "properties": {"created": {"type": "string", "pattern": pattern},
                                               "modified": {"type": "string", "pattern": pattern}},
              "required": ["created", "modified"]}
    prefix = '{"created":"2023-01-01T12:32:12.14.10000000000'
    m = compiler.compile("json_schema", schema, timeout=30).matcher()
    for t in vocab.encode(prefix.encode()):
        assert m.accept(t)
    assert m.witnesses
    path = closing_path(m, 160)
    assert path is not None
    jsonschema.validate(json.loads(prefix + vocab.decode(path).decode()), schema)
    m.witnesses = ()
    assert closing_path(m, 160) is None  # what the walks did before


@pytest.mark.parametrize("pattern", [r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", r"^[a-zA-Z]+://[^ \"]+$", r"^(foo|ab)+$",
                                     r"[^a-z]\w\s\S\W", r"^\$[A-Z]{3}[.]?$"])
def test_shortest_match_matches(pattern):
    from sgl.grammars.witness import shortest_match

    w = shortest_match(pattern)
    assert w is not None and re.search(pattern, w) and '"' not in w and "\\" not in w


def test_closing_path_with_a_witness_no_token_spells(compiler, vocab):
    """The regex's witness "a\\x04" ends in a byte no token holds (its suffix tokenizes to nothing): no
    closing path, and no exception (the request then ends on the mask's own 'unsatisfiable' error)."""
    m = compiler.compile("regex", "a\\x04").matcher()
    assert m.witnesses == (b"a\x04",)
    assert m.accept(vocab.encode(b"a")[0])
    assert closing_path(m, 8) is None


def test_closing_path_through_deep_nesting(compiler, vocab):
    """Replay a real greedy output (Github_medium o69631 on the default model: `{"type":` nested one
    level per two tokens under `additionalProperties: true`). The greedy walk demoted `}}` after 3
    picks and opened keys instead, so from depth ~9 on no greedy path ended; the fallback walks' paths
    (40-400 tokens) never fit the budget left, and the output ended on length unparsed."""
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "data" / "budget_nested_keys_ids.json").read_text())
    m = compiler.compile("json_schema", json.dumps(rec["schema"])).matcher()
    out = _replay_with_jump_forward(m, vocab, rec["ids"], rec["max_new_tokens"])
    jsonschema.validate(json.loads(vocab.decode(out).decode()), rec["schema"])
    assert m.budget_closed


def test_no_closing_walks_while_the_end_is_far_past_the_budget(compiler, vocab, monkeypatch):
    """Github_medium o83287 on the model: 67 required keys whose values have 6 required keys each, so the
    shortest output is ~2200 tokens and none fits in max_new_tokens=512. The closing walks found nothing
    and ran again every 4 tokens: ~0.1 s each, ~12 s of the scheduler thread per request. One greedy
    walk past the budget now says how far the end is, and the next check waits for a quarter of the gap."""
    import numpy as np

    import sgl.grammars.base as base

    item = {"type": "object", "additionalProperties": False,
            "properties": {"unit": {"type": ["string", "null"]}, "type": {"enum": ["uint32", "string", "array"]},
                           "nullable": {"type": "boolean"}, "def": {"type": ["string", "number", "array", "null"]},
                           "comments": {"type": "string"}, "per": {"enum": ["job", "core"]}},
            "required": ["unit", "type", "nullable", "def", "comments", "per"]}
    keys = [f"metric_{i}" for i in range(40)]
    schema = {"type": "object", "required": ["version", "fields"], "properties": {
        "fields": {"type": "object", "additionalProperties": item, "required": keys}, "version": {"type": "number"}}}
    calls = []
    monkeypatch.setattr(base, "closing_path", lambda *a, **k: calls.append(1) or closing_path(*a, **k))
    nest = '"type":"string","nullable":false,"def":[{'
    ids = vocab.encode(('{"fields":{"metric_0":{"unit":"id",' + nest * 40).encode())
    budget = 256
    m = compiler.compile("json_schema", json.dumps(schema)).matcher()
    m.set_token_budget(budget)
    mask = torch.zeros((1, (vocab.vocab_size_padded + 31) // 32), dtype=torch.int32)
    for k in range(budget):
        m.fill_bitmask(mask, 0)
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little").astype(bool)
        assert bits[ids[k]]  # the output as written: nothing fits, so nothing is narrowed
        assert m.accept(ids[k])
    assert not m.budget_closed and len(calls) <= 2, len(calls)  # was 60 (one per 4 tokens)


def test_witness_suffix_is_closed_by_its_quote(compiler, vocab):
    """Github_medium o63939 on the model: `.json.json...` written into a string whose pattern needs a
    `.php` end, then 6 required keys. A pattern string takes no `}`, so the walk did not know it was in a
    string: after the witness suffix `.php` it preferred "0" to the quote and never matched again (no
    closing path; the output ended on length unparsed). The suffix is now closed by its quote."""
    schema = {"type": "object", "additionalProperties": False, "required": ["file", "name", "timeout"],
              "properties": {"file": {"type": "string", "minLength": 16, "maxLength": 1024,
                                      "pattern": "^[\\w\\-\\./]+\\.php+$"},
                             "name": {"type": "string", "maxLength": 64}, "timeout": {"type": "integer", "minimum": 1}}}
    prefix = '{"file":"file' + ".json" * 20
    m = compiler.compile("json_schema", json.dumps(schema)).matcher()
    for t in vocab.encode(prefix.encode()):
        assert m.accept(t)
    path = closing_path(m, 160)
    assert path is not None
    jsonschema.validate(json.loads(prefix + vocab.decode(path).decode()), schema)


def test_uncounted_pattern_long_bound_is_exact_near_its_end(compiler, vocab):
    """The same string on the model: with `maxLength: 1024` moved to the guard, budget closing closed a
    1,200-character string, the guard rolled it back at the deadline, and the output ended unparsed. The
    bound in the grammar made every mask inside the string ~0.5 ms (a new lexer state per character:
    Github_medium o63937, 256 of that subset's 325 steps over 200 us). Now the guard holds it until the
    string nears the bound, and the matcher then switches to the grammar with the bound kept."""
    schema = {"type": "object", "properties": {"file": {"type": "string", "maxLength": 1024,
                                                        "pattern": "^[\\w\\-\\./]+\\.php+$"}}}
    g = compiler.compile("json_schema", json.dumps(schema))
    assert type(g).__name__ == "GuardedGrammar" and g.spec.exact_value is not None
    assert '"maxLength":1024' in g.spec.exact_value and '"maxLength"' not in g.spec.value
    m = g.matcher()
    for t in vocab.encode(('{"file":"' + "x" * 500).encode()):
        assert m.accept(t)
    assert m.num_switches == 0 and m._allows(vocab.encode(b"xxxxxxxx")[0])  # far from the bound: relaxed
    for t in vocab.encode(("x" * 520).encode()):
        assert m.accept(t)
    assert m.num_switches == 1
    assert not m._allows(vocab.encode(b"xxxxxxxx")[0])  # the grammar counts the length again
    rest = vocab.encode(b'.php"}')
    for t in rest:
        assert m._allows(t) and m.accept(t)
    doc = json.loads(b"".join(vocab.decode([t]) for t in m.tokens))
    jsonschema.validate(doc, schema)
    assert len(doc["file"]) == 1024