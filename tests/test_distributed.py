"""insid3_fast.distributed in one process: what torchrun's environment turns into (ranks, devices).

Two processes are exercised by tests/test_segment_many.py (torchrun, gloo) and
tests/test_eval_runner.py (spawned gloo ranks).
"""

from __future__ import annotations

import pytest
import torch

from insid3_fast import distributed


@pytest.fixture
def single(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_is_rank_0_of_1_and_every_helper_is_the_identity(single):
    assert distributed.init_from_env() == (0, 1)
    assert distributed.all_reduce_sum([3, 0, 2]) == [3, 0, 2]
    counts = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_sum(counts) is counts
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("error") == "error"
    distributed.barrier()
    distributed.finish()


def test_shard_takes_every_world_th_item():
    items = list(range(7))
    parts = [distributed.shard(items, rank, 3) for rank in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items


@pytest.mark.parametrize("world, cuda, requested, expected", [
    (1, False, "auto", "cpu"),
    (1, True, "auto", "cuda:0"),
    (1, True, "cuda:1", "cuda:1"),  # one process keeps the device it was given
    (1, True, None, None),  # eval's default: the model picks
    (2, True, None, "cuda:1"),  # torchrun: the GPU of the local rank
    (2, True, "auto", "cuda:1"),
    (2, True, "cuda:0", "cuda:1"),
    (2, True, "cpu", "cpu"),
    (2, False, "auto", "cpu"),
    (2, False, None, None),
])
def test_local_device(monkeypatch, world, cuda, requested, expected):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if world > 1:
        monkeypatch.setenv("LOCAL_RANK", "1")
    else:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert distributed.local_device(requested) == expected

