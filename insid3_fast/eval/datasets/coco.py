"""COCO-20i (4 folds of 20 classes) in the HSNet/Matcher layout under ``<data-root>/COCO2014``."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ..episodes import (Episode, EpisodeDataset, LoadedEpisode, draw_references, open_rgb, pick, require_paths,
                        split_file)

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


def _read_split(path: str) -> dict[int, list[str]]:
    with split_file("COCO-20i", path):
        with open(path, "rb") as fp:
            classwise = pickle.load(fp)
        if not isinstance(classwise, dict) or not all(isinstance(v, (list, tuple)) for v in classwise.values()):
            raise TypeError("expected a dict of class index -> list of image names")
        return {int(k): list(v) for k, v in classwise.items()}


class COCO20i(EpisodeDataset):
    """COCO-20i: fold f holds classes f, f+4, ..., f+76; 1000 random episodes per fold.

    Fold -1 evaluates all 80 classes, each with the image list of the first fold file that
    has images for it (the published loader's merge of the four split files).
    """

    name = "coco"
    num_folds = 4
    all_folds = "all 80 classes"

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        self.base = os.path.join(data_root, "COCO2014")
        folds = range(self.num_folds) if self.fold == -1 else [self.fold]
        split_files = [os.path.join(self.base, "splits", "val", f"fold{f}.pkl") for f in folds]
        require_paths("COCO-20i", [self.base, os.path.join(self.base, "annotations"), *split_files], HOWTO)
        metas = [_read_split(path) for path in split_files]
        self.classwise: dict[int, list[str]] = {k: [] for k in metas[0]}
        for meta in metas:
            for cls, names in meta.items():
                if not self.classwise.get(cls) and names:
                    self.classwise[cls] = names
        if self.fold == -1:
            self.fold_classes = list(range(80))
        else:
            self.fold_classes = [self.fold + self.num_folds * v for v in range(80 // self.num_folds)]
        self.class_names = [COCO_CLASSES[c] for c in self.fold_classes]

    @property
    def default_num_episodes(self) -> int:
        return 1000

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        cls = pick(rng, self.fold_classes)
        what = f"images of class '{COCO_CLASSES[cls]}' in the split file(s)"
        pool = self.classwise.get(cls, [])
        target = pick(rng, pool, what)
        refs = draw_references(rng, pool, target, self.shots, f"class '{COCO_CLASSES[cls]}'")
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
