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
from insid3_fast.synthetic import SyntheticEncoder, make_episode

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


def _as_inputs(kind, refs, masks, target, folder):
    """The episode as PIL/numpy objects, as files (paths), or as tensors (normalised images)."""
    if kind == "objects":
        return refs, masks, target
    if kind == "files":
        from PIL import Image
        paths = []
        for i, (image, mask) in enumerate(zip(refs, masks)):
            image.save(folder / f"r{i}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"m{i}.png")
            paths.append((str(folder / f"r{i}.png"), str(folder / f"m{i}.png")))
        target.save(folder / "t.png")
        return [p for p, _ in paths], [m for _, m in paths], str(folder / "t.png")
    from torchvision.transforms import functional as TF
    norm = lambda img: TF.normalize(TF.to_tensor(img), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return [norm(r) for r in refs], [torch.from_numpy(m) for m in masks], norm(target)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("size,dim,shots,seed,kind", [
    (512, 64, 1, 0, "objects"), (512, 64, 2, 1, "files"), (512, 384, 3, 2, "tensors"), (512, 64, 5, 3, "files"),
    (1024, 64, 1, 4, "tensors"), (1024, 256, 2, 5, "objects"), (512, 1024, 1, 6, "objects"),
    (1024, 1024, 4, 7, "files"), (512, 768, 5, 8, "tensors"),
])
def test_same_masks_as_published(published_cls, backend, size, dim, shots, seed, kind, tmp_path):
    if backend == "native" and not __import__("insid3_fast").ops.native_available():
        pytest.skip("native ops not built")
    encoder = SyntheticEncoder(dim, seed=seed)
    refs, masks, target, _ = _as_inputs(kind, *make_episode(seed, shots)[:3], tmp_path) + (None,)
    published = published_cls(encoder, image_size=size, svd_components=min(500, dim // 2), device="cpu")
    ours = INSID3(encoder, image_size=size, svd_components=min(500, dim // 2), device="cpu", backend=backend)
    expected = _run(published, refs, masks, target)
    got = _run(ours, refs, masks, target)
    assert expected.shape == got.shape
    assert np.array_equal(expected, got), f"{(expected != got).sum()} pixels differ"
    assert expected.any()


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("pattern", ["tensor at model size, photo-size mask", "PIL, half-resolution mask",
                                     "PIL, mask of another aspect ratio"])
def test_masks_of_another_size_as_published(published_cls, backend, pattern):
    """Issue 12: the published set_reference resizes any mask to the model size; ours gives the same masks."""
    if backend == "native" and not __import__("insid3_fast").ops.native_available():
        pytest.skip("native ops not built")
    import warnings

    from PIL import Image
    from torchvision.transforms import functional as TF

    size = 512
    norm = lambda img: TF.normalize(TF.to_tensor(img), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    refs, masks, target, _ = make_episode(9, 2, size_hw=(240, 320))
    if pattern.startswith("tensor"):
        refs = [norm(r.resize((size, size), Image.BILINEAR))[None] for r in refs]
        masks, target = [torch.from_numpy(m) for m in masks], norm(target.resize((size, size), Image.BILINEAR))
    elif "half" in pattern:
        masks = [Image.fromarray(m.astype(np.uint8) * 255).resize((160, 120), Image.NEAREST) for m in masks]
    else:
        masks = [np.array(Image.fromarray(m.astype(np.uint8)).resize((100, 100), Image.NEAREST)) for m in masks]
    encoder = SyntheticEncoder(64, seed=9)
    expected = _run(published_cls(encoder, image_size=size, svd_components=32, device="cpu"), refs, masks, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the aspect-ratio warning of the third pattern
        got = _run(INSID3(encoder, image_size=size, svd_components=32, device="cpu", backend=backend),
                   refs, masks, target)
    assert np.array_equal(expected, got), f"{(expected != got).sum()} pixels differ"
    assert expected.any()
