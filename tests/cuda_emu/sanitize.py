"""``make sanitize``: the emulated CUDA suite under ThreadSanitizer, then AddressSanitizer.

Each run starts pytest in a fresh interpreter with the sanitizer runtime preloaded and the
emulation built in that sanitizer's mode (OS threads: the sanitizers see every CUDA thread as a
thread). A run fails on a failing test or on any sanitizer report (TSan's exit code 66; ASan
aborts), so "passed" means zero reports. Sizes: tiny inputs (tests/test_emu_small_ops.py), and
the clustering's multi-block chunk cut to two rounds so that the one-block tail kernel runs too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)

from cuda_emu import sanitizers  # noqa: E402

# Every kernel on tiny inputs and the toy detector proofs. Not the full emulated suite: with
# an OS thread per CUDA thread, ThreadSanitizer needs minutes per case of test_ops_cuda.py
# (measured: one nn_vote case of 1,285 blocks of 256 threads took over 5 minutes here), so
# those sizes run in the fiber mode only. The sanitizer proofs start their own subprocesses.
SELECT = ["-k", "emu", "-m", "not slow and not sanitizer"]
FILES = ["tests/test_emu_small_ops.py", "tests/test_emu_toys.py"]
# Each mode takes about 5 minutes here (2 cores, builds cached); a run past this limit is a
# failure, never a CI run that hangs until its own limit (the runtime's watchdog,
# CUDA_EMU_HANG_SECONDS, catches a stuck block sooner and says where its threads stand).
LIMIT_S = int(os.environ.get("SANITIZE_LIMIT_S", "1200"))


def run(mode: str) -> int:
    env = sanitizers.env(mode)
    env["CUDA_EMU_TUNABLES"] = "average_linkage.first_chunk_rounds=2,grid_average_linkage.first_chunk_rounds=2"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECT, *FILES]
    print(f"== {mode}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        code = subprocess.run(cmd, env=env, cwd=os.path.dirname(TESTS), timeout=LIMIT_S).returncode
    except subprocess.TimeoutExpired:
        print(f"== {mode}: FAILED, still running after {LIMIT_S} s (SANITIZE_LIMIT_S)", flush=True)
        return 1
    took = time.monotonic() - start
    print(f"== {mode}: exit status {code} ({'clean' if code == 0 else 'FAILED'}) in {took:.0f} s", flush=True)
    return code


def main() -> int:
    modes = sys.argv[1:] or ["tsan", "asan"]
    status = [run(m) for m in modes]
    return 0 if all(s == 0 for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
