"""Typed wrappers of the native ops in ``insid3_fast._C`` and their fake (meta) kernels.

Each wrapper validates its inputs, makes them contiguous and calls ``torch.ops.insid3_fast.*``.
The fake kernels let the ops trace under ``torch.compile``. ``native_available()`` says whether
the extension was built and loaded. Every wrapper takes ``kernels=``: ``"native"`` (the
compiled kernels; ``BackendError`` when they are not built) or ``"reference"`` (the plain
torch / scikit-learn kernels of ``insid3_fast.torch_kernels``, the same results; they check the
wrappers' rules but not the data-dependent ones below, which the compiled kernels check):
the pipeline runs the same steps on either.

Input rule, the same in these wrappers and in the kernels of every backend (the wrappers raise
:class:`InputError`, the raw ``torch.ops.insid3_fast.*`` a ``RuntimeError``, with the same
message, which starts with the op's name):

* tensors must be real; features, queries, keys and distances must be finite (no NaN or inf);
* dot products must not be able to overflow float32: ``max|queries|``, ``max|keys|`` and
  ``C * max|queries| * max|keys|`` (``max|features|`` and ``C * max|features|^2`` for the
  linkage ops) must each be below ``2**100`` (about 1.27e30); L2-normalised inputs are far below;
* sizes are Python ints or numpy integers (not bools or floats) in int64, and every product of
  sizes must fit int64;
* ``threshold`` is a real number other than NaN (``inf`` merges everything, ``-inf`` nothing);
  ``connectivity`` is 4 or 8.

An allocation failure inside a kernel raises ``torch.OutOfMemoryError`` (a ``RuntimeError``).
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
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


_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1


def _tensor(x: object, op: str, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise InputError(f"{op}: {name} must be real, got {x.dtype}")
    return x


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise InputError(f"{op}: all tensors must be on one device, got {where}")


def _size_arg(x: object, op: str, name: str) -> int:
    """A size: a Python int or numpy integer (not a bool, not a float) in [0, 2^63 - 1]."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise InputError(f"{op}: {name} must be an int, got {type(x).__name__} {x!r}")
    v = operator.index(x)
    if not 0 <= v <= _INT64_MAX:
        raise InputError(f"{op}: {name} must be in [0, 2^63 - 1], got {v}")
    return v


def _checked_mul(a: int, b: int, op: str, what: str) -> int:
    if a * b > _INT64_MAX:
        raise InputError(f"{op}: {what} ({a} * {b}) overflows int64")
    return a * b


def _threshold(t: object, op: str) -> float:
    if isinstance(t, torch.Tensor) and t.numel() == 1 and not (t.is_complex() or t.dtype == torch.bool):
        t = t.item()
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (numbers.Real, np.floating, np.integer)):
        raise InputError(f"{op}: threshold must be a real number, got {type(t).__name__} {t!r}")
    try:
        v = float(t)
    except OverflowError:  # an int beyond float range: as good as infinite
        v = math.inf if t > 0 else -math.inf
    if math.isnan(v):
        raise InputError(f"{op}: threshold must not be NaN")
    return v


_OPS = ("nn_vote", "average_linkage_precomputed", "average_linkage", "cluster_and_vote", "grid_average_linkage",
        "aggregate_clusters", "bf16x6_mm")


def _call(op: str, *args: object):
    """Run ``op`` of the current library; the kernels' input errors become :class:`InputError`.

    The data-dependent rules (finite values, dot magnitudes; csrc/common/input_rules.h) are
    checked once, by the kernels, with the same message on every backend: here they would cost
    a second pass, and on a GPU a host synchronisation. A kernel error names its op first.
    """
    try:
        return getattr(_lib(), op)(*args)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        message = str(exc).split("\n")[0]
        if not message.startswith(tuple(f"{name}:" for name in _OPS)):
            raise  # not an input error of ours (e.g. a CUDA runtime failure)
        raise InputError(message) from None


#: Which kernels an op runs: the compiled ones of the extension, or the plain torch /
#: scikit-learn ones of ``insid3_fast.torch_kernels`` (same results; for machines without the
#: extension, and the readable baseline of the benchmarks).
KERNELS = ("native", "reference")


