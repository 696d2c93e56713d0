"""The CUDA kernels (csrc/cuda) against the CPU kernels (exact equality) and small references.

Every test runs on two backends (the ``backend`` fixture): ``cuda``, a real GPU (skipped where
none is visible), and ``emu``, the same kernel sources executed by the CPU emulation of CUDA's
execution model (tests/cuda_emu), which runs on every machine and CI run (``pytest -k emu``).
Sizes are reduced on ``emu`` where a case would take minutes there.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from insid3_fast import ops

from backends import Backend, has_cuda, tunable
from partitions import first_appearance, same_partition, stable_cpu_partition


@pytest.fixture(params=["cuda", "emu"])
def backend(request) -> Backend:
    return Backend(request.param)


def _has_cpu_kernel(name: str) -> bool:
    if ops.load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"insid3_fast::{name}", "CPU")


def _need_cpu(name: str) -> None:
    if not _has_cpu_kernel(name):
        pytest.skip(f"CPU kernel of insid3_fast::{name} is not registered: nothing to compare with")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# nn_vote
# --------------------------------------------------------------------------------------------

def _nn_vote_reference(queries, keys, key_mask, active):
    """Float64 argmax (ties to the lowest index) and votes, on the CPU."""
    q64, k64 = queries.double().cpu(), keys.double().cpu()
    scores = torch.einsum("smc,qc->sqm", k64, q64)
    argmax = scores.argmax(dim=2)  # first maximal index
    act = active.cpu()
    argmax[:, ~act] = -1
    S = keys.shape[0]
    votes = torch.zeros(queries.shape[0], dtype=torch.int32)
    for s in range(S):
        a = argmax[s]
        ok = a >= 0
        hit = torch.zeros_like(ok)
        hit[ok] = key_mask[s].cpu()[a[ok]]
        votes += hit.int()
    return votes, argmax


def _nn_case(seed, Q, S, M, C, kind="random", inactive_frac=0.2):
    g = _gen(seed)
    if kind == "random":
        queries = _unit(torch.randn(Q, C, generator=g))
        keys = _unit(torch.randn(S, M, C, generator=g))
    elif kind == "ties":
        # few distinct quantised keys, repeated: exact ties between different indices
        base = torch.randint(-2, 3, (S, max(1, M // 4), C), generator=g).float() / 4
        idx = torch.randint(0, base.shape[1], (M,), generator=g)
        keys = base[:, idx]
        queries = torch.randint(-2, 3, (Q, C), generator=g).float() / 4
    elif kind == "duplicates":
        keys = _unit(torch.randn(S, M, C, generator=g))
        keys[:, 1::2] = keys[:, 0::2][:, : keys[:, 1::2].shape[1]]
        queries = _unit(torch.randn(Q, C, generator=g))
        queries[1::2] = queries[0::2][: queries[1::2].shape[0]]
    elif kind == "near":
        # keys that differ by a few ulps in score: the fp32 GEMM cannot separate them
        base = _unit(torch.randn(S, 1, C, generator=g))
        keys = base + 1e-7 * torch.randn(S, M, C, generator=g)
        queries = _unit(base[0].expand(Q, C) + 1e-3 * torch.randn(Q, C, generator=g))
    else:
        raise ValueError(kind)
    key_mask = torch.rand(S, M, generator=g) < 0.5
    active = torch.rand(Q, generator=g) >= inactive_frac
    return queries.contiguous(), keys.contiguous(), key_mask, active


NN_CASES = [
    dict(seed=0, Q=300, S=1, M=200, C=64, kind="random"),
    dict(seed=1, Q=257, S=5, M=129, C=96, kind="random"),
    dict(seed=2, Q=200, S=3, M=64, C=16, kind="ties"),
    dict(seed=3, Q=128, S=5, M=100, C=32, kind="duplicates"),
    dict(seed=4, Q=64, S=2, M=300, C=384, kind="near"),
    dict(seed=5, Q=1, S=1, M=1, C=8, kind="random", inactive_frac=0.0),
    dict(seed=6, Q=1, S=5, M=7, C=3, kind="random", inactive_frac=0.0),
    dict(seed=7, Q=50, S=2, M=40, C=8, kind="random", inactive_frac=1.0),  # all inactive
]


@pytest.mark.parametrize("gemm", ["bf16", "fp32"])
@pytest.mark.parametrize("case", NN_CASES, ids=lambda c: f"{c['kind']}-Q{c['Q']}-S{c['S']}-M{c['M']}")
def test_nn_vote_matches_cpu(backend, case, gemm, monkeypatch):
    """Either GEMM of the device kernel (bf16 on the tensor cores, the default, or float32)
    gives the CPU kernel's exact argmax: only the candidate window differs."""
    _need_cpu("nn_vote")
    monkeypatch.setenv("INSID3_NN_VOTE", gemm)  # read by both kernels at each call
    q, k, km, act = _nn_case(**case)
    v_cpu, a_cpu = ops.nn_vote(q, k, km, act)
    v_gpu, a_gpu = backend.nn_vote(*map(backend.dev, (q, k, km, act)))
    assert v_gpu.dtype == torch.int32 and a_gpu.dtype == torch.int64
    assert backend.on_device(v_gpu) and backend.on_device(a_gpu)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    assert torch.equal(v_gpu.cpu(), v_cpu)


