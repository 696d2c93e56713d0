"""Images and masks from paths, PIL images, numpy arrays or tensors, resized and normalised; argument checks.

Follows the published preprocessing (SPEC.md section 1): RGB, PIL bilinear resize to
size x size (aspect ratio not kept), [0, 1], ImageNet normalisation. Float tensors are taken
as already normalised and resized bilinearly. Masks are ``> 0`` resized with nearest to
size x size, whatever their own size (as the published ``load_mask``).

Every image the published code reads is read as it reads it, with an ``InputWarning`` where
that is probably not what was meant: files through ``convert("RGB")`` (which clips 16-bit,
32-bit and float pixels to 0-255: a 16-bit photo turns white, a float image in [0, 1] black),
PIL image objects as its transform takes them (a YCbCr, LAB or HSV image's raw bands as
R, G, B). What it cannot read is read as meant: PIL images of other modes are converted to
RGB (16-bit and float ones scaled to 8 bits), as are numpy arrays (uint16 scaled by
255/65535, floats in [0, 1] by 255, NaN pixels read as 0), and integer tensors (which the
published backbone cannot take) are read as 0-255 pixels and normalised; each with an
``InputWarning`` where it is a guess. Kept as published, on purpose: a palette
("P") mask is read by palette index (index > 0 is foreground), and the EXIF orientation of
a photo is ignored unless ``exif_transpose=True``.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
import warnings
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import InputError, InputFileNotFoundError, InputWarning

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 16
# The published rank of the positional subspace (every model size).
DEFAULT_SVD_COMPONENTS = 500

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
MaskLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor, list]

# numpy dtype kinds that hold pixel values: bool, signed and unsigned integers, floats.
_NUMERIC_KINDS = "biuf"


def _describe(source: object) -> str:
    return f"'{os.fspath(source)}'" if isinstance(source, (str, os.PathLike)) else type(source).__name__


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_input(message: str) -> None:
    """An ``InputWarning`` attributed to the first calling line outside this package (the user's call)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, InputWarning, stacklevel=level)


_warn = warn_input


def open_image_file(path: str | os.PathLike, what: str = "image", exif_transpose: bool = False) -> Image.Image:
    """Open an image file fully (so truncated files fail here), with a clear error otherwise.

    ``exif_transpose``: apply the EXIF orientation tag (the published code ignores it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{what} '{path}' is a folder, not an image file: give the path of an image")
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"{what} file not found: '{path}'")
    try:
        with Image.open(path) as img:
            img.load()
            out = img.copy()
            if exif_transpose:
                out = ImageOps.exif_transpose(img) or out
            return out
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {what} file '{path}': {exc}") from None


def _sixteen_bit_to_8(array: np.ndarray) -> np.ndarray:
    """16-bit values to 0..255: scaled by 255 / 65535 (rounded), as image viewers show them.

    Data that fits in 8 bits (maximum <= 255, e.g. an 8-bit image saved in a 16-bit
    container) is kept as it is, which is what the published ``convert("RGB")`` gives.
    """
    if not array.size or array.max() <= 255:
        return np.clip(array, 0, 255).astype(np.uint8)
    return np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, source: object = "image") -> Image.Image:
    """``image.convert("RGB")``, except that 16-bit and float greyscale images are scaled, not saturated."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.array(image)
        if image.mode == "F":
            return _array_to_pil(array.astype(np.float32), source).convert("RGB")
        return Image.fromarray(_sixteen_bit_to_8(array)).convert("RGB")
    return image.convert("RGB")


# Modes whose three bands the published transform's ToTensor takes as R, G, B without conversion.
_RAW_THREE_BAND_MODES = ("YCbCr", "LAB", "HSV")


def _pil_image_for_transform(image: Image.Image, source: object) -> Image.Image:
    """A PIL image object as the published ``load_image`` reads it, where it can read it.

    The published code gives the object to its transform as it is: an RGB image is read as
    RGB, and a YCbCr, LAB or HSV image is resized in its own mode and its raw bands are read
    as R, G, B (kept in its mode here, with an ``InputWarning``). Every other mode makes the
    published transform raise; those are converted with ``to_rgb``.
    """
    if image.mode in _RAW_THREE_BAND_MODES:
        warn_input(f"PIL image in {image.mode} mode: its raw {'/'.join(image.getbands())} bands are read as "
                   "R, G, B, as the published code reads them; pass image.convert('RGB') for its colours")
        return image
    return to_rgb(image, source)


def _file_image_to_rgb(image: Image.Image, source: object) -> Image.Image:
    """An opened image file as the published ``Image.open(path).convert("RGB")`` reads it.

    That conversion clips 16-bit, 32-bit and float pixels to 0-255 (white above 255, black
    below 0; a float image in [0, 1] turns black): the same here, with an ``InputWarning``
    when it clips.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image)
        finite = array[np.isfinite(array)] if image.mode == "F" else array.ravel()
        non_finite = array.size - finite.size
        low, high = (finite.min(), finite.max()) if finite.size else (0, 0)
        scaled = f"pass Image.open({_describe(source)}) instead to have it scaled to 8 bits"
        if image.mode == "F" and not non_finite and 0 <= low and 0 < high <= 1:
            warn_input(f"image file {_describe(source)} holds float pixels in [0, 1]: it is read as the "
                       "published code reads it (convert('RGB') truncates them to 0 or 1 of 255), nearly "
                       f"black; {scaled} (by 255)")
        elif non_finite or low < 0 or high > 255:
            held = ([f"values in [{low:g}, {high:g}]"] if low < 0 or high > 255 else []) + \
                   ([f"{non_finite} non-finite value(s) (NaN/inf)"] if non_finite else [])
            fix = "rescale it to 0-255 first" if image.mode == "F" else f"{scaled} (by 255/65535)"
            warn_input(f"image file {_describe(source)} ({image.mode}) holds {' and '.join(held)}: it is read "
                       "as the published code reads it (convert('RGB') clips them to 0-255"
                       f"{', NaN to 0' if non_finite else ''}); {fix}")
    return image.convert("RGB")


def read_image_file(path: str | os.PathLike, exif_transpose: bool = False) -> Image.Image:
    """An image file as the model reads it, in RGB: the published ``convert("RGB")``, which clips
    16-bit, 32-bit and float pixels to 0-255 (with an ``InputWarning`` when it clips)."""
    return _file_image_to_rgb(open_image_file(path, exif_transpose=exif_transpose), path)


def _array_to_pil(array: np.ndarray, source: object) -> Image.Image:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"image array {_describe(source)} has dtype {array.dtype}; pass an array of numbers "
                         "(uint8 0-255, uint16, or float in [0, 1])")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        raise InputError(f"image array {_describe(source)} looks channels-first {array.shape}; "
                         "pass (H, W, 3) arrays or a normalised (3, H, W) tensor")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _sixteen_bit_to_8(array)
    elif array.dtype != np.uint8:
        array = array.astype(np.float64)
        bad = ~np.isfinite(array)
        if bad.any():
            _warn(f"image array {_describe(source)} holds {int(bad.sum())} non-finite value(s) (NaN/inf); "
                  "they are read as 0 (black)")
            array = np.where(bad, 0.0, array)
        if array.dtype.kind == "f" and array.size and array.min() >= 0 and array.max() <= 1:
            array = np.round(array * 255.0)
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _check_image_size(height: int, width: int, source: object) -> None:
    if height < 1 or width < 1:
        raise InputError(f"image {_describe(source)} is {width}x{height} px: it has no pixels")
    if height < PATCH_SIZE or width < PATCH_SIZE:  # the published code resizes it as any other
        _warn(f"image {_describe(source)} is {width}x{height} px, smaller than one {PATCH_SIZE}x{PATCH_SIZE} "
              "patch: it is upscaled to the model size, and its mask will be coarse")


def _tensor_image(image: torch.Tensor) -> torch.Tensor:
    """A (1, 3, H, W) float32 normalised image from a tensor (float: as given; integers: 0-255 pixels)."""
    if image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[0] != 1) or image.shape[-3] != 3:
        raise InputError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    tensor = image.detach().reshape(1, *image.shape[-3:])
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InputError(f"image tensor has dtype {tensor.dtype}; pass a normalised float tensor "
                         "(or uint8 0-255 pixels)")
    if not tensor.is_floating_point():
        # The published code cannot run on these (a float backbone on integer input): take them
        # as 0-255 RGB pixels, the only reading an integer image has.
        lo, hi = int(tensor.min()), int(tensor.max())
        if lo < 0 or hi > 255:
            raise InputError(f"integer image tensor has values in [{lo}, {hi}]; pass 0-255 pixels or a "
                             "normalised float tensor")
        _warn(f"image tensor of dtype {tensor.dtype} taken as 0-255 RGB pixels and ImageNet-normalised; "
              "pass a float tensor (normalised with the ImageNet mean/std) to silence this")
        tensor = TF.normalize(tensor.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        return tensor
    tensor = tensor.float()
    warn_non_finite(tensor, "image tensor")
    return tensor


def warn_non_finite(images: torch.Tensor, what: str) -> None:
    """An ``InputWarning`` when a float image tensor holds NaN or inf (the published code runs on silently)."""
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        _warn(f"{what} holds {bad} non-finite value(s) (NaN/inf): its features are not finite and the "
              "mask empty, as in the published code; replace them first, "
              "e.g. with torch.nan_to_num")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without waiting when the copy goes to a GPU.

    Asynchronous only towards CUDA (the GPU's stream orders what reads it); a copy from a GPU
    to the host made with ``non_blocking=True`` can return before its data arrive.
    """
    return tensor.to(device, non_blocking=torch.device(device).type == "cuda")


def load_image(image: ImageLike, size: int, *, exif_transpose: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load an image as a normalised (1, 3, size, size) float32 tensor and its original (H, W).

    Paths, PIL images and arrays are converted to RGB, resized with PIL bilinear and
    normalised with the ImageNet statistics. Files are converted as the published code does
    (``convert("RGB")``: 16-bit, 32-bit and float pixels clipped to 0-255, with a warning), and
    a YCbCr, LAB or HSV image object's raw bands are read as R, G, B, as there (with a warning);
    16-bit and float image objects and arrays, which the published code cannot read, are scaled
    to 8 bits (float arrays in [0, 1] by 255; NaN pixels of arrays become 0, with a warning). A
    float tensor (3, H, W) or (1, 3, H, W) is taken as already normalised and resized with
    bilinear interpolation (align_corners=False); an integer tensor is taken as 0-255 pixels
    and normalised (with an ``InputWarning``). ``exif_transpose`` applies the EXIF orientation
    of files and PIL images (off by default, as in the published code).
    """
    if isinstance(image, torch.Tensor):
        tensor = _tensor_image(image)
        orig = (int(tensor.shape[-2]), int(tensor.shape[-1]))
        _check_image_size(*orig, image)
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
        return tensor, orig
    source = image
    # A file and the same pixels as an object can differ: each is read as the published code
    # reads it, and scaled only where it cannot read it (objects of most modes, arrays).
    if isinstance(image, (str, os.PathLike)):
        image = read_image_file(image, exif_transpose=exif_transpose)
    elif isinstance(image, np.ndarray):
        image = to_rgb(_array_to_pil(image, source), source)
    elif isinstance(image, Image.Image):
        if exif_transpose:
            image = ImageOps.exif_transpose(image) or image
        image = _pil_image_for_transform(image, source)
    else:
        raise InputError(f"unsupported image type {type(image).__name__}; pass a path, PIL image, "
                         "numpy array or tensor")
    orig = (image.height, image.width)
    _check_image_size(*orig, source)
    resized = TF.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR)
    tensor = TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD)
    return tensor.unsqueeze(0), orig


def mask_to_bool_array(mask: MaskLike, *, exif_transpose: bool = False) -> np.ndarray:
    """A mask as a bool (H, W) numpy array: ``value > 0`` (any channel for colour masks).

    A palette ("P") image is read by palette index, as the published code does. Arrays and
    nested lists are (H, W), (1, H, W) as a mask tensor, or (H, W, C) channels last with C <= 4
    (any channel); other 3-D arrays, channels-first (C, H, W) ones among them, raise InputError
    (the published ``load_mask`` refuses every 3-D array).
    """
    source = mask
    from_pil = False
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        if mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.ndim != 2:
            raise InputError(f"mask tensor must be (H, W) or (1, H, W), got {tuple(mask.shape)}")
        if mask.is_complex():
            raise InputError(f"mask tensor has dtype {mask.dtype}; pass a bool or numeric tensor")
        return (mask > 0).numpy() if mask.dtype != torch.bool else mask.numpy()
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image_file(mask, what="mask", exif_transpose=exif_transpose)
    elif isinstance(mask, Image.Image) and exif_transpose:
        mask = ImageOps.exif_transpose(mask) or mask
    if isinstance(mask, Image.Image):
        mask, from_pil = np.array(mask), True
    elif isinstance(mask, (list, tuple)):  # nested lists of numbers: the published np.array(mask) > 0
        try:
            mask = np.asarray(mask)
        except ValueError as exc:
            raise InputError(f"mask given as a {type(source).__name__} is not a rectangular (H, W) array of "
                             f"numbers: {exc}") from None
    if not isinstance(mask, np.ndarray):
        raise InputError(f"unsupported mask type {type(source).__name__}; pass a path, PIL image, "
                         "numpy array or tensor")
    if mask.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"mask {_describe(source)} has dtype {mask.dtype}; pass a bool or numeric array")
    if mask.ndim == 3 and not from_pil:  # PIL arrays are channels last, even one row high
        if mask.shape[0] == 1:  # the (1, H, W) of a mask tensor, read as the tensor is
            mask = mask[0]
        elif mask.shape[-1] > 4:
            first = (f"looks channels-first with {mask.shape[0]} channels" if mask.shape[0] <= 4
                     else "has no channel axis")
            raise InputError(f"mask {_describe(source)} of shape {mask.shape} {first}; pass an (H, W) mask "
                             "(or (1, H, W), or (H, W, C) channels last, any channel > 0 being foreground)")
    if mask.ndim == 3:
        mask = (mask > 0).any(axis=-1)
    if mask.ndim != 2:
        raise InputError(f"mask {_describe(source)} must be (H, W), (1, H, W) or (H, W, C), got shape {mask.shape}")
    return mask > 0


def _same_aspect(a_hw: tuple[int, int], b_hw: tuple[int, int], tolerance: float = 0.02) -> bool:
    return abs(a_hw[0] * b_hw[1] - a_hw[1] * b_hw[0]) <= tolerance * a_hw[1] * b_hw[0]


def load_mask(mask: MaskLike, size: int, expected_hw: tuple[int, int] | None = None, *,
              mismatch: str = "raise", exif_transpose: bool = False, empty: str = "raise") -> torch.Tensor:
    """Load a reference mask as a bool (1, size, size) tensor (``> 0``, nearest resize).

    A mask without a foreground pixel raises InputError, or with ``empty="warn"`` is returned
    with an ``InputWarning`` (the published ``set_reference`` stores it: ``match`` does not
    read it, segmenting with it fails). ``expected_hw`` is the original
    size of the image the mask belongs to; when the mask's size differs, ``mismatch`` says
    what happens: ``raise`` (the command line's default), ``warn`` (the published behaviour:
    the mask is resized to size x size anyway; an ``InputWarning`` when the aspect ratios
    differ, a sign of a wrong mask) or ``ignore``.
    """
    if mismatch not in ("raise", "warn", "ignore"):
        raise InputError(f"mismatch must be 'raise', 'warn' or 'ignore', got {mismatch!r}")
    array = mask_to_bool_array(mask, exif_transpose=exif_transpose)
    if expected_hw is not None and tuple(array.shape) != tuple(expected_hw):
        sizes = (f"mask {_describe(mask)} is {array.shape[1]}x{array.shape[0]} px but its image "
                 f"is {expected_hw[1]}x{expected_hw[0]} px")
        if mismatch == "raise":
            raise InputError(f"{sizes}; they must have the same size (or pass --resize-mask to resize "
                             "the mask to the image, as the published code does)")
        if mismatch == "warn" and not _same_aspect(tuple(array.shape), tuple(expected_hw)):
            _warn(f"{sizes}, with another aspect ratio; both are resized to {size}x{size} (the mask "
                  "with nearest, as the published code does): check that the mask belongs to the image")
    if not array.any():
        if empty != "warn":
            raise InputError(f"reference mask {_describe(mask)} is empty (no pixel > 0); "
                             "mark the object to segment in the mask")
        _warn(f"reference mask {_describe(mask)} is empty (no pixel > 0): match() does not need it, but "
              "segment() will refuse it; mark the object to segment in the mask")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0)
    resized = F.interpolate(tensor.unsqueeze(0).float(), size=(size, size), mode="nearest")
    return resized.squeeze(0) > 0.5


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a (..., 3, H, W) tensor (values back in ~[0, 1])."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(3, 1, 1)
    return image * std + mean


# ---- arguments ----
def _as_scalar(value: object) -> object:
    """A one-element real tensor or numpy array as its Python number (the published class takes
    ``torch.tensor(16)`` or ``np.array(0.6)`` wherever it takes a number); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf":
        return value.item()
    return value


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int (Python or numpy integers, one-element integer tensors and arrays; not
    bool, float or str), else InputError."""
    value = _as_scalar(value)
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and out < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_out_size(out_size: object, name: str = "out_size") -> tuple[int, int] | None:
    """None, or ``out_size`` as a (height, width) pair of positive ints, else InputError."""
    if out_size is None:
        return None
    if not isinstance(out_size, (tuple, list)) or len(out_size) != 2:
        raise InputError(f"{name} must be (height, width) or None, got {out_size!r}")
    return (check_int(f"{name} height", out_size[0], minimum=1), check_int(f"{name} width", out_size[1], minimum=1))


def check_real(name: str, value: object, low: float | None = None, high: float | None = None,
               infinite: bool = False) -> float:
    """``value`` as a float in [low, high] (ints, floats, numpy scalars, 1-element tensors):
    finite, or with ``infinite`` any but NaN."""
    value = _as_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    out = float(value)
    if math.isnan(out) or (not infinite and math.isinf(out)):
        raise InputError(f"{name} must be a {'' if infinite else 'finite '}number, got {out}")
    if (low is not None and out < low) or (high is not None and out > high):
        raise InputError(f"{name} must be in [{low}, {high}], got {out}")
    return out


def check_thresholds(tau: object, merge_threshold: object) -> tuple[float, float]:
    """Validated (tau, merge_threshold) as the published code takes them.

    tau: a finite similarity. Below 0 it merges clusters whose features point away from each
    other (one or a few clusters are left), as the published code does; above 1 the distance
    threshold 1 - tau is negative and nothing merges (the published code constructs and
    matches keypoints with it; its scikit-learn refuses it when segmenting): both accepted with
    an ``InputWarning``. merge_threshold: any number but NaN (+inf: no cluster joins the mask;
    -inf: every matched one).
    """
    tau = check_real("tau", tau)
    if tau < 0:
        warn_input(f"tau = {tau} < 0: clusters merge up to a cosine distance of {1.0 - tau}, even when their "
                   "features point away from each other, so the target ends in one or a few clusters (the "
                   "published default is 0.6)")
    elif tau > 1:
        warn_input(f"tau = {tau} > 1: the clustering's distance threshold 1 - tau is negative, so no two "
                   "patches merge (the published code's scikit-learn refuses it when segmenting; match() runs)")
    return tau, check_real("merge_threshold", merge_threshold, infinite=True)


def default_svd_components(embed_dim: int | None) -> int:
    """The rank of the positional subspace for an embedding of size C.

    The published 500 wherever it is smaller than C (every DINOv3 size from ViT-B up);
    otherwise C // 2, the fraction the published setting removes at ViT-L (500 of 1024),
    so that ViT-S and ViT-S+ (C = 384) get 192.
    """
    if embed_dim is None or DEFAULT_SVD_COMPONENTS < embed_dim:
        return DEFAULT_SVD_COMPONENTS
    return embed_dim // 2


def resolve_svd_components(requested: object, embed_dim: int | None) -> int:
    """The rank to use: ``requested``, or the default rule when it is None.

    A rank >= C (the published default of 500 with C = 384, say) would remove the whole
    embedding and leave noise, which the published code does silently: here it falls back to
    ``default_svd_components(C)`` with an ``InputWarning``. A negative one is returned as it is:
    the published code reads it as the slice ``U[:, :r]`` of the K = min(C, patches) singular
    vectors, and so does ``compute_positional_basis`` (K + r of them, none below -K).
    """
    if requested is None:
        return default_svd_components(embed_dim)
    r = check_int("svd_components", requested)
    if r < 0:
        return r
    if embed_dim is not None and r >= embed_dim:
        fallback = default_svd_components(embed_dim)
        _warn(f"svd_components={r} is not smaller than the embedding size ({embed_dim}): removing that "
              f"subspace would leave only noise; using svd_components={fallback} instead "
              "(pass svd_components=None for this rule, or a value below the embedding size)")
        return fallback
    return r


def check_image_size(size: object) -> int:
    """The model's image size as the published class takes it: an int of at least one patch.

    One that is not a multiple of 16 works as it does there, with an ``InputWarning``: the
    patch embedding (a stride-16 convolution) sees the largest multiple of 16 and drops the last
    ``size % 16`` rows and columns; the mask is upsampled to the full size.
    """
    size = check_int("image size", size)
    if size < PATCH_SIZE:
        raise InputError(f"image size must be at least one {PATCH_SIZE} px patch, got {size}")
    if size % PATCH_SIZE:
        warn_input(f"image size {size} is not a multiple of {PATCH_SIZE}: the backbone sees its first "
                   f"{size - size % PATCH_SIZE} px rows and columns (as the published code's does); pass a "
                   f"multiple of {PATCH_SIZE} to use every pixel")
    return size


def check_image_size_multiple(size: object) -> int:
    """``size`` as an int; InputError unless it is a positive multiple of the 16 px patch."""
    size = check_int("image size", size)
    if size < PATCH_SIZE or size % PATCH_SIZE:
        raise InputError(f"image size must be a positive multiple of {PATCH_SIZE}, got {size}")
    return size
