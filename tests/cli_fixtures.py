"""What the CLI tests share: the bundled example files, a tiny Meta-layout checkpoint, a private
positional-basis cache, a call of ``insid3-fast`` that returns (exit code, stdout, stderr), a
small ``segment`` command line and the check that stderr holds one error line.

Import the fixtures by name into a test module (``from cli_fixtures import weights, cache_dir``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import write_meta_checkpoint
from insid3_fast.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REF, MASK, TARGET = EXAMPLES / "ref_cat_image.jpg", EXAMPLES / "ref_cat_mask.png", EXAMPLES / "target_cat_image.jpg"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight ViT-S/16 checkpoint in Meta's layout, once per test module."""
    return write_meta_checkpoint(tmp_path_factory.mktemp("w") / "dinov3_vits16_pretrain_lvd1689m-test.pth")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    """The positional-basis cache in the test's own folder (requested by an autouse fixture)."""
    monkeypatch.setenv("INSID3_CACHE", str(tmp_path / "cache"))


def run(args, capsys):
    """``insid3-fast ARGS`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


#: Model options that keep a CLI run small: 64 px, 16 patches, rank 16.
COMMON = ["--image-size", "64", "--device", "cpu", "--svd-components", "16"]


def segment(weights, output, target=TARGET, ref_mask=MASK, extra=()):
    """The argv of ``insid3-fast segment`` on the example files (``extra`` appended)."""
    return ["segment", "--ref-image", REF, "--ref-mask", ref_mask, "--target", target, "--output", output,
            "--weights", weights, *COMMON, *extra]


def one_error_line(err: str) -> str:
    """The one ``insid3-fast: error: ...`` line of ``err`` (the model's informational line about
    the positional rank may come before it); fails the test otherwise."""
    lines = [ln for ln in err.strip().splitlines() if " positional subspace (embedding size " not in ln]
    assert len(lines) == 1 and lines[0].startswith("insid3-fast: error: "), err
    return lines[0]
