"""The CLI against a demanding user's awkward inputs (a review's findings, each failing before).

Every expected error is one line on stderr and exit status 2, found before the model runs; a
picture shows the target as the model read it.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cli_fixtures import (COMMON, MASK, REF, TARGET, cache_dir, one_error_line, run, segment,  # noqa: F401
                          weights)
from insid3_fast import bench
from insid3_fast.cli import main


@pytest.fixture(autouse=True)
def _private_cache(cache_dir):
    """Every test writes its positional-basis cache in its own folder."""


def one_error(err: str, pattern: str) -> None:
    line = one_error_line(err)
    assert re.search(pattern, line), line


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is built: the error had to come first."""
    import insid3_fast.cli as cli

    def refuse(*a, **k):
        raise AssertionError("the model was built before the bad input was refused")

    monkeypatch.setattr(cli, "_build_model", refuse)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("case,over,pattern", [
    ("stdout", {"--output": "-"}, r"--output - \(standard output\) is not supported"),
    ("empty output", {"--output": ""}, "--output path is empty"),
    ("empty overlay", {"--overlay": ""}, "--overlay path is empty"),
    ("unwritable output folder", {"--output": "/proc/m.png"},  # /proc: no new files, not even for root
     "cannot write 'm.png' in the --output folder '/proc'"),
    ("unwritable overlay folder", {"--overlay": "/proc/o.png"}, "cannot write 'o.png' in the --overlay folder '/proc'"),
    ("a folder as an image", {"--ref-image": "DIR"}, "is a folder, not an image file"),
])
def test_segment_refuses_before_the_model(weights, tmp_path, capsys, no_model, case, over, pattern):
    out = tmp_path / "m.png"
    args = segment(weights, out)
    for key, value in over.items():
        value = str(tmp_path) if value == "DIR" else value
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    code, _, err = run(args, capsys)
    assert code == 2, (case, err)
    one_error(err, pattern)
    assert not out.exists() and not os.path.exists("-")


