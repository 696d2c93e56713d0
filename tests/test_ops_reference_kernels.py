"""ops.*(kernels="reference"): the plain torch / scikit-learn kernels give the compiled kernels' results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insid3_fast import ops
from insid3_fast.errors import InputError

needs_native = pytest.mark.skipif(not ops.native_available(), reason="native ops not built")


def _inputs(n: int, c: int, shots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, c, generator=g), dim=1)
    keys = F.normalize(torch.randn(shots, 50, c, generator=g), dim=2)
    key_mask = torch.rand(shots, 50, generator=g) > 0.5
    active = torch.rand(n, generator=g) > 0.3
    return x, keys, key_mask, active


@needs_native
@pytest.mark.parametrize("n,c,shots,seed", [(64, 16, 1, 0), (200, 32, 3, 1), (1, 8, 1, 2), (2, 8, 2, 3)])
def test_cluster_and_vote_reference_equals_native(n, c, shots, seed):
    x, keys, key_mask, active = _inputs(n, c, shots, seed)
    native = ops.cluster_and_vote(x, 0.4, x, keys, key_mask, active)
    ref = ops.cluster_and_vote(x, 0.4, x, keys, key_mask, active, kernels="reference")
    for a, b in zip(native, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(ops.nn_vote(x, keys, key_mask, kernels="reference")[0], ops.nn_vote(x, keys, key_mask)[0])
    dist = (1 - (x @ x.T).clamp(-1, 1)).contiguous()
    assert torch.equal(ops.average_linkage_precomputed(dist, 0.4, kernels="reference"),
                       ops.average_linkage_precomputed(dist, 0.4))


@needs_native
@pytest.mark.parametrize("h,w,connectivity", [(8, 8, 4), (10, 20, 8), (1, 1, 4)])
def test_grid_linkage_reference_equals_native(h, w, connectivity):
    x, _, _, _ = _inputs(h * w, 16, 1, h + w)
    assert torch.equal(ops.grid_average_linkage(x, h, w, connectivity, 0.6, kernels="reference"),
                       ops.grid_average_linkage(x, h, w, connectivity, 0.6))


def test_reference_kernels_check_the_same_wrapper_rules():
    x, keys, key_mask, _ = _inputs(8, 4, 1, 0)
    with pytest.raises(InputError, match="key_mask must be"):
        ops.nn_vote(x, keys, key_mask[:, :3], kernels="reference")
    with pytest.raises(InputError, match="threshold must not be NaN"):
        ops.average_linkage(x, float("nan"), kernels="reference")
    with pytest.raises(InputError, match="kernels must be one of"):
        ops.average_linkage(x, 0.4, kernels="fast")


def test_reference_labels_number_clusters_by_first_appearance():
    x = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.01]]), dim=1)
    assert ops.average_linkage(x, 0.1, kernels="reference").tolist() == [0, 1, 0, 1]