def _run(op: str, kernels: str, device: torch.device, *args: object):
    """Run ``op`` on validated inputs with the ``kernels`` asked for."""
    if kernels == "reference":
        from . import torch_kernels

        return getattr(torch_kernels, op)(*args)
    if kernels != "native":
        raise InputError(f"{op}: kernels must be one of {KERNELS}, got {kernels!r}")
    _require(device)
    return _call(op, *args)


def _condensed_size(n: int, op: str) -> None:
    """The N (N - 1) / 2 float64 distances of the linkage ops must be addressable."""
    if n > 1:
        pairs = _checked_mul(n, n - 1, op, "the number of pairs N * (N - 1)") // 2
        _checked_mul(pairs, 8, op, "the size in bytes of the N * (N - 1) / 2 distances")


def nn_vote(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
            active: torch.Tensor | None = None, *, kernels: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse nearest-neighbour voting.

    Args:
        queries: (Q, C) float32 target features (debiased, L2-normalised).
        keys: (S, M, C) float32 reference features per shot.
        key_mask: (S, M) bool reference masks at feature resolution.
        active: (Q,) bool, the queries to compute (default: all).

    Returns:
        votes (Q,) int32, the number of shots whose nearest reference patch lies inside that
        shot's mask; argmax (S, Q) int64, the nearest reference patch of each query per shot
        (-1 for inactive queries): the argmax of the exact real-number dot products of the
        float32 values (no rounding: two keys whose dots are equal in exact arithmetic tie, and
        ties go to the lowest index), the same on every backend.

    Raises:
        InputError: wrong types or shapes, a shot without keys (M = 0 with S > 0), NaN or inf
            in queries or keys, or ``max|queries|``, ``max|keys|`` or
            ``C * max|queries| * max|keys|`` at least ``2**100`` (dot products could overflow).
    """
    queries, keys, key_mask, active = _vote_inputs(queries, keys, key_mask, active)
    return _run("nn_vote", kernels, queries.device, queries, keys, key_mask, active)


def _vote_inputs(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                 active: torch.Tensor | None, op: str = "nn_vote") -> tuple[torch.Tensor, ...]:
    queries, keys = _tensor(queries, op, "queries"), _tensor(keys, op, "keys")
    key_mask = _tensor(key_mask, op, "key_mask")
    if queries.dim() != 2 or keys.dim() != 3 or keys.shape[-1] != queries.shape[-1]:
        raise InputError(f"{op} expects queries (Q, C) and keys (S, M, C); got "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    if key_mask.shape != keys.shape[:2]:
        raise InputError(f"key_mask must be (S, M) = {tuple(keys.shape[:2])}, got {tuple(key_mask.shape)}")
    if active is None:
        active = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
    active = _tensor(active, op, "active")
    if active.shape != queries.shape[:1]:
        raise InputError(f"active must be (Q,) = {tuple(queries.shape[:1])}, got {tuple(active.shape)}")
    _same_device(op, queries=queries, keys=keys, key_mask=key_mask, active=active)
    (S, M, _), Q = keys.shape, queries.shape[0]
    if M == 0 and S > 0:
        raise InputError(f"{op}: every shot needs at least one key (M = 0)")
    if S > _INT32_MAX:
        raise InputError(f"{op}: at most 2^31 - 1 shots (votes are int32), got S = {S}")
    _checked_mul(S, Q, op, "the argmax size S * Q")
    queries, keys = queries.float().contiguous(), keys.float().contiguous()
    return queries, keys, key_mask.bool().contiguous(), active.bool().contiguous()


def average_linkage_precomputed(dist: torch.Tensor, threshold: float, *, kernels: str = "native") -> torch.Tensor:
    """Exact average-linkage clustering of a precomputed (N, N) distance matrix.

    Every merge whose linkage distance is < ``threshold`` is made (scikit-learn's
    ``distance_threshold`` cut). Returns (N,) int64 labels numbered by first appearance.

    Raises:
        InputError: ``dist`` not a real square matrix, NaN or inf anywhere in it (both
            triangles, as scikit-learn checks), or a NaN ``threshold``.
    """
    op = "average_linkage_precomputed"
    dist = _tensor(dist, op, "dist")
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise InputError(f"dist must be a square (N, N) matrix, got {tuple(dist.shape)}")
    threshold = _threshold(threshold, op)
    _condensed_size(dist.shape[0], op)
    dist = dist.float().contiguous()
    return _run(op, kernels, dist.device, dist, float(threshold))


def average_linkage(features: torch.Tensor, threshold: float, *, kernels: str = "native",
                    bf16x6: bool = False) -> torch.Tensor:
    """Exact average-linkage clustering of L2-normalised features (N, C), cosine distance.

    Same partition as scikit-learn's ``AgglomerativeClustering(metric='precomputed',
    linkage='average', distance_threshold=threshold)`` on ``1 - clamp(X Xᵀ, -1, 1)``.
    Returns (N,) int64 labels numbered by first appearance. ``bf16x6``: the Gram matrix ``X Xᵀ``
    as the split-bf16 product of :func:`bf16x6_mm` (tensor cores on a GPU; the same operands
    on the CPU), the rest unchanged.

    Raises:
        InputError: ``features`` not a real (N, C) tensor, NaN or inf in it, ``max|features|``
            or ``C * max|features|^2`` at least ``2**100`` (dot products could overflow), or a
            NaN ``threshold``.
    """
    threshold = _threshold(threshold, "average_linkage")
    features = _linkage_features(features)
    return _run("average_linkage", kernels, features.device, features, float(threshold), bool(bf16x6))


def _linkage_features(features: torch.Tensor, op: str = "average_linkage") -> torch.Tensor:
    features = _tensor(features, op, "features")
    if features.dim() != 2:
        raise InputError(f"features must be (N, C), got {tuple(features.shape)}")
    _condensed_size(features.shape[0], op)
    features = features.float()
    if not (features.is_contiguous() or features.T.is_contiguous()):
        features = features.contiguous()  # (N, C) rows, or the transposed view of a (C, N) map
    return features


def cluster_and_vote(features: torch.Tensor, threshold: float, queries: torch.Tensor, keys: torch.Tensor,
                     key_mask: torch.Tensor, active: torch.Tensor | None = None, *, kernels: str = "native",
                     bf16x6: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``average_linkage(features, threshold, bf16x6=bf16x6)`` and ``nn_vote(queries, keys, key_mask, active)`` at once.

    Returns (labels, votes, argmax), equal to the two ops' results. On the CPU the sequential
    NN-chain of the clustering runs on one core while the other cores vote, so the pair costs
    less than the two calls in a row; on CUDA it runs them one after the other.

    Raises:
        InputError: anything :func:`average_linkage` or :func:`nn_vote` rejects, or tensors on
            different devices.
    """
    op = "cluster_and_vote"
    threshold = _threshold(threshold, op)
    features = _linkage_features(features, op)
    queries, keys, key_mask, active = _vote_inputs(queries, keys, key_mask, active, op)
    _same_device(op, features=features, queries=queries)
    return _run(op, kernels, features.device, features, float(threshold), queries, keys, key_mask, active,
                bool(bf16x6))


