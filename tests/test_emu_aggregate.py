"""The CUDA kernel of ``aggregate_clusters`` in the emulation (``-k emu``) against the torch path.

The torch path is the reference kernel (``torch_kernels.aggregate_clusters``) in both of its
modes: the CPU's (float32 sums, K read on the host) and the GPU's (float64 sums, K = N).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends import emulation
from cuda_emu import build
from insid3_fast import ops, torch_kernels
from insid3_fast.errors import InputError


def _case(seed: int, n: int, k: int, p: float, d: int = 24, c: int = 40, dup: bool = False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    cand = torch.rand(n, generator=g) < p
    deb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    fmap = F.normalize(torch.randn(c, n, generator=g), dim=0)  # a (C, N) map: feats is its (N, C) view
    if dup:  # every cluster the same features: equal seed scores, the tie goes to the lowest label
        deb, fmap = deb[:1].expand(n, d).contiguous(), fmap[:, :1].expand(c, n).contiguous()
    proto = F.normalize(torch.randn(d, generator=g), dim=0)
    return labels, cand, deb, fmap.T, deb @ proto, proto


def _both_references(args, alpha):
    return (torch_kernels.aggregate_clusters(*args, alpha, clusters=int(args[0].max()) + 1),
            torch_kernels.aggregate_clusters(*args, alpha, clusters=None))


CASES = [  # (seed, N, K, candidate fraction): chunks of 512 patches, one cluster, no candidate, ...
    (0, 1, 1, 1.0), (1, 7, 3, 0.5), (2, 300, 20, 0.3), (3, 1100, 40, 0.2), (4, 513, 1, 0.9),
    (5, 200, 200, 0.5), (6, 64, 8, 0.0), (7, 400, 30, 1.0), (8, 1500, 700, 0.1),
]


@pytest.mark.parametrize("seed,n,k,p", CASES)
@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.01, 0.2])
def test_emu_aggregate_equals_both_torch_paths(seed, n, k, p, alpha):
    library = emulation()
    args = _case(seed, n, k, p)
    cpu, gpu = _both_references(args, alpha)
    with ops.use_library(library):
        got = ops.aggregate_clusters(*args, alpha)
    assert got.dtype == torch.bool and got.shape == (n,)
    assert torch.equal(got, cpu) and torch.equal(got, gpu)


def test_the_cases_have_masks_that_are_neither_empty_nor_full():
    """The comparisons above mean something: most cases select some clusters and not others."""
    mixed = 0
    for seed, n, k, p in CASES:
        args = _case(seed, n, k, p)
        mask = torch_kernels.aggregate_clusters(*args, 0.01, clusters=int(args[0].max()) + 1)
        mixed += bool(mask.any()) and not bool(mask.all())
    assert mixed >= len(CASES) // 2


def test_emu_aggregate_seed_tie_goes_to_the_lowest_label():
    library = emulation()
    labels, cand, deb, feats, sim, proto = _case(9, 300, 12, 0.5, dup=True)
    # Distinct weights per cluster, so the mask depends on which cluster is the seed (weight 1).
    cand = (labels % 3 == 0) | (torch.arange(300) % (labels + 2) == 0)
    args = (labels, cand, deb, feats, sim, proto)
    cpu, gpu = _both_references(args, 0.5)
    with ops.use_library(library):
        got = ops.aggregate_clusters(*args, 0.5)
    assert torch.equal(got, gpu) and torch.equal(got, cpu)


def test_emu_aggregate_non_finite_inputs_as_the_gpu_torch_path():
    library = emulation()
    labels, cand, deb, feats, sim, proto = _case(10, 200, 10, 0.5)
    sim = sim.clone()
    sim[labels == 3] = float("nan")
    deb = deb.clone()
    deb[labels == 5] = float("inf")
    args = (labels, cand, deb, feats.contiguous(), sim, proto)
    with ops.use_library(library):
        got = ops.aggregate_clusters(*args, 0.01)
    assert torch.equal(got, torch_kernels.aggregate_clusters(*args, 0.01, clusters=None))


def test_emu_aggregate_is_three_launches_and_reads_only_the_label_check():
    library = emulation()
    args = _case(11, 600, 25, 0.3)
    with ops.use_library(library):
        before = build.launch_count()
        ops.aggregate_clusters(*args, 0.01)
        assert build.launch_count() - before == 3
        with build.capturing():
            before = build.launch_count()
            ops.aggregate_clusters(*args, 0.01)
            assert build.launch_count() - before == 3


@pytest.mark.parametrize("bad", [-1, 600])
def test_aggregate_labels_out_of_range_are_refused_on_every_backend(bad):
    library = emulation()
    labels, *rest = _case(12, 600, 25, 0.3)
    labels = labels.clone()
    labels[17] = bad
    with pytest.raises(InputError, match="labels must lie in"):
        ops.aggregate_clusters(labels, *rest, 0.01)
    with ops.use_library(library), pytest.raises(InputError, match="labels must lie in"):
        ops.aggregate_clusters(labels, *rest, 0.01)


def test_emu_aggregate_wider_than_the_kernel_takes_the_torch_path():
    library = emulation()
    labels, cand, deb, _, sim, proto = _case(13, 50, 5, 0.5)
    wide = F.normalize(torch.randn(50, ops.AGGREGATE_MAX_WIDTH), dim=1)
    args = (labels, cand, deb, wide, sim, proto)
    with ops.use_library(library):
        with pytest.raises(RuntimeError, match="D \\+ C must be at most"):
            getattr(torch.ops, library).aggregate_clusters(*args, 0.01)
        got = ops.aggregate_clusters(*args, 0.01)
    assert torch.equal(got, torch_kernels.aggregate_clusters(*args, 0.01, clusters=None))


def test_aggregate_refuses_bad_shapes():
    labels, cand, deb, feats, sim, proto = _case(14, 20, 4, 0.5)
    with pytest.raises(InputError, match="prototype must be"):
        ops.aggregate_clusters(labels, cand, deb, feats, sim, proto[:-1], 0.1)
    with pytest.raises(InputError, match="candidates and sim"):
        ops.aggregate_clusters(labels, cand[:-1], deb, feats, sim, proto, 0.1)
    with pytest.raises(InputError, match="integer"):
        ops.aggregate_clusters(labels.float(), cand, deb, feats, sim, proto, 0.1)
    with pytest.raises(InputError, match="NaN"):
        ops.aggregate_clusters(labels, cand, deb, feats, sim, proto, float("nan"))
