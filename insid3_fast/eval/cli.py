"""``insid3-fast eval``: argument parsing and the entry point that builds model and benchmark."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from typing import Any

import numpy as np
import torch

from ..atomic import make_output_folder
from ..config import ArgumentParser, add_arguments
from ..errors import InputError, Insid3Error
from .. import distributed
from .correspondence import SPair71k, evaluate_correspondence
from .datasets import SEGMENTATION_DATASETS, build_dataset
from .records import clear_run
from .metrics import format_class_table
from .runner import evaluate_segmentation

DATASET_CHOICES = [*SEGMENTATION_DATASETS, "spair"]
# The model options of the evaluation (definitions: insid3_fast.config), and the published
# scripts' spellings of two of them.
MODEL_OPTIONS = ("model_size", "weights", "image_size", "svd_components", "tau", "merge_threshold", "mask_refiner",
                 "device", "backend")
PUBLISHED_ALIASES = {"svd_components": ("--svd-comps",), "merge_threshold": ("--merge-thresh",)}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the evaluation options (dataset, model, episodes, output) to ``parser``."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="coco", choices=DATASET_CHOICES, help="benchmark to evaluate")
    data.add_argument("--data-root", default="data", help="folder holding the datasets (published layout)")
    data.add_argument("--fold", type=int, default=0,
                      help="fold (coco 0-3, lvis 0-9, pascal_part/paco_part 0-3, isaid 0-2); -1 as published: "
                           "all 80 classes for coco, fold 0's classes for lvis/paco_part, vehicles for pascal_part")
    data.add_argument("--shots", type=int, default=1, help="reference images per episode")
    data.add_argument("--episodes", type=int, default=None, help="episodes to run (default: the published count)")
    data.add_argument("--seed", type=int, default=0, help="seed of the episode draw")
    data.add_argument("--split", default="test", help="SPair-71k split (spair only)")
    model = parser.add_argument_group("model")
    add_arguments(model, MODEL_OPTIONS, aliases=PUBLISHED_ALIASES)
    model.add_argument("--crf-mask-refinement", dest="mask_refiner", action="store_const", const="crf",
                       help="the published flag: same as --mask-refiner crf")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=None, help="output folder (default: output/<dataset>-fold<f>-<k>shot-seed<s>)")
    run.add_argument("--save-overlays", type=int, default=0, metavar="K", help="save PNG overlays of the first K episodes")
    run.add_argument("--overwrite", action="store_true", help="discard a previous run in --output-dir instead of resuming")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    published = parser.add_argument_group("flags of the published scripts")
    published.add_argument("--exp-name", default=None,
                           help="run name: the output folder becomes <--output-dir or output>/<name> (the "
                                "published scripts also append a timestamp; ours does not, so a rerun resumes)")
    published.add_argument("--debiased", action="store_true",
                           help="spair: accepted and has no effect; every run reports PCK of both the original "
                                "and the debiased features (the published flag chose one)")
    published.add_argument("--num-workers", type=int, default=0,
                           help="accepted and has no effect; episodes are loaded in the main process, as the "
                                "published draw (defined with --num-workers 0) requires")


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The model options a run records (and resumes only with), as the published evaluation sets them."""
    return {
        "model_size": args.model_size, "weights": args.weights, "image_size": args.image_size,
        "svd_components": args.svd_components, "tau": args.tau, "merge_threshold": args.merge_threshold,
        "mask_refiner": args.mask_refiner, "resize_to_orig_size": False,
    }


def _requested_device(args: argparse.Namespace) -> str | None:
    """``--device`` for torchrun's rank set-up: None for ``auto`` (each rank takes its GPU when there is one)."""
    return None if args.device in (None, "auto") else args.device


def build_model(args: argparse.Namespace, device: str | None) -> Any:
    """The INSID3 model as the published evaluation builds it (prediction at image_size x image_size)."""
    from ..model import build_insid3  # imported late: the evaluation code does not need the model to load

    return build_insid3(device=device, backend=args.backend, **_model_config(args))


def default_output_dir(args: argparse.Namespace) -> str:
    """``output/<dataset>-fold<f>-<k>shot-seed<s>`` (or ``output/spair-<split>``); with
    ``--exp-name N``, ``<--output-dir or output>/N``."""
    exp_name = getattr(args, "exp_name", None)
    if exp_name:
        if os.path.basename(exp_name) != exp_name or exp_name in (".", ".."):
            raise InputError(f"--exp-name must be a plain folder name, got '{exp_name}'")
        return os.path.join(args.output_dir or "output", exp_name)
    if args.output_dir:
        return args.output_dir
    if args.dataset == "spair":
        return os.path.join("output", f"spair-{args.split}")
    return os.path.join("output", f"{args.dataset}-fold{args.fold}-{args.shots}shot-seed{args.seed}")