def bf16x6_mm(a: torch.Tensor, b: torch.Tensor, *, kernels: str = "native") -> torch.Tensor:
    """``a @ b`` of float32 matrices as the split-bf16 product (``csrc/common/bf16x6.h``).

    Each float32 value is split into three bf16 values (``x = p0 + p1 + p2``, exact up to about
    2^-25 relative) and the six products ``p_i(a) p_j(b)`` with ``i + j <= 2`` are one GEMM of
    inner size 6K: on a GPU in bf16 on the tensor cores with float32 accumulation, on the CPU in
    float32 on the same (bf16-exact) operands. The error is about a float32 GEMM's, not a bf16
    one's; the results equal a float32 product's only up to rounding. The CPU kernel and the
    emulated CUDA kernel give the same bits. No host read: a row of ``a`` or a column of ``b``
    holding NaN or inf gives a NaN row or column.

    Args:
        a: (M, K) and b: (K, P), floating point (taken as float32), any strides, one device.

    Example:
        >>> y = bf16x6_mm(torch.randn(4, 8), torch.randn(8, 3))  # ~ a @ b, within float32 rounding

    Raises:
        InputError: not matrices, inner sizes that differ, sizes whose products overflow int64.
    """
    op = "bf16x6_mm"
    a, b = _tensor(a, op, "a"), _tensor(b, op, "b")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise InputError(f"{op} expects a (M, K) and b (K, P); got {tuple(a.shape)} and {tuple(b.shape)}")
    _same_device(op, a=a, b=b)
    (M, K), P = a.shape, b.shape[1]
    _checked_mul(_checked_mul(max(M, P), K, op, "the operands' size max(M, P) * K"), 6 * 4, op,
                 "the operands' size in bytes")
    _checked_mul(M, P, op, "the output size M * P")
    return _run(op, kernels, a.device, a.float(), b.float())


