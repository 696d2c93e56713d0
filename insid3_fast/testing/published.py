"""The test oracle: SPEC.md steps 4-7 restated from the published code, operation by operation.

Not a production path: the package runs ``insid3_fast.pipeline`` (on compiled or reference
kernels), and the tests hold every path against these functions. They use the published
tensor expressions (debiasing with the (C, C) projector, dense similarity volumes, Python
loops over clusters, scikit-learn's clustering), so on the same features they give the
published masks. The connectivity-constrained variant (not in the published code) uses the
reference kernel of ``ops.grid_average_linkage``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering

from ..debias import debias
from ..torch_kernels import grid_average_linkage, grid_neighbours  # noqa: F401  (re-exported)


def downsample_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A (size, size) bool mask at feature resolution (h, w) (SPEC step 4).

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


def reference_prototype(ref_deb: torch.Tensor, masks_down: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean over shots of each shot's mean debiased foreground feature, (C,)."""
    shot_protos = []
    for s in range(ref_deb.shape[0]):
        fg = ref_deb[s][:, masks_down[s]]
        if fg.shape[1] > 0:
            shot_protos.append(fg.mean(dim=1))
    return F.normalize(torch.stack(shot_protos).mean(dim=0), p=2, dim=0)


def forward_mask(tgt_deb: torch.Tensor, prototype: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward matching: (similarity <t_deb, p> (h, w), mask sim > 0 or > its 0.9 quantile)."""
    sim = torch.einsum("bchw,cd->bhw", tgt_deb[None], prototype[:, None]).squeeze(0)
    fwd = sim > 0
    if fwd.sum() == 0:
        fwd = sim > float(torch.quantile(sim, 0.9))
    return sim, fwd


def backward_votes(tgt_deb: torch.Tensor, ref_deb: torch.Tensor, masks_down: torch.Tensor) -> torch.Tensor:
    """Reverse-NN votes (h, w) int32: shots whose nearest reference patch lies in their mask."""
    _, h, w = tgt_deb.shape
    votes = torch.zeros((h, w), dtype=torch.int32, device=tgt_deb.device)
    for s in range(ref_deb.shape[0]):
        sim = torch.einsum("bchw,bcxy->bhwxy", ref_deb[s][None], tgt_deb[None])[0]
        Hs, Ws = sim.shape[:2]
        best = sim.permute(2, 3, 0, 1).reshape(h, w, -1).argmax(dim=2)
        votes += masks_down[s][best // Ws, best % Ws].to(torch.int32)
    return votes


def locate_candidates(tgt_deb: torch.Tensor, ref_deb: torch.Tensor, masks_down: torch.Tensor,
                      prototype: torch.Tensor) -> torch.Tensor:
    """Candidate patches (h, w) bool: forward match and a majority of reverse-NN votes (step 5)."""
    _, fwd = forward_mask(tgt_deb, prototype)
    votes = backward_votes(tgt_deb, ref_deb, masks_down)
    return fwd & (votes >= math.ceil(ref_deb.shape[0] / 2))


def agglomerative_labels(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """scikit-learn average-linkage labels (N,) of normalised features (N, C), cosine distance."""
    S = (features @ features.T).clamp(-1, 1)
    D = (1.0 - S).cpu().numpy()
    if D.shape[0] == 1:  # scikit-learn needs two samples; one patch is one cluster
        return torch.zeros(1, dtype=torch.long, device=features.device)
    ac = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                 distance_threshold=float(threshold))
    return torch.from_numpy(ac.fit_predict(D).astype(np.int64)).to(features.device)


def cluster_prototypes(X: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    """(K, C) L2-normalised mean feature of each cluster."""
    return torch.stack([F.normalize(X[labels == k].mean(dim=0), p=2, dim=0) for k in range(K)])


def seed_and_aggregate(candidates: torch.Tensor, labels: torch.Tensor, prototype: torch.Tensor,
                       tgt: torch.Tensor, tgt_deb: torch.Tensor, merge_threshold: float) -> torch.Tensor:
    """Seed-cluster selection and aggregation (step 7): the patch mask (h, w) bool."""
    C, h, w = tgt.shape
    labels = labels.reshape(h, w)
    if candidates.sum() == 0:
        return candidates
    K = int(labels.max()) + 1
    matched_ids, n_match = labels[candidates].unique(return_counts=True)
    areas = labels.reshape(-1).unique(return_counts=True)[1]
    weights = torch.zeros(K, device=labels.device)
    weights[matched_ids] = n_match.float()
    weights = weights / areas

    protos_deb = cluster_prototypes(tgt_deb.reshape(C, -1).T, labels.reshape(-1), K)
    cross_matched = (prototype[None] @ protos_deb[matched_ids].T).squeeze(0)
    seed = int(matched_ids[int(torch.argmax(cross_matched))])

    protos = cluster_prototypes(tgt.reshape(C, -1).T, labels.reshape(-1), K)
    intra = torch.einsum("c,kc->k", protos[seed], protos)
    sim = torch.einsum("bchw,cd->bhw", tgt_deb[None], prototype[:, None]).squeeze(0)
    cross = torch.stack([sim[labels == k].mean() for k in range(K)])

    weights[seed] = 1.0
    score = cross * intra * weights
    return score[labels] > merge_threshold


def _segment(ref_feats: torch.Tensor, ref_masks: torch.Tensor, tgt_feat: torch.Tensor,
             projector: torch.Tensor, tau: float, merge_threshold: float, cluster) -> torch.Tensor:
    S, C, h, w = ref_feats.shape
    deb = debias(torch.cat([ref_feats, tgt_feat[None]]), projector)
    ref_deb, tgt_deb = deb[:S], deb[S]
    masks_down = torch.stack([downsample_mask(ref_masks[s], h, w) for s in range(S)])
    prototype = reference_prototype(ref_deb, masks_down)
    candidates = locate_candidates(tgt_deb, ref_deb, masks_down, prototype)
    if candidates.sum() == 0:
        return candidates
    labels = cluster(tgt_feat.reshape(C, -1).T, 1.0 - tau)
    return seed_and_aggregate(candidates, labels, prototype, tgt_feat, tgt_deb, merge_threshold)


def segment_patches(ref_feats: torch.Tensor, ref_masks: torch.Tensor, tgt_feat: torch.Tensor,
                    projector: torch.Tensor, tau: float, merge_threshold: float) -> torch.Tensor:
    """One episode at feature resolution, the published way.

    Args:
        ref_feats: (S, C, h, w) L2-normalised reference features.
        ref_masks: (S, size, size) bool reference masks.
        tgt_feat: (C, h, w) L2-normalised target features.
        projector: (C, C) orthogonal projector of the debiasing.

    Returns:
        (h, w) bool patch mask.
    """
    return _segment(ref_feats, ref_masks, tgt_feat, projector, tau, merge_threshold, agglomerative_labels)


def segment_patches_grid(ref_feats: torch.Tensor, ref_masks: torch.Tensor, tgt_feat: torch.Tensor,
                         projector: torch.Tensor, tau: float, merge_threshold: float,
                         connectivity: int) -> torch.Tensor:
    """``segment_patches`` with the connectivity-constrained clustering (4 or 8 neighbours)."""
    h, w = tgt_feat.shape[1:]
    return _segment(ref_feats, ref_masks, tgt_feat, projector, tau, merge_threshold,
                    lambda X, t: grid_average_linkage(X, h, w, connectivity, t))