def test_the_overlay_shows_the_exif_rotated_target(weights, tmp_path, capsys):
    """--exif-transpose with --overlay raised ValueError (the overlay opened the unrotated target)."""
    target = tmp_path / "rotated.jpg"
    picture = Image.open(TARGET).convert("RGB").resize((80, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture.save(target, exif=exif)
    out, overlay = tmp_path / "m.png", tmp_path / "o.png"
    code, _, err = run(segment(weights, out, target=target, extra=["--exif-transpose", "--overlay", overlay]), capsys)
    assert code == 0, err
    assert Image.open(out).size == Image.open(overlay).size == (48, 80)


def test_the_overlay_of_a_16_bit_target_is_what_the_model_read(weights, tmp_path, capsys):
    """A 16-bit target file is read as published (convert('RGB') clips it), with a warning, and
    the overlay shows that image: it showed it scaled while the model read it clipped."""
    target = tmp_path / "g16.png"
    grey = (np.asarray(Image.open(TARGET).convert("L").resize((64, 48)), dtype=np.uint16) * 257)
    Image.fromarray(grey).save(target)
    assert Image.open(target).mode.startswith("I")
    out, overlay = tmp_path / "m.png", tmp_path / "o.png"
    code, _, err = run(segment(weights, out, target=target, extra=["--overlay", overlay]), capsys)
    assert code == 0, err
    shown = np.asarray(Image.open(overlay).convert("L"), dtype=np.float64)
    outside = ~(np.asarray(Image.open(out)) > 0)
    outside &= np.asarray(Image.open(out).filter(ImageFilter.MaxFilter(3))) == 0
    assert outside.any()
    assert "clips them to 0-255" in err
    clipped = np.asarray(Image.open(target).convert("RGB").convert("L"), dtype=np.float64)
    assert np.abs(shown[outside] - clipped[outside]).max() <= 1.0  # what the model read, untinted


def test_segment_many_names_the_clashing_targets_and_skips_folders(weights, tmp_path, capsys, no_model):
    folder = tmp_path / "targets"
    folder.mkdir()
    Image.open(TARGET).save(folder / "a.jpg")
    Image.open(TARGET).save(folder / "a.png")
    (folder / "sub.jpg").mkdir()  # a folder named like an image
    base = ["segment-many", "--ref-image", REF, "--ref-mask", MASK, "--output-dir", tmp_path / "out",
            "--weights", weights, *COMMON]
    code, _, err = run(base + ["--target-dir", folder], capsys)
    assert code == 2
    one_error(err, r"share a file name.*'.*a\.jpg' and '.*a\.png'")
    from insid3_fast.cli import _list_targets
    from types import SimpleNamespace

    (folder / "a.png").unlink()
    assert _list_targets(SimpleNamespace(target=None, target_dir=str(folder))) == [str(folder / "a.jpg")]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("output_dir,pattern", [
    ("", "--output-dir is empty"),
    ("/proc/masks", "cannot create the --output-dir folder '/proc/masks'"),
])
def test_segment_many_checks_its_folder_before_the_model(weights, tmp_path, capsys, no_model, output_dir, pattern):
    code, _, err = run(["segment-many", "--ref-image", REF, "--ref-mask", MASK, "--target", TARGET,
                        "--output-dir", output_dir, "--weights", weights, *COMMON], capsys)
    assert code == 2
    one_error(err, pattern)


@pytest.mark.parametrize("flags,pattern", [
    (["--shots", "0"], "--shots must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--dim", "-5"], "--dim must be at least 1, got -5"),
    (["--sizes", "8"], "--sizes must be at least 16, got 8"),
    (["--sizes", "160000"], "--sizes above 4096 px are not benchmarked"),
    (["--published", "NOPE"], "is not a clone of visinf/INSID3"),
    (["--json", "DIR"], "--json '.*' is a folder"),
    (["--json", "/proc/b.json"], "cannot write 'b.json' in the --json folder '/proc'"),
])
def test_bench_checks_its_arguments_before_timing(tmp_path, capsys, monkeypatch, flags, pattern):
    if "/proc" in " ".join(flags) and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(bench, "build_case", lambda *a, **k: pytest.fail("timing started"))
    flags = [str(tmp_path / "nope") if f == "NOPE" else str(tmp_path) if f == "DIR" else f for f in flags]
    code, _, err = run(["bench", "--sizes", "64", "--dim", "32", "--repeats", "1", *flags], capsys)
    assert code == 2, err
    one_error(err, pattern)


def test_published_module_names_an_import_failure(tmp_path):
    from insid3_fast.errors import InputError

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "insid3.py").write_text("import no_such_module_here\n")
    with pytest.raises(InputError, match="cannot import the published code .*ModuleNotFoundError"):
        bench.published_module(str(tmp_path))