def grid_average_linkage(features: torch.Tensor, h: int, w: int, connectivity: int,
                         threshold: float, *, kernels: str = "native") -> torch.Tensor:
    """Connectivity-constrained average linkage on an h x w grid of features (h*w, C).

    Only clusters that touch (4- or 8-neighbourhood) merge; the linkage is the true average
    cosine distance between all their members. Returns (h*w,) int64 labels.

    ``h``, ``w`` and ``connectivity`` are Python ints or numpy integers. Any finite float32
    features are handled exactly as specified (sums and dots in float64, which float32 values
    cannot overflow).

    Raises:
        InputError: ``features`` not a real (h*w, C) tensor, ``h * w`` beyond int64, NaN or
            inf in ``features``, ``connectivity`` other than 4 or 8, or a NaN ``threshold``.
    """
    op = "grid_average_linkage"
    features = _tensor(features, op, "features")
    h, w = _size_arg(h, op, "h"), _size_arg(w, op, "w")
    n = _checked_mul(h, w, op, "the grid size h * w")
    if features.dim() != 2 or features.shape[0] != n:
        raise InputError(f"features must be (h*w, C) = ({n}, C), got {tuple(features.shape)}")
    if isinstance(connectivity, (bool, np.bool_)) or not isinstance(connectivity, (numbers.Integral, np.integer)) \
            or connectivity not in (4, 8):
        raise InputError(f"connectivity must be 4 or 8, got {connectivity!r}")
    threshold = _threshold(threshold, op)
    features = features.float().contiguous()
    return _run(op, kernels, features.device, features, int(h), int(w), int(connectivity), float(threshold))


# D + C at most this for the CUDA kernel of aggregate_clusters (512 threads x 32 dims each, in
# registers: csrc/cuda/aggregate_clusters.cu); wider features take the torch path.
AGGREGATE_MAX_WIDTH = 512 * 32


