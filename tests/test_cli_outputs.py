"""CLI outputs never destroy data: inputs, non-regular files and earlier outputs survive every failure."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insid3_fast import atomic
from cli_fixtures import (COMMON, MASK, REF, TARGET, cache_dir, one_error_line, run, segment,  # noqa: F401
                          weights)


@pytest.fixture(autouse=True)
def _private_cache(cache_dir):
    """Every test writes its positional-basis cache in its own folder."""


def temporaries(folder: Path) -> list[Path]:
    return list(folder.glob("*" + atomic.TEMP_SUFFIX))


def test_output_equal_to_the_target_is_refused(weights, tmp_path, capsys):
    target = tmp_path / "photo.png"
    Image.open(TARGET).save(target)
    before = target.read_bytes()
    code, _, err = run(segment(weights, target, target=target), capsys)
    assert code == 2 and "also an input" in one_error_line(err)
    assert target.read_bytes() == before


def test_output_equal_to_a_reference_mask_through_another_spelling_is_refused(weights, tmp_path, capsys):
    mask = tmp_path / "m.png"
    mask.write_bytes(MASK.read_bytes())
    os.link(mask, tmp_path / "hardlink.png")
    code, _, err = run(segment(weights, tmp_path / "hardlink.png", ref_mask=mask), capsys)
    assert code == 2 and "also an input" in one_error_line(err)
    assert mask.read_bytes() == MASK.read_bytes()


def test_output_equal_to_overlay_is_refused(weights, tmp_path, capsys):
    out = tmp_path / "m.png"
    code, _, err = run(segment(weights, out, extra=["--overlay", out]), capsys)
    assert code == 2 and "same file" in one_error_line(err)


def test_overlay_failure_keeps_the_previous_output(weights, tmp_path, capsys, monkeypatch):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    out.write_bytes(b"the previous mask")
    overlay.write_bytes(b"the previous overlay")

    class Broken:
        def save(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    import insid3_fast.visualize

    monkeypatch.setattr(insid3_fast.visualize, "overlay_mask", lambda image, mask: Broken())
    code, _, err = run(segment(weights, out, extra=["--overlay", overlay]), capsys)
    assert code == 1 and "No space left" in one_error_line(err)
    assert out.read_bytes() == b"the previous mask"
    assert overlay.read_bytes() == b"the previous overlay"
    assert not temporaries(tmp_path)


def test_fifo_output_is_refused_and_kept(weights, tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code, _, err = run(segment(weights, fifo), capsys)
    assert code == 2 and "a FIFO, not a regular file" in one_error_line(err)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_symlink_output_is_refused_and_kept(weights, tmp_path, capsys):
    real = tmp_path / "real.png"
    real.write_bytes(b"keep me")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    code, _, err = run(segment(weights, link), capsys)
    assert code == 2 and "symbolic link" in one_error_line(err)
    assert link.is_symlink() and real.read_bytes() == b"keep me"


def test_device_output_is_refused(weights, tmp_path, capsys):
    # A device node of our own, never a system one: the unfixed code replaced the file it was given.
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("creating a device node needs root (the check itself: test_check_output_path_kinds)")
    code, _, err = run(segment(weights, device), capsys)
    assert code == 2 and "character device" in one_error_line(err)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


@pytest.mark.parametrize("kind, name", [(stat.S_IFCHR, "character device"), (stat.S_IFBLK, "block device"),
                                        (stat.S_IFSOCK, "socket"), (stat.S_IFDIR, "folder")])
def test_check_output_path_kinds(tmp_path, monkeypatch, kind, name):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    real_lstat = os.lstat

    class Fake:
        st_mode = kind | 0o644

    monkeypatch.setattr(atomic.os, "lstat", lambda p: Fake() if os.fspath(p) == str(path) else real_lstat(p))
    with pytest.raises(atomic.InputError, match=name):
        atomic.check_output_path(path)


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_outputs_follow_the_umask(weights, tmp_path, capsys, umask, expected):
    out = tmp_path / "mask.png"
    old = os.umask(umask)
    try:
        code, _, err = run(segment(weights, out, extra=["--overlay", tmp_path / "o.png"]), capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "o.png").stat().st_mode) == expected


def test_a_replaced_output_keeps_its_mode(weights, tmp_path, capsys):
    out = tmp_path / "mask.png"
    out.write_bytes(b"old")
    out.chmod(0o640)
    code, _, err = run(segment(weights, out), capsys)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert np.array(Image.open(out)).ndim == 2


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(weights, tmp_path, capsys):
    host = atomic._host_tag()
    stale = tmp_path / f".mask.png.{host}-{_dead_pid()}-abcdef{atomic.TEMP_SUFFIX}"
    stale.write_bytes(b"")
    live = tmp_path / f".other.png.{host}-{os.getppid()}-abcdef{atomic.TEMP_SUFFIX}"
    live.write_bytes(b"")
    foreign = tmp_path / f".x.png.00000000-1-abcdef{atomic.TEMP_SUFFIX}"
    foreign.write_bytes(b"")
    os.utime(foreign, (0, 0))  # another host's, and days old
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("mine")
    code, _, err = run(segment(weights, tmp_path / "mask.png"), capsys)
    assert code == 0, err
    assert not stale.exists() and not foreign.exists()
    assert live.exists() and unrelated.exists()


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")

    def boom(fp):
        fp.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(path, boom)
    assert path.read_text() == "old" and not temporaries(tmp_path)


def _match(weights, kps, out="-"):
    return ["match", "--ref-image", REF, "--target", TARGET, "--keypoints", kps, "--output", out,
            "--weights", weights, *COMMON]


def test_match_non_utf8_keypoints_file_is_one_line(weights, tmp_path, capsys):
    kps = tmp_path / "k.json"
    kps.write_bytes(b"[[1, 2]] \xff\xfe")
    code, _, err = run(_match(weights, kps), capsys)
    assert code == 2 and "not UTF-8" in one_error_line(err)


def test_match_output_equal_to_the_keypoints_file_is_refused(weights, tmp_path, capsys):
    kps = tmp_path / "k.json"
    kps.write_text(json.dumps([[10, 10]]))
    code, _, err = run(_match(weights, kps, kps), capsys)
    assert code == 2 and "also an input" in one_error_line(err)
    assert json.loads(kps.read_text()) == [[10, 10]]


# --------------------------------------------------------------------------- segment-many


def _many(weights, out, targets=None, target_dir=None):
    args = ["segment-many", "--ref-image", REF, "--ref-mask", MASK, "--output-dir", out, "--weights", weights,
            "--batch-size", "2", *COMMON]
    for t in targets or []:
        args += ["--target", t]
    if target_dir:
        args += ["--target-dir", target_dir]
    return args


def test_segment_many_refuses_the_folder_of_its_targets(weights, tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.open(TARGET).resize((64, 48)).save(folder / f"t{i}.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = run(_many(weights, folder, target_dir=folder), capsys)
    assert code == 2 and "folder of targets" in one_error_line(err)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_segment_many_skips_unreadable_targets_and_fails_at_the_end(weights, tmp_path, capsys):
    folder = tmp_path / "targets"
    folder.mkdir()
    for name in ("a", "c", "d", "e"):
        Image.open(TARGET).resize((64, 48)).save(folder / f"{name}.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "masks"
    code, stdout, err = run(_many(weights, out, target_dir=folder), capsys)
    assert code == 1
    assert "b.png" in err and "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "c.png", "d.png", "e.png"]
    assert "4 masks written" in stdout and "1 unreadable target skipped" in stdout
    # A resume skips it again and still reports it.
    code, stdout, err = run(_many(weights, out, target_dir=folder), capsys)
    assert code == 1 and "b.png" in err
    assert "0 masks written, 4 already there" in stdout
    assert not temporaries(out)


def test_a_real_kill_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = (f"import time\nfrom insid3_fast.atomic import atomic_write\n"
              f"atomic_write({str(tmp_path / 'out.png')!r}, lambda fp: (fp.write(b'x'), print('writing', flush=True), "
              f"time.sleep(60)))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout.readline().strip() == "writing"
        left = temporaries(tmp_path)
        assert len(left) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.1)
    assert temporaries(tmp_path) == left and not (tmp_path / "out.png").exists()
    atomic._cleaned.discard(str(tmp_path))  # this process has not written there yet
    atomic.atomic_write_text(tmp_path / "other.txt", "new")
    assert not temporaries(tmp_path)
