"""Every emulated CUDA kernel on tiny inputs, against the CPU kernels (``-k emu``).

Small enough for the sanitizer builds (``make sanitize`` runs this file under ThreadSanitizer and
AddressSanitizer, where every CUDA thread is an OS thread): each op, each kernel it launches
(the multi-block rounds and the one-block tail of both clusterings, the voting's norms, argmax
and votes), and the input checks.
"""

from __future__ import annotations

import pytest
import torch

from backends import Backend


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture
def emu() -> Backend:
    return Backend("emu")


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = _unit(torch.randn(30, 8, generator=g))
    q = _unit(torch.randn(12, 8, generator=g))
    k = _unit(torch.randn(2, 10, 8, generator=g))
    km = torch.rand(2, 10, generator=g) > 0.5
    act = torch.rand(12, generator=g) > 0.2
    return x, q, k, km, act


def test_emu_small_nn_vote(emu):
    _, q, k, km, act = _inputs()
    for a, b in zip(emu.raw.nn_vote(q.clone(), k.clone(), km.clone(), act.clone()),
                    torch.ops.insid3_fast.nn_vote(q, k, km, act)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("thr", [0.5, 1.2])
def test_emu_small_dense_linkage(emu, thr):
    x = _inputs()[0]
    d = (1 - (x @ x.T).clamp(-1, 1)).contiguous()
    assert torch.equal(emu.raw.average_linkage(x.clone(), thr), torch.ops.insid3_fast.average_linkage(x, thr))
    assert torch.equal(emu.raw.average_linkage_precomputed(d.clone(), thr),
                       torch.ops.insid3_fast.average_linkage_precomputed(d, thr))


def test_emu_small_cluster_and_vote(emu):
    x, q, k, km, act = _inputs(1)
    got = emu.raw.cluster_and_vote(x.clone(), 0.6, q.clone(), k.clone(), km.clone(), act.clone())
    want = torch.ops.insid3_fast.cluster_and_vote(x, 0.6, q, k, km, act)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("conn", [4, 8])
def test_emu_small_grid_linkage(emu, conn):
    x = _inputs(2)[0]
    assert torch.equal(emu.raw.grid_average_linkage(x.clone(), 6, 5, conn, 0.8),
                       torch.ops.insid3_fast.grid_average_linkage(x, 6, 5, conn, 0.8))


def test_emu_small_rejects_non_finite(emu):
    x = _inputs()[0].clone()
    x[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="features must be finite"):
        emu.raw.average_linkage(x, 0.5)
