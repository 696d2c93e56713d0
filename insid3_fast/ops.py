"""Typed wrappers of the native ops in ``insid3_fast._C`` and their fake (meta) kernels.

Each wrapper validates its inputs, makes them contiguous and calls ``torch.ops.insid3_fast.*``.
The fake kernels let the ops trace under ``torch.compile``. ``native_available()`` says whether
the extension was built and loaded; the pipeline falls back to the reference path otherwise.
"""

from __future__ import annotations

import torch

from .errors import BackendError, InputError

_LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # not built: the reference path still works
    _LOAD_ERROR = str(exc)


# The op library the wrappers call. Tests swap in the CUDA emulation's library
# (torch.ops.insid3_fast_emu, same schemas) with `use_library` to run the whole pipeline on the
# kernels of csrc/cuda executed on the CPU.
_LIBRARY = "insid3_fast"


def _lib():
    return getattr(torch.ops, _LIBRARY)


class use_library:
    """Context manager: route every wrapper to another library with the insid3_fast schemas.

    Test-only hook (e.g. ``with ops.use_library("insid3_fast_emu"):``); not thread-safe.
    """

    def __init__(self, name: str) -> None:
        self.name, self.previous = name, None

    def __enter__(self) -> "use_library":
        global _LIBRARY
        self.previous, _LIBRARY = _LIBRARY, self.name
        return self

    def __exit__(self, *exc: object) -> None:
        global _LIBRARY
        _LIBRARY = self.previous


def emulating_gpu() -> bool:
    """True while the wrappers call the tests' CPU emulation of the CUDA kernels (`use_library`).

    The pipeline then takes its GPU code path (no host synchronisation) on CPU tensors.
    """
    return _LIBRARY != "insid3_fast"


def native_available(device: torch.device | str | None = None) -> bool:
    """True when the native ops are loaded (and, for a CUDA device, built with CUDA kernels)."""
    if _LOAD_ERROR is not None:
        return False
    if device is not None and torch.device(device).type == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("insid3_fast::nn_vote", "CUDA")
    return True


def load_error() -> str | None:
    """Why the extension did not load, or None when it did."""
    return _LOAD_ERROR


def _require(device: torch.device) -> None:
    if not native_available(device):
        why = _LOAD_ERROR or f"it was built without {device.type.upper()} kernels"
        raise BackendError(
            f"insid3_fast native ops are unavailable on {device.type} ({why}); "
            "rebuild with `pip install --no-build-isolation -e .` or use backend='reference'"
        )