def run_eval(args: argparse.Namespace, model: Any = None) -> dict[str, Any]:
    """Run the evaluation ``args`` describe and return the results dict.

    ``model`` replaces the INSID3 model (any object with set_reference/set_target/segment, or
    match for spair). Under torchrun the episodes are sharded over the ranks.
    """
    rank, world = distributed.init_from_env(_requested_device(args))
    device = distributed.local_device(_requested_device(args))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    output_dir = default_output_dir(args)
    if getattr(args, "num_workers", 0) < 0:
        raise InputError(f"--num-workers must be >= 0, got {args.num_workers}")
    # Before any folder is made, for every dataset (spair scored zero pairs with --episodes 0).
    if args.episodes is not None and args.episodes < 1:
        raise InputError(f"--episodes must be at least 1, got {args.episodes}")
    if getattr(args, "save_overlays", 0) < 0:
        raise InputError(f"--save-overlays must be >= 0, got {args.save_overlays}")
    created = _missing_folders(output_dir) if rank == 0 else []
    if rank == 0:
        try:
            make_output_folder(output_dir, "--output-dir")
        except InputError:
            _remove_if_empty(created)
            raise
        if args.overwrite:
            clear_run(output_dir, ("results.json", "log.txt"))
            shutil.rmtree(os.path.join(output_dir, "overlays"), ignore_errors=True)
    distributed.barrier()
    try:
        return _run(args, model, rank, world, device, output_dir)
    except BaseException:
        _remove_if_empty(created)  # a run that failed before writing anything leaves no folder
        raise


def _missing_folders(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_empty(folders: list[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)  # only ever removes an empty folder
        except OSError:
            return


def _run(args: argparse.Namespace, model: Any, rank: int, world: int, device: str | None,
         output_dir: str) -> dict[str, Any]:
    config = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
              for k, v in vars(args).items() if not callable(v)}  # not the subcommand's function
    config["model"] = _model_config(args)
    config["world_size"] = world
    progress = not getattr(args, "no_progress", False)

    if args.dataset == "spair":
        dataset = SPair71k(args.data_root, split=args.split)
        model = model if model is not None else build_model(args, device)
        return evaluate_correspondence(model, dataset, output_dir, num_pairs=args.episodes, config=config,
                                       rank=rank, world_size=world, progress=progress, device=device)

    dataset = build_dataset(args.dataset, args.data_root, fold=args.fold, shots=args.shots)
    model = model if model is not None else build_model(args, device)
    return evaluate_segmentation(model, dataset, output_dir, num_episodes=args.episodes, seed=args.seed,
                                 config=config, save_overlays=args.save_overlays, rank=rank, world_size=world,
                                 progress=progress)


def format_report(results: dict[str, Any]) -> str:
    """The result table and headline numbers a run prints (and log.txt holds)."""
    if results["task"] == "segmentation":
        return (format_class_table(results["per_class"]) + "\n\n"
                + f"{results['dataset']} fold {results['fold']} {results['shots']}-shot: "
                  f"mIoU {results['miou']:.1f}  FB-IoU {results['fb_iou']:.1f}")
    from .correspondence import format_pck_table

    lines = [format_pck_table(results), ""]
    for version in ("original", "debiased"):
        vals = results[version]["all"]
        lines.append(f"spair {version}: " + "  ".join(f"{k} {v:.1f}" for k, v in vals.items()))
    return "\n".join(lines)


def eval_command(args: argparse.Namespace) -> int:
    """Run the evaluation and print its table on rank 0 (``insid3-fast eval``); exit status 0."""
    if getattr(args, "num_workers", 0):
        print(f"note: --num-workers {args.num_workers} has no effect (episodes load in the main process)",
              file=sys.stderr)
    results = run_eval(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(results))
        print(f"(results.json and log.txt in {default_output_dir(args)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m insid3_fast.eval``: parse, run, print the result table; errors are one line."""
    parser = ArgumentParser("insid3-fast eval", description="Evaluate INSID3 on the published benchmarks")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return eval_command(args)
    except Insid3Error as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    except (OSError, RuntimeError, MemoryError) as exc:
        parser.exit(1, f"{parser.prog}: error: {type(exc).__name__}: {exc}\n")
