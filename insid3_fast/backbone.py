"""DINOv3 ViT backbones through timm: checkpoint formats, size inference, RoPE periods.

`load_dinov3` reads Meta's released ``.pth`` files or Hugging Face ``facebook/dinov3-*``
folders / ``.safetensors`` files, builds the matching timm model and returns it behind Meta's
``get_intermediate_layers`` interface. Features equal Meta's reference code bit for bit because
the RoPE periods are pinned to the bf16-rounded values Meta's checkpoints carry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError, WeightsError

__all__ = [
    "MODEL_SIZES",
    "META_CHECKPOINT_NAMES",
    "PATCH_SIZE",
    "DinoV3Backbone",
    "build_dinov3",
    "dinov3_rope_periods",
    "hf_to_meta_state_dict",
    "infer_model_size",
    "load_dinov3",
    "weights_fingerprint",
]

PATCH_SIZE = 16

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

_ROPE_BASE = 100.0
_MIB = 1 << 20
# Keys of Meta's files that play no part in inference (pretraining-only or recomputed).
_IGNORED_META_SUFFIXES = (".bias_mask", "rope_embed.periods")
_IGNORED_META_KEYS = ("mask_token",)
_IGNORED_META_PREFIXES = ("local_cls_norm.", "cls_norm.", "projectors.", "head.", "dino_head.")


# --------------------------------------------------------------------------- errors


def _missing_file_error(path: Path) -> WeightsError:
    return WeightsError(
        f"DINOv3 weights not found at '{path}'. The weights come from Meta's DINOv3 release "
        "(https://github.com/facebookresearch/dinov3): request access there, download the "
        f"checkpoint (e.g. {META_CHECKPOINT_NAMES['large']}), and put the .pth in pretrain/ "
        "or pass --weights PATH. A Hugging Face facebook/dinov3-* folder (config.json + "
        "model.safetensors) works too."
    )


def _corrupt_file_error(path: Path, exc: BaseException) -> WeightsError:
    detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:200]
    return WeightsError(
        f"Could not read the DINOv3 checkpoint '{path}': the file looks truncated or corrupt "
        f"({type(exc).__name__}{': ' + detail if detail else ''}). Re-download it from Meta's DINOv3 "
        "release (https://github.com/facebookresearch/dinov3) or Hugging Face."
    )


def _refused_pickle_error(path: Path, name: str) -> WeightsError:
    return WeightsError(
        f"Refused the checkpoint '{path}': it holds executable pickle content (it would call {name} "
        "when loaded), and the safe loader (torch.load with weights_only=True) runs no such content. "
        "Use a plain tensor checkpoint: Meta's released .pth or a Hugging Face .safetensors file."
    )


def _malformed_error(what: str) -> WeightsError:
    return WeightsError(f"Malformed DINOv3 checkpoint: {what}. Re-download Meta's DINOv3 weights.")


def _unknown_architecture_error(what: str) -> WeightsError:
    sizes = ", ".join(MODEL_SIZES)
    return WeightsError(
        f"Unknown DINOv3 architecture: {what}. Supported: DINOv3 ViT/16 sizes {sizes} "
        "(Meta .pth files or Hugging Face facebook/dinov3-* checkpoints)."
    )


def _few(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# --------------------------------------------------------------------------- RoPE periods


def dinov3_rope_periods(head_dim: int, base: float = _ROPE_BASE) -> Tensor:
    """RoPE periods as stored in Meta's DINOv3 checkpoints: ``base ** (2 i / (D/2))`` for
    i < D/4, rounded to bfloat16 and returned as float32 (shape ``(head_dim // 4,)``)."""
    exponents = 2.0 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return (base**exponents).to(torch.bfloat16).to(torch.float32)


@functools.cache
def _pinned_rope_class() -> type:
    # Built lazily: importing timm costs seconds, and only loading a model needs it.
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    class _PinnedPeriodsRope(RotaryEmbeddingDinoV3):
        """timm's DINOv3 RoPE whose periods are fixed values instead of recomputed ones."""

        _pinned_periods: Tensor

        def _compute_periods(
            self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
        ) -> Tensor:
            # timm rebuilds periods in float32 from the formula on init and after a downcast;
            # Meta's checkpoints carry bf16-rounded ones, which are what Meta's code uses.
            return self._pinned_periods.to(device=device, dtype=dtype)

    _PinnedPeriodsRope.__qualname__ = _PinnedPeriodsRope.__name__
    return _PinnedPeriodsRope


def __getattr__(name: str) -> Any:
    # Lets pickle find the lazily built RoPE class of a pickled model.
    if name == "_PinnedPeriodsRope":
        return _pinned_rope_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pin_rope_periods(model: nn.Module, periods: Tensor) -> None:
    """Make ``model.rope`` use ``periods`` now and after any later dtype/device cast."""
    rope = model.rope
    rope.__class__ = _pinned_rope_class()
    rope._pinned_periods = periods.detach().to(device="cpu", dtype=torch.float32).clone()
    with torch.no_grad():
        rope._init_buffers()


# --------------------------------------------------------------------------- reading files


def _unwrap(state: Mapping[str, Any]) -> dict[str, Tensor]:
    for key in ("model", "state_dict", "teacher", "module"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if "backbone.cls_token" in tensors:  # a training checkpoint: backbone next to heads
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    for prefix in ("module.", "model.", "dinov3_vit.", "dinov3."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise _corrupt_file_error(path, exc) from exc


def _load_pth(path: Path) -> dict[str, Tensor]:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A pickle that imports something the safe loader does not allow; other refusals
        # ("Unsupported operand") are garbage bytes.
        found = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise _refused_pickle_error(path, found.group(1) or found.group(2)) from None
        raise _corrupt_file_error(path, exc) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a text file gives KeyError, a cut zip RuntimeError, ...
        raise _corrupt_file_error(path, exc) from None
    if not isinstance(state, Mapping):
        raise _unknown_architecture_error(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return _unwrap(state)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read_hf_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise _corrupt_file_error(config_path, exc) from None
    if not isinstance(config, dict):
        raise _corrupt_file_error(config_path, TypeError(f"a JSON {type(config).__name__}, not an object"))
    if "num_attention_heads" in config and not _positive_int(config["num_attention_heads"]):
        raise _corrupt_file_error(config_path, ValueError(
            f"num_attention_heads is {config['num_attention_heads']!r}, not a positive integer"))
    if "rope_theta" in config and not _positive_real(config["rope_theta"]):
        raise _corrupt_file_error(config_path, ValueError(
            f"rope_theta is {config['rope_theta']!r}, not a positive finite number"))
    return config


def _shard_path(folder: Path, index: Path, name: Any) -> Path:
    """A shard named in the index, refused unless it is a file name inside ``folder``."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise WeightsError(f"'{index}' names the shard {name!r}, not a file in its folder: re-download the index")
    path = folder / name
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        raise WeightsError(f"'{index}' names the shard '{name}', which lies outside '{folder}': refused "
                           "(a Hugging Face index only lists files of its own folder)") from None
    return path


def _load_hf_folder(folder: Path) -> dict[str, Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return _load_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()), key=str)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise _corrupt_file_error(index, exc) from None
        shards = [_shard_path(folder, index, name) for name in names]
        state: dict[str, Tensor] = {}
        for shard in shards:
            if not shard.is_file():
                raise _missing_file_error(shard)
            state.update(_load_safetensors(shard))
        return state
    raise WeightsError(
        f"'{folder}' is a folder without model.safetensors: pass a Hugging Face facebook/dinov3-* "
        "folder (config.json + model.safetensors) or a Meta .pth file."
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The raw tensors of a checkpoint and its Hugging Face config (empty for Meta files)."""
    if not path.exists():
        raise _missing_file_error(path)
    if path.is_dir():
        return _unwrap(_load_hf_folder(path)), _read_hf_config(path)
    if path.suffix == ".safetensors":
        return _unwrap(_load_safetensors(path)), _read_hf_config(path.parent)
    return _load_pth(path), {}


# --------------------------------------------------------------------------- HF -> Meta keys


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


def _block_indices(state: Mapping[str, Tensor]) -> set[int]:
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
            raise _malformed_error(f"block {idx}: the q/k/v {kind} shapes differ or are scalars ({shapes})")
        fused[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return fused


def _hf_periods(meta_state: Mapping[str, Tensor], config: Mapping[str, Any]) -> Tensor:
    cls = meta_state.get("cls_token")
    embed_dim = int(cls.shape[-1]) if isinstance(cls, Tensor) and cls.ndim else 0
    heads = config.get("num_attention_heads")  # validated by _read_hf_config when read from a file
    if heads is not None and not _positive_int(heads):
        raise _malformed_error(f"num_attention_heads is {heads!r}, not a positive integer")
    theta = config.get("rope_theta", _ROPE_BASE)
    if not _positive_real(theta):
        raise _malformed_error(f"rope_theta is {theta!r}, not a positive finite number")
    if heads is None:
        head_dim = _default_head_dim(embed_dim)
    elif embed_dim % heads or (embed_dim // heads) % 4:
        raise _malformed_error(f"num_attention_heads {heads} does not split the width {embed_dim} into heads "
                               "of a multiple of 4 channels")
    else:
        head_dim = embed_dim // heads
    return dinov3_rope_periods(head_dim, float(theta))


def _default_head_dim(embed_dim: int) -> int:
    for family in _FAMILIES.values():
        if family.embed_dim == embed_dim:
            return embed_dim // family.num_heads
    return 64


def _to_meta_layout(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    if _is_hf_layout(state):
        return hf_to_meta_state_dict(state, config)
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return dict(state)
    raise _unknown_architecture_error(
        f"keys look like neither Meta's DINOv3 layout nor Hugging Face's (first keys: {_few(list(state), 4)})"
    )


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True, eq=False)
class _Arch:
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


def _family_of(embed_dim: int, swiglu: bool) -> str | None:
    for name, family in _FAMILIES.items():
        if family.embed_dim == embed_dim and family.swiglu == swiglu:
            return name
    return None


def _check_periods(periods: Any, embed_dim: int) -> Tensor:
    if not isinstance(periods, Tensor) or periods.ndim != 1 or not periods.is_floating_point():
        raise _malformed_error(f"rope_embed.periods must be a 1-d float tensor, got "
                               f"{tuple(periods.shape) if isinstance(periods, Tensor) else type(periods).__name__}")
    head_dim = 4 * periods.numel()
    if head_dim == 0 or embed_dim % head_dim:
        raise _unknown_architecture_error(f"RoPE periods of length {periods.numel()} for embed dim {embed_dim}")
    periods = periods.detach().float()
    if not periods.is_meta and (not bool(torch.isfinite(periods).all()) or not bool((periods > 0).all())):
        raise _malformed_error("the RoPE periods are not all positive and finite (e.g. rope_theta 0 in "
                               "config.json); they would make every feature NaN")
    return periods


def _infer_arch(state: Mapping[str, Tensor], requested: str | None = None) -> _Arch:
    """The architecture a Meta-layout state dict describes, checked only as far as it is read;
    `_check_tensors` then checks every tensor against it."""
    cls = _shape(state, "cls_token")
    if not cls or cls[-1] < 1 or math.prod(cls) != cls[-1]:
        raise _malformed_error(f"cls_token has shape {cls}, expected (1, 1, C)")
    embed_dim = cls[-1]
    patch = _shape(state, "patch_embed.proj.weight")
    if len(patch) != 4 or patch[-2:] != (PATCH_SIZE, PATCH_SIZE):
        raise _unknown_architecture_error(
            f"patch embedding of shape {patch} (only 16x16 patches, shape (C, 3, 16, 16), are supported)")
    blocks = sorted(_block_indices(state))
    if not blocks:
        raise _unknown_architecture_error("no transformer blocks ('blocks.N.*') in the checkpoint")
    if blocks != list(range(len(blocks))):
        gaps = [i for i in blocks if i >= len(blocks)]
        raise _malformed_error(f"the block indices are not 0..{len(blocks) - 1} (found blocks.{gaps[0]}.*)")
    swiglu = "blocks.0.mlp.w1.weight" in state
    mlp_in = _shape(state, "blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight")
    if len(mlp_in) != 2 or mlp_in[0] < 1:
        raise _malformed_error(f"the first MLP weight has shape {mlp_in}, expected (hidden, {embed_dim})")
    model_size = _resolve_size(embed_dim, swiglu, requested)
    periods = state.get("rope_embed.periods")
    if periods is None:
        periods = dinov3_rope_periods(_default_head_dim(embed_dim))
    periods = _check_periods(periods, embed_dim)
    storage = _shape(state, "storage_tokens") if "storage_tokens" in state else (1, 0, embed_dim)
    if len(storage) != 3 or storage[0] != 1 or storage[2] != embed_dim:
        raise _malformed_error(f"storage_tokens has shape {storage}, expected (1, n, {embed_dim})")
    return _Arch(
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


def _expected_shapes(arch: _Arch) -> dict[str, tuple[int, ...]]:
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


def _check_tensors(state: Mapping[str, Tensor], arch: _Arch) -> None:
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
            raise _malformed_error(f"tensor '{key}' has dtype {tensor.dtype}, not a float type")
        if key.endswith(".qkv.bias_mask") and (tensor.is_complex() or tuple(tensor.shape) != (3 * arch.embed_dim,)):
            raise _malformed_error(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected ({3 * arch.embed_dim},)")
        if tensor.numel() and tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
            raise _malformed_error(f"tensor '{key}' of shape {tuple(tensor.shape)} is a view of only "
                                   f"{tensor.untyped_storage().nbytes()} bytes (repeated values); refused")


def _resolve_size(embed_dim: int, swiglu: bool, requested: str | None) -> str:
    mlp = "SwiGLU" if swiglu else "GELU MLP"
    if requested is not None and requested not in MODEL_SIZES:
        raise _unknown_architecture_error(f"model_size '{requested}'")
    found = _family_of(embed_dim, swiglu)
    if found is None and any(f.embed_dim == embed_dim for f in _FAMILIES.values()):
        raise _unknown_architecture_error(f"embed dim {embed_dim} with a {mlp} (e.g. ViT-L+ is not supported)")
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
    return _infer_arch(_to_meta_layout(_unwrap(state_dict))).model_size


# --------------------------------------------------------------------------- building


def build_dinov3(model_size: str, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised timm DINOv3 model of ``model_size`` (a key of MODEL_SIZES), with
    no classifier head unless ``num_classes`` is given; ``timm_kwargs`` (depth, embed_dim,
    num_heads, ...) override the size's defaults."""
    import timm

    if model_size not in MODEL_SIZES:
        raise _unknown_architecture_error(f"model_size '{model_size}'")
    timm_kwargs.setdefault("num_classes", 0)
    return timm.create_model(MODEL_SIZES[model_size], pretrained=False, **timm_kwargs)


class DinoV3Backbone(nn.Module):
    """A timm DINOv3 ViT behind Meta's ``get_intermediate_layers`` interface."""

    def __init__(self, model: nn.Module, model_size: str) -> None:
        super().__init__()
        self.model = model
        self.model_size = model_size
        self.patch_size = PATCH_SIZE
        self.embed_dim = int(model.embed_dim)
        self.n_blocks = len(model.blocks)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        self.n_storage_tokens = int(model.num_prefix_tokens) - 1

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = True,
        norm: bool = True,
    ) -> tuple[Tensor, ...]:
        """Patch tokens of the last ``n`` blocks (or of the blocks listed in ``n``), after the
        final LayerNorm when ``norm``, CLS and storage tokens dropped: (B, C, h, w) tensors when
        ``reshape`` else (B, h*w, C). ``x`` is (B, 3, H, W), H and W multiples of 16."""
        if x.ndim != 4:
            raise InputError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise InputError(
                f"image size {height}x{width} is not a multiple of {self.patch_size}: the image "
                f"size must be a multiple of {self.patch_size} (DINOv3 patch size)."
            )
        param = self.model.patch_embed.proj.weight
        indices = n if isinstance(n, int) else list(n)
        outputs = self.model.forward_intermediates(
            x.to(device=param.device, dtype=param.dtype),
            indices=indices,
            norm=norm,
            stop_early=True,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
        )
        return tuple(outputs)

    def forward(self, x: Tensor) -> Tensor:
        """The last block's normalised patch features, (B, C, H/16, W/16)."""
        return self.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


def _is_ignored(key: str) -> bool:
    return (
        key in _IGNORED_META_KEYS
        or key.endswith(_IGNORED_META_SUFFIXES)
        or key.startswith(_IGNORED_META_PREFIXES)
    )


def _check_keys(state: Mapping[str, Tensor], arch: _Arch) -> None:
    present = {k for k in state if not _is_ignored(k)}
    expected = set(_expected_shapes(arch))
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = [f"missing keys: {_few(missing)}"] if missing else []
        parts += [f"unexpected keys: {_few(unexpected)}"] if unexpected else []
        raise WeightsError(
            f"The checkpoint does not match a DINOv3 '{arch.model_size}' model ({'; '.join(parts)}). "
            "It may be incomplete or from another model: re-download Meta's DINOv3 weights."
        )


def _effective_k_biases(state: Mapping[str, Tensor]) -> dict[int, Tensor]:
    """Per block, the key bias Meta's attention really adds: ``qkv.bias * bias_mask``."""
    biases = {}
    for key, bias in state.items():
        if key.startswith("blocks.") and key.endswith(".attn.qkv.bias"):
            mask = state.get(key + "_mask")
            effective = bias if mask is None else bias * mask.to(bias.dtype)
            biases[int(key.split(".")[1])] = effective.chunk(3)[1]
    return biases


def _load_into(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    from timm.models.eva import checkpoint_filter_fn

    kept = {k: v for k, v in state.items() if not _is_ignored(k)}
    try:
        filtered = checkpoint_filter_fn(kept, model)
        result = model.load_state_dict(filtered, strict=False)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise WeightsError(
            f"The checkpoint's tensor shapes do not match the DINOv3 model ({_few(lines, 3) or exc}). "
            "Check model_size or re-download the weights."
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            "The checkpoint does not fit the timm DINOv3 model (missing: "
            f"{_few(result.missing_keys) or 'none'}; unexpected: {_few(result.unexpected_keys) or 'none'})."
        )
    # timm drops the key bias (zero in Meta's releases, which mask it); keep it when it is not,
    # since RoPE rotates it and it then changes the attention.
    with torch.no_grad():
        for idx, k_bias in _effective_k_biases(state).items():
            model.blocks[idx].attn.k_bias.copy_(k_bias)


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
    state, config = _read_checkpoint(Path(weights).expanduser())
    state = _to_meta_layout(state, config)
    arch = _infer_arch(state, model_size)
    _check_keys(state, arch)
    _check_tensors(state, arch)  # before building: a malformed file never costs an allocation
    model = build_dinov3(arch.model_size, **arch.timm_kwargs())
    _load_into(model, state)
    _pin_rope_periods(model, arch.periods)
    backbone = DinoV3Backbone(model, arch.model_size)
    backbone.eval().requires_grad_(False)
    # Keys the positional-basis disk cache of INSID3 built on this encoder (weights and dtype).
    backbone.weights_fingerprint = f"{weights_fingerprint(weights)}|{dtype}"
    if device is not None or dtype is not None:
        backbone.to(device=device, dtype=dtype)
    return backbone


# --------------------------------------------------------------------------- fingerprint


def _file_digest(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(_MIB))
        if stat.st_size > _MIB:
            fh.seek(max(stat.st_size - _MIB, _MIB))
            digest.update(fh.read(_MIB))
    return digest.hexdigest()


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap, stable cache key for a weights file or Hugging Face folder: sha256 over the
    size, mtime and first and last MiB of each weight file (hex, 32 characters)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise _missing_file_error(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".pth"))
    else:
        files = [path]
    combined = hashlib.sha256("".join(_file_digest(p) for p in files).encode())
    return combined.hexdigest()[:32]
