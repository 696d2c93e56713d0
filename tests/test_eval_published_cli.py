"""The evaluation CLI beside the published harness: --fold -1, its flags, its table, its failures."""

from __future__ import annotations

import argparse
import math
import os
import pickle

import numpy as np
import pytest

from eval_fixtures import FakeModel, write_coco, write_isaid, write_isic, write_lvis, write_paco_part, \
    write_pascal_part, write_suim
from insid3_fast.cli import main as insid3_main
from insid3_fast.errors import InputError
from insid3_fast.eval import cli as eval_cli
from insid3_fast.eval.cli import add_eval_arguments, run_eval
from insid3_fast.eval.datasets import build_dataset
from insid3_fast.eval.metrics import SegmentationMeter


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    for writer in (write_coco, write_isaid, write_isic, write_lvis, write_paco_part, write_pascal_part):
        writer(root)
    return root


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args([*argv, "--no-progress"])


# --------------------------------------------------------------------------- --fold -1


def _published_coco_all_folds(root, n, seed, shots=1):
    """The published COCO loader's fold -1, restated: all 80 classes, each with the image list of
    the first split file that has images for it, drawn from the global numpy RNG."""
    metas = []
    for f in range(4):
        with open(os.path.join(root, "COCO2014", "splits", "val", f"fold{f}.pkl"), "rb") as fp:
            metas.append(pickle.load(fp))
    classwise = {k: [] for k in metas[0]}
    for meta in metas:
        for k in meta:
            if not classwise[k] and meta[k]:
                classwise[k] = meta[k]
    np.random.seed(seed)
    episodes = []
    for _ in range(n):
        cls = np.random.choice(list(range(80)), 1, replace=False)[0]
        target = np.random.choice(classwise[cls], 1, replace=False)[0]
        refs = []
        while True:
            ref = np.random.choice(classwise[cls], 1, replace=False)[0]
            if ref != target:
                refs.append(ref)
            if len(refs) == shots:
                break
        episodes.append((int(cls), str(target), tuple(str(r) for r in refs)))
    return episodes


def test_coco_fold_minus_one_is_all_classes_as_published(data_root):
    ds = build_dataset("coco", data_root, fold=-1, shots=1)
    assert ds.num_classes == 80 and ds.fold == -1
    ours = [(e.class_id, e.target, e.references) for e in ds.plan(40, seed=3)]
    assert ours == _published_coco_all_folds(data_root, 40, 3)
    ds.load(ds.plan(1, seed=3)[0])


@pytest.mark.parametrize("name, same_as", [("lvis", 0), ("paco_part", 0), ("pascal_part", 3)])
def test_fold_minus_one_of_the_others_is_the_published_meaning(data_root, name, same_as):
    minus_one = build_dataset(name, data_root, fold=-1)
    other = build_dataset(name, data_root, fold=same_as)
    assert minus_one.class_names == other.class_names
    assert [e.to_json() for e in minus_one.plan(6, 0)] == [e.to_json() for e in other.plan(6, 0)]


def test_isaid_fold_minus_one_is_refused_clearly(data_root):
    with pytest.raises(InputError, match="no --fold -1.*--fold 0..2"):
        build_dataset("isaid", data_root, fold=-1)


def test_folds_outside_the_range_are_still_refused(data_root):
    with pytest.raises(InputError, match="folds 0..3 and -1"):
        build_dataset("coco", data_root, fold=-2)
    build_dataset("isic", data_root, fold=-1)  # no folds: the fold is ignored, as published


# --------------------------------------------------------------------------- corrupt split files


@pytest.mark.parametrize("dataset, relpath, content", [
    ("coco", "COCO2014/splits/val/fold0.pkl", b"\x80\x04 not a pickle"),
    ("coco", "COCO2014/splits/val/fold0.pkl", pickle.dumps([1, 2, 3])),
    ("isaid", "iSAID/splits/val/fold0.txt", b"no-separator-here\nsecond\n"),
    ("isaid", "iSAID/splits/val/fold0.txt", b"\xff\xfe\x00bad\n"),
    ("lvis", "LVIS/lvis_val.pkl", b""),
    ("pascal_part", "Pascal-Part/VOCdevkit/VOC2010/all_obj_part_to_image.json", b"[1, 2]"),
    ("paco_part", "PACO-Part/paco/paco_part_val.pkl", pickle.dumps({"cid2img": 5})),
])
def test_corrupt_split_file_is_one_input_error(tmp_path, dataset, relpath, content):
    root = str(tmp_path)
    {"coco": write_coco, "isaid": write_isaid, "lvis": write_lvis, "pascal_part": write_pascal_part,
     "paco_part": write_paco_part}[dataset](root)
    with open(os.path.join(root, relpath), "wb") as fp:
        fp.write(content)
    with pytest.raises(InputError, match=f"cannot read '.*{os.path.basename(relpath)}'.*download it again"):
        build_dataset(dataset, root, fold=0)


