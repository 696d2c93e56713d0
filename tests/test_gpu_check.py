"""``make gpu-check`` (benchmarks/gpu_check.sh) rehearsed on this CPU machine.

A lent GPU comes rarely and for minutes, so the script must work the first time. Here it runs
against stand-ins: an ``nvidia-smi`` that names an H200, a ``compute-sanitizer`` and a Python that
record their arguments instead of running. The recorded commands are then checked for real: every
pytest selection collects tests, every ``insid3-fast bench`` line is accepted by the CLI's parser;
and the script's own logic (the steps in order, a failure reported without stopping the rest, the
time budget, the results table and its copy into the device tool's ``$OUT``) is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from insid3_fast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["wheels", "build", "cuda_ops_loaded", "test_ops_cuda", "bench_e2e", "bench_stages",
         "memcheck", "racecheck", "synccheck", "test_all"]

RECORDER = """\
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.environ.get("FAKE_TOOL", "python")] + args) + "\\n")
if "--json" in args:  # as the bench writes its records
    open(args[args.index("--json") + 1], "w").write("{}")
if "FAKE_SPEW_ON" in os.environ and any(os.environ["FAKE_SPEW_ON"] in a for a in args):
    sys.stdout.write(os.urandom(int(os.environ["FAKE_SPEW_BYTES"])).hex() + "\\nTHE LAST LINE\\n")
if "FAKE_SLEEP_ON" in os.environ and any(os.environ["FAKE_SLEEP_ON"] in a for a in args):
    time.sleep(float(os.environ["FAKE_SLEEP"]))
fail = os.environ.get("FAKE_FAIL")
sys.exit(1 if fail and any(fail in a for a in args) else 0)
"""

NVIDIA_SMI = """\
#!/bin/sh
case "$*" in
  *compute_cap*) echo "9.0" ;;
  *driver_version*) echo "570.00" ;;
  *name*) echo "NVIDIA H200" ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def rehearsal(tmp_path):
    """A copy of the script in a bare tree, the stand-ins on PATH; returns run(**env) -> result."""
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("bash and coreutils' timeout are needed")
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "benchmarks" / "gpu_check.sh")
    (tree / ".wheels").mkdir()
    (tree / ".wheels" / "timm-0-py3-none-any.whl").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "recorder.py").write_text(RECORDER)
    _executable(bin_dir / "fake-python", f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "recorder.py"}" "$@"\n')
    _executable(bin_dir / "compute-sanitizer",
                f'#!/bin/sh\nFAKE_TOOL=compute-sanitizer exec "{sys.executable}" "{tmp_path / "recorder.py"}" "$@"\n')
    _executable(bin_dir / "nvidia-smi", NVIDIA_SMI)
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "calls.jsonl"

    def run(sanitizer: bool = True, **extra: str) -> dict:
        log.write_text("")
        if not sanitizer:
            (bin_dir / "compute-sanitizer").unlink()
        for f in out.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "fake-python"),
                   FAKE_LOG=str(log), OUT=str(out), CUDA_HOME="")
        env.update({"GPU_CHECK_BUDGET_S": "300", **extra})
        env.pop("TORCH_CUDA_ARCH_LIST", None)
        proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh")], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=120)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        table = tree / "benchmarks" / "results" / "gpu_NVIDIA-H200.md"
        return dict(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, calls=calls,
                    table=table.read_text() if table.exists() else None, out=out,
                    copied=(out / "gpu_NVIDIA-H200.md").read_text() if (out / "gpu_NVIDIA-H200.md").exists() else None)

    return run


