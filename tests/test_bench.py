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


@pytest.mark.skipif(not ops.native_available(), reason="native ops not built")
def test_bench_grid_of_precisions_and_batches(tmp_path, capsys):
    """The GPU table's grid (make gpu-check): end to end per precision and batch size, the
    reference (one fp32 episode at a time) timed once per case and shared by the grid."""
    out = tmp_path / "grid.json"
    code = main(["bench", "--sizes", "128", "--shots", "1", "--dim", "32", "--repeats", "1", "--stages", "episode",
                 "--batches", "1", "3", "--precision", "fp32", "bf16", "--json", str(out), "--backbone", "small"])
    assert code == 0
    capsys.readouterr()
    rows = json.loads(out.read_text())["rows"]
    e2e = [r for r in rows if r["stage"] == "end_to_end"]
    assert [(r["batch"], r["precision"]) for r in e2e] == [(1, "fp32"), (1, "bf16"), (3, "fp32"), (3, "bf16")]
    assert len({r["reference_ms"] for r in e2e}) == 1
    assert [(r["stage"], r["batch"]) for r in rows if r["stage"] == "episode"] == [("episode", 1), ("episode", 3)]
    assert main(["bench", "--batches", "0"]) == 2
    assert "--batches must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(not ops.native_available(), reason="native ops not built")
def test_bench_interrupted_keeps_the_cases_measured(tmp_path, capsys, monkeypatch):
    """A SIGINT (make gpu-check's time budget) mid-grid: the table and JSON of the finished cases."""
    from insid3_fast import bench

    real, calls = bench.measure, []

    def measure(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(bench, "measure", measure)
    out = tmp_path / "part.json"
    code = main(["bench", "--sizes", "128", "--shots", "1", "2", "--dim", "32", "--repeats", "1",
                 "--stages", "episode", "--json", str(out)])
    assert code == 130
    data = json.loads(out.read_text())
    assert data["meta"]["interrupted"] is True
    assert [(r["shots"], r["stage"]) for r in data["rows"]] == [(1, "episode")]
    assert "interrupted" in capsys.readouterr().err