# --------------------------------------------------------------------------- SUIM, FB-IoU


def test_suim_class_with_only_empty_masks_is_named(tmp_path):
    root = str(tmp_path)
    write_suim(root)
    from PIL import Image

    folder = os.path.join(root, "SUIM", "masks", "RO")
    for name in os.listdir(folder):
        Image.new("L", Image.open(os.path.join(folder, name)).size).save(os.path.join(folder, name), format="PNG")
    ds = build_dataset("suim", root)
    with pytest.raises(InputError, match="no non-empty masks for class 'robots' \\(RO\\)"):
        ds.plan(7, seed=0)


def test_fb_iou_without_foreground_is_nan_as_published():
    meter = SegmentationMeter(["a", "b"])
    meter.update(0, [100, 0], [100, 0])
    meter.update(1, [50, 0], [60, 0])
    assert math.isnan(meter.fb_iou())
    meter.update(1, [10, 5], [10, 10])
    assert meter.fb_iou() == pytest.approx(100 * (160 / 170 + 5 / 10) / 2)


# --------------------------------------------------------------------------- flags, table, failures


def test_published_flags_are_accepted(tmp_path):
    args = _args("--crf-mask-refinement", "--debiased", "--exp-name", "run1", "--num-workers", "4",
                 "--output-dir", str(tmp_path), "--svd-comps", "7", "--merge-thresh", "0.3")
    assert args.mask_refiner == "crf" and args.svd_components == 7 and args.merge_threshold == 0.3
    assert eval_cli.default_output_dir(args) == os.path.join(str(tmp_path), "run1")
    assert _args().mask_refiner == "bilinear"
    with pytest.raises(InputError, match="plain folder name"):
        eval_cli.default_output_dir(_args("--exp-name", "../up"))


def test_insid3_fast_eval_prints_the_table(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "build_model", lambda args, device: FakeModel())
    out = tmp_path / "out"
    code = insid3_main(["eval", "--dataset", "isic", "--data-root", data_root, "--episodes", "6",
                        "--output-dir", str(out), "--no-progress", "--num-workers", "2"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "mIoU" in stdout and "FB-IoU" in stdout and "lesion-1" in stdout and "episodes" in stdout
    assert "--num-workers 2 has no effect" in stderr
    assert (out / "results.json").is_file()


def test_python_m_eval_prints_the_same_table(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "build_model", lambda args, device: FakeModel())
    assert eval_cli.main(["--dataset", "isic", "--data-root", data_root, "--episodes", "6",
                          "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "lesion-1" in capsys.readouterr().out


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    out = tmp_path / "fresh" / "nested"
    with pytest.raises(InputError, match="data not found"):
        run_eval(_args("--dataset", "isic", "--data-root", str(tmp_path / "nodata"), "--output-dir", str(out)))
    assert not (tmp_path / "fresh").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(InputError):
        run_eval(_args("--dataset", "isic", "--data-root", str(tmp_path / "nodata"), "--output-dir", str(existing)))
    assert existing.is_dir()  # not ours to remove


def test_python_m_eval_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        eval_cli.main(["--dataset", "isic", "--data-root", str(tmp_path / "nodata"),
                       "--output-dir", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("insid3-fast eval: error: ") and "Traceback" not in err


@pytest.mark.parametrize("dataset,flags,message", [
    ("spair", ["--episodes", "0"], "--episodes must be at least 1, got 0"),
    ("isic", ["--episodes", "-1"], "--episodes must be at least 1, got -1"),
    ("isic", ["--save-overlays", "-5"], "--save-overlays must be >= 0, got -5"),
])
def test_counts_are_checked_for_every_dataset_before_any_folder(tmp_path, dataset, flags, message):
    """spair with --episodes 0 scored zero pairs (every PCK 0.0, exit 0); --save-overlays -5 passed."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        run_eval(_args("--dataset", dataset, "--data-root", str(tmp_path / "nodata"), "--output-dir", str(out),
                       *flags))
    assert not out.exists()


def test_missing_data_is_one_line(tmp_path, capsys):
    """The message listed each missing path on its own line (six lines for COCO)."""
    code = insid3_main(["eval", "--dataset", "coco", "--data-root", str(tmp_path / "nodata"),
                        "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("insid3-fast: error: COCO-20i data not found"), err
    assert "COCO2014/splits/val/fold0.pkl" in err
