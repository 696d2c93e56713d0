"""insid3_fast.ops.cluster_and_vote (CPU kernel): the fused op equals its two parts.

The CPU kernel runs the NN-chain on one thread of an OpenMP team while the others vote on
ranges of queries, so these tests vary the thread count, the number of ranges and the shots,
and compare with average_linkage + nn_vote, scikit-learn and a brute-force exact argmax.
"""

from __future__ import annotations

import pytest
import torch
from partitions import same_partition
from test_ops_average_linkage import cosine_dist, sklearn_labels
from test_ops_nn_vote import reference_nn_vote

from insid3_fast import ops
from insid3_fast.errors import InputError


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    """Thread counts: 1 runs the two parts in a row, 2 and 3 overlap them (3 oversubscribes here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(params=["fp32", "bf16"])
def gemm_mode(request, monkeypatch):
    monkeypatch.setenv("INSID3_NN_VOTE", request.param)
    return request.param


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def episode(n, S, C, seed, active_frac=0.9, clusters=6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, C, generator=g)
    feats = unit(centres[torch.randint(0, clusters, (n,), generator=g)] + 0.4 * torch.randn(n, C, generator=g))
    queries = unit(torch.randn(n, C, generator=g))
    keys = unit(torch.randn(S, n, C, generator=g))
    key_mask = torch.rand(S, n, generator=g) > 0.6
    active = torch.rand(n, generator=g) < active_frac
    return feats, queries, keys, key_mask, active


def check_equal_to_parts(feats, t, queries, keys, key_mask, active):
    labels, votes, argmax = ops.cluster_and_vote(feats, t, queries, keys, key_mask, active)
    assert labels.dtype == torch.int64 and votes.dtype == torch.int32 and argmax.dtype == torch.int64
    assert torch.equal(labels, ops.average_linkage(feats, t))
    v, a = ops.nn_vote(queries, keys, key_mask, active)
    assert torch.equal(votes, v) and torch.equal(argmax, a)
    return labels, votes, argmax


@pytest.mark.parametrize("S", [1, 5])
def test_equals_the_two_ops_over_many_ranges(threads, gemm_mode, S):
    # 700 patches, about 630 active: several 128-query ranges per thread.
    feats, *vote_inputs = episode(700, S, 48, seed=S)
    check_equal_to_parts(feats, 0.4, *vote_inputs)


def test_equals_scikit_learn_and_the_exact_argmax(threads, gemm_mode):
    feats, queries, keys, key_mask, active = episode(150, 3, 16, seed=7)
    labels, votes, argmax = ops.cluster_and_vote(feats, 0.5, queries, keys, key_mask, active)
    assert same_partition(labels.numpy(), sklearn_labels(cosine_dist(feats).numpy(), 0.5))
    rv, ra = reference_nn_vote(queries, keys, key_mask, active)
    assert torch.equal(votes, rv) and torch.equal(argmax, ra)


def test_transposed_feature_map_view(threads):
    feats, queries, keys, key_mask, active = episode(300, 1, 32, seed=3)
    fmap = feats.T.contiguous()  # (C, N), as the pipeline holds the target features
    labels, _, _ = ops.cluster_and_vote(fmap.T, 0.4, queries, keys, key_mask, active)
    assert torch.equal(labels, ops.average_linkage(feats, 0.4))


def test_identical_features_and_duplicate_keys(threads):
    n, C = 300, 8
    feats = unit(torch.ones(n, C))
    queries = unit(torch.ones(n, C))
    keys = unit(torch.ones(2, n, C))
    key_mask = torch.zeros(2, n, dtype=torch.bool)
    key_mask[:, 0] = True  # every key ties: the argmax is index 0, inside the mask
    labels, votes, argmax = check_equal_to_parts(feats, 0.4, queries, keys, key_mask, torch.ones(n, dtype=torch.bool))
    assert labels.unique().numel() == 1
    assert bool((argmax == 0).all()) and bool((votes == 2).all())


def test_no_active_query_one_patch_and_no_shot(threads):
    feats, queries, keys, key_mask, _ = episode(200, 2, 16, seed=5)
    check_equal_to_parts(feats, 0.4, queries, keys, key_mask, torch.zeros(200, dtype=torch.bool))
    one = unit(torch.randn(1, 16))
    labels, votes, argmax = check_equal_to_parts(one, 0.4, one, one[None], torch.ones(1, 1, dtype=torch.bool),
                                                 torch.ones(1, dtype=torch.bool))
    assert labels.tolist() == [0] and votes.tolist() == [1] and argmax.tolist() == [[0]]
    check_equal_to_parts(feats, 0.4, queries, keys[:0], key_mask[:0], torch.ones(200, dtype=torch.bool))


def test_errors_are_raised_not_crashes(threads):
    feats, queries, keys, key_mask, active = episode(64, 1, 8, seed=2)
    bad = feats.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(InputError, match="features must be finite"):
        ops.cluster_and_vote(bad, 0.4, queries, keys, key_mask, active)
    with pytest.raises(RuntimeError, match="cluster_and_vote: features must be finite"):
        torch.ops.insid3_fast.cluster_and_vote(bad, 0.4, queries, keys, key_mask, active)
    with pytest.raises(InputError, match="at least one key"):
        ops.cluster_and_vote(feats, 0.4, queries, keys[:, :0], key_mask[:, :0], active)
    with pytest.raises(RuntimeError, match="at least one key"):
        torch.ops.insid3_fast.cluster_and_vote(feats, 0.4, queries, keys[:, :0], key_mask[:, :0], active)
    with pytest.raises(InputError):
        ops.cluster_and_vote(feats, 0.4, queries, keys, key_mask[:, :5], active)
    with pytest.raises(InputError):
        ops.cluster_and_vote(feats[None], 0.4, queries, keys, key_mask, active)


def test_fake_kernel_and_schema():
    feats, queries, keys, key_mask, active = episode(40, 2, 8, seed=1)
    torch.library.opcheck(torch.ops.insid3_fast.cluster_and_vote.default,
                          (feats, 0.4, queries, keys, key_mask, active),
                          test_utils=("test_schema", "test_faketensor"))
