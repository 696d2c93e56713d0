"""The released DINOv3 ViT/16 sizes: the timm model of each, Meta's file names, widths, RoPE periods.

The lowest layer of `insid3_fast.backbone`: plain tables and one formula, no file or model logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MODEL_SIZES", "META_CHECKPOINT_NAMES", "ROPE_BASE", "default_head_dim", "dinov3_rope_periods", "family_of"]

#: Supported sizes and the timm model each one is built on. The ``_qkvb`` variants keep the q/v
#: biases that the plain timm names drop (a 5e-2..1.7e-1 difference on features); the 7B model
#: has no qkv bias, so its plain name is the faithful one.
MODEL_SIZES: dict[str, str] = {
    "small": "vit_small_patch16_dinov3_qkvb",
    "small_plus": "vit_small_plus_patch16_dinov3_qkvb",
    "base": "vit_base_patch16_dinov3_qkvb",
    "large": "vit_large_patch16_dinov3_qkvb",
    "huge_plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "7b": "vit_7b_patch16_dinov3",
}

#: File names of Meta's released LVD-1689M checkpoints, per size.
META_CHECKPOINT_NAMES: dict[str, str] = {
    "small": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "small_plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "base": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "large": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "huge_plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
    "7b": "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth",
}

#: The RoPE base of every released size (``rope_theta`` of the Hugging Face configs).
ROPE_BASE = 100.0


@dataclass(frozen=True)
class _Family:
    embed_dim: int
    num_heads: int
    swiglu: bool


_FAMILIES: dict[str, _Family] = {
    "small": _Family(384, 6, False),
    "small_plus": _Family(384, 6, True),
    "base": _Family(768, 12, False),
    "large": _Family(1024, 16, False),
    "huge_plus": _Family(1280, 20, True),
    "7b": _Family(4096, 32, True),
}


def family_of(embed_dim: int, swiglu: bool) -> str | None:
    """The released size of width ``embed_dim`` and MLP type ``swiglu``, or None."""
    for name, family in _FAMILIES.items():
        if family.embed_dim == embed_dim and family.swiglu == swiglu:
            return name
    return None


def default_head_dim(embed_dim: int) -> int:
    """The head width of the released size of width ``embed_dim`` (64 for other widths), for
    files that do not say how many heads they have."""
    for family in _FAMILIES.values():
        if family.embed_dim == embed_dim:
            return embed_dim // family.num_heads
    return 64


def dinov3_rope_periods(head_dim: int, base: float = ROPE_BASE) -> Tensor:
    """RoPE periods as stored in Meta's DINOv3 checkpoints: ``base ** (2 i / (D/2))`` for
    i < D/4, rounded to bfloat16 and returned as float32 (shape ``(head_dim // 4,)``)."""
    exponents = 2.0 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return (base**exponents).to(torch.bfloat16).to(torch.float32)
