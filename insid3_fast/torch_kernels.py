"""The reference kernels of the ops: plain torch, scikit-learn and numpy, on any device.

``insid3_fast.ops`` runs these instead of the compiled kernels when asked for
``kernels="reference"`` (``backend="reference"``, or a machine where the extension is not
built). Each computes what its op's docstring in ``ops`` states, on inputs the wrapper has
already validated: the same results as the compiled kernels, only slower. They are written
for clarity, not speed (the clustering is scikit-learn's, as in the published code).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Query rows per similarity block of the reference nearest-neighbour search: bounds the
# (rows, M) float64 block (32 MiB at M = 4096).
_VOTE_ROWS = 1024


def first_appearance(labels: np.ndarray) -> np.ndarray:
    """Relabel a partition so that labels number the clusters in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse.reshape(-1)].astype(np.int64)


def nn_vote(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
            active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse nearest-neighbour votes and argmax (see ``ops.nn_vote``).

    The dot products are taken in float64: products of two float32 values are exact there,
    so the argmax is that of the exact dots except for sums that differ in the last bits of
    a double (ties go to the lowest index, as ``torch.argmax`` picks the first maximum).
    """
    S, M, _ = keys.shape
    Q = queries.shape[0]
    argmax = torch.full((S, Q), -1, dtype=torch.int64, device=queries.device)
    rows = active.nonzero().reshape(-1)
    q = queries.index_select(0, rows).double()
    for s in range(S):
        k = keys[s].double()
        for start in range(0, rows.numel(), _VOTE_ROWS):
            block = q[start:start + _VOTE_ROWS] @ k.T
            argmax[s, rows[start:start + _VOTE_ROWS]] = block.argmax(dim=1)
    votes = torch.zeros(Q, dtype=torch.int32, device=queries.device)
    for s in range(S):
        hit = key_mask[s][argmax[s].clamp(min=0)] & (argmax[s] >= 0)
        votes += hit.to(torch.int32)
    return votes, argmax


def average_linkage_precomputed(dist: torch.Tensor, threshold: float) -> torch.Tensor:
    """scikit-learn's average-linkage cut of a distance matrix; labels by first appearance."""
    n = dist.shape[0]
    if n <= 1:  # scikit-learn needs two samples; one patch is one cluster
        return torch.zeros(n, dtype=torch.int64, device=dist.device)
    from sklearn.cluster import AgglomerativeClustering

    ac = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                 distance_threshold=float(threshold))
    labels = ac.fit_predict(dist.detach().cpu().numpy())
    return torch.from_numpy(first_appearance(labels)).to(dist.device)


def average_linkage(features: torch.Tensor, threshold: float, bf16x6: bool = False) -> torch.Tensor:
    """Average linkage of normalised features on ``1 - clamp(X Xᵀ, -1, 1)`` (the published distances).

    ``bf16x6``: the Gram matrix as the split-bf16 product (:func:`bf16x6_mm`)."""
    gram = bf16x6_mm(features, features.T) if bf16x6 else features @ features.T
    dist = 1.0 - gram.clamp(-1, 1)
    return average_linkage_precomputed(dist, threshold)


