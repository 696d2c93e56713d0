"""DINOv3 ViT backbones through timm: checkpoint formats, size inference, RoPE periods.

`load_dinov3` reads Meta's released ``.pth`` files or Hugging Face ``facebook/dinov3-*``
folders / ``.safetensors`` files, builds the matching timm model and returns it behind Meta's
``get_intermediate_layers`` interface. Features equal Meta's reference code bit for bit because
the RoPE periods are pinned to the bf16-rounded values Meta's checkpoints carry.

One job per module, lowest first: ``sizes`` (the released sizes), ``messages`` (the errors),
``formats`` (reading files), ``keys`` (Hugging Face → Meta names), ``arch`` (size inference and
checks), ``model`` (the timm model, RoPE pinning), ``fingerprint`` (cache key), ``load``
(`load_dinov3`, the steps in order).
"""

from __future__ import annotations

from typing import Any

from ..inputs import PATCH_SIZE
from .arch import infer_model_size
from .fingerprint import weights_fingerprint
from .keys import hf_to_meta_state_dict
from .load import load_dinov3, load_meta_state
from .model import DinoV3Backbone, build_dinov3, cached_rope_class, pinned_rope_class
from .sizes import META_CHECKPOINT_NAMES, MODEL_SIZES, dinov3_rope_periods

__all__ = [
    "MODEL_SIZES",
    "META_CHECKPOINT_NAMES",
    "PATCH_SIZE",
    "DinoV3Backbone",
    "build_dinov3",
    "dinov3_rope_periods",
    "hf_to_meta_state_dict",
    "infer_model_size",
    "load_dinov3",
    "load_meta_state",
    "weights_fingerprint",
]


def __getattr__(name: str) -> Any:
    # Lets pickle find the lazily built RoPE classes of a pickled model (their __module__ is this
    # package, see model.pinned_rope_class and model.cached_rope_class).
    if name == "_PinnedPeriodsRope":
        return pinned_rope_class()
    if name == "_CachedEmbedRope":
        return cached_rope_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
