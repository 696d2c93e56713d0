"""Writers of tiny synthetic datasets in each benchmark's published layout (for the eval tests).

Every image is dark noise with its foreground drawn bright, so a brightness-threshold model
finds the foreground; masks are small (H, W = 24, 32) to keep the tests fast.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
from PIL import Image

from insid3_fast.eval.masks import rle_encode

H, W = 24, 32


def _rng(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed)


def blob(rng: np.random.RandomState, h: int = H, w: int = W) -> np.ndarray:
    """A random axis-aligned rectangle mask covering part of the image."""
    m = np.zeros((h, w), dtype=bool)
    y0, x0 = rng.randint(0, h // 2), rng.randint(0, w // 2)
    m[y0:y0 + rng.randint(3, h // 2 + 2), x0:x0 + rng.randint(3, w // 2 + 2)] = True
    return m


def save_image(path: str, fg: np.ndarray, rng: np.random.RandomState) -> None:
    """Save an RGB image: noise in [0, 60), foreground in [200, 255)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = rng.randint(0, 60, size=(*fg.shape, 3))
    arr[fg] = rng.randint(200, 255, size=(int(fg.sum()), 3))
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95) if path.endswith(".jpg") else \
        Image.fromarray(arr.astype(np.uint8)).save(path)


def save_png(path: str, arr: np.ndarray) -> None:
    """Save a single-channel uint8 PNG."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def write_coco(root: str, num_images: int = 8, seed: int = 0) -> None:
    """COCO2014 with class-index PNGs and fold pickles listing 2-5 images per class."""
    rng = _rng(seed)
    base = os.path.join(root, "COCO2014")
    names = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(num_images)]
    labels = {}
    for i, name in enumerate(names):
        lab = np.zeros((H, W), dtype=np.uint8)
        # Every class appears somewhere in every image (one pixel column band each).
        lab.reshape(-1)[: 80 * 4] = np.repeat(np.arange(1, 81), 4)
        fg = blob(rng)
        lab[fg] = 0
        labels[name] = lab
        save_image(os.path.join(base, name), lab > 0, rng)
        save_png(os.path.join(base, "annotations", name.replace(".jpg", ".png")), lab)
    for fold in range(4):
        classwise = {c: sorted(rng.choice(names, rng.randint(2, 6), replace=False).tolist()) for c in range(80)}
        path = os.path.join(base, "splits", "val", f"fold{fold}.pkl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fp:
            pickle.dump(classwise, fp)


def write_lvis(root: str, num_classes: int = 33, seed: int = 0) -> None:
    """LVIS/lvis_val.pkl with RLE and array segmentations, images under LVIS/coco/val2017."""
    rng = _rng(seed)
    base = os.path.join(root, "LVIS")
    images = [f"val2017/{i:012d}.jpg" for i in range(6)]
    fgs = {}
    for name in images:
        fgs[name] = blob(rng)
        save_image(os.path.join(base, "coco", name), fgs[name], rng)
    anno: dict = {}
    for c in range(num_classes):
        cid = 1000 + 7 * c
        chosen = rng.choice(images, rng.randint(1, 5), replace=False).tolist()
        anno[cid] = {}
        for name in chosen:
            segs = []
            for k in range(rng.randint(1, 3)):
                m = blob(rng) & fgs[name] if k else fgs[name]
                segs.append({"segmentation": rle_encode(m) if (c + k) % 2 else m.astype(np.uint8)})
            anno[cid][name] = {"annotations": segs}
    with open(os.path.join(base, "lvis_val.pkl"), "wb") as fp:
        pickle.dump(anno, fp)
    with open(os.path.join(base, "lvis_train.pkl"), "wb") as fp:
        pickle.dump({}, fp)


PASCAL_FOLD_OBJECTS = {"animals": ["cat", "dog"], "indoor": ["sofa"], "person": ["person"], "vehicles": ["aeroplane", "car"]}


def write_pascal_part(root: str, num_images: int = 16, seed: int = 0) -> None:
    """Pascal-Part index JSON, per-image part JSONs (RLE strings) and JPEGs."""
    rng = _rng(seed)
    voc = os.path.join(root, "Pascal-Part", "VOCdevkit", "VOC2010")
    parts = ["HEAD", "BODY", "TAIL"]
    index: dict = {}
    all_objs = [o for objs in PASCAL_FOLD_OBJECTS.values() for o in objs]
    ids = [f"2008_{i:06d}" for i in range(num_images)]
    for img_id in ids:
        objects = []
        fg_total = np.zeros((H, W), dtype=bool)
        for k in range(rng.randint(1, 4)):
            name = all_objs[rng.randint(len(all_objs))]
            x0, y0 = rng.randint(0, W // 2), rng.randint(0, H // 2)
            box = {"xmin": x0, "ymin": y0, "xmax": x0 + rng.randint(6, W // 2), "ymax": y0 + rng.randint(6, H // 2)}
            obj_parts = []
            for p in parts:
                if rng.rand() < 0.3:
                    continue  # some objects lack a part: exercises the redraw path
                m = np.zeros((H, W), dtype=bool)
                m[box["ymin"]:box["ymax"], box["xmin"]:box["xmax"]] = blob(rng)[box["ymin"]:box["ymax"], box["xmin"]:box["xmax"]]
                fg_total |= m
                obj_parts.append({"name": p, "mask": [rle_encode(m)]})
            objects.append({"name": name, "bndbox": box, "parts": obj_parts})
        path = os.path.join(voc, "Annotations_Part_json_merged_part_classes", f"{img_id}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fp:
            json.dump({"object": objects}, fp)
        save_image(os.path.join(voc, "JPEGImages", f"{img_id}.jpg"), fg_total, rng)
        for o in objects:
            fold = next(f for f, objs in PASCAL_FOLD_OBJECTS.items() if o["name"] in objs)
            for p in o["parts"]:
                entry = index.setdefault(fold, {"object": {}})["object"].setdefault(o["name"], {"part": {}})
                lists = entry["part"].setdefault(p["name"], {"train": ["x"], "val": []})
                if img_id not in lists["val"]:
                    lists["val"].append(img_id)
    for fold in PASCAL_FOLD_OBJECTS:
        index.setdefault(fold, {"object": {}})
    for fold in index.values():
        for obj in fold["object"].values():
            for lists in obj["part"].values():
                if len(lists["val"]) < 3:
                    lists["val"] = []  # too few images: the class is dropped, as a class without val images
                else:
                    # A listed image whose objects lack the part exercises the redraw path.
                    lists["val"].extend(i for i in ids[:1] if i not in lists["val"])
    with open(os.path.join(voc, "all_obj_part_to_image.json"), "w") as fp:
        json.dump(index, fp)


def write_paco_part(root: str, num_images: int = 8, seed: int = 0) -> None:
    """PACO-Part pickles (448 train classes; a few val classes) and COCO 2017 images."""
    rng = _rng(seed)
    base = os.path.join(root, "PACO-Part")
    train = {"cid2img": {c: [] for c in range(448)}}
    cid2img: dict = {}
    img2anno: dict = {}
    ann_id = 0
    for i in range(num_images):
        img_id = 5000 + i
        path = f"/data/coco/val2017/{img_id:012d}.jpg"
        fg_total = np.zeros((H, W), dtype=bool)
        img2anno[img_id] = []
        for k in range(rng.randint(1, 4)):
            cid = int(rng.choice([0, 4, 8, 1, 5]))
            obj_id = 90000 + 10 * i + k
            x, y = float(rng.randint(0, W // 2)), float(rng.randint(0, H // 2))
            bbox = [x, y, float(rng.randint(4, W // 2)), float(rng.randint(4, H // 2))]
            if rng.rand() < 0.15:
                bbox[3] = 0.4  # a degenerate box: its crop is empty and the episode is redrawn
            for _ in range(rng.randint(1, 3)):
                m = blob(rng)
                fg_total |= m
                img2anno[img_id].append({"category_id": cid, "obj_ann_id": obj_id, "obj_bbox": bbox,
                                         "segmentation": rle_encode(m), "id": ann_id})
                ann_id += 1
                # The val index repeats an image once per annotation.
                cid2img.setdefault(cid, []).append({img_id: path})
        save_image(os.path.join(base, "coco", "val2017", f"{img_id:012d}.jpg"), fg_total, rng)
    os.makedirs(os.path.join(base, "paco"), exist_ok=True)
    with open(os.path.join(base, "paco", "paco_part_train.pkl"), "wb") as fp:
        pickle.dump(train, fp)
    with open(os.path.join(base, "paco", "paco_part_val.pkl"), "wb") as fp:
        pickle.dump({"cid2img": cid2img, "img2anno": img2anno}, fp)


def write_isaid(root: str, num_images: int = 9, seed: int = 0) -> None:
    """iSAID val patches with class-index masks (255 = boundary) and fold split files."""
    rng = _rng(seed)
    base = os.path.join(root, "iSAID")
    lines: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for i in range(num_images):
        name = f"P{i:04d}_0_32_0_24"
        lab = np.zeros((H, W), dtype=np.uint8)
        classes = rng.choice(15, 2, replace=False)
        for c in classes:
            m = blob(rng)
            lab[m] = c + 1
            edge = m ^ np.roll(m, 1, axis=1)
            lab[edge & (lab == 0)] = 255
            lines[int(c) // 5].append(f"{name}__{int(c) + 1}")
        save_image(os.path.join(base, "val", "images", name + ".png"), (lab > 0) & (lab < 255), rng)
        save_png(os.path.join(base, "val", "semantic_png", name + "_instance_color_RGB.png"), lab)
    for fold, entries in lines.items():
        # Guarantee two images per class so references can differ from the target.
        path = os.path.join(base, "splits", "val", f"fold{fold}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        counts: dict[str, int] = {}
        for e in entries:
            counts[e.split("__")[1]] = counts.get(e.split("__")[1], 0) + 1
        keep = [e for e in entries if counts[e.split("__")[1]] >= 2]
        with open(path, "w") as fp:
            fp.write("".join(e + "\n" for e in keep))


def write_isic(root: str, per_class: int = 3, seed: int = 0) -> None:
    """ISIC class folders 1/2/3 of JPEGs and *_segmentation.png masks (0/255)."""
    rng = _rng(seed)
    base = os.path.join(root, "ISIC")
    k = 0
    for cat in ("1", "2", "3"):
        for _ in range(per_class):
            m = blob(rng)
            save_image(os.path.join(base, "ISIC2018_Task1-2_Training_Input", cat, f"ISIC_{k:07d}.jpg"), m, rng)
            save_png(os.path.join(base, "ISIC2018_Task1_Training_GroundTruth", f"ISIC_{k:07d}_segmentation.png"), m * 255)
            k += 1


def write_lung(root: str, num_images: int = 4, seed: int = 0) -> None:
    """LungSegmentation with Montgomery (same name) and Shenzhen ('_mask' suffix) masks."""
    rng = _rng(seed)
    base = os.path.join(root, "LungSegmentation")
    for i in range(num_images):
        m = blob(rng)
        stem = f"MCUCXR_{i:04d}_0" if i % 2 else f"CHNCXR_{i:04d}_0"
        save_image(os.path.join(base, "CXR_png", stem + ".png"), m, rng)
        mask_name = stem + ".png" if i % 2 else stem + "_mask.png"
        save_png(os.path.join(base, "masks", mask_name), m * 255)


def write_suim(root: str, num_images: int = 4, seed: int = 0) -> None:
    """SUIM images and per-class binary masks, including one empty mask per class."""
    rng = _rng(seed)
    base = os.path.join(root, "SUIM")
    for i in range(num_images):
        fg = np.zeros((H, W), dtype=bool)
        for cat in ("FV", "HD", "PF", "RI", "RO", "SR", "WR"):
            m = blob(rng) if i else np.zeros((H, W), dtype=bool)
            fg |= m
            save_png(os.path.join(base, "masks", cat, f"d_r_{i}_.bmp"), m * 255)
        save_image(os.path.join(base, "images", f"d_r_{i}_.jpg"), fg, rng)


def write_permis(root: str, num_videos: int = 3, seed: int = 0) -> None:
    """PerMIRS video folders with frames 0-2 and masks.npz.npy (one dict per frame)."""
    rng = _rng(seed)
    for v in range(num_videos):
        d = os.path.join(root, "PerMIRS", str(v * 4))
        masks = []
        for f in range(3):
            m = blob(rng)
            masks.append({17: m.astype(np.uint8)})
            save_image(os.path.join(d, f"{f}.jpg"), m, rng)
        np.save(os.path.join(d, "masks.npz.npy"), np.array(masks, dtype=object), allow_pickle=True)


def write_spair(root: str, num_pairs: int = 6, seed: int = 0) -> None:
    """SPair-71k images, pair annotations and the test layout file."""
    rng = _rng(seed)
    base = os.path.join(root, "SPair-71k")
    names = []
    for i in range(num_pairs):
        cat = ("cat", "dog")[i % 2]
        src, trg = f"2008_{2 * i:06d}", f"2008_{2 * i + 1:06d}"
        for img in (src, trg):
            save_image(os.path.join(base, "JPEGImages", cat, img + ".jpg"), blob(rng), rng)
        n = rng.randint(2, 6)
        ann = {
            "category": cat,
            "src_kps": rng.randint(0, min(H, W), size=(n, 2)).tolist(),
            "trg_kps": rng.randint(0, min(H, W), size=(n, 2)).tolist(),
            "trg_bndbox": [2, 3, 2 + rng.randint(8, W - 2), 3 + rng.randint(8, H - 3)],
        }
        name = f"{i:06d}-{src}-{trg}:{cat}"
        names.append(name)
        path = os.path.join(base, "PairAnnotation", "test", name + ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fp:
            json.dump(ann, fp)
    os.makedirs(os.path.join(base, "Layout", "large"), exist_ok=True)
    with open(os.path.join(base, "Layout", "large", "test.txt"), "w") as fp:
        fp.write("\n".join(names) + "\n")


WRITERS = {
    "coco": write_coco, "lvis": write_lvis, "pascal_part": write_pascal_part, "paco_part": write_paco_part,
    "isaid": write_isaid, "isic": write_isic, "lung": write_lung, "suim": write_suim, "permis": write_permis,
    "spair": write_spair,
}


def write_all(root: str) -> None:
    """Write every benchmark's layout under ``root``."""
    for writer in WRITERS.values():
        writer(root)


class FakeModel:
    """Stand-in for INSID3: predicts bright pixels of the target at a fixed square size.

    Mirrors the evaluation setting resize_to_orig_size=False (prediction at image_size).
    ``fail_after`` makes segment() raise after that many calls (to simulate an interruption).
    """

    def __init__(self, image_size: int = 40, fail_after: int | None = None) -> None:
        self.image_size = image_size
        self.fail_after = fail_after
        self.calls = 0
        self.refs: list = []
        self.target = None

    def set_reference(self, image, mask=None) -> None:
        self.refs.append((image, mask))

    def set_target(self, image) -> None:
        self.target = image

    def segment(self):
        import torch
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        assert self.refs and self.target is not None
        img = self.target.convert("L").resize((self.image_size, self.image_size), Image.BILINEAR)
        self.refs, self.target = [], None
        return torch.from_numpy(np.asarray(img) > 128)

    def match(self, src_kps, use_debiased: bool = True):
        import torch
        self.calls += 1
        self.refs, self.target = [], None
        return src_kps.float() + (0.0 if use_debiased else 3.0) + torch.arange(src_kps.shape[0])[:, None].float()
