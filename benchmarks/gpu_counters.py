"""Counters of the GPU path per target, measured on the CPU emulation of the CUDA kernels.

    python benchmarks/gpu_counters.py --size 1024 --shots 1 --json out.json

Runs the post-backbone steps of one target (the synthetic encoder at C = 1024, so N = (size/16)^2
patches) with the kernels of csrc/cuda executed by tests/cuda_emu, and counts what a GPU would
see: kernel launches (ours, counted by the emulation, and ATen's), host synchronisations (as
``tests/cuda_emu/syncs.py`` defines them for the zero-sync tests too: ``.item()``,
data-dependent-shape ops and copies to the host; eager, and while "captured"), the peak bytes
held by tensors, and the GEMM FLOPs by precision. Times are not measured: the emulation's speed
says nothing about a GPU's. Writes ``{"launches", "host_syncs", "host_syncs_captured",
"peak_bytes", "gemm_flops", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from backends import peak_bytes  # noqa: E402
from cuda_emu import build, syncs  # noqa: E402
from insid3_fast import INSID3, ops  # noqa: E402
from insid3_fast.config import MATMUL_PRECISIONS  # noqa: E402
from insid3_fast.inputs import load_image  # noqa: E402
from insid3_fast.synthetic import SyntheticEncoder, make_episode  # noqa: E402

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# The profiler scopes of our bf16 GEMMs (bf16_gemm in csrc/cuda/cuda_utils.cuh), each one bf16
# tensor-core GEMM on a GPU (in the emulation float32 copies of its operands and a CPU GEMM inside
# the scope), and the FLOP tag of each: the split-bf16 products (csrc/cuda/bf16x6.cuh) and the rest.
BF16_GEMMS = {"insid3_fast::bf16x6_gemm": "bf16x6", "insid3_fast::bf16_gemm": "c10::BFloat16"}
# ATen ops that launch no kernel on a GPU: views, metadata, allocation without initialisation.
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view",
             "aten::reshape", "aten::as_strided", "aten::t", "aten::transpose", "aten::permute",
             "aten::expand", "aten::narrow", "aten::slice", "aten::select", "aten::unsqueeze",
             "aten::squeeze", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::resolve_conj",
             "aten::resolve_neg", "aten::contiguous", "aten::unbind", "aten::split", "aten::chunk",
             "aten::view_as", "aten::expand_as", "aten::flatten", "aten::unflatten", "aten::numpy_T",
             "aten::result_type", "aten::to", "aten::_to_copy_noop", "aten::is_nonzero", "aten::item",
             "aten::set_", "aten::resize_", "aten::_reshape_alias", "aten::split_with_sizes",
             "aten::diagonal", "aten::movedim", "aten::swapaxes", "aten::matrix_H", "aten::mT",
             "aten::is_same_size", "aten::scalar_tensor", "aten::as_strided_", "aten::zeros_like_noop"}


def _profile(fn, by_op: dict[str, int] | None = None) -> tuple[int, int, dict[str, int]]:
    """(host syncs, ATen kernel launches, GEMM FLOPs by input dtype) of fn, from the profiler's
    ATen events. A launch is an ATen op with no ATen op below it that is not a view, metadata or
    bare allocation: what would put one kernel on a GPU stream (cuBLAS may use more than one).
    ATen's CPU decompositions differ from its CUDA ones in places: an estimate, not a trace.
    by_op, when given, receives the launches per ATen op name."""
    with syncs.recording(record_shapes=True, with_flops=True) as (events, copies):
        fn()
    n_syncs, flops = len(copies), {}

    def tag_of(evt) -> str:
        """The FLOP tag of a GEMM: its bf16 scope's, else its input dtype."""
        for scope, tag in BF16_GEMMS.items():
            if syncs.has_ancestor(evt, lambda name, scope=scope: name == scope):
                return tag
        return str(evt.input_dtypes[0]) if evt.input_dtypes else "?"

    for evt in events:
        n_syncs += syncs.is_sync(evt)
        if evt.name in GEMMS and evt.flops:
            tag = tag_of(evt)  # a bf16 scope: bf16 operands on a GPU (float32 copies in the emulation)
            flops[tag] = flops.get(tag, 0) + int(evt.flops)

    def launches_of(evt) -> int:
        if evt.name in BF16_GEMMS:  # one GEMM on the device, whatever the emulation does inside
            if by_op is not None:
                by_op[evt.name] = by_op.get(evt.name, 0) + 1
            return 1
        # An op launches what its ATen sub-ops launch; one that calls none launches one kernel
        # unless it is a view, metadata or a bare allocation.
        below = sum(launches_of(c) for c in evt.cpu_children if c.name.startswith("aten::") or c.name in BF16_GEMMS)
        if below or evt.name in NO_KERNEL or evt.name in syncs.SYNCING:
            return below
        if by_op is not None:
            by_op[evt.name] = by_op.get(evt.name, 0) + 1
        return 1

    counted = lambda name: name.startswith("aten::") or name in BF16_GEMMS  # noqa: E731
    launches = sum(launches_of(e) for e in events if counted(e.name) and not syncs.has_ancestor(e, counted))
    return n_syncs, launches, flops


def measure(size: int, shots: int, connectivity: int | None = None, matmul_precision: str = "fp32") -> dict:
    library = build.load()
    model = INSID3(SyntheticEncoder(embed_dim=1024), backend="native", image_size=size, svd_components=500,
                   connectivity=connectivity, matmul_precision=matmul_precision)
    core = model.core
    refs, masks, target, _ = make_episode(seed=11, shots=shots)
    ref = model.encode_reference(refs, masks)
    image, _ = load_image(target, core.image_size)
    feats = core.features(image if image.dim() == 4 else image[None])[0]
    C, h, w = feats.shape
    with ops.use_library(library):
        core.segment_patches(ref, feats)  # warm-up (caches, lazy inits)
        before = build.launch_count()
        by_op: dict[str, int] = {}
        n_syncs, aten_launches, flops = _profile(lambda: core.segment_patches(ref, feats), by_op)
        launches = build.launch_count() - before
        with build.capturing():  # what a CUDA graph of the call would hold: no input checks
            before = build.launch_count()
            captured, captured_aten, _ = _profile(lambda: core.segment_patches(ref, feats))
            captured_ours = build.launch_count() - before
        peak = peak_bytes(lambda: core.segment_patches(ref, feats))
    n = h * w
    return {
        "size": size, "shots": shots, "connectivity": connectivity, "matmul_precision": matmul_precision,
        "N": n, "C": C,
        "launches": launches + aten_launches, "launches_ours": launches, "launches_aten": aten_launches,
        "launches_captured": captured_ours + captured_aten, "launches_captured_ours": captured_ours,
        "launches_captured_aten": captured_aten,
        "host_syncs": n_syncs, "host_syncs_captured": captured,
        "peak_bytes": peak, "peak_over_8N2": peak / (8 * n * n),
        "gemm_flops": flops,
        "aten_launches_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "note": "launches: our kernels (counted by the emulation) plus ATen kernel ops (profiler leaves that "
                "are not views or bare allocations; a split-bf16 GEMM is one); GEMM FLOPs by input dtype from the "
                "profiler (bf16x6: the split-bf16 GEMMs, bf16 operands on the tensor cores of a GPU; their inner "
                "size is 6x the float32 product's)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=None)
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="fp32",
                   help="the model option matmul_precision (bf16x6: the split-bf16 products)")
    p.add_argument("--json", default=None, help="write the counters here")
    args = p.parse_args(argv)
    out = measure(args.size, args.shots, args.connectivity, args.matmul_precision)
    for k, v in out.items():
        print(f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
