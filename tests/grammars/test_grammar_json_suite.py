"""The official JSON-Schema-Test-Suite (draft 2020-12 and draft 7) through the default backend.

For every schema that uses only supported keywords, each test instance's compact serialization is
tokenized with the real default-model tokenizer and walked through a matcher: valid instances must be
accepted (then EOS), invalid ones rejected (by the grammar, or by a semantic guard: grammars/guards.py,
counted per keyword). Unsupported schemas are skipped and COUNTED; the per-file
table is printed (run with -s to see it) and written to benchmarks/results/json_schema_test_suite.json.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from .grammar_testlib import SUITE, run_suite

pytestmark = pytest.mark.timeout(300)

# Valid instances we reject on purpose, with the reason (everything else must pass).
KNOWN_DEVIATIONS = {
    # a custom metaschema that turns validation off: we validate anyway
    ("draft2020-12/vocabulary", "no validation: invalid number, but it still validates"),
}


@pytest.fixture(scope="module")
def suite_result(compiler, vocab):
    if not SUITE.exists():
        pytest.skip(f"JSON-Schema-Test-Suite not found at {SUITE}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown formats degrade with a warning, by design
        return run_suite(compiler, vocab)


def test_no_invalid_instance_accepted(suite_result):
    unsound = [f for f in suite_result.failures if f[3] is False]
    assert not unsound, f"{len(unsound)} invalid instances accepted, e.g. {unsound[:5]}"


def test_valid_instances_accepted(suite_result):
    missed = [f for f in suite_result.failures if f[3] is True and (f[0], f[2]) not in KNOWN_DEVIATIONS]
    assert not missed, f"{len(missed)} valid instances rejected, e.g. {missed[:5]}"


def test_report_pass_rate_per_file(suite_result):
    rows = {}
    for name, c in sorted(suite_result.per_file.items()):
        run = c["passed"] + c["failed_valid"] + c["failed_invalid"]
        rows[name] = dict(c, pass_rate=round(c["passed"] / run, 4) if run else None)
    tot = suite_result.totals()
    run = tot["passed"] + tot["failed_valid"] + tot["failed_invalid"]
    print(f"\n{'file':40s} {'pass':>5s} {'fail':>5s} {'skip':>5s}  rate")
    for name, r in rows.items():
        skip = r.get("skipped_schema", 0) + r.get("skipped_format_asserted", 0)
        rate = "-" if r["pass_rate"] is None else f"{r['pass_rate']:.3f}"
        print(f"{name:40s} {r.get('passed', 0):5d} {r.get('failed_valid', 0) + r.get('failed_invalid', 0):5d} "
              f"{skip:5d}  {rate}")
    print(f"TOTAL: {dict(tot)}; pass rate over run tests {tot['passed'] / run:.4f}")
    print(f"invalid instances rejected by a semantic guard, per keyword: {dict(suite_result.per_guard)}")
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    if out.is_dir():
        (out / "json_schema_test_suite.json").write_text(json.dumps({"per_file": rows, "total": dict(tot),
                                                                         "rejected_by_guard": dict(suite_result.per_guard)},
                                                                        indent=1))
    assert run > 1000  # the suite really ran
    assert tot["passed"] / run > 0.99
