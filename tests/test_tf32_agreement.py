"""The TF32 emulation behind benchmarks/tf32_agreement.py: its rounding and split are what the
published numbers rest on, so they are checked here against values worked out by hand."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import tf32_agreement as tf  # noqa: E402
from insid3_fast import pipeline  # noqa: E402

ULP = 2.0 ** -10  # TF32's spacing in [1, 2)


@pytest.mark.parametrize("value,expected", [
    (1 + ULP / 2, 1.0),                    # halfway: to even (down)
    (1 + 3 * ULP / 2, 1 + 2 * ULP),        # halfway: to even (up)
    (1 + ULP / 2 + 2.0 ** -20, 1 + ULP),   # just above halfway
    (1 + ULP / 2 - 2.0 ** -20, 1.0),       # just below
    (-(1 + 3 * ULP / 2), -(1 + 2 * ULP)),  # the sign is kept
    (2 - ULP / 4, 2.0),                    # carries into the exponent
    (0.0, 0.0),
])
def test_round_tf32_is_round_to_nearest_even_at_ten_bits(value, expected):
    assert tf.round_tf32(torch.tensor([value], dtype=torch.float32)).item() == expected


def test_rounded_values_have_ten_mantissa_bits_and_the_split_is_nearly_exact():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    hi = tf.round_tf32(x)
    assert not torch.any(hi.view(torch.int32) & 0x1FFF)
    assert torch.all((hi - x).abs() <= x.abs() * 2.0 ** -11)
    lo = tf.round_tf32(x - hi)
    assert torch.all((hi + lo - x).abs() <= x.abs() * 2.0 ** -21)


def test_gemm_modes_errors_are_ordered_tf32_then_3xtf32_then_fp32_orders():
    x = F.normalize(torch.randn(256, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    exact = x.double() @ x.double().T
    err = {m: (tf.matmul(x, x.T, m).double() - exact).abs().max().item() for m in tf.MODES}
    assert err["tf32"] > 20 * err["3xtf32"]
    assert err["3xtf32"] < 8 * max(err["fp32"], err["fp32-split"])


def test_gemm_modes_patch_the_pipeline_and_restore_it():
    saved = pipeline.debiased_coordinates, pipeline.cluster_and_vote
    with tf.gemm_modes("tf32", "3xtf32", []):
        assert pipeline.debiased_coordinates is not saved[0] and pipeline.cluster_and_vote is not saved[1]
    assert (pipeline.debiased_coordinates, pipeline.cluster_and_vote) == saved
    with pytest.raises(RuntimeError), tf.gemm_modes("fp32", "fp32", []):
        assert pipeline.debiased_coordinates is saved[0]  # the native projection in fp32 x fp32
        raise RuntimeError
    assert (pipeline.debiased_coordinates, pipeline.cluster_and_vote) == saved
