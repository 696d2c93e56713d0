"""Pictures: a mask overlaid on its image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def overlay_mask(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
                 alpha: float = 0.45) -> Image.Image:
    """The image with the bool (H, W) mask tinted in ``color`` and its outline drawn."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != base.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {base.shape[:2]} differ in size")
    out = base.copy()
    out[mask] = (1 - alpha) * base[mask] + alpha * np.asarray(color, dtype=np.float32)
    edge_img = Image.fromarray(mask.astype(np.uint8) * 255)
    edges = np.asarray(edge_img.filter(ImageFilter.FIND_EDGES)) > 0
    edges |= np.asarray(edge_img.filter(ImageFilter.MaxFilter(3))) > np.asarray(edge_img)
    out[edges] = color
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))
