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
                         trials: int = 2, seed: int = 0) -> torch.Tensor:
    """``ops.average_linkage(x, threshold)`` on the CPU, asserted to stay the partition when the
    cosine distances move by up to ``eps``.

    A real GPU's Gram matrix comes from another GEMM (cuBLAS, or the tensor cores for bf16x6)
    than the CPU's (MKL), so its distances differ in the last bits: for unit rows by at most
    about C * 2^-24 (3e-6 at C = 48), below ``eps``. A GPU kernel's partition can equal the
    CPU's only where the data hold no near-tie, which this checks for a test's data, on every
    machine, before the GPU's labels are compared with the returned ones. The moves tried:
    every distance up by ``eps`` and down by ``eps`` (an average linkage moves with them: the
    worst case against the threshold); one random shift in [-eps, eps] per pair of the
    partition's clusters and per cluster (the linkages between whole clusters move apart, which
    independent noise per entry would average away); and ``trials`` of independent noise per
    entry (merge orders inside clusters). Near-ties between sub-clusters are only sampled.
    """
    labels = ops.average_linkage(x, threshold, bf16x6=bf16x6)
    x64 = x.double()
    dist = 1 - (x64 @ x64.T).clamp(-1, 1)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)

    def symmetric(m: torch.Tensor) -> torch.Tensor:
        m = torch.triu(m, 1)
        return m + m.T

    k = int(labels.max()) + 1 if n else 0
    moves = {"every distance + eps": torch.full((n, n), eps, dtype=torch.float64),
             "every distance - eps": torch.full((n, n), -eps, dtype=torch.float64)}
    for trial in range(trials):
        shift = torch.triu((torch.rand(k, k, generator=g, dtype=torch.float64) * 2 - 1) * eps)
        shift = shift + torch.triu(shift, 1).T  # one value per pair of clusters, and per cluster
        moves[f"a shift per pair of clusters ({trial})"] = shift[labels][:, labels]
        moves[f"noise per entry ({trial})"] = (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * eps
    for name, move in moves.items():
        perturbed = (dist + symmetric(move)).clamp_min(0).float()
        moved = ops.average_linkage_precomputed(perturbed, threshold)
        assert same_partition(moved, labels), (
            f"the test's data hold a near-tie: with {name} (eps = {eps:g}) the partition at threshold "
            f"{threshold} changes, so no GPU GEMM could be held to the CPU's; change the data's seed")
    return labels
