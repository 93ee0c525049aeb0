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
at most the path length + `MARGIN`, the mask allows only the path's next token. When no path fits in
the budget left, `greedy_path_length` (one walk past the budget) says how far the end is, and the
next check waits accordingly (`GrammarMatcher._budget_backoff`).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Optional, Sequence

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
# The greedy walk demotes a token it picked this many times in a row: a number's "0" (or a key's "a")
# repeated loops until the limit where "," ends the value (Glaiveai2K generate_invoice on the model).
# Closers (`}`, `]}`, ...) are exempt on the first walk: each closes a level, so repeating them is
# progress; demoting `}}` at depth > 6 made the walk open keys forever (Github_medium o69631 on the
# model, `{"type":` nested ~200 deep: no greedy path, the fallback's 40-400 came too late). A closer
# repeated as string content (a pattern string that takes no quote yet) loops instead: the second walk
# demotes closers too.
_TIRED = 3
_CLOSER_BYTES = frozenset(b'"}])>')
_SUFFIXES: dict[tuple[int, bytes], tuple["Vocabulary", list[list[int]]]] = {}
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
    greedy walk nor the witness walks nor the seeded fallback walks (up to `fallback_limit` tokens,
    default `limit`) get there (or the backend cannot tell). Witnesses (`m.witnesses`,
    sgl.grammars.witness: strings matching the schema's patterns and formats) are written in full where
    a string opens and a quote cannot close it yet; a witness walk first writes the shortest suffix of
    one that the current string takes."""
    in_string, elsewhere, probes, pool = _candidates(m.vocab)
    greedy = lambda inside: in_string if inside else elsewhere  # noqa: E731
    wit = _witness_suffixes(m.vocab, getattr(m, "witnesses", ()))
    starts = [suffixes[-1] for suffixes in wit if suffixes]  # each witness in full
    best = _walk(m, limit, greedy, probes, starts=starts, tire_closers=False)
    if best is None:
        best = _walk(m, limit, greedy, probes, starts=starts)
    if best is not None:
        return best
    limit = limit if fallback_limit is None else min(limit, fallback_limit)
    for suffixes in wit:
        best = _shorter(best, _witness_walk(m, suffixes, limit if best is None else len(best) - 1, greedy, probes,
                                            starts))
    for seed in range(_RETRIES):
        rng = random.Random(seed)
        order = list(pool)
        best = _shorter(best, _walk(m, limit if best is None else len(best) - 1,
                                    lambda inside: rng.sample(order, len(order)), probes, starts=starts))
    return best


def greedy_path_length(m: "GrammarMatcher", limit: int) -> Optional[int]:
    """The length of the first greedy walk's path (closers never tired) within `limit` tokens, or None:
    how far the end is when `closing_path` found nothing within the budget (a measure, not a path to
    follow; one walk, no fallbacks)."""
    in_string, elsewhere, probes, _ = _candidates(m.vocab)
    starts = [suffixes[-1] for suffixes in _witness_suffixes(m.vocab, getattr(m, "witnesses", ())) if suffixes]
    path = _walk(m, limit, lambda inside: in_string if inside else elsewhere, probes, starts=starts,
                 tire_closers=False)
    return None if path is None else len(path)


def _witness_walk(m: "GrammarMatcher", suffixes: list[list[int]], limit: int, order: Callable[[bool], list[int]],
                  probes: list[int], starts: list[list[int]]) -> Optional[list[int]]:
    r"""The first suffix of a witness (shortest first: the most progress already made) that the matcher
    allows, written out and closed by a quote where the grammar takes one, then the greedy walk to the end.
    NOTE: the quote first: a pattern string takes no `}`, so the walk does not know it is inside a string
    and prefers "0" to `"`; after `.php` of `^[\w\-\./]+\.php+$` it wrote "0" and never matched again
    (Github_medium o63939 on the model: no path, the output ended on length unparsed)."""
    quote = probes[:1]
    for toks in suffixes:
        if not toks or len(toks) >= limit or not m._allows(toks[0]):
            continue
        for prefix in ([*toks, *quote], toks) if quote else (toks,):
            path = _walk(m, limit, order, probes, prefix, starts)
            if path is not None:
                return path
    return None


def _witness_suffixes(vocab: "Vocabulary", witnesses: tuple[bytes, ...]) -> list[list[list[int]]]:
    """Per witness, its non-empty suffixes (shortest first) as token ids (cached per vocabulary)."""
    out = []
    for w in witnesses:
        key = (id(vocab), w)
        cached = _SUFFIXES.get(key)
        if cached is None or cached[0] is not vocab:
            try:
                cached = (vocab, [toks for toks in (vocab.encode(w[k:]) for k in range(len(w) - 1, -1, -1)) if toks])
            except Exception:  # noqa: BLE001 - a test vocabulary without a tokenizer
                cached = (vocab, [])
            _SUFFIXES[key] = cached
        out.append(cached[1])
    return out


def _take_one_of(m: "GrammarMatcher", options: list[list[int]], room: int) -> list[int]:
    """Accept the first option the grammar takes in full (within `room` tokens); [] if none. A
    partly taken option is rolled back (each token is checked before it is accepted: no error state)."""
    for toks in options:
        if not toks or len(toks) > room or not m._allows(toks[0]):
            continue
        k = 0
        while k < len(toks) and m._allows(toks[k]) and m._accept(toks[k]):
            k += 1
        if k == len(toks):
            return list(toks)
        if k:
            m._rollback(k)
    return []


def _is_closer(vocab: "Vocabulary", token_id: int) -> bool:
    text = vocab.token_bytes[token_id] or b""
    return bool(text) and all(c in _CLOSER_BYTES for c in text)


def _shorter(a: Optional[list[int]], b: Optional[list[int]]) -> Optional[list[int]]:
    return b if a is None or (b is not None and len(b) < len(a)) else a


def _walk(m: "GrammarMatcher", limit: int, order: Callable[[bool], list[int]], probes: list[int],
          prefix: Sequence[int] = (), starts: Sequence[list[int]] = (), tire_closers: bool = True) -> Optional[list[int]]:
    """One walk from the matcher's state: `prefix` first (None if the grammar refuses it), then forced
    tokens, else (right after a quote, when a quote cannot follow: a string with a pattern or format
    opened) the first of `starts` the grammar takes in full, else the first allowed token of
    `order(inside a string)`, else any allowed token. A token picked _TIRED times in a row goes last
    (closers too only with `tire_closers`). The matcher is left where it started."""
    path: list[int] = []
    tired: set[int] = set()
    run = 0
    fork = m._fork()
    owner, m = m, (fork if fork is not None else m)  # walk the fork if there is one: nothing to undo
    try:
        while not m._can_end():
            if len(path) >= limit:
                return None
            if len(path) < len(prefix):
                if not m._allows(prefix[len(path)]):
                    return None
                if not m._accept(prefix[len(path)]):
                    return None
                path.append(prefix[len(path)])
                continue
            forced = m._forced_tokens()
            if not forced and starts and path and (m.vocab.token_bytes[path[-1]] or b"").endswith(b'"') \
                    and not m._allows(probes[0]):
                taken = _take_one_of(m, list(starts), limit - len(path))
                if taken:
                    path += taken
                    continue
            if forced:
                step = forced[:1]
            else:
                inside = len(probes) == len(_PROBES) and all(m._allows(t) for t in probes)
                ranked = order(inside)
                if tired:  # NOTE: a token picked _TIRED times in a row goes last ("0" forever in a number)
                    ranked = [t for t in ranked if t not in tired] + [t for t in ranked if t in tired]
                step = next(([t] for t in ranked if m._allows(t)), [])
                run = run + 1 if step and path and step[0] == path[-1] else 1
                if step and run >= _TIRED and (tire_closers or not _is_closer(m.vocab, step[0])):
                    tired.add(step[0])
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
