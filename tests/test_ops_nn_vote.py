"""insid3_fast.ops.nn_vote (CPU kernel) against brute-force references.

The references use exact arithmetic: integer-valued features (every dot is exact) or
math.fsum of the exact float64 products of float32 values (correctly rounded dots).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from insid3_fast import ops


@pytest.fixture(autouse=True, scope="module", params=["fp32", "bf16"])
def gemm_mode(request):
    """Every test runs on both pre-filters of the kernel: the fp32 GEMM and the bf16 GEMM."""
    import os

    old = os.environ.get("INSID3_NN_VOTE")
    os.environ["INSID3_NN_VOTE"] = request.param
    yield request.param
    if old is None:
        del os.environ["INSID3_NN_VOTE"]
    else:
        os.environ["INSID3_NN_VOTE"] = old


def _exact_dots(keys: np.ndarray, q: np.ndarray) -> list[float]:
    prods = keys.astype(np.float64) * q.astype(np.float64)  # float32 products are exact in float64
    return [math.fsum(row) for row in prods]


def reference_nn_vote(queries, keys, key_mask, active):
    """Brute force: exact dots, argmax ties to the lowest index."""
    q_np, k_np, m_np, a_np = (t.numpy() for t in (queries, keys, key_mask, active))
    S, Q = k_np.shape[0], q_np.shape[0]
    votes = np.zeros(Q, dtype=np.int32)
    argmax = np.full((S, Q), -1, dtype=np.int64)
    for q in range(Q):
        if not a_np[q]:
            continue
        for s in range(S):
            dots = _exact_dots(k_np[s], q_np[q])
            best = max(dots)
            j = dots.index(best)  # first maximum = lowest index
            argmax[s, q] = j
            votes[q] += int(m_np[s, j])
    return torch.from_numpy(votes), torch.from_numpy(argmax)


def reference_int(queries, keys, key_mask, active):
    """Same for integer-valued data, vectorised (int64 dots are exact)."""
    scores = torch.einsum("smc,qc->sqm", keys.long(), queries.long())
    argmax = scores.argmax(-1)  # torch returns the first maximal index
    hit = torch.gather(key_mask.long(), 1, argmax)
    argmax[:, ~active] = -1
    votes = (hit * active.long()).sum(0).int()
    return votes, argmax


def check(queries, keys, key_mask, active, ref=reference_nn_vote):
    votes, argmax = ops.nn_vote(queries, keys, key_mask, active)
    assert votes.dtype == torch.int32 and argmax.dtype == torch.int64
    assert votes.shape == (queries.shape[0],) and argmax.shape == (keys.shape[0], queries.shape[0])
    rv, ra = ref(queries, keys, key_mask, active)
    torch.testing.assert_close(argmax, ra, rtol=0, atol=0)
    torch.testing.assert_close(votes, rv, rtol=0, atol=0)
    return votes, argmax


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_random_small_exact():
    g = torch.Generator().manual_seed(0)
    Q, S, M, C = 23, 3, 41, 17
    queries, keys = unit(torch.randn(Q, C, generator=g)), unit(torch.randn(S, M, C, generator=g))
    mask = torch.rand(S, M, generator=g) > 0.5
    active = torch.rand(Q, generator=g) > 0.3
    check(queries, keys, mask, active)


def test_matches_fp32_argmax_on_separated_data_many_tiles():
    g = torch.Generator().manual_seed(1)
    Q, S, M, C = 700, 2, 300, 64  # 700 active queries: three tiles of 256
    queries, keys = unit(torch.randn(Q, C, generator=g)), unit(torch.randn(S, M, C, generator=g))
    mask = torch.rand(S, M, generator=g) > 0.5
    active = torch.ones(Q, dtype=torch.bool)
    active[::7] = False
    votes, argmax = ops.nn_vote(queries, keys, mask, active)
    scores = torch.einsum("smc,qc->sqm", keys, queries)  # fp32
    top2 = scores.topk(2, dim=-1).values
    separated = (top2[..., 0] - top2[..., 1]) > 1e-3
    fp32_arg = scores.argmax(-1)
    sel = separated & active[None, :]
    assert sel.sum() > 1000
    assert torch.equal(argmax[sel], fp32_arg[sel])
    assert (argmax[:, ~active] == -1).all() and (votes[~active] == 0).all()
    ref_votes = torch.gather(mask.long(), 1, argmax.clamp(min=0)).mul(active.long()).sum(0).int()
    assert torch.equal(votes, ref_votes)


def test_near_ties_resolved_exactly():
    # Keys one ulp apart in some coordinates: their dots differ by ~1e-8, below the fp32 GEMM
    # error, so a plain fp32 argmax gets most of these wrong (checked below).
    g = torch.Generator().manual_seed(2)
    Q, M, C = 40, 64, 256
    queries = unit(torch.randn(Q, C, generator=g))
    base = unit(torch.randn(1, C, generator=g)).expand(M, C).clone()
    flip = torch.rand(M, C, generator=g) < 0.3
    up = torch.rand(M, C, generator=g) < 0.5
    away = torch.where(up, torch.tensor(2.0), torch.tensor(-2.0))
    keys = torch.where(flip, torch.nextafter(base, away), base)[None]
    queries[: Q // 2] = unit(base[:1] + 1e-3 * torch.randn(Q // 2, C, generator=g))
    mask = torch.zeros(1, M, dtype=torch.bool)
    mask[0, ::3] = True
    _, argmax = check(queries, keys, mask, torch.ones(Q, dtype=torch.bool))
    fp32_arg = torch.einsum("smc,qc->sqm", keys, queries).argmax(-1)
    assert (fp32_arg != argmax).sum() > 5  # the test data really needs the exact re-scoring


def test_duplicate_keys_tie_to_lowest_index():
    g = torch.Generator().manual_seed(3)
    Q, M, C = 30, 12, 8
    queries = unit(torch.randn(Q, C, generator=g))
    distinct = unit(torch.randn(4, C, generator=g))
    keys = distinct[torch.tensor([2, 0, 1, 3, 0, 2, 1, 3, 3, 0, 1, 2])][None]  # every key 3 times
    mask = torch.zeros(1, M, dtype=torch.bool)
    mask[0, 4:] = True  # only the later copies are in the mask: a wrong tie rule gives votes
    votes, argmax = check(queries, keys, mask, torch.ones(Q, dtype=torch.bool))
    assert (argmax < 4).all() and (votes == 0).all()


def test_integer_data_with_many_exact_ties():
    g = torch.Generator().manual_seed(4)
    Q, S, M, C = 300, 5, 200, 3
    queries = torch.randint(-2, 3, (Q, C), generator=g).float()
    keys = torch.randint(-2, 3, (S, M, C), generator=g).float()
    mask = torch.rand(S, M, generator=g) > 0.5
    active = torch.rand(Q, generator=g) > 0.2
    check(queries, keys, mask, active, ref=reference_int)


def test_all_features_identical():
    Q, S, M, C = 10, 2, 9, 5
    v = unit(torch.arange(1.0, C + 1))
    queries, keys = v.expand(Q, C).clone(), v.expand(S, M, C).clone()
    mask = torch.zeros(S, M, dtype=torch.bool)
    mask[0, 0] = True
    votes, argmax = check(queries, keys, mask, torch.ones(Q, dtype=torch.bool))
    assert (argmax == 0).all() and (votes == 1).all()


def test_one_patch():
    g = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(1, 6, generator=g), torch.randn(1, 1, 6, generator=g)
    votes, argmax = check(queries, keys, torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    assert votes.tolist() == [1] and argmax.tolist() == [[0]]


def test_one_shot_vs_five_shots_and_one_cell_masks():
    g = torch.Generator().manual_seed(6)
    Q, S, M, C = 50, 5, 35, 16  # M = 5 x 7, not a square
    queries, keys = unit(torch.randn(Q, C, generator=g)), unit(torch.randn(S, M, C, generator=g))
    mask = torch.zeros(S, M, dtype=torch.bool)
    for s in range(S):
        mask[s, (7 * s) % M] = True  # one cell per shot
    active = torch.ones(Q, dtype=torch.bool)
    votes, argmax = check(queries, keys, mask, active)
    total = torch.zeros(Q, dtype=torch.int32)
    for s in range(S):
        v1, a1 = ops.nn_vote(queries, keys[s : s + 1], mask[s : s + 1], active)
        assert torch.equal(a1[0], argmax[s])
        assert torch.equal(v1, (argmax[s] == (7 * s) % M).int())
        total += v1
    assert torch.equal(total, votes)


def test_inactive_queries():
    g = torch.Generator().manual_seed(7)
    queries, keys = torch.randn(8, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    votes, argmax = ops.nn_vote(queries, keys, mask, torch.zeros(8, dtype=torch.bool))
    assert (votes == 0).all() and (argmax == -1).all()
    active = torch.zeros(8, dtype=torch.bool)
    active[3] = True
    votes, argmax = check(queries, keys, mask, active)
    assert votes.tolist() == [0, 0, 0, 2, 0, 0, 0, 0]
    # default: every query active
    votes, argmax = ops.nn_vote(queries, keys, mask)
    assert (votes == 2).all() and (argmax >= 0).all()


def test_no_queries():
    votes, argmax = ops.nn_vote(torch.zeros(0, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    assert votes.shape == (0,) and argmax.shape == (2, 0)


def test_bad_inputs_raise():
    q, k = torch.randn(4, 3), torch.randn(1, 5, 3)
    m, a = torch.ones(1, 5, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    op = torch.ops.insid3_fast.nn_vote
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k, m, a)
    with pytest.raises(RuntimeError, match="bool"):
        op(q, k, m.float(), a)
    with pytest.raises(RuntimeError, match="keys"):
        op(q, torch.randn(1, 5, 4), m, a)
    with pytest.raises(RuntimeError, match="key_mask"):
        op(q, k, torch.ones(1, 4, dtype=torch.bool), a)
    with pytest.raises(RuntimeError, match="active"):
        op(q, k, m, torch.ones(3, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(Q=st.integers(1, 12), S=st.integers(1, 4), M=st.integers(1, 15), C=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_property_integer_data(Q, S, M, C, seed):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(-2, 3, (Q, C), generator=g).float()
    keys = torch.randint(-2, 3, (S, M, C), generator=g).float()
    mask = torch.rand(S, M, generator=g) > 0.5
    active = torch.rand(Q, generator=g) > 0.3
    check(queries, keys, mask, active, ref=reference_int)


@settings(max_examples=25, deadline=None)
@given(Q=st.integers(1, 6), M=st.integers(1, 12), C=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_property_float_data(Q, M, C, seed):
    g = torch.Generator().manual_seed(seed)
    queries, keys = torch.randn(Q, C, generator=g), torch.randn(2, M, C, generator=g)
    keys[1, M // 2] = keys[1, 0]  # an exact duplicate (ties to the lowest index)
    mask = torch.rand(2, M, generator=g) > 0.5
    check(queries, keys, mask, torch.ones(Q, dtype=torch.bool))
