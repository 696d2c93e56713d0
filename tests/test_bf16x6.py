"""The split-bf16 product (``matmul_precision="bf16x6"``, csrc/common/bf16x6.h): the operands'
rounding, the CPU kernels against the readable reference (bit for bit), the CUDA kernels in the
emulation (``-k emu``) and on a GPU against the CPU kernels, and the pipeline's masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends import Backend
from partitions import same_partition, stable_cpu_partition
from insid3_fast import INSID3, ops, torch_kernels
from insid3_fast.errors import InputError
from insid3_fast.synthetic import SyntheticEncoder, make_episode, segment_episode

pytestmark = pytest.mark.skipif(ops.load_error() is not None, reason="the CPU kernels did not build")


@pytest.fixture(params=["cuda", "emu"])
def backend(request) -> Backend:
    return Backend(request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _features(seed: int, n: int, c: int) -> torch.Tensor:
    """Clustered unit rows: enough structure for many merges at tau 0.4-0.6."""
    g = _gen(seed)
    centres = F.normalize(torch.randn(5, c, generator=g), dim=1)
    x = centres[torch.randint(0, 5, (n,), generator=g)] + 0.6 * torch.randn(n, c, generator=g) / c ** 0.5
    return F.normalize(x, dim=1)


# ---- the parts ----------------------------------------------------------------------------------

def test_parts_are_bf16_values_that_sum_to_x():
    x = torch.randn(20000, generator=_gen(0)) * torch.logspace(-30, 30, 20000)
    parts = torch_kernels.bf16x6_parts(x)
    for p in parts:  # bf16 values: the low 16 bits of the float32 pattern are zero
        assert not (p.view(torch.int32) & 0xFFFF).any()
    total = parts[0].double() + parts[1].double() + parts[2].double()
    assert ((total - x.double()).abs() <= 2.0 ** -24 * x.double().abs()).all()
    # p0 is round-to-nearest-even: never more than half a bf16 ulp from x
    assert ((parts[0].double() - x.double()).abs() <= 2.0 ** -8 * x.double().abs()).all()


def test_round_bf16_ties_to_even_and_non_finite():
    one = torch.tensor([1.0])
    bits = lambda b: torch.tensor([b], dtype=torch.int32).view(torch.float32)  # noqa: E731
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: even (1); 1 + 3 * 2^-8 rounds up to 1 + 2^-6
    assert torch_kernels.round_bf16(one + 2.0 ** -8).item() == 1.0
    assert torch_kernels.round_bf16(one + 3 * 2.0 ** -8).item() == 1.0 + 2.0 ** -6
    assert torch_kernels.round_bf16(bits(0x3F808001)).item() == 1.0 + 2.0 ** -7  # just above half: up
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38])
    r = torch_kernels.round_bf16(x)
    assert r[:3].isnan().all() and r[3].isinf()


# ---- the CPU kernels against the reference --------------------------------------------------------

@pytest.mark.parametrize("M,K,P", [(70, 33, 21), (1, 1, 1), (0, 5, 3), (4, 0, 6), (257, 384, 129)])
def test_cpu_mm_equals_reference_bit_for_bit(M, K, P):
    g = _gen(M + K + P)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, P, generator=g)
    out = ops.bf16x6_mm(a, b)
    assert out.dtype == torch.float32 and out.shape == (M, P)
    assert torch.equal(out, torch_kernels.bf16x6_mm(a, b))
    assert torch.equal(out, ops.bf16x6_mm(a, b, kernels="reference"))
    # any strides: a transposed view and a column-sliced view read the same values
    assert torch.equal(ops.bf16x6_mm(a.T.contiguous().T, b.T.contiguous().T), out)


def test_mm_error_is_float32_like():
    """Within float32 rounding of the exact product (a bf16 GEMM would be ~2^-8 off)."""
    g = _gen(3)
    a, b = torch.randn(300, 1024, generator=g), torch.randn(1024, 200, generator=g)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    err = ((ops.bf16x6_mm(a, b).double() - exact).abs() / scale).max().item()
    fp32 = (((a @ b).double() - exact).abs() / scale).max().item()
    print(f"max error / (|a||b|): bf16x6 {err:.3g}, float32 {fp32:.3g}")
    assert err <= 2.0 ** -18
    assert err <= 4 * fp32


def test_non_finite_rows_and_columns_are_nan():
    a, b = torch.ones(3, 4), torch.ones(4, 2)
    a[1, 2] = float("inf")
    b[0, 1] = float("nan")
    out = ops.bf16x6_mm(a, b)
    assert out[1].isnan().all() and out[:, 1].isnan().all()
    assert torch.equal(out[[0, 2]][:, 0], torch.full((2,), 4.0))
    assert torch.equal(out.isnan(), torch_kernels.bf16x6_mm(a, b).isnan())


def _beyond_bf16_range():
    """Finite operands whose first part would round to inf (|x| > 3.3961e38), times zeros and halves."""
    fmax = torch.finfo(torch.float32).max
    a = torch.tensor([[fmax, 1.0, 0.0], [-fmax, 0.0, 3.3962e38], [3.39e38, 2.0, 1.0]])
    b = torch.tensor([[0.0, 0.5], [1.0, 0.0], [0.0, -0.25]])
    return a, b


def test_finite_values_beyond_bf16s_range_keep_finite_parts():
    """A finite row times a zero column gave NaN: p0 of 3.4e38 rounded to inf, x - p0 = -inf
    (the fuzz harness's finding; a float32 GEMM gives the finite product)."""
    a, b = _beyond_bf16_range()
    parts = torch_kernels.bf16x6_parts(a.reshape(-1))
    assert all(bool(torch.isfinite(p).all()) for p in parts)
    total = parts[0].double() + parts[1].double() + parts[2].double()
    assert ((total - a.reshape(-1).double()).abs() <= 2.0 ** -23 * a.reshape(-1).double().abs()).all()
    out = ops.bf16x6_mm(a, b)
    exact = a.double() @ b.double()
    assert bool(torch.isfinite(out).all())
    assert ((out.double() - exact).abs() <= 2.0 ** -20 * (a.double().abs() @ b.double().abs())).all()
    assert torch.equal(out, torch_kernels.bf16x6_mm(a, b))
    assert torch.equal(out, ops.bf16x6_mm(a, b, kernels="reference"))


def test_mm_rejects_bad_shapes():
    with pytest.raises(InputError, match="bf16x6_mm expects"):
        ops.bf16x6_mm(torch.ones(3, 4), torch.ones(5, 2))
    with pytest.raises(InputError, match="bf16x6_mm expects"):
        ops.bf16x6_mm(torch.ones(3), torch.ones(3, 2))


@pytest.mark.parametrize("n,c,tau", [(1, 8, 0.6), (2, 8, 0.6), (600, 64, 0.6), (513, 48, 0.4)])
def test_cpu_linkage_equals_reference(n, c, tau):
    x = _features(n, n, c)
    labels = ops.average_linkage(x, 1 - tau, bf16x6=True)
    assert torch.equal(labels, ops.average_linkage(x, 1 - tau, kernels="reference", bf16x6=True))
    # the transposed view of a (C, N) map: the same operands
    assert torch.equal(ops.average_linkage(x.T.contiguous().T, 1 - tau, bf16x6=True), labels)


def test_cpu_cluster_and_vote_bf16x6_equals_the_two_ops():
    g = _gen(9)
    x = _features(9, 300, 32)
    q, k = F.normalize(torch.randn(300, 32, generator=g), dim=1), F.normalize(torch.randn(2, 80, 32, generator=g), dim=2)
    km, act = torch.rand(2, 80, generator=g) > 0.5, torch.rand(300, generator=g) > 0.2
    labels, votes, argmax = ops.cluster_and_vote(x, 0.4, q, k, km, act, bf16x6=True)
    assert torch.equal(labels, ops.average_linkage(x, 0.4, bf16x6=True))
    v, a = ops.nn_vote(q, k, km, act)
    assert torch.equal(votes, v) and torch.equal(argmax, a)


def test_bf16x6_gram_differs_from_fp32_only_in_rounding():
    """The option does something: the distances are not the float32 ones, yet within 2^-20."""
    x = _features(11, 400, 256)
    fp32 = x @ x.T
    split = torch_kernels.bf16x6_mm(x, x.T)
    assert not torch.equal(split, fp32)
    assert (split - fp32).abs().max().item() <= 2.0 ** -20


# ---- the CUDA kernels (emulated, or on a GPU) against the CPU kernels ------------------------------

@pytest.mark.parametrize("M,K,P", [(70, 33, 21), (1, 1, 1), (0, 5, 3), (4, 0, 6), (300, 200, 129)])
def test_cuda_mm_equals_cpu(backend, M, K, P):
    g = _gen(M * K + P)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, P, generator=g)
    a[0:1, 0:1] = float("nan") if M and K else 0.0
    got = backend.bf16x6_mm(backend.dev(a), backend.dev(b)).cpu()
    expect = ops.bf16x6_mm(a, b)
    assert torch.equal(got.isnan(), expect.isnan())
    if backend.name == "emu":  # the same operands through the same CPU GEMM: the same bits
        assert torch.equal(got.nan_to_num(), expect.nan_to_num())
    else:  # the tensor cores sum in another order
        assert torch.allclose(got.nan_to_num(), expect.nan_to_num(), rtol=0, atol=1e-5 * max(K, 1) ** 0.5)
    # a strided (transposed) view: the kernel reads the strides
    assert torch.equal(backend.bf16x6_mm(backend.dev(a).T.contiguous().T, backend.dev(b)).cpu().isnan(), expect.isnan())


