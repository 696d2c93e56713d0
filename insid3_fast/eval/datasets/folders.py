"""Cross-domain benchmarks stored as folders of images and masks: ISIC 2018, chest X-ray, SUIM."""

from __future__ import annotations

import glob
import os

import numpy as np

from ..episodes import (Episode, EpisodeDataset, LoadedEpisode, binary_mask_from_png, draw_references,
                        open_rgb, pick, require_paths)

ISIC_HOWTO = (
    "ISIC needs the ISIC 2018 Task 1 training images, re-organised into the DR-Adapter class folders "
    "ISIC2018_Task1-2_Training_Input/{1,2,3}/*.jpg, and the masks "
    "ISIC2018_Task1_Training_GroundTruth/*_segmentation.png, under <data-root>/ISIC."
)
LUNG_HOWTO = (
    "Chest X-ray needs the Kaggle 'chest-xray-masks-and-labels' data: images in "
    "<data-root>/LungSegmentation/CXR_png and masks in <data-root>/LungSegmentation/masks."
)
SUIM_HOWTO = (
    "SUIM needs the merged SUIM data (Kaggle 'suim-merged', as prepared by ABCDFSS): "
    "<data-root>/SUIM/images/*.jpg and <data-root>/SUIM/masks/<FV|HD|PF|RI|RO|SR|WR>/*."
)


def _sorted_with_ext(folder: str, ext: str) -> list[str]:
    # The published loaders keep files whose first dotted suffix is the extension.
    return [p for p in sorted(glob.glob(os.path.join(folder, "*"))) if os.path.basename(p).split(".")[1:2] == [ext]]


class _FolderBenchmark(EpisodeDataset):
    """Episode i has class i mod C; target and references are drawn from that class's files."""

    classwise: dict[str, list[str]]
    categories: tuple[str, ...]
    #: what the draw found none of, in the error of a class without files
    empty_pool_hint = "image files"

    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        class_id = index % len(self.categories)
        pool = self.classwise[self.categories[class_id]]
        what = f"class '{self.class_names[class_id]}' ({self.categories[class_id]})"
        target = pick(rng, pool, f"{self.empty_pool_hint} for {what}")
        refs = draw_references(rng, pool, target, self.shots, what)
        # Keys are stored relative to the data root so records survive moving the data.
        rel = lambda p: os.path.relpath(p, self.data_root)  # noqa: E731
        return Episode(index, class_id, self.class_names[class_id], rel(target), tuple(rel(r) for r in refs))

    def _image_for(self, key: str) -> str:
        raise NotImplementedError

    def _mask_for(self, key: str) -> str:
        raise NotImplementedError

    def load(self, episode: Episode) -> LoadedEpisode:
        keys = [os.path.join(self.data_root, k) for k in (episode.target, *episode.references)]
        images = [open_rgb(self._image_for(k)) for k in keys]
        masks = [binary_mask_from_png(self._mask_for(k)) for k in keys]
        return LoadedEpisode(images[0], masks[0], images[1:], masks[1:])


class ISIC(_FolderBenchmark):
    """ISIC 2018 skin lesions, 3 classes (DR-Adapter folders 1/2/3), 600 episodes."""

    name = "isic"
    categories = ("1", "2", "3")

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        base = os.path.join(data_root, "ISIC")
        self.image_dir = os.path.join(base, "ISIC2018_Task1-2_Training_Input")
        self.mask_dir = os.path.join(base, "ISIC2018_Task1_Training_GroundTruth")
        require_paths("ISIC", [self.mask_dir] + [os.path.join(self.image_dir, c) for c in self.categories], ISIC_HOWTO)
        self.classwise = {c: _sorted_with_ext(os.path.join(self.image_dir, c), "jpg") for c in self.categories}
        self.class_names = [f"lesion-{c}" for c in self.categories]

    @property
    def default_num_episodes(self) -> int:
        return 600

    def _image_for(self, key: str) -> str:
        return key

    def _mask_for(self, key: str) -> str:
        stem = os.path.basename(key).split(".")[0]
        return os.path.join(self.mask_dir, stem + "_segmentation.png")


class ChestXray(_FolderBenchmark):
    """Chest X-ray lung segmentation (one class), 600 episodes drawn over the mask files."""

    name = "lung"
    categories = ("1",)

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        base = os.path.join(data_root, "LungSegmentation")
        self.image_dir = os.path.join(base, "CXR_png")
        self.mask_dir = os.path.join(base, "masks")
        require_paths("Chest X-ray", [self.image_dir, self.mask_dir], LUNG_HOWTO)
        self.classwise = {"1": _sorted_with_ext(self.mask_dir, "png")}
        self.class_names = ["lung"]

    @property
    def default_num_episodes(self) -> int:
        return 600

    def _image_for(self, key: str) -> str:
        base = os.path.basename(key)
        # Shenzhen masks carry a '_mask' suffix that the images lack; Montgomery (MCUCXR) ones do not.
        if "MCUCXR" not in key:
            base = base[:-9] + ".png"
        return os.path.join(self.image_dir, base)

    def _mask_for(self, key: str) -> str:
        return key


class SUIM(_FolderBenchmark):
    """SUIM underwater scenes, 7 classes; as many episodes as non-empty masks."""

    name = "suim"
    empty_pool_hint = "non-empty masks"
    categories = ("FV", "HD", "PF", "RI", "RO", "SR", "WR")
    _names = ("fish and vertebrates", "human divers", "plants and sea-grass", "reefs and invertebrates",
              "robots", "sea-floor and rocks", "wrecks and ruins")

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        super().__init__(data_root, fold, shots)
        base = os.path.join(data_root, "SUIM")
        self.image_dir = os.path.join(base, "images")
        mask_root = os.path.join(base, "masks")
        require_paths("SUIM", [self.image_dir] + [os.path.join(mask_root, c) for c in self.categories], SUIM_HOWTO)
        self.classwise = {}
        for c in self.categories:
            paths = sorted(glob.glob(os.path.join(mask_root, c, "*")))
            self.classwise[c] = [p for p in paths if bool(binary_mask_from_png(p).any())]
        self.class_names = list(self._names)

    @property
    def default_num_episodes(self) -> int:
        return sum(len(v) for v in self.classwise.values())

    def _image_for(self, key: str) -> str:
        return os.path.join(self.image_dir, os.path.basename(key).split(".")[0] + ".jpg")

    def _mask_for(self, key: str) -> str:
        return key
