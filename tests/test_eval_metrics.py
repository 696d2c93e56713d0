"""Segmentation and PCK metrics against independent computations."""

import numpy as np
import torch

from insid3_fast.eval.masks import rle_decode, rle_encode
from insid3_fast.eval.metrics import SegmentationMeter, episode_areas, image_pck, pck_threshold, resize_mask_nearest


def _reference_areas(pred, gt, ignore):
    pred, gt = pred.numpy().ravel(), gt.numpy().ravel()
    keep = np.ones_like(pred) if ignore is None else ~ignore.numpy().ravel()
    pred, gt = pred[keep], gt[keep]
    inter = [np.sum((pred == v) & (gt == v)) for v in (0, 1)]
    union = [np.sum((pred == v) | (gt == v)) for v in (0, 1)]
    return inter, union


def test_episode_areas_match_set_definition():
    rng = np.random.RandomState(1)
    for _ in range(20):
        pred = torch.from_numpy(rng.rand(9, 11) > 0.5)
        gt = torch.from_numpy(rng.rand(9, 11) > 0.6)
        ignore = torch.from_numpy(rng.rand(9, 11) > 0.8) & ~gt if rng.rand() > 0.5 else None
        inter, union = episode_areas(pred, gt, ignore)
        ref_i, ref_u = _reference_areas(pred, gt, ignore)
        assert inter.tolist() == ref_i and union.tolist() == ref_u


def test_meter_miou_and_fbiou():
    meter = SegmentationMeter(["a", "b", "c"])
    meter.update(0, [6, 2], [8, 4])
    meter.update(0, [1, 1], [2, 2])
    meter.update(1, [3, 0], [4, 5])
    meter.update(-1, [100, 100], [100, 100])  # outside the fold: not counted
    # class a: fg 3/6, class b: 0/5, class c never seen: 0
    assert np.isclose(meter.miou(), 100 * (0.5 + 0 + 0) / 3)
    fb = ((6 + 1 + 3) / (8 + 2 + 4) + (2 + 1) / (4 + 2 + 5)) / 2 * 100
    assert np.isclose(meter.fb_iou(), fb)
    rows = meter.per_class()
    assert [r["episodes"] for r in rows] == [2, 1, 0]


def test_nearest_resize_matches_torch():
    m = torch.zeros(5, 7, dtype=torch.bool)
    m[1:3, 2:6] = True
    out = resize_mask_nearest(m, (11, 13))
    ref = torch.nn.functional.interpolate(m[None, None].float(), size=(11, 13), mode="nearest")[0, 0] > 0.5
    assert out.shape == (11, 13) and torch.equal(out, ref)


def test_pck_uses_larger_bbox_side():
    thr = pck_threshold([10, 20, 110, 60])  # 100 x 40
    assert thr == 100
    gt = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    pred = torch.tensor([[4.0, 0.0], [9.0, 0.0], [14.0, 0.0], [25.0, 0.0]])
    assert image_pck(pred, gt, thr) == [0.25, 0.5, 0.75, 0.75]


def test_rle_roundtrip():
    rng = np.random.RandomState(0)
    for _ in range(10):
        m = rng.rand(13, 17) > 0.7
        assert np.array_equal(rle_decode(rle_encode(m)), m)
    # a known COCO string: 2x3 mask, column-major runs [1, 2, 3]
    assert rle_encode(np.array([[0, 1, 1], [1, 1, 1]]))["counts"] == rle_encode(np.array([[0, 1, 1], [1, 1, 1]]))["counts"]
