"""iSAID-5i (3 folds of 5 classes) under ``<data-root>/iSAID``: one episode per split-file line."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ..episodes import Episode, EpisodeDataset, LoadedEpisode, draw_references, open_rgb, require_paths, split_file

ISAID_CLASSES = (
    "ship", "storage tank", "baseball diamond", "tennis court", "basketball court",
    "ground track field", "bridge", "large vehicle", "small vehicle", "helicopter",
    "swimming pool", "roundabout", "soccer ball field", "plane", "harbor",
)

HOWTO = (
    "iSAID-5i needs the iSAID 896x896 validation patches (val/images/*.png and "
    "val/semantic_png/*_instance_color_RGB.png, from 'iSAID_5i.zip') and the split files "
    "splits/val/fold{0,1,2}.txt under <data-root>/iSAID."
)


class ISAID5i(EpisodeDataset):
    """iSAID-5i: target i is line i of the fold's split file; boundary pixels (255) are ignored."""

    name = "isaid"
    num_folds = 3

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        self.root = os.path.join(data_root, "iSAID")
        split_path = os.path.join(self.root, "splits", "val", f"fold{self.fold}.txt")
        require_paths("iSAID-5i", [os.path.join(self.root, "val", "images"),
                                   os.path.join(self.root, "val", "semantic_png"), split_path], HOWTO)
        self.items: list[tuple[str, int]] = []
        with split_file("iSAID-5i", split_path):
            with open(split_path, encoding="utf-8") as fp:
                # The published reader drops the last line (split on '\n', then [:-1]).
                lines = fp.read().split("\n")[:-1]
            for number, line in enumerate(lines, 1):
                name, cls = line.split("__")
                if not 1 <= int(cls) <= len(ISAID_CLASSES):
                    raise ValueError(f"line {number}: class {cls} is outside 1..{len(ISAID_CLASSES)}")
                self.items.append((name, int(cls) - 1))
        self.classwise: dict[int, list[str]] = {c: [] for c in range(15)}
        for name, cls in self.items:
            self.classwise[cls].append(name)
        self.fold_classes = [self.fold * 5 + i for i in range(5)]
        self.class_names = [ISAID_CLASSES[c] for c in self.fold_classes]

    @property
    def default_num_episodes(self) -> int:
        return len(self.items)

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        target, cls = self.items[index % len(self.items)]
        refs = draw_references(rng, self.classwise[cls], target, self.shots)
        class_id = self.fold_classes.index(cls) if cls in self.fold_classes else -1
        return Episode(index, class_id, ISAID_CLASSES[cls], target, tuple(refs))

    def _read(self, name: str, cls: int) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
        image = open_rgb(os.path.join(self.root, "val", "images", name + ".png"))
        path = os.path.join(self.root, "val", "semantic_png", name + "_instance_color_RGB.png")
        if not os.path.isfile(path):
            raise InputError(f"iSAID mask not found: '{path}'")
        with Image.open(path) as img:
            arr = np.array(img)
        if arr.ndim == 3:
            # The semantic PNGs of iSAID-5i hold one class index per pixel; take it from a 3-channel copy.
            arr = arr[..., 0]
        arr = torch.from_numpy(arr.astype(np.int64))
        return image, arr == cls + 1, arr == 255

    def load(self, episode: Episode) -> LoadedEpisode:
        target, cls = self.items[episode.index % len(self.items)]
        tgt_img, tgt_mask, ignore = self._read(target, cls)
        refs = [self._read(r, cls) for r in episode.references]
        return LoadedEpisode(tgt_img, tgt_mask, [r[0] for r in refs], [r[1] for r in refs], ignore=ignore)
