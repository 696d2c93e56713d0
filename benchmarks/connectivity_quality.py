"""How the connectivity-constrained clustering changes the masks, on the synthetic benchmark.

Usage: ``python benchmarks/connectivity_quality.py [--episodes 20] [--size 512] [--shots 1]``.
For the default (published) clustering and for connectivity 4 and 8: the mean IoU with the
synthetic ground truth, and the mean IoU with the default's masks (agreement).
"""

from __future__ import annotations

import argparse

import numpy as np

from insid3_fast import INSID3
from insid3_fast.synthetic import SyntheticEncoder, make_episode, mask_iou, segment_episode


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--dim", type=int, default=1024)
    args = p.parse_args()
    encoder = SyntheticEncoder(args.dim, hidden=256)
    models = {c: INSID3(encoder, image_size=args.size, svd_components=min(500, args.dim // 2),
                        device="cpu", connectivity=c) for c in (None, 4, 8)}
    quality = {c: [] for c in models}
    agreement = {c: [] for c in models}
    for seed in range(args.episodes):
        refs, masks, target, truth = make_episode(seed, args.shots)
        preds = {}
        for c, model in models.items():
            preds[c] = segment_episode(model, refs, masks, target)
            quality[c].append(mask_iou(preds[c], truth))
        for c in models:
            agreement[c].append(mask_iou(preds[c], preds[None]))
    print(f"{args.episodes} synthetic episodes, {args.size} px, {args.shots} shot(s), C = {args.dim}")
    print(f"{'clustering':<22}{'IoU vs truth':>14}{'IoU vs default':>16}")
    for c in models:
        name = "default (published)" if c is None else f"connectivity {c}"
        print(f"{name:<22}{np.mean(quality[c]):>14.3f}{np.mean(agreement[c]):>16.3f}")


if __name__ == "__main__":
    main()
