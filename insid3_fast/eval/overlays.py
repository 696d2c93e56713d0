"""Side-by-side PNGs of an episode: references, target, prediction and ground truth (PIL only)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

PANEL_HEIGHT = 256


def _tint(image: Image.Image, mask: torch.Tensor | None, color: tuple[int, int, int]) -> Image.Image:
    rgb = image.convert("RGB")
    if mask is None:
        return rgb
    m = Image.fromarray(mask.bool().cpu().numpy().astype(np.uint8) * 255).resize(rgb.size, Image.NEAREST)
    arr = np.asarray(rgb).astype(np.float32)
    sel = np.asarray(m) > 0
    arr[sel] = 0.45 * arr[sel] + 0.55 * np.asarray(color, dtype=np.float32)
    return Image.fromarray(arr.astype(np.uint8))


def _panel(image: Image.Image, title: str) -> Image.Image:
    w = max(1, round(image.width * PANEL_HEIGHT / max(1, image.height)))
    body = image.resize((w, PANEL_HEIGHT), Image.BILINEAR)
    out = Image.new("RGB", (w, PANEL_HEIGHT + 16), "white")
    out.paste(body, (0, 16))
    ImageDraw.Draw(out).text((2, 2), title, fill="black")
    return out


def make_overlay(
    reference_images: list[Image.Image],
    reference_masks: list[torch.Tensor],
    target_image: Image.Image,
    prediction: torch.Tensor,
    ground_truth: torch.Tensor,
    title: str = "",
) -> Image.Image:
    """One image with each reference (mask in red), the target, prediction (green) and GT (blue)."""
    panels = [_panel(_tint(img, m, (255, 0, 0)), f"ref {i}") for i, (img, m) in enumerate(zip(reference_images, reference_masks))]
    panels.append(_panel(target_image.convert("RGB"), "target"))
    panels.append(_panel(_tint(target_image, prediction, (0, 200, 0)), "prediction"))
    panels.append(_panel(_tint(target_image, ground_truth, (0, 80, 255)), "ground truth"))
    header = 18 if title else 0
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), PANEL_HEIGHT + 16 + header), "white")
    if title:
        ImageDraw.Draw(canvas).text((2, 2), title, fill="black")
    x = 0
    for p in panels:
        canvas.paste(p, (x, header))
        x += p.width + 4
    return canvas
