"""Would tensor-core GEMMs change the masks? The two float32 GEMMs of the parity path (the
clustering's Gram matrix X Xᵀ and the debiasing projection X Q) in TF32 numerics, emulated on
the CPU, against the float32 path, on synthetic episodes.

    python benchmarks/tf32_agreement.py [--episodes 20] [--size 512] [--shots 1]

Modes of a GEMM: ``fp32`` (the parity path: what the CPU kernels and the published code
compute), ``fp32-split`` (float32 products summed in another order, two halves of the inner
dimension added: what another float32 GEMM, e.g. cuBLAS's on a GPU, may do), ``tf32`` (one tensor-core pass: both operands rounded to TF32's 10-bit mantissa, round
to nearest even, products accumulated in float32) and ``3xtf32`` (the split-operand scheme of
CUTLASS: a = hi + lo with hi and lo TF32 values, a b ~= hi_a lo_b + lo_a hi_b + hi_a hi_b, the
small terms first). The emulation rounds the operands exactly as the conversion does but sums
in the CPU GEMM's order, not the tensor cores': it measures the effect of the operand rounding,
which dominates, not the last bit a given GPU would produce. For every combination (Gram in a
mode, projection in a mode) it counts the episodes whose target partition or mask differs from
the float32 path's, the mean share of changed pixels, and the mean IoU with the synthetic truth.
The clustering of a non-fp32 Gram is scikit-learn's on ``1 - clamp(G)`` (the published
clustering); as a check of the harness, the fp32 Gram through that route must give the native
op's partition in every episode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from insid3_fast import INSID3, ops, pipeline, torch_kernels  # noqa: E402
from insid3_fast.synthetic import SyntheticEncoder, make_episode, mask_iou, segment_episode  # noqa: E402

MODES = ("fp32", "fp32-split", "tf32", "3xtf32", "bf16x6")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10 mantissa bits), to nearest even; finite inputs."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """a @ b in float32 with the operand rounding of ``mode`` (see the module docstring)."""
    if mode == "fp32":
        return a @ b
    if mode == "fp32-split":  # another float32 summation order (a split-K GEMM)
        k = a.shape[1] // 2
        return a[:, :k] @ b[:k] + a[:, k:] @ b[k:]
    if mode == "bf16x6":  # the package's split-bf16 product (matmul_precision="bf16x6")
        return torch_kernels.bf16x6_mm(a, b)
    a_hi, b_hi = round_tf32(a), round_tf32(b)
    if mode == "tf32":
        return a_hi @ b_hi
    a_lo, b_lo = round_tf32(a - a_hi), round_tf32(b - b_hi)
    return (a_hi @ b_lo + a_lo @ b_hi) + a_hi @ b_hi


def sklearn_partition(feats: torch.Tensor, threshold: float, gram: str) -> torch.Tensor:
    """The published clustering (scikit-learn) of ``1 - clamp(G)`` with G = X Xᵀ in ``gram`` mode."""
    return torch_kernels.average_linkage_precomputed(1.0 - matmul(feats, feats.T, gram).clamp(-1, 1), threshold)


@contextlib.contextmanager
def gemm_modes(gram: str, projection: str, partitions: list, harness: list | None = None) -> Iterator[None]:
    """Run the pipeline with its Gram matrix and debiasing projection in these modes; the target
    partitions of the published clustering are appended to ``partitions``. In fp32 x fp32 (the
    native ops), ``harness`` gets, per target, whether the scikit-learn route of the fp32 Gram
    gives the native partition."""
    saved = pipeline.debiased_coordinates, pipeline.cluster_and_vote
    native = gram == "fp32" and projection == "fp32"

    def debiased_coordinates(feats: torch.Tensor, complement: torch.Tensor, **_: object) -> torch.Tensor:
        T, C, h, w = feats.shape
        rows = feats.reshape(T, C, h * w).transpose(1, 2)
        return F.normalize(torch.stack([matmul(r, complement, projection) for r in rows]), p=2, dim=2)

    def cluster_and_vote(feats, h, w, threshold, queries, ref, active, connectivity=None, kernels="native",
                         bf16x6=False):
        assert connectivity is None, "the published clustering only"
        if native:
            labels, votes = saved[1](feats, h, w, threshold, queries, ref, active, None, kernels)
            if harness is not None:
                harness.append(torch.equal(labels, sklearn_partition(feats, threshold, "fp32")))
        else:
            votes, _ = ops.nn_vote(queries, ref.keys, ref.masks_down.reshape(ref.shots, h * w), active)
            labels = sklearn_partition(feats, threshold, gram)
        partitions.append(labels.cpu().numpy())
        return labels, votes

    if not native:
        pipeline.debiased_coordinates = debiased_coordinates
    pipeline.cluster_and_vote = cluster_and_vote
    try:
        yield
    finally:
        pipeline.debiased_coordinates, pipeline.cluster_and_vote = saved


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--modes", nargs="+", choices=MODES[1:], default=list(MODES[1:]),
                   help="the modes to compare with fp32 (default: all)")
    p.add_argument("--encoders", nargs="+", choices=("synthetic", "vit-s"), default=["synthetic", "vit-s"])
    args = p.parse_args()

    from checkpoints import random_timm_model
    from insid3_fast.backbone import DinoV3Backbone

    encoders = {
        "synthetic C=1024": (lambda: SyntheticEncoder(1024, hidden=256), 500, "synthetic"),
        "random DINOv3 ViT-S/16": (lambda: DinoV3Backbone(random_timm_model("small"), "small"), 192, "vit-s"),
    }
    encoders = {name: (make(), rank) for name, (make, rank, key) in encoders.items() if key in args.encoders}
    # Each GEMM alone in another mode, then both in the same mode.
    combos = [(m, "fp32") for m in args.modes] + [("fp32", m) for m in args.modes] + [(m, m) for m in args.modes]
    for name, (encoder, rank) in encoders.items():
        start = time.time()
        model = INSID3(encoder, image_size=args.size, svd_components=rank, device="cpu")
        episodes = [make_episode(1000 + seed, args.shots) for seed in range(args.episodes)]
        base_parts: list = []
        harness: list = []
        with gemm_modes("fp32", "fp32", base_parts, harness):
            base = [segment_episode(model, *episode[:3]) for episode in episodes]
        assert len(base_parts) == len(episodes), "one clustering per target"
        truth_iou = np.mean([mask_iou(m, e[3]) for m, e in zip(base, episodes)])
        print(f"{name}, {args.size} px, {args.episodes} episodes, {args.shots} shot(s): fp32 IoU {truth_iou:.3f}; "
              f"harness check (fp32 Gram through scikit-learn = native partition): {sum(harness)} / {len(harness)}")
        print(f"{'gram':10s} {'projection':10s} {'partitions differ':>18s} {'masks differ':>13s} "
              f"{'pixels changed':>15s} {'IoU':>6s}")
        for gram, projection in combos:
            parts: list = []
            with gemm_modes(gram, projection, parts):
                got = [segment_episode(model, *episode[:3]) for episode in episodes]
            n_parts = sum(not np.array_equal(a, b) for a, b in zip(parts, base_parts))
            n_masks = sum(bool((a != b).any()) for a, b in zip(got, base))
            pixels = np.mean([(a != b).mean() for a, b in zip(got, base)])
            iou = np.mean([mask_iou(m, e[3]) for m, e in zip(got, episodes)])
            print(f"{gram:10s} {projection:10s} {n_parts:>11d} / {args.episodes:<4d} {n_masks:>6d} / {args.episodes:<4d} "
                  f"{100 * pixels:>14.3f}% {iou:>6.3f}")
            if gram == projection == "bf16x6":  # the package's option gives what the harness emulated
                split = INSID3(encoder, image_size=args.size, svd_components=rank, device="cpu",
                               matmul_precision="bf16x6")
                same = sum(np.array_equal(segment_episode(split, *e[:3]), m) for e, m in zip(episodes, got))
                print(f"  check: matmul_precision='bf16x6' (native ops) gives these masks in {same} / {len(got)}")
        print(f"({time.time() - start:.0f} s on 2 CPU cores)\n")


if __name__ == "__main__":
    main()
