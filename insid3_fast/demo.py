"""``python -m insid3_fast.demo``: segment the bundled cat example when DINOv3 weights are present.

Without weights it says where to get them and exits with status 2.
"""

from __future__ import annotations

import os
import sys

from .errors import Insid3Error

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def main() -> int:
    """Run the demo; writes demo_mask.png and demo_overlay.png into the current folder."""
    from .cli import main as cli_main
    from .model import find_weights

    try:
        find_weights(os.environ.get("INSID3_MODEL_SIZE", "large"))
    except Insid3Error as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    return cli_main(["segment", "--ref-image", os.path.join(EXAMPLES, "ref_cat_image.jpg"),
                     "--ref-mask", os.path.join(EXAMPLES, "ref_cat_mask.png"),
                     "--target", os.path.join(EXAMPLES, "target_cat_image.jpg"),
                     "--output", "demo_mask.png", "--overlay", "demo_overlay.png",
                     "--model-size", os.environ.get("INSID3_MODEL_SIZE", "large")])


if __name__ == "__main__":
    sys.exit(main())
