"""Segmentation (mIoU, FB-IoU) and keypoint (PCK) metrics, as in SPEC.md "Metrics"."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PCK_ALPHAS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20)


def resize_mask_nearest(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an (H, W) mask to ``size`` with nearest interpolation (as the published evaluation)."""
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape) == size:
        return mask.bool()
    resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    return resized > 0.5


def episode_areas(
    pred: torch.Tensor, gt: torch.Tensor, ignore: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Background/foreground intersection and union pixel counts of one episode.

    Pixels marked in ``ignore`` are removed from both prediction and ground truth.
    Returns ``(inter, union)``, each an int64 array ``[background, foreground]``.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in size")
    p = pred.bool().cpu()
    g = gt.bool().cpu()
    valid = torch.ones_like(p) if ignore is None else ~ignore.bool().cpu()
    inter = np.array([int((~p & ~g & valid).sum()), int((p & g & valid).sum())], dtype=np.int64)
    area_p = np.array([int((~p & valid).sum()), int((p & valid).sum())], dtype=np.int64)
    area_g = np.array([int((~g & valid).sum()), int((g & valid).sum())], dtype=np.int64)
    return inter, area_p + area_g - inter


class SegmentationMeter:
    """Per-class background/foreground intersection and union, accumulated over episodes."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.intersection = np.zeros((2, n), dtype=np.int64)
        self.union = np.zeros((2, n), dtype=np.int64)
        self.episodes = np.zeros(n, dtype=np.int64)

    def update(self, class_id: int, inter: Sequence[int], union: Sequence[int]) -> None:
        """Add one episode's counts; class_id -1 (outside the fold) is not counted."""
        if class_id < 0:
            return
        self.intersection[:, class_id] += np.asarray(inter, dtype=np.int64)
        self.union[:, class_id] += np.asarray(union, dtype=np.int64)
        self.episodes[class_id] += 1

    def as_tensor(self) -> torch.Tensor:
        """All counts stacked in one int64 tensor (5, C), for all-reduce."""
        return torch.from_numpy(np.concatenate([self.intersection, self.union, self.episodes[None]], 0))

    def load_tensor(self, t: torch.Tensor) -> None:
        """Replace the counts with those of ``as_tensor`` (e.g. after an all-reduce)."""
        arr = t.cpu().numpy().astype(np.int64)
        self.intersection = arr[0:2].copy()
        self.union = arr[2:4].copy()
        self.episodes = arr[4].copy()

    def class_iou(self) -> np.ndarray:
        """(2, C) IoU of background and foreground per class; a class never seen has IoU 0."""
        return self.intersection / np.maximum(self.union, 1)

    def miou(self) -> float:
        """Mean foreground IoU over the fold's classes, in percent (unseen classes count as 0)."""
        if self.intersection.shape[1] == 0:
            return 0.0
        return float(self.class_iou()[1].mean() * 100.0)

    def fb_iou(self) -> float:
        """Mean of background and foreground IoU with all classes pooled, in percent.

        NaN, as in the published metric, when no episode has a pixel of one kind (e.g. no
        foreground in any prediction or ground truth): that IoU is 0/0.
        """
        inter = self.intersection.sum(axis=1).astype(np.float64)
        union = self.union.sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        return float(iou.mean() * 100.0)

    def per_class(self) -> list[dict[str, object]]:
        """Rows of the per-class table: name, foreground IoU (%), background IoU (%), episodes."""
        iou = self.class_iou()
        return [
            {
                "class_id": i,
                "class_name": name,
                "iou": float(iou[1, i] * 100.0),
                "bg_iou": float(iou[0, i] * 100.0),
                "episodes": int(self.episodes[i]),
            }
            for i, name in enumerate(self.class_names)
        ]


def format_class_table(rows: Sequence[dict[str, object]]) -> str:
    """The per-class IoU table as fixed-width text."""
    width = max([len("class")] + [len(str(r["class_name"])) for r in rows])
    lines = [f"{'id':>4}  {'class':<{width}}  {'IoU':>6}  {'bgIoU':>6}  {'episodes':>8}"]
    for r in rows:
        lines.append(
            f"{r['class_id']:>4}  {str(r['class_name']):<{width}}  {r['iou']:>6.1f}  {r['bg_iou']:>6.1f}  {r['episodes']:>8}"
        )
    return "\n".join(lines)


def pck_threshold(bbox: Sequence[float]) -> float:
    """PCK reference length: the larger side of the target bounding box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    return max(x2 - x1, y2 - y1)


def image_pck(pred: torch.Tensor, gt: torch.Tensor, threshold: float,
              alphas: Sequence[float] = PCK_ALPHAS) -> list[float]:
    """Fraction of keypoints within ``alpha * threshold`` pixels, for each alpha."""
    pred32 = pred.detach().float().cpu()
    gt32 = gt.detach().float().cpu()
    dist = torch.linalg.norm(gt32 - pred32, dim=-1)
    # alpha * threshold stays a Python float, as in the published evaluator.
    return [float((dist <= a * float(threshold)).float().mean().item()) for a in alphas]


def summarise_pck(records: Sequence[dict], key: str, alphas: Sequence[float] = PCK_ALPHAS) -> dict[str, object]:
    """Mean per-image PCK over all pairs and per category, in percent."""
    values = np.array([r[key] for r in records], dtype=np.float64).reshape(-1, len(alphas))
    cats = sorted({r["category"] for r in records})
    per_cat = {}
    for c in cats:
        rows = np.array([r[key] for r in records if r["category"] == c], dtype=np.float64)
        per_cat[c] = {f"pck@{a:.2f}": float(rows[:, j].mean() * 100.0) for j, a in enumerate(alphas)}
    overall = {f"pck@{a:.2f}": (float(values[:, j].mean() * 100.0) if len(values) else 0.0)
               for j, a in enumerate(alphas)}
    return {"all": overall, "per_category": per_cat}
