"""Dense-CRF boundary refinement (``mask_refiner="crf"``).

A fully connected two-label CRF with Gaussian (Potts) pairwise terms decides the pixels of a
narrow band around the mask boundary; the eroded core stays foreground and everything outside
the dilated mask stays background. The energy and solver follow the published INSID3
refinement (Frank-Wolfe with an l2 regulariser and step 1, i.e. mean field with sparsemax in
place of softmax), with both kernels applied as permutohedral-lattice filters normalised by
the filter of ones.

Two interchangeable backends:

- ``"pydensecrf"``: the C++ lattice of ``pydensecrf2`` (CPU), optional extra ``[crf]``.
- ``"torch"``: a permutohedral lattice in plain torch ops, device-agnostic (used on CUDA).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BackendError, InputError

__all__ = ["CrfParams", "PermutohedralLattice", "crf_available", "crf_refine", "band_regions"]

BACKENDS = ("auto", "torch", "pydensecrf")
_INSTALL_HINT = 'install the extra with `pip install "insid3_fast[crf]"` (which pulls pydensecrf2)'


@dataclass(frozen=True)
class CrfParams:
    """Parameters of the refinement; :meth:`for_size` gives the published ones.

    Attributes:
        band_radius: radius (px) of the disc that dilates and erodes the mask.
        p_core: initial foreground probability of the eroded core (1 - it outside).
        gamma: std (px) of the spatial kernel.
        alpha: std (px) of the bilateral kernel's position part.
        beta: std of the bilateral kernel's colour part (RGB in [0, 1]).
        spatial_weight: weight of the spatial kernel.
        bilateral_weight: weight of the bilateral kernel.
        iterations: solver iterations.
        support_sigmas: None (the published CRF: every pixel is a variable), or keep only the
            pixels within this many bilateral position stds (alpha) of the band, a speed-up
            that perturbs the band's result slightly.
    """

    band_radius: int = 5
    p_core: float = 0.95
    gamma: float = 4.0
    alpha: float = 12.0
    beta: float = 0.03
    spatial_weight: float = 3.0
    bilateral_weight: float = 20.0
    iterations: int = 10
    support_sigmas: float | None = None

    @classmethod
    def for_size(cls, size: int) -> CrfParams:
        """The published parameters for a size x size image: kernel stds scale with size/512."""
        scale = float(size) / 512.0
        return cls(gamma=4.0 * scale, alpha=12.0 * scale)


def crf_available(backend: str = "auto") -> bool:
    """Whether ``backend`` can run here ("torch" and "auto" always can)."""
    _check_backend_name(backend)
    if backend == "pydensecrf":
        return _import_pydensecrf() is not None
    return True


def crf_refine(image: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto",
               params: CrfParams | None = None) -> torch.Tensor:
    """Refine a binary mask near its boundary with a dense CRF.

    Args:
        image: (3, S, S) de-normalised RGB in [0, 1] (values outside are clamped).
        mask: (S, S) bool, the upsampled prediction.
        backend: "pydensecrf" (CPU, needs the ``[crf]`` extra), "torch" (any device) or
            "auto" (torch for CUDA tensors, else pydensecrf when installed, else torch).
        params: override of the published parameters ``CrfParams.for_size(S)`` (tests).

    Returns:
        (S, S) bool on ``mask``'s device: the CRF's labels in the band, the eroded core fg,
        the rest bg.

    Raises:
        InputError: shapes that do not match, or an unknown backend.
        BackendError: backend "pydensecrf" without the pydensecrf2 package.
    """
    _check_inputs(image, mask)
    backend = _resolve_backend(backend, mask.device)
    params = params or CrfParams.for_size(mask.shape[-1])
    core, band, _ = band_regions(mask.bool(), params.band_radius)
    if not bool(band.any()):  # an empty mask
        return core
    image = image.float().clamp(0.0, 1.0).to(mask.device)
    return core | (band & _crf_foreground(image, core, band, backend, params))


def _crf_foreground(image: torch.Tensor, core: torch.Tensor, band: torch.Tensor, backend: str,
                    params: CrfParams) -> torch.Tensor:
    """(S, S) bool: the CRF's fg decision (meaningful in the band)."""
    logit_fg = _init_logit_fg(core, band, params.p_core).reshape(-1)
    spatial, bilateral = _features(image, params)
    support = _support(band, params)
    if support is not None:
        spatial, bilateral, logit_fg = spatial[support], bilateral[support], logit_fg[support]
    if backend == "torch":
        cached = None if support is not None else _spatial_lattice(
            *band.shape, params.gamma, str(band.device), _stream_id(band.device))
        fg = _solve_torch(spatial, bilateral, logit_fg, params, cached)
    else:
        fg = _solve_pydensecrf(spatial, bilateral, logit_fg, params).to(band.device)
    if support is not None:
        fg = torch.zeros_like(band.reshape(-1)).index_put_((support,), fg)
    return fg.reshape(band.shape)