def test_usage_errors_are_one_line(capsys):
    """argparse printed its usage block (about 11 lines) before the error."""
    for argv in (["segment", "--connectivity", "5"], ["bench", "--device", "tpu"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("insid3-fast") and ": error: " in err, err


def test_bench_prints_no_cpp_extension_warning(capfd, monkeypatch):
    """torch.utils.benchmark imports cpp_extension, which warned about a missing CUDA toolkit."""
    import sys

    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    for name in [m for m in sys.modules if m.startswith(("torch.utils.benchmark", "torch.utils.cpp_extension"))]:
        monkeypatch.delitem(sys.modules, name)
    bench.time_fn(lambda: None, bench.torch.device("cpu"), repeats=1)
    assert "No CUDA runtime is found" not in capfd.readouterr().err


def test_a_garbage_checkpoint_does_not_advise_unsafe_loading(tmp_path):
    from insid3_fast.backbone import formats
    from insid3_fast.errors import WeightsError

    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WeightsError) as info:
        formats._load_pth(path)
    message = str(info.value)
    assert "truncated or corrupt" in message and "weights_only" not in message, message


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_eval_checks_its_output_folder_first(tmp_path, capsys):
    """eval --output-dir /proc/x raised FileNotFoundError (exit 1) from os.makedirs."""
    code, _, err = run(["eval", "--dataset", "isic", "--data-root", tmp_path / "nodata", "--output-dir",
                        "/proc/insid3-eval", "--no-progress"], capsys)
    assert code == 2
    one_error(err, "cannot create the --output-dir folder '/proc/insid3-eval'")


def test_the_packages_own_warnings_are_one_line(capsys, monkeypatch):
    """A recomputed cache entry's RuntimeWarning was shown as Python shows it: two lines, a path."""
    import warnings

    import insid3_fast.core as core
    from insid3_fast import cli

    cli._show_warning(RuntimeWarning("positional-basis cache entry 'x' was not used"), RuntimeWarning,
                      core.__file__, 147)
    assert capsys.readouterr().err == "insid3-fast: warning: positional-basis cache entry 'x' was not used\n"
    shown = []
    monkeypatch.setattr(cli, "_python_showwarning", lambda *a, **k: shown.append(a[0]))
    cli._show_warning(UserWarning("from elsewhere"), UserWarning, warnings.__file__, 1)
    assert "insid3-fast: warning" not in capsys.readouterr().err and str(shown[0]) == "from elsewhere"


def _match(weights, tmp_path, points):
    import json

    kps = tmp_path / "k.json"
    kps.write_text(json.dumps(points) if not isinstance(points, str) else points)
    out = tmp_path / "pred.json"
    return ["match", "--ref-image", REF, "--target", TARGET, "--keypoints", kps, "--output", out,
            "--weights", weights, *COMMON], out


def test_match_writes_valid_json_for_non_finite_keypoints(weights, tmp_path, capsys):
    """NaN keypoints gave NaN predictions written as bare NaN tokens: not JSON (other readers refuse it)."""
    import json

    args, out = _match(weights, tmp_path, "[[10, 12], [NaN, 3], [1e400, 2]]")
    code, _, err = run(args, capsys)
    assert code == 0, err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["keypoints"][1] == [None, None] and data["keypoints"][2] == [None, None]
    assert data["source_keypoints"][1] == [None, 3.0]
    assert all(isinstance(v, float) for v in data["keypoints"][0])


def test_match_warns_about_keypoints_outside_the_reference(weights, tmp_path, capsys):
    """Points outside the image were clamped to the edge patch silently (as published: still so)."""
    args, out = _match(weights, tmp_path, [[-10, -5], [1e9, 1e9], [5, 5]])
    code, _, err = run(args, capsys)
    assert code == 0 and "warning: 2 of 3 keypoints lie outside the reference image" in err


def test_match_refuses_booleans_as_coordinates(weights, tmp_path, capsys, no_model):
    args, _ = _match(weights, tmp_path, [[True, False]])
    code, _, err = run(args, capsys)
    assert code == 2
    one_error(err, "true/false where coordinates belong")


def test_a_weights_folder_of_another_size_says_which(tmp_path, monkeypatch):
    """The folder's only checkpoint was a ViT-S: the message said only 'no large weights found'."""
    from insid3_fast.errors import WeightsError
    from insid3_fast.model import find_weights

    (tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="a 'small' checkpoint: pass --model-size small"):
        find_weights("large", tmp_path)
    monkeypatch.setenv("INSID3_WEIGHTS", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"\$INSID3_WEIGHTS = '.*elsewhere' and pretrain/"):
        find_weights("large")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="no config.json: a Hugging Face folder needs both"):
        find_weights("large", hf)


def test_a_warning_is_shown_once_per_command(weights, tmp_path, capsys):
    """Inputs checked before the model loads them again warned twice (a tiny target, here)."""
    tiny = tmp_path / "tiny.png"
    Image.open(TARGET).convert("RGB").resize((1, 1)).save(tiny)  # smaller than a patch: warned
    import subprocess
    import sys

    def warned(out):  # as a user runs it: pytest's own warning filters dedupe what Python's do not
        proc = subprocess.run([sys.executable, "-m", "insid3_fast.cli",
                               *map(str, segment(weights, tmp_path / out, target=tiny))],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="default"))
        assert proc.returncode == 0, proc.stderr
        return [ln for ln in proc.stderr.splitlines() if ln.startswith("insid3-fast: warning: ")]

    first = warned("m.png")
    assert first and len(first) == len(set(first)), first
    from insid3_fast import cli

    cli._SHOWN.add("insid3-fast: warning: stale")
    args = segment(weights, tmp_path / "m3.png")
    args[args.index("--ref-image") + 1] = tmp_path / "none.jpg"
    assert run(args, capsys)[0] == 2  # main() starts each command afresh
    assert "insid3-fast: warning: stale" not in cli._SHOWN


