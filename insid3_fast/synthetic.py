"""A deterministic synthetic encoder and synthetic scenes, for benchmarks and tests without weights.

``insid3-fast bench`` and the test suite use it so that every step does real work without
DINOv3's gated weights; it is a stand-in, not a model to segment real images with.

The encoder mimics what INSID3 relies on in DINOv3: patch features that depend on the local
content (colour and texture of the 16 px patch and its neighbourhood) plus a strong
positional component shared by every image, living in a low-dimensional subspace that the
debiasing must remove. Scenes hold coloured objects (the concepts) on textured backgrounds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


class SyntheticEncoder(torch.nn.Module):
    """Meta's ``get_intermediate_layers`` interface over a fixed random content/position model."""

    def __init__(self, embed_dim: int = 64, hidden: int = 48, pos_freqs: int = 6,
                 pos_weight: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim = embed_dim
        self.w1 = torch.nn.Parameter(torch.randn(hidden, 9, generator=g) * 1.5, requires_grad=False)
        self.b1 = torch.nn.Parameter(torch.randn(hidden, generator=g) * 0.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(embed_dim, hidden, generator=g) / math.sqrt(hidden), requires_grad=False)
        self.freqs = torch.nn.Parameter(torch.rand(pos_freqs, 2, generator=g) * 3.0 + 0.5, requires_grad=False)
        self.phases = torch.nn.Parameter(torch.rand(pos_freqs, generator=g) * 2 * math.pi, requires_grad=False)
        self.pos_proj = torch.nn.Parameter(torch.randn(embed_dim, 2 * pos_freqs, generator=g) / math.sqrt(pos_freqs), requires_grad=False)
        self.pos_weight = pos_weight

    def _positional(self, h: int, w: int) -> torch.Tensor:
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        arg = 2 * math.pi * (self.freqs[:, 0, None, None] * yy + self.freqs[:, 1, None, None] * xx) + self.phases[:, None, None]
        basis = torch.cat([torch.sin(arg), torch.cos(arg)])  # (2F, h, w)
        return torch.einsum("cf,fhw->chw", self.pos_proj, basis)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1, reshape: bool = True,
                                norm: bool = True) -> tuple[torch.Tensor, ...]:
        """Return ((B, C, h, w),): content features plus the positional field."""
        B, _, H, W = x.shape
        h, w = H // 16, W // 16
        mean = F.avg_pool2d(x, 16)
        std = (F.avg_pool2d(x * x, 16) - mean * mean).clamp(min=0).sqrt()
        ctx = F.avg_pool2d(mean, 3, stride=1, padding=1, count_include_pad=False)
        local = torch.cat([mean, std, ctx], dim=1)  # (B, 9, h, w)
        hidden = torch.tanh(torch.einsum("kc,bchw->bkhw", self.w1, local) + self.b1[None, :, None, None])
        content = torch.einsum("ck,bkhw->bchw", self.w2, hidden)
        feats = content + self.pos_weight * self._positional(h, w)[None].to(x.dtype)
        return (feats,)


PALETTE = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200), (30, 200, 210)]


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 160, size=3)
    grad = rng.uniform(-40, 40, size=(2, 3))
    img = base + (yy[..., None] / height) * grad[0] + (xx[..., None] / width) * grad[1]
    img += rng.normal(0, 12, size=(height, width, 3))
    return img


def make_scene(rng: np.random.Generator, height: int, width: int, concept: int,
               distractors: int = 2) -> tuple[Image.Image, np.ndarray]:
    """A textured background with distractor objects and, drawn last, an object of colour ``concept``.

    Returns the RGB image and the bool (H, W) mask of the concept object.
    """
    canvas = Image.fromarray(np.clip(_textured_background(rng, height, width), 0, 255).astype(np.uint8))
    label = Image.new("L", (width, height), 0)
    draw, ldraw = ImageDraw.Draw(canvas), ImageDraw.Draw(label)
    others = [c for c in range(len(PALETTE)) if c != concept]
    colours = [int(rng.choice(others)) for _ in range(distractors)] + [concept]
    for i, colour in enumerate(colours):
        rw, rh = rng.uniform(0.2, 0.4) * width, rng.uniform(0.2, 0.4) * height
        cx, cy = rng.uniform(rw / 2, width - rw / 2), rng.uniform(rh / 2, height - rh / 2)
        box = [cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2]
        fill = tuple(int(np.clip(v + rng.normal(0, 10), 0, 255)) for v in PALETTE[colour])
        shape = "ellipse" if rng.random() < 0.5 else "rectangle"
        getattr(draw, shape)(box, fill=fill)
        getattr(ldraw, shape)(box, fill=i + 1)
    mask = np.array(label) == len(colours)
    return canvas, mask


def make_episode(seed: int, shots: int, size_hw: tuple[int, int] = (200, 260), distractors: int = 2
                 ) -> tuple[list[Image.Image], list[np.ndarray], Image.Image, np.ndarray]:
    """References (images, masks) and a target (image, mask) sharing one concept colour."""
    rng = np.random.default_rng(seed)
    concept = int(rng.integers(len(PALETTE)))
    refs = [make_scene(rng, *size_hw, concept, distractors) for _ in range(shots)]
    target, target_mask = make_scene(rng, *size_hw, concept, distractors)
    return [r[0] for r in refs], [r[1] for r in refs], target, target_mask


def segment_episode(model: torch.nn.Module, refs: list, masks: list, target: object) -> np.ndarray:
    """The (H, W) bool mask ``model`` (an ``INSID3``) gives ``target`` through the published
    stateful calls: ``set_reference`` per shot, ``set_target``, ``segment``."""
    for image, mask in zip(refs, masks):
        model.set_reference(image, mask)
    model.set_target(target)
    return model.segment().cpu().numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)
