"""The architecture a Meta-layout state dict describes, and every check of its keys and tensors.

`infer_arch` reads the width, depth, MLP type, heads (from the RoPE periods) and storage tokens
from the tensors, `check_keys` and `check_tensors` then hold every tensor to it, so a malformed
file is refused before a model is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import WeightsError
from ..inputs import PATCH_SIZE
from .formats import unwrap_state_dict
from .keys import block_indices, is_ignored, to_meta_layout
from .messages import few, malformed_error, unknown_architecture_error
from .sizes import _FAMILIES, MODEL_SIZES, default_head_dim, dinov3_rope_periods, family_of

__all__ = ["Arch", "check_keys", "check_tensors", "infer_arch", "infer_model_size"]


@dataclass(frozen=True, eq=False)
class Arch:
    """A DINOv3 ViT/16 as its checkpoint describes it; ``periods`` are the RoPE periods to pin."""

    model_size: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    swiglu: bool
    qkv_bias: bool
    num_storage_tokens: int
    periods: Tensor

    def timm_kwargs(self) -> dict[str, Any]:
        """The timm kwargs that turn the size's default model into this one."""
        family = _FAMILIES[self.model_size]
        kwargs: dict[str, Any] = {}
        if self.embed_dim != family.embed_dim:
            kwargs["embed_dim"] = self.embed_dim
        if self.num_heads != family.num_heads:
            kwargs["num_heads"] = self.num_heads
        kwargs["depth"] = self.depth
        kwargs["mlp_ratio"] = self.mlp_hidden / self.embed_dim
        kwargs["qkv_bias"] = self.qkv_bias
        kwargs["num_reg_tokens"] = self.num_storage_tokens
        return kwargs


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"DINOv3 checkpoint is missing the key '{key}': re-download the file.")
    return tuple(state[key].shape)


def _check_periods(periods: Any, embed_dim: int) -> Tensor:
    if not isinstance(periods, Tensor) or periods.ndim != 1 or not periods.is_floating_point():
        raise malformed_error(f"rope_embed.periods must be a 1-d float tensor, got "
                              f"{tuple(periods.shape) if isinstance(periods, Tensor) else type(periods).__name__}")
    head_dim = 4 * periods.numel()
    if head_dim == 0 or embed_dim % head_dim:
        raise unknown_architecture_error(f"RoPE periods of length {periods.numel()} for embed dim {embed_dim}")
    periods = periods.detach().float()
    if not periods.is_meta and (not bool(torch.isfinite(periods).all()) or not bool((periods > 0).all())):
        raise malformed_error("the RoPE periods are not all positive and finite (e.g. rope_theta 0 in "
                              "config.json); they would make every feature NaN")
    return periods


def infer_arch(state: Mapping[str, Tensor], requested: str | None = None) -> Arch:
    """The architecture a Meta-layout state dict describes, checked only as far as it is read;
    `check_tensors` then checks every tensor against it."""
    cls = _shape(state, "cls_token")
    if not cls or cls[-1] < 1 or math.prod(cls) != cls[-1]:
        raise malformed_error(f"cls_token has shape {cls}, expected (1, 1, C)")
    embed_dim = cls[-1]
    patch = _shape(state, "patch_embed.proj.weight")
    if len(patch) != 4 or patch[-2:] != (PATCH_SIZE, PATCH_SIZE):
        raise unknown_architecture_error(
            f"patch embedding of shape {patch} (only 16x16 patches, shape (C, 3, 16, 16), are supported)")
    blocks = sorted(block_indices(state))
    if not blocks:
        raise unknown_architecture_error("no transformer blocks ('blocks.N.*') in the checkpoint")
    if blocks != list(range(len(blocks))):
        gaps = [i for i in blocks if i >= len(blocks)]
        raise malformed_error(f"the block indices are not 0..{len(blocks) - 1} (found blocks.{gaps[0]}.*)")
    swiglu = "blocks.0.mlp.w1.weight" in state
    mlp_in = _shape(state, "blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight")
    if len(mlp_in) != 2 or mlp_in[0] < 1:
        raise malformed_error(f"the first MLP weight has shape {mlp_in}, expected (hidden, {embed_dim})")
    model_size = _resolve_size(embed_dim, swiglu, requested)
    periods = state.get("rope_embed.periods")
    if periods is None:
        periods = dinov3_rope_periods(default_head_dim(embed_dim))
    periods = _check_periods(periods, embed_dim)
    storage = _shape(state, "storage_tokens") if "storage_tokens" in state else (1, 0, embed_dim)
    if len(storage) != 3 or storage[0] != 1 or storage[2] != embed_dim:
        raise malformed_error(f"storage_tokens has shape {storage}, expected (1, n, {embed_dim})")
    return Arch(
        model_size=model_size,
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=embed_dim // (4 * periods.numel()),
        mlp_hidden=mlp_in[0],
        swiglu=swiglu,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        num_storage_tokens=storage[1],
        periods=periods,
    )