def aggregate_clusters(labels: torch.Tensor, candidates: torch.Tensor, feats_deb: torch.Tensor,
                       feats: torch.Tensor, sim: torch.Tensor, prototype: torch.Tensor, merge_threshold: float,
                       *, kernels: str = "native") -> torch.Tensor:
    """Seed selection and aggregation of clusters (SPEC step 7): the (N,) bool patch mask.

    Per cluster: area, candidate count and similarity sum; prototypes ``normalize(mean
    feats_deb)`` and ``normalize(mean feats)``. The seed is the cluster with a candidate whose
    debiased prototype is most similar to ``prototype`` (``torch.argmax``'s rule: ties to the
    lowest label); a cluster joins the mask when ``cross * intra * weight > merge_threshold``
    (``cross`` its mean similarity, ``intra`` the cosine of its prototype with the seed's,
    ``weight`` its candidate fraction, 1 for the seed). No candidate: the empty mask.

    On a GPU ``kernels="native"`` is three launches and no host read under graph capture (one
    read otherwise, the labels' range); on the CPU it runs ATen's ops, the reference's.

    Args:
        labels: (N,) integer cluster labels in [0, N) (e.g. ``average_linkage``'s).
        candidates: (N,) bool candidate patches.
        feats_deb: (N, D) debiased normalised features; feats: (N, C) normalised features (any
            strides, e.g. the (N, C) view of a (C, h, w) map); sim: (N,) similarity to the
            prototype; prototype: (D,). Floating point, taken as float32.
        merge_threshold: a real number (alpha).

    Example:
        >>> mask = aggregate_clusters(labels, fwd & (votes >= 1), queries, feats, queries @ p, p, 0.2)

    Raises:
        InputError: wrong types or shapes, labels outside [0, N), or a NaN ``merge_threshold``.
    """
    op = "aggregate_clusters"
    labels, candidates = _tensor(labels, op, "labels"), _tensor(candidates, op, "candidates")
    feats_deb, feats = _tensor(feats_deb, op, "feats_deb"), _tensor(feats, op, "feats")
    sim, prototype = _tensor(sim, op, "sim"), _tensor(prototype, op, "prototype")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"{op}: labels must be a 1-d integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    n = labels.shape[0]
    if feats_deb.dim() != 2 or feats.dim() != 2 or feats_deb.shape[0] != n or feats.shape[0] != n:
        raise InputError(f"{op}: feats_deb and feats must be (N, D) and (N, C) with N = {n}, got "
                         f"{tuple(feats_deb.shape)} and {tuple(feats.shape)}")
    if candidates.shape != (n,) or sim.shape != (n,):
        raise InputError(f"{op}: candidates and sim must be (N,) = ({n},), got {tuple(candidates.shape)} "
                         f"and {tuple(sim.shape)}")
    if prototype.shape != feats_deb.shape[1:]:
        raise InputError(f"{op}: prototype must be (D,) = ({feats_deb.shape[1]},), got {tuple(prototype.shape)}")
    _same_device(op, labels=labels, candidates=candidates, feats_deb=feats_deb, feats=feats, sim=sim,
                 prototype=prototype)
    threshold = _threshold(merge_threshold, op)
    _checked_mul(n, max(feats.shape[1], 1), op, "the prototypes N * C")
    labels, candidates = labels.long().contiguous(), candidates.bool().contiguous()
    feats_deb, sim, prototype = feats_deb.float().contiguous(), sim.float().contiguous(), prototype.float().contiguous()
    feats = feats.float()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=labels.device)
    host = labels.device.type == "cpu" and not emulating_gpu()
    clusters = None
    if host:  # free to read here; on a GPU the kernel checks (the reference would index out of range)
        lo, hi = (int(v) for v in torch.aminmax(labels))
        clusters = hi + 1
        if lo < 0 or hi >= n:
            raise InputError(f"{op}: labels must lie in [0, N) with N = {n}; got values in [{lo}, {hi}]")
    wide = feats_deb.shape[1] + feats.shape[1] > AGGREGATE_MAX_WIDTH  # beyond the CUDA kernel's registers
    if kernels == "reference" or (kernels == "native" and (host or wide)):
        from . import torch_kernels

        return torch_kernels.aggregate_clusters(labels, candidates, feats_deb, feats, sim, prototype, threshold,
                                                clusters=clusters)
    return _run(op, kernels, labels.device, labels, candidates, feats_deb, feats, sim, prototype, threshold)


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
    def _al_fake(features, threshold, bf16x6=False):
        return features.new_empty((features.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(f"{library}::bf16x6_mm")
    def _bf16x6_mm_fake(a, b):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)

    @torch.library.register_fake(f"{library}::cluster_and_vote")
    def _cav_fake(features, threshold, queries, keys, key_mask, active, bf16x6=False):
        return (features.new_empty((features.shape[0],), dtype=torch.int64),
                *_nn_vote_fake(queries, keys, key_mask, active))

    @torch.library.register_fake(f"{library}::grid_average_linkage")
    def _gal_fake(features, h, w, connectivity, threshold):
        return features.new_empty((features.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(f"{library}::aggregate_clusters")
    def _agg_fake(labels, candidates, feats_deb, feats, sim, prototype, merge_threshold):
        return labels.new_empty((labels.shape[0],), dtype=torch.bool)


if _LOAD_ERROR is None:
    register_fakes("insid3_fast")
