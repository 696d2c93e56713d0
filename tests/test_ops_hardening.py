"""Hostile-input regressions of the native CPU ops (issue 12, "Hardening"): each test failed on the
kernels before the fix (overflowing sizes, aborts under memory pressure, non-finite and
overflowing input accepted, a tie split by double rounding)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch

from insid3_fast import ops
from insid3_fast.errors import InputError

RAW = torch.ops.insid3_fast
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["fp32", "bf16"])
def gemm_mode(request, monkeypatch):
    monkeypatch.setenv("INSID3_NN_VOTE", request.param)
    return request.param


def _run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# ---- 1. size products -------------------------------------------------------------------------

def test_grid_size_product_overflow_is_refused():
    feats = torch.randn(4, 3)
    with pytest.raises(InputError, match="h \\* w .*overflows int64"):
        ops.grid_average_linkage(feats, np.int64(4), np.int64(2**62 + 1), 4, 0.5)
    with pytest.raises(RuntimeError, match="grid_average_linkage: the grid size h \\* w .*overflows int64"):
        RAW.grid_average_linkage(feats, 4, 2**62 + 1, 4, 0.5)
    with pytest.raises(RuntimeError, match="overflows int64"):
        RAW.grid_average_linkage(feats, 2**32, 2**32, 4, 0.5)  # wraps to 0 in int64


def test_grid_sizes_are_ints_not_bools_or_floats():
    feats = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    want = ops.grid_average_linkage(feats, 2, 3, 4, 0.5)
    assert torch.equal(ops.grid_average_linkage(feats, np.int64(2), np.int32(3), np.int64(4), np.float32(0.5)), want)
    for h, w, conn in ((2.0, 3, 4), (True, 6, 4), (np.float64(2), 3, 4), (2, 3, True), (2, 3, 4.0), ("2", 3, 4),
                       (2, 3, 6), (-2, -3, 4), (0, 2**63, 4)):
        with pytest.raises(InputError):
            ops.grid_average_linkage(feats if h != 0 else feats[:0], h, w, conn, 0.5)


def test_linkage_pair_count_overflow_is_refused():
    for n in (2**31, 2**40, 2**62):  # (N, 0) features exist for any N
        with pytest.raises(InputError, match="overflows int64"):
            ops.average_linkage(torch.empty(n, 0), 0.5)
        with pytest.raises(RuntimeError, match="average_linkage: .*overflows int64"):
            RAW.average_linkage(torch.empty(n, 0), 0.5)


# ---- 2. allocation failures -------------------------------------------------------------------

def test_allocation_failure_in_all_tied_vote_is_an_exception_not_an_abort():
    """All keys tie, so the old candidate list grew to every key inside the OpenMP region; under a
    memory cap its std::bad_alloc aborted the process (SIGABRT). Sweep caps around the op's needs:
    every call must either succeed (with the lowest index) or raise. fp32 pre-filter only: under
    an address-space cap, torch's oneDNN bf16 matmul itself can segfault when an allocation
    fails (in dnnl::impl::matmul_pd_t's copy, inside at::mm), which no caller can catch."""
    code = """
        import os, resource, torch, insid3_fast.ops as ops
        def vm():
            return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))
        M = 400_000
        q, k, m = torch.ones(1, 1), torch.ones(1, M, 1), torch.ones(1, M, dtype=torch.bool)
        results = set()
        for mode in ('fp32',):
            os.environ['INSID3_NN_VOTE'] = mode
            base = vm()
            for extra in range(0, 48 << 20, 1 << 20):
                resource.setrlimit(resource.RLIMIT_AS, (base + extra, resource.RLIM_INFINITY))
                try:
                    votes, argmax = ops.nn_vote(q, k, m)
                    assert argmax.eq(0).all() and votes.eq(1).all()
                    results.add('ok')
                except (RuntimeError, MemoryError) as exc:
                    assert str(exc)
                    results.add(type(exc).__name__)
                finally:
                    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print(sorted(results))
    """
    p = _run_python(code)
    assert p.returncode == 0, f"died with {p.returncode}: {p.stderr[-2000:]}"
    assert "ok" in p.stdout, p.stdout  # the sweep reached caps where the op fits


def test_huge_condensed_matrix_is_an_out_of_memory_error():
    code = """
        import resource, torch, insid3_fast.ops as ops
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        for f in (ops.average_linkage, torch.ops.insid3_fast.average_linkage):
            try:
                f(torch.empty(2**17, 0), 0.5)  # 68 GB of distances
            except torch.OutOfMemoryError as exc:
                assert 'average_linkage: out of memory' in str(exc), str(exc)
            else:
                raise AssertionError('no error')
        print('done')
    """
    p = _run_python(code)
    assert p.returncode == 0 and "done" in p.stdout, p.stderr[-2000:]


# ---- 3. non-finite and overflowing input, the exact tie rule -----------------------------------

def _vote_args(q, k):
    return q, k, torch.ones(k.shape[:2], dtype=torch.bool), torch.ones(q.shape[0], dtype=torch.bool)


def test_nn_vote_rejects_finite_inputs_whose_dots_overflow(gemm_mode):
    q = torch.tensor([[1e30, 1e30]])
    k = torch.tensor([[[1e30, 1e30], [2e30, 2e30]]])  # used to return index 0 (inf == inf)
    too_large = r"queries and keys are too large: max\|queries\| = .* C \* max\|queries\| \* max\|keys\|"
    with pytest.raises(InputError, match=too_large):
        ops.nn_vote(*_vote_args(q, k))
    with pytest.raises(RuntimeError, match="nn_vote: queries and keys are too large"):
        RAW.nn_vote(*_vote_args(q, k))
    # A subnormal query against a key holding FLT_MAX: the product is tiny, but FLT_MAX rounds to
    # inf in bf16 and the query flushes to zero (inf * 0 = NaN): found by the fuzz harness.
    q = torch.tensor([[-2.8026e-45, 1.4013e-45, 0.0]])
    k = torch.tensor([[[-0.6, 1.3, 3.4028e38], [0.8, 0.3, -0.8], [-1.9, 0.5, -0.9]]])
    with pytest.raises(InputError, match=r"max\|keys\| = 3.4028e\+38"):
        ops.nn_vote(*_vote_args(q, k))
    with pytest.raises(RuntimeError, match="nn_vote: queries and keys are too large"):
        RAW.nn_vote(*_vote_args(q, k))
    # Large but safe magnitudes are exact: scaled copies of the same problem agree.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    small = ops.nn_vote(*_vote_args(q, k))[1]
    assert torch.equal(ops.nn_vote(*_vote_args(q * 2.0**40, k * 2.0**40))[1], small)
    assert torch.equal(ops.nn_vote(*_vote_args(q * 2.0**-60, k * 2.0**-60))[1], small)


@pytest.mark.parametrize("where", ["queries", "keys0", "keys_other"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nn_vote_rejects_non_finite_anywhere(gemm_mode, where, value):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    if where == "queries":
        q[1, 2] = value
    elif where == "keys0":
        k[0, 0, 0] = value  # used to make every query pick key 0
    else:
        k[1, 3, 1] = value  # used to be ignored
    arg = "queries" if where == "queries" else "keys"
    with pytest.raises(InputError, match=f"nn_vote: {arg} must be finite"):
        ops.nn_vote(*_vote_args(q, k))
    with pytest.raises(RuntimeError, match=f"nn_vote: {arg} must be finite"):
        RAW.nn_vote(*_vote_args(q, k))
    with pytest.raises(RuntimeError, match=f"cluster_and_vote: {arg} must be finite"):
        RAW.cluster_and_vote(torch.eye(3), 0.5, *_vote_args(q, k))


def test_linkage_ops_reject_non_finite_and_nan_threshold():
    x = torch.nn.functional.normalize(torch.randn(5, 3), dim=1)
    bad = x.clone()
    bad[2, 1] = float("inf")
    for f, name in ((ops.average_linkage, "average_linkage"), (RAW.average_linkage, "average_linkage")):
        with pytest.raises((InputError, RuntimeError), match=f"{name}: features must be finite"):
            f(bad, 0.5)
        with pytest.raises((InputError, RuntimeError), match=f"{name}: threshold must not be NaN"):
            f(x, float("nan"))
    with pytest.raises((InputError, RuntimeError), match="features are too large"):
        RAW.average_linkage(x * 1e15, 0.5)
    d = torch.zeros(4, 4)
    d[3, 0] = float("nan")  # the lower triangle, which the kernel does not otherwise read
    with pytest.raises(InputError, match="average_linkage_precomputed: dist must be finite"):
        ops.average_linkage_precomputed(d, 0.5)
    with pytest.raises(RuntimeError, match="average_linkage_precomputed: dist must be finite"):
        RAW.average_linkage_precomputed(d, 0.5)
    with pytest.raises(InputError, match="grid_average_linkage: features must be finite"):
        ops.grid_average_linkage(bad[:4], 2, 2, 4, 0.5)
    with pytest.raises(RuntimeError, match="grid_average_linkage: threshold must not be NaN"):
        RAW.grid_average_linkage(x[:4], 2, 2, 4, float("nan"))
    # Infinite thresholds are cuts: everything or nothing merges.
    assert ops.average_linkage(x, float("inf")).tolist() == [0] * 5
    assert ops.average_linkage(x, -float("inf")).tolist() == list(range(5))
    # Any finite float32 is fine for the grid linkage (double sums and dots).
    big = torch.full((4, 3), 3e38)
    assert ops.grid_average_linkage(big, 2, 2, 4, 0.5).tolist() == [0, 0, 0, 0]


def _seq_double(a: np.ndarray, b: np.ndarray) -> float:
    acc = 0.0
    for x, y in zip(a.tolist(), b.tolist()):
        acc += x * y
    return acc


def test_equal_exact_dots_tie_to_the_lowest_index(gemm_mode):
    """Keys of +-1/sqrt(524) entries in two orders have the same exact dot with a constant query,
    but the sequential double sums differ; the old re-score picked the later key."""
    C = 524
    e = np.float32(1 / math.sqrt(C))
    rng = np.random.default_rng(0)
    for _ in range(200):
        qc = np.float32(rng.uniform(0.1, 1))
        npos = int(rng.integers(262, 524))
        s = np.r_[np.ones(npos), -np.ones(C - npos)]
        keys = (np.stack([s, rng.permutation(s)]) * e).astype(np.float32)
        q = np.full(C, qc, np.float32)
        d0, d1 = _seq_double(keys[0], q), _seq_double(keys[1], q)
        if d0 != d1:
            break
    else:
        pytest.skip("no pair with different double sums found")
    if d0 > d1:
        keys = keys[::-1].copy()  # key 0 has the smaller double sum
    exact = [sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(k, q)) for k in keys]
    assert exact[0] == exact[1]
    kt, qt = torch.from_numpy(keys)[None], torch.from_numpy(q)[None]
    assert ops.nn_vote(*_vote_args(qt, kt))[1].tolist() == [[0]]
    assert RAW.cluster_and_vote(torch.eye(2), 0.5, *_vote_args(qt, kt))[2].tolist() == [[0]]


def test_exact_argmax_on_adversarial_near_ties(gemm_mode):
    """Keys whose exact dots differ by one unit in the last place of a product, or not at all,
    far below double rounding of the sums: the kernel's argmax equals the Fraction argmax."""
    rng = np.random.default_rng(3)
    for trial in range(30):
        C = int(rng.choice([3, 17, 64, 300]))
        q = rng.normal(size=C).astype(np.float32)
        base = rng.normal(size=C).astype(np.float32)
        M = 12
        keys = np.stack([rng.permutation(base) if trial % 2 else base.copy() for _ in range(M)])
        for j in range(M):  # nudge one entry by one ulp in some keys
            if rng.random() < 0.5:
                i = int(rng.integers(0, C))
                keys[j, i] = np.nextafter(keys[j, i], np.float32(np.inf if rng.random() < 0.5 else -np.inf))
        big = np.float32(2.0 ** rng.integers(-20, 20))
        keys = keys * big
        exact = [sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(k, q)) for k in keys]
        want = exact.index(max(exact))
        got = ops.nn_vote(*_vote_args(torch.from_numpy(q)[None], torch.from_numpy(keys)[None]))[1]
        assert got.item() == want, (trial, got.item(), want)


def test_shots_and_masks_must_match():
    q, k = torch.randn(3, 4), torch.randn(2, 0, 4)
    with pytest.raises(InputError, match="at least one key"):
        ops.nn_vote(q, k, torch.ones(2, 0, dtype=torch.bool))
    with pytest.raises(InputError, match="active must be"):
        ops.nn_vote(q, torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        ops.nn_vote(q.numpy(), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="must be real"):
        ops.average_linkage(torch.randn(3, 2, dtype=torch.complex64), 0.5)
    with pytest.raises(InputError, match="threshold must be a real number"):
        ops.average_linkage(torch.randn(3, 2), "0.5")
