"""Cost limits: what one HTTP request may ask for, so a request built to be expensive gets a 400 that
names the field instead of slowing down everybody else. No torch here (the server calls it).

    >>> limits = RequestLimits()
    >>> grammar_size("regex", "[0-9]{3}-[0-9]{4}")
    8
    >>> grammar_size("json_schema", '{"type": "string", "maxLength": 100000}') > limits.grammar_max_size
    True

The grammar size is the length of the constraint once its counted repetitions are written out
(`a{1,100}` is 100, `(a{1,100}){1,100}` is 10,000, `"maxLength": n` is n). Backends that build an
automaton eagerly (xgrammar, outlines) spend time and memory in proportion to it; llguidance builds
lazily but pays per step. Unbounded repetition (`*`, `+`, no maxLength) costs one copy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

try:  # Python >= 3.11
    import re._constants as sre_c
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

from sgl.runtime.protocol import GenerateRequest, RequestError

# Deeper schemas / regexes are refused before any walk can hit Python's recursion limit.
MAX_NESTING = 64
_BOUNDS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


@dataclass(frozen=True)
class RequestLimits:
    """Per-HTTP-request caps (flags of the same names on `sgl serve`). None = no cap."""

    max_request_new_tokens: int = 65536  # sum of max_new_tokens over a request's prompts x n
    max_prompt_tokens: Optional[int] = None  # per prompt; None = the context window
    max_batch_size: int = 256  # prompts x n in one request
    max_stop_strings: int = 32
    max_stop_string_chars: int = 256
    max_logit_bias: int = 1024  # entries
    max_grammar_bytes: int = 64 * 1024  # regex / json_schema / ebnf source, UTF-8
    grammar_max_size: int = 10_000  # see grammar_size()

    @classmethod
    def from_args(cls, args: Any) -> "RequestLimits":
        """The limits of a `ServerArgs` (fields missing on `args` keep their defaults)."""
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(args, k) for k in names if hasattr(args, k)})


def _regex_size(pattern: str) -> int:
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return 1  # not a Python regex (the grammar backend reports its own error)
    return _seq_size(parsed, 0)


def _seq_size(items: Any, depth: int) -> int:
    if depth > MAX_NESTING:
        raise RequestError(f"the regex nests deeper than {MAX_NESTING} levels")
    total = 0
    for op, av in items:
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            copies = lo if hi == sre_c.MAXREPEAT else hi
            total += max(copies, 1) * _seq_size(sub, depth + 1)
        elif op == sre_c.SUBPATTERN:
            total += _seq_size(av[-1], depth + 1)
        elif op == sre_c.BRANCH:
            total += sum(_seq_size(alt, depth + 1) for alt in av[1])
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            total += _seq_size(av[1], depth + 1)
        elif op == sre_c.GROUPREF_EXISTS:
            total += sum(_seq_size(b, depth + 1) for b in av[1:] if b is not None)
        else:
            total += 1
    return total


def _num(x: Any) -> int:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1e18 else 0


def _schema_size(schema: Any, depth: int) -> int:
    if depth > MAX_NESTING:
        raise RequestError(f"sampling_params.json_schema nests deeper than {MAX_NESTING} levels")
    if isinstance(schema, list):
        return sum(_schema_size(s, depth + 1) for s in schema)
    if not isinstance(schema, dict):
        return 1
    copies = max([1] + [_num(schema.get(k)) for k in _BOUNDS])
    inner = 1
    if isinstance(schema.get("pattern"), str):
        inner += _regex_size(schema["pattern"])
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames"):
        if isinstance(schema.get(key), (dict, list)):
            inner += _schema_size(schema[key], depth + 1)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            inner += _schema_size(schema[key], depth + 1)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            inner += sum(_schema_size(s, depth + 1) for s in schema[key].values())
    return copies * inner


def grammar_size(kind: str, value: Any) -> int:
    """Estimated size of a constraint with its counted repetitions expanded (see module doc)."""
    if kind == "regex" and isinstance(value, str):
        return _regex_size(value)
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return 1  # the grammar compiler names the JSON error
        return _schema_size(value, 0)
    if kind == "choices" and isinstance(value, list):
        return sum(len(c) for c in value if isinstance(c, str))
    return len(value) if isinstance(value, str) else 1


def check_costs(reqs: Sequence[GenerateRequest], prompt_tokens: Sequence[int], limits: RequestLimits,
                vocab_size: Optional[int] = None) -> None:
    """Raise `RequestError` naming the field when one HTTP request (all of `reqs`) is over a limit.

    prompt_tokens[i] is the prompt length of reqs[i]. Every check is O(size of the request)."""
    if len(reqs) > limits.max_batch_size:
        raise RequestError(f"the request has {len(reqs)} prompts x n; the limit is {limits.max_batch_size} "
                           "(--max-batch-size)")
    total_new = sum(r.sampling_params.max_new_tokens for r in reqs)
    if total_new > limits.max_request_new_tokens:
        raise RequestError(f"sampling_params.max_new_tokens x n x prompts is {total_new}; the limit is "
                           f"{limits.max_request_new_tokens} (--max-request-new-tokens)")
    if limits.max_prompt_tokens is not None:
        for num in prompt_tokens:
            if num > limits.max_prompt_tokens:
                raise RequestError(f"the prompt has {num} tokens; the limit is {limits.max_prompt_tokens} "
                                   "(--max-prompt-tokens)")
    checked: set[int] = set()  # n > 1 shares one SamplingParams object
    for r in reqs:
        sp = r.sampling_params
        if id(sp) in checked:
            continue
        checked.add(id(sp))
        _check_sampling(sp, limits, vocab_size)


def _check_sampling(sp: Any, limits: RequestLimits, vocab_size: Optional[int]) -> None:
    stops = list(sp.stop or []) + list(sp.stop_regex or [])
    if len(stops) > limits.max_stop_strings:
        raise RequestError(f"sampling_params.stop has {len(stops)} strings; the limit is {limits.max_stop_strings} "
                           "(--max-stop-strings)")
    for s in stops:
        if isinstance(s, str) and len(s) > limits.max_stop_string_chars:
            raise RequestError(f"sampling_params.stop has a {len(s)}-character string; the limit is "
                               f"{limits.max_stop_string_chars} (--max-stop-string-chars)")
    if sp.logit_bias:
        if len(sp.logit_bias) > limits.max_logit_bias:
            raise RequestError(f"sampling_params.logit_bias has {len(sp.logit_bias)} entries; the limit is "
                               f"{limits.max_logit_bias} (--max-logit-bias)")
        for k in sp.logit_bias:
            # NOTE: str.isdigit() accepts '²' and other non-ASCII digits that int() refuses
            if not (isinstance(k, str) and k.isascii() and k.isdigit()):
                raise RequestError(f"sampling_params.logit_bias: key {k!r} is not a token id (a decimal integer)")
            if vocab_size is not None and int(k) >= vocab_size:
                raise RequestError(f"sampling_params.logit_bias: token id {k} is outside the vocabulary "
                                   f"(size {vocab_size})")
    constraint = sp.constraint
    if constraint is None:
        return
    kind, value = constraint
    source = value if isinstance(value, str) else json.dumps(value)
    nbytes = len(source.encode("utf-8", "surrogatepass"))
    if nbytes > limits.max_grammar_bytes:
        raise RequestError(f"sampling_params.{kind} is {nbytes} bytes; the limit is {limits.max_grammar_bytes} "
                           "(--max-grammar-bytes)")
    size = grammar_size(kind, value)
    if size > limits.grammar_max_size:
        raise RequestError(f"sampling_params.{kind} expands to about {size} elements (counted repetitions such as "
                           f"{{m,n}}, maxLength or maxItems multiplied out); the limit is {limits.grammar_max_size} "
                           "(--grammar-max-size)")
