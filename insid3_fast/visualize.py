"""Pictures: a mask overlaid on its image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def overlay_mask(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
                 alpha: float = 0.45) -> Image.Image:
    """The image with the bool (H, W) mask tinted in ``color`` and its outline drawn.

    The image is read as the model reads an image object (``inputs.to_rgb``: 16-bit and float
    images scaled to 8 bits); for a file, give ``inputs.read_image_file(path)``, as the model
    reads files (clipped to 0-255, as published).
    """
    from .errors import InputError
    from .inputs import to_rgb

    base = np.asarray(to_rgb(image), dtype=np.float32)
    if mask.shape != base.shape[:2]:
        raise InputError(f"mask {mask.shape} and image {base.shape[:2]} differ in size: overlay a mask on the "
                         "image it was predicted for (EXIF-rotated if the model rotated it)")
    out = base.copy()
    out[mask] = (1 - alpha) * base[mask] + alpha * np.asarray(color, dtype=np.float32)
    edge_img = Image.fromarray(mask.astype(np.uint8) * 255)
    edges = np.asarray(edge_img.filter(ImageFilter.FIND_EDGES)) > 0
    edges |= np.asarray(edge_img.filter(ImageFilter.MaxFilter(3))) > np.asarray(edge_img)
    out[edges] = color
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))
