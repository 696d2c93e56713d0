"""Key names: Hugging Face's DINOv3 layout renamed to Meta's, and the Meta keys inference ignores.

Everything after reading works on Meta's layout (``cls_token``, ``blocks.N.*``, fused
``attn.qkv``), the layout of the released ``.pth`` files.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import WeightsError
from .formats import positive_int, positive_real
from .messages import few, malformed_error, unknown_architecture_error
from .sizes import ROPE_BASE, default_head_dim, dinov3_rope_periods

__all__ = ["block_indices", "hf_to_meta_state_dict", "is_ignored", "to_meta_layout"]

# Keys of Meta's files that play no part in inference (pretraining-only or recomputed).
_IGNORED_META_SUFFIXES = (".bias_mask", "rope_embed.periods")
_IGNORED_META_KEYS = ("mask_token",)
_IGNORED_META_PREFIXES = ("local_cls_norm.", "cls_norm.", "projectors.", "head.", "dino_head.")


def is_ignored(key: str) -> bool:
    """True for a Meta key that plays no part in inference (pretraining heads, masks, periods)."""
    return (
        key in _IGNORED_META_KEYS
        or key.endswith(_IGNORED_META_SUFFIXES)
        or key.startswith(_IGNORED_META_PREFIXES)
    )


def _is_hf_layout(state: Mapping[str, Tensor]) -> bool:
    return "embeddings.cls_token" in state


_HF_BLOCK_RENAMES = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


_INDEX_RE = re.compile(r"[0-9]+")


def block_indices(state: Mapping[str, Tensor]) -> set[int]:
    """The N of every ``blocks.N.*`` key."""
    return {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and _INDEX_RE.fullmatch(k.split(".")[1])}


def _hf_block_to_meta(rest: str) -> str | None:
    for old, new in _HF_BLOCK_RENAMES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def hf_to_meta_state_dict(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Rename a Hugging Face DINOv3 state dict (``embeddings.*``, ``layer.N.*``) to Meta's
    layout (``cls_token``, ``blocks.N.*``, fused ``attn.qkv``), adding the RoPE periods.

    Keys it does not know are kept unchanged, so the key check reports them."""
    config = dict(config or {})
    out: dict[str, Tensor] = {}
    gated = any(".mlp.gate_proj." in k for k in state)
    qkv_parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "storage_tokens",
        "embeddings.mask_token": "mask_token",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "embeddings.patch_embeddings.proj.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.proj.bias": "patch_embed.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    mlp_names = (
        {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        if gated
        else {"up_proj": "fc1", "down_proj": "fc2"}
    )
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "layer" or not _INDEX_RE.fullmatch(parts[1]):
            out[key] = value
            continue
        idx, rest = int(parts[1]), ".".join(parts[2:])
        if rest.startswith("attention.") and parts[3] in ("q_proj", "k_proj", "v_proj"):
            qkv_parts.setdefault((idx, parts[-1]), {})[parts[3][0]] = value
            continue
        if rest.startswith("mlp.") and parts[3] in mlp_names:
            out[f"blocks.{idx}.mlp.{mlp_names[parts[3]]}.{parts[-1]}"] = value
            continue
        renamed = _hf_block_to_meta(rest)
        out[f"blocks.{idx}.{renamed}" if renamed else key] = value
    out.update(_fuse_qkv(qkv_parts))
    out["rope_embed.periods"] = _hf_periods(out, config)
    return out


def _fuse_qkv(parts: Mapping[tuple[int, str], Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Meta's fused ``attn.qkv`` weight/bias of each block from HF's separate q/k/v projections."""
    fused: dict[str, Tensor] = {}
    for (idx, kind), qkv in parts.items():
        if kind == "bias" and "q" in qkv and "v" in qkv and "k" not in qkv:
            # Meta masks the key bias to zero (mask_k_bias); HF simply omits it.
            qkv = {**qkv, "k": torch.zeros_like(qkv["q"])}
        if set(qkv) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(qkv))
            raise WeightsError(
                f"Hugging Face checkpoint block {idx} lacks attention {kind} for {missing}: "
                "the file is incomplete; re-download it."
            )
        shapes = {name: tuple(t.shape) for name, t in qkv.items()}
        if len(set(shapes.values())) != 1 or not shapes["q"]:
            raise malformed_error(f"block {idx}: the q/k/v {kind} shapes differ or are scalars ({shapes})")
        fused[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return fused


def _hf_periods(meta_state: Mapping[str, Tensor], config: Mapping[str, Any]) -> Tensor:
    """The RoPE periods a Hugging Face checkpoint implies (HF files store none): from the
    config's head count and ``rope_theta``, else the released size's head width."""
    cls = meta_state.get("cls_token")
    embed_dim = int(cls.shape[-1]) if isinstance(cls, Tensor) and cls.ndim else 0
    heads = config.get("num_attention_heads")  # validated by formats.read_checkpoint when read from a file
    if heads is not None and not positive_int(heads):
        raise malformed_error(f"num_attention_heads is {heads!r}, not a positive integer")
    theta = config.get("rope_theta", ROPE_BASE)
    if not positive_real(theta):
        raise malformed_error(f"rope_theta is {theta!r}, not a positive finite number")
    if heads is None:
        head_dim = default_head_dim(embed_dim)
    elif embed_dim % heads or (embed_dim // heads) % 4:
        raise malformed_error(f"num_attention_heads {heads} does not split the width {embed_dim} into heads "
                              "of a multiple of 4 channels")
    else:
        head_dim = embed_dim // heads
    return dinov3_rope_periods(head_dim, float(theta))


def to_meta_layout(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """``state`` in Meta's layout: renamed from Hugging Face's (``config`` gives its heads and
    RoPE base), copied when already Meta's, else a WeightsError naming the first keys."""
    if _is_hf_layout(state):
        return hf_to_meta_state_dict(state, config)
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return dict(state)
    raise unknown_architecture_error(
        f"keys look like neither Meta's DINOv3 layout nor Hugging Face's (first keys: {few(list(state), 4)})"
    )
