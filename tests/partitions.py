"""Comparing clusterings in the tests: label vectors as partitions, and CPU partitions checked to
hold for every GEMM's rounding before a GPU's is compared with them."""

from __future__ import annotations

import numpy as np
import torch

from insid3_fast import ops


def same_partition(a, b) -> bool:
    """True when label vectors a and b group the items identically (up to renaming)."""
    a = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)
    b = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b)
    if a.shape != b.shape:
        return False
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def first_appearance(labels) -> bool:
    """True when the labels are numbered 0, 1, 2, ... in order of first appearance."""
    seen: dict[int, int] = {}
    for x in np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).tolist():
        seen.setdefault(x, len(seen))
        if seen[x] != x:
            return False
    return True


def stable_cpu_partition(x: torch.Tensor, threshold: float, *, bf16x6: bool = False, eps: float = 1e-5,
                         trials: int = 4, seed: int = 0) -> torch.Tensor:
    """``ops.average_linkage(x, threshold)`` on the CPU, asserted to stay the partition when every
    cosine distance moves by up to ``eps`` (``trials`` seeded symmetric perturbations).

    A real GPU's Gram matrix comes from another GEMM (cuBLAS, or the tensor cores for bf16x6)
    than the CPU's (MKL), so its distances differ in the last bits: for unit rows by at most
    about C * 2^-24 (3e-6 at C = 48), below ``eps``. The partition of a GPU kernel can then
    equal the CPU's only where the data hold no near-tie (two merges, or a merge and the
    threshold, closer than the rounding), and this is what the check establishes for a test's
    data, on every machine, before the GPU's labels are compared with the returned ones.
    """
    labels = ops.average_linkage(x, threshold, bf16x6=bf16x6)
    x64 = x.double()
    dist = 1 - (x64 @ x64.T).clamp(-1, 1)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        noise = (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * eps
        noise = torch.triu(noise, 1)
        perturbed = (dist + noise + noise.T).clamp_min(0).float()
        moved = ops.average_linkage_precomputed(perturbed, threshold)
        assert same_partition(moved, labels), (
            f"the test's data hold a near-tie: distances moved by up to {eps:g} (trial {trial}) give "
            f"another partition at threshold {threshold}, so no GPU GEMM could be held to the CPU's; "
            "change the data's seed")
    return labels
