"""Hypothesis against every parser that reads input we did not write: the JSON-schema normalizer and
the regex / EBNF front ends (only GrammarError, never a hang past the compile timeout), the GGUF reader
(truncated, corrupted and hostile headers: GGUFError, no huge allocation), the chat-template renderer
(sandboxed: a model file's template cannot reach files or code) and tokenizer round trips.
Example counts are bounded for CI (FUZZ_EXAMPLES scales them; `make fuzz` runs more)."""

from __future__ import annotations

import json
import os
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import jinja2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl.grammars import GrammarCompiler, Vocabulary
from sgl.grammars.errors import GrammarError
from sgl.grammars.json_schema import normalize
from sgl.runtime.chat_template import render_chat_template
from sgl.runtime.models.default_model import default_model_path
from sgl.runtime.models.gguf_file import GGUFError, GGUFFile

N = int(os.environ.get("FUZZ_EXAMPLES", "6"))
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FAST = settings(max_examples=6 * N, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=2 * N, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _bench_schemas(limit: int = 400) -> list[Any]:
    out: list[Any] = []
    for sub in ("Github_easy", "Github_medium", "Glaiveai2K"):
        folder = DATA / "jsonschemabench-dev" / sub
        if folder.is_dir():
            for f in sorted(folder.glob("*.json"))[: limit // 3]:
                try:
                    out.append(json.loads(f.read_text()))
                except ValueError:
                    pass
    suite = DATA / "json-schema-test-suite" / "tests" / "draft2020-12"
    for f in sorted(suite.glob("*.json")) if suite.is_dir() else []:
        out.extend(group["schema"] for group in json.loads(f.read_text()))
    return out or [{"type": "object", "properties": {"a": {"type": "string"}}}]


SCHEMAS = _bench_schemas()
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
KEYWORDS = ["type", "properties", "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "not", "$ref",
            "$defs", "pattern", "minLength", "maxLength", "minimum", "maximum", "format", "additionalProperties",
            "prefixItems", "minItems", "maxItems", "uniqueItems", "if", "then", "else", "dependentRequired"]


def _mutate(schema: Any, rnd: random.Random, value: Any) -> Any:
    """Replace, delete or add one keyword somewhere in `schema`."""
    if not isinstance(schema, dict) or not schema:
        return value
    schema = dict(schema)
    key = rnd.choice(list(schema))
    action = rnd.randrange(4)
    if action == 0:
        del schema[key]
    elif action == 1:
        schema[key] = value
    elif action == 2:
        schema[rnd.choice(KEYWORDS)] = value
    else:
        schema[key] = _mutate(schema[key], rnd, value)
    return schema


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from sgl.runtime.tokenizer import Tokenizer
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> Iterator[GrammarCompiler]:
    vocab = Vocabulary.from_tokenizer(tokenizer.backend, tokenizer.eos_token_ids, 49152)  # as the engine builds it
    c = GrammarCompiler(vocab, compile_timeout_s=5.0, num_threads=1)
    yield c
    c.shutdown()


@FAST
@given(idx=st.integers(0, len(SCHEMAS) - 1), seed=st.integers(0, 2**32), value=JSON)
def test_normalizer_raises_only_grammar_error(idx: int, seed: int, value: Any) -> None:
    schema = _mutate(SCHEMAS[idx], random.Random(seed), value)
    for s in (schema, json.dumps(schema)):
        try:
            normalize(s)
        except GrammarError:
            pass


@FAST
@given(value=JSON)
def test_normalizer_on_random_json(value: Any) -> None:
    try:
        normalize(json.dumps(value))
    except GrammarError:
        pass


@SLOW
@given(idx=st.integers(0, len(SCHEMAS) - 1), seed=st.integers(0, 2**32), value=JSON)
def test_compile_of_mutated_schemas_ends_by_the_timeout(compiler: GrammarCompiler, idx: int, seed: int,
                                                        value: Any) -> None:
    schema = json.dumps(_mutate(SCHEMAS[idx], random.Random(seed), value))
    try:
        compiler.validate("json_schema", schema)
        compiler.compile_async("json_schema", schema).result(timeout=compiler.compile_timeout_s + 10)
    except GrammarError:  # includes GrammarTimeout
        pass


REGEX_ATOMS = st.sampled_from(["a", "b", ".", "\\d", "\\w", "[a-z]", "[^x]", "(", ")", "|", "*", "+", "?", "{2}",
                               "{1,3}", "{,", "\\", "^", "$", "(?:", "(?P<n>", "[", "]", "\\p{L}", "\u00e9", "\x00"])


@FAST
@given(st.lists(REGEX_ATOMS, max_size=12).map("".join) | st.text(max_size=30))
def test_regex_front_end_raises_only_grammar_error(compiler: GrammarCompiler, pattern: str) -> None:
    try:
        compiler.validate("regex", pattern)
    except GrammarError:
        pass


EBNF_ATOMS = st.sampled_from(["start", ":", "::=", "root", "\"a\"", "'b'", "|", "(", ")", "*", "+", "?", "\n",
                              "x", "/[0-9]+/", "%import common.NUMBER", "%ignore", " ", "~", "1..3", "{", "}"])


@FAST
@given(st.lists(EBNF_ATOMS, max_size=14).map("".join) | st.text(max_size=30))
def test_ebnf_front_end_raises_only_grammar_error(compiler: GrammarCompiler, text: str) -> None:
    try:
        compiler.validate("ebnf", text)
    except GrammarError:
        pass


# --- GGUF -----------------------------------------------------------------------------------------

def _gguf_bytes() -> bytes:
    """A small valid GGUF (v3): metadata of each kind and two tensors."""
    import gguf
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sgl-fuzz-{os.getpid()}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("a.u32", 7)
    w.add_string("a.str", "héllo")
    w.add_array("a.arr", [1, 2, 3])
    w.add_array("a.strs", ["x", "yz"])
    w.add_float32("a.f", 0.5)
    w.add_tensor("t0", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("t1", np.ones(32, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.unlink()
    return data


GGUF = _gguf_bytes()


def _parse(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "x.gguf"
    f.write_bytes(data)
    tracemalloc.start()
    try:
        GGUFFile(str(f))
    except GGUFError as e:
        assert str(f) in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * len(data) + (1 << 20), f"{peak} bytes allocated for a {len(data)}-byte file"


def test_small_gguf_parses() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "ok.gguf").write_bytes(GGUF)
        f = GGUFFile(str(Path(d) / "ok.gguf"))
    assert f.metadata["a.str"] == "héllo" and [t.name for t in f.tensors] == ["t0", "t1"]


@FAST
@given(cut=st.integers(0, len(GGUF) - 1))
def test_truncated_gguf_is_a_clear_error(tmp_path_factory: Any, cut: int) -> None:
    tmp = tmp_path_factory.mktemp("g")
    f = tmp / "x.gguf"
    f.write_bytes(GGUF[:cut])
    with pytest.raises(GGUFError):
        GGUFFile(str(f))


@FAST
@given(flips=st.lists(st.tuples(st.integers(0, len(GGUF) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_gguf_never_crashes(tmp_path_factory: Any, flips: list[tuple[int, int]]) -> None:
    data = bytearray(GGUF)
    for pos, byte in flips:
        data[pos] = byte
    _parse(tmp_path_factory.mktemp("g"), bytes(data))


@pytest.mark.parametrize("patch", ["n_kv", "n_tensors", "string_len", "array_count", "nested_arrays"])
def test_hostile_gguf_header(tmp_path: Path, patch: str) -> None:
    head = b"GGUF" + struct.pack("<I", 3)
    big = 2**63
    if patch == "n_kv":
        data = head + struct.pack("<QQ", 0, big)
    elif patch == "n_tensors":
        data = head + struct.pack("<QQ", big, 0)
    elif patch == "string_len":
        data = head + struct.pack("<QQQ", 0, 1, big) + b"k"
    elif patch == "array_count":
        data = head + struct.pack("<QQQ", 0, 1, 1) + b"k" + struct.pack("<IIQ", 9, 4, big)
    else:  # arrays of arrays of arrays ...: bounded depth, not a RecursionError
        data = head + struct.pack("<QQQ", 0, 1, 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000
    with pytest.raises(GGUFError, match="corrupt|truncated"):
        _parse_strict(tmp_path, data)


def _parse_strict(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "h.gguf"
    f.write_bytes(data)
    GGUFFile(str(f))


def test_truncated_real_model_header(tmp_path: Path) -> None:
    with open(default_model_path(), "rb") as src:
        head = src.read(1 << 20)
    f = tmp_path / "cut.gguf"
    f.write_bytes(head)
    with pytest.raises(GGUFError, match="truncated|corrupt|past the end"):
        GGUFFile(str(f))


# --- chat templates --------------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].listdir('/') }}",
    "{{ self.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}{{ messages }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_is_sandboxed(template: str) -> None:
    try:
        out = render_chat_template(template, [{"role": "user", "content": "hi"}])
    except (jinja2.TemplateError, ValueError, TypeError):
        return
    assert "root:" not in out and "<class" not in out and "module" not in out and "uid=" not in out, out


TEMPLATE_ATOMS = st.sampled_from(["{{", "}}", "{%", "%}", " for m in messages ", " endfor ", " if ", " endif ",
                                  "m.content", "m['role']", "|tojson", "raise_exception('x')", "loop.index",
                                  "bos_token", "'a' * 3", "range(5)", "x", " ", "\n", "{#", "#}"])


@FAST
@given(st.lists(TEMPLATE_ATOMS, max_size=14).map("".join) | st.text(max_size=40),
       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                       "content": st.text(max_size=20)}), max_size=3))
def test_chat_template_errors_are_template_errors(template: str, messages: list[dict]) -> None:
    try:
        render_chat_template(template, messages)
    except (jinja2.TemplateError, ValueError, TypeError):
        pass


def test_huge_range_in_a_template_is_refused() -> None:
    with pytest.raises((jinja2.TemplateError, OverflowError, ValueError)):
        render_chat_template("{% for i in range(10**9) %}x{% endfor %}", [])


# --- tokenizer round trips -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokens(tokenizer: Any) -> set[int]:
    """The bytes that have a token of their own (byte-level BPE: every text made of them round-trips)."""
    from sgl.runtime.tokenizer_gguf import bytes_to_unicode
    return {b for b, ch in bytes_to_unicode().items() if tokenizer.token_to_id(ch) is not None}


# NOTE: SmolLM2's vocabulary has no token for a few bytes (0x16, the UTF-8 lead byte 0xF1 of U+40000):
# text containing them cannot round-trip in the model itself, so the property is over the others.
@FAST
@given(st.text(max_size=60) | st.binary(max_size=40).map(lambda b: b.decode("utf-8", errors="replace")))
def test_tokenizer_round_trips(tokenizer: Any, byte_tokens: set[int], text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = tokenizer.decode(ids, skip_special_tokens=False)
    if set(text.encode("utf-8", "surrogatepass")) <= byte_tokens:
        assert out == text
    else:
        assert len(out) <= 3 * len(text)  # lossy only where the vocabulary is


@FAST
@given(st.lists(st.integers(0, 49151), max_size=30))
def test_incremental_detokenizer_matches_full_decode(tokenizer: Any, ids: list[int]) -> None:
    from sgl.runtime.tokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=False)
