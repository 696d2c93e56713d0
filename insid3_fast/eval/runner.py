"""Runs a segmentation benchmark with a model: episodes, metric, resume, sharding, outputs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from typing import Any, Protocol

import torch
from tqdm import tqdm

from .. import distributed
from .episodes import Episode, EpisodeDataset, LoadedEpisode
from .metrics import SegmentationMeter, episode_areas, format_class_table, resize_mask_nearest
from .overlays import make_overlay
from ..atomic import atomic_write, atomic_write_json, atomic_write_text
from .records import RecordWriter, claim_output_dir, read_records


class SegmentationModel(Protocol):
    """What the runner needs from a model (``insid3_fast.INSID3`` or a test double)."""

    def set_reference(self, image: Any, mask: Any = None) -> None: ...
    def set_target(self, image: Any) -> None: ...
    def segment(self) -> torch.Tensor: ...


def package_version() -> str:
    """The installed insid3_fast version, or "unknown" when it is not installed."""
    try:
        return importlib.metadata.version("insid3_fast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def predict_episode(model: SegmentationModel, episode: LoadedEpisode) -> torch.Tensor:
    """Give the model every reference then the target, and return its (H, W) bool mask."""
    for image, mask in zip(episode.reference_images, episode.reference_masks):
        model.set_reference(image, mask)
    model.set_target(episode.target_image)
    return torch.as_tensor(model.segment()).bool().cpu()


def score_episode(pred: torch.Tensor, episode: LoadedEpisode) -> tuple[list[int], list[int]]:
    """Intersection/union of the prediction against the GT resized (nearest) to the prediction's size."""
    gt = resize_mask_nearest(episode.target_mask, pred.shape)
    ignore = None if episode.ignore is None else resize_mask_nearest(episode.ignore, pred.shape)
    inter, union = episode_areas(pred, gt, ignore)
    return inter.tolist(), union.tolist()


def _matches(record: dict[str, Any], episode: Episode) -> bool:
    desc = episode.to_json()
    return all(record.get(k) == desc[k] for k in ("class_id", "target", "references"))


def evaluate_segmentation(
    model: SegmentationModel,
    dataset: EpisodeDataset,
    output_dir: str,
    *,
    num_episodes: int | None = None,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    save_overlays: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` and return the results (also written by rank 0).

    Episode i runs on rank ``i % world_size``; per-class counts are summed over ranks, so the
    result equals a single-process run. Finished episodes found in ``output_dir`` are not rerun.
    """
    config = dict(config or {})
    os.makedirs(output_dir, exist_ok=True)
    episodes = dataset.plan(num_episodes, seed)
    fingerprint = {
        "dataset": dataset.name, "fold": dataset.fold, "shots": dataset.shots, "seed": seed,
        "episodes": len(episodes), "model": config.get("model", {}),
    }
    claim_output_dir(output_dir, fingerprint, rank)

    done = read_records(output_dir) if resume else {}
    mine = [e for e in episodes if e.index % world_size == rank]
    meter = SegmentationMeter(dataset.class_names)
    todo: list[Episode] = []
    for ep in mine:
        rec = done.get(ep.index)
        if rec is not None and _matches(rec, ep):
            meter.update(ep.class_id, rec["inter"], rec["union"])
        else:
            todo.append(ep)

    overlay_dir = os.path.join(output_dir, "overlays")
    writer = RecordWriter(output_dir, rank)
    start = time.time()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress or rank != 0,
               desc=f"{dataset.name}", unit="ep", dynamic_ncols=True)
    try:
        for ep in todo:
            loaded = dataset.load(ep)
            pred = predict_episode(model, loaded)
            inter, union = score_episode(pred, loaded)
            meter.update(ep.class_id, inter, union)
            writer.append({**ep.to_json(), "inter": inter, "union": union})
            if ep.index < save_overlays:
                os.makedirs(overlay_dir, exist_ok=True)
                gt = resize_mask_nearest(loaded.target_mask, pred.shape)
                img = make_overlay(loaded.reference_images, loaded.reference_masks, loaded.target_image, pred, gt,
                                   title=f"episode {ep.index}  class {ep.class_name}  IoU {100 * inter[1] / max(union[1], 1):.1f}")
                atomic_write(os.path.join(overlay_dir, f"episode_{ep.index:05d}.png"),
                             lambda fp: img.save(fp, format="PNG"))
            bar.update(1)
            bar.set_postfix(mIoU=f"{meter.miou():.1f}")
    finally:
        bar.close()
        writer.close()
    elapsed = time.time() - start

    meter.load_tensor(distributed.all_reduce_sum(meter.as_tensor()))
    results = {
        "task": "segmentation",
        "dataset": dataset.name,
        "fold": dataset.fold,
        "shots": dataset.shots,
        "seed": seed,
        "episodes": len(episodes),
        "miou": meter.miou(),
        "fb_iou": meter.fb_iou(),
        "per_class": meter.per_class(),
        "version": package_version(),
        "config": config,
        "world_size": world_size,
        "seconds": elapsed,
    }
    if rank == 0:
        write_outputs(output_dir, results, format_class_table(results["per_class"]))
    distributed.barrier()
    return results


def write_outputs(output_dir: str, results: dict[str, Any], table: str) -> None:
    """results.json (atomic) and a human-readable log.txt."""
    atomic_write_json(os.path.join(output_dir, "results.json"), results)
    head = [
        "command: " + " ".join(sys.argv),
        "version: " + str(results.get("version")),
        "config: " + json.dumps(results.get("config"), sort_keys=True),
        "",
    ]
    if results.get("task") == "segmentation":
        body = [table, "", f"mIoU = {results['miou']:.1f}", f"FB-IoU = {results['fb_iou']:.1f}"]
    else:
        body = [table]
    atomic_write_text(os.path.join(output_dir, "log.txt"), "\n".join(head + body) + "\n")
