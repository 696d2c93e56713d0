"""The evaluation runner: outputs, resume after an interruption, sharding over two gloo ranks, SPair."""

import argparse
import json
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from eval_fixtures import FakeModel, write_isaid, write_isic, write_spair
from insid3_fast.eval import cli
from insid3_fast.eval.cli import add_eval_arguments, run_eval
from insid3_fast.eval.datasets import build_dataset
from insid3_fast.eval.metrics import SegmentationMeter, episode_areas, resize_mask_nearest


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_isic(root)
    write_isaid(root)
    write_spair(root)
    return root


def _args(data_root, out, *extra):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(["--data-root", data_root, "--output-dir", str(out), "--no-progress", *extra])


def _independent_miou(data_root, name, fold, n):
    ds = build_dataset(name, data_root, fold, 1)
    meter = SegmentationMeter(ds.class_names)
    model = FakeModel()
    for ep in ds.plan(n, 0):
        le = ds.load(ep)
        model.set_reference(le.reference_images[0], le.reference_masks[0])
        model.set_target(le.target_image)
        pred = model.segment()
        ign = None if le.ignore is None else resize_mask_nearest(le.ignore, pred.shape)
        meter.update(ep.class_id, *episode_areas(pred, resize_mask_nearest(le.target_mask, pred.shape), ign))
    return meter.miou(), meter.fb_iou()


def test_run_writes_results_and_overlays(data_root, tmp_path):
    res = run_eval(_args(data_root, tmp_path, "--dataset", "isaid", "--save-overlays", "2"), model=FakeModel())
    miou, fb = _independent_miou(data_root, "isaid", 0, res["episodes"])
    assert res["miou"] == pytest.approx(miou) and res["fb_iou"] == pytest.approx(fb)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["miou"] == pytest.approx(miou) and saved["config"]["model"]["resize_to_orig_size"] is False
    assert "version" in saved and len(saved["per_class"]) == 5
    assert "mIoU" in (tmp_path / "log.txt").read_text()
    assert sorted(os.listdir(tmp_path / "overlays")) == ["episode_00000.png", "episode_00001.png"]


def test_resume_after_interruption(data_root, tmp_path):
    full = run_eval(_args(data_root, tmp_path / "full", "--dataset", "isic", "--episodes", "9"), model=FakeModel())
    with pytest.raises(KeyboardInterrupt):
        run_eval(_args(data_root, tmp_path / "cut", "--dataset", "isic", "--episodes", "9"), model=FakeModel(fail_after=5))
    assert not (tmp_path / "cut" / "results.json").exists()
    second = FakeModel()
    resumed = run_eval(_args(data_root, tmp_path / "cut", "--dataset", "isic", "--episodes", "9"), model=second)
    assert second.calls == 4
    assert resumed["miou"] == full["miou"] and resumed["per_class"] == full["per_class"]
    # a different configuration in the same folder is refused
    with pytest.raises(Exception, match="different configuration"):
        run_eval(_args(data_root, tmp_path / "cut", "--dataset", "isic", "--episodes", "9", "--shots", "2"), model=FakeModel())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, data_root, out, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        res = run_eval(_args(data_root, out, "--dataset", "isic", "--episodes", "11", "--device", "cpu"), model=FakeModel())
        queue.put((rank, res["miou"], res["fb_iou"], res["per_class"]))
    finally:
        dist.destroy_process_group()


def test_sharded_equals_single(data_root, tmp_path):
    single = run_eval(_args(data_root, tmp_path / "single", "--dataset", "isic", "--episodes", "11"), model=FakeModel())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(2, _free_port(), data_root, str(tmp_path / "sharded"), queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    for _, miou, fb, rows in results:
        assert miou == single["miou"] and fb == single["fb_iou"] and rows == single["per_class"]
    lines = [json.loads(l) for l in open(tmp_path / "sharded" / "episodes.rank1.jsonl")]
    assert sorted(r["index"] for r in lines) == [1, 3, 5, 7, 9]
    assert json.loads((tmp_path / "sharded" / "results.json").read_text())["world_size"] == 2


def test_spair_pck(data_root, tmp_path):
    res = run_eval(_args(data_root, tmp_path, "--dataset", "spair"), model=FakeModel())
    for version in ("original", "debiased"):
        assert set(res[version]["all"]) == {"pck@0.05", "pck@0.10", "pck@0.15", "pck@0.20"}
        assert set(res[version]["per_category"]) == {"cat", "dog"}
    assert res["debiased"]["all"]["pck@0.20"] >= res["original"]["all"]["pck@0.20"]


def test_cli_missing_data_exits_with_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--dataset", "coco", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "COCO2014" in err and "splits" in err
