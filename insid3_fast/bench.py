"""``insid3-fast bench``: per-stage timings of the fast path against the reference path, same run.

Features come from a deterministic synthetic encoder (no weights needed), at the embedding
size of ViT-L (C = 1024) by default, so every stage does real work: debiasing, reverse-NN
voting, clustering, aggregation, upsampling, whole episodes, cached references, batched
targets. "ours" is the package's pipeline (``insid3_fast.pipeline`` through the core) on the
native kernels, "reference" the published code restated (``insid3_fast.testing.published``).
Times are medians over ``--repeats`` runs of ``torch.utils.benchmark``; the ratio is
reference / ours.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from .atomic import atomic_write_json, check_output_path

STAGES = ("debias", "votes", "clustering", "cluster_and_vote", "aggregation", "upsampling", "episode", "cached_target",
          "batched_targets")
DEFAULT_STAGES = STAGES
#: With ``--backbone``: the backbone alone, end to end, and (on CUDA) the captured call, whose
#: reference is our own eager end to end (the ratio is what the CUDA graph saves).
BACKBONE_STAGES = ("backbone", "end_to_end", "captured")
#: The backbone stages whose reference (one fp32 published episode per target) depends neither
#: on our precision nor on the batch: timed once per case (``captured``'s reference is ours).
SHARED_REFERENCE_STAGES = ("backbone", "end_to_end")


@dataclass
class Case:
    """Inputs of one benchmark configuration, with the native core built on them."""

    size: int
    shots: int
    dim: int
    device: torch.device
    connectivity: int | None = None
    data: dict = field(default_factory=dict)


def build_case(size: int, shots: int, dim: int = 1024, device: str = "cpu", connectivity: int | None = None,
               targets: int = 4, seed: int = 0) -> Case:
    """Features and masks of one synthetic episode (plus extra targets), and a native core."""
    from .core import Insid3Core
    from .inputs import load_image, load_mask
    from .synthetic import SyntheticEncoder, make_episode

    encoder = SyntheticEncoder(dim, hidden=256)
    refs, masks, target, _ = make_episode(seed, shots, size_hw=(480, 640))
    extra = [make_episode(seed + 100 + i, 1, size_hw=(480, 640))[2] for i in range(targets - 1)]
    case = Case(size, shots, dim, torch.device(device), connectivity)
    core = Insid3Core(encoder, image_size=size, svd_components=min(500, dim // 2), connectivity=connectivity,
                      backend="native", device=device)
    images = torch.cat([load_image(x, size)[0] for x in refs + [target] + extra]).to(device)
    feats = core.features(images)
    case.data = dict(core=core, encoder=encoder, images=images,
                     ref_feats=feats[:shots], tgt_feats=feats[shots:],
                     ref_masks=torch.cat([load_mask(m, size) for m in masks]).to(device))
    return case


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median time of ``fn`` in seconds over ``repeats`` runs (``torch.utils.benchmark``: CUDA-synchronised)."""
    import logging

    # torch.utils.benchmark imports cpp_extension, which warns on a CUDA build of torch without a
    # toolkit ("No CUDA runtime is found"): about a compiler the timer never calls.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)

    # All threads: the CPU ops overlap clustering and voting (Timer's default is one thread).
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    for _ in range(warmup):
        timer.timeit(1)
    runs = [timer.timeit(1) for _ in range(repeats)]
    return benchmark.Measurement.merge(runs)[0].median


