"""The stateless core: encode a reference once, segment any number of targets against it.

``Segmenter`` owns the backbone, the debiasing projector and the configuration. A reference
(one or more shots) is encoded once into an ``EncodedReference``; each target then costs one
backbone pass (batched over targets) plus the post-backbone steps, on the native ops
(``backend="native"``) or on the readable reference path (``backend="reference"``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from . import ops, reference
from .debias import complement_basis, orthogonal_projector, positional_basis
from .errors import BackendError, InputError
from .inputs import check_image_size_multiple, check_thresholds, resolve_svd_components
from .refine import REFINERS, refine_with_crf, upsample_mask

log = logging.getLogger("insid3_fast")
BACKENDS = ("auto", "native", "reference")
PRECISIONS = ("fp32", "bf16")
_announced: set[str] = set()


@dataclass
class EncodedReference:
    """A reference (S shots) ready to be matched against targets.

    features: (S, C, h, w) L2-normalised backbone features; masks: (S, size, size) bool;
    masks_down: (S, h, w) bool masks at feature resolution; keys: (S, h*w, D) the debiased
    features in the D = C - r coordinates of the complement of the positional subspace
    (``Segmenter.debiased_coordinates``), the layout of the native nearest-neighbour op;
    prototype: (D,) the normalised reference prototype in the same coordinates.
    """

    features: torch.Tensor
    masks: torch.Tensor
    masks_down: torch.Tensor
    prototype: torch.Tensor
    keys: torch.Tensor
    # False when the reference's features hold NaN or inf (e.g. a NaN pixel in an image
    # tensor): the published code then matches nothing and returns an empty mask, and so do we
    # (the native ops reject non-finite input, so they are not called).
    finite: bool = True

    @property
    def shots(self) -> int:
        """Number of reference shots."""
        return int(self.features.shape[0])


def resolve_backend(backend: str, device: torch.device) -> str:
    """``native`` or ``reference`` for ``backend`` on ``device`` (``auto``: native when built)."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "native" if ops.native_available(device) else "reference"
        if backend == "reference" and device.type not in _announced:
            _announced.add(device.type)
            log.warning("insid3_fast: native ops unavailable on %s (%s); using the slower reference "
                        "path. Build them with `pip install --no-build-isolation -e .`.", device.type,
                        ops.load_error() or "built without these kernels")
    elif backend == "native" and not ops.native_available(device):
        raise BackendError(f"backend='native' requested but the native ops are unavailable on "
                           f"{device.type} ({ops.load_error() or 'built without these kernels'}); "
                           "rebuild with `pip install --no-build-isolation -e .` or use backend='reference'")
    return backend