def test_cuda_mm_keeps_finite_parts_beyond_bf16s_range(backend):
    a, b = _beyond_bf16_range()
    got = backend.bf16x6_mm(backend.dev(a), backend.dev(b)).cpu()
    assert bool(torch.isfinite(got).all())
    if backend.name == "emu":
        assert torch.equal(got, ops.bf16x6_mm(a, b))
    else:
        assert torch.allclose(got, ops.bf16x6_mm(a, b), rtol=2.0 ** -20, atol=0)


@pytest.mark.parametrize("rows,n", [(512, 600), (7, 150), (1, 9), (64, 129)])
def test_cuda_linkage_equals_cpu(backend, rows, n):
    from backends import tunable

    x = _features(rows + n, n, 48)
    if backend.name == "emu":
        with tunable("average_linkage.gram_rows", rows):
            got = backend.average_linkage(backend.dev(x), 0.5, bf16x6=True).cpu()
    elif rows != 512:
        pytest.skip("the strip height is a tunable of the emulated build only")
    else:
        got = backend.average_linkage(backend.dev(x), 0.5, bf16x6=True).cpu()
    # the CPU's partition, checked to hold for any summation order of the products
    assert same_partition(got, stable_cpu_partition(x, 0.5, bf16x6=True))


def test_cuda_cluster_and_vote_passes_bf16x6(backend):
    g = _gen(5)
    x = _features(5, 200, 32)
    q, k = F.normalize(torch.randn(200, 32, generator=g), dim=1), F.normalize(torch.randn(1, 50, 32, generator=g), dim=2)
    km, act = torch.rand(1, 50, generator=g) > 0.5, torch.ones(200, dtype=torch.bool)
    labels = backend.cluster_and_vote(*(backend.dev(t) for t in (x,)), 0.4,
                                      *(backend.dev(t) for t in (q, k, km, act)), bf16x6=True)[0].cpu()
    assert same_partition(labels, stable_cpu_partition(x, 0.4, bf16x6=True))