def _rows(table: str) -> dict[str, str]:
    """step -> status, from the script's markdown table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in STEPS:
            rows[cells[0]] = cells[1]
    return rows


def _pytest_args(call: list[str]) -> list[str] | None:
    """The pytest arguments of a recorded call (direct, or under compute-sanitizer), else None."""
    for i in range(len(call) - 1):
        if call[i] == "-m" and call[i + 1] == "pytest":
            return call[i + 2:]
    return None


def test_every_step_runs_in_order_and_the_table_reaches_out(rehearsal):
    r = rehearsal()
    assert r["rc"] == 0, r["stdout"][-3000:] + r["stderr"][-3000:]
    assert "all steps passed" in r["stdout"]
    assert list(_rows(r["table"])) == STEPS
    assert set(_rows(r["table"]).values()) == {"PASS"}
    assert r["copied"] == r["table"]  # what finished comes back through the device tool's $OUT
    assert "NVIDIA H200" in r["table"] and "570.00" in r["table"]
    # the steps again at the very end of the output, which is all the device tool returns of it
    tail = r["stdout"][r["stdout"].rindex("---- steps ----"):].splitlines()[1:]
    assert [line.split()[:2] for line in tail[:len(STEPS)]] == [[s, "PASS"] for s in STEPS]
    build = next(c for c in r["calls"] if c[1:4] == ["-m", "pip", "install"] and "-e" in c)
    assert {"--no-build-isolation", "--no-deps", "-e"} <= set(build)
    sanitizers = [c for c in r["calls"] if c[0] == "compute-sanitizer"]
    assert [c[c.index("--tool") + 1] for c in sanitizers] == ["memcheck", "racecheck", "synccheck"]
    assert all(c[c.index("--error-exitcode") + 1] != "0" for c in sanitizers)


def test_every_recorded_pytest_selection_collects_tests(rehearsal):
    """A -k or -m that selects nothing exits 5 on the GPU: a step lost from a run of minutes."""
    calls = [a for a in map(_pytest_args, rehearsal()["calls"]) if a is not None]
    assert len(calls) == 5  # the CUDA tests, three sanitizer subsets, the rest of the suite
    for args in calls:
        args = [a for a in args if a not in ("-x", "-rs", "-q")]
        if "-n" in args:  # xdist's workers: irrelevant to what is collected
            i = args.index("-n")
            del args[i:i + 2]
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (shlex.join(args), proc.stdout[-2000:], proc.stderr[-2000:])
        found = re.search(r"^(\d+)(?:/\d+)? tests? collected", proc.stdout, re.M)
        assert found and int(found.group(1)) > 0, (shlex.join(args), proc.stdout[-500:])


def test_every_recorded_bench_line_parses(rehearsal):
    calls = [c for c in rehearsal()["calls"] if c[1:3] == ["-m", "insid3_fast.cli"]]
    assert [c[3] for c in calls] == ["bench", "bench"]
    parser = build_parser()
    e2e, stages = (parser.parse_args(c[3:]) for c in calls)
    assert (e2e.device, e2e.backbone, e2e.sizes, e2e.batches, e2e.precision) == \
        ("cuda", "large", [1024], [1, 8, 32], ["fp32", "bf16"])
    assert (stages.device, stages.sizes, stages.shots) == ("cuda", [1024], [1, 5])
    for args in (e2e, stages):
        assert os.path.basename(args.json).startswith("gpu_NVIDIA-H200")


def test_a_failed_step_is_reported_and_the_rest_still_run(rehearsal):
    r = rehearsal(FAKE_FAIL="--backbone")
    assert r["rc"] == 1
    rows = _rows(r["table"])
    assert rows["bench_e2e"].startswith("FAIL") and list(rows) == STEPS
    assert all(v == "PASS" for k, v in rows.items() if k != "bench_e2e")
    assert "STEP FAILED: bench_e2e" in r["stderr"] and "all steps passed" not in r["stdout"]


def test_steps_out_of_time_are_skipped_and_the_run_is_not_called_complete(rehearsal):
    """Wheels that take 3.5 s of a 5 s budget: the build steps (which may start until 100 % of
    it) run, the tests (until 60 %) and all after are skipped, and the script says so in its
    exit status and last line instead of 'all steps passed'."""
    r = rehearsal(GPU_CHECK_BUDGET_S="5", FAKE_SLEEP_ON=".whl", FAKE_SLEEP="3.5")
    rows = _rows(r["table"])
    assert [rows[s] for s in STEPS[:3]] == ["PASS"] * 3
    assert all(rows[s] == "SKIP" for s in STEPS[3:])
    assert r["rc"] == 3, r["stdout"][-2000:]
    assert "all steps passed" not in r["stdout"] and "INCOMPLETE" in r["stderr"]


def test_no_sanitizer_is_a_skip_not_a_pass(rehearsal):
    r = rehearsal(sanitizer=False)
    rows = _rows(r["table"])
    assert [rows[s] for s in ("memcheck", "racecheck", "synccheck")] == ["SKIP"] * 3
    assert rows["test_all"] == "PASS" and r["rc"] == 3


def _archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "gpu_NVIDIA-H200_logs.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_what_reaches_out_fits_the_device_tools_limits(rehearsal):
    """The device tool brings back at most 8 files of at most 16 MiB, at most 2 folders down,
    named in letters, digits, '.', '_' and '-': the table, the bench JSONs, the logs in one archive."""
    r = rehearsal()
    files = [p for p in r["out"].rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu_NVIDIA-H200.md", "gpu_NVIDIA-H200_bench.json",
                                             "gpu_NVIDIA-H200_e2e.json", "gpu_NVIDIA-H200_logs.tar.gz"]
    assert all(p.stat().st_size <= 16 << 20 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert all(len(p.relative_to(r["out"]).parts) <= 3 for p in files)
    assert sorted(_archive(r["out"])) == sorted(f"logs/{s}.log" for s in STEPS)


def test_a_huge_log_comes_back_as_its_tail(rehearsal):
    r = rehearsal(FAKE_SPEW_ON="--backbone", FAKE_SPEW_BYTES=str(3 << 20))  # 6 MiB of hex digits
    log = _archive(r["out"])["logs/bench_e2e.log"]
    assert len(log) == 1 << 20 and log.endswith(b"THE LAST LINE\n")
    assert (r["out"] / "gpu_NVIDIA-H200_logs.tar.gz").stat().st_size <= 16 << 20


def test_an_earlier_runs_files_do_not_come_back_as_this_runs(rehearsal):
    """A warm machine keeps the git-ignored logs/: a second, shorter run sent the first run's logs
    and bench JSONs back, and pasted its bench output into the new table."""
    rehearsal()
    r = rehearsal(GPU_CHECK_BUDGET_S="5", FAKE_SLEEP_ON=".whl", FAKE_SLEEP="3.5")  # the tests skipped
    assert sorted(_archive(r["out"])) == [f"logs/{s}.log" for s in sorted(STEPS[:3])]
    assert sorted(p.name for p in r["out"].iterdir()) == ["gpu_NVIDIA-H200.md", "gpu_NVIDIA-H200_logs.tar.gz"]
