"""The oracle's mask for a whole episode, on a model's own backbone and positional basis.

``oracle_segment(model, refs, masks, target)`` is what the published code gives for the episode
``model.set_reference(...); model.set_target(...); model.segment()`` describes: the same inputs
and features (``model.core.features``), then ``testing.published`` for steps 4-7 and the shared
output stage (upsampling, CRF, resize). Tests hold every backend of the pipeline against it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..inputs import ImageLike, MaskLike, load_image
from ..model import INSID3
from . import published


@torch.no_grad()
def oracle_segment(model: INSID3, refs: Sequence[ImageLike], masks: Sequence[MaskLike],
                   target: ImageLike) -> torch.Tensor:
    """The published algorithm's (H, W) bool mask for one episode, with ``model``'s options."""
    core, size = model.core, model.image_size
    images, ref_masks = [], []
    for image, mask in zip(refs, masks):
        tensor, orig = load_image(image, size, exif_transpose=model.exif_transpose)
        images.append(tensor.to(model.device))
        ref_masks.append(model._load_mask(image, orig, mask).to(model.device))
    tgt, tgt_size = load_image(target, size, exif_transpose=model.exif_transpose)
    tgt = tgt.to(model.device)
    feats = core.features(torch.cat([*images, tgt]))
    S = len(images)
    args = (feats[:S], torch.cat(ref_masks).bool(), feats[S], core.projector, core.tau, core.merge_threshold)
    if core.connectivity is None:
        patch_mask = published.segment_patches(*args)
    else:
        patch_mask = published.segment_patches_grid(*args, core.connectivity)
    return core.finalize(patch_mask, tgt, tgt_size if model.resize_to_orig_size else None)
