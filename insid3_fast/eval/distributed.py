"""torch.distributed helpers: episode i runs on rank i % world, per-class counts are summed."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env(device: str | None) -> tuple[int, int, str | None]:
    """Join the process group torchrun describes in the environment.

    Returns ``(rank, world_size, device)``; on CUDA each rank takes the GPU of its local rank.
    A single process (no WORLD_SIZE) returns ``(0, 1, device)`` without a process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum an integer/float tensor over all ranks (identity without a process group)."""
    if not is_active():
        return t
    work = t.to(_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.cpu()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank (a one-element list without a process group)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (used to share an error so that all ranks stop)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def claim_output_dir(output_dir: str, fingerprint: dict[str, Any], rank: int) -> None:
    """Rank 0 checks (or writes) the run's configuration in ``output_dir``; every rank raises
    the same InputError when it belongs to a different run."""
    from ..errors import InputError
    from .records import check_or_write_config

    error = None
    if rank == 0:
        try:
            check_or_write_config(output_dir, fingerprint, write=True)
        except InputError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise InputError(error)
