"""``python -m insid3_fast.demo`` (``make demo``): segment the bundled cat example with DINOv3 weights.

Without weights (a fresh machine: Meta gates them) it says where to get them, then shows the
package working on the deterministic synthetic encoder of ``insid3_fast.synthetic``: a short
benchmark of the native kernels against the reference path (the published algorithm), and
``demo_synthetic.png``, a picture of one synthetic episode's reference and predicted mask. It
exits 0 either way, unless something fails.
"""

from __future__ import annotations

import os
import sys
import time

from .errors import Insid3Error

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SYNTHETIC_PICTURE = "demo_synthetic.png"
# Small enough for well under a minute on two cores, large enough for every stage to do real work.
BENCH_SIZE, BENCH_DIM, BENCH_REPEATS = 512, 1024, 2
BENCH_STAGES = ("votes", "clustering", "aggregation", "episode")


def _benchmark() -> str:
    """The table of a short benchmark: our kernels against the reference path, one synthetic episode."""
    from .bench import build_case, format_table, measure

    case = build_case(BENCH_SIZE, 1, BENCH_DIM, "cpu", targets=1)
    return format_table(measure(case, list(BENCH_STAGES), BENCH_REPEATS))


def _episode_picture(path: str) -> tuple[float, bool, str]:
    """Segment one synthetic episode; write reference + mask | target | predicted mask | overlay as a PNG.

    Returns (IoU with the true mask, whether the published algorithm (``testing.published``) gives
    the same mask, the kernels used).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from .atomic import atomic_write
    from .model import INSID3
    from .synthetic import SyntheticEncoder, make_episode
    from .testing.oracle import oracle_segment
    from .visualize import overlay_mask

    encoder = SyntheticEncoder(64)
    refs, masks, target, truth = make_episode(0, 1, size_hw=(240, 320))
    model = INSID3(encoder, image_size=BENCH_SIZE, svd_components=None, device="cpu")
    model.set_reference(refs[0], masks[0])
    model.set_target(target)
    pred, backend = model.segment().numpy(), model.backend
    published = oracle_segment(model, refs, masks, target).numpy()  # the published algorithm, restated
    iou = float((pred & truth).sum() / max(1, (pred | truth).sum()))

    panels = [("reference + its mask (red)", overlay_mask(refs[0], masks[0])),
              ("target", target.convert("RGB")),
              (f"predicted mask (IoU {iou:.2f} with the truth)", Image.fromarray(pred.astype(np.uint8) * 255)),
              ("target + predicted mask (red)", overlay_mask(target, pred))]
    w, h, top = target.width, target.height, 20
    sheet = Image.new("RGB", (len(panels) * (w + 10) - 10, h + top), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (title, panel) in enumerate(panels):
        sheet.paste(panel, (i * (w + 10), top))
        draw.text((i * (w + 10) + 4, 4), title, fill=(0, 0, 0))
    atomic_write(path, lambda fp: sheet.save(fp, format="PNG"))  # like every output: never half-written
    return iou, bool(np.array_equal(pred, published)), backend


def synthetic_demo(picture: str = SYNTHETIC_PICTURE) -> int:
    """The weight-free part of the demo: a benchmark table and one segmented synthetic episode."""
    import torch

    from . import ops

    start = time.perf_counter()
    print(f"demo: no weights needed for this part: a synthetic encoder (insid3_fast/synthetic.py, C = {BENCH_DIM}), "
          f"{BENCH_SIZE} px, 1 shot, {torch.get_num_threads()} CPU thread(s); native ops "
          f"{'built' if ops.native_available() else 'NOT built (' + str(ops.load_error()) + ')'}")
    if ops.native_available():
        print("demo: per-stage time, ours (native kernels) against the reference path (the published algorithm):")
        print(_benchmark())
    iou, same, backend = _episode_picture(picture)
    print(f"demo: one synthetic episode segmented ({backend} path): IoU {iou:.2f} with the true mask; "
          f"the published algorithm gives {'the same' if same else 'a DIFFERENT'} mask; picture: {picture}")
    print(f"demo: done in {time.perf_counter() - start:.0f} s. With DINOv3 weights in pretrain/ (or "
          "$INSID3_WEIGHTS), `make demo` segments the bundled cat example instead.")
    return 0 if same else 1


def main() -> int:
    """Run the demo: the bundled example with weights (demo_mask.png, demo_overlay.png), else the synthetic one."""
    from .cli import main as cli_main
    from .model import find_weights

    size = os.environ.get("INSID3_MODEL_SIZE", "large")
    try:
        find_weights(size)
    except Insid3Error as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return synthetic_demo()
    return cli_main(["segment", "--ref-image", os.path.join(EXAMPLES, "ref_cat_image.jpg"),
                     "--ref-mask", os.path.join(EXAMPLES, "ref_cat_mask.png"),
                     "--target", os.path.join(EXAMPLES, "target_cat_image.jpg"),
                     "--output", "demo_mask.png", "--overlay", "demo_overlay.png",
                     "--model-size", size])


if __name__ == "__main__":
    sys.exit(main())
