"""insid3_fast: a fast, faithful INSID3 (training-free in-context segmentation on DINOv3 features)."""

from . import ops
from .errors import BackendError, InputError, Insid3Error, WeightsError
from .model import INSID3, build_insid3
from .pipeline import EncodedReference, Segmenter

__version__ = "0.1.0"


def load_dinov3(*args, **kwargs):
    """Load a DINOv3 backbone (see ``insid3_fast.backbone.load_dinov3``)."""
    from .backbone import load_dinov3 as _load

    return _load(*args, **kwargs)


__all__ = ["INSID3", "build_insid3", "load_dinov3", "ops", "Segmenter", "EncodedReference",
           "Insid3Error", "InputError", "WeightsError", "BackendError", "__version__"]
