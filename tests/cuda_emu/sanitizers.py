"""Environment for running Python with the emulation built under a sanitizer.

The sanitizer runtime must be the first library of the process, so the interpreter is started
with ``LD_PRELOAD`` naming gcc's runtime (the emulated extension is built with gcc's
``-fsanitize=...``, and the two must match).
"""

from __future__ import annotations

import os
import subprocess

RUNTIMES = {"tsan": "libtsan.so", "asan": "libasan.so"}


def runtime_path(mode: str) -> str:
    """Absolute path of gcc's runtime library for ``mode`` ("tsan" or "asan")."""
    lib = RUNTIMES[mode]
    path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"gcc has no {lib} (install gcc's sanitizer runtimes, e.g. Debian's libgcc-12-dev)")
    return os.path.realpath(path)


def _libstdcxx() -> str:
    path = subprocess.run(["g++", "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return os.path.realpath(path)


def env(mode: str, base: dict | None = None) -> dict:
    """Environment that runs Python under the sanitizer of ``mode`` with the emulation of that mode."""
    e = dict(os.environ if base is None else base)
    # libstdc++ too: the runtimes resolve their C++ interceptors (__cxa_throw) when they start,
    # and Python itself does not link libstdc++ (ASan otherwise fails a CHECK on the first throw).
    e["LD_PRELOAD"] = f"{runtime_path(mode)} {_libstdcxx()}"
    e["INSID3_EMU_MODE"] = mode
    e["OMP_NUM_THREADS"] = "1"  # libgomp is not instrumented: keep the host code on one thread
    if mode == "tsan":
        # exitcode: a report fails the run; the suppressions cover nothing of ours.
        e["TSAN_OPTIONS"] = "halt_on_error=0 exitcode=66 report_signal_unsafe=0 " + e.get("TSAN_OPTIONS", "")
    else:
        # Python and torch leak by design at exit; heap errors are what we test for.
        e["ASAN_OPTIONS"] = "detect_leaks=0 abort_on_error=0 " + e.get("ASAN_OPTIONS", "")
    return e
