"""``insid3-fast bench`` runs every stage and reports consistent records."""

from __future__ import annotations

import json

import pytest

from insid3_fast import ops
from insid3_fast.bench import DEFAULT_STAGES
from insid3_fast.cli import main


@pytest.mark.skipif(not ops.native_available(), reason="native ops not built")
def test_bench_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--sizes", "128", "--shots", "1", "2", "--dim", "32", "--repeats", "1",
                 "--json", str(out), "--backbone", "small"])
    assert code == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    stages = list(DEFAULT_STAGES) + ["backbone", "end_to_end"]
    assert [(r["shots"], r["stage"]) for r in rows] == [(s, st) for s in (1, 2) for st in stages]
    for r in rows:
        assert r["ours_ms"] > 0 and r["reference_ms"] > 0
        assert r["ratio"] == pytest.approx(r["reference_ms"] / r["ours_ms"])
        assert r["stage"] in table
    assert data["meta"]["precision"] == "fp32"