class Segmenter:
    """INSID3 without state: the backbone, the debiasing projector and the thresholds.

    Args:
        encoder: a module with Meta's ``get_intermediate_layers(x, n, reshape, norm)``.
        image_size: side of the square the images are resized to (multiple of 16).
        svd_components: rank of the positional subspace; None: ``inputs.default_svd_components``
            (500, or C // 2 when C <= 500); a rank >= C falls back to that rule with a warning.
        tau: clustering similarity threshold in [0, 1] (cut at distance 1 - tau).
        merge_threshold: finite score above which a cluster joins the mask (alpha).
        mask_refiner: ``bilinear`` or ``crf``.
        connectivity: None (the published clustering) or 4 / 8 (grid-constrained merging).
        backend: ``auto``, ``native`` or ``reference``.
        device: where everything runs.
        noise: ``constant`` (published) or ``gaussian`` input for the positional SVD.
        cache_key: identifies the weights for the on-disk positional-basis cache (None: no cache).
        precision: ``fp32`` (the parity mode) or ``bf16`` (autocast for the backbone pass only;
            everything after it stays float32).
        compile: compile the backbone pass with ``torch.compile``: True for the default mode, or
            a mode name such as ``"reduce-overhead"`` (CUDA graphs for fixed shapes).
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int = 1024, svd_components: int | None = 500,
                 tau: float = 0.6, merge_threshold: float = 0.2, mask_refiner: str = "bilinear",
                 connectivity: int | None = None, backend: str = "auto",
                 device: torch.device | str = "cpu", noise: str = "constant",
                 cache_key: str | None = None, cache_dir: str | None = None,
                 precision: str = "fp32", compile: bool | str = False) -> None:
        image_size = check_image_size_multiple(image_size)
        tau, merge_threshold = check_thresholds(tau, merge_threshold)
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if mask_refiner not in REFINERS:
            raise InputError(f"mask_refiner must be one of {REFINERS}, got {mask_refiner!r}")
        if connectivity not in (None, 4, 8):
            raise InputError(f"connectivity must be None, 4 or 8, got {connectivity!r}")
        embed_dim = getattr(encoder, "embed_dim", None)
        svd_components = resolve_svd_components(svd_components, embed_dim if isinstance(embed_dim, int) else None)
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.image_size = image_size
        self.svd_components = svd_components
        self.tau = tau
        self.merge_threshold = merge_threshold
        self.mask_refiner = mask_refiner
        self.connectivity = connectivity
        self.backend = resolve_backend(backend, self.device)
        self.precision = precision
        self._backbone = self._backbone_pass
        if compile:
            mode = compile if isinstance(compile, str) else None
            self._backbone = torch.compile(self._backbone_pass, dynamic=False, mode=mode)
        self.basis = positional_basis(self.encoder, image_size, svd_components, noise, self.device,
                                      cache_key=cache_key, cache_dir=cache_dir)
        if self.basis.shape[1] >= self.basis.shape[0]:  # an encoder without ``embed_dim``
            self.svd_components = resolve_svd_components(svd_components, self.basis.shape[0])
            self.basis = self.basis[:, :self.svd_components].contiguous()
        self.projector = orthogonal_projector(self.basis)
        self.complement = complement_basis(self.basis)

    # ---- backbone ----
    def _backbone_pass(self, images: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                fmap = self.encoder.get_intermediate_layers(images, n=1, reshape=True, norm=True)[0]
        else:
            fmap = self.encoder.get_intermediate_layers(images, n=1, reshape=True, norm=True)[0]
        return F.normalize(fmap.float(), p=2, dim=1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 features (B, C, h, w) of normalised images (B, 3, size, size), one batch."""
        return self._backbone(images.to(self.device, non_blocking=True))

    # ---- reference ----
    @torch.no_grad()
    def encode_reference(self, images: torch.Tensor, masks: torch.Tensor,
                         features: torch.Tensor | None = None) -> EncodedReference:
        """Encode S shots: images (S, 3, size, size) normalised, masks (S, size, size) bool.

        ``features`` (S, C, h, w), when given, skips the backbone pass.
        """
        masks = masks.to(self.device).bool()
        if not bool(masks.flatten(1).any(dim=1).all()):
            raise InputError("a reference mask is empty (no foreground pixel); every shot needs a mask")
        feats = self.features(images) if features is None else features.to(self.device)
        return self.encode_reference_features(feats, masks)

    def debiased_coordinates(self, feats: torch.Tensor) -> torch.Tensor:
        """Debiased features (T, h*w, D) of normalised features (T, C, h, w), in complement coordinates.

        ``normalize(Qᵀ x)``: the same inner products as the published ``normalize(P x)``, in
        D = C - r dimensions, so matching and aggregation cost about half.
        """
        T, C, h, w = feats.shape
        y = torch.matmul(feats.reshape(T, C, h * w).transpose(1, 2), self.complement)
        return F.normalize(y, p=2, dim=2)

    def encode_reference_features(self, feats: torch.Tensor, masks: torch.Tensor) -> EncodedReference:
        """Encode S shots from their normalised features (S, C, h, w) and masks (S, size, size)."""
        S, C, h, w = feats.shape
        keys = self.debiased_coordinates(feats)
        masks_down = torch.stack([reference.downsample_mask(masks[s], h, w) for s in range(S)])
        shot_protos = [keys[s][masks_down[s].reshape(-1)].mean(dim=0) for s in range(S)]
        prototype = F.normalize(torch.stack(shot_protos).mean(dim=0), p=2, dim=0)
        # One host read per reference (not per target): is everything the targets use finite?
        finite = bool(torch.isfinite(keys).all() & torch.isfinite(prototype).all())
        return EncodedReference(feats, masks, masks_down, prototype, keys, finite)

    # ---- target ----
    @torch.no_grad()
    def segment_patches(self, ref: EncodedReference, tgt_feat: torch.Tensor) -> torch.Tensor:
        """The (h, w) bool patch mask of one target given its normalised features (C, h, w)."""
        if self.backend == "reference":
            if self.connectivity is not None:
                return reference.segment_patches_grid(
                    ref.features, ref.masks, tgt_feat, self.projector, self.tau,
                    self.merge_threshold, self.connectivity)
            return reference.segment_patches(ref.features, ref.masks, tgt_feat, self.projector,
                                             self.tau, self.merge_threshold)
        return self._segment_patches_native(ref, tgt_feat)

    def _segment_patches_native(self, ref: EncodedReference, tgt_feat: torch.Tensor) -> torch.Tensor:
        # Written without host synchronisation: fallbacks are selected with torch.where.
        C, h, w = tgt_feat.shape
        if not ref.finite:  # the published result: NaN similarities match nothing
            return torch.zeros(h, w, dtype=torch.bool, device=tgt_feat.device)
        N = h * w
        queries = self.debiased_coordinates(tgt_feat[None])[0]
        sim = queries @ ref.prototype
        fwd = sim > 0
        fwd = torch.where(fwd.any(), fwd, sim > torch.quantile(sim, 0.9))

        key_mask = ref.masks_down.reshape(ref.shots, N)
        feats = tgt_feat.reshape(C, N).T  # (N, C) view; the ops accept it without a copy
        if self.connectivity is None:
            # One op, so that on the CPU the sequential NN-chain runs beside the voting GEMMs.
            labels, votes, _ = ops.cluster_and_vote(feats, 1.0 - self.tau, queries, ref.keys, key_mask, fwd)
        else:
            votes, _ = ops.nn_vote(queries, ref.keys, key_mask, fwd)
            labels = ops.grid_average_linkage(feats, h, w, self.connectivity, 1.0 - self.tau)
        candidates = fwd & (votes >= math.ceil(ref.shots / 2))
        mask = aggregate_clusters(labels, candidates, queries, feats, sim, ref.prototype, self.merge_threshold)
        return mask.reshape(h, w)

    def finalize(self, patch_mask: torch.Tensor, image: torch.Tensor | None,
                 out_size: tuple[int, int] | None) -> torch.Tensor:
        """Upsample a patch mask to the image size, refine (CRF), resize to ``out_size``."""
        mask = upsample_mask(patch_mask, self.image_size, self.image_size)
        if self.mask_refiner == "crf":
            if image is None:
                raise InputError("CRF refinement needs the target image")
            mask = refine_with_crf(image.to(mask.device), mask)
        if out_size is not None:
            mask = upsample_mask(mask, *out_size)
        return mask

    @torch.no_grad()
    def segment(self, ref: EncodedReference, images: torch.Tensor | None,
                out_sizes: Sequence[tuple[int, int] | None] | None = None,
                features: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Segment B targets (B, 3, size, size) in one backbone pass; a bool mask per target.

        ``out_sizes[b]`` is the size to resize each mask to (None: size x size). With
        ``features`` (B, C, h, w) given, ``images`` may be None (no backbone pass; no CRF).
        """
        feats = self.features(images) if features is None else features.to(self.device)
        if out_sizes is None:
            out_sizes = [None] * feats.shape[0]
        return [self.finalize(self.segment_patches(ref, feats[b]),
                              images[b:b + 1] if images is not None else None, out_sizes[b])
                for b in range(feats.shape[0])]


def aggregate_clusters(labels: torch.Tensor, candidates: torch.Tensor, feats_deb: torch.Tensor,
                       feats: torch.Tensor, sim: torch.Tensor, prototype: torch.Tensor,
                       merge_threshold: float) -> torch.Tensor:
    """Seed selection and aggregation (SPEC step 7) with per-cluster reductions, no Python loop.

    Args:
        labels: (N,) int64 cluster labels in [0, N).
        candidates: (N,) bool candidate patches.
        feats_deb: (N, D) debiased normalised target features (any coordinates).
        feats: (N, C) original normalised target features.
        sim: (N,) patch similarity to the prototype, <t_deb, p>.
        prototype: (D,) reference prototype, in the coordinates of ``feats_deb``.

    Returns:
        (N,) bool patch mask (all False when there is no candidate).
    """
    N = labels.shape[0]
    dev = labels.device
    if dev.type == "cpu" and not ops.emulating_gpu():
        # On the CPU the number of clusters is free to read and the sums are sequential.
        K, acc = int(labels.max()) + 1, torch.float32
    else:
        # On a GPU (or the tests' emulation of its kernels): no host sync (K = N bounds the
        # labels) and float64 sums, so that the order of the atomic additions practically never
        # changes the float32 results.
        K, acc = N, torch.float64

    def per_cluster(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((K,) + values.shape[1:], dtype=acc, device=dev)
        return out.index_add_(0, labels, values.to(acc))

    area = per_cluster(torch.ones_like(sim))
    safe_area = area.clamp(min=1.0)
    n_match = per_cluster(candidates.to(sim.dtype))
    protos_deb = F.normalize((per_cluster(feats_deb) / safe_area[:, None]).float(), p=2, dim=1)
    protos = F.normalize((per_cluster(feats) / safe_area[:, None]).float(), p=2, dim=1)
    cross = (per_cluster(sim) / safe_area).float()
    weights = (n_match / safe_area).float()

    cross_proto = protos_deb @ prototype
    seed = torch.argmax(torch.where(n_match > 0, cross_proto, torch.full_like(cross_proto, -math.inf)))
    intra = protos @ protos.index_select(0, seed.reshape(1))[0]  # protos[seed] would read seed on the host
    weights = torch.where(torch.arange(K, device=dev) == seed, torch.ones_like(weights), weights)
    score = cross * intra * weights
    mask = score[labels] > merge_threshold
    return mask & candidates.any()
