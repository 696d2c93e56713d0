"""How often does a bf16 backbone pass change the masks? Synthetic episodes, fp32 vs bf16.

Usage: ``python benchmarks/bf16_agreement.py [--episodes 20] [--size 512] [--device cpu]``.
Two encoders: the synthetic test encoder (meaningful masks) and a random-weight DINOv3
ViT-S/16 from timm (the real architecture; random features). Prints, per encoder, the share
of episodes whose mask changed, the mean share of changed pixels, and the mean IoU with the
synthetic ground truth under each precision.
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
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from checkpoints import random_timm_model
    from insid3_fast.backbone import DinoV3Backbone

    encoders = {
        "synthetic C=1024": SyntheticEncoder(1024, hidden=256),
        "random DINOv3 ViT-S/16": DinoV3Backbone(random_timm_model("small"), "small"),
    }
    for name, encoder in encoders.items():
        kw = dict(image_size=args.size, svd_components=min(500, 384 // 2) if "ViT-S" in name else 500,
                  device=args.device)
        fp32 = INSID3(encoder, precision="fp32", **kw)
        bf16 = INSID3(encoder, precision="bf16", **kw)
        changed, pixels, iou32, iou16 = 0, [], [], []
        for seed in range(args.episodes):
            refs, masks, target, truth = make_episode(seed, args.shots)
            a, b = segment_episode(fp32, refs, masks, target), segment_episode(bf16, refs, masks, target)
            changed += bool((a != b).any())
            pixels.append((a != b).mean())
            iou32.append(mask_iou(a, truth))
            iou16.append(mask_iou(b, truth))
        print(f"{name}: {changed}/{args.episodes} episodes changed, {100 * np.mean(pixels):.3f}% pixels changed "
              f"on average (max {100 * np.max(pixels):.2f}%), IoU fp32 {np.mean(iou32):.3f} vs bf16 {np.mean(iou16):.3f}")


if __name__ == "__main__":
    main()
