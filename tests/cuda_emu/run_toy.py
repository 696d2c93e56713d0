"""Run one toy kernel of the emulation in this process: ``python run_toy.py MODE NAME``.

Used by the detector proofs that need a sanitizer runtime preloaded (the test starts this
script in a subprocess with LD_PRELOAD set), and handy by hand. Exit status 0 when the kernel
ran without an emulator error; the sanitizer's own report and exit status come on top.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import torch  # noqa: E402

from cuda_emu import build  # noqa: E402


def main() -> int:
    mode, name = sys.argv[1], sys.argv[2]
    build.load(mode)
    out = torch.zeros(64)
    try:
        torch.ops.insid3_fast_emu.toy(name, out)
    except RuntimeError as exc:
        print(f"emulator error: {exc}", file=sys.stderr)
        return 3
    print(f"{name}: ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
