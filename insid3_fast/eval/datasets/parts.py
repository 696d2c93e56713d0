"""Part segmentation benchmarks: Pascal-Part (4 folds) and PACO-Part (4 folds).

Both crop target and references to the bounding box of the chosen object, as published.
"""

from __future__ import annotations

import json
import os
import pickle
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ..episodes import Episode, EpisodeDataset, LoadedEpisode, open_rgb, pick, require_paths, split_file
from ..masks import rle_decode, segmentation_shape, segmentation_to_mask

PASCAL_HOWTO = (
    "Pascal-Part needs the VOC 2010 trainval images (VOCdevkit/VOC2010/JPEGImages) and the "
    "Pascal-Part annotations ('pascal.zip': Annotations_Part_json_merged_part_classes/ and "
    "all_obj_part_to_image.json moved into VOCdevkit/VOC2010) under <data-root>/Pascal-Part."
)
PACO_HOWTO = (
    "PACO-Part needs the COCO 2017 images at <data-root>/PACO-Part/coco/{train2017,val2017} "
    "(a symlink to <data-root>/LVIS/coco works) and paco_part_train.pkl / paco_part_val.pkl "
    "(from 'paco.zip') in <data-root>/PACO-Part/paco."
)

PASCAL_FOLDS = ("animals", "indoor", "person", "vehicles")


def _crop_len(n: int, start: float, stop: float) -> int:
    # Python slice semantics (negative indices included), as the published tensor slicing.
    return len(range(n)[int(start):int(stop)])


class PascalPart(EpisodeDataset):
    """Pascal-Part: fold = super-category; classes are object+part pairs with train and val images.

    Fold -1 is the last super-category (vehicles), as Python's indexing gives the published loader.
    """

    name = "pascal_part"
    num_folds = 4
    all_folds = "the 'vehicles' super-category, as fold 3 (the published loader indexes the list with -1)"

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        voc = os.path.join(data_root, "Pascal-Part", "VOCdevkit", "VOC2010")
        self.index_file = os.path.join(voc, "all_obj_part_to_image.json")
        self.image_dir = os.path.join(voc, "JPEGImages")
        self.anno_dir = os.path.join(voc, "Annotations_Part_json_merged_part_classes")
        require_paths("Pascal-Part", [self.index_file, self.image_dir, self.anno_dir], PASCAL_HOWTO)
        with split_file("Pascal-Part", self.index_file):
            with open(self.index_file, encoding="utf-8") as fp:
                self.groups = json.load(fp)[PASCAL_FOLDS[self.fold]]["object"]
            names: list[str] = []
            for obj, info in self.groups.items():
                for part, split in info["part"].items():
                    if split["train"] and split["val"] and f"{obj}+{part}" != "aeroplane+TAIL":
                        names.append(f"{obj}+{part}")
            self.num_val_images = sum(len(s["val"]) for info in self.groups.values() for s in info["part"].values())
        self.class_names = names
        self._annotation = lru_cache(maxsize=4096)(self._read_annotation)

    @property
    def default_num_episodes(self) -> int:
        return min(self.num_val_images, 2500)

    def _read_annotation(self, image_id: str) -> dict[str, Any]:
        path = os.path.join(self.anno_dir, f"{image_id}.json")
        if not os.path.isfile(path):
            raise InputError(f"Pascal-Part annotation not found: '{path}'")
        with open(path) as fp:
            return json.load(fp)

    def _choose_object(self, rng: np.random.RandomState, image_id: str, obj: str, part: str) -> int | None:
        """Index (in the annotation's object list) of a random ``obj`` having ``part``, or None to redraw."""
        objects = self._annotation(image_id)["object"]
        candidates = [i for i, o in enumerate(objects) if o["name"] == obj]
        if not candidates:
            return None
        chosen = pick(rng, candidates)
        parts = [p for p in objects[chosen]["parts"] if p["name"] == part]
        rles = [m for p in parts for m in p["mask"]]
        if not parts or not rles or any(int(m["size"][0]) * int(m["size"][1]) == 0 for m in rles[:1]):
            return None
        return chosen

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        class_id = index % len(self.class_names)
        obj, part = self.class_names[class_id].split("+")
        pool = self.groups[obj]["part"][part]["val"]
        budget = _DrawBudget(self.class_names[class_id])
        while True:
            budget.spend()
            target = pick(rng, pool)
            target_obj = self._choose_object(rng, target, obj, part)
            if target_obj is not None:
                break
        refs: list[str] = []
        ref_objs: list[int] = []
        while len(refs) < self.shots:
            budget.spend()
            ref = pick(rng, pool)
            if ref == target or ref in refs:
                continue
            ref_obj = self._choose_object(rng, ref, obj, part)
            if ref_obj is None:
                continue
            refs.append(ref)
            ref_objs.append(ref_obj)
        return Episode(index, class_id, self.class_names[class_id], str(target), tuple(str(r) for r in refs),
                       target_obj, tuple(ref_objs))

    def _crop(self, image_id: str, obj_index: int, part: str) -> tuple[Image.Image, torch.Tensor]:
        obj = self._annotation(image_id)["object"][obj_index]
        masks = [rle_decode(m) for p in obj["parts"] if p["name"] == part for m in p["mask"]]
        mask = np.logical_or.reduce(np.stack(masks, 0), axis=0)
        box = [int(v) for v in obj["bndbox"].values()]  # xmin, ymin, xmax, ymax in the file's key order
        image = np.asarray(open_rgb(os.path.join(self.image_dir, f"{image_id}.jpg")))
        image = image[box[1]:box[3], box[0]:box[2]]
        return Image.fromarray(np.uint8(image)), torch.from_numpy(np.ascontiguousarray(mask[box[1]:box[3], box[0]:box[2]]))

    def load(self, episode: Episode) -> LoadedEpisode:
        part = episode.class_name.split("+")[1]
        tgt = self._crop(episode.target, episode.target_object, part)
        refs = [self._crop(r, o, part) for r, o in zip(episode.references, episode.reference_objects)]
        return LoadedEpisode(tgt[0], tgt[1], [r[0] for r in refs], [r[1] for r in refs])


