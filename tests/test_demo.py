"""``make demo`` (python -m insid3_fast.demo) on a fresh machine: no weights, exit 0, a table and a picture."""

from __future__ import annotations

import numpy as np
from PIL import Image

from insid3_fast import demo


def test_demo_without_weights_shows_the_package_working(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no pretrain/ here
    monkeypatch.delenv("INSID3_WEIGHTS", raising=False)
    monkeypatch.setenv("INSID3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "BENCH_SIZE", 256)  # the same steps, smaller, to keep the suite fast
    monkeypatch.setattr(demo, "BENCH_DIM", 128)
    assert demo.main() == 0
    out, err = capsys.readouterr()
    assert "facebookresearch/dinov3" in err  # still says where to get the weights
    picture = Image.open(tmp_path / demo.SYNTHETIC_PICTURE)
    assert picture.format == "PNG" and picture.width > 3 * picture.height
    iou = float(out.split("IoU ")[1].split()[0])
    assert iou > 0.6, out
    assert "the same mask" in out
    from insid3_fast import ops

    if ops.native_available():
        for stage in demo.BENCH_STAGES:
            assert f"\n{stage} " in out
    # The picture shows the predicted mask: its third panel is not blank.
    step = (picture.width + 10) // 4
    third = np.asarray(picture.convert("L"))[20:, 2 * step:3 * step - 10]
    assert 0.02 < (third == 255).mean() < 0.9 and set(np.unique(third)) == {0, 255}


def test_demo_with_weights_segments_the_bundled_example(monkeypatch):
    import insid3_fast.cli as cli
    import insid3_fast.model as model

    calls = []
    monkeypatch.setattr(model, "find_weights", lambda size, weights=None: "w.pth")
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert demo.main() == 0
    assert calls and calls[0][0] == "segment" and "demo_mask.png" in calls[0]


def test_demo_picture_is_written_atomically(tmp_path, monkeypatch):
    """A save that fails halfway leaves the previous picture whole and no partial file."""
    import pytest

    picture = tmp_path / demo.SYNTHETIC_PICTURE
    picture.write_bytes(b"the previous picture")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"half a PNG")
        raise OSError("No space left on device")

    monkeypatch.setattr(demo, "BENCH_SIZE", 256)
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        demo._episode_picture(str(picture))
    assert picture.read_bytes() == b"the previous picture"
    assert [p.name for p in tmp_path.iterdir()] == [picture.name]