def cluster_and_vote(features: torch.Tensor, threshold: float, queries: torch.Tensor, keys: torch.Tensor,
                     key_mask: torch.Tensor, active: torch.Tensor, bf16x6: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``average_linkage`` and ``nn_vote``, one after the other."""
    return (average_linkage(features, threshold, bf16x6), *nn_vote(queries, keys, key_mask, active))


# ---- the split-bf16 product (csrc/common/bf16x6.h, restated) ----------------------------------
#: Which part of a (left) and of b (right) each of the six inner blocks of the product holds:
#: the products p2 p0, p0 p2, p1 p0, p1 p1, p0 p1, p0 p0.
BF16X6_LEFT = (2, 0, 1, 1, 0, 0)
BF16X6_RIGHT = (0, 2, 0, 1, 1, 0)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to bf16 (8 significant bits, to nearest even), as float32; NaN and
    inf give NaN, values beyond bf16's range inf (integer operations, as the kernels)."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF
    nonfinite = (bits & 0x7F800000) == 0x7F800000
    return torch.where(nonfinite, torch.nan, rounded.view(torch.float32))


def bf16x6_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """The parts p0, p1, p2 of float32 x: ``p_k = round_bf16(x - p0 - ... - p_{k-1})``, except
    a finite value whose rounding overflows (|x| > 3.3961e38): truncated to bf16's largest
    finite value of its sign instead, so that finite values keep finite parts (as the kernels)."""
    parts, rest = [], x.float()
    for _ in range(3):
        part = round_bf16(rest)
        truncated = (rest.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
        parts.append(torch.where(part.isinf(), truncated, part))  # inf only from an overflow
        rest = rest - parts[-1]
    return parts


def bf16x6_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as the split-bf16 product: one float32 GEMM of inner size 6K on the operands."""
    pa, pb = bf16x6_parts(a), bf16x6_parts(b)
    left = torch.cat([pa[k] for k in BF16X6_LEFT], dim=1)
    right = torch.cat([pb[k] for k in BF16X6_RIGHT], dim=0)
    return left @ right


def grid_neighbours(h: int, w: int, connectivity: int) -> list[list[int]]:
    """The grid neighbours of each of the h*w patches (4: edges, 8: edges and corners)."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return [[(y + dy) * w + x + dx for dy, dx in steps if 0 <= y + dy < h and 0 <= x + dx < w]
            for y in range(h) for x in range(w)]


def grid_average_linkage(features: torch.Tensor, h: int, w: int, connectivity: int,
                         threshold: float) -> torch.Tensor:
    """Connectivity-constrained average linkage by reciprocal-nearest-neighbour rounds.

    Clusters start as single patches and keep a float64 sum vector. Two clusters are adjacent
    when a member of one is a grid neighbour of a member of the other; their linkage is the
    true average cosine distance 1 - <sum_a, sum_b> / (n_a n_b). Each round, every cluster
    finds its nearest adjacent cluster (ties to the smallest id, a cluster's id being its
    smallest patch index); reciprocal pairs closer than ``threshold`` merge. Rounds repeat
    until none merges. Returns (h*w,) int64 labels numbered by first appearance.
    """
    X = features.detach().double().cpu().numpy()
    neighbours = grid_neighbours(h, w, connectivity)
    members = {i: [i] for i in range(h * w)}
    sums = {i: X[i].copy() for i in range(h * w)}
    owner = list(range(h * w))
    while True:
        nearest = {}
        for a in members:
            adjacent = sorted({owner[q] for p in members[a] for q in neighbours[p]} - {a})
            best = None
            for b in adjacent:
                d = 1.0 - float(np.dot(sums[a], sums[b])) / (len(members[a]) * len(members[b]))
                if best is None or d < best[0]:
                    best = (d, b)
            if best is not None:
                nearest[a] = best
        pairs = [(a, b) for a, (d, b) in nearest.items()
                 if a < b and nearest.get(b, (None, None))[1] == a and d < threshold]
        if not pairs:
            break
        for a, b in pairs:
            sums[a] = sums[a] + sums.pop(b)
            members[a] += members.pop(b)
            for p in members[a]:
                owner[p] = a
    first_seen: dict[int, int] = {}
    labels = [first_seen.setdefault(o, len(first_seen)) for o in owner]
    return torch.tensor(labels, dtype=torch.long, device=features.device)


def aggregate_clusters(labels: torch.Tensor, candidates: torch.Tensor, feats_deb: torch.Tensor,
                       feats: torch.Tensor, sim: torch.Tensor, prototype: torch.Tensor,
                       merge_threshold: float, clusters: int | None = None) -> torch.Tensor:
    """Seed selection and aggregation (see ``ops.aggregate_clusters``) with per-cluster reductions.

    ``clusters``: K = max(labels) + 1, read on the host by the caller, and float32 sums (the
    CPU's own path, the published code's arithmetic). None: the device mode, where nothing is
    read on the host: K = N bounds the labels and the sums are float64 (the GPU's torch path).
    """
    N = labels.shape[0]
    dev, dtype = labels.device, sim.dtype
    if clusters is not None:
        # On the CPU the number of clusters is free to read and the sums are sequential.
        K, acc = clusters, dtype
    else:
        # On a GPU (or the tests' emulation of its kernels): no host sync (K = N bounds the
        # labels) and float64 sums, so that the order of the atomic additions practically never
        # changes the float32 results.
        K, acc = N, torch.float64

    def per_cluster(values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 2 and not values.is_contiguous() and values.T.is_contiguous():
            # The (N, C) view of a (C, N) feature map: adding along the map's contiguous last
            # dimension reads it in order (5-10x faster on the CPU than gathering rows of the
            # view); every sum adds the same values in the same order, so the result is the same.
            out = torch.zeros((values.shape[1], K), dtype=acc, device=dev)
            return out.index_add_(1, labels, values.T.to(acc)).T
        out = torch.zeros((K,) + values.shape[1:], dtype=acc, device=dev)
        return out.index_add_(0, labels, values.to(acc))

    # Area, candidate count and similarity sum in one reduction (each column adds the same
    # values in the same order as three separate ones would).
    area, n_match, sim_sum = per_cluster(torch.stack((torch.ones_like(sim), candidates.to(dtype), sim), 1)).unbind(1)
    safe_area = area.clamp(min=1.0)
    protos_deb = F.normalize((per_cluster(feats_deb) / safe_area[:, None]).to(dtype), p=2, dim=1)
    protos = F.normalize((per_cluster(feats) / safe_area[:, None]).to(dtype), p=2, dim=1)
    cross = (sim_sum / safe_area).to(dtype)
    weights = (n_match / safe_area).to(dtype)

    cross_proto = protos_deb @ prototype
    seed = torch.argmax(torch.where(n_match > 0, cross_proto, torch.full_like(cross_proto, -math.inf)))
    intra = protos @ protos.index_select(0, seed.reshape(1))[0]  # protos[seed] would read seed on the host
    weights = torch.where(torch.arange(K, device=dev) == seed, torch.ones_like(weights), weights)
    score = cross * intra * weights
    mask = score[labels] > merge_threshold
    return mask & candidates.any()
