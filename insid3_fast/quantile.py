"""torch.quantile(x, q) of a 1-D tensor for q near 1, from a top-k instead of a full sort.

The pipeline's forward-match fallback needs the 0.9 quantile of the target's similarities
(`sim > quantile(sim, 0.9)` when no similarity is positive, as published). torch.quantile sorts
the whole tensor and checks q on the device; only the top n - floor(q (n - 1)) values matter,
and the ranks depend on the shape alone, so they are computed on the host with torch's own
arithmetic (q rounded to x's dtype, ranks in float64, the weight rounded back) and no device value is read.
The result is torch.quantile's bit for bit (linear interpolation, NaN when x holds a NaN),
which tests/test_quantile.py checks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["upper_quantile"]


_NUMPY = {torch.float64: np.float64, torch.float32: np.float32}  # torch.quantile's dtypes


def upper_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) of a non-empty 1-D float32/float64 tensor,
    as a 0-d tensor on x's device, without a host synchronisation.

    Example:
        >>> upper_quantile(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.9)
        tensor(3.7000)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"upper_quantile needs a non-empty 1-D tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _NUMPY:
        raise TypeError(f"upper_quantile needs a float32 or float64 tensor (as torch.quantile), got {x.dtype}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    n = x.numel()
    # As torch.quantile: q rounded to x's dtype, then the ranks in float64.
    ranks = float(_NUMPY[x.dtype](q)) * (n - 1)
    below, above = math.floor(ranks), math.ceil(ranks)
    # Shapes (1,) as in torch.quantile, so that lerp takes the same kernel path (its vectorised
    # and scalar paths round differently).
    weight = torch.full((1,), float(_NUMPY[x.dtype](ranks - below)), dtype=x.dtype, device=x.device)
    top = torch.topk(x, n - below, largest=True, sorted=True).values  # descending: sorted[below] last
    j = n - 1 - above
    value = top[-1:].lerp(top[j:j + 1], weight)
    # torch.quantile's NaN rule: a NaN anywhere gives NaN (topk ranks NaN above every value).
    return torch.where(torch.isnan(top[:1]), top[:1], value)[0]
