"""What would make the host wait for a GPU, seen on the emulated kernels (whose "device"
tensors are CPU tensors): one definition for the zero-sync tests and ``gpu_counters``.

Two kinds are seen. ATen calls, from the profiler, which records every ATen call, including the
ones made inside our C++ launchers (a TorchDispatchMode would not see those):
``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``) and the ops whose output shape
depends on the data (``nonzero``, ``masked_select``, ``unique``). And device-to-host copies
spelled in Python (``.cpu()``, ``.numpy()``, ``.tolist()``, ``np.asarray``): on CPU tensors
they copy nothing and make no ATen call, so they are recorded by wrapping those methods. Not
seen: a copy to the host made in C++ (``at::Tensor::cpu()`` of a CPU tensor is a no-op too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
           "aten::unique_consecutive", "aten::unique_dim")
HOST_COPIES = ("cpu", "numpy", "tolist", "__array__")


@contextlib.contextmanager
def host_copies(calls: list[str]) -> Iterator[None]:
    """Record every call of the tensor methods in HOST_COPIES, as ``Tensor.<name>``, into ``calls``."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}
    own = {name for name in HOST_COPIES if name in vars(torch.Tensor)}  # the others are TensorBase's

    def recording(name: str) -> Callable:
        def method(self, *args, **kwargs):
            calls.append(f"Tensor.{name}")
            return saved[name](self, *args, **kwargs)
        return method

    for name in HOST_COPIES:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)


def has_ancestor(evt, test: Callable[[str], bool]) -> bool:
    """Whether an enclosing profiler event of ``evt`` satisfies ``test(name)``."""
    parent = evt.cpu_parent
    while parent is not None:
        if test(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def is_sync(evt) -> bool:
    """A synchronising ATen event, except the q-range check of torch.quantile, which ATen makes
    on the host only for a CPU q (on a GPU q stays on the device, unchecked)."""
    return evt.name in SYNCING and not has_ancestor(evt, lambda name: name == "aten::quantile")


@contextlib.contextmanager
def recording(**profile_options) -> Iterator[tuple[list, list[str]]]:
    """Profile the block: yields (a list that receives the profiler's events when the block
    ends, the host copies made in it). ``profile_options`` go to ``torch.profiler.profile``."""
    events: list = []
    copies: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], **profile_options) as prof:
        with host_copies(copies):
            yield events, copies
    events.extend(prof.events())


def sync_calls(fn: Callable[[], object]) -> list[str]:
    """The names of the synchronisations ``fn()`` makes (see the module docstring)."""
    with recording() as (events, copies):
        fn()
    return [evt.name for evt in events if is_sync(evt)] + copies
