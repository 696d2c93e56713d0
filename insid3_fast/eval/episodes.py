"""Episode descriptions and the base class of the segmentation benchmarks.

Episodes are drawn up front, in order, from one ``np.random.RandomState(seed)``. That stream is
identical to the global ``np.random`` after ``np.random.seed(seed)``, which the published
evaluation draws from while iterating its dataset with ``num_workers=0``; the published model
does not touch numpy's RNG, so drawing all episodes before running the model gives the same
episodes. Drawing up front also lets every rank of a sharded run agree on the episode list and
lets a resumed run skip finished episodes without re-running the model.
"""

from __future__ import annotations

import abc
import contextlib
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError


@dataclass(frozen=True)
class Episode:
    """One evaluation episode: which target and references, and which class.

    ``class_id`` indexes the fold's class list (the metric's classes); -1 means the episode's
    class lies outside the fold and does not count towards the metric, as in the published code.
    ``target_object`` / ``reference_objects`` name the object chosen in each image for the
    part datasets (Pascal-Part, PACO-Part); they are None elsewhere.
    """

    index: int
    class_id: int
    class_name: str
    target: str
    references: tuple[str, ...]
    target_object: Any = None
    reference_objects: tuple[Any, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (used in the per-episode records)."""
        return {
            "index": self.index,
            "class_id": self.class_id,
            "class_name": self.class_name,
            "target": self.target,
            "references": list(self.references),
            "target_object": _jsonable(self.target_object),
            "reference_objects": [_jsonable(o) for o in self.reference_objects],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class LoadedEpisode:
    """Images and masks of an episode. Masks are (H, W) bool tensors at their image's size."""

    target_image: Image.Image
    target_mask: torch.Tensor
    reference_images: list[Image.Image]
    reference_masks: list[torch.Tensor]
    ignore: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pick(rng: np.random.RandomState, items: Sequence[Any], what: str | None = None) -> Any:
    """``np.random.choice(items, 1, replace=False)[0]`` with the same RNG consumption.

    Without replacement numpy draws a full permutation of ``len(items)``, so the state advance
    depends on the length only; indexing keeps the element's own Python type. ``what`` names
    the list in the error raised when it is empty (e.g. "images of class 'robots'").
    """
    if len(items) == 0:
        if what:
            raise InputError(f"cannot draw an episode: there are no {what} "
                             "(check that class's files, or leave the class out of the data)")
        raise InputError("cannot draw from an empty list (the dataset split has no images for a class)")
    return items[int(rng.choice(len(items), 1, replace=False)[0])]


def draw_references(rng: np.random.RandomState, pool: Sequence[str], target: str, shots: int,
                    what: str | None = None) -> list[str]:
    """Draw ``shots`` references from ``pool``, redrawing whenever the draw equals the target.

    References may repeat each other, as in the published loaders. ``what`` names the class.
    """
    if not any(name != target for name in pool):
        of = f" of {what}" if what else " for its class"
        raise InputError(f"no reference image other than the target '{target}' exists{of}")
    refs: list[str] = []
    while True:
        name = pick(rng, pool, what)
        if name != target:
            refs.append(name)
        if len(refs) == shots:
            return refs


class EpisodeDataset(abc.ABC):
    """A benchmark: its classes, how it draws episodes and how it loads them."""

    #: registry name, e.g. "coco"
    name: str = ""
    #: number of folds (0 when the benchmark has none)
    num_folds: int = 0
    #: what ``--fold -1`` means, as in the published loader (None: it has no such mode)
    all_folds: str | None = None

    def __init__(self, data_root: str, fold: int = 0, shots: int = 1) -> None:
        if shots < 1:
            raise InputError(f"--shots must be at least 1, got {shots}")
        if self.num_folds and fold == -1 and self.all_folds is None:
            raise InputError(f"{self.name} has no --fold -1 (the published loader has none either); "
                             f"use --fold 0..{self.num_folds - 1}")
        if self.num_folds and not (0 <= fold < self.num_folds or fold == -1):
            raise InputError(f"{self.name} has folds 0..{self.num_folds - 1}"
                             + (f" and -1 ({self.all_folds})" if self.all_folds else "") + f", got --fold {fold}")
        self.data_root = data_root
        self.fold = fold if self.num_folds else 0
        self.shots = shots
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        """Number of classes the metric averages over."""
        return len(self.class_names)

    @property
    @abc.abstractmethod
    def default_num_episodes(self) -> int:
        """Episodes the published evaluation runs."""

    @abc.abstractmethod
    def draw(self, index: int, rng: np.random.RandomState) -> Episode:
        """Draw episode ``index``; episodes must be drawn in order from one RNG."""

    @abc.abstractmethod
    def load(self, episode: Episode) -> LoadedEpisode:
        """Read the images and masks of an episode."""

    def plan(self, num_episodes: int | None = None, seed: int = 0) -> list[Episode]:
        """The episode list for ``seed``: the same targets, references and classes as published."""
        n = self.default_num_episodes if num_episodes is None else int(num_episodes)
        if n < 0:
            raise InputError(f"--episodes must be positive, got {n}")
        if n and self.num_classes == 0:
            raise InputError(f"{self.name} fold {self.fold}: no class has more than {self.shots} images; "
                             "nothing to evaluate (check the annotation files or use fewer --shots)")
        rng = np.random.RandomState(seed)
        return [self.draw(i, rng) for i in range(n)]


@contextlib.contextmanager
def split_file(dataset: str, path: str) -> Iterator[None]:
    """Turn any error while reading or parsing the index/split file ``path`` into an InputError.

    Wrap both the read and the walk through its structure: a truncated pickle, a file that is
    not UTF-8, a JSON of another layout or a line without its separator all end as one message.
    """
    try:
        yield
    except InputError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, ImportError, RecursionError, MemoryError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise InputError(f"{dataset}: cannot read '{path}' ({type(exc).__name__}{': ' + detail if detail else ''}); "
                         "the file looks corrupt or of another layout: download it again (see docs/eval.md)") from None


def require_paths(dataset: str, paths: Sequence[str], howto: str) -> None:
    """Raise a clear InputError (one line, as every CLI error) naming the missing paths and how
    to obtain the data."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        listing = ", ".join(f"'{p}'" for p in missing)
        raise InputError(
            f"{dataset} data not found (missing: {listing}). {howto.strip()} "
            "See docs/eval.md (and the published docs/data.md) for the full preparation steps."
        )


def binary_mask_from_png(path: str, threshold: int = 128) -> torch.Tensor:
    """A grey-level PNG mask as bool, foreground where the grey value is >= threshold."""
    with Image.open(path) as img:
        arr = np.array(img.convert("L"))
    return torch.from_numpy(arr >= threshold)


def open_rgb(path: str) -> Image.Image:
    """Open an image file as RGB, with a clear error if it is missing."""
    if not os.path.isfile(path):
        raise InputError(f"image file not found: '{path}' (is the dataset complete?)")
    with Image.open(path) as img:
        return img.convert("RGB")
