"""insid3_fast.ops.average_linkage(_precomputed) (CPU kernels) against scikit-learn.

The reference is AgglomerativeClustering(metric='precomputed', linkage='average',
distance_threshold=t), i.e. scipy's NN-chain followed by the distance-threshold cut; only the
partition matters, and our labels must also be numbered by first appearance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import linkage
from sklearn.cluster import AgglomerativeClustering

from insid3_fast import ops

from partitions import first_appearance, same_partition


def sklearn_labels(dist: np.ndarray, t: float) -> np.ndarray:
    if dist.shape[0] == 1:  # scikit-learn needs two samples
        return np.zeros(1, dtype=np.int64)
    model = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                    distance_threshold=t)
    return model.fit(dist).labels_


def check_precomputed(dist: np.ndarray, t: float) -> np.ndarray:
    dist = np.ascontiguousarray(dist, dtype=np.float32)
    ours = ops.average_linkage_precomputed(torch.from_numpy(dist), t)
    assert ours.dtype == torch.int64 and ours.shape == (dist.shape[0],)
    ref = sklearn_labels(dist, t)
    assert same_partition(ours.numpy(), ref), (t, ours.tolist(), ref.tolist())
    assert first_appearance(ours.numpy())
    return ours.numpy()


def cosine_dist(X: torch.Tensor) -> torch.Tensor:
    return 1.0 - (X @ X.T).clamp(-1, 1)  # the published code


def check_features(X: torch.Tensor, t: float) -> np.ndarray:
    ours = ops.average_linkage(X, t)
    ref = sklearn_labels(cosine_dist(X).numpy(), t)
    assert same_partition(ours.numpy(), ref), (t, ours.tolist(), ref.tolist())
    assert first_appearance(ours.numpy())
    return ours.numpy()


def random_symmetric(n: int, rng: np.random.Generator, levels: int | None = None) -> np.ndarray:
    d = rng.random((n, n))
    if levels is not None:
        d = np.ceil(d * levels) / levels  # few distinct values: many exact ties
    d = np.triu(d, 1)
    d = d + d.T
    return d.astype(np.float32)


def clustered_points(n: int, k: int, dim: int, rng: np.random.Generator, spread=0.15) -> np.ndarray:
    centres = rng.normal(size=(k, dim))
    pts = centres[rng.integers(0, k, n)] + spread * rng.normal(size=(n, dim))
    return pts


def heights(dist: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(dist.shape[0], 1)
    return linkage(dist[iu].astype(np.float64), method="average")[:, 2]


def test_same_partition_helper():
    assert same_partition([0, 0, 1], [5, 5, 2])
    assert not same_partition([0, 0, 1], [0, 1, 1])
    assert not same_partition([0, 1, 2], [0, 0, 1])
    assert not same_partition([0, 0], [0, 0, 0])


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 257])
def test_random_matrices(n):
    rng = np.random.default_rng(n)
    dist = random_symmetric(n, rng)
    for q in (0.1, 0.3, 0.5, 0.9):
        check_precomputed(dist, float(np.quantile(heights(dist), q)))
    check_precomputed(dist, 10.0)


@pytest.mark.parametrize("levels", [2, 3, 5])
@pytest.mark.parametrize("n", [9, 40, 150])
def test_tie_heavy_matrices(n, levels):
    rng = np.random.default_rng(100 * n + levels)
    dist = random_symmetric(n, rng, levels)
    for t in sorted(set(np.unique(dist).tolist()) | {0.0, 0.3, 0.55, 0.8, 2.0}):
        check_precomputed(dist, float(t))
        check_precomputed(dist, float(np.nextafter(t, np.inf)))


def test_clustered_with_duplicates():
    rng = np.random.default_rng(7)
    pts = clustered_points(120, 6, 5, rng)
    pts[60:80] = pts[:20]  # exact duplicates: zero distances
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    for t in (0.0, 0.05, 0.3, 1.0, 3.0, 100.0):
        check_precomputed(dist, t)


def test_threshold_exactly_at_merge_heights():
    rng = np.random.default_rng(8)
    dist = random_symmetric(60, rng)
    hs = heights(dist)
    for h in hs[::7]:
        for t in (h, np.nextafter(h, -np.inf), np.nextafter(h, np.inf)):
            check_precomputed(dist, float(t))


def test_tiny_inputs():
    assert ops.average_linkage_precomputed(torch.zeros(1, 1), 0.5).tolist() == [0]
    assert ops.average_linkage(torch.ones(1, 3) / 3**0.5, 0.5).tolist() == [0]
    d = torch.tensor([[0.0, 0.4], [0.4, 0.0]])
    assert ops.average_linkage_precomputed(d, 0.4).tolist() == [0, 1]  # strict: 0.4 < 0.4 is false
    assert ops.average_linkage_precomputed(d, 0.41).tolist() == [0, 0]
    assert ops.average_linkage_precomputed(d, 0.0).tolist() == [0, 1]
    assert ops.average_linkage_precomputed(d, -1.0).tolist() == [0, 1]
    assert ops.average_linkage_precomputed(torch.zeros(0, 0), 0.5).shape == (0,)


def test_labels_by_first_appearance():
    d = torch.tensor([[0, 9, 1, 9], [9, 0, 9, 1], [1, 9, 0, 9], [9, 1, 9, 0]], dtype=torch.float32)
    assert ops.average_linkage_precomputed(d, 2.0).tolist() == [0, 1, 0, 1]


def test_upper_triangle_only_like_sklearn():
    rng = np.random.default_rng(9)
    dist = rng.random((30, 30)).astype(np.float32)  # not symmetric: only i < j is used
    for t in (0.2, 0.4, 0.6):
        check_precomputed(dist, t)


def test_all_distances_equal():
    dist = np.full((25, 25), 0.5, dtype=np.float32)
    np.fill_diagonal(dist, 0)
    assert (check_precomputed(dist, 0.6) == 0).all()
    assert (check_precomputed(dist, 0.5) == np.arange(25)).all()


def test_features_random_and_clustered():
    rng = np.random.default_rng(10)
    X = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(300, 32))).float(), dim=1)
    for t in (0.5, 0.8, 0.95, 1.0, 1.05):
        check_features(X, t)
    Xc = torch.from_numpy(clustered_points(400, 8, 16, rng, spread=0.3)).float()
    Xc = torch.nn.functional.normalize(Xc, dim=1)
    Xc[100:150] = Xc[:50]  # duplicated features
    for t in (0.0, 0.02, 0.1, 0.3, 0.6):
        check_features(Xc, t)


def test_features_identical():
    X = torch.nn.functional.normalize(torch.ones(20, 8), dim=1)
    labels = check_features(X, 0.1)
    assert (labels == 0).all()


def test_features_blocked_gemm_is_bitwise_the_full_gemm():
    # The kernel computes X @ X.T by row blocks of 512 against the remaining columns.
    rng = np.random.default_rng(11)
    for n, c in ((700, 64), (1100, 96)):
        X = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, c))).float(), dim=1)
        full = X @ X.T
        for i0 in range(0, n, 512):
            block = X[i0 : i0 + 512] @ X[i0:].T
            assert torch.equal(block, full[i0 : i0 + 512, i0:])
        d = cosine_dist(X)
        for t in (0.9, 1.0):
            a = ops.average_linkage(X, t)
            b = ops.average_linkage_precomputed(d, t)
            assert torch.equal(a, b)
        check_features(X, 0.95)


def test_bad_inputs_raise():
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.insid3_fast.average_linkage_precomputed(torch.zeros(3, 4), 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.insid3_fast.average_linkage_precomputed(torch.zeros(3, 3, dtype=torch.float64), 0.5)
    with pytest.raises(RuntimeError, match="finite"):
        d = torch.zeros(3, 3)
        d[0, 2] = float("nan")
        torch.ops.insid3_fast.average_linkage_precomputed(d, 0.5)
    with pytest.raises(RuntimeError, match="finite"):
        torch.ops.insid3_fast.average_linkage(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]), 0.5)
    with pytest.raises(RuntimeError, match=r"\(N, C\)"):
        torch.ops.insid3_fast.average_linkage(torch.zeros(3), 0.5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 14), levels=st.sampled_from([2, 3, 4, 1000]), t=st.floats(0.0, 1.2),
       seed=st.integers(0, 2**31 - 1))
def test_property_precomputed(n, levels, t, seed):
    dist = random_symmetric(n, np.random.default_rng(seed), levels)
    check_precomputed(dist, t)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 16), c=st.integers(1, 6), t=st.floats(0.0, 2.0), seed=st.integers(0, 2**31 - 1))
def test_property_features(n, c, t, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(-1, 2, (n, c), generator=g).float()  # few directions: duplicates and ties
    X[X.norm(dim=1) == 0, 0] = 1.0
    check_features(torch.nn.functional.normalize(X, dim=1), t)


def test_transposed_feature_map_view_gives_the_same_labels():
    """The pipeline passes the (N, C) transposed view of a (C, N) map without copying it."""
    g = torch.Generator().manual_seed(3)
    fmap = torch.nn.functional.normalize(torch.randn(48, 700, generator=g) + 2 * torch.randn(48, 1, generator=g), dim=0)
    view = fmap.T
    assert not view.is_contiguous()
    from sklearn.cluster import AgglomerativeClustering
    for t in (0.2, 0.4, 0.6):
        got = ops.average_linkage(view, t)
        assert torch.equal(got, ops.average_linkage(view.contiguous(), t))
        D = (1.0 - (view @ view.T).clamp(-1, 1)).numpy()
        expected = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                           distance_threshold=t).fit_predict(D)
        assert same_partition(got.numpy(), expected)