def _support(band: torch.Tensor, params: CrfParams) -> torch.Tensor | None:
    """Flat indices of the CRF's variables when restricted near the band, else None (all)."""
    if params.support_sigmas is None:
        return None
    r = int(math.ceil(params.support_sigmas * params.alpha))
    near = band.float()[None, None]
    for kernel in ((1, 2 * r + 1), (2 * r + 1, 1)):  # a square window, separably
        near = F.max_pool2d(near, kernel, stride=1, padding=(kernel[0] // 2, kernel[1] // 2))
    near = near[0, 0] > 0
    return torch.nonzero(near.reshape(-1)).reshape(-1)


def band_regions(mask: torch.Tensor,
                 radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the image into (core, band, outside) around ``mask``'s boundary.

    Dilation and erosion use a disc of ``radius`` px with zero padding, so pixels within
    ``radius`` of the image border are never core (as in the published code): a mask that
    touches the border gets a band along it.
    """
    r = max(1, int(radius))
    offsets = torch.arange(-r, r + 1, device=mask.device)
    disc = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= r * r).float()
    counts = F.conv2d(mask.float()[None, None], disc[None, None], padding=r)[0, 0]
    dilated = counts > 0.5
    core = counts > disc.sum() - 0.5  # integer counts: "all of the disc inside the mask"
    return core, dilated & ~core, ~dilated


def _init_logit_fg(core: torch.Tensor, band: torch.Tensor, p_core: float) -> torch.Tensor:
    """Foreground logit of every pixel; the label logits are (-logit_fg, logit_fg)."""
    prob = torch.full(core.shape, 1.0 - p_core, dtype=torch.float32, device=core.device)
    prob[core] = p_core
    prob[band] = 0.5
    return torch.logit(prob.clamp(1e-6, 1 - 1e-6))


def _features(image: torch.Tensor, params: CrfParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) spatial features (y, x)/gamma and (N, 5) bilateral (y, x)/alpha, rgb/beta."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device, dtype=torch.float32),
                            torch.arange(w, device=image.device, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    rgb = image.reshape(3, -1).t()
    spatial = pos / params.gamma
    bilateral = torch.cat([pos / params.alpha, rgb / params.beta], dim=1)
    return spatial.contiguous(), bilateral.contiguous()


def _sparsemax_fg(diff: torch.Tensor) -> torch.Tensor:
    """Foreground probability of the 2-label sparsemax, given fg score minus bg score."""
    return ((diff + 1.0) * 0.5).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# torch backend


class PermutohedralLattice:
    """Permutohedral lattice of Adams et al. (2010) for a fixed set of features.

    Built once (splat weights, lattice vertices, blur neighbours) and reused by every
    :meth:`filter` call. Matches pydensecrf's and the published CUDA lattice: the same
    per-dimension scale factors, nearest-remainder-0 rounding, blur [1/4, 1/2, 1/4] (up to a
    global factor) along the d+1 lattice axes in order 0..d (missing neighbours read as zero),
    the pixel itself included.
    :meth:`normalized` divides by the filter of ones, which cancels the kernels' overall
    constants (pydensecrf's blur [1/2, 1, 1/2] and alpha factor).
    """

    def __init__(self, features: torch.Tensor) -> None:
        """Args: features (N, d) float, already divided by the kernel's stds."""
        n, d = features.shape
        self.d = d
        elevated = _elevate(features.float())
        rem0, rank = _nearest_remainder0(elevated)
        self.weights = _barycentric(elevated, rem0, rank)[:, : d + 1].contiguous()
        packed, radix = _packed_simplex_keys(rem0, rank)  # (N, d+1)
        vertices, inverse = torch.unique(packed, sorted=True, return_inverse=True)
        self.num_vertices = vertices.numel()
        self.index = inverse.reshape(n, d + 1)
        self.neighbours = _blur_neighbours(vertices, radix, d)
        self.inv_norm = 1.0 / self.filter(torch.ones(n, device=features.device))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Unnormalised Gaussian filter of (N,) or (N, C) values."""
        lattice = self.splat(values)
        self.blur_(lattice)
        return self.slice(lattice)

    def normalized(self, values: torch.Tensor) -> torch.Tensor:
        """filter(values) / filter(ones) ("normalise after")."""
        out = self.filter(values)
        return out * (self.inv_norm if out.dim() == 1 else self.inv_norm[:, None])

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """(M+1, ...) lattice values, the last one the always-zero "missing vertex"."""
        vals = values.float()
        weights = self.weights if vals.dim() == 1 else self.weights[:, :, None]
        splat = (weights * vals[:, None]).reshape(-1, *vals.shape[1:])
        lattice = vals.new_zeros(self.num_vertices + 1, *vals.shape[1:])
        return lattice.index_add_(0, self.index.reshape(-1), splat)

    def blur_(self, lattice: torch.Tensor) -> None:
        """Blur in place along each lattice axis.

        Uses [1/2, 1, 1/2] (twice the textbook kernel: a global factor that normalisation
        cancels) so that vertices without neighbours on an axis are left untouched.
        """
        for rows, plus, minus in self.neighbours:
            lattice[rows] += 0.5 * (lattice[plus] + lattice[minus])

    def slice(self, lattice: torch.Tensor) -> torch.Tensor:
        """(N, ...) values interpolated back at the pixels."""
        weights = self.weights if lattice.dim() == 1 else self.weights[:, :, None]
        return (weights * lattice[self.index]).sum(dim=1)


def _elevate(features: torch.Tensor) -> torch.Tensor:
    """Embed (N, d) features in the hyperplane sum = 0 of R^(d+1), scaled for unit std."""
    n, d = features.shape
    idx = torch.arange(1, d + 1, device=features.device, dtype=torch.float64)
    inv_std = (d + 1) * math.sqrt(2.0 / 3.0)
    scale = (inv_std / torch.sqrt(idx * (idx + 1))).float()
    cf = features * scale
    # elevated[i] = sum_{k >= i} cf[k] - i * cf[i-1] for i = 1..d, elevated[0] = sum of all
    suffix = torch.flip(torch.cumsum(torch.flip(cf, [1]), dim=1), [1])
    tail = torch.cat([suffix[:, 1:], torch.zeros(n, 1, device=cf.device)], dim=1)
    elevated = torch.empty(n, d + 1, device=cf.device, dtype=cf.dtype)
    elevated[:, 0] = suffix[:, 0]
    elevated[:, 1:] = tail - idx.float() * cf
    return elevated


def _nearest_remainder0(elevated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest remainder-0 lattice point (int64) and the rank of each coordinate's residual."""
    d1 = elevated.shape[1]
    v = elevated * (1.0 / d1)
    up = torch.ceil(v) * d1
    down = torch.floor(v) * d1
    rem0 = torch.where(up - elevated < elevated - down, up, down)
    total = torch.div(rem0.sum(dim=1, keepdim=True), d1, rounding_mode="trunc").long()
    # The reference ranks by pairwise comparisons (ties to the lower index): a stable
    # descending sort gives the same order.
    order = torch.sort(elevated - rem0, dim=1, descending=True, stable=True).indices
    positions = torch.arange(d1, device=elevated.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions) + total
    rem0 = rem0.long()
    wrap = (rank < 0).long() - (rank > d1 - 1).long()
    return rem0 + d1 * wrap, rank + d1 * wrap


def _barycentric(elevated: torch.Tensor, rem0: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(N, d+2) barycentric weights of the enclosing simplex's vertices (first d+1 used)."""
    n, d1 = elevated.shape
    delta = (elevated - rem0.float()) * (1.0 / d1)
    bary = torch.zeros(n, d1 + 1, device=elevated.device, dtype=elevated.dtype)
    bary.scatter_add_(1, d1 - 1 - rank, delta)
    bary.scatter_add_(1, d1 - rank, -delta)
    bary[:, 0] += 1.0 + bary[:, d1]
    return bary


def _packed_simplex_keys(rem0: torch.Tensor,
                         rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d+1) int64 keys of each pixel's simplex vertices and the radix that packs them.

    Vertex r has coordinates rem0[i] + r, minus d+1 where rank[i] > d - r (first d kept, the
    last is implied). They are packed with a mixed radix whose digit ranges also hold the blur
    neighbours (+-1 per coordinate, -+d on one), so neighbour keys are key +- a constant.
    """
    n, d1 = rem0.shape
    d = d1 - 1
    coords = rem0[:, :d]
    low = coords.min(dim=0).values - 2 * d1
    span = coords.max(dim=0).values - low + 2 * d1 + 1
    if float(torch.prod(span.double())) >= 2.0 ** 62:
        raise InputError("CRF lattice too large to index; use smaller images")
    radix = torch.ones(d, dtype=torch.long, device=rem0.device)
    if d > 1:
        radix[1:] = torch.cumprod(span[:-1], dim=0)
    base = ((coords - low) * radix).sum(dim=1, keepdim=True)
    remainder = torch.arange(d1, device=rem0.device)
    # coordinate i wraps (-d1) for every vertex r >= d1 - rank[i]; accumulate per r
    wraps = torch.zeros(n, d1 + 1, dtype=torch.long, device=rem0.device)
    wraps.scatter_add_(1, d1 - rank[:, :d], radix.expand(n, d))
    wrapped = torch.cumsum(wraps[:, :d1], dim=1)
    return base + remainder * radix.sum() - d1 * wrapped, radix


def _blur_neighbours(vertices: torch.Tensor, radix: torch.Tensor,
                     d: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per lattice axis j = 0..d: (vertices with a neighbour, their + and - neighbours).

    A missing neighbour is index M, the zero vertex. Vertices with no neighbour on an axis
    are left out: most of a bilateral lattice's vertices are isolated on some axes.
    """
    m = vertices.numel()
    all_plus = int(radix.sum())
    out = []
    for j in range(d + 1):
        # +1 on every coordinate but j, which goes -d (axis d changes only the implicit last)
        step = all_plus - (d + 1) * int(radix[j]) if j < d else all_plus
        plus = _lookup(vertices, vertices + step, m)
        minus = _lookup(vertices, vertices - step, m)
        rows = torch.nonzero((plus < m) | (minus < m)).reshape(-1)
        out.append((rows, plus[rows], minus[rows]))
    return out


def _lookup(sorted_keys: torch.Tensor, queries: torch.Tensor, missing: int) -> torch.Tensor:
    pos = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    found = sorted_keys[pos] == queries
    return torch.where(found, pos, torch.full_like(pos, missing))


def _stream_id(device: torch.device) -> int:
    """The current CUDA stream of ``device`` (0 elsewhere)."""
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


@functools.lru_cache(maxsize=4)
def _spatial_lattice(h: int, w: int, gamma: float, device: str, stream: int) -> PermutohedralLattice:
    """The spatial kernel's lattice depends only on the size: built once per size and device,
    and on CUDA per stream (each thread's stream reads only what it wrote, and an evicted entry
    is freed on the stream that used it, as the caching allocator assumes)."""
    spatial, _ = _features(torch.zeros(3, h, w, device=device), CrfParams(gamma=gamma))
    return PermutohedralLattice(spatial)


def _solve_torch(spatial: torch.Tensor, bilateral: torch.Tensor, logit_fg: torch.Tensor,
                 params: CrfParams, k_spatial: PermutohedralLattice | None = None) -> torch.Tensor:
    """Frank-Wolfe (l2, step 1) on the torch lattices; returns the (V,) bool fg decision."""
    k_spatial = k_spatial or PermutohedralLattice(spatial)
    k_bilateral = PermutohedralLattice(bilateral)
    two_logit = 2.0 * logit_fg
    # Only the fg channel is filtered: normalised filters preserve sums, so K(x_bg) = 1 - K(x_fg)
    w_s, w_b = params.spatial_weight, params.bilateral_weight
    fg = torch.sigmoid(two_logit)  # softmax of (-l, l)
    for _ in range(params.iterations):
        ks = k_spatial.normalized(fg)
        kb = k_bilateral.normalized(fg)
        fg = _sparsemax_fg(two_logit + w_s * (2.0 * ks - 1.0) + w_b * (2.0 * kb - 1.0))
    return fg > 0.5


# ---------------------------------------------------------------------------------------------
# pydensecrf backend


def _import_pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf import eigen
    except ImportError:
        return None
    return dcrf, eigen


def _solve_pydensecrf(spatial: torch.Tensor, bilateral: torch.Tensor, logit_fg: torch.Tensor,
                      params: CrfParams) -> torch.Tensor:
    """The same solver on pydensecrf2's lattice (CPU); returns the (V,) bool fg decision."""
    modules = _import_pydensecrf()
    if modules is None:
        raise _missing_pydensecrf()
    dcrf, eigen = modules
    spatial, bilateral = (f.t().contiguous().cpu().numpy() for f in (spatial, bilateral))
    logit = logit_fg.cpu().numpy().astype(np.float32)
    crf = dcrf.DenseCRF(logit.size, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(np.stack([logit, -logit])))  # energy = -logits
    for feats, weight in ((spatial, params.spatial_weight), (bilateral, params.bilateral_weight)):
        crf.addPairwiseEnergy(feats, compat=float(weight), kernel=dcrf.CONST_KERNEL,
                              normalization=dcrf.NORMALIZE_AFTER)
    q, _, tmp2 = crf.startInference()
    # a pre-sized scores matrix keeps its buffer through stepInference, so it can be read back
    scores = eigen.matrixXf(np.zeros((2, logit.size), dtype=np.float32))
    q_view, s_view = np.asarray(q), np.asarray(scores)
    for _ in range(params.iterations):
        crf.stepInference(q, scores, tmp2)  # scores = logits + sum_k w_k K_k q; q = softmax
        fg = np.clip((s_view[1] - s_view[0] + 1.0) * 0.5, 0.0, 1.0)
        q_view[1] = fg
        q_view[0] = 1.0 - fg
    return torch.from_numpy(q_view[1] > q_view[0])


# ---------------------------------------------------------------------------------------------
# validation


def _missing_pydensecrf() -> BackendError:
    return BackendError(f'CRF backend "pydensecrf" needs the pydensecrf2 package: {_INSTALL_HINT}')


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown CRF backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    _check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda" or _import_pydensecrf() is None:
            return "torch"
        return "pydensecrf"
    if backend == "pydensecrf" and _import_pydensecrf() is None:
        raise _missing_pydensecrf()
    return backend


def _check_inputs(image: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise InputError(f"CRF mask must be (S, S); got {tuple(mask.shape)}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1:] != mask.shape:
        raise InputError(f"CRF image must be (3, S, S) matching the mask {tuple(mask.shape)}; "
                         f"got {tuple(image.shape)}")
