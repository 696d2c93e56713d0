"""The WeightsError of each way a DINOv3 checkpoint can be unusable, each saying what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import WeightsError
from .sizes import META_CHECKPOINT_NAMES, MODEL_SIZES


def missing_file_error(path: Path) -> WeightsError:
    """No file or folder at ``path``: where the weights come from and where to put them."""
    return WeightsError(
        f"DINOv3 weights not found at '{path}'. The weights come from Meta's DINOv3 release "
        "(https://github.com/facebookresearch/dinov3): request access there, download the "
        f"checkpoint (e.g. {META_CHECKPOINT_NAMES['large']}), and put the .pth in pretrain/ "
        "or pass --weights PATH. A Hugging Face facebook/dinov3-* folder (config.json + "
        "model.safetensors) works too."
    )


def corrupt_file_error(path: Path, exc: BaseException) -> WeightsError:
    """``path`` could not be parsed (``exc`` says why, in its first line): re-download it."""
    detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:200]
    return WeightsError(
        f"Could not read the DINOv3 checkpoint '{path}': the file looks truncated or corrupt "
        f"({type(exc).__name__}{': ' + detail if detail else ''}). Re-download it from Meta's DINOv3 "
        "release (https://github.com/facebookresearch/dinov3) or Hugging Face."
    )


def refused_pickle_error(path: Path, name: str) -> WeightsError:
    """``path`` is a pickle that would call ``name``: refused, never run."""
    return WeightsError(
        f"Refused the checkpoint '{path}': it holds executable pickle content (it would call {name} "
        "when loaded), and the safe loader (torch.load with weights_only=True) runs no such content. "
        "Use a plain tensor checkpoint: Meta's released .pth or a Hugging Face .safetensors file."
    )


def malformed_error(what: str) -> WeightsError:
    """The file parsed but ``what`` is wrong in it."""
    return WeightsError(f"Malformed DINOv3 checkpoint: {what}. Re-download Meta's DINOv3 weights.")


def unknown_architecture_error(what: str) -> WeightsError:
    """The file describes ``what``, which is no supported DINOv3 size."""
    sizes = ", ".join(MODEL_SIZES)
    return WeightsError(
        f"Unknown DINOv3 architecture: {what}. Supported: DINOv3 ViT/16 sizes {sizes} "
        "(Meta .pth files or Hugging Face facebook/dinov3-* checkpoints)."
    )


def few(keys: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``keys`` (sorted) for a message, with the count when there are more."""
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