# ---- the pipeline --------------------------------------------------------------------------------

def _model(**kw) -> INSID3:
    return INSID3(SyntheticEncoder(embed_dim=64), backend="native", image_size=256, svd_components=32, **kw)


def test_pipeline_bf16x6_masks_equal_fp32_on_synthetic_episodes():
    """Measured on more episodes by benchmarks/tf32_agreement.py; here a few, 1 and 3 shots."""
    fp32, split = _model(), _model(matmul_precision="bf16x6")
    assert split.core.bf16x6 and not fp32.core.bf16x6
    for seed, shots in ((1, 1), (2, 1), (3, 3)):
        episode = make_episode(seed=seed, shots=shots)[:3]
        expected = segment_episode(fp32, *episode)
        assert expected.any()
        assert np.array_equal(segment_episode(split, *episode), expected)


def test_pipeline_bf16x6_uses_the_split_products(monkeypatch):
    """The option reaches both products: the projection and the clustering's Gram matrix."""
    calls = {"mm": 0, "linkage": 0}
    mm, cav = ops.bf16x6_mm, ops.cluster_and_vote

    def counting_mm(*args, **kwargs):
        calls["mm"] += 1
        return mm(*args, **kwargs)

    def counting_cav(*args, **kwargs):
        calls["linkage"] += bool(kwargs.get("bf16x6"))
        return cav(*args, **kwargs)

    monkeypatch.setattr(ops, "bf16x6_mm", counting_mm)
    monkeypatch.setattr(ops, "cluster_and_vote", counting_cav)
    segment_episode(_model(matmul_precision="bf16x6"), *make_episode(seed=4, shots=2)[:3])
    assert calls["mm"] == 3 and calls["linkage"] == 1  # two reference images, one target


def test_emu_pipeline_bf16x6_masks_equal_cpu():
    from backends import emulation

    episode = make_episode(seed=6, shots=1)[:3]
    expected = segment_episode(_model(matmul_precision="bf16x6"), *episode)
    with ops.use_library(emulation()):
        got = segment_episode(_model(matmul_precision="bf16x6"), *episode)
    assert np.array_equal(got, expected)


def test_matmul_precision_is_validated():
    with pytest.raises(InputError, match="matmul_precision"):
        _model(matmul_precision="tf32")


def test_emu_bf16x6_clustering_peak_memory():
    """The device holds the double matrix, the features and the bf16 Gram buffer (14 N C bytes);
    the emulation's float32 copies for its CPU GEMM are not device memory (not metered)."""
    from backends import peak_bytes

    backend = Backend("emu")
    n, c = 1024, 64
    x = _features(8, n, c)
    peak = peak_bytes(lambda: backend.raw.average_linkage(x, 0.5, True))
    fp32 = peak_bytes(lambda: backend.raw.average_linkage(x, 0.5, False))
    bound = 8 * n * n + 14 * n * c + 16 * n * c + 64 * n
    print(f"bf16x6 peak {peak / 2**20:.2f} MiB, fp32 {fp32 / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB")
    assert fp32 + 14 * n * c <= peak <= bound
