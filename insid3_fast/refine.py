"""The output stage: upsampling a patch mask and optional CRF boundary refinement (SPEC step 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import REFINERS  # noqa: F401  (re-exported: the refiners are options)


def upsample_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a bool (h, w) mask to (height, width): bilinear on the 0/1 mask, then ``> 0.5``."""
    return F.interpolate(mask[None, None].float(), size=(height, width),
                         mode="bilinear", align_corners=False)[0, 0] > 0.5


def refine_with_crf(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CRF refinement of a (size, size) bool mask given the normalised (1, 3, size, size) image."""
    from .crf import crf_refine
    from .inputs import denormalize

    return crf_refine(denormalize(image[0]), mask)
