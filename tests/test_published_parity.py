"""Masks identical to the published implementation's, on synthetic episodes.

Needs a checkout of the published code (github.com/visinf/INSID3) named by
``$INSID3_PUBLISHED`` (its ``models`` and ``utils`` packages are imported from there; it is
never bundled). Without it these tests are skipped, with that reason.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from insid3_fast import INSID3
from synthetic import SyntheticEncoder, make_episode

PUBLISHED = os.environ.get("INSID3_PUBLISHED")
pytestmark = pytest.mark.skipif(not PUBLISHED or not os.path.isdir(PUBLISHED),
                                reason="set INSID3_PUBLISHED to a checkout of visinf/INSID3")


@pytest.fixture(scope="module")
def published_cls():
    sys.path.insert(0, PUBLISHED)
    try:
        from models.insid3 import INSID3 as Published
    finally:
        sys.path.remove(PUBLISHED)
    return Published


def _run(model, refs, masks, target):
    for image, mask in zip(refs, masks):
        model.set_reference(image, mask)
    model.set_target(target)
    return model.segment().cpu().numpy()


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("size,dim,shots,seed", [
    (512, 64, 1, 0), (512, 64, 2, 1), (512, 384, 3, 2), (512, 64, 5, 3),
    (1024, 64, 1, 4), (1024, 256, 2, 5), (512, 1024, 1, 6),
])
def test_same_masks_as_published(published_cls, backend, size, dim, shots, seed):
    if backend == "native" and not __import__("insid3_fast").ops.native_available():
        pytest.skip("native ops not built")
    encoder = SyntheticEncoder(dim, seed=seed)
    refs, masks, target, _ = make_episode(seed, shots)
    published = published_cls(encoder, image_size=size, svd_components=min(500, dim // 2), device="cpu")
    ours = INSID3(encoder, image_size=size, svd_components=min(500, dim // 2), device="cpu", backend=backend)
    expected = _run(published, refs, masks, target)
    # File inputs and tensor inputs both go through the same loaders as the published code.
    got = _run(ours, refs, masks, target)
    assert expected.shape == got.shape
    assert np.array_equal(expected, got), f"{(expected != got).sum()} pixels differ"
    assert expected.any()
