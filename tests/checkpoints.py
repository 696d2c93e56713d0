"""Tiny DINOv3 checkpoints for tests, written in Meta's and Hugging Face's layouts.

The models are timm DINOv3 models with random weights (layer scales and biases made
non-trivial so that every block matters), converted to the file layouts `load_dinov3` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from insid3_fast.backbone import build_dinov3, dinov3_rope_periods

#: timm kwargs of the tiny model `write_meta_checkpoint` writes when given none.
TINY_KWARGS: dict[str, Any] = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def random_timm_model(model_size: str = "small", seed: int = 0, **timm_kwargs: Any) -> nn.Module:
    """A timm DINOv3 model (eval mode) with random weights whose layer scales, biases, norms
    and tokens are all non-trivial."""
    torch.manual_seed(seed)
    model = build_dinov3(model_size, **timm_kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                param.copy_(torch.rand(param.shape, generator=gen) * 0.5 + 0.1)
            elif name.endswith(("bias", "q_bias", "v_bias")) or "token" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + torch.randn(param.shape, generator=gen) * 0.1)
    return model


def _head_dim(model: nn.Module) -> int:
    # From width and heads, not attn.head_dim, which older timm releases inside the bound lack.
    return int(model.embed_dim) // int(model.blocks[0].attn.num_heads)


def timm_to_meta_state_dict(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """The state dict of a timm DINOv3 model in the layout of Meta's released ``.pth`` files
    (``storage_tokens``, fused ``attn.qkv`` with ``bias_mask``, ``ls1.gamma``, ``mlp.w1/w2/w3``,
    bf16-rounded ``rope_embed.periods``). The key bias gets random values, which Meta masks."""
    gen = torch.Generator().manual_seed(seed + 1)
    state = model.state_dict()
    swiglu = "blocks.0.mlp.fc1_g.weight" in state
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        value = value.detach().clone()
        if key.startswith(("head.", "fc_norm.")):
            continue
        if key.endswith(".attn.q_bias"):
            v_bias = state[key.replace("q_bias", "v_bias")]
            k_bias = torch.randn(value.shape, generator=gen)
            prefix = key[: -len("q_bias")]
            out[prefix + "qkv.bias"] = torch.cat([value, k_bias, v_bias])
            mask = torch.ones(3 * value.numel())
            mask[value.numel() : 2 * value.numel()] = 0
            out[prefix + "qkv.bias_mask"] = mask
            continue
        if key.endswith(".attn.v_bias"):
            continue
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        key = key.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
        if swiglu:
            key = key.replace("mlp.fc2.", "mlp.w3.")
        out[key] = value
    embed_dim = out["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, embed_dim)
    out["rope_embed.periods"] = dinov3_rope_periods(_head_dim(model))
    return out


def write_meta_checkpoint(
    path: str | os.PathLike[str], model_size: str = "small", seed: int = 0, **timm_kwargs: Any
) -> Path:
    """Write a random DINOv3 checkpoint in Meta's ``.pth`` layout and return its path.

    ``timm_kwargs`` (depth, embed_dim, num_heads, ...) shrink the model; with none, the tiny
    TINY_KWARGS model is written. `load_dinov3(path)` loads it without a model_size."""
    kwargs = timm_kwargs or dict(TINY_KWARGS)
    model = random_timm_model(model_size, seed=seed, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm_to_meta_state_dict(model, seed=seed), path)
    return path


def meta_to_hf_state_dict(meta: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta's layout renamed to Hugging Face's ``DINOv3ViTModel`` layout (split q/k/v, no key
    bias, ``layer_scaleN.lambda1``, ``mlp.{gate,up,down}_proj``), without the RoPE periods."""
    swiglu = any(".mlp.w1." in k for k in meta)
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj", "fc1": "up_proj", "fc2": "down_proj"}
    top = {
        "cls_token": "embeddings.cls_token",
        "storage_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    out: dict[str, Tensor] = {"embeddings.mask_token": meta["mask_token"].reshape(1, 1, -1).clone()}
    for key, value in meta.items():
        if key in top:
            out[top[key]] = value.clone()
            continue
        if not key.startswith("blocks."):
            continue
        _, idx, rest = key.split(".", 2)
        layer = f"layer.{idx}."
        if rest.startswith("attn.qkv.") and not rest.endswith("bias_mask"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                if not (kind == "bias" and name == "k"):
                    out[f"{layer}attention.{name}_proj.{kind}"] = part.clone()
        elif rest.startswith("attn.proj."):
            out[layer + "attention.o_proj." + rest.rsplit(".", 1)[1]] = value.clone()
        elif rest.startswith(("ls1.", "ls2.")):
            out[layer + f"layer_scale{rest[2]}.lambda1"] = value.clone()
        elif rest.startswith("mlp."):
            _, name, kind = rest.split(".")
            assert swiglu == (name in ("w1", "w2", "w3"))
            out[f"{layer}mlp.{mlp[name]}.{kind}"] = value.clone()
        elif rest.startswith(("norm1.", "norm2.")):
            out[layer + rest] = value.clone()
    return out


def hf_config(meta: dict[str, Tensor], num_heads: int) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for a Meta-layout state dict."""
    embed_dim = meta["cls_token"].shape[-1]
    swiglu = "blocks.0.mlp.w1.weight" in meta
    hidden = meta["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": embed_dim,
        "num_hidden_layers": 1 + max(int(k.split(".")[1]) for k in meta if k.startswith("blocks.")),
        "num_attention_heads": num_heads,
        "intermediate_size": hidden,
        "use_gated_mlp": swiglu,
        "hidden_act": "silu" if swiglu else "gelu",
        "num_register_tokens": meta["storage_tokens"].shape[1],
        "patch_size": 16,
        "rope_theta": 100.0,
        "layer_norm_eps": 1e-5,
        "query_bias": True,
        "key_bias": False,
        "value_bias": True,
    }


def write_hf_checkpoint(folder: str | os.PathLike[str], meta: dict[str, Tensor], num_heads: int) -> Path:
    """Write ``meta`` (Meta layout) as a Hugging Face folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in meta_to_hf_state_dict(meta).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(meta, num_heads), indent=2))
    return folder
