"""The reference path against independent restatements of each SPEC step on small inputs."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insid3_fast.testing import published as reference  # the oracle (formerly insid3_fast.reference)
from insid3_fast.debias import debias, orthogonal_projector


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---- step 4: masks at feature resolution ----
def test_downsample_mask_bilinear_regime():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 0:32] = True  # whole 16 px cells
    down = reference.downsample_mask(mask, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 0:2] = True
    assert torch.equal(down, expected)


def test_downsample_mask_nearest_fallback():
    # A 1-px line is too thin for bilinear > 0.5 but nearest samples pixel (i * 16) of each cell.
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[32, :] = True
    down = reference.downsample_mask(mask, 4, 4)
    assert torch.equal(down, torch.tensor([[False] * 4, [False] * 4, [True] * 4, [False] * 4]))


def test_downsample_mask_centroid_fallback():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[37, 21] = True  # off the nearest sampling points, too small for bilinear
    down = reference.downsample_mask(mask, 4, 4)
    assert down.sum() == 1 and down[37 // 16, 21 // 16]


# ---- step 3 / 4: debiasing and prototype ----
def test_debias_is_normalised_projection():
    basis, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    P = orthogonal_projector(basis.float())
    X = F.normalize(torch.randn(2, 8, 3, 3), dim=1)
    out = debias(X, P).double().numpy()
    B = basis.numpy()
    for t in range(2):
        for i in range(3):
            for j in range(3):
                x = X[t, :, i, j].double().numpy()
                y = x - B @ (B.T @ x)
                np.testing.assert_allclose(out[t, :, i, j], y / np.linalg.norm(y), atol=1e-5)


def test_prototype_skips_nothing_and_averages_shots():
    deb = F.normalize(torch.randn(3, 6, 4, 4), dim=1)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 1:3, 1:3] = masks[2, 3, :] = True
    got = reference.reference_prototype(deb, masks).numpy()
    shot_means = [deb[s].numpy()[:, masks[s].numpy()].mean(axis=1) for s in range(3)]
    expected = np.mean(shot_means, axis=0)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), atol=1e-6)


# ---- step 5: candidates ----
def test_forward_mask_positive_and_quantile_fallback():
    p = F.normalize(torch.randn(5), dim=0)
    t = F.normalize(torch.randn(5, 4, 5), dim=0)
    sim, fwd = reference.forward_mask(t, p)
    np.testing.assert_allclose(sim.numpy(), np.einsum("chw,c->hw", t.numpy(), p.numpy()), atol=1e-6)
    assert torch.equal(fwd, sim > 0)
    # All similarities negative: the top 10 % (above the 0.9 quantile) are taken instead.
    t_neg = F.normalize(-p[:, None, None] + 0.3 * torch.randn(5, 4, 5), dim=0)
    sim, fwd = reference.forward_mask(t_neg, p)
    assert (sim < 0).all()
    q = np.quantile(sim.numpy().ravel(), 0.9)
    assert torch.equal(fwd, torch.from_numpy(sim.numpy() > q))
    assert fwd.sum() == 2


@pytest.mark.parametrize("shots", [1, 2, 3, 5])
def test_backward_votes_brute_force(shots):
    C, h, w = 6, 3, 4
    ref = F.normalize(torch.randn(shots, C, h, w), dim=1)
    tgt = F.normalize(torch.randn(C, h, w), dim=0)
    masks = torch.rand(shots, h, w) > 0.5
    votes = reference.backward_votes(tgt, ref, masks).numpy()
    for i in range(h):
        for j in range(w):
            count = 0
            for s in range(shots):
                scores = [(float(ref[s, :, y, x] @ tgt[:, i, j]), y, x) for y in range(h) for x in range(w)]
                best = max(scores, key=lambda v: v[0])
                count += bool(masks[s, best[1], best[2]])
            assert votes[i, j] == count
    cands = reference.locate_candidates(tgt, ref, masks, F.normalize(torch.randn(C), dim=0))
    assert cands.dtype == torch.bool


# ---- step 6: clustering ----
def naive_average_linkage(X: np.ndarray, threshold: float) -> list[set[int]]:
    """Merge the closest pair of clusters (mean pairwise cosine distance) while it is < threshold."""
    D = 1.0 - np.clip(X @ X.T, -1, 1)
    clusters = [{i} for i in range(len(X))]
    while len(clusters) > 1:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = np.mean([D[i, j] for i in clusters[a] for j in clusters[b]])
                if best is None or d < best[0]:
                    best = (d, a, b)
        if best[0] >= threshold:
            break
        _, a, b = best
        clusters[a] |= clusters.pop(b)
    return clusters


def partition(labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(label, set()).add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("seed", range(4))
def test_agglomerative_labels_match_naive_average_linkage(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 8))
    X = centres[rng.integers(0, 4, size=30)] + 0.35 * rng.normal(size=(30, 8))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    labels = reference.agglomerative_labels(torch.from_numpy(X), 0.4)
    expected = naive_average_linkage(X.astype(np.float64), 0.4)
    assert partition(labels) == {frozenset(c) for c in expected}


def test_agglomerative_labels_single_patch():
    assert reference.agglomerative_labels(unit(1, 4), 0.4).tolist() == [0]


def test_sum_vector_linkage_identity():
    """SPEC 6: average cosine distance between clusters = 1 - <sum_A, sum_B> / (|A| |B|)."""
    A, B = unit(5, 7, seed=1).double(), unit(3, 7, seed=2).double()
    mean_pairwise = (1 - A @ B.T).mean()
    assert torch.allclose(mean_pairwise, 1 - A.sum(0) @ B.sum(0) / 15)


# ---- step 7: seed and aggregation ----
def restated_seed_and_aggregate(cands, labels, p, tgt, tgt_deb, alpha):
    C, h, w = tgt.shape
    lab = labels.reshape(-1).numpy()
    cand = cands.reshape(-1).numpy()
    T = tgt.reshape(C, -1).double().numpy().T
    Td = tgt_deb.reshape(C, -1).double().numpy().T
    pp = p.double().numpy()
    K = lab.max() + 1
    norm = lambda v: v / np.linalg.norm(v)
    Pd = [norm(Td[lab == k].mean(0)) for k in range(K)]
    P = [norm(T[lab == k].mean(0)) for k in range(K)]
    n_match = [cand[lab == k].sum() for k in range(K)]
    area = [(lab == k).sum() for k in range(K)]
    matched = [k for k in range(K) if n_match[k] > 0]
    seed = max(matched, key=lambda k: (pp @ Pd[k], -k))
    sim = Td @ pp
    out = np.zeros(len(lab), dtype=bool)
    for k in range(K):
        w_k = 1.0 if k == seed else n_match[k] / area[k]
        score = sim[lab == k].mean() * (P[seed] @ P[k]) * w_k
        out[lab == k] = score > alpha
    return out.reshape(h, w)


@pytest.mark.parametrize("seed", range(5))
def test_seed_and_aggregate_restated(seed):
    torch.manual_seed(seed)
    C, h, w = 8, 6, 7
    tgt = F.normalize(torch.randn(C, h, w) + 2 * torch.randn(C, 1, 1), dim=0)
    tgt_deb = F.normalize(tgt + 0.3 * torch.randn(C, h, w), dim=0)
    p = F.normalize(tgt_deb.mean((1, 2)) + 0.2 * torch.randn(C), dim=0)
    labels = torch.randint(0, 5, (h, w))
    labels[0, :5] = torch.arange(5)  # every label present
    cands = torch.rand(h, w) > 0.6
    got = reference.seed_and_aggregate(cands, labels, p, tgt, tgt_deb, 0.05)
    assert torch.equal(got, torch.from_numpy(restated_seed_and_aggregate(cands, labels, p, tgt, tgt_deb, 0.05)))


def test_no_candidate_gives_empty_mask():
    C, h, w = 4, 3, 3
    cands = torch.zeros(h, w, dtype=torch.bool)
    out = reference.seed_and_aggregate(cands, torch.zeros(h, w, dtype=torch.long), unit(C),
                                       unit(C, h, w), unit(C, h, w), 0.2)
    assert not out.any()


# ---- connectivity-constrained variant ----
def test_grid_linkage_clusters_are_connected_and_respect_threshold():
    from scipy import ndimage

    h, w = 6, 7
    X = F.normalize(torch.randn(h * w, 5) + 3 * (torch.arange(h * w) % 2 == 0).float()[:, None], dim=1)
    for conn in (4, 8):
        labels = reference.grid_average_linkage(X, h, w, conn, 0.4).reshape(h, w).numpy()
        structure = ndimage.generate_binary_structure(2, 1 if conn == 4 else 2)
        for k in np.unique(labels):
            assert ndimage.label(labels == k, structure=structure)[1] == 1
    assert len(set(reference.grid_average_linkage(X, h, w, 4, 0.0).tolist())) == h * w
    same = F.normalize(torch.ones(h * w, 5), dim=1)
    assert set(reference.grid_average_linkage(same, h, w, 4, 0.1).tolist()) == {0}


def test_the_former_module_name_still_imports_the_oracle():
    from insid3_fast import reference as former

    assert former.segment_patches is reference.segment_patches
    assert former.downsample_mask is reference.downsample_mask
