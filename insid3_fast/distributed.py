"""torch.distributed for segment-many and eval (launched by torchrun): one helper per operation.

``torchrun --nproc-per-node G -m insid3_fast.cli segment-many ...`` (or ``-m insid3_fast.eval``)
starts G processes; each joins the group torchrun describes (`init_from_env`), takes its share
of the work (`shard`), runs on the GPU of its local rank (`local_device`), and the counts are
summed over the ranks (`all_reduce_sum`). Without torchrun everything runs in one process and
every helper is a no-op or the identity.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar, overload

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "finish",
    "init_from_env",
    "local_device",
    "shard",
]

T = TypeVar("T")


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _wants_cuda(device: str | None) -> bool:
    # None and "auto" mean "a GPU when there is one".
    return device is None or device == "auto" or str(device).startswith("cuda")


def _active() -> bool:
    """Inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str | None = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; ``(rank, world size)``.

    The group uses nccl when ``device`` asks for CUDA (None, "auto", "cuda...") and CUDA is
    available, with each rank on the GPU of its LOCAL_RANK, else gloo. A group that is already
    initialised is joined as it is; without WORLD_SIZE > 1 and no group, ``(0, 1)``.
    """
    if _env_world() > 1:
        use_cuda = torch.cuda.is_available() and _wants_cuda(device)
        if use_cuda:
            torch.cuda.set_device(_local_rank())
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(requested: str | None = "auto") -> str | None:
    """This process's device for ``requested``: the GPU of its LOCAL_RANK under torchrun when a
    CUDA device is asked for and available; "auto" in one process resolves to that GPU or
    "cpu"; anything else (None, "cpu", "cuda:1" in one process) is returned as it is."""
    if requested == "cpu":
        return "cpu"
    if _env_world() > 1 and _wants_cuda(requested) and torch.cuda.is_available():
        return f"cuda:{_local_rank()}"
    if requested == "auto":
        return f"cuda:{_local_rank()}" if torch.cuda.is_available() else "cpu"
    return requested


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items of one rank: every ``world``-th item starting at ``rank``."""
    return list(items[rank::world])


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def _comm_device() -> torch.device:
    # nccl only reduces CUDA tensors, gloo CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@overload
def all_reduce_sum(values: Tensor) -> Tensor: ...
@overload
def all_reduce_sum(values: Sequence[int]) -> list[int]: ...
def all_reduce_sum(values: Tensor | Sequence[int]) -> Tensor | list[int]:
    """Element-wise sum over the ranks (the identity in a single process): a tensor comes back
    as a tensor on its own device, a list of integer counters as a list of ints."""
    if not isinstance(values, Tensor):
        return all_reduce_sum(torch.tensor(list(values), dtype=torch.int64)).tolist()
    if not _active():
        return values
    work = values.to(_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(values.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """One picklable object from every rank, in rank order (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (used to share an error so that all ranks stop)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def finish() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