def _expected_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a checkpoint of ``arch`` holds (Meta layout)."""
    C, H = arch.embed_dim, arch.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, C), "patch_embed.proj.weight": (C, 3, PATCH_SIZE, PATCH_SIZE),
        "patch_embed.proj.bias": (C,), "norm.weight": (C,), "norm.bias": (C,),
    }
    if arch.num_storage_tokens:
        shapes["storage_tokens"] = (1, arch.num_storage_tokens, C)
    mlp = {"w1": (H, C), "w2": (H, C), "w3": (C, H)} if arch.swiglu else {"fc1": (H, C), "fc2": (C, H)}
    for i in range(arch.depth):
        block = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C),
                 "attn.proj.weight": (C, C), "attn.proj.bias": (C,), "ls1.gamma": (C,),
                 "norm2.weight": (C,), "norm2.bias": (C,), "ls2.gamma": (C,)}
        for name, shape in mlp.items():
            block[f"mlp.{name}.weight"] = shape
            block[f"mlp.{name}.bias"] = (shape[0],)
        if arch.qkv_bias:
            block["attn.qkv.bias"] = (3 * C,)
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def check_tensors(state: Mapping[str, Tensor], arch: Arch) -> None:
    """Every tensor the model will read has its expected shape, a float dtype and the memory
    its shape claims (a stride-0 view of a tiny storage would make the model allocate gigabytes
    for a small file); run before anything is built."""
    expected = _expected_shapes(arch)
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise WeightsError(
                f"The checkpoint's tensor shapes do not match the DINOv3 model: '{key}' has shape "
                f"{tuple(tensor.shape)}, but the architecture its "
                f"other tensors describe (width {arch.embed_dim}, {arch.depth} blocks, MLP {arch.mlp_hidden}) "
                f"needs {shape}. The file is corrupt or of another model: re-download it."
            )
    for key, tensor in state.items():
        if key in expected and not tensor.is_floating_point():
            raise malformed_error(f"tensor '{key}' has dtype {tensor.dtype}, not a float type")
        if key.endswith(".qkv.bias_mask") and (tensor.is_complex() or tuple(tensor.shape) != (3 * arch.embed_dim,)):
            raise malformed_error(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected ({3 * arch.embed_dim},)")
        if tensor.numel() and tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
            raise malformed_error(f"tensor '{key}' of shape {tuple(tensor.shape)} is a view of only "
                                  f"{tensor.untyped_storage().nbytes()} bytes (repeated values); refused")
        # NaN weights ran into the positional basis's SVD ("failed to converge"): named here.
        if tensor.is_floating_point() and tensor.numel() and not tensor.is_meta \
                and not bool(torch.isfinite(tensor).all()):
            raise malformed_error(f"tensor '{key}' holds NaN or infinite values")


def _resolve_size(embed_dim: int, swiglu: bool, requested: str | None) -> str:
    mlp = "SwiGLU" if swiglu else "GELU MLP"
    if requested is not None and requested not in MODEL_SIZES:
        raise unknown_architecture_error(f"model_size '{requested}'")
    found = family_of(embed_dim, swiglu)
    if found is None and any(f.embed_dim == embed_dim for f in _FAMILIES.values()):
        raise unknown_architecture_error(f"embed dim {embed_dim} with a {mlp} (e.g. ViT-L+ is not supported)")
    if found is None:
        # A non-standard width (a reduced test model): the family with the same MLP type.
        found = requested if requested and _FAMILIES[requested].swiglu == swiglu else None
        found = found or ("small_plus" if swiglu else "small")
    if requested is not None and requested != found:
        raise WeightsError(
            f"model_size='{requested}' does not match the checkpoint, which holds a DINOv3 "
            f"'{found}' (embed dim {embed_dim}, {mlp}). Pass model_size='{found}' or leave it out."
        )
    return found


def infer_model_size(state_dict: Mapping[str, Tensor]) -> str:
    """The DINOv3 size (a key of MODEL_SIZES) of a Meta- or Hugging-Face-layout state dict,
    from its embed dim and MLP type. Reduced widths map to the family with the same MLP."""
    return infer_arch(to_meta_layout(unwrap_state_dict(state_dict))).model_size


def check_keys(state: Mapping[str, Tensor], arch: Arch) -> None:
    """``state`` holds exactly the keys a model of ``arch`` reads (besides ignored ones), else a
    WeightsError listing the first missing and unexpected ones."""
    present = {k for k in state if not is_ignored(k)}
    expected = set(_expected_shapes(arch))
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = [f"missing keys: {few(missing)}"] if missing else []
        parts += [f"unexpected keys: {few(unexpected)}"] if unexpected else []
        raise WeightsError(
            f"The checkpoint does not match a DINOv3 '{arch.model_size}' model ({'; '.join(parts)}). "
            "It may be incomplete or from another model: re-download Meta's DINOv3 weights."
        )
