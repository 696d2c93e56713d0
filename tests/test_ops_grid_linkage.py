"""insid3_fast.ops.grid_average_linkage (CPU kernel) against a slow Python implementation of
the same reciprocal-nearest-neighbour rounds (csrc/common/grid_rounds.h), plus properties.

The reference computes sum_linkage's sequential fma dot exactly (fractions), so labels must
match bit for bit, ties included.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from insid3_fast import ops


def fma_dot(a: list[float], b: list[float]) -> float:
    acc = 0.0
    for x, y in zip(a, b):
        acc = float(Fraction(x) * Fraction(y) + Fraction(acc))  # one rounding, like fma
    return acc


def grid_neighbours(p: int, h: int, w: int, connectivity: int) -> list[int]:
    r, c = divmod(p, w)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return [(r + dr) * w + c + dc for dr, dc in steps if 0 <= r + dr < h and 0 <= c + dc < w]


def reference_grid(features: torch.Tensor, h: int, w: int, connectivity: int, threshold: float) -> list[int]:
    n = h * w
    feats = features.double().tolist()
    sums = {i: feats[i] for i in range(n)}
    size = {i: 1 for i in range(n)}
    cid = list(range(n))  # patch -> cluster id (smallest member)
    cache: dict[tuple, float] = {}

    def link(a: int, b: int) -> float:
        key = (a, b, size[a], size[b])  # a cluster's sum only changes when its size does
        if key not in cache:
            cache[key] = 1.0 - fma_dot(sums[a], sums[b]) / (float(size[a]) * float(size[b]))
        return cache[key]

    while True:
        adj: dict[int, set[int]] = {c: set() for c in sums}
        for p in range(n):
            for q in grid_neighbours(p, h, w, connectivity):
                if cid[p] != cid[q]:
                    adj[cid[p]].add(cid[q])
        nn = {}
        for a in sums:
            best, best_d = -1, None
            for b in sorted(adj[a]):
                d = link(a, b)
                if best_d is None or d < best_d:  # ascending ids: ties keep the smallest id
                    best, best_d = b, d
            nn[a] = (best, best_d)
        merges = [(a, b) for a, (b, d) in nn.items() if b > a and nn[b][0] == a and d < threshold]
        if not merges:
            break
        for a, b in merges:
            sums[a] = [x + y for x, y in zip(sums[a], sums[b])]
            size[a] += size.pop(b)
            del sums[b]
            cid = [a if c == b else c for c in cid]
    seen: dict[int, int] = {}
    return [seen.setdefault(c, len(seen)) for c in cid]


def run(features, h, w, connectivity, threshold) -> list[int]:
    out = ops.grid_average_linkage(features, h, w, connectivity, threshold)
    assert out.dtype == torch.int64 and out.shape == (h * w,)
    return out.tolist()


def check(features, h, w, connectivity, threshold):
    ours = run(features, h, w, connectivity, threshold)
    assert ours == reference_grid(features, h, w, connectivity, threshold)
    assert_connected(ours, h, w, connectivity)
    return ours


def assert_connected(labels, h, w, connectivity):
    lab = np.asarray(labels).reshape(h, w)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for k in np.unique(lab):
        _, count = scipy.ndimage.label(lab == k, structure=structure)
        assert count == 1, f"cluster {k} is not {connectivity}-connected"


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("h,w", [(5, 7), (6, 6), (1, 9), (8, 1)])
def test_random_features_match_reference(h, w, connectivity):
    g = torch.Generator().manual_seed(h * 10 + w + connectivity)
    feats = unit(torch.randn(h * w, 6, generator=g))
    for t in (0.3, 0.8, 1.0, 1.3):
        check(feats, h, w, connectivity, t)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_smooth_structured_features(connectivity):
    # Two smooth regions with noise, like an image: merges run over many rounds.
    g = torch.Generator().manual_seed(connectivity)
    h, w, c = 9, 11, 8
    region = (torch.arange(w)[None, :] + torch.arange(h)[:, None] > 9).reshape(-1)
    centres = unit(torch.randn(2, c, generator=g))
    feats = unit(centres[region.long()] + 0.3 * torch.randn(h * w, c, generator=g))
    for t in (0.2, 0.5, 0.9):
        check(feats, h, w, connectivity, t)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_integer_features_exact_ties(connectivity):
    # Few distinct integer vectors: many exactly equal linkages.
    g = torch.Generator().manual_seed(11 + connectivity)
    h, w = 7, 8
    feats = torch.randint(-1, 2, (h * w, 3), generator=g).float()
    feats[feats.abs().sum(1) == 0, 0] = 1.0
    for t in (0.0, 0.5, 1.0, 1.5, 3.0):
        check(feats, h, w, connectivity, t)


def test_threshold_zero_gives_singletons():
    g = torch.Generator().manual_seed(3)
    feats = unit(torch.randn(48, 16, generator=g))
    for conn in (4, 8):
        assert run(feats, 6, 8, conn, 0.0) == list(range(48))
        assert run(feats, 6, 8, conn, -1.0) == list(range(48))


def test_identical_features_huge_threshold_one_cluster():
    feats = unit(torch.ones(12 * 5, 7))
    for conn in (4, 8):
        assert run(feats, 12, 5, conn, 10.0) == [0] * 60
        check(feats, 12, 5, conn, 10.0)


def test_random_features_huge_threshold_one_cluster():
    g = torch.Generator().manual_seed(4)
    feats = unit(torch.randn(10 * 13, 32, generator=g))
    for conn in (4, 8):
        assert run(feats, 10, 13, conn, 100.0) == [0] * 130


def test_single_patch_and_empty():
    assert run(torch.ones(1, 4), 1, 1, 4, 1.0) == [0]
    assert run(torch.zeros(0, 4), 0, 3, 8, 1.0) == []


def test_connectivity_is_respected():
    # Identical features on the diagonals of a 2x2 grid: only 8-connectivity joins the twins.
    feats = unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    assert run(feats, 2, 2, 8, 0.5) == [0, 1, 1, 0]
    assert run(feats, 2, 2, 4, 0.5) == [0, 1, 2, 3]  # diagonal twins are not adjacent
    # A column of identical patches split by a different one: the two ends never merge.
    feats = unit(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    assert run(feats, 5, 1, 4, 0.5) == [0, 0, 1, 2, 2]


def test_larger_grid_properties():
    g = torch.Generator().manual_seed(5)
    h, w, c = 32, 24, 64
    base = unit(torch.randn(4, c, generator=g))
    quad = ((torch.arange(h)[:, None] >= h // 2) * 2 + (torch.arange(w)[None, :] >= w // 2)).reshape(-1)
    feats = unit(base[quad] + 0.5 * torch.randn(h * w, c, generator=g))
    for conn in (4, 8):
        labels = run(feats, h, w, conn, 0.7)
        assert_connected(labels, h, w, conn)
        assert labels[0] == 0 and max(labels) + 1 == len(set(labels))


def test_bad_inputs_raise():
    op = torch.ops.insid3_fast.grid_average_linkage
    with pytest.raises(RuntimeError, match="connectivity"):
        op(torch.zeros(4, 2), 2, 2, 6, 0.5)
    with pytest.raises(RuntimeError, match="h\\*w"):
        op(torch.zeros(5, 2), 2, 2, 4, 0.5)
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(4, 2, dtype=torch.float64), 2, 2, 4, 0.5)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), c=st.integers(1, 4), conn=st.sampled_from([4, 8]),
       t=st.floats(-0.1, 2.1), integer=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference(h, w, c, conn, t, integer, seed):
    g = torch.Generator().manual_seed(seed)
    if integer:
        feats = torch.randint(-1, 2, (h * w, c), generator=g).float()
    else:
        feats = unit(torch.randn(h * w, c, generator=g))
    check(feats, h, w, conn, t)
