"""The ``insid3-fast`` command: segment, match (keypoints), eval, bench.

Every error insid3_fast expects (bad input, missing weights, unavailable backend) ends as one
line on stderr and a non-zero exit, never a traceback; outputs are written atomically, so a
failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Callable, Sequence

from .errors import InputError, Insid3Error

PROG = "insid3-fast"


def _check_output(path: str | None) -> None:
    if path and path != "-":
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise InputError(f"output folder does not exist: '{directory}'")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` then rename, so no half-written file remains."""
    _check_output(path)
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix, prefix=".insid3-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="DINOv3 checkpoint (Meta .pth, HF folder or .safetensors); "
                                     "default: $INSID3_WEIGHTS or pretrain/")
    p.add_argument("--model-size", default=None,
                   help="small, small_plus, base, large, huge_plus or 7b (default: inferred from the weights, else large)")
    p.add_argument("--image-size", type=int, default=1024, help="side images are resized to (multiple of 16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    p.add_argument("--svd-components", type=int, default=None,
                   help="rank of the positional subspace removed (default: the published 500, or half the "
                        "embedding size when that is 500 or less: 192 for small and small_plus)")
    p.add_argument("--exif-transpose", action="store_true",
                   help="apply the EXIF orientation of the images (the published code ignores it)")
    p.add_argument("--tau", type=float, default=0.6, help="clustering similarity threshold")
    p.add_argument("--merge-threshold", type=float, default=0.2, help="cluster score threshold (alpha)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="backbone precision (bf16: autocast, for GPUs; fp32 is the parity mode)")


def _build_model(args: argparse.Namespace, **kwargs):
    from .model import build_insid3

    model = build_insid3(model_size=args.model_size, weights=args.weights, image_size=args.image_size,
                         svd_components=args.svd_components, tau=args.tau, merge_threshold=args.merge_threshold,
                         device=_device(args.device), backend=args.backend, precision=args.precision,
                         exif_transpose=args.exif_transpose, **kwargs)
    basis = model.positional_basis
    print(f"{PROG}: removing a rank-{basis.shape[1]} positional subspace (embedding size {basis.shape[0]})",
          file=sys.stderr)
    return model


def _check_reference_files(args: argparse.Namespace) -> None:
    """Every reference image and mask readable, each mask the size of its image unless --resize-mask."""
    from .inputs import load_image, load_mask

    for image, mask in zip(args.ref_image, args.ref_mask):
        _, orig = load_image(image, 16, exif_transpose=args.exif_transpose)
        load_mask(mask, 16, expected_hw=orig, mismatch="ignore" if args.resize_mask else "raise",
                  exif_transpose=args.exif_transpose)


def _segment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .inputs import check_image_size_multiple, load_image, open_image_file

    if len(args.ref_image) != len(args.ref_mask):
        raise InputError(f"give one --ref-mask per --ref-image (got {len(args.ref_image)} images, "
                         f"{len(args.ref_mask)} masks)")
    check_image_size_multiple(args.image_size)
    _check_output(args.output)
    _check_output(args.overlay)
    # Validate every input before the (slow) model load.
    _check_reference_files(args)
    load_image(args.target, 16)

    model = _build_model(args, mask_refiner="crf" if args.crf else "bilinear",
                         connectivity=args.connectivity)
    for image, mask in zip(args.ref_image, args.ref_mask):
        model.set_reference(image, mask)
    model.set_target(args.target)
    mask = model.segment().cpu().numpy()

    picture = None
    if args.overlay:
        from .visualize import overlay_mask

        picture = overlay_mask(open_image_file(args.target), mask)
    _atomic_write(args.output, lambda tmp: Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG"))
    if picture is not None:
        try:
            _atomic_write(args.overlay, lambda tmp: picture.save(tmp, format="PNG"))
        except BaseException:
            os.unlink(args.output)  # all outputs or none
            raise
    print(f"{args.output}: {int(mask.sum())} of {mask.size} pixels in the mask "
          f"({100.0 * mask.mean():.1f}%)")
    return 0


def _read_keypoints(path: str):
    import torch

    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"keypoints file not found: '{path}'") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read keypoints file '{path}': {exc}") from None
    points = data.get("keypoints") if isinstance(data, dict) else data
    try:
        kps = torch.tensor(points, dtype=torch.float32)
    except (TypeError, ValueError):
        kps = None
    if kps is None or kps.ndim != 2 or kps.shape[1] != 2 or kps.shape[0] == 0:
        raise InputError(f"keypoints file '{path}' must hold a non-empty list of [x, y] pairs "
                         "(or {\"keypoints\": [[x, y], ...]})")
    return kps


def _match(args: argparse.Namespace) -> int:
    from .inputs import check_image_size_multiple, load_image

    check_image_size_multiple(args.image_size)
    _check_output(args.output)
    kps = _read_keypoints(args.keypoints)
    load_image(args.ref_image, 16)
    load_image(args.target, 16)
    model = _build_model(args)
    model.set_reference(args.ref_image)
    model.set_target(args.target)
    pred = model.match(kps, use_debiased=not args.original_features).cpu().tolist()
    result = {"reference": args.ref_image, "target": args.target, "debiased": not args.original_features,
              "source_keypoints": kps.tolist(), "keypoints": pred}

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)

    if args.output == "-":
        print(json.dumps(result, indent=2))
    else:
        _atomic_write(args.output, write)
        print(f"{args.output}: {len(pred)} keypoints transferred")
    return 0


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _list_targets(args: argparse.Namespace) -> list[str]:
    targets = list(args.target or [])
    if args.target_dir:
        if not os.path.isdir(args.target_dir):
            raise InputError(f"target folder not found: '{args.target_dir}'")
        targets += sorted(os.path.join(args.target_dir, f) for f in os.listdir(args.target_dir)
                          if f.lower().endswith(IMAGE_SUFFIXES))
    if not targets:
        raise InputError("no targets: give --target (repeatable) or --target-dir with images")
    stems = [os.path.splitext(os.path.basename(t))[0] for t in targets]
    if len(set(stems)) != len(stems):
        raise InputError("two targets share a file name; their masks would overwrite each other")
    return targets


