"""Images and masks from every accepted form, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from insid3_fast.errors import InputError
from insid3_fast.inputs import load_image, load_mask


@pytest.fixture
def rgb(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    return arr, path


def test_image_matches_published_transform(rgb):
    arr, path = rgb
    published = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    expected = published(Image.open(path).convert("RGB")).unsqueeze(0)
    for source in (str(path), path, Image.open(path), arr):
        tensor, orig = load_image(source, 64)
        assert orig == (37, 53)
        assert torch.equal(tensor, expected)


def test_image_modes_converted_to_rgb(rgb):
    arr, _ = rgb
    for mode in ("L", "RGBA", "P"):
        img = Image.fromarray(arr).convert(mode)
        tensor, _ = load_image(img, 32)
        assert tensor.shape == (1, 3, 32, 32)


def test_tensor_image_resized_bilinear():
    x = torch.randn(3, 40, 48)
    tensor, orig = load_image(x, 32)
    assert orig == (40, 48)
    assert torch.equal(tensor, torch.nn.functional.interpolate(x[None], (32, 32), mode="bilinear", align_corners=False))
    assert torch.equal(load_image(x[None], 32)[0], tensor)


@pytest.mark.parametrize("bad", [torch.randn(2, 3, 32, 32), torch.randn(4, 32, 32), torch.randn(32, 32)])
def test_bad_tensor_shapes(bad):
    with pytest.raises(InputError, match="tensor"):
        load_image(bad, 32)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="not found.*nope.jpg"):
        load_image(tmp_path / "nope.jpg", 32)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image file.*junk.jpg"):
        load_image(junk, 32)


def test_truncated_file(tmp_path, rgb):
    arr, _ = rgb
    path = tmp_path / "t.jpg"
    Image.fromarray(arr).resize((200, 200)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read"):
        load_image(path, 32)


def test_image_smaller_than_patch_is_resized_with_a_warning():
    """The published code resizes any image to the model size; so do we, with a warning."""
    from insid3_fast.errors import InputWarning

    with pytest.warns(InputWarning, match="smaller than one 16x16 patch"):
        tensor, orig = load_image(np.zeros((10, 40, 3), np.uint8), 32)
    assert tensor.shape == (1, 3, 32, 32) and orig == (10, 40)
    with pytest.raises(InputError, match="no pixels"):
        load_image(np.zeros((0, 40, 3), np.uint8), 32)


def test_mask_forms_and_nearest_resize(tmp_path):
    m = np.zeros((20, 30), dtype=np.uint8)
    m[5:9, 10:20] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    expected = torch.nn.functional.interpolate(torch.from_numpy(m > 0)[None, None].float(), (16, 16),
                                               mode="nearest")[0] > 0.5
    for source in (tmp_path / "m.png", Image.fromarray(m), m, torch.from_numpy(m), torch.from_numpy(m > 0)[None]):
        assert torch.equal(load_mask(source, 16), expected)
    rgb_mask = np.stack([m * 0, m, m * 0], axis=-1)
    assert torch.equal(load_mask(rgb_mask, 16), expected)


def test_mask_errors(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_mask(np.zeros((20, 20)), 16)
    with pytest.raises(InputError, match="same size"):
        load_mask(np.ones((20, 20)), 16, expected_hw=(20, 21))
    with pytest.raises(InputError, match="not found"):
        load_mask(tmp_path / "missing.png", 16)


def test_to_device_is_asynchronous_only_towards_a_gpu(monkeypatch):
    """A non-blocking copy from a GPU to the host can return before its data arrive (torch pins
    the destination): only copies towards CUDA may be asynchronous."""
    from insid3_fast.inputs import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kw: calls.append((args, kw)) or self)
    to_device(torch.zeros(1), torch.device("cpu"))
    to_device(torch.zeros(1), torch.device("cuda", 0))
    to_device(torch.zeros(1), "cuda")
    assert [kw["non_blocking"] for _, kw in calls] == [False, True, True]