class PACOPart(EpisodeDataset):
    """PACO-Part: 448 object-part classes in 4 folds; 2500 random episodes per fold.

    Fold -1 takes every 4th class from offset 0, the classes of fold 0, as the published loader does.
    """

    name = "paco_part"
    num_folds = 4
    all_folds = "the classes of fold 0, as published"

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        self.image_root = os.path.join(data_root, "PACO-Part", "coco")
        anno_root = os.path.join(data_root, "PACO-Part", "paco")
        train_file = os.path.join(anno_root, "paco_part_train.pkl")
        val_file = os.path.join(anno_root, "paco_part_val.pkl")
        require_paths("PACO-Part", [self.image_root, train_file, val_file], PACO_HOWTO)
        with split_file("PACO-Part", train_file):
            with open(train_file, "rb") as fp:
                train_classes = list(pickle.load(fp)["cid2img"].keys())
        if len(train_classes) != 448:
            raise InputError(f"PACO-Part: expected 448 classes in paco_part_train.pkl, found {len(train_classes)}")
        with split_file("PACO-Part", val_file):
            with open(val_file, "rb") as fp:
                val = pickle.load(fp)
            # The val index lists an image once per annotation; keep the first of each image.
            self.cid2img: dict[Any, list[dict[Any, str]]] = {}
            for cid, samples in val["cid2img"].items():
                seen: set[Any] = set()
                kept = self.cid2img.setdefault(cid, [])
                for s in samples:
                    img_id = next(iter(s.keys()))
                    if img_id not in seen:
                        seen.add(img_id)
                        kept.append(s)
            self.img2anno: dict[Any, list[dict[str, Any]]] = val["img2anno"]
        eligible = {c for c in self.cid2img if len(self.cid2img[c]) > shots}
        offset = max(self.fold, 0)
        fold_all = [train_classes[offset + self.num_folds * v] for v in range(448 // self.num_folds)]
        self.fold_classes = [c for c in fold_all if c in eligible]
        self.class_names = [str(c) for c in self.fold_classes]
        self._sizes: dict[str, tuple[int, int]] = {}

    @property
    def default_num_episodes(self) -> int:
        return 2500

    def _image_size(self, name: str) -> tuple[int, int]:
        if name not in self._sizes:
            path = os.path.join(self.image_root, name)
            if not os.path.isfile(path):
                raise InputError(f"PACO-Part image not found: '{path}'")
            with Image.open(path) as img:
                self._sizes[name] = (img.height, img.width)
        return self._sizes[name]

    def _objects(self, img_id: Any, cls: Any) -> dict[Any, dict[str, list]]:
        objects: dict[Any, dict[str, list]] = {}
        for anno in self.img2anno[img_id]:
            if anno["category_id"] == cls:
                entry = objects.setdefault(anno["obj_ann_id"], {"bbox": [], "segms": []})
                entry["bbox"].append(anno["obj_bbox"])
                entry["segms"].append(anno["segmentation"])
        return objects

    def _crop_is_empty(self, img_id: Any, name: str, cls: Any, obj_id: Any) -> bool:
        entry = self._objects(img_id, cls)[obj_id]
        h, w = segmentation_shape(entry["segms"][0], self._image_size(name))
        x, y, bw, bh = entry["bbox"][0]
        return _crop_len(h, y, y + bh) == 0 or _crop_len(w, x, x + bw) == 0

    @staticmethod
    def _short_name(path: str) -> str:
        return "/".join(path.split("/")[-2:])

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        # Redraw the whole episode while any cropped mask would be empty, as published.
        while True:
            cls = pick(rng, self.fold_classes)
            tgt_sample = pick(rng, self.cid2img[cls])
            tgt_id, tgt_path = next(iter(tgt_sample.items()))
            tgt_name = self._short_name(tgt_path)
            tgt_obj = pick(rng, list(self._objects(tgt_id, cls).keys()))
            refs: list[tuple[Any, str, Any]] = []
            while True:
                ref_sample = pick(rng, self.cid2img[cls])
                ref_id, ref_path = next(iter(ref_sample.items()))
                ref_name = self._short_name(ref_path)
                if ref_name != tgt_name:
                    refs.append((ref_id, ref_name, pick(rng, list(self._objects(ref_id, cls).keys()))))
                if len(refs) == self.shots:
                    break
            empty = any(self._crop_is_empty(i, n, cls, o) for i, n, o in refs)
            if not empty and not self._crop_is_empty(tgt_id, tgt_name, cls, tgt_obj):
                break
        return Episode(index, self.fold_classes.index(cls), str(cls), f"{tgt_id}|{tgt_name}",
                       tuple(f"{i}|{n}" for i, n, _ in refs), _plain(tgt_obj), tuple(_plain(o) for _, _, o in refs))

    def _crop(self, key: str, obj_id: Any, cls: Any) -> tuple[Image.Image, torch.Tensor]:
        img_id_s, name = key.split("|", 1)
        img_id = _match_key(self.img2anno, img_id_s)
        entry = self._objects(img_id, cls)[_match_key(self._objects(img_id, cls), obj_id)]
        image = open_rgb(os.path.join(self.image_root, name))
        hw = (image.height, image.width)
        mask = np.logical_or.reduce(np.stack([segmentation_to_mask(s, hw) for s in entry["segms"]], 0), axis=0)
        x, y, bw, bh = entry["bbox"][0]
        rows, cols = slice(int(y), int(y + bh)), slice(int(x), int(x + bw))
        crop = np.asarray(image)[rows, cols]
        return Image.fromarray(np.uint8(crop)), torch.from_numpy(np.ascontiguousarray(mask[rows, cols]))

    def load(self, episode: Episode) -> LoadedEpisode:
        cls = self.fold_classes[episode.class_id]
        tgt = self._crop(episode.target, episode.target_object, cls)
        refs = [self._crop(r, o, cls) for r, o in zip(episode.references, episode.reference_objects)]
        return LoadedEpisode(tgt[0], tgt[1], [r[0] for r in refs], [r[1] for r in refs])


class _DrawBudget:
    """Stops a redraw loop that cannot succeed (the published loaders would loop forever)."""

    def __init__(self, what: str, limit: int = 100_000) -> None:
        self.what, self.left = what, limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise InputError(f"could not draw a valid episode for class '{self.what}': too few images have it")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _match_key(mapping: dict, key: Any) -> Any:
    # Episode keys travel through JSON/str; recover the original dict key (int ids are common).
    if key in mapping:
        return key
    for k in mapping:
        if str(k) == str(key):
            return k
    raise InputError(f"unknown key {key!r} in PACO-Part annotations")
