"""`load_dinov3`: a checkpoint file to a frozen DINOv3 backbone, one step per module.

read (formats) → Meta names (keys) → architecture and checks (arch) → timm model, weights and
RoPE periods (model) → cache key (fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import WeightsError
from .arch import check_keys, check_tensors, infer_arch
from .fingerprint import weights_fingerprint
from .formats import read_checkpoint
from .keys import to_meta_layout
from .model import DinoV3Backbone, build_dinov3, load_weights, pin_rope_periods

__all__ = ["load_dinov3", "load_meta_state"]


def _load_checked(model: torch.nn.Module, state: dict, arch: object) -> None:
    """Checked Meta-named weights into a timm DINOv3 of their architecture, RoPE periods pinned."""
    load_weights(model, state)
    pin_rope_periods(model, arch.periods)


def load_meta_state(backbone: DinoV3Backbone, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict in Meta's names (e.g. the ``encoder.*`` entries of the published
    model's state dict, which holds Meta's hub encoder) into ``backbone``, checked as a file is.

    WeightsError when the weights are not of the backbone's architecture.
    """
    state = to_meta_layout(dict(state), None)
    arch = infer_arch(state)
    check_keys(state, arch)
    check_tensors(state, arch)
    if (arch.embed_dim, arch.depth) != (backbone.embed_dim, backbone.n_blocks):
        raise WeightsError(f"these weights are of a DINOv3 with C = {arch.embed_dim} and {arch.depth} blocks, the "
                           f"encoder has C = {backbone.embed_dim} and {backbone.n_blocks}")
    param = next(backbone.model.parameters())
    _load_checked(backbone.model, {k: v.to(param.device) for k, v in state.items()}, arch)


def load_dinov3(
    weights: str | os.PathLike[str],
    model_size: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DinoV3Backbone:
    """Load DINOv3 weights (Meta ``.pth``, Hugging Face folder or ``.safetensors`` file) into a
    frozen, eval-mode timm model exposing Meta's ``get_intermediate_layers``.

    ``model_size`` (a key of MODEL_SIZES) is inferred from the file when None; a given size
    that disagrees with the file raises WeightsError, as do missing, corrupt or unknown files.
    """
    state, config = read_checkpoint(Path(weights).expanduser())
    state = to_meta_layout(state, config)
    arch = infer_arch(state, model_size)
    check_keys(state, arch)
    check_tensors(state, arch)  # before building: a malformed file never costs an allocation
    model = build_dinov3(arch.model_size, **arch.timm_kwargs())
    _load_checked(model, state, arch)
    backbone = DinoV3Backbone(model, arch.model_size)
    backbone.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        backbone.to(device=device, dtype=dtype)
    # Keys the positional-basis disk cache of INSID3 built on this encoder, until its weights change.
    backbone.weights_fingerprint = weights_fingerprint(weights)
    return backbone
