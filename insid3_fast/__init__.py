"""insid3_fast: a fast, faithful INSID3 (training-free in-context segmentation on DINOv3 features)."""

import torch

from . import ops
from .capture import CapturedTarget
from .config import Insid3Config, LoadConfig
from .core import Insid3Core, Segmenter
from .errors import (BackendError, InputError, InputFileNotFoundError, InputWarning, Insid3Error, StateError,
                     WeightsError)
from .model import INSID3, build_insid3
from .pipeline import EncodedReference

__version__ = "0.1.0"


def load_dinov3(weights: str, model_size: str | None = None, device: object = None,
                dtype: object = None) -> "torch.nn.Module":
    """Load a DINOv3 backbone (see ``insid3_fast.backbone.load_dinov3``); imported lazily."""
    from .backbone import load_dinov3 as _load

    return _load(weights, model_size=model_size, device=device, dtype=dtype)


__all__ = ["INSID3", "build_insid3", "load_dinov3", "ops", "Insid3Config", "LoadConfig", "Insid3Core", "Segmenter",
           "EncodedReference", "CapturedTarget", "Insid3Error", "InputError", "InputFileNotFoundError", "WeightsError", "BackendError", "StateError",
           "InputWarning", "__version__"]
