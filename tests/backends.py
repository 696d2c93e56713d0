"""The backends the CUDA kernel tests run on: a real CUDA device, and the CPU emulation of
CUDA's execution model (tests/cuda_emu) that runs the same csrc/cuda sources on every CI run.

A test takes the ``backend`` fixture (conftest.py), moves inputs with ``backend.dev(t)`` and
calls the ops through ``backend.nn_vote(...)`` etc. (the typed wrappers of insid3_fast.ops,
routed to that backend's kernels); ``ops.nn_vote(...)`` on CPU tensors stays the CPU kernel.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from insid3_fast import ops

EMU_LIBRARY = "insid3_fast_emu"


@functools.lru_cache(maxsize=None)
def emulation() -> str:
    """Build (cached) and load the emulated kernels; a build failure fails the test, never skips it."""
    from cuda_emu import build

    return build.load()


@contextlib.contextmanager
def tunable(name: str, value: int):
    """Override a host-side constant of the emulated kernels (INSID3_TUNABLE) for a block."""
    emulation()
    torch.ops.insid3_fast_emu.emu_set_tunable(name, int(value))
    try:
        yield
    finally:
        torch.ops.insid3_fast_emu.emu_set_tunable(name, -1)


def has_cuda() -> bool:
    return torch.cuda.is_available() and ops.native_available("cuda")


class Backend:
    """One place the CUDA kernels run: ``"cuda"`` or ``"emu"``."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "cuda":
            if not has_cuda():
                pytest.skip("needs a CUDA device and insid3_fast._C built with CUDA kernels "
                            f"(cuda available: {torch.cuda.is_available()}, load error: {ops.load_error()})")
            self.library = "insid3_fast"
        elif name == "emu":
            self.library = emulation()
        else:
            raise ValueError(name)

    def __repr__(self) -> str:
        return f"Backend({self.name})"

    def dev(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor on this backend's device (a copy: kernels never alias the CPU inputs)."""
        return t.cuda() if self.name == "cuda" else t.clone()

    def on_device(self, t: torch.Tensor) -> bool:
        return t.is_cuda if self.name == "cuda" else t.is_cpu

    @property
    def raw(self):
        """``torch.ops.<library>``: the raw ops of this backend."""
        return getattr(torch.ops, self.library)

    def __getattr__(self, op: str):
        fn = getattr(ops, op)

        def call(*args, **kwargs):
            with ops.use_library(self.library):
                return fn(*args, **kwargs)

        return call


def peak_bytes(fn) -> int:
    """Peak bytes held by the tensors allocated while ``fn()`` runs on this thread, including the
    allocations made inside C++ ops (the allocator's reports, metered by the emulation's
    extension; on the emulated backend these are what the kernels would allocate on a GPU)."""
    emulation()
    torch.ops.insid3_fast_emu.emu_peak_begin()
    try:
        fn()
    finally:
        peak = int(torch.ops.insid3_fast_emu.emu_peak_end())
    return peak
