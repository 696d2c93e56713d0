"""Benchmarks of the CRF refinement: both backends at the published sizes 512 and 1024.

Run: ``pytest benchmarks/test_bench_crf.py --benchmark-only``. The image is synthetic but
natural-like (smooth colour regions, mild noise): per-pixel noise would make every pixel its
own bilateral lattice vertex, a worst case real photos never reach.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insid3_fast.crf import crf_available, crf_refine

pytest.importorskip("pytest_benchmark")


def _scene(size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, S, S) image in [0, 1] and the bilinear upsampling of a patch-grid (S/16) mask."""
    gen = torch.Generator().manual_seed(0)
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    blob = ((yy - 0.5) ** 2 + (xx - 0.45) ** 2 < 0.09) | ((yy - 0.3) ** 2 + (xx - 0.7) ** 2 < 0.03)
    background = torch.stack([0.3 + 0.2 * xx, 0.4 + 0.1 * yy, 0.5 - 0.2 * xx])
    foreground = torch.tensor([0.8, 0.45, 0.2])[:, None, None].expand(3, size, size)
    image = torch.where(blob[None], foreground, background)
    image = (image + 0.02 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    grid = F.interpolate(blob[None, None].float(), size=(size // 16,) * 2, mode="area") > 0.5
    mask = F.interpolate(grid.float(), size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0] > 0.5
    return image.to(device), mask.to(device)


def _cases() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    pyd = pytest.mark.skipif(not crf_available("pydensecrf"),
                             reason='pydensecrf2 not installed (pip install "insid3_fast[crf]")')
    return [pytest.param("pydensecrf", "cpu", marks=pyd, id="pydensecrf-cpu"),
            pytest.param("torch", "cpu", id="torch-cpu"),
            pytest.param("torch", "cuda", marks=[cuda, pytest.mark.cuda], id="torch-cuda")]


@pytest.mark.parametrize("size", [512, 1024])
@pytest.mark.parametrize("backend,device", _cases())
def test_bench_crf_refine(benchmark, backend: str, device: str, size: int) -> None:
    image, mask = _scene(size, device)

    def run() -> torch.Tensor:
        out = crf_refine(image, mask, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up: CUDA context, the cached spatial lattice
    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.shape == mask.shape and out.dtype == torch.bool
