"""COCO-20i (4 folds of 20 classes) in the HSNet/Matcher layout under ``<data-root>/COCO2014``."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ..episodes import Episode, EpisodeDataset, LoadedEpisode, draw_references, open_rgb, pick, require_paths

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

HOWTO = (
    "COCO-20i needs the COCO 2014 train/val images, the per-image class-index PNG annotations "
    "(annotations/train2014, annotations/val2014) and the split pickles (splits/val/fold{0..3}.pkl, "
    "from Matcher's datasets/COCO2014/splits) under <data-root>/COCO2014."
)


class COCO20i(EpisodeDataset):
    """COCO-20i: fold f holds classes f, f+4, ..., f+76; 1000 random episodes per fold."""

    name = "coco"
    num_folds = 4

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        self.base = os.path.join(data_root, "COCO2014")
        split_file = os.path.join(self.base, "splits", "val", f"fold{self.fold}.pkl")
        require_paths("COCO-20i", [self.base, os.path.join(self.base, "annotations"), split_file], HOWTO)
        with open(split_file, "rb") as fp:
            self.classwise: dict[int, list[str]] = pickle.load(fp)
        self.fold_classes = [self.fold + self.num_folds * v for v in range(80 // self.num_folds)]
        self.class_names = [COCO_CLASSES[c] for c in self.fold_classes]

    @property
    def default_num_episodes(self) -> int:
        return 1000

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        cls = pick(rng, self.fold_classes)
        pool = self.classwise[cls]
        target = pick(rng, pool)
        refs = draw_references(rng, pool, target, self.shots)
        return Episode(index, self.fold_classes.index(cls), COCO_CLASSES[cls], str(target),
                       tuple(str(r) for r in refs))

    def _mask(self, name: str, cls: int) -> torch.Tensor:
        stem = name[: name.index(".jpg")] if ".jpg" in name else os.path.splitext(name)[0]
        path = os.path.join(self.base, "annotations", stem + ".png")
        if not os.path.isfile(path):
            raise InputError(f"COCO-20i annotation not found: '{path}'")
        with Image.open(path) as img:
            arr = np.array(img)
        return torch.from_numpy(arr == cls + 1)

    def load(self, episode: Episode) -> LoadedEpisode:
        cls = self.fold_classes[episode.class_id]
        return LoadedEpisode(
            target_image=open_rgb(os.path.join(self.base, episode.target)),
            target_mask=self._mask(episode.target, cls),
            reference_images=[open_rgb(os.path.join(self.base, r)) for r in episode.references],
            reference_masks=[self._mask(r, cls) for r in episode.references],
        )
