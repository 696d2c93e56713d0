"""The algorithm after the backbone, once: SPEC.md steps 3-7 as one sequence of stages.

Each stage is a function of tensors (no model, no state), so the core runs them, the
benchmarks time them, and the tests hold them against the published restatement
(``insid3_fast.testing.published``). The heavy steps call the ops (``insid3_fast.ops``):
``kernels="native"`` runs the compiled kernels, ``kernels="reference"`` plain torch /
scikit-learn kernels of the same ops; nothing else differs between the two.

Debiased features live in the D = C - r coordinates of the complement of the positional
subspace (``debiased_coordinates``): the same inner products as the published
``normalize(P x)`` in C dimensions, so matching and aggregation cost about half. Every stage is
written without host synchronisation on a GPU (fallbacks are selected with ``torch.where``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .quantile import upper_quantile


@dataclass
class EncodedReference:
    """A reference (S shots) ready to be matched against targets: one representation, the debiased one.

    masks: (S, size, size) bool; masks_down: (S, h, w) bool masks at feature resolution;
    keys: (S, h*w, D) the debiased features in complement coordinates
    (``debiased_coordinates``), the layout of the nearest-neighbour op; prototype: (D,) the
    normalised reference prototype in the same coordinates; embed_dim: C, the width of the
    backbone features they came from (the original features are not kept: no step uses them).
    """

    masks: torch.Tensor
    masks_down: torch.Tensor
    prototype: torch.Tensor
    keys: torch.Tensor
    embed_dim: int
    # False when the reference's features hold NaN or inf (e.g. a NaN pixel in an image
    # tensor): the published code then matches nothing and returns an empty mask, and so do we
    # (the compiled ops reject non-finite input, so they are not called).
    finite: bool = True
    # Which positional basis of its model the keys are in (``Insid3Core.set_basis`` counts them).
    basis_version: int = 0

    @property
    def shots(self) -> int:
        """Number of reference shots."""
        return int(self.keys.shape[0])


# ---- step 3: debiasing -------------------------------------------------------------------------
def debiased_coordinates(feats: torch.Tensor, complement: torch.Tensor, *, bf16x6: bool = False,
                         kernels: str = "native") -> torch.Tensor:
    """Debiased features (T, h*w, D) of normalised features (T, C, h, w): ``normalize(Qᵀ x)``.

    ``complement`` is Q (C, D), an orthonormal basis of the complement of the positional subspace.
    ``bf16x6``: the projection as the split-bf16 product (``ops.bf16x6_mm``, one per image).
    """
    T, C, h, w = feats.shape
    x = feats.reshape(T, C, h * w).transpose(1, 2)
    if bf16x6:
        y = torch.stack([ops.bf16x6_mm(x[t], complement, kernels=kernels) for t in range(T)])
    else:
        y = torch.matmul(x, complement)
    return F.normalize(y, p=2, dim=2)


# ---- step 4: the reference ---------------------------------------------------------------------
def downsample_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A (size, size) bool mask at feature resolution (h, w).

    Bilinear ``> 0.5``; if empty, nearest ``> 0.5``; if still empty, the cell of the mask's
    centre of mass (pixel centroid divided by size // w, truncated).
    """
    m = mask.float()[None, None]
    down = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
    if not down.any():
        down = F.interpolate(m, size=(h, w), mode="nearest")[0, 0] > 0.5
        if not down.any():
            center = torch.argwhere(mask > 0).float().mean(dim=0)
            scale = mask.shape[-1] // w
            cy, cx = (center / scale).int()
            down[cy, cx] = True
    return down


def encode_reference(feats: torch.Tensor, masks: torch.Tensor, complement: torch.Tensor, *, bf16x6: bool = False,
                     kernels: str = "native") -> EncodedReference:
    """Encode S shots from their normalised features (S, C, h, w) and masks (S, size, size).

    The masks' values are downsampled as they are (``downsample_mask``: bool, soft or 0-255
    masks, as the published ``predict_mask`` does); the encoded reference keeps ``masks > 0``.
    The prototype is the normalised mean over shots of each shot's mean debiased foreground
    feature (every mask has a foreground cell after ``downsample_mask``).
    """
    S, C, h, w = feats.shape
    keys = debiased_coordinates(feats, complement, bf16x6=bf16x6, kernels=kernels)
    masks_down = torch.stack([downsample_mask(masks[s], h, w) for s in range(S)])
    shot_protos = [keys[s][masks_down[s].reshape(-1)].mean(dim=0) for s in range(S)]
    prototype = F.normalize(torch.stack(shot_protos).mean(dim=0), p=2, dim=0)
    # One host read per reference (not per target): is everything the targets use finite?
    finite = bool(torch.isfinite(keys).all() & torch.isfinite(prototype).all())
    return EncodedReference(masks if masks.dtype == torch.bool else masks > 0, masks_down, prototype, keys, C, finite)


