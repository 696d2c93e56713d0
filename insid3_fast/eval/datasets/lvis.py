"""LVIS-92i (10 folds) under ``<data-root>/LVIS``: COCO 2017 images and ``lvis_val.pkl``."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..episodes import (Episode, EpisodeDataset, LoadedEpisode, draw_references, open_rgb, pick, require_paths,
                        split_file)
from ..masks import segmentation_to_mask

HOWTO = (
    "LVIS-92i needs the COCO 2017 train/val images under <data-root>/LVIS/coco/{train2017,val2017} "
    "and the LVIS mask annotation pickles (lvis_train.pkl, lvis_val.pkl, from the Matcher/GF-SAM "
    "'lvis.zip') directly under <data-root>/LVIS."
)


def union_of_segmentations(segms: list[Any], image: Image.Image) -> torch.Tensor:
    """Union of an image's segmentations (polygons, RLE or arrays) as an (H, W) bool mask."""
    hw = (image.height, image.width)
    masks = [segmentation_to_mask(s, hw) for s in segms]
    return torch.from_numpy(np.logical_or.reduce(np.stack(masks, 0), axis=0))


class LVIS92i(EpisodeDataset):
    """LVIS-92i: classes with more than ``shots`` val images, every 10th from the fold offset.

    The published run has 2300 episodes cycling through the fold's classes in order. Fold -1
    takes every 10th class from offset 0, the classes of fold 0, as the published loader does.
    """

    name = "lvis"
    num_folds = 10
    all_folds = "the classes of fold 0, as published"

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        self.anno_root = os.path.join(data_root, "LVIS")
        self.image_root = os.path.join(self.anno_root, "coco")
        val_file = os.path.join(self.anno_root, "lvis_val.pkl")
        require_paths("LVIS-92i", [self.image_root, val_file], HOWTO)
        with split_file("LVIS-92i", val_file):
            with open(val_file, "rb") as fp:
                self.annotations: dict[Any, dict[str, Any]] = pickle.load(fp)
            eligible = [c for c in self.annotations if len(self.annotations[c]) > shots]
        per_fold = len(eligible) // self.num_folds
        offset = max(self.fold, 0)
        self.fold_classes = [eligible[offset + self.num_folds * v] for v in range(per_fold)]
        self.class_names = [str(c) for c in self.fold_classes]

    @property
    def default_num_episodes(self) -> int:
        return 2300

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        class_id = index % len(self.fold_classes)
        cls = self.fold_classes[class_id]
        pool = list(self.annotations[cls].keys())
        target = pick(rng, pool)
        refs = draw_references(rng, pool, target, self.shots)
        return Episode(index, class_id, str(cls), str(target), tuple(str(r) for r in refs))

    def _image_and_mask(self, name: str, cls: Any) -> tuple[Image.Image, torch.Tensor]:
        image = open_rgb(os.path.join(self.image_root, name))
        segms = [a["segmentation"] for a in self.annotations[cls][name]["annotations"]]
        return image, union_of_segmentations(segms, image)

    def load(self, episode: Episode) -> LoadedEpisode:
        cls = self.fold_classes[episode.class_id]
        tgt_img, tgt_mask = self._image_and_mask(episode.target, cls)
        refs = [self._image_and_mask(r, cls) for r in episode.references]
        return LoadedEpisode(tgt_img, tgt_mask, [r[0] for r in refs], [r[1] for r in refs])
