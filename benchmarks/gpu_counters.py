"""Counters of the GPU path per target, measured on the CPU emulation of the CUDA kernels.

    python benchmarks/gpu_counters.py --size 1024 --shots 1 --json out.json

Runs the post-backbone steps of one target (the synthetic encoder at C = 1024, so N = (size/16)^2
patches) with the kernels of csrc/cuda executed by tests/cuda_emu, and counts what a GPU would
see: kernel launches of our kernels, host synchronisations (``.item()`` and data-dependent-shape
ops, as the test of the zero-sync path counts them; eager, and while "captured"), the peak bytes
held by tensors, and the GEMM FLOPs by precision. Times are not measured: the emulation's speed
says nothing about a GPU's. Writes ``{"launches", "host_syncs", "host_syncs_captured",
"peak_bytes", "gemm_flops", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from backends import peak_bytes  # noqa: E402
from cuda_emu import build  # noqa: E402
from insid3_fast import INSID3, ops  # noqa: E402
from insid3_fast.inputs import load_image  # noqa: E402
from insid3_fast.synthetic import SyntheticEncoder, make_episode  # noqa: E402

SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
           "aten::unique_consecutive", "aten::unique_dim")
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _profile(fn) -> tuple[int, dict[str, int]]:
    """(host syncs, GEMM FLOPs by input dtype) of fn, from the profiler's ATen events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as prof:
        fn()
    syncs, flops = 0, {}
    for evt in prof.events():
        if evt.name in SYNCING:
            parent, in_quantile = evt.cpu_parent, False
            while parent is not None:
                in_quantile |= parent.name == "aten::quantile"  # CPU-only check of q (see tests)
                parent = parent.cpu_parent
            syncs += not in_quantile
        elif evt.name in GEMMS and evt.flops:
            dtype = "float32"
            for kevt in []:  # dtypes are not in FunctionEvent; every GEMM of the path is float32 today
                pass
            flops[dtype] = flops.get(dtype, 0) + int(evt.flops)
    return syncs, flops


def measure(size: int, shots: int, connectivity: int | None = None) -> dict:
    library = build.load()
    model = INSID3(SyntheticEncoder(embed_dim=1024), backend="native", image_size=size, svd_components=500,
                   connectivity=connectivity)
    core = model.core
    refs, masks, target, _ = make_episode(seed=11, shots=shots)
    ref = model.encode_reference(refs, masks)
    image, _ = load_image(target, core.image_size)
    feats = core.features(image if image.dim() == 4 else image[None])[0]
    C, h, w = feats.shape
    with ops.use_library(library):
        core.segment_patches(ref, feats)  # warm-up (caches, lazy inits)
        before = build.launch_count()
        syncs, flops = _profile(lambda: core.segment_patches(ref, feats))
        launches = build.launch_count() - before
        with build.capturing():
            captured, _ = _profile(lambda: core.segment_patches(ref, feats))
        peak = peak_bytes(lambda: core.segment_patches(ref, feats))
    n = h * w
    return {
        "size": size, "shots": shots, "connectivity": connectivity, "N": n, "C": C,
        "launches": launches, "host_syncs": syncs, "host_syncs_captured": captured,
        "peak_bytes": peak, "peak_over_8N2": peak / (8 * n * n),
        "gemm_flops": flops,
        "note": "our kernels only (ATen's own kernels not counted); GEMM dtype from the path's code: float32",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=None)
    p.add_argument("--json", default=None, help="write the counters here")
    args = p.parse_args(argv)
    out = measure(args.size, args.shots, args.connectivity)
    for k, v in out.items():
        print(f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
