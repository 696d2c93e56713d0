"""Reading DINOv3 checkpoint files: Meta ``.pth``, ``.safetensors``, Hugging Face folders.

Returns the tensors as the file names them (Meta's or Hugging Face's layout; `keys` renames)
and the Hugging Face ``config.json`` next to them. Every failure is a WeightsError that says
what to do.

Why not ``timm.models.load_state_dict``: it prefers EMA weights (``state_dict_ema``,
``model_ema``) over ``model``, does not know DINO's ``teacher``, allow-lists
``argparse.Namespace`` in the pickle, and rewraps a refused pickle as a RuntimeError in its own
words. Here ``torch.load`` always runs with ``weights_only=True`` (a checkpoint never executes
code), a refused pickle names what it would have called, and timm's ``clean_state_dict``
serves for what it does: stripping DDP/torch.compile wrapper prefixes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import WeightsError
from .messages import corrupt_file_error, missing_file_error, refused_pickle_error, unknown_architecture_error

__all__ = ["positive_int", "positive_real", "read_checkpoint", "unwrap_state_dict"]

# Nested containers training scripts save the weights under, outermost first.
_CONTAINER_KEYS = ("model", "state_dict", "teacher", "module")
# Prefixes every key of a released or exported DINOv3 state dict may share.
_SHARED_PREFIXES = ("module.", "model.", "dinov3_vit.", "dinov3.")
# The two spellings torch uses for a global that weights_only=True refuses (older, newer).
_REFUSED_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)")


def positive_int(value: Any) -> bool:
    """True for an int (not a bool) above zero."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_real(value: Any) -> bool:
    """True for a finite int or float (not a bool) above zero."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The backbone tensors of a checkpoint: out of ``model``/``state_dict``/``teacher``/``module``
    containers, without wrapper prefixes, the ``backbone.`` part of a training checkpoint only."""
    from timm.models import clean_state_dict  # lazily: importing timm costs seconds

    for key in _CONTAINER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    tensors = clean_state_dict(tensors)  # DDP "module." and torch.compile "_orig_mod." per key
    if "backbone.cls_token" in tensors:  # a training checkpoint: backbone next to heads
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    for prefix in _SHARED_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise corrupt_file_error(path, exc) from exc


def _load_pth(path: Path) -> dict[str, Tensor]:
    try:
        # weights_only=True always: a checkpoint is data, and unpickling arbitrary content runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A pickle that imports something the safe loader does not allow; other refusals
        # ("Unsupported operand") are garbage bytes.
        found = _REFUSED_GLOBAL.search(str(exc))
        if found:
            raise refused_pickle_error(path, found.group(1) or found.group(2)) from None
        # torch's message opens with advice to load with weights_only=False (which runs any code
        # in the file): only its reason is passed on.
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        raise corrupt_file_error(path, pickle.UnpicklingError(
            reason.group(1).strip() if reason else "not a checkpoint torch can read")) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a text file gives KeyError, a cut zip RuntimeError, ...
        raise corrupt_file_error(path, exc) from None
    if not isinstance(state, Mapping):
        raise unknown_architecture_error(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return unwrap_state_dict(state)


def _read_hf_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise corrupt_file_error(config_path, exc) from None
    if not isinstance(config, dict):
        raise corrupt_file_error(config_path, TypeError(f"a JSON {type(config).__name__}, not an object"))
    if "num_attention_heads" in config and not positive_int(config["num_attention_heads"]):
        raise corrupt_file_error(config_path, ValueError(
            f"num_attention_heads is {config['num_attention_heads']!r}, not a positive integer"))
    if "rope_theta" in config and not positive_real(config["rope_theta"]):
        raise corrupt_file_error(config_path, ValueError(
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
            raise corrupt_file_error(index, exc) from None
        shards = [_shard_path(folder, index, name) for name in names]
        state: dict[str, Tensor] = {}
        for shard in shards:
            if not shard.is_file():
                raise missing_file_error(shard)
            state.update(_load_safetensors(shard))
        return state
    raise WeightsError(
        f"'{folder}' is a folder without model.safetensors: pass a Hugging Face facebook/dinov3-* "
        "folder (config.json + model.safetensors) or a Meta .pth file."
    )


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of the checkpoint at ``path`` (a Meta ``.pth``, a ``.safetensors`` file or a
    Hugging Face folder), unwrapped, and its Hugging Face config (empty for Meta files)."""
    if not path.exists():
        raise missing_file_error(path)
    if path.is_dir():
        return unwrap_state_dict(_load_hf_folder(path)), _read_hf_config(path)
    if path.suffix == ".safetensors":
        return unwrap_state_dict(_load_safetensors(path)), _read_hf_config(path.parent)
    return _load_pth(path), {}
