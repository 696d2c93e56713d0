"""How often the emulated CUDA path's masks differ from the CPU path's, on synthetic episodes.

    python benchmarks/emu_parity.py [--episodes 20] [--size 512] [--dim 1024]

The GPU rounds (reciprocal nearest neighbours, many merges per round) and the CPU NN-chain make
the same merges unless two different merges tie exactly; this counts, per clustering
(the published one and ``connectivity=4``), the episodes whose cluster partition, votes or final
mask differ between the CPU kernels and the emulated CUDA kernels (tests/cuda_emu), on the same
features (so the Gram matrix is the same float32 one: only the algorithms differ). Shots cycle
through 1, 3 and 5.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from backends import emulation  # noqa: E402
from insid3_fast import INSID3, ops, pipeline  # noqa: E402
from insid3_fast.inputs import load_image  # noqa: E402
from insid3_fast.synthetic import SyntheticEncoder, make_episode  # noqa: E402


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
    args = p.parse_args()
    library = emulation()
    encoder = SyntheticEncoder(args.dim, hidden=256)
    start = time.time()
    print(f"{args.episodes} synthetic episodes, {args.size} px, C = {args.dim}, shots 1/3/5 in turn; "
          "CPU kernels vs emulated CUDA kernels on the same features")
    print(f"{'clustering':<14}{'partitions differ':>19}{'votes differ':>14}{'masks differ':>14}")
    for connectivity in (None, 4):
        model = INSID3(encoder, image_size=args.size, svd_components=min(500, args.dim // 2), device="cpu",
                       connectivity=connectivity)
        counts = [0, 0, 0]
        for seed in range(args.episodes):
            shots = (1, 3, 5)[seed % 3]
            refs, masks, target, _ = make_episode(1000 + seed, shots)
            ref = model.encode_reference(refs, masks)
            feat = model.core.features(load_image(target, args.size)[0])[0]
            cpu = _steps(model, ref, feat)
            with ops.use_library(library):
                emu = _steps(model, ref, feat)
            for k in range(3):
                counts[k] += not torch.equal(cpu[k], emu[k])
        name = "published" if connectivity is None else f"connectivity {connectivity}"
        print(f"{name:<14}{counts[0]:>13} / {args.episodes:<3}{counts[1]:>8} / {args.episodes:<3}"
              f"{counts[2]:>8} / {args.episodes:<3}", flush=True)
    print(f"({time.time() - start:.0f} s on {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
