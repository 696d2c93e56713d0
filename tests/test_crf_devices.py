"""The CRF's CUDA path is plain torch ops (the permutohedral lattice of insid3_fast.crf), not
custom kernels, so the CUDA emulation does not apply. What can be checked without a GPU:

- the lattice's per-pixel steps are device-agnostic: they run on the "meta" device (shapes and
  dtypes only) exactly as they would on CUDA;
- the steps that depend on the data on the host are exactly the ones listed here (the range
  check of the packed vertex keys, the lattice's vertex set, its neighbour lists): on CUDA each
  costs a host synchronisation, so the CRF is not part of the sync-free post-backbone path;
- the numbers: the lattice on CPU equals pydensecrf and an exact Gaussian (tests/test_crf.py).

What remains for a GPU: the lattice's results and timing on CUDA (tests/test_crf.py has the
CUDA comparison, skipped without a device).
"""

from __future__ import annotations

import torch

from insid3_fast import crf


def test_crf_lattice_per_pixel_steps_run_on_meta():
    n, d = 1000, 5
    feats = torch.empty(n, d, device="meta")
    elevated = crf._elevate(feats)
    assert elevated.shape == (n, d + 1) and elevated.device.type == "meta"
    rem0, rank = crf._nearest_remainder0(elevated)
    bary = crf._barycentric(elevated, rem0, rank)
    assert bary.shape[0] == n and bary.device.type == "meta" and rank.shape == (n, d + 1)


def test_crf_lattice_data_dependent_steps():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(400, 5, generator=g) * 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        crf.PermutohedralLattice(feats)
    names = {e.name for e in prof.events()}
    data_dependent = {n for n in names if n in ("aten::_unique2", "aten::unique_dim", "aten::nonzero",
                                                 "aten::masked_select", "aten::_local_scalar_dense")}
    assert data_dependent == {"aten::_local_scalar_dense", "aten::_unique2", "aten::nonzero"}, data_dependent
