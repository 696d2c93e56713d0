"""Images and masks from paths, PIL images, numpy arrays or tensors, resized and normalised.

Follows the published preprocessing (SPEC.md section 1): RGB, PIL bilinear resize to
size x size (aspect ratio not kept), [0, 1], ImageNet normalisation. Tensors are taken as
already normalised and resized bilinearly. Masks are ``> 0`` resized with nearest.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 16

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
MaskLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def _describe(source: object) -> str:
    return f"'{os.fspath(source)}'" if isinstance(source, (str, os.PathLike)) else type(source).__name__


def open_image_file(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open an image file fully (so truncated files fail here), with a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} file not found: '{path}'")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {what} file '{path}': {exc}") from None


def _array_to_pil(array: np.ndarray, source: object) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        raise InputError(f"image array {_describe(source)} looks channels-first {array.shape}; "
                         "pass (H, W, 3) arrays or a normalised (3, H, W) tensor")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0 and array.max() <= 1:
            array = np.round(array * 255.0)
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _check_image_size(height: int, width: int, source: object) -> None:
    if height < PATCH_SIZE or width < PATCH_SIZE:
        raise InputError(f"image {_describe(source)} is {width}x{height} px, smaller than one "
                         f"{PATCH_SIZE}x{PATCH_SIZE} patch; use a larger image")


def load_image(image: ImageLike, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load an image as a normalised (1, 3, size, size) float32 tensor and its original (H, W).

    Paths, PIL images and arrays are converted to RGB, resized with PIL bilinear and
    normalised with the ImageNet statistics. A tensor (3, H, W) or (1, 3, H, W) is taken as
    already normalised and resized with bilinear interpolation (align_corners=False).
    """
    if isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[0] != 1) or image.shape[-3] != 3:
            raise InputError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        tensor = image.reshape(1, *image.shape[-3:]).float()
        orig = (int(tensor.shape[-2]), int(tensor.shape[-1]))
        _check_image_size(*orig, image)
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
        return tensor, orig
    source = image
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, source)
    elif not isinstance(image, Image.Image):
        raise InputError(f"unsupported image type {type(image).__name__}; pass a path, PIL image, "
                         "numpy array or tensor")
    image = image.convert("RGB")
    orig = (image.height, image.width)
    _check_image_size(*orig, source)
    resized = TF.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR)
    tensor = TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD)
    return tensor.unsqueeze(0), orig


def mask_to_bool_array(mask: MaskLike) -> np.ndarray:
    """A mask as a bool (H, W) numpy array: ``value > 0`` (any channel for colour masks)."""
    source = mask
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        if mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.ndim != 2:
            raise InputError(f"mask tensor must be (H, W) or (1, H, W), got {tuple(mask.shape)}")
        return (mask > 0).numpy() if mask.dtype != torch.bool else mask.numpy()
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image_file(mask, what="mask")
    if isinstance(mask, Image.Image):
        mask = np.array(mask)
    if not isinstance(mask, np.ndarray):
        raise InputError(f"unsupported mask type {type(source).__name__}; pass a path, PIL image, "
                         "numpy array or tensor")
    if mask.ndim == 3:
        mask = (mask > 0).any(axis=-1)
    if mask.ndim != 2:
        raise InputError(f"mask {_describe(source)} must be (H, W), got shape {mask.shape}")
    return mask > 0


def load_mask(mask: MaskLike, size: int, expected_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Load a reference mask as a bool (1, size, size) tensor (``> 0``, nearest resize).

    Raises InputError when the mask has no foreground pixel or when its size differs from
    ``expected_hw`` (the original size of the image it belongs to).
    """
    array = mask_to_bool_array(mask)
    if expected_hw is not None and tuple(array.shape) != tuple(expected_hw):
        raise InputError(f"mask {_describe(mask)} is {array.shape[1]}x{array.shape[0]} px but its image "
                         f"is {expected_hw[1]}x{expected_hw[0]} px; they must have the same size")
    if not array.any():
        raise InputError(f"reference mask {_describe(mask)} is empty (no pixel > 0); "
                         "mark the object to segment in the mask")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0)
    resized = F.interpolate(tensor.unsqueeze(0).float(), size=(size, size), mode="nearest")
    return resized.squeeze(0) > 0.5


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a (..., 3, H, W) tensor (values back in ~[0, 1])."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(3, 1, 1)
    return image * std + mean


def check_image_size_multiple(size: int) -> None:
    """Raise unless ``size`` is a positive multiple of the 16 px patch."""
    if size < PATCH_SIZE or size % PATCH_SIZE:
        raise InputError(f"image size must be a positive multiple of {PATCH_SIZE}, got {size}")
