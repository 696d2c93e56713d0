"""The ``insid3-fast`` command: segment, match (keypoints), eval, bench.

Every error insid3_fast expects (bad input, missing weights, unavailable backend) ends as one
line on stderr and a non-zero exit, never a traceback; outputs are written atomically, so a
failed run leaves no partial file and keeps what was at the output path before
(`insid3_fast.atomic`). An output that is one of the command's inputs, or that is not a regular
file (a link, a FIFO, a device), is refused before anything runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Sequence

from .atomic import atomic_write, atomic_write_many, atomic_write_text, check_output_path, make_output_folder
from .errors import InputError, Insid3Error

PROG = "insid3-fast"


def _check_output(path: str | None, inputs: Sequence[str] = (), *, stdout: bool = False,
                  flag: str = "--output") -> None:
    """A writable output file (``-``: standard output, where ``stdout``), checked before any work."""
    if path is None or (stdout and path == "-"):
        return
    if path == "-":
        raise InputError(f"{flag} - (standard output) is not supported for images: give a file path")
    check_output_path(path, inputs, what=flag, probe=True)


def _device(name: str):
    import torch

    from .core import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available; use --device cpu")
    return resolve_device(name)


# The model options every subcommand that builds a model takes (definitions: insid3_fast.config).
MODEL_OPTIONS = ("weights", "model_size", "image_size", "device", "backend", "svd_components", "exif_transpose",
                 "tau", "merge_threshold", "precision", "matmul_precision")


def _add_model_arguments(p: argparse.ArgumentParser, *extra: str) -> None:
    """The flags of ``MODEL_OPTIONS`` and of the ``extra`` options, generated from the config."""
    from .config import add_arguments

    add_arguments(p, (*MODEL_OPTIONS, *extra))


def _build_model(args: argparse.Namespace, **kwargs):
    from .config import Insid3Config, LoadConfig, options_from_args
    from .model import build_insid3

    options = {**options_from_args(args, LoadConfig), **options_from_args(args, Insid3Config), **kwargs}
    options["device"] = _device(options["device"])
    model = build_insid3(**options)
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

    from .inputs import check_image_size_multiple, load_image, read_image_file

    if len(args.ref_image) != len(args.ref_mask):
        raise InputError(f"give one --ref-mask per --ref-image (got {len(args.ref_image)} images, "
                         f"{len(args.ref_mask)} masks)")
    check_image_size_multiple(args.image_size)
    inputs = [*args.ref_image, *args.ref_mask, args.target]
    _check_output(args.output, inputs)
    _check_output(args.overlay, inputs, flag="--overlay")
    if args.overlay is not None and os.path.abspath(args.overlay) == os.path.abspath(args.output):
        raise InputError("--overlay and --output name the same file: give each its own path")
    # Validate every input before the (slow) model load.
    _check_reference_files(args)
    load_image(args.target, 16)

    model = _build_model(args, mask_refiner="crf" if args.crf else "bilinear")
    for image, mask in zip(args.ref_image, args.ref_mask):
        model.set_reference(image, mask)
    model.set_target(args.target)
    mask = model.segment().cpu().numpy()

    writes = [(args.output, lambda fp: Image.fromarray(mask.astype(np.uint8) * 255).save(fp, format="PNG"))]
    if args.overlay is not None:
        from .visualize import overlay_mask

        # The target as the model read it: EXIF-rotated with --exif-transpose (the mask's frame),
        # a 16-bit or float file clipped to 0-255 as published (its warning was shown).
        picture = overlay_mask(read_image_file(args.target, exif_transpose=args.exif_transpose), mask)
        writes.append((args.overlay, lambda fp: picture.save(fp, format="PNG")))
    # All outputs or none; a failure leaves the files that were there before.
    atomic_write_many(writes, inputs)
    print(f"{args.output}: {int(mask.sum())} of {mask.size} pixels in the mask "
          f"({100.0 * mask.mean():.1f}%)")
    return 0


def _read_keypoints(path: str):
    import torch

    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"keypoints file not found: '{path}'") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"keypoints file '{path}' is not UTF-8 text (byte {exc.start}): "
                         "write it as a UTF-8 JSON file") from None
    except (OSError, ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise InputError(f"cannot read keypoints file '{path}': {exc}") from None
    points = data.get("keypoints") if isinstance(data, dict) else data
    if isinstance(points, list) and any(isinstance(v, bool) for p in points if isinstance(p, list) for v in p):
        raise InputError(f"keypoints file '{path}' holds true/false where coordinates belong: "
                         "write [x, y] pairs of numbers")
    try:
        kps = torch.tensor(points, dtype=torch.float32)
    except (TypeError, ValueError):
        kps = None
    if kps is None or kps.ndim != 2 or kps.shape[1] != 2 or kps.shape[0] == 0:
        raise InputError(f"keypoints file '{path}' must hold a non-empty list of [x, y] pairs "
                         "(or {\"keypoints\": [[x, y], ...]})")
    return kps


def _json_points(points: list[list[float]]) -> list[list[float | None]]:
    """Points for JSON: a non-finite coordinate (a keypoint that had NaN/inf) as null, since
    NaN and Infinity are not JSON (other readers refuse the file)."""
    return [[v if math.isfinite(v) else None for v in p] for p in points]


def _match(args: argparse.Namespace) -> int:
    from .inputs import check_image_size_multiple, load_image

    check_image_size_multiple(args.image_size)
    inputs = [args.ref_image, args.target, args.keypoints]
    _check_output(args.output, inputs, stdout=True)
    kps = _read_keypoints(args.keypoints)
    load_image(args.ref_image, 16)
    load_image(args.target, 16)
    model = _build_model(args)
    model.set_reference(args.ref_image)
    model.set_target(args.target)
    pred = model.match(kps, use_debiased=not args.original_features).cpu().tolist()
    result = {"reference": args.ref_image, "target": args.target, "debiased": not args.original_features,
              "source_keypoints": _json_points(kps.tolist()), "keypoints": _json_points(pred)}

    text = json.dumps(result, indent=2, allow_nan=False)
    if args.output == "-":
        print(text)
    else:
        atomic_write_text(args.output, text + "\n", inputs)
        print(f"{args.output}: {len(pred)} keypoints transferred")
    return 0


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _list_targets(args: argparse.Namespace) -> list[str]:
    targets = list(args.target or [])
    if args.target_dir:
        if not os.path.isdir(args.target_dir):
            raise InputError(f"target folder not found: '{args.target_dir}'")
        # Files only: a folder named like an image (sub.jpg/) is not a target.
        targets += sorted(os.path.join(args.target_dir, f) for f in os.listdir(args.target_dir)
                          if f.lower().endswith(IMAGE_SUFFIXES)
                          and not os.path.isdir(os.path.join(args.target_dir, f)))
    if not targets:
        raise InputError("no targets: give --target (repeatable) or --target-dir with images")
    by_stem: dict[str, list[str]] = {}
    for t in targets:
        by_stem.setdefault(os.path.splitext(os.path.basename(t))[0], []).append(t)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(" and ".join(f"'{p}'" for p in paths) for paths in clashes[:3])
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise InputError(f"targets share a file name, so their masks (<name>.png) would overwrite each other: "
                         f"{shown}{more}; rename or remove one of each")
    return targets


def _check_output_dir(args: argparse.Namespace, targets: Sequence[str],
                      outputs: dict[str, str]) -> None:
    """Refuse an output folder whose masks would overwrite, or be mistaken for, an input."""
    inputs = [*targets, *args.ref_image, *args.ref_mask]  # a file in its place: make_output_folder refuses it
    folders = {os.path.dirname(os.path.abspath(t)) for t in targets}
    if args.target_dir:
        folders.add(os.path.abspath(args.target_dir))
    if os.path.isdir(args.output_dir) and any(os.path.isdir(f) and os.path.samefile(f, args.output_dir)
                                              for f in folders):
        raise InputError(f"--output-dir '{args.output_dir}' is a folder of targets: the masks would "
                         "overwrite PNG targets or be read as targets by the next run; use another folder")
    for target, path in outputs.items():
        if os.path.lexists(path):  # an existing regular file is a finished mask (resume)
            check_output_path(path, inputs, what="mask")


def _segment_many(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from . import distributed
    from .inputs import check_image_size_multiple, load_image

    check_image_size_multiple(args.image_size)
    if len(args.ref_image) != len(args.ref_mask):
        raise InputError("give one --ref-mask per --ref-image")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.output_dir:
        raise InputError("--output-dir is empty: give a folder name")
    targets = _list_targets(args)
    _check_reference_files(args)
    outputs = {t: os.path.join(args.output_dir, os.path.splitext(os.path.basename(t))[0] + ".png")
               for t in targets}
    _check_output_dir(args, targets, outputs)
    # Checked with the longest mask name still to write (none left: a resumed run in a read-only
    # folder has nothing to write).
    make_output_folder(args.output_dir, "--output-dir",
                       [os.path.basename(p) for p in outputs.values() if not os.path.exists(p)])
    rank, world = distributed.init_from_env()
    try:
        mine = distributed.shard(targets, rank, world)
        # Resumable: masks already written are not recomputed.
        todo = [t for t in mine if not os.path.exists(outputs[t])]
        args.device = str(distributed.local_device(args.device)) if args.device != "cpu" else "cpu"
        model = _build_model(args)
        ref = model.encode_reference(args.ref_image, args.ref_mask)
        done, failed = 0, []
        with tqdm(total=len(todo), desc="segment", unit="img", disable=rank != 0 or not todo) as bar:
            remaining = list(todo)
            while remaining:
                consumed = 0
                try:
                    # stream() loads the next batches in the background while this one computes.
                    for target, mask in zip(remaining, model.stream(ref, remaining, args.batch_size)):
                        arr = mask.cpu().numpy().astype(np.uint8) * 255
                        atomic_write(outputs[target], lambda fp: Image.fromarray(arr).save(fp, format="PNG"))
                        consumed += 1
                        done += 1
                        bar.update(1)
                    remaining = []
                except InputError:
                    # A batch failed to load: find its unreadable targets, skip them, go on.
                    batch, bad = remaining[consumed:consumed + args.batch_size], []
                    for target in batch:
                        try:
                            load_image(target, 16)
                        except InputError as exc:
                            bad.append(target)
                            failed.append(target)
                            print(f"{PROG}: skipped: {exc}", file=sys.stderr)
                            bar.update(1)
                    if not bad:
                        raise
                    remaining = [t for t in remaining[consumed:] if t not in bad]
        total_done, total_failed, total_skipped = distributed.all_reduce_sum(
            [done, len(failed), len(mine) - len(todo)])
        distributed.barrier()
        if rank == 0:
            print(f"{args.output_dir}: {total_done} masks written, {total_skipped} already there"
                  + (f", {total_failed} unreadable target{'s' if total_failed != 1 else ''} skipped"
                     if total_failed else "")
                  + f" ({world} process{'es' if world > 1 else ''})")
    finally:
        distributed.finish()
    if total_failed:
        if rank == 0:
            print(f"{PROG}: error: {total_failed} target(s) could not be read (listed above); "
                  "fix or remove them and run again to finish", file=sys.stderr)
        return 1
    return 0


RESIZE_MASK_HELP = ("accept a reference mask whose size differs from its image's (it is resized to the "
                    "model size with nearest, as the published code does)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``insid3-fast``."""
    from .config import ArgumentParser

    parser = ArgumentParser(prog=PROG, description="Fast INSID3 in-context segmentation with DINOv3.")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a target given reference image(s) and mask(s)")
    seg.add_argument("--ref-image", action="append", required=True, help="reference image (repeat per shot)")
    seg.add_argument("--ref-mask", action="append", required=True, help="reference mask (repeat per shot)")
    seg.add_argument("--target", required=True, help="image to segment")
    seg.add_argument("--output", required=True, help="output mask PNG (0/255, the target's size)")
    seg.add_argument("--overlay", help="also write the target with the mask overlaid (PNG)")
    seg.add_argument("--crf", action="store_true", help="refine the boundary with the dense CRF")
    seg.add_argument("--resize-mask", action="store_true", help=RESIZE_MASK_HELP)
    _add_model_arguments(seg, "connectivity")
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
    _add_model_arguments(many, "connectivity")
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
    from .eval.cli import add_eval_arguments, eval_command

    ev = sub.add_parser("eval", help="evaluate on a published benchmark")
    add_eval_arguments(ev)
    ev.set_defaults(func=eval_command)
    bench = sub.add_parser("bench", help="time each stage against the reference path")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    return parser


_python_showwarning = warnings.showwarning
_SHOWN: set[str] = set()  # the package's warnings shown by this command (main() clears it)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """insid3_fast's own warnings as one line (``insid3-fast: warning: ...``): its InputWarnings and
    any warning raised from its modules (e.g. a positional-basis cache entry recomputed); others
    as Python shows them."""
    from .errors import InputWarning

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    if issubclass(category, InputWarning) or os.path.abspath(str(filename)).startswith(package):
        # Once per command: an input checked before the model loads it again warns again.
        text = f"{PROG}: warning: {message}"
        if text not in _SHOWN:
            _SHOWN.add(text)
            print(text, file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; expected errors become one line and exit status 2."""
    try:  # building the parser imports the subcommands' modules (seconds): Ctrl-C there too
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    _SHOWN.clear()
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
