"""insid3_fast.quantile.upper_quantile equals torch.quantile bit for bit (the forward-match
fallback's threshold must not move a single patch)."""

from __future__ import annotations

import pytest
import torch

from insid3_fast.quantile import upper_quantile


@pytest.mark.parametrize("kind", ["normal", "ties", "float64", "nan", "tiny"])
def test_upper_quantile_equals_torch_quantile(kind):
    g = torch.Generator().manual_seed(hash(kind) % 2**31)
    for _ in range(150):
        n = int(torch.randint(1, 5000 if kind != "tiny" else 4, (1,), generator=g))
        x = torch.randn(n, generator=g)
        if kind == "ties":
            x = (x * 3).round() / 4
        elif kind == "float64":
            x = x.double()
        elif kind == "nan":
            x[int(torch.randint(0, n, (1,), generator=g))] = float("nan")
        for q in (0.9, 0.0, 1.0, 0.95, 0.37):
            expect, got = torch.quantile(x, q), upper_quantile(x, q)
            assert got.dtype == expect.dtype and got.shape == expect.shape
            assert torch.equal(got, expect) or (expect.isnan() and got.isnan()), (n, q, expect, got)


def test_upper_quantile_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        upper_quantile(torch.zeros(0), 0.9)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        upper_quantile(torch.zeros(2, 2), 0.9)
    with pytest.raises(TypeError, match="float32 or float64"):
        upper_quantile(torch.arange(4), 0.9)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
        upper_quantile(torch.zeros(4), 1.5)


def test_upper_quantile_reads_no_device_value():
    x = torch.randn(1000)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        upper_quantile(x, 0.9)
    names = {e.name for e in prof.events()}
    assert "aten::_local_scalar_dense" not in names and "aten::sort" not in names
