"""torch.library.opcheck for every op (schema, fake kernel, dispatch): on the CPU kernels and on
the CUDA kernels executed by the emulation (``-k emu``), where a GPU is visible on CUDA too.
``aggregate_clusters`` has no CPU kernel (the CPU runs ATen's ops): emulated and CUDA only."""

from __future__ import annotations

import pytest
import torch

from backends import Backend
from insid3_fast import ops


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _cases() -> dict:
    g = torch.Generator().manual_seed(3)
    x = _unit(torch.randn(24, 8, generator=g))
    q = _unit(torch.randn(10, 8, generator=g))
    k = _unit(torch.randn(2, 7, 8, generator=g))
    km = torch.rand(2, 7, generator=g) > 0.5
    act = torch.rand(10, generator=g) > 0.2
    dist = (1 - (x @ x.T).clamp(-1, 1)).contiguous()
    return {
        "nn_vote": (q, k, km, act),
        "average_linkage": (x, 0.6),
        "average_linkage_precomputed": (dist, 0.6),
        "cluster_and_vote": (x, 0.6, q, k, km, act),
        "grid_average_linkage": (x, 6, 4, 4, 0.6),
        "average_linkage:bf16x6": (x, 0.6, True),
        "cluster_and_vote:bf16x6": (x, 0.6, q, k, km, act, True),
        "bf16x6_mm": (q, x.T),
        # GPU only (the CPU runs ATen's ops, the reference's): labels int64, feats any strides.
        "aggregate_clusters": (torch.randint(0, 5, (24,), generator=g), torch.rand(24, generator=g) > 0.4,
                               x, _unit(torch.randn(6, 24, generator=g)).T, x @ x[0], x[0].clone(), 0.2),
    }


GPU_ONLY = {"aggregate_clusters"}


@pytest.fixture(params=["cpu", "emu", "cuda"])
def library(request) -> tuple[str, object]:
    if request.param == "cpu":
        if ops.load_error() is not None:
            pytest.fail(f"the CPU kernels did not load: {ops.load_error()}")
        return "insid3_fast", (lambda t: t)
    backend = Backend(request.param)
    return backend.library, backend.dev


@pytest.mark.parametrize("case", sorted(_cases()))
def test_opcheck(library, case):
    name, dev = library
    if case in GPU_ONLY and name == "insid3_fast":
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"insid3_fast::{case}", "CPU")
        pytest.skip("no CPU kernel (asserted): the CPU runs ATen's ops; the emulated and CUDA kernels are checked")
    args = tuple(dev(a) if isinstance(a, torch.Tensor) else a for a in _cases()[case])
    op = case.split(":")[0]  # "op:variant": the same op with other arguments
    torch.library.opcheck(getattr(getattr(torch.ops, name), op).default, args)