def _segment_many(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from . import distributed
    from .inputs import check_image_size_multiple

    check_image_size_multiple(args.image_size)
    if len(args.ref_image) != len(args.ref_mask):
        raise InputError("give one --ref-mask per --ref-image")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    targets = _list_targets(args)
    _check_reference_files(args)
    os.makedirs(args.output_dir, exist_ok=True)
    rank, world = distributed.init_from_env()
    try:
        outputs = {t: os.path.join(args.output_dir, os.path.splitext(os.path.basename(t))[0] + ".png")
                   for t in targets}
        # Resumable: masks already written are not recomputed.
        todo = [t for t in distributed.shard(targets, rank, world) if not os.path.exists(outputs[t])]
        args.device = str(distributed.local_device(args.device)) if args.device != "cpu" else "cpu"
        model = _build_model(args, connectivity=args.connectivity)
        ref = model.encode_reference(args.ref_image, args.ref_mask)
        done = 0
        with tqdm(total=len(todo), desc="segment", unit="img", disable=rank != 0 or not todo) as bar:
            # stream() loads the next batches in the background while this one computes.
            for target, mask in zip(todo, model.stream(ref, todo, args.batch_size)):
                arr = mask.cpu().numpy().astype(np.uint8) * 255
                _atomic_write(outputs[target], lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
                done += 1
                bar.update(1)
        total_done, total_skipped = distributed.all_sum([done, len(distributed.shard(targets, rank, world)) - done])
        distributed.barrier()
        if rank == 0:
            print(f"{args.output_dir}: {total_done} masks written, {total_skipped} already there "
                  f"({world} process{'es' if world > 1 else ''})")
    finally:
        distributed.finish()
    return 0


RESIZE_MASK_HELP = ("accept a reference mask whose size differs from its image's (it is resized to the "
                    "model size with nearest, as the published code does)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``insid3-fast``."""
    parser = argparse.ArgumentParser(prog=PROG, description="Fast INSID3 in-context segmentation with DINOv3.")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a target given reference image(s) and mask(s)")
    seg.add_argument("--ref-image", action="append", required=True, help="reference image (repeat per shot)")
    seg.add_argument("--ref-mask", action="append", required=True, help="reference mask (repeat per shot)")
    seg.add_argument("--target", required=True, help="image to segment")
    seg.add_argument("--output", required=True, help="output mask PNG (0/255, the target's size)")
    seg.add_argument("--overlay", help="also write the target with the mask overlaid (PNG)")
    seg.add_argument("--crf", action="store_true", help="refine the boundary with the dense CRF")
    seg.add_argument("--resize-mask", action="store_true", help=RESIZE_MASK_HELP)
    seg.add_argument("--connectivity", type=int, choices=[4, 8], default=None,
                     help="grid-constrained clustering (default: the published unconstrained one)")
    _add_model_arguments(seg)
    seg.set_defaults(func=_segment)

    many = sub.add_parser("segment-many", help="segment many targets against one reference "
                                               "(batched; torchrun spreads them over GPUs)")
    many.add_argument("--ref-image", action="append", required=True)
    many.add_argument("--ref-mask", action="append", required=True)
    many.add_argument("--target", action="append", help="target image (repeatable)")
    many.add_argument("--target-dir", help="folder of target images")
    many.add_argument("--output-dir", required=True, help="one <target name>.png mask per target")
    many.add_argument("--batch-size", type=int, default=8)
    many.add_argument("--resize-mask", action="store_true", help=RESIZE_MASK_HELP)
    many.add_argument("--connectivity", type=int, choices=[4, 8], default=None)
    _add_model_arguments(many)
    many.set_defaults(func=_segment_many)

    match = sub.add_parser("match", help="transfer keypoints from a reference image to a target")
    match.add_argument("--ref-image", required=True)
    match.add_argument("--target", required=True)
    match.add_argument("--keypoints", required=True, help="JSON: [[x, y], ...] in reference pixels")
    match.add_argument("--output", default="-", help="output JSON (default: stdout)")
    match.add_argument("--original-features", action="store_true", help="match without debiasing")
    _add_model_arguments(match)
    match.set_defaults(func=_match)

    # Part of the package: an import error here is a bug to see, not a subcommand to hide.
    from .bench import add_bench_arguments, run_bench
    from .eval.cli import add_eval_arguments, run_eval

    ev = sub.add_parser("eval", help="evaluate on a published benchmark")
    add_eval_arguments(ev)
    ev.set_defaults(func=lambda a: (run_eval(a), 0)[1])
    bench = sub.add_parser("bench", help="time each stage against the reference path")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    return parser


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """insid3_fast's own warnings as one line (``insid3-fast: warning: ...``); others as Python shows them."""
    from .errors import InputWarning

    if issubclass(category, InputWarning):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; expected errors become one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except Insid3Error as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, MemoryError) as exc:
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