def nn_vote(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
            active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse nearest-neighbour voting.

    Args:
        queries: (Q, C) float32 target features (debiased, L2-normalised).
        keys: (S, M, C) float32 reference features per shot.
        key_mask: (S, M) bool reference masks at feature resolution.
        active: (Q,) bool, the queries to compute (default: all).

    Returns:
        votes (Q,) int32, the number of shots whose nearest reference patch lies inside that
        shot's mask; argmax (S, Q) int64, the nearest reference patch of each query per shot
        (exact argmax of the dot product, ties to the lowest index; -1 for inactive queries).
    """
    queries, keys, key_mask, active = _vote_inputs(queries, keys, key_mask, active)
    _require(queries.device)
    return _lib().nn_vote(queries, keys, key_mask, active)


def _vote_inputs(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                 active: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    if queries.dim() != 2 or keys.dim() != 3 or keys.shape[-1] != queries.shape[-1]:
        raise InputError(f"nn_vote expects queries (Q, C) and keys (S, M, C); got "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    if key_mask.shape != keys.shape[:2]:
        raise InputError(f"key_mask must be (S, M) = {tuple(keys.shape[:2])}, got {tuple(key_mask.shape)}")
    if active is None:
        active = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
    return (queries.float().contiguous(), keys.float().contiguous(),
            key_mask.bool().contiguous(), active.bool().contiguous())


def average_linkage_precomputed(dist: torch.Tensor, threshold: float) -> torch.Tensor:
    """Exact average-linkage clustering of a precomputed (N, N) distance matrix.

    Every merge whose linkage distance is < ``threshold`` is made (scikit-learn's
    ``distance_threshold`` cut). Returns (N,) int64 labels numbered by first appearance.
    """
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise InputError(f"dist must be a square (N, N) matrix, got {tuple(dist.shape)}")
    _require(dist.device)
    return _lib().average_linkage_precomputed(dist.float().contiguous(), float(threshold))


def average_linkage(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """Exact average-linkage clustering of L2-normalised features (N, C), cosine distance.

    Same partition as scikit-learn's ``AgglomerativeClustering(metric='precomputed',
    linkage='average', distance_threshold=threshold)`` on ``1 - clamp(X Xᵀ, -1, 1)``.
    Returns (N,) int64 labels numbered by first appearance.
    """
    features = _linkage_features(features)
    _require(features.device)
    return _lib().average_linkage(features, float(threshold))


def _linkage_features(features: torch.Tensor) -> torch.Tensor:
    if features.dim() != 2:
        raise InputError(f"features must be (N, C), got {tuple(features.shape)}")
    features = features.float()
    if not (features.is_contiguous() or features.T.is_contiguous()):
        features = features.contiguous()  # (N, C) rows, or the transposed view of a (C, N) map
    return features


def cluster_and_vote(features: torch.Tensor, threshold: float, queries: torch.Tensor, keys: torch.Tensor,
                     key_mask: torch.Tensor, active: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``average_linkage(features, threshold)`` and ``nn_vote(queries, keys, key_mask, active)`` at once.

    Returns (labels, votes, argmax), equal to the two ops' results. On the CPU the sequential
    NN-chain of the clustering runs on one core while the other cores vote, so the pair costs
    less than the two calls in a row; on CUDA it runs them one after the other.
    """
    features = _linkage_features(features)
    queries, keys, key_mask, active = _vote_inputs(queries, keys, key_mask, active)
    _require(features.device)
    return _lib().cluster_and_vote(features, float(threshold), queries, keys, key_mask, active)


def grid_average_linkage(features: torch.Tensor, h: int, w: int, connectivity: int,
                         threshold: float) -> torch.Tensor:
    """Connectivity-constrained average linkage on an h x w grid of features (h*w, C).

    Only clusters that touch (4- or 8-neighbourhood) merge; the linkage is the true average
    cosine distance between all their members. Returns (h*w,) int64 labels.
    """
    if features.dim() != 2 or features.shape[0] != h * w:
        raise InputError(f"features must be (h*w, C) = ({h * w}, C), got {tuple(features.shape)}")
    if connectivity not in (4, 8):
        raise InputError(f"connectivity must be 4 or 8, got {connectivity}")
    _require(features.device)
    return _lib().grid_average_linkage(
        features.float().contiguous(), int(h), int(w), int(connectivity), float(threshold))


def register_fakes(library: str) -> None:
    """Register the fake (meta) kernels of the insid3_fast schemas in ``library``."""

    @torch.library.register_fake(f"{library}::nn_vote")
    def _nn_vote_fake(queries, keys, key_mask, active):
        q = queries.shape[0]
        return (queries.new_empty((q,), dtype=torch.int32),
                queries.new_empty((keys.shape[0], q), dtype=torch.int64))

    @torch.library.register_fake(f"{library}::average_linkage_precomputed")
    def _alp_fake(dist, threshold):
        return dist.new_empty((dist.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(f"{library}::average_linkage")
    def _al_fake(features, threshold):
        return features.new_empty((features.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(f"{library}::cluster_and_vote")
    def _cav_fake(features, threshold, queries, keys, key_mask, active):
        return (features.new_empty((features.shape[0],), dtype=torch.int64),
                *_nn_vote_fake(queries, keys, key_mask, active))

    @torch.library.register_fake(f"{library}::grid_average_linkage")
    def _gal_fake(features, h, w, connectivity, threshold):
        return features.new_empty((features.shape[0],), dtype=torch.int64)


if _LOAD_ERROR is None:
    register_fakes("insid3_fast")
