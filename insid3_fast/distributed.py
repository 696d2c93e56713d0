"""Spreading many targets over processes/GPUs with torch.distributed (launched by torchrun).

``torchrun --nproc-per-node G -m insid3_fast.cli segment-many ...`` starts G processes; each
takes every G-th target (``shard``), runs on its own GPU (``LOCAL_RANK``) and writes its masks.
Without torchrun everything runs in one process.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(requested: str = "auto") -> torch.device:
    """This process's device: its LOCAL_RANK GPU under torchrun, else as requested."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items of one rank: every ``world``-th item starting at ``rank``."""
    return list(items[rank::world])


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum of integer counters over ranks."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def finish() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
