"""``insid3-fast`` end to end on the bundled examples with a tiny Meta-layout checkpoint, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli_fixtures import MASK, REF, TARGET, cache_dir, run, weights  # noqa: F401 (fixtures)



@pytest.fixture(autouse=True)
def _private_cache(cache_dir):
    """Every test writes its positional-basis cache in its own folder."""


def seg_args(weights, out, **over):
    args = {"--ref-image": REF, "--ref-mask": MASK, "--target": TARGET, "--output": out,
            "--weights": weights, "--image-size": 128, "--device": "cpu", "--svd-components": 32}
    args.update(over)
    return ["segment"] + [x for k, v in args.items() if v is not None for x in (k, v)]


def test_segment_end_to_end(weights, tmp_path, capsys):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code, stdout, err = run(seg_args(weights, out, **{"--overlay": overlay}), capsys)
    assert code == 0, err
    mask = np.array(Image.open(out))
    target = Image.open(TARGET)
    assert mask.shape == (target.height, target.width)
    assert set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == target.size
    assert "pixels in the mask" in stdout
    assert not list(tmp_path.glob(".insid3-*")) and not list(tmp_path.glob("*.insid3-tmp"))


def test_segment_two_shots_and_reference_backend(weights, tmp_path, capsys):
    args = seg_args(weights, tmp_path / "a.png") + ["--ref-image", str(REF), "--ref-mask", str(MASK)]
    assert run(args, capsys)[0] == 0
    assert run(seg_args(weights, tmp_path / "b.png", **{"--backend": "reference"}), capsys)[0] == 0
    assert run(seg_args(weights, tmp_path / "c.png") + ["--crf"], capsys)[0] == 0
    assert np.array(Image.open(tmp_path / "c.png")).shape == np.array(Image.open(tmp_path / "a.png")).shape
    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")), np.array(Image.open(tmp_path / "b.png")))


def test_match_end_to_end(weights, tmp_path, capsys):
    kps = tmp_path / "kps.json"
    kps.write_text(json.dumps({"keypoints": [[100, 120], [300, 200]]}))
    out = tmp_path / "out.json"
    code, _, err = run(["match", "--ref-image", REF, "--target", TARGET, "--keypoints", kps, "--output", out,
                        "--weights", weights, "--image-size", 128, "--device", "cpu",
                        "--svd-components", 32], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert len(result["keypoints"]) == 2
    w, h = Image.open(TARGET).size
    assert all(0 <= x <= w and 0 <= y <= h for x, y in result["keypoints"])


def _small_image(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (12, 40)).save(path)
    return path


def test_segment_a_target_smaller_than_a_patch_with_a_warning(weights, tmp_path, capsys):
    """Resized like any other image (the published behaviour), with a warning; the mask has the
    target's own size."""
    out = tmp_path / "m.png"
    code, _, err = run(seg_args(weights, out, **{"--target": _small_image(tmp_path)}), capsys)
    assert code == 0, err
    assert "smaller than one 16x16 patch" in err
    assert Image.open(out).size == (12, 40)


def _empty_mask(tmp_path):
    path = tmp_path / "empty.png"
    Image.new("L", Image.open(REF).size).save(path)
    return path


def _wrong_size_mask(tmp_path):
    path = tmp_path / "wrong.png"
    Image.new("L", (50, 50), 255).save(path)
    return path


def _junk(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    return path


@pytest.mark.parametrize("case,over,message", [
    ("missing ref", lambda t: {"--ref-image": t / "nope.jpg"}, "not found: '.*nope.jpg'"),
    ("unreadable target", lambda t: {"--target": _junk(t)}, "cannot read image file '.*junk.jpg'"),
    ("empty mask", lambda t: {"--ref-mask": _empty_mask(t)}, "empty.png.*empty"),
    ("mismatched sizes", lambda t: {"--ref-mask": _wrong_size_mask(t)}, "wrong.png.*same size"),
    ("unknown size", lambda t: {"--model-size": "gigantic"}, "unknown model size 'gigantic'"),
    ("missing weights", lambda t: {"--weights": t / "none.pth"}, "DINOv3.*github.com/facebookresearch/dinov3"),
    ("bad image size", lambda t: {"--image-size": 100}, "multiple of 16"),
    ("missing output folder", lambda t: {"--output": t / "no" / "such" / "m.png"}, "output folder does not exist"),
])
def test_bad_input_fails_cleanly(weights, tmp_path, capsys, case, over, message):
    out = tmp_path / "mask.png"
    args = seg_args(weights, out)
    for key, value in over(tmp_path).items():
        if key in args:
            args[args.index(key) + 1] = str(value)
        else:
            args += [key, str(value)]
    code, stdout, err = run(args, capsys)
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("insid3-fast: error: "), err
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".insid3-*")) and not list(tmp_path.glob("*.insid3-tmp"))


def test_unequal_image_and_mask_counts(weights, tmp_path, capsys):
    args = seg_args(weights, tmp_path / "m.png") + ["--ref-image", str(REF)]
    code, _, err = run(args, capsys)
    assert code == 2 and "one --ref-mask per --ref-image" in err


def test_bad_keypoints_file(weights, tmp_path, capsys):
    kps = tmp_path / "k.json"
    kps.write_text("[[1, 2, 3]]")
    code, _, err = run(["match", "--ref-image", REF, "--target", TARGET, "--keypoints", kps,
                        "--weights", weights, "--image-size", 128, "--device", "cpu",
                        "--svd-components", 32], capsys)
    assert code == 2 and "[x, y] pairs" in err


def test_console_script_has_no_traceback(tmp_path):
    env = dict(os.environ, INSID3_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "insid3_fast.cli", "segment", "--ref-image", str(tmp_path / "x.jpg"),
                           "--ref-mask", str(MASK), "--target", str(TARGET), "--output", str(tmp_path / "o.png")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_segment_many_rejects_a_bad_batch_size(weights, tmp_path, capsys):
    code, _, err = run(["segment-many", "--ref-image", REF, "--ref-mask", MASK, "--target", TARGET,
                        "--output-dir", tmp_path / "out", "--weights", weights, "--batch-size", 0,
                        "--device", "cpu"], capsys)
    assert code == 2 and "--batch-size must be at least 1" in err
