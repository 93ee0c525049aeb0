"""Coverage-guided fuzzing with atheris (libFuzzer), opt-in: `make fuzz-atheris` (ATHERIS_SECONDS per
target, default 60). Not collected by pytest; the same properties run in CI with hypothesis
(test_parsers_fuzz.py, test_limits_unit.py).

    python tests/fuzz/atheris_targets.py schema -max_total_time=60
    python tests/fuzz/atheris_targets.py gguf -max_total_time=60 /tmp/gguf-corpus

Targets and their property (anything else raised, or a hang, is a finding; libFuzzer saves the input):
- schema: the JSON-schema normalizer on fuzzed JSON raises nothing but GrammarError.
- gguf:   the GGUF reader on mutated files raises nothing but GGUFError (seeded with a valid file).
- limits: the grammar-size estimate on fuzzed regexes / schemas raises nothing but RequestError.
- paths:  resolve_allowed_path never returns a path outside its root (PathNotAllowed otherwise).
- errors: param_of on fuzzed messages returns None or a prefix of the message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["sgl"]):  # only our code: instrumenting torch takes minutes
    from sgl.grammars.errors import GrammarError
    from sgl.grammars.json_schema import normalize
    from sgl.runtime.limits import grammar_size
    from sgl.runtime.models.gguf_file import GGUFError, GGUFFile
    from sgl.runtime.protocol import RequestError
    from sgl.runtime.security import PathNotAllowed, resolve_allowed_path
    from sgl.runtime.server.errors import param_of

TMP = Path(tempfile.mkdtemp(prefix="sgl-atheris-"))
ROOT = TMP / "root"
(ROOT / "a" / "b").mkdir(parents=True, exist_ok=True)
(TMP / "outside").mkdir(exist_ok=True)
if not (ROOT / "link").exists():
    (ROOT / "link").symlink_to(TMP / "outside")


def _json(data: bytes) -> object:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(len(data))
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def schema(data: bytes) -> None:
    value = _json(data)
    try:
        normalize(value if isinstance(value, (dict, bool)) else json.dumps(value))
    except GrammarError:
        pass


def gguf(data: bytes) -> None:
    path = TMP / f"x{os.getpid()}.gguf"
    path.write_bytes(data)
    try:
        GGUFFile(str(path))
    except GGUFError:
        pass


def limits(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.PickValueInList(["regex", "json_schema", "choices", "ebnf"])
    text = fdp.ConsumeUnicodeNoSurrogates(4096)
    try:
        grammar_size(kind, text)
        grammar_size(kind, _json(text.encode()))
    except RequestError:
        pass


def paths(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(512)
    try:
        got = resolve_allowed_path(text, str(ROOT))
    except PathNotAllowed:
        return
    real_root = ROOT.resolve()
    if not (got == real_root or got.is_relative_to(real_root)):
        raise AssertionError(f"{text!r} resolved outside the root: {got}")


def errors(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(256)
    p = param_of(text)
    if p is not None and not text.startswith(p):
        raise AssertionError((text, p))


TARGETS = {"schema": schema, "gguf": gguf, "limits": limits, "paths": paths, "errors": errors}


def _seed_gguf(corpus: Path) -> None:
    """A small valid GGUF to start from (libFuzzer mutates it)."""
    import gguf as gguf_writer
    import numpy as np
    corpus.mkdir(parents=True, exist_ok=True)
    w = gguf_writer.GGUFWriter(str(corpus / "seed.gguf"), "llama")
    w.add_uint32("a.u32", 7)
    w.add_string("a.str", "héllo")
    w.add_array("a.arr", [1, 2, 3])
    w.add_tensor("t0", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dir]")
    name = sys.argv.pop(1)
    args = list(sys.argv)
    if name == "gguf" and not any(not a.startswith("-") for a in args[1:]):
        corpus = TMP / "gguf-corpus"
        _seed_gguf(corpus)
        args.append(str(corpus))
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
