"""SPair-71k keypoint transfer: PCK@{0.05,0.10,0.15,0.20} of original and debiased features.

As published: PCK per image pair (fraction of the pair's keypoints within alpha times the larger
side of the target bounding box), averaged over all pairs of the split.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..errors import InputError
from .. import distributed
from .episodes import open_rgb, require_paths
from .metrics import PCK_ALPHAS, image_pck, pck_threshold, summarise_pck
from .records import RecordWriter, claim_output_dir, read_records
from .runner import package_version, write_outputs

SPAIR_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

HOWTO = (
    "SPair-71k needs the extracted SPair-71k.tar.gz (from cvlab.postech.ac.kr/research/SPair-71k) at "
    "<data-root>/SPair-71k: JPEGImages/<category>/*.jpg, PairAnnotation/<split>/*.json and "
    "Layout/large/<split>.txt."
)


class MatchingModel(Protocol):
    """What keypoint transfer needs from a model."""

    def set_reference(self, image: Any, mask: Any = None) -> None: ...
    def set_target(self, image: Any) -> None: ...
    def match(self, src_kps: torch.Tensor, use_debiased: bool = True) -> torch.Tensor: ...


@dataclass(frozen=True)
class KeypointPair:
    """One SPair-71k pair: source/target image paths, keypoints (x, y) and the target bbox."""

    index: int
    name: str
    category: str
    source: str
    target: str
    source_kps: torch.Tensor
    target_kps: torch.Tensor
    target_bbox: tuple[float, float, float, float]


class SPair71k:
    """The pairs listed in ``Layout/large/<split>.txt`` (the published evaluation uses ``test``)."""

    name = "spair"

    def __init__(self, data_root: str, split: str = "test") -> None:
        self.base = os.path.join(data_root, "SPair-71k")
        layout = os.path.join(self.base, "Layout", "large", f"{split}.txt")
        self.ann_dir = os.path.join(self.base, "PairAnnotation", split)
        require_paths("SPair-71k", [layout, self.ann_dir, os.path.join(self.base, "JPEGImages")], HOWTO)
        with open(layout) as fp:
            self.pair_names = [line.strip() for line in fp if line.strip()]
        self.split = split

    def __len__(self) -> int:
        return len(self.pair_names)

    def pair(self, index: int) -> KeypointPair:
        """Read the annotation of pair ``index`` (names look like ``000001-2008_006481-2008_007698:aeroplane``)."""
        name = self.pair_names[index]
        path = os.path.join(self.ann_dir, f"{name}.json")
        if not os.path.isfile(path):
            raise InputError(f"SPair-71k annotation not found: '{path}'")
        with open(path) as fp:
            ann = json.load(fp)
        src_id = name.split("-")[1]
        trg_id = name.split("-")[2].split(":")[0]
        cat = ann["category"]
        bbox = torch.tensor(ann["trg_bndbox"], dtype=torch.float32)
        return KeypointPair(
            index, name, cat,
            os.path.join(self.base, "JPEGImages", cat, src_id + ".jpg"),
            os.path.join(self.base, "JPEGImages", cat, trg_id + ".jpg"),
            torch.tensor(ann["src_kps"], dtype=torch.float32).reshape(-1, 2),
            torch.tensor(ann["trg_kps"], dtype=torch.float32).reshape(-1, 2),
            tuple(float(v) for v in bbox[:4]),
        )


def transfer(model: MatchingModel, src_img: Any, trg_img: Any, src_kps: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Set the pair on the model and match; set again per call since a match may clear the state."""
    model.set_reference(src_img)
    model.set_target(trg_img)
    return torch.as_tensor(model.match(src_kps, use_debiased=debiased)).float().cpu()


def evaluate_correspondence(
    model: MatchingModel,
    dataset: SPair71k,
    output_dir: str,
    *,
    num_pairs: int | None = None,
    config: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    resume: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """PCK of original and debiased features over the split; sharded and resumable like segmentation."""
    config = dict(config or {})
    os.makedirs(output_dir, exist_ok=True)
    n = len(dataset) if num_pairs is None else min(int(num_pairs), len(dataset))
    fingerprint = {"dataset": "spair", "split": dataset.split, "episodes": n, "model": config.get("model", {})}
    claim_output_dir(output_dir, fingerprint, rank)

    done = read_records(output_dir) if resume else {}
    mine = [i for i in range(n) if i % world_size == rank]
    todo = [i for i in mine if i not in done or done[i].get("pair") != dataset.pair_names[i]]
    records = {i: done[i] for i in mine if i not in todo}
    writer = RecordWriter(output_dir, rank)
    start = time.time()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress or rank != 0,
               desc="spair", unit="pair", dynamic_ncols=True)
    try:
        for i in todo:
            p = dataset.pair(i)
            src, trg = open_rgb(p.source), open_rgb(p.target)
            kps = p.source_kps if device is None else p.source_kps.to(device)
            thr = pck_threshold(p.target_bbox)
            rec = {"index": i, "pair": p.name, "category": p.category, "n_pts": int(p.source_kps.shape[0])}
            for key, debiased in (("original", False), ("debiased", True)):
                rec[key] = image_pck(transfer(model, src, trg, kps, debiased), p.target_kps, thr)
            writer.append(rec)
            records[i] = rec
            bar.update(1)
            done_recs = list(records.values())
            bar.set_postfix(pck10=f"{summarise_pck(done_recs, 'debiased')['all']['pck@0.10']:.1f}")
    finally:
        bar.close()
        writer.close()

    gathered = distributed.all_gather_objects(records)
    merged: dict[int, dict[str, Any]] = {}
    for part in gathered:
        merged.update(part)
    ordered = [merged[i] for i in sorted(merged)]
    results = {
        "task": "correspondence",
        "dataset": "spair",
        "split": dataset.split,
        "episodes": n,
        "alphas": list(PCK_ALPHAS),
        "original": summarise_pck(ordered, "original"),
        "debiased": summarise_pck(ordered, "debiased"),
        "version": package_version(),
        "config": config,
        "world_size": world_size,
        "seconds": time.time() - start,
    }
    if rank == 0:
        write_outputs(output_dir, results, format_pck_table(results))
    distributed.barrier()
    return results


def format_pck_table(results: dict[str, Any]) -> str:
    """Overall and per-category PCK of both feature versions as text."""
    keys = [f"pck@{a:.2f}" for a in PCK_ALPHAS]
    lines = [f"{'features':<10} {'category':<12} " + " ".join(f"{k:>9}" for k in keys)]
    for version in ("original", "debiased"):
        res = results[version]
        for cat, vals in sorted(res["per_category"].items()):
            lines.append(f"{version:<10} {cat:<12} " + " ".join(f"{vals[k]:>9.2f}" for k in keys))
        lines.append(f"{version:<10} {'all':<12} " + " ".join(f"{res['all'][k]:>9.2f}" for k in keys))
    return "\n".join(lines)
