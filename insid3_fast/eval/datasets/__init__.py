"""Registry of the segmentation benchmarks, by the names the published code uses."""

from __future__ import annotations

from ...errors import InputError
from ..episodes import EpisodeDataset
from .coco import COCO20i
from .folders import ISIC, SUIM, ChestXray
from .isaid import ISAID5i
from .lvis import LVIS92i
from .parts import PACOPart, PascalPart
from .permis import PerMIS

SEGMENTATION_DATASETS: dict[str, type[EpisodeDataset]] = {
    "coco": COCO20i,
    "lvis": LVIS92i,
    "pascal_part": PascalPart,
    "paco_part": PACOPart,
    "isaid": ISAID5i,
    "isic": ISIC,
    "lung": ChestXray,
    "suim": SUIM,
    "permis": PerMIS,
}


def build_dataset(name: str, data_root: str, fold: int = 0, shots: int = 1) -> EpisodeDataset:
    """Open benchmark ``name`` under ``data_root``; raises InputError when its files are missing."""
    if name not in SEGMENTATION_DATASETS:
        raise InputError(f"unknown dataset '{name}'; choose from {sorted(SEGMENTATION_DATASETS)} or 'spair'")
    return SEGMENTATION_DATASETS[name](data_root, fold=fold, shots=shots)


__all__ = ["SEGMENTATION_DATASETS", "build_dataset", "COCO20i", "LVIS92i", "PascalPart", "PACOPart",
           "ISAID5i", "ISIC", "ChestXray", "SUIM", "PerMIS"]
