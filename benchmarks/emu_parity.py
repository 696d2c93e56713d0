"""How often the emulated CUDA path's masks differ from the CPU path's, on synthetic episodes.

    python benchmarks/emu_parity.py [--episodes 20] [--size 512] [--dim 1024]

The GPU rounds (reciprocal nearest neighbours, many merges per round) and the CPU NN-chain make
the same merges unless two different merges tie exactly; this counts, per clustering
(the published one and ``connectivity=4``), the episodes whose cluster partition, votes or final
mask differ between the CPU kernels and the emulated CUDA kernels (tests/cuda_emu), on the same
features (so the Gram matrix is the same float32 one: only the algorithms differ). Shots cycle
through 1, 3 and 5. For each episode whose (published) partition differs it says why: it reruns
the device's rounds written plainly in numpy with ties to the lowest index (the device's rule)
and to the highest, against the CPU's partition.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from backends import emulation  # noqa: E402
from insid3_fast import INSID3, ops, pipeline  # noqa: E402
from insid3_fast.inputs import load_image  # noqa: E402
from insid3_fast.synthetic import SyntheticEncoder, make_episode  # noqa: E402


def plain_rounds(dist: np.ndarray, threshold: float, lowest: bool = True) -> tuple[np.ndarray, list]:
    """The device's reciprocal-NN rounds written plainly in float64 numpy (full row scans, the
    device's update formulas and order; ``tests/test_ops_cuda.py::_rnn_rounds`` vectorised),
    with exact ties for the nearest neighbour going to the lowest index (the device's rule) or,
    ``lowest=False``, to the highest. Returns (labels by first appearance, the ties met: (round,
    row, tied indices))."""
    n = dist.shape[0]
    D = dist.astype(np.float64)
    size, active, parent = np.ones(n), np.ones(n, bool), np.arange(n)
    ties, r = [], 0
    while True:
        M = np.where(active[None, :] & active[:, None], D, np.inf)
        np.fill_diagonal(M, np.inf)
        nn = np.argmin(M, axis=1) if lowest else n - 1 - np.argmin(M[:, ::-1], axis=1)
        best = M[np.arange(n), nn]
        tied = (M == best[:, None]).sum(axis=1) > 1
        ties += [(r, int(i), np.flatnonzero(M[i] == best[i]).tolist()) for i in np.flatnonzero(tied & active
                                                                                               & np.isfinite(best))]
        pairs = [(i, int(nn[i])) for i in np.flatnonzero(active & np.isfinite(best))
                 if nn[i] > i and nn[nn[i]] == i and D[i, nn[i]] < threshold]
        if not pairs:
            break
        absorbed = np.zeros(n, bool)
        absorbed[[k for _, k in pairs]] = True
        D0 = D.copy()
        for i, k in pairs:
            row = (size[i] * D0[i] + size[k] * D0[k]) / (size[i] + size[k])
            value = row.copy()
            update = active & ~absorbed
            update[[i, k]] = False
            for x, l in pairs:  # another pair's survivor: the average over its pair, as on the device
                if x > i:
                    value[x] = (size[x] * row[x] + size[l] * row[l]) / (size[x] + size[l])
                elif x < i:
                    update[x] = False  # that pair's update writes it
            D[i, update] = value[update]
            D[update, i] = value[update]
        for i, k in pairs:
            size[i] += size[k]
            active[k] = False
            parent[k] = i
        r += 1
    root = parent.copy()
    while not np.array_equal(root, root[root]):
        root = root[root]
    first: dict[int, int] = {}
    return np.array([first.setdefault(int(v), len(first)) for v in root]), ties


def _explain(feats: torch.Tensor, threshold: float, cpu: torch.Tensor, emu: torch.Tensor) -> str:
    """Why the emulated partition differs from the CPU's: the plain rounds with either tie rule."""
    n = feats.shape[0]
    dist = torch.empty(n, n)
    for i0 in range(0, n, 512):  # the ops' float32 distances: 512-row blocks, upper triangle
        dist[i0:i0 + 512, i0:] = 1 - (feats[i0:i0 + 512] @ feats[i0:].T).clamp(-1, 1)
    dist = torch.triu(dist, 1)
    dist = (dist + dist.T).numpy()
    low, ties = plain_rounds(dist, threshold)
    high, _ = plain_rounds(dist, threshold, lowest=False)
    moved = int((torch.from_numpy(low) != cpu).sum())
    return (f"exact nearest-neighbour ties met by the rounds: {ties}; plain rounds, ties to the lowest "
            f"index (the device's rule) = emulated: {np.array_equal(low, emu.numpy())}, = CPU: "
            f"{np.array_equal(low, cpu.numpy())} ({moved} patches elsewhere); "
            f"ties to the highest index = CPU: {np.array_equal(high, cpu.numpy())}")


def _steps(model: INSID3, ref, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, votes, mask) of one target on whichever library ``ops`` currently calls."""
    core, c = model.core, model.core.config
    C, h, w = feat.shape
    queries = pipeline.debiased_coordinates(feat[None], core.complement)[0]
    _, fwd = pipeline.forward_match(queries, ref.prototype)
    feats = feat.reshape(C, h * w).T.contiguous()
    labels, votes = pipeline.cluster_and_vote(feats, h, w, 1.0 - c.tau, queries, ref, fwd, c.connectivity)
    mask = core.segment_patches(ref, feat)
    return labels, votes, mask  # labels numbered by first appearance on both backends


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--first", type=int, default=0, help="the first episode (seeds 1000 + first, ...)")
    args = p.parse_args()
    library = emulation()
    encoder = SyntheticEncoder(args.dim, hidden=256)
    start = time.time()
    print(f"{args.episodes} synthetic episodes, {args.size} px, C = {args.dim}, shots 1/3/5 in turn; "
          "CPU kernels vs emulated CUDA kernels on the same features")
    print(f"{'clustering':<14}{'partitions differ':>19}{'votes differ':>14}{'masks differ':>14}")
    notes: list[str] = []
    for connectivity in (None, 4):
        model = INSID3(encoder, image_size=args.size, svd_components=min(500, args.dim // 2), device="cpu",
                       connectivity=connectivity)
        counts = [0, 0, 0]
        for seed in range(args.first, args.first + args.episodes):
            shots = (1, 3, 5)[seed % 3]
            refs, masks, target, _ = make_episode(1000 + seed, shots)
            ref = model.encode_reference(refs, masks)
            feat = model.core.features(load_image(target, args.size)[0])[0]
            cpu = _steps(model, ref, feat)
            with ops.use_library(library):
                emu = _steps(model, ref, feat)
            for k in range(3):
                counts[k] += not torch.equal(cpu[k], emu[k])
            if not torch.equal(cpu[0], emu[0]):
                C, h, w = feat.shape
                why = ("(the grid clustering: not explained here)" if connectivity is not None else
                       _explain(feat.reshape(C, h * w).T.contiguous(), 1.0 - model.core.config.tau, cpu[0],
                                emu[0]))
                notes.append(f"  episode {1000 + seed} ({'published' if connectivity is None else connectivity}): "
                             f"{int((cpu[0] != emu[0]).sum())} of {h * w} patches in another cluster; " + why)
        name = "published" if connectivity is None else f"connectivity {connectivity}"
        print(f"{name:<14}{counts[0]:>13} / {args.episodes:<3}{counts[1]:>8} / {args.episodes:<3}"
              f"{counts[2]:>8} / {args.episodes:<3}", flush=True)
    for line in notes:
        print(line)
    print(f"({time.time() - start:.0f} s on {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
