"""Budget-aware closing: a constrained request with `max_new_tokens` ends with output the grammar
accepts whenever a short enough completion exists.

`closing_path(matcher, limit)` finds a completion from the matcher's current state greedily: forced
tokens first, then the first allowed token of a fixed preference list (closers such as ``"}``, then
the shortest scalars, then separators; quote-led closers first inside a string), then any allowed
token; it stops as soon as the grammar may
end (EOS allowed). The matcher is advanced and rolled back, so it ends where it started. The path is
an upper bound on the shortest completion (greedy, not a search), which is what budget closing needs:
following it always ends in an accepted output within its length.

Used by `GrammarMatcher.fill_bitmask` once `set_token_budget` was called: when the remaining budget is
at most the path length + `MARGIN`, the mask allows only the path's next token.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from sgl.grammars.base import GrammarMatcher
    from sgl.grammars.vocabulary import Vocabulary

# tokens: close this much earlier than the path's length. One free token can lengthen the greedy path by
# several tokens (e.g. `{"` inside nested arrays adds `":0}` and a closer); with 2, a deeply nested
# JSONSchemaBench output (Github_easy/o53002, on the default model) ran out of budget mid-closing.
MARGIN = 6
# Preference orders. Inside a JSON string (a quote, a brace and a letter all allowed) the quote-led
# closers come first: a brace there is string content, never progress. Elsewhere bracket closers first
# (after `{` with optional keys, `}` beats opening a key).
_IN_STRING = ['"}]}', '"}}', '"]}', '"}]', '"}', '"]', '"']
_CLOSERS = ['}]}', '}}', ']}', '}]', ']]', '}', ']', ')', '>']
_VALUES = ["0", '""', "null", "[]", "{}", "true", "false", "1", ",", ":", '"', "{", "[", "a", "A", "-", ".", "e",
           "x", " "]
_PROBES = ['"', "}", "a"]  # all three allowed: inside a string
# Fallback when the greedy walk loops without ending (it keeps picking a token that never completes the
# value: "0" forever in a `time`'s fraction that needs "Z", "null" forever in a key whose pattern needs
# "://"): a few seeded walks over these candidates in shuffled orders; the shortest that ends wins.
_EXTRA = ["Z", "/", "+", "T", "@", "_", "0", "1", "-", ":", ".", '"', "}", "]", ",", "a", "A", "x", " "]
_RETRIES = 6
_CANDIDATES: dict[int, tuple["Vocabulary", tuple]] = {}  # id(vocab) -> (vocab kept alive, ids)


def _candidates(vocab: "Vocabulary") -> tuple[list[int], list[int], list[int], list[int]]:
    """(in-string order, elsewhere order, probes, fallback pool) as token ids of the texts above that are single
    tokens of `vocab` (cached per vocabulary)."""
    cached = _CANDIDATES.get(id(vocab))
    if cached is not None and cached[0] is vocab:
        return cached[1]

    def ids(texts: list[str]) -> list[int]:
        out: list[int] = []
        for text in texts:
            try:
                toks = vocab.encode(text.encode("utf-8"))
            except Exception:  # noqa: BLE001 - a test vocabulary without a tokenizer
                continue
            if len(toks) == 1 and toks[0] not in out:
                out.append(toks[0])
        return out
    res = (ids(_IN_STRING + _CLOSERS + _VALUES), ids(_CLOSERS + _VALUES + _IN_STRING), ids(_PROBES),
           ids(_IN_STRING + _CLOSERS + _VALUES + _EXTRA))
    _CANDIDATES[id(vocab)] = (vocab, res)
    return res


def closing_path(m: "GrammarMatcher", limit: int, fallback_limit: Optional[int] = None) -> Optional[list[int]]:
    """Up to `limit` tokens after which the grammar may end ([] if it may end now); None if neither the
    greedy walk nor the seeded fallback walks (up to `fallback_limit` tokens, default `limit`) get there
    (or the backend cannot tell)."""
    in_string, elsewhere, probes, pool = _candidates(m.vocab)
    best = _walk(m, limit, lambda inside: in_string if inside else elsewhere, probes)
    if best is not None:
        return best
    limit = limit if fallback_limit is None else min(limit, fallback_limit)
    for seed in range(_RETRIES):
        rng = random.Random(seed)
        order = list(pool)
        best = _shorter(best, _walk(m, limit if best is None else len(best) - 1,
                                    lambda inside: rng.sample(order, len(order)), probes))
    return best


def _shorter(a: Optional[list[int]], b: Optional[list[int]]) -> Optional[list[int]]:
    return b if a is None or (b is not None and len(b) < len(a)) else a


def _walk(m: "GrammarMatcher", limit: int, order: Callable[[bool], list[int]],
          probes: list[int]) -> Optional[list[int]]:
    """One walk from the matcher's state: forced tokens, else the first allowed token of `order(inside a
    string)`, else any allowed token. The matcher is left where it started."""
    path: list[int] = []
    fork = m._fork()
    owner, m = m, (fork if fork is not None else m)  # walk the fork if there is one: nothing to undo
    try:
        while not m._can_end():
            if len(path) >= limit:
                return None
            forced = m._forced_tokens()
            if forced:
                step = forced[:1]
            else:
                inside = len(probes) == len(_PROBES) and all(m._allows(t) for t in probes)
                step = next(([t] for t in order(inside) if m._allows(t)), [])
            if not step:
                t = m._any_allowed()
                if t is None:
                    return None
                step = [t]
            if not m._accept(step[0]):
                return None
            path.append(step[0])
        return path
    except Exception:  # noqa: BLE001 - a backend failure: no closing, the request decodes as before
        return None
    finally:
        if path and fork is None:
            owner._rollback(len(path))
