"""Evaluation of INSID3 on the published in-context segmentation and correspondence benchmarks."""

from .cli import add_eval_arguments, run_eval
from .correspondence import SPair71k, evaluate_correspondence
from .datasets import SEGMENTATION_DATASETS, build_dataset
from .episodes import Episode, EpisodeDataset, LoadedEpisode
from .metrics import SegmentationMeter, episode_areas
from .runner import evaluate_segmentation

__all__ = [
    "add_eval_arguments", "run_eval", "SPair71k", "evaluate_correspondence", "SEGMENTATION_DATASETS",
    "build_dataset", "Episode", "EpisodeDataset", "LoadedEpisode", "SegmentationMeter", "episode_areas",
    "evaluate_segmentation",
]
