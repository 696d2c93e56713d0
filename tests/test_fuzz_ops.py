"""A bounded run of the op fuzz harness (tests/fuzz_ops.py; the full run is `make fuzz`)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_ops  # noqa: E402


def test_fuzz_ops_bounded():
    cases = int(os.environ.get("INSID3_FUZZ_CASES", "120"))
    pairs = [(op, api) for op in fuzz_ops.OPS for api in fuzz_ops.APIS]
    summary = fuzz_ops.drive(cases, cases, seed=2024, mem_gb=3.0, timeout=600, pairs=pairs, quiet=True)
    bad = {k: v for k, v in summary.items() if v["crash"] or v["failures"]}
    assert not bad, bad
    for key, tot in summary.items():
        assert tot["ok"] + tot["input_error"] + tot["oom"] == cases, (key, tot)
        assert tot["ok"] > 0 and tot["input_error"] > 0, (key, tot)  # both kinds of input were drawn