def stage_functions(case: Case) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """(ours, reference) callables per stage, sharing the same inputs.

    ours: the stages of ``insid3_fast.pipeline`` (and the ops they call) on the native kernels;
    reference: the published restatement (``insid3_fast.testing.published``) of the same step.
    With ``connectivity`` the reference column stays the published (unconstrained) clustering:
    the table then says how much faster the grid variant is than the published code.
    """
    from . import ops, pipeline
    from .debias import debias
    from .refine import upsample_mask
    from .testing import published

    d = case.data
    core = d["core"]
    S, size, conn = case.shots, case.size, case.connectivity
    tau, alpha, Q, P = core.tau, core.merge_threshold, core.complement, core.projector
    ref_feats, tgt, masks = d["ref_feats"], d["tgt_feats"][0], d["ref_masks"]
    C, h, w = tgt.shape
    N = h * w
    enc = core.encode_reference_features(ref_feats, masks)
    key_mask = enc.masks_down.reshape(S, N)
    queries = pipeline.debiased_coordinates(tgt[None], Q)[0]
    sim, fwd = pipeline.forward_match(queries, enc.prototype)
    feats = tgt.reshape(C, N).T
    labels, votes = pipeline.cluster_and_vote(feats, h, w, 1 - tau, queries, enc, fwd, conn)
    cands = fwd & pipeline.majority(votes, S)
    patch_mask = core.segment_patches(enc, tgt)
    all_feats = torch.cat([ref_feats, tgt[None]])
    ref_deb, tgt_deb = debias(ref_feats, P), debias(tgt[None], P)[0]
    ref_proto = published.reference_prototype(ref_deb, enc.masks_down)

    def ours_cluster():
        if conn:
            return ops.grid_average_linkage(feats, h, w, conn, 1 - tau)
        return ops.average_linkage(feats, 1 - tau)

    def ref_cluster():
        return published.agglomerative_labels(feats, 1 - tau)

    def ref_votes():
        return published.backward_votes(tgt_deb, ref_deb, enc.masks_down)

    def ours_episode():
        return core.finalize(core.segment_patches(core.encode_reference_features(ref_feats, masks), tgt), None, None)

    def ref_episode_for(t: torch.Tensor) -> torch.Tensor:
        return upsample_mask(published.segment_patches(ref_feats, masks, t, P, tau, alpha), size, size)

    return {
        "debias": (lambda: pipeline.debiased_coordinates(all_feats, Q), lambda: debias(all_feats, P)),
        "votes": (lambda: ops.nn_vote(queries, enc.keys, key_mask, fwd), ref_votes),
        "clustering": (ours_cluster, ref_cluster),
        "cluster_and_vote": (lambda: pipeline.cluster_and_vote(feats, h, w, 1 - tau, queries, enc, fwd, conn),
                             lambda: (ref_cluster(), ref_votes())),
        "aggregation": (lambda: pipeline.aggregate_clusters(labels, cands, queries, feats, sim, enc.prototype, alpha),
                        lambda: published.seed_and_aggregate(cands.reshape(h, w), labels.reshape(h, w), ref_proto,
                                                             tgt, tgt_deb, alpha)),
        "upsampling": (lambda: upsample_mask(patch_mask, size, size), lambda: upsample_mask(patch_mask, size, size)),
        "episode": (ours_episode, lambda: ref_episode_for(tgt)),
        "cached_target": (lambda: core.finalize(core.segment_patches(enc, tgt), None, None),
                          lambda: ref_episode_for(tgt)),
        "batched_targets": (lambda: core.segment(enc, None, features=d["tgt_feats"]),
                            lambda: [ref_episode_for(t) for t in d["tgt_feats"]]),
    }


#: The largest image size the bench takes (4096 px: N = 65536 patches, 32 GiB of distances).
MAX_BENCH_SIZE = 4096