def test_an_output_name_too_long_for_its_temporary_is_refused_first(weights, tmp_path, capsys, no_model):
    """The probe used a short name; a 240-character output passed it, then the real temporary
    (43 characters longer) failed with ENAMETOOLONG after the work."""
    out = tmp_path / ("a" * 240 + ".png")
    code, _, err = run(segment(weights, out), capsys)
    assert code == 2
    one_error(err, "cannot write 'a+\\.png' in the --output folder .*File name too long")


def test_a_finished_run_in_a_read_only_folder_resumes(tmp_path):
    """Nothing left to write: the folder needs no write check (names=())."""
    from insid3_fast.atomic import make_output_folder

    assert make_output_folder(str(tmp_path), "--output-dir", []) == str(tmp_path)
    assert not any(tmp_path.iterdir())


def test_ctrl_c_while_the_parser_is_built_is_one_line(capsys, monkeypatch):
    """Building the parser imports the bench and eval modules; a Ctrl-C there gave a traceback.
    (One during `import insid3_fast` itself, torch's import, still does: not handled.)"""
    from insid3_fast import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["segment"]) == 130
    assert capsys.readouterr().err == "insid3-fast: interrupted\n"


def _without_root_file_powers():
    """A preexec function for a subprocess that obeys file permissions although it runs as root.

    Root ignores a folder's mode through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; dropped from
    the bounding set before exec, they stay dropped in the new program. None when not root.
    """
    if os.geteuid() != 0:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2

    def drop():
        for cap in (cap_dac_override, cap_dac_read_search):
            if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    import subprocess
    import sys

    try:  # a root without CAP_SETPCAP (some containers) cannot drop them: then nothing checks this
        subprocess.run([sys.executable, "-c", ""], preexec_fn=drop, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"running as root and cannot drop its file capabilities here ({exc})")
    return drop


def test_segment_many_resumes_in_a_read_only_folder(weights, tmp_path):
    """A finished run's read-only folder: the rerun has nothing to write and exits 0; with a mask
    left to write it is refused in one line before the model runs (under root, without the
    capabilities that let root write read-only folders)."""
    import shutil
    import subprocess
    import sys

    demote = _without_root_file_powers()
    out, cache, targets = (str(tmp_path / n) for n in ("out", "cache", "targets"))
    os.mkdir(targets)
    try:
        shutil.copy(TARGET, os.path.join(targets, "a.jpg"))
        base = [sys.executable, "-c", "import sys; from insid3_fast.cli import main; sys.exit(main())",
                "segment-many", "--ref-image", str(REF), "--ref-mask", str(MASK), "--output-dir", out,
                "--weights", str(weights), *COMMON]
        env = {**os.environ, "INSID3_CACHE": cache}

        def again(*extra):
            return subprocess.run(base + list(extra), env=env, capture_output=True, text=True,
                                  preexec_fn=demote, timeout=300)

        first = again("--target-dir", targets)
        assert first.returncode == 0, first.stderr
        os.chmod(out, 0o555)
        resumed = again("--target-dir", targets)
        assert resumed.returncode == 0, resumed.stderr
        assert "0 masks written, 1 already there" in resumed.stdout
        shutil.copy(TARGET, os.path.join(targets, "b.jpg"))
        refused = again("--target-dir", targets)
        assert refused.returncode == 2, refused.stderr
        line = one_error_line(refused.stderr)
        assert "--output-dir" in line and "'b.png'" in line, line
        assert sorted(os.listdir(out)) == ["a.png"]
    finally:
        if os.path.isdir(out):
            os.chmod(out, 0o755)  # for pytest's clean-up of tmp_path
