"""``insid3-fast segment-many``: batched targets, resumable, and spread over two gloo processes by torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from checkpoints import write_meta_checkpoint
from insid3_fast.synthetic import make_episode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    weights = write_meta_checkpoint(root / "dinov3_vits16_pretrain_lvd1689m-test.pth")
    refs, masks, _, _ = make_episode(0, 1)
    refs[0].save(root / "ref.png")
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(root / "ref_mask.png")
    (root / "targets").mkdir()
    for i in range(5):
        make_episode(10 + i, 1)[2].save(root / "targets" / f"t{i}.png")
    return root, weights


def _cmd(root, weights, out, launcher):
    return launcher + ["segment-many", "--ref-image", str(root / "ref.png"), "--ref-mask", str(root / "ref_mask.png"),
                       "--target-dir", str(root / "targets"), "--output-dir", str(out), "--weights", str(weights),
                       "--image-size", "128", "--device", "cpu", "--batch-size", "2",
                       "--svd-components", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_torchrun_two_processes_equal_one_process_and_resume(setup, tmp_path):
    root, weights = setup
    env = dict(os.environ, INSID3_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    single = subprocess.run(_cmd(root, weights, tmp_path / "single", [sys.executable, "-m", "insid3_fast.cli"]),
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    assert "5 masks written" in single.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "insid3_fast.cli"]
    multi = subprocess.run(_cmd(root, weights, tmp_path / "multi", torchrun), capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "5 masks written" in multi.stdout and "2 processes" in multi.stdout
    a, b = _masks(tmp_path / "single"), _masks(tmp_path / "multi")
    assert sorted(a) == [f"t{i}.png" for i in range(5)] and sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
        assert a[name].shape == (200, 260)
    # Resume: delete two masks; only those are recomputed, and they come out the same.
    for name in ("t1.png", "t3.png"):
        (tmp_path / "single" / name).unlink()
    again = subprocess.run(_cmd(root, weights, tmp_path / "single", [sys.executable, "-m", "insid3_fast.cli"]),
                           capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "2 masks written, 3 already there" in again.stdout
    assert all(np.array_equal(a[n], m) for n, m in _masks(tmp_path / "single").items())