# ---- step 5: candidates ------------------------------------------------------------------------
def forward_match(queries: torch.Tensor, prototype: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity <t_deb, p> (N,), forward mask): ``sim > 0``, or ``> its 0.9 quantile`` when none is."""
    sim = queries @ prototype
    fwd = sim > 0
    # upper_quantile is torch.quantile bit for bit, from a top-k (no full sort).
    return sim, torch.where(fwd.any(), fwd, sim > upper_quantile(sim, 0.9))


# ---- steps 5 and 6: votes and clusters ---------------------------------------------------------
def cluster_and_vote(feats: torch.Tensor, h: int, w: int, threshold: float, queries: torch.Tensor,
                     ref: EncodedReference, active: torch.Tensor, connectivity: int | None = None,
                     kernels: str = "native", bf16x6: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster labels (N,) of the target features (N, C) and reverse-NN votes (N,) of ``active`` patches.

    One op for the published clustering, so that on the CPU the sequential NN-chain runs
    beside the voting GEMMs; two (voting, grid-constrained linkage) with ``connectivity``.
    ``bf16x6``: the clustering's Gram matrix as the split-bf16 product (the grid clustering has
    no Gram matrix: its float64 dots are unchanged).
    """
    key_mask = ref.masks_down.reshape(ref.shots, h * w)
    if connectivity is None:
        labels, votes, _ = ops.cluster_and_vote(feats, threshold, queries, ref.keys, key_mask, active,
                                                kernels=kernels, bf16x6=bf16x6)
    else:
        votes, _ = ops.nn_vote(queries, ref.keys, key_mask, active, kernels=kernels)
        labels = ops.grid_average_linkage(feats, h, w, connectivity, threshold, kernels=kernels)
    return labels, votes


def majority(votes: torch.Tensor, shots: int) -> torch.Tensor:
    """Patches that a majority of the shots vote for: ``votes >= ceil(S / 2)``."""
    return votes >= math.ceil(shots / 2)


# ---- step 7: seed and aggregation --------------------------------------------------------------
def aggregate_clusters(labels: torch.Tensor, candidates: torch.Tensor, feats_deb: torch.Tensor,
                       feats: torch.Tensor, sim: torch.Tensor, prototype: torch.Tensor,
                       merge_threshold: float, kernels: str = "native") -> torch.Tensor:
    """Seed selection and aggregation: the (N,) bool patch mask (``ops.aggregate_clusters``).

    Args:
        labels: (N,) int64 cluster labels in [0, N).
        candidates: (N,) bool candidate patches.
        feats_deb: (N, D) debiased normalised target features (any coordinates).
        feats: (N, C) original normalised target features.
        sim: (N,) patch similarity to the prototype, <t_deb, p>.
        prototype: (D,) reference prototype, in the coordinates of ``feats_deb``.
        merge_threshold: a cluster joins the mask when its score is above it (alpha).
        kernels: ``"native"`` (three CUDA launches on a GPU; ATen's ops on the CPU) or
            ``"reference"``.
    """
    return ops.aggregate_clusters(labels, candidates, feats_deb, feats, sim, prototype, merge_threshold,
                                  kernels=kernels)


# ---- the sequence ------------------------------------------------------------------------------
def finite_targets(feats: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which targets of (B, C, h, w) features are finite everywhere.

    The others get an empty mask, as in the published code: a NaN pixel spreads through the
    attention to every patch, so no patch passes the candidate test and its predict_mask returns
    before its clustering (the ops would raise on such features).
    """
    return torch.isfinite(feats).flatten(1).all(dim=1)


def segment_patches(ref: EncodedReference, tgt_feat: torch.Tensor, complement: torch.Tensor, *,
                    tau: float, merge_threshold: float, connectivity: int | None = None,
                    kernels: str = "native", bf16x6: bool = False) -> torch.Tensor:
    """The (h, w) bool patch mask of one target, given its normalised features (C, h, w).

    Steps 5-7: forward match, reverse-NN votes and clustering, candidates, seed and aggregation.
    ``bf16x6``: the projection and the Gram matrix as split-bf16 products (``matmul_precision``).
    """
    C, h, w = tgt_feat.shape
    if not ref.finite:  # the published result: NaN similarities match nothing
        return torch.zeros(h, w, dtype=torch.bool, device=tgt_feat.device)
    queries = debiased_coordinates(tgt_feat[None], complement, bf16x6=bf16x6, kernels=kernels)[0]
    sim, fwd = forward_match(queries, ref.prototype)
    feats = tgt_feat.reshape(C, h * w).T  # (N, C) view; the CPU ops read it without a copy
    if tgt_feat.device.type != "cpu" or ops.emulating_gpu():
        # GPU kernels read rows: one copy, shared by the clustering and the aggregation.
        feats = feats.contiguous()
    labels, votes = cluster_and_vote(feats, h, w, 1.0 - tau, queries, ref, fwd, connectivity, kernels, bf16x6)
    candidates = fwd & majority(votes, ref.shots)
    return aggregate_clusters(labels, candidates, queries, feats, sim, ref.prototype, merge_threshold,
                              kernels).reshape(h, w)