@pytest.mark.parametrize("case", [c for c in NN_CASES if c["kind"] in ("random", "ties", "duplicates")],
                         ids=lambda c: f"{c['kind']}-Q{c['Q']}-S{c['S']}")
def test_nn_vote_matches_float64_reference(backend, case):
    q, k, km, act = _nn_case(**case)
    v_ref, a_ref = _nn_vote_reference(q, k, km, act)
    v_gpu, a_gpu = backend.nn_vote(*map(backend.dev, (q, k, km, act)))
    assert torch.equal(a_gpu.cpu(), a_ref)
    assert torch.equal(v_gpu.cpu(), v_ref)
    assert torch.all(a_gpu.cpu()[:, ~act] == -1) and torch.all(v_gpu.cpu()[~act] == 0)


def test_nn_vote_exact_under_tf32(backend):
    """The exact argmax must not depend on the user's TF32 / matmul precision setting."""
    q, k, km, act = _nn_case(seed=11, Q=128, S=3, M=256, C=768, kind="near")
    _, a_ref = _nn_vote_reference(q, k, km, act)
    inputs = list(map(backend.dev, (q, k, km, act)))
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # the kernel then widens its error window
        _, a_tf32 = backend.nn_vote(*inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    _, a_ieee = backend.nn_vote(*inputs)
    assert torch.equal(a_tf32.cpu(), a_ieee.cpu())
    assert torch.equal(a_ieee.cpu(), a_ref)
    if _has_cpu_kernel("nn_vote"):
        _, a_cpu = ops.nn_vote(q, k, km, act)
        assert torch.equal(a_ieee.cpu(), a_cpu)


def test_nn_vote_large_tiled(backend):
    """Q * S * M above the score-buffer budget: several query tiles."""
    if backend.name == "emu":  # same tiling at a tenth of the size: a smaller budget
        q, k, km, act = _nn_case(seed=12, Q=300, S=5, M=250, C=32, kind="random")
        ctx = tunable("nn_vote.score_budget", 300 * 5 * 250 // 3)
    else:
        q, k, km, act = _nn_case(seed=12, Q=3000, S=5, M=2500, C=32, kind="random")
        ctx = contextlib.nullcontext()
    with ctx:
        v_gpu, a_gpu = backend.nn_vote(*map(backend.dev, (q, k, km, act)))
    v_ref, a_ref = _nn_vote_reference(q, k, km, act)
    assert torch.equal(a_gpu.cpu(), a_ref)
    assert torch.equal(v_gpu.cpu(), v_ref)


def test_nn_vote_rejects_empty_shots_like_cpu(backend):
    q = backend.dev(torch.randn(3, 4))
    k = backend.dev(torch.randn(2, 0, 4))
    km = backend.dev(torch.zeros(2, 0, dtype=torch.bool))
    act = backend.dev(torch.ones(3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="at least one key"):
        backend.raw.nn_vote(q, k, km, act)


def test_nn_vote_empty_and_single_inputs(backend):
    """No query, no shot, one query against one key: the CPU op's results."""
    for Q, S, M in [(0, 2, 3), (4, 0, 3), (1, 1, 1)]:
        q, k = torch.randn(Q, 4), torch.randn(S, M, 4)
        km, act = torch.ones(S, M, dtype=torch.bool), torch.ones(Q, dtype=torch.bool)
        v_gpu, a_gpu = backend.raw.nn_vote(*map(backend.dev, (q, k, km, act)))
        v_cpu, a_cpu = torch.ops.insid3_fast.nn_vote(q, k, km, act)
        assert torch.equal(v_gpu.cpu(), v_cpu) and torch.equal(a_gpu.cpu(), a_cpu)


def test_nn_vote_rejects_cpu_mixed_devices():
    if not has_cuda():
        pytest.skip("mixing devices needs a second device: a CUDA GPU")
    q, k, km, act = _nn_case(seed=13, Q=4, S=1, M=4, C=4)
    with pytest.raises((RuntimeError, ValueError)):
        torch.ops.insid3_fast.nn_vote(q.cuda(), k, km.cuda(), act.cuda())


# --------------------------------------------------------------------------------------------
# average linkage (dense)
# --------------------------------------------------------------------------------------------

def _greedy_average_linkage(dist: np.ndarray, thr: float) -> np.ndarray:
    """Naive scipy-style reference: merge the closest pair (ties: lowest (i, j)) while < thr."""
    n = dist.shape[0]
    D = np.triu(dist.astype(np.float64), 1)
    D = D + D.T
    active = np.ones(n, bool)
    size = np.ones(n)
    parent = np.arange(n)
    while active.sum() > 1:
        idx = np.flatnonzero(active)
        sub = D[np.ix_(idx, idx)].copy()
        np.fill_diagonal(sub, np.inf)
        flat = int(np.argmin(sub))
        a, b = divmod(flat, len(idx))
        i, j = sorted((idx[a], idx[b]))
        if not D[i, j] < thr:
            break
        for x in idx:
            if x != i and x != j:
                D[i, x] = D[x, i] = (size[i] * D[i, x] + size[j] * D[j, x]) / (size[i] + size[j])
        size[i] += size[j]
        active[j] = False
        parent[j] = i
    root = np.array([_root(parent, x) for x in range(n)])
    _, first = np.unique(root, return_index=True)
    order = {r: k for k, r in enumerate(root[np.sort(first)])}
    return np.array([order[r] for r in root], dtype=np.int64)


def _root(parent, x):
    while parent[x] != x:
        x = parent[x]
    return x


def _clustered_features(seed, n, c, k=6, noise=0.35, duplicates=False):
    g = _gen(seed)
    centers = _unit(torch.randn(k, c, generator=g))
    assign = torch.randint(0, k, (n,), generator=g)
    x = _unit(centers[assign] + noise * torch.randn(n, c, generator=g) / math.sqrt(c) * 4)
    if duplicates:
        x[1::3] = x[0::3][: x[1::3].shape[0]]
    return x.contiguous()


def _dist_of(x: torch.Tensor) -> torch.Tensor:
    return (1 - (x @ x.T).clamp(-1, 1)).float().contiguous()


DENSE_CASES = [
    dict(seed=20, n=1, c=8, thr=0.4),
    dict(seed=21, n=2, c=8, thr=1.5),
    dict(seed=22, n=37, c=16, thr=0.4),
    dict(seed=23, n=300, c=32, thr=0.4),
    dict(seed=24, n=500, c=64, thr=0.6),
    dict(seed=25, n=200, c=32, thr=0.4, duplicates=True),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"n{c['n']}-thr{c['thr']}-dup{c.get('duplicates', False)}")
def test_average_linkage_precomputed_matches_cpu_and_reference(backend, case):
    x = _clustered_features(case["seed"], case["n"], case["c"], duplicates=case.get("duplicates", False))
    dist = _dist_of(x)
    lab_gpu = backend.average_linkage_precomputed(backend.dev(dist), case["thr"]).cpu()
    assert lab_gpu.dtype == torch.int64 and lab_gpu.shape == (case["n"],)
    assert first_appearance(lab_gpu)
    if _has_cpu_kernel("average_linkage_precomputed"):
        lab_cpu = ops.average_linkage_precomputed(dist, case["thr"])
        assert torch.equal(lab_gpu, lab_cpu)
    if case["n"] <= 300:
        ref = torch.from_numpy(_greedy_average_linkage(dist.numpy(), case["thr"]))
        assert same_partition(lab_gpu, ref)


def test_average_linkage_precomputed_tie_heavy(backend):
    """Quantised distances (many exact ties) and an asymmetric input (upper triangle is used)."""
    g = _gen(30)
    n = 160
    d = torch.randint(0, 6, (n, n), generator=g).float() / 10
    d = torch.triu(d, 1)
    d = d + d.T
    d_asym = d.clone()
    d_asym[torch.tril(torch.ones(n, n, dtype=torch.bool), -1)] = 5.0  # lower triangle ignored
    lab = backend.average_linkage_precomputed(backend.dev(d), 0.25).cpu()
    lab_asym = backend.average_linkage_precomputed(backend.dev(d_asym), 0.25).cpu()
    assert torch.equal(lab, lab_asym)
    assert first_appearance(lab)
    # deterministic run to run (atomics only build an unordered pair list)
    assert torch.equal(lab, backend.average_linkage_precomputed(backend.dev(d), 0.25).cpu())
    # Not compared with the CPU kernel: with exact ties between *different* candidate merges
    # the partition is not unique; the CPU runs scipy's NN-chain (its own tie preferences),
    # the GPU reciprocal-NN rounds (ties to the lowest index).


def _rnn_rounds(dist: np.ndarray, thr: float) -> np.ndarray:
    """The device's reciprocal-NN rounds written plainly: full row scans every round, ties to
    the lowest index, the same update formulas in the same order (inner average over the lower
    survivor's pair). Labels by first appearance."""
    n = dist.shape[0]
    D = np.triu(dist.astype(np.float64), 1)
    D = D + D.T
    size, active, parent = np.ones(n), np.ones(n, bool), np.arange(n)

    def avg(a, b, na, nb):
        return (na * a + nb * b) / (na + nb)

    while True:
        nn = np.full(n, -1)
        for i in np.flatnonzero(active):
            row = np.where(active, D[i], np.inf)
            row[i] = np.inf
            if np.isfinite(row).any():
                nn[i] = int(np.argmin(row))  # first minimum: the lowest index
        pairs = [(i, int(nn[i])) for i in np.flatnonzero(active)
                 if nn[i] > i and nn[nn[i]] == i and D[i, nn[i]] < thr]
        if not pairs:
            break
        mate = {i: k for i, k in pairs}
        absorbed = {k for _, k in pairs}
        D0 = D.copy()
        for i, k in pairs:
            for x in np.flatnonzero(active):
                if x in (i, k) or x in absorbed or (x in mate and x < i):
                    continue
                a = avg(D0[i, x], D0[k, x], size[i], size[k])
                if x in mate:  # survivor x > i of pair (x, l)
                    l = mate[x]
                    a = avg(a, avg(D0[i, l], D0[k, l], size[i], size[k]), size[x], size[l])
                D[i, x] = D[x, i] = a
        for i, k in pairs:
            size[i] += size[k]
            active[k] = False
            parent[k] = i
    root = np.arange(n)
    for x in range(n):
        r = x
        while parent[r] != r:
            r = parent[r]
        root[x] = r
    _, labels = np.unique(root, return_inverse=True)  # roots are their clusters' smallest index
    return labels


@pytest.mark.parametrize("rounds", [0, 2, 64])
def test_average_linkage_rounds_equal_plain_rounds_on_ties(backend, rounds):
    """Tie-heavy distances: the device rounds (incremental neighbour search, fused launches,
    the one-block tail) give exactly the partition of plain full-scan rounds, whichever part of
    the clustering the tail runs."""
    if backend.name != "emu":
        pytest.skip("the chunk size is a tunable of the emulated build only")
    g = _gen(31)
    n = 120
    d = torch.randint(0, 6, (n, n), generator=g).float() / 10
    d = torch.triu(d, 1)
    d = d + d.T
    expect = torch.from_numpy(_rnn_rounds(d.numpy(), 0.35))
    assert expect.max() < n - 10  # many merges
    with tunable("average_linkage.first_chunk_rounds", rounds):
        lab = backend.average_linkage_precomputed(backend.dev(d), 0.35).cpu()
    assert torch.equal(lab, expect)


@pytest.mark.parametrize("n,thr", [(1, 0.4), (64, 0.4), (400, 0.4), (300, 0.8)])
def test_average_linkage_features_matches_cpu(backend, n, thr):
    x = _clustered_features(40 + n, n, 48)
    lab_gpu = backend.average_linkage(backend.dev(x), thr).cpu()
    assert first_appearance(lab_gpu)
    _need_cpu("average_linkage")
    # the CPU's partition, checked to hold for any GEMM's rounding (a GPU's Gram is cuBLAS's)
    expect = stable_cpu_partition(x, thr)
    assert same_partition(lab_gpu, expect)
    # the precomputed path on distances from the device's own GEMM gives them too
    xg = backend.dev(x)
    dist = (1 - (xg @ xg.T).clamp(-1, 1)).float()
    assert same_partition(expect, backend.average_linkage_precomputed(dist, thr).cpu())


@pytest.mark.parametrize("rows,n,threads", [(1, 9, 256), (7, 150, 32), (64, 129, 256), (512, 513, 32),
                                           (512, 513, 64)])
def test_average_linkage_features_gram_strips(backend, rows, n, threads):
    """The Gram row blocks go into the distance matrix's own storage and are widened in place,
    in descending column chunks of 8 x threads: any strip height (one row, a last strip of one
    row, N not a multiple of it) and rows of several chunks give the CPU partition."""
    if backend.name != "emu":
        pytest.skip("the strip height is a tunable of the emulated build only")
    x = _clustered_features(70 + n, n, 32)
    with tunable("average_linkage.gram_rows", rows), tunable("average_linkage.widen_threads", threads):
        lab = backend.average_linkage(backend.dev(x), 0.4).cpu()
    assert first_appearance(lab)
    assert same_partition(lab, ops.average_linkage(x, 0.4))


def test_average_linkage_everything_merges_and_nothing_merges(backend):
    x = _clustered_features(50, 120, 16)
    assert backend.average_linkage(backend.dev(x), 10.0).cpu().max().item() == 0
    assert torch.equal(backend.average_linkage(backend.dev(x), -1.0).cpu(), torch.arange(120))


def test_average_linkage_empty_input(backend):
    for op, arg in ((backend.raw.average_linkage, torch.zeros(0, 8)),
                    (backend.raw.average_linkage_precomputed, torch.zeros(0, 0))):
        out = op(backend.dev(arg), 0.4)
        assert out.shape == (0,) and out.dtype == torch.int64


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _same_rejection(backend, op: str, *args) -> str:
    """The raw op rejects args on the CPU and on `backend` with the same message; returns it."""
    with pytest.raises(RuntimeError) as cpu_err:
        getattr(torch.ops.insid3_fast, op)(*args)
    with pytest.raises(RuntimeError) as dev_err:
        getattr(backend.raw, op)(*(backend.dev(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert _first_line(dev_err.value) == _first_line(cpu_err.value)
    return _first_line(cpu_err.value)


NON_FINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_input_is_rejected_like_cpu(backend, bad):
    """One rule on every backend: non-finite input is an error naming the op and the argument."""
    x = _clustered_features(51, 40, 16)
    d = _dist_of(x)
    x_bad, d_bad, d_low = x.clone(), d.clone(), d.clone()
    x_bad[3, 5] = bad
    d_bad[3, 5] = bad
    d_low[5, 3] = bad  # the lower triangle too (scikit-learn checks the whole matrix)
    q, k, km, act = _nn_case(seed=52, Q=20, S=2, M=10, C=16)
    q_bad, k_bad = q.clone(), k.clone()
    q_bad[4, 2] = bad
    k_bad[1, 0, 0] = bad  # key 0 of a shot: it used to win every query
    assert "features must be finite" in _same_rejection(backend, "average_linkage", x_bad, 0.4)
    assert "dist must be finite" in _same_rejection(backend, "average_linkage_precomputed", d_bad, 0.4)
    assert "dist must be finite" in _same_rejection(backend, "average_linkage_precomputed", d_low, 0.4)
    assert "features must be finite" in _same_rejection(backend, "grid_average_linkage", x_bad, 8, 5, 4, 0.4)
    assert "queries must be finite" in _same_rejection(backend, "nn_vote", q_bad, k, km, act)
    assert "keys must be finite" in _same_rejection(backend, "nn_vote", q, k_bad, km, act)


def test_overflowing_magnitudes_and_nan_threshold_are_rejected_like_cpu(backend):
    q, k, km, act = _nn_case(seed=53, Q=8, S=1, M=6, C=16)
    assert "too large" in _same_rejection(backend, "nn_vote", q * 1e16, k * 1e16, km, act)
    x = _clustered_features(54, 30, 16)
    assert "too large" in _same_rejection(backend, "average_linkage", x * 1e16, 0.4)
    for op, args in (("average_linkage", (x,)), ("average_linkage_precomputed", (_dist_of(x),)),
                     ("grid_average_linkage", (x, 6, 5, 4))):
        assert "threshold must not be NaN" in _same_rejection(backend, op, *args, float("nan"))


def test_nn_vote_exact_ties_go_to_the_lowest_index(backend):
    """Keys of +-1/sqrt(524) entries: different keys with exactly equal dot products, which a
    float64 sum can separate; the exact rule returns the lowest index on both backends."""
    g = _gen(55)
    C = 524
    base = torch.where(torch.rand(64, C, generator=g) < 0.5, -1.0, 1.0) / math.sqrt(C)
    keys = base[None].float().contiguous()
    perm = torch.randperm(C, generator=g)
    queries = base[:, perm][:16].float().contiguous()  # permuted copies: many exact ties
    km = torch.ones(1, 64, dtype=torch.bool)
    act = torch.ones(16, dtype=torch.bool)
    _, a_cpu = torch.ops.insid3_fast.nn_vote(queries, keys, km, act)
    _, a_dev = backend.raw.nn_vote(*map(backend.dev, (queries, keys, km, act)))
    assert torch.equal(a_dev.cpu(), a_cpu)
    # every entry is +-a with the same a: the exact dot is a^2 times the integer dot of the signs
    exact = queries.sign().long() @ keys[0].sign().long().T
    best = exact.max(dim=1, keepdim=True).values
    first = torch.argmax((exact == best).int(), dim=1)
    assert torch.equal(a_cpu[0], first)


@pytest.mark.parametrize("rounds", [0, 1, 5])
def test_average_linkage_small_chunks_converge(backend, rounds):
    """Chunks of a few rounds (the one-block tail kernel finishes the job): same labels."""
    if backend.name != "emu":
        pytest.skip("the chunk size is a tunable of the emulated build only")
    x = _clustered_features(52, 200, 16)
    with tunable("average_linkage.first_chunk_rounds", rounds):
        lab = backend.average_linkage(backend.dev(x), 0.5).cpu()
    assert torch.equal(lab, ops.average_linkage(x, 0.5))


def test_cluster_and_vote_equals_the_two_ops_on_cuda(backend):
    g = _gen(77)
    n = 500 if backend.name == "cuda" else 200
    x = _clustered_features(77, n, 32)
    queries = _unit(torch.randn(n, 32, generator=g))
    keys = _unit(torch.randn(2, 300, 32, generator=g))
    key_mask = torch.rand(2, 300, generator=g) > 0.5
    active = torch.rand(n, generator=g) > 0.2
    cuda = [backend.dev(t) for t in (queries, keys, key_mask, active)]
    labels, votes, argmax = backend.cluster_and_vote(backend.dev(x), 0.4, *cuda)
    assert backend.on_device(labels) and backend.on_device(votes) and backend.on_device(argmax)
    assert torch.equal(labels, backend.average_linkage(backend.dev(x), 0.4))
    v, a = backend.nn_vote(*cuda)
    assert torch.equal(votes, v) and torch.equal(argmax, a)
    if _has_cpu_kernel("cluster_and_vote"):
        cpu = ops.cluster_and_vote(x, 0.4, queries, keys, key_mask, active)
        assert torch.equal(cpu[0], stable_cpu_partition(x, 0.4))  # no near-tie: any GEMM gives it
        assert same_partition(labels, cpu[0])
        assert torch.equal(votes.cpu(), cpu[1]) and torch.equal(argmax.cpu(), cpu[2])


def test_the_gpu_only_case_holds_no_near_tie():
    """The cluster_and_vote case that only a GPU runs at full size (n = 500) compares its labels
    with the CPU's: checked here that no GEMM's rounding could change that partition."""
    _need_cpu("average_linkage")
    stable_cpu_partition(_clustered_features(77, 500, 32), 0.4)


def test_the_near_tie_check_can_fail():
    """Two rows whose cosine distance is the threshold less 1e-7: a GEMM's rounding decides."""
    _need_cpu("average_linkage")
    thr = 0.4
    angle = math.acos(1 - (thr - 1e-7))
    x = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]])
    with pytest.raises(AssertionError, match="near-tie"):
        stable_cpu_partition(x, thr)
    stable_cpu_partition(x, thr + 1e-3)  # far from the threshold: one cluster, whatever the rounding


@pytest.mark.slow
def test_average_linkage_paper_size(backend):
    """N = 4096, C = 1024 structured features (the paper's grid; 1024 = the 512 px grid on emu)."""
    _need_cpu("average_linkage_precomputed")
    n = 4096 if backend.name == "cuda" else 1024
    x = _clustered_features(60, n, 1024, k=40, noise=0.5)
    dist = _dist_of(x)
    assert torch.equal(backend.average_linkage_precomputed(backend.dev(dist), 0.4).cpu(),
                       ops.average_linkage_precomputed(dist, 0.4))


# --------------------------------------------------------------------------------------------
# grid average linkage
# --------------------------------------------------------------------------------------------

def _grid_reference(x: np.ndarray, h: int, w: int, conn: int, thr: float) -> np.ndarray:
    """Plain RNN rounds with sum vectors (the documented semantics), float64 numpy."""
    n = h * w
    rep = np.arange(n)
    sums = x.astype(np.float64).copy()
    cnt = np.ones(n)
    dirs = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if conn == 8 else [])
    edges = []
    for y in range(h):
        for xx in range(w):
            for dy, dx in dirs:
                ny, nx = y + dy, xx + dx
                if 0 <= ny < h and 0 <= nx < w:
                    edges.append((y * w + xx, ny * w + nx))
    while True:
        best = {}
        for p, q in edges:
            a, b = rep[p], rep[q]
            if a == b:
                continue
            d = 1.0 - float(sums[a] @ sums[b]) / (cnt[a] * cnt[b])
            for u, v in ((a, b), (b, a)):
                cur = best.get(u)
                if cur is None or d < cur[0] or (d == cur[0] and v < cur[1]):
                    best[u] = (d, v)
        merged = False
        for a, (d, b) in best.items():
            if a < b and best[b][1] == a and d < thr:
                sums[a] = sums[a] + sums[b]
                cnt[a] += cnt[b]
                rep[rep == b] = a
                merged = True
        if not merged:
            break
    _, first = np.unique(rep, return_index=True)
    order = {r: k for k, r in enumerate(rep[np.sort(first)])}
    return np.array([order[r] for r in rep], dtype=np.int64)


GRID_CASES = [
    dict(h=1, w=1, conn=4, thr=0.4),
    dict(h=1, w=9, conn=4, thr=0.4),
    dict(h=8, w=8, conn=4, thr=0.4),
    dict(h=8, w=8, conn=8, thr=0.4),
    dict(h=16, w=12, conn=4, thr=0.6),
    dict(h=16, w=12, conn=8, thr=0.3),
]


def _grid_features(seed, h, w, c=24, duplicates=False):
    g = _gen(seed)
    # smooth-ish field: a few regions plus noise, so that clusters grow over several rounds
    k = 4
    centers = _unit(torch.randn(k, c, generator=g))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region = ((yy * 2 // max(h, 1)) * 2 + (xx * 2 // max(w, 1))).reshape(-1) % k
    x = _unit(centers[region] + 0.6 * torch.randn(h * w, c, generator=g) / math.sqrt(c) * 3)
    if duplicates:
        x = torch.round(x * 2) / 2  # quantised: many identical vectors and exact linkage ties
        x = _unit(x + (x.norm(dim=1, keepdim=True) == 0).float())
    return x.contiguous()


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"{c['h']}x{c['w']}-c{c['conn']}-thr{c['thr']}")
@pytest.mark.parametrize("duplicates", [False, True])
def test_grid_average_linkage_matches_cpu_and_reference(backend, case, duplicates):
    h, w, conn, thr = case["h"], case["w"], case["conn"], case["thr"]
    x = _grid_features(70 + h * w + conn, h, w, duplicates=duplicates)
    lab_gpu = backend.grid_average_linkage(backend.dev(x), h, w, conn, thr).cpu()
    assert lab_gpu.dtype == torch.int64 and lab_gpu.shape == (h * w,)
    assert first_appearance(lab_gpu)
    if _has_cpu_kernel("grid_average_linkage"):
        assert torch.equal(lab_gpu, ops.grid_average_linkage(x, h, w, conn, thr))
    if not duplicates:  # float64 numpy dot differs from the sequential fma only on exact ties
        ref = torch.from_numpy(_grid_reference(x.numpy(), h, w, conn, thr))
        assert same_partition(lab_gpu, ref)


def test_grid_clusters_are_connected(backend):
    h, w = 20, 20
    x = _grid_features(90, h, w)
    for conn in (4, 8):
        lab = backend.grid_average_linkage(backend.dev(x), h, w, conn, 0.5).cpu().reshape(h, w)
        for k in lab.unique().tolist():
            cells = {tuple(p) for p in (lab == k).nonzero().tolist()}
            start = next(iter(cells))
            seen, stack = {start}, [start]
            nbrs = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if conn == 8 else [])
            while stack:
                y, xx = stack.pop()
                for dy, dx in nbrs:
                    nb = (y + dy, xx + dx)
                    if nb in cells and nb not in seen:
                        seen.add(nb)
                        stack.append(nb)
            assert seen == cells, f"cluster {k} is not {conn}-connected"


def test_grid_average_linkage_empty_and_one(backend):
    for h, w in [(0, 0), (0, 5), (1, 1)]:
        x = torch.ones(h * w, 8) / 8 ** 0.5
        out = backend.raw.grid_average_linkage(backend.dev(x), h, w, 4, 0.4).cpu()
        assert torch.equal(out, torch.ops.insid3_fast.grid_average_linkage(x, h, w, 4, 0.4))


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_grid_average_linkage_small_chunks_converge(backend, rounds):
    if backend.name != "emu":
        pytest.skip("the chunk size is a tunable of the emulated build only")
    x = _grid_features(92, 12, 10)
    with tunable("grid_average_linkage.first_chunk_rounds", rounds):
        lab = backend.grid_average_linkage(backend.dev(x), 12, 10, 4, 0.6).cpu()
    assert torch.equal(lab, ops.grid_average_linkage(x, 12, 10, 4, 0.6))


@pytest.mark.slow
def test_grid_average_linkage_paper_size(backend):
    _need_cpu("grid_average_linkage")
    side = 64 if backend.name == "cuda" else 32
    x = _grid_features(91, side, side, c=1024)
    for conn in (4, 8):
        assert torch.equal(backend.grid_average_linkage(backend.dev(x), side, side, conn, 0.4).cpu(),
                           ops.grid_average_linkage(x, side, side, conn, 0.4))


def test_ops_run_on_current_stream_without_sync_errors():
    """Ops on a side stream give the same results (stream handling)."""
    if not has_cuda():
        pytest.skip("streams exist on a CUDA device only (the emulation has one in-order queue)")
    x = _clustered_features(95, 256, 32)
    ref = ops.average_linkage(x.cuda(), 0.4).cpu()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = ops.average_linkage(x.cuda(), 0.4)
    s.synchronize()
    assert torch.equal(out.cpu(), ref)
