"""COCO-style mask codecs (compressed RLE, polygons) used by the LVIS, PACO and Pascal-Part layouts.

Compressed RLE strings are decoded natively so that pycocotools is only needed for polygon
annotations (LVIS and PACO store some objects as polygons).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """Decode the compressed (LEB128-like, 6 bits per char) COCO RLE count string."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    out: list[int] = []
    pos = 0
    n = len(counts)
    while pos < n:
        value = 0
        shift = 0
        more = True
        while more:
            c = ord(counts[pos]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        # Counts after the second are stored as differences to the count two places before.
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """Encode run lengths into the compressed COCO RLE string (inverse of rle_counts_from_string)."""
    chars: list[str] = []
    for i, cnt in enumerate(counts):
        x = int(cnt)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10) == 0 and x == 0 or (c & 0x10) != 0 and x == -1)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode one COCO RLE (compressed string or list of counts) into an (H, W) uint8 mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    flat = np.zeros(h * w, dtype=np.uint8)
    pos = 0
    value = 0
    for run in runs:
        if value:
            flat[pos:pos + run] = 1
        pos += run
        value ^= 1
    # COCO stores masks column-major.
    return flat.reshape(w, h).T.copy()


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode an (H, W) binary mask as a compressed COCO RLE dict (counts as str)."""
    mask = np.asarray(mask).astype(bool)
    h, w = mask.shape
    flat = mask.T.reshape(-1)
    counts: list[int] = []
    prev = False
    run = 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run = 0
            prev = v
        run += 1
    counts.append(run)
    return {"size": [h, w], "counts": rle_counts_to_string(counts)}


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons the way pycocotools does (needs pycocotools)."""
    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    try:
        import pycocotools.mask as mask_util
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "this annotation stores polygons, which need pycocotools to rasterise exactly as the "
            "published evaluation does: pip install pycocotools"
        ) from exc
    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons], height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def segmentation_shape(segm: Any, image_size_hw: tuple[int, int]) -> tuple[int, int]:
    """Shape of the mask that ``segmentation_to_mask`` would return, without decoding it."""
    if isinstance(segm, dict):
        h, w = segm["size"]
        return int(h), int(w)
    if isinstance(segm, np.ndarray):
        return int(segm.shape[0]), int(segm.shape[1])
    return image_size_hw


def segmentation_to_mask(segm: Any, image_size_hw: tuple[int, int]) -> np.ndarray:
    """A COCO segmentation (polygon list, RLE dict or array) as an (H, W) bool mask."""
    if isinstance(segm, list):
        return polygons_to_mask(segm, *image_size_hw)
    if isinstance(segm, dict):
        return rle_decode(segm).astype(bool)
    if isinstance(segm, np.ndarray):
        if segm.ndim != 2:
            raise InputError(f"expected a 2-D segmentation array, got {segm.ndim} dimensions")
        return segm.astype(bool)
    raise InputError(f"unsupported segmentation type {type(segm).__name__}")
