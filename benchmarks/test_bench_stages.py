"""pytest-benchmark suites per stage, ours against the reference path in the same run.

Run: ``pytest benchmarks/test_bench_stages.py --benchmark-only --benchmark-group-by=param:stage,param:size,param:shots``.
Each group holds the ``ours`` and ``reference`` rows of one stage; their ratio is the speed-up.
Features come from the synthetic encoder at C = 1024 (ViT-L width); the backbone and
end-to-end stages use a random-weight DINOv3 (ViT-L on CUDA with bf16, ViT-S on CPU) on four
targets (times per call, i.e. for four targets). See BENCHMARKS.md.
"""

from __future__ import annotations

import functools

import pytest
import torch

from insid3_fast import ops
from insid3_fast.bench import STAGES, backbone_functions, build_case, stage_functions

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="native ops not built")
DEVICE = "cuda" if torch.cuda.is_available() and ops.native_available("cuda") else "cpu"


BACKBONE = "large" if DEVICE == "cuda" else "small"  # random weights; ViT-L is too slow on 2 CPU cores
PRECISION = "bf16" if DEVICE == "cuda" else "fp32"


@functools.lru_cache(maxsize=1)
def _functions(size: int, shots: int):
    case = build_case(size, shots, 1024, DEVICE)
    fns = stage_functions(case)
    fns.update(backbone_functions(case, BACKBONE, PRECISION))
    return fns


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("path", ["ours", "reference"])
@pytest.mark.parametrize("stage", list(STAGES) + ["backbone", "end_to_end"])
@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("size", [512, 768, 1024])
def test_stage(benchmark, size, shots, stage, path):
    fn = _functions(size, shots)[stage][0 if path == "ours" else 1]
    benchmark.extra_info.update(device=DEVICE, size=size, shots=shots, stage=stage, path=path,
                                backbone=BACKBONE if stage in ("backbone", "end_to_end") else None)

    def run():
        fn()
        _sync()

    rounds = 5 if path == "ours" else 3
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