def published_module(checkout: str):
    """The published ``INSID3`` class of a clone of github.com/visinf/INSID3 (``models/insid3.py``).

    Raises:
        InputError: ``checkout`` is not such a clone, or it cannot be imported (its error named).
    """
    from .errors import InputError

    if not os.path.isfile(os.path.join(checkout, "models", "insid3.py")):
        raise InputError(f"--published '{checkout}' is not a clone of visinf/INSID3 (no models/insid3.py there)")
    sys.path.insert(0, checkout)
    try:
        from models.insid3 import INSID3 as Published
    except Exception as exc:  # noqa: BLE001 - any import failure of foreign code, named
        raise InputError(f"cannot import the published code from '{checkout}': {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(checkout)
    return Published


def published_episode(case: Case, checkout: str) -> Callable[[], object]:
    """The published implementation's ``predict_mask`` on the case's features (backbone skipped).

    ``checkout`` is a clone of github.com/visinf/INSID3 (imported from there, never bundled).
    """
    Published = published_module(checkout)
    d = case.data
    model = Published(d["encoder"], image_size=case.size, svd_components=d["core"].svd_components,
                      resize_to_orig_size=False, device=str(case.device))
    feats = torch.cat([d["ref_feats"], d["tgt_feats"][:1]])[None]
    model._extract_features = lambda imgs: feats  # features given: the same ones ours use
    S = case.shots
    images, masks = d["images"][:S], d["ref_masks"]
    target = d["images"][S:S + 1]
    return lambda: model.predict_mask(images, masks, target)


@functools.lru_cache(maxsize=1)
def _random_dinov3(model_size: str, device: str) -> torch.nn.Module:
    """A random-weight DINOv3 (seed 0) on ``device``, built once per grid (a ViT-L takes seconds)."""
    from .backbone import DinoV3Backbone, build_dinov3

    torch.manual_seed(0)
    return DinoV3Backbone(build_dinov3(model_size).eval(), model_size).to(device)


def backbone_functions(case: Case, model_size: str, precision: str) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """(ours, reference) for the ``backbone`` and ``end_to_end`` stages on a random-weight DINOv3.

    ours: targets batched through the backbone at ``precision`` against a cached reference;
    reference: one fp32 episode at a time (S references + the target through the backbone,
    then the published restatement), as the published code runs.
    """
    from .core import Insid3Core
    from .refine import upsample_mask
    from .testing import published

    encoder = _random_dinov3(model_size, str(case.device))
    r = min(500, encoder.embed_dim // 2)
    d = case.data
    ours = Insid3Core(encoder, image_size=case.size, svd_components=r, backend="native", device=case.device,
                      precision=precision)
    fp32 = Insid3Core(encoder, image_size=case.size, svd_components=r, backend="native", device=case.device)
    S = case.shots
    refs, targets, masks = d["images"][:S], d["images"][S:], d["ref_masks"]
    enc = ours.encode_reference(refs, masks)

    def ref_e2e():
        out = []
        for b in range(targets.shape[0]):
            feats = fp32.features(torch.cat([refs, targets[b:b + 1]]))
            m = published.segment_patches(feats[:S], masks, feats[S], fp32.projector, fp32.tau, fp32.merge_threshold)
            out.append(upsample_mask(m, case.size, case.size))
        return out

    fns = {"backbone": (lambda: ours.features(targets),
                        lambda: [fp32.features(targets[b:b + 1]) for b in range(targets.shape[0])]),
           "end_to_end": (lambda: ours.segment(enc, targets), ref_e2e)}
    if case.device.type == "cuda":
        # The batch as one CUDA-graph replay, against our own eager end to end.
        captured = ours.capture(enc, batch=targets.shape[0])
        fns["captured"] = (lambda: captured(targets), lambda: ours.segment(enc, targets))
    return fns


def measure(case: Case, stages: list[str], repeats: int, progress=None,
            published: str | None = None, backbone: str | None = None,
            precision: str = "fp32", reference_times: dict | None = None) -> list[dict]:
    """Time every stage of ``case``; one record per stage (with its precision and batch).

    ``reference_times`` caches the per-target reference times of the backbone stages, which
    do not depend on our precision or batch (the reference runs one fp32 episode at a time):
    pass one dict over a grid of precisions and batches to time the reference once per case.
    """
    fns = stage_functions(case)
    if backbone:
        fns.update(backbone_functions(case, backbone, precision))
        stages = list(stages) + [s for s in BACKBONE_STAGES if s in fns]
    rows = []
    n_targets = case.data["tgt_feats"].shape[0]
    reference_times = {} if reference_times is None else reference_times

    def record(stage: str, t_ours: float, t_ref: float) -> None:
        rows.append(dict(stage=stage, size=case.size, shots=case.shots, dim=case.dim,
                         connectivity=case.connectivity, device=str(case.device),
                         precision=precision if stage in BACKBONE_STAGES else "fp32",
                         batch=n_targets, ours_ms=1e3 * t_ours, reference_ms=1e3 * t_ref, ratio=t_ref / t_ours))

    for stage in stages:
        ours, ref = fns[stage]
        per = n_targets if stage in ("batched_targets",) + BACKBONE_STAGES else 1
        t_ours = time_fn(ours, case.device, repeats) / per
        key = (stage, backbone, case.size, case.shots, case.connectivity)
        if stage in SHARED_REFERENCE_STAGES and key in reference_times:
            t_ref = reference_times[key]
        else:
            t_ref = time_fn(ref, case.device, max(1, repeats // 2 + 1)) / per
            reference_times[key] = t_ref
        record(stage, t_ours, t_ref)
        if progress is not None:
            progress.update(1)
    if published:
        t_ours = time_fn(fns["episode"][0], case.device, repeats)
        t_pub = time_fn(published_episode(case, published), case.device, max(1, repeats // 2 + 1))
        record("vs_published", t_ours, t_pub)
    return rows


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(size: int, shots: int, dim: int, connectivity: int | None, path: str, queue) -> None:
    import gc

    torch.set_num_threads(int(os.environ.get("INSID3_BENCH_THREADS", torch.get_num_threads())))
    case = build_case(size, shots, dim, "cpu", connectivity, targets=1)
    ours, ref = stage_functions(case)["episode"]
    fn = ours if path == "ours" else ref
    fn()  # warm up: one-time allocations (thread pools, BLAS buffers) are not the episode's
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    fn()
    queue.put((_rss_kib("VmHWM") - before) / 1024.0)


def peak_memory_mib(size: int, shots: int, dim: int = 1024, connectivity: int | None = None) -> dict[str, float]:
    """Peak extra resident memory (MiB) of one CPU episode, ours and reference, each in a fresh process.

    Linux only (reads /proc). The features and inputs are allocated before the measurement.
    Large allocations are mmap-ed in the child (MALLOC_MMAP_THRESHOLD_), so memory freed by
    the warm-up run returns to the system and cannot hide the measured run's peak.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        for path in ("ours", "reference"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_child, args=(size, shots, dim, connectivity, path, queue))
            proc.start()
            try:
                out[path] = queue.get(timeout=1800)
            except Exception:
                raise RuntimeError(f"the {path} memory measurement process failed "
                                   f"(exit code {proc.exitcode})") from None
            finally:
                proc.join()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return out


def format_table(rows: list[dict]) -> str:
    """A plain-text table: stage, size, shots, connectivity, precision, batch, ours, reference, ratio.

    Times are per target; ``batch`` is the number of targets of the case (the backbone batch of
    ``batched_targets``, ``backbone`` and ``end_to_end``).
    """
    header = (f"{'stage':<16}{'size':>6}{'shots':>6}{'conn':>6}{'prec':>6}{'batch':>6}"
              f"{'ours ms':>11}{'reference ms':>14}{'ratio':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['stage']:<16}{r['size']:>6}{r['shots']:>6}{str(r['connectivity'] or '-'):>6}"
                     f"{r.get('precision', '-'):>6}{r.get('batch', '-'):>6}"
                     f"{r['ours_ms']:>11.1f}{r['reference_ms']:>14.1f}{r['ratio']:>7.2f}x")
    return "\n".join(lines)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``insid3-fast bench``."""
    from .config import add_arguments

    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=list(DEFAULT_STAGES))
    p.add_argument("--dim", type=int, default=1024, help="embedding size (1024 = ViT-L)")
    add_arguments(p, ["connectivity"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="also write the records to this JSON file")
    p.add_argument("--backbone", metavar="SIZE", help="also time the backbone and end-to-end stages on a "
                   "random-weight DINOv3 of this size (e.g. large; slow on CPU)")
    p.add_argument("--precision", default=None, nargs="+", choices=["fp32", "bf16"],
                   help="backbone precision(s) of our path (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batches", type=int, nargs="+", default=[4], metavar="B",
                   help="numbers of targets per case, i.e. backbone batch sizes (default: 4)")
    p.add_argument("--published", metavar="CHECKOUT",
                   help="also time the published code (a clone of visinf/INSID3) on the same features")
    p.add_argument("--memory", action="store_true", help="also measure the peak memory of one CPU episode")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark grid with a progress bar, print the table, optionally write JSON."""
    from tqdm import tqdm

    from .errors import InputError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available")
    if args.json is not None:  # before the (long) run, as every output of the CLI
        check_output_path(args.json, what="--json", probe=True)
    for flag, values, least in (("--batches", args.batches, 1), ("--shots", args.shots, 1),
                                ("--sizes", args.sizes, 16), ("--repeats", [args.repeats], 1),
                                ("--dim", [args.dim], 1)):
        if min(values) < least:
            raise InputError(f"{flag} must be at least {least}, got {min(values)}")
    if max(args.sizes) > MAX_BENCH_SIZE:
        raise InputError(f"--sizes above {MAX_BENCH_SIZE} px are not benchmarked (got {max(args.sizes)}): "
                         f"the N x N distances alone would need {8 * (max(args.sizes) // 16) ** 4 / 2**30:.0f} GiB")
    if args.published is not None:
        published_module(args.published)  # a checkout that cannot be imported fails now, not mid-run
    rows: list[dict] = []
    precisions = args.precision or ["bf16" if args.device == "cuda" else "fp32"]
    # The post-backbone stages once per case; the backbone stages once per precision.
    backbone_stages = len(BACKBONE_STAGES) - (args.device != "cuda")  # "captured" needs CUDA
    per_case = len(args.stages) + (backbone_stages * len(precisions) if args.backbone else 0)
    total = len(args.sizes) * len(args.shots) * len(args.batches) * per_case
    reference_times: dict = {}
    interrupted = False
    try:
        with tqdm(total=total, desc="bench", unit="stage", file=sys.stderr) as bar:
            for size in args.sizes:
                for shots in args.shots:
                    for batch in args.batches:
                        bar.set_postfix(size=size, shots=shots, batch=batch)
                        case = build_case(size, shots, args.dim, args.device, args.connectivity, targets=batch)
                        for k, precision in enumerate(precisions):
                            stages = args.stages if k == 0 else []
                            rows += measure(case, stages, args.repeats, bar, args.published if k == 0 else None,
                                            args.backbone, precision, reference_times)
    except KeyboardInterrupt:  # e.g. a time budget's SIGINT: keep the cases measured so far
        interrupted = True
        print("insid3-fast bench: interrupted; the table holds the cases measured so far", file=sys.stderr)
    print(format_table(rows))
    memory = []
    if args.memory and not interrupted:
        for size in args.sizes:
            for shots in args.shots:
                mem = peak_memory_mib(size, shots, args.dim, args.connectivity)
                memory.append(dict(size=size, shots=shots, **{f"{k}_mib": v for k, v in mem.items()}))
                print(f"peak memory, episode {size} px, {shots} shot(s): ours {mem['ours']:.0f} MiB, "
                      f"reference {mem['reference']:.0f} MiB")
    if args.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), precision=precisions[0],
                    precisions=precisions, batches=args.batches,
                    backbone=args.backbone,
                    device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
        atomic_write_json(args.json, {"meta": dict(meta, interrupted=interrupted), "rows": rows, "memory": memory})
    return 130 if interrupted else 0
