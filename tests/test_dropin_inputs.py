"""Issue 12: the published call patterns run unchanged, and ordinary inputs are never silently wrong.

Each test reproduces one reported case: it failed (raised, or returned a wrong result with no
warning) before the fix.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from insid3_fast import INSID3, build_insid3
from insid3_fast.backbone.sizes import _FAMILIES
from insid3_fast.errors import InputError, InputWarning
from insid3_fast.inputs import (IMAGENET_MEAN, IMAGENET_STD, default_svd_components, load_image, load_mask,
                                resolve_svd_components)
from insid3_fast.synthetic import SyntheticEncoder, make_episode

SIZE = 256


@pytest.fixture(scope="module")
def model():
    return INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE, svd_components=16, device="cpu")


@pytest.fixture(scope="module")
def episode():
    return make_episode(21, 1, size_hw=(240, 320))


def published_mask(mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """What the published ``load_mask`` makes of any mask: ``> 0``, nearest to size x size, (1, size, size)."""
    m = torch.as_tensor(np.asarray(mask)) > 0
    return F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0] > 0.5


def normalised(image: Image.Image, size: int) -> torch.Tensor:
    return load_image(image, size)[0]


def no_input_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", InputWarning)
    return ctx


# ---- item 1: the mask is resized to the model size whatever its size ----
def test_tensor_image_at_model_size_with_a_photo_size_mask(model, episode):
    refs, masks, target, _ = episode
    image = normalised(refs[0], SIZE)  # (1, 3, 256, 256), the user's own preprocessing
    assert masks[0].shape == (240, 320)
    expected = model.predict_mask(image, published_mask(masks[0], SIZE), normalised(target, SIZE))
    for mask in (masks[0], torch.from_numpy(masks[0]), Image.fromarray(masks[0].astype(np.uint8) * 255)):
        ctx = no_input_warnings()  # nothing to warn about: the tensor says nothing of the photo's size
        try:
            model.set_reference(image, mask)
        finally:
            ctx.__exit__(None, None, None)
        model.set_target(normalised(target, SIZE))
        got = model.segment()
        assert torch.equal(got, expected)
        assert got.any()


def test_pil_image_with_a_half_resolution_mask(model, episode):
    refs, masks, target, _ = episode
    half = Image.fromarray(masks[0].astype(np.uint8) * 255).resize((160, 120), Image.NEAREST)
    expected_mask = published_mask(np.array(half), SIZE)
    model.set_target(target)  # the published predict_mask sizes its output from set_target
    expected = model.predict_mask(normalised(refs[0], SIZE), expected_mask, normalised(target, SIZE))
    model.reset_state()
    ctx = no_input_warnings()  # same aspect ratio: a scaled annotation, no warning
    try:
        model.set_reference(refs[0], half)
    finally:
        ctx.__exit__(None, None, None)
    model.set_target(target)
    got = model.segment()
    assert got.shape == (240, 320)
    assert torch.equal(got, expected)
    ref = model.encode_reference([refs[0]], [half])
    assert torch.equal(ref.masks, expected_mask)
    assert torch.equal(model.segment_targets(ref, [target])[0], expected)


def test_mask_of_another_aspect_ratio_is_used_with_a_warning(model, episode):
    refs, masks, target, _ = episode
    odd = np.zeros((100, 100), bool)
    odd[20:70, 30:90] = True
    with pytest.warns(InputWarning, match="another aspect ratio"):
        model.set_reference(refs[0], odd)
    model.set_target(target)
    got = model.segment()
    model.set_target(target)
    expected = model.predict_mask(normalised(refs[0], SIZE), published_mask(odd, SIZE), normalised(target, SIZE))
    model.reset_state()
    assert got.shape == (240, 320) and torch.equal(got, expected)


def test_load_mask_modes():
    mask = np.ones((20, 30), bool)
    with pytest.raises(InputError, match="same size.*--resize-mask"):
        load_mask(mask, 16, expected_hw=(40, 60))
    assert torch.equal(load_mask(mask, 16, expected_hw=(40, 60), mismatch="warn"), published_mask(mask, 16))
    with pytest.raises(InputError, match="mismatch"):
        load_mask(mask, 16, mismatch="nope")


# ---- item 2: the rank of the positional subspace for every offered size ----
def test_default_rank_rule_for_every_model_size():
    expected = {"small": 192, "small_plus": 192, "base": 500, "large": 500, "huge_plus": 500, "7b": 500}
    assert set(expected) == set(_FAMILIES)
    for name, family in _FAMILIES.items():
        assert default_svd_components(family.embed_dim) == expected[name], name
        r = default_svd_components(family.embed_dim)
        assert 0 < r < family.embed_dim
    assert resolve_svd_components(None, None) == 500
    assert resolve_svd_components(499, 500) == 499


def test_published_default_rank_on_a_384_wide_encoder_warns_and_works():
    encoder = SyntheticEncoder(384)
    with pytest.warns(InputWarning, match="svd_components=192"):
        m = INSID3(encoder, image_size=256, device="cpu")  # the published default, 500
    assert m.svd_components == 192 and m.positional_basis.shape == (384, 192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = INSID3(encoder, image_size=256, svd_components=None, device="cpu")
    assert torch.equal(quiet.positional_basis, m.positional_basis)
    refs, masks, target, truth = make_episode(0, 1)
    m.set_reference(refs[0], masks[0])
    m.set_target(target)
    pred = m.segment().numpy()
    assert (pred & truth).sum() / (pred | truth).sum() > 0.5  # a real mask, not noise


class NoWidthEncoder(SyntheticEncoder):
    """An encoder without an ``embed_dim`` attribute: the rank is checked on the basis itself."""

    def __getattribute__(self, name):
        if name == "embed_dim":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_rank_fallback_without_embed_dim():
    with pytest.warns(InputWarning, match="svd_components=8"):
        m = INSID3(NoWidthEncoder(16), image_size=128, svd_components=40, device="cpu")
    assert m.positional_basis.shape == (16, 8) and m.svd_components == 8


# ---- item 4: silently wrong images ----
def test_sixteen_bit_images_are_scaled_and_files_read_as_published(tmp_path):
    """A 16-bit PIL image or uint16 array (which the published code cannot take) is scaled to 8
    bits; a 16-bit file is read as published (``convert('RGB')`` saturates it), with a warning."""
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    assert Image.open(path).mode.startswith("I;16")
    eight = np.round(deep / 257.0).astype(np.uint8)
    expected = load_image(Image.fromarray(eight), 32)[0]
    assert torch.equal(load_image(Image.open(path), 32)[0], expected)
    assert torch.equal(load_image(deep, 32)[0], expected)  # a uint16 array too
    with pytest.warns(InputWarning, match="clips them to 0-255"):
        saturated = load_image(path, 32)[0]
    assert torch.equal(saturated, load_image(Image.open(path).convert("RGB"), 32)[0])
    assert not torch.equal(expected, saturated)
    # 8-bit values in a 16-bit file are kept, by the published conversion too.
    small = rng.integers(0, 256, size=(40, 48)).astype(np.uint16)
    Image.fromarray(small).save(path)
    assert torch.equal(load_image(path, 32)[0], load_image(Image.fromarray(small.astype(np.uint8)), 32)[0])


def test_uint8_tensor_is_read_as_pixels_with_a_warning():
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(3, 40, 48), dtype=np.uint8))
    with pytest.warns(InputWarning, match="0-255 RGB pixels"):
        got, orig = load_image(pixels, 32)
    float_norm = TF.normalize(pixels.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    assert orig == (40, 48)
    assert torch.equal(got, load_image(float_norm, 32)[0])
    with pytest.raises(InputError, match="values in"):
        load_image(torch.full((3, 32, 32), 300, dtype=torch.int32), 32)


def test_float_array_with_nan_pixels_is_still_rescaled():
    rng = np.random.default_rng(2)
    arr = rng.random((40, 48, 3)).astype(np.float32)
    arr[5, 7] = np.nan
    with pytest.warns(InputWarning, match="non-finite"):
        got = load_image(arr, 32)[0]
    clean = np.where(np.isnan(arr), 0, arr)
    assert torch.equal(got, load_image(np.round(clean * 255).astype(np.uint8), 32)[0])


def test_nan_in_a_reference_tensor_warns(model, episode):
    refs, masks, _, _ = episode
    image = normalised(refs[0], SIZE).clone()
    image[0, :, 10, 10] = float("nan")
    with pytest.warns(InputWarning, match="non-finite"):
        model.set_reference(image, masks[0])
    model.reset_state()
    with pytest.warns(InputWarning, match="non-finite"):
        model.predict_mask(image, published_mask(masks[0], SIZE), normalised(refs[0], SIZE))


@pytest.mark.parametrize("kw", [dict(tau=float("nan")), dict(tau=float("inf")), dict(merge_threshold=float("nan"))])
def test_non_finite_or_out_of_range_thresholds_are_refused(kw):
    with pytest.raises(InputError, match="tau|merge_threshold"):
        INSID3(SyntheticEncoder(16), image_size=64, svd_components=4, device="cpu", **kw)


def test_thresholds_the_published_code_runs_with_are_accepted(episode):
    """tau < 0 (one cluster; with a warning) and an infinite merge_threshold run in the
    published code: they give its result here (an empty mask for +inf, every matched cluster
    for -inf, all-or-nothing for tau < 0, whose clustering leaves this target one cluster)."""
    refs, masks, target, _ = episode
    kw = dict(image_size=SIZE, svd_components=16, device="cpu")
    with pytest.warns(InputWarning, match="tau = -0.5 < 0"):
        one_cluster = INSID3(SyntheticEncoder(32, seed=1), tau=-0.5, **kw)
    with pytest.warns(InputWarning, match="tau = 1.5 > 1"):
        singletons = INSID3(SyntheticEncoder(32, seed=1), tau=1.5, **kw)  # published: match() runs
    singletons.set_reference(refs[0])
    singletons.set_target(target)
    assert singletons.match(torch.tensor([[10.0, 20.0]])).shape == (1, 2)
    for model in (one_cluster, INSID3(SyntheticEncoder(32, seed=1), merge_threshold=float("inf"), **kw),
                  INSID3(SyntheticEncoder(32, seed=1), merge_threshold=-float("inf"), **kw)):
        model.set_reference(refs[0], masks[0])
        model.set_target(target)
        mask = model.segment()
        if model.merge_threshold == float("inf"):
            assert not mask.any()
        elif model.merge_threshold == -float("inf"):
            everything = mask
        else:
            assert mask.all() or not mask.any()  # one cluster here: all of it or none
    assert everything.any()


def test_threshold_setters_are_validated(model):
    with pytest.raises(InputError, match="tau"):
        model.tau = float("nan")
    with pytest.raises(InputError, match="merge_threshold"):
        model.merge_threshold = float("nan")
    assert model.tau == 0.6 and model.merge_threshold == 0.2
    assert model.core.tau == 0.6


def test_nan_keypoints_give_nan_predictions(model, episode):
    refs, _, target, _ = episode
    kps = torch.tensor([[100.0, 50.0], [float("nan"), 20.0], [30.0, 200.0], [5.0, float("inf")]])
    model.set_reference(refs[0])
    model.set_target(target)
    with pytest.warns(InputWarning, match="2 of 4 keypoints"):
        got = model.match(kps)
    model.set_reference(refs[0])
    model.set_target(target)
    finite = model.match(kps[[0, 2]])
    assert torch.isnan(got[[1, 3]]).all()
    assert torch.equal(got[[0, 2]], finite)
    model.set_reference(refs[0])
    model.set_target(target)
    with pytest.warns(InputWarning):
        assert torch.isnan(model.match(torch.full((2, 2), float("nan")))).all()


def test_reference_encoded_at_another_size_is_refused(model, episode):
    refs, masks, target, _ = episode
    other = INSID3(SyntheticEncoder(32, seed=1), image_size=128, svd_components=16, device="cpu")
    ref = other.encode_reference(refs, masks)
    with pytest.raises(InputError, match="encoded at image size 128.*segments at 256"):
        model.segment_targets(ref, [target])
    with pytest.raises(InputError, match="encoded at image size"):
        model.stream(ref, [target])  # at the call, not at the first next()
    wider = INSID3(SyntheticEncoder(48, seed=1), image_size=SIZE, svd_components=16, device="cpu")
    with pytest.raises(InputError, match="embedding size"):
        model.segment_targets(wider.encode_reference(refs, masks), [target])
    with pytest.raises(InputError, match="encode_reference"):
        model.segment_targets("not a reference", [target])


def test_palette_masks_are_read_by_index():
    # Kept as published: index > 0 is foreground, whatever the palette colour (index 0 here is white).
    index = np.zeros((32, 32), np.uint8)
    index[8:20, 4:12] = 1
    index[0:4, 0:4] = 2
    pal = Image.fromarray(index, mode="P")
    pal.putpalette([255, 255, 255, 0, 0, 0, 10, 10, 10] + [0] * (256 * 3 - 9))
    assert torch.equal(load_mask(pal, 32), published_mask(index, 32))


def test_exif_orientation_is_opt_in(tmp_path, episode):
    refs, _, _, _ = episode
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    refs[0].save(path, exif=exif, quality=95)
    stored = Image.open(path)
    assert load_image(path, 32)[1] == (240, 320)  # ignored by default, as published
    tensor, orig = load_image(path, 32, exif_transpose=True)
    assert orig == (320, 240)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert torch.equal(tensor, load_image(upright, 32)[0])
    m = INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE, svd_components=16, device="cpu", exif_transpose=True)
    m.set_target(path)
    assert m._orig_tgt_size == (320, 240)


# ---- item 5: wrong argument types get a message ----
@pytest.mark.parametrize("kw,match", [
    (dict(tau=True), "tau must be a number"),
    (dict(image_size=512.0), "image size must be an integer"),
    (dict(image_size="512"), "image size must be an integer"),
    (dict(svd_components=8.5), "svd_components must be an integer"),
])
def test_wrong_argument_types(kw, match):
    args = dict(image_size=64, svd_components=4, device="cpu")
    args.update(kw)
    with pytest.raises(InputError, match=match):
        INSID3(SyntheticEncoder(16), **args)


def test_numpy_scalars_are_accepted():
    m = INSID3(SyntheticEncoder(16), image_size=np.int64(64), svd_components=np.int32(4), tau=np.float32(0.5),
               device="cpu")
    assert m.image_size == 64 and isinstance(m.image_size, int) and m.tau == 0.5


def test_build_insid3_checks_arguments_before_the_weights(tmp_path):
    with pytest.raises(InputError, match="tau must be a finite number"):
        build_insid3("small", weights=tmp_path / "missing.pth", tau=float("nan"))
    with pytest.raises(InputError, match="image size"):
        build_insid3("small", weights=tmp_path / "missing.pth", image_size=512.0)


def test_object_arrays_are_refused(model):
    obj = np.empty((32, 32, 3), dtype=object)
    obj[:] = 1
    with pytest.raises(InputError, match="dtype object"):
        load_image(obj, 32)
    with pytest.raises(InputError, match="dtype object"):
        load_mask(obj[..., 0], 32)
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((32, 32, 3), np.complex64), 32)


def test_predict_mask_shapes_are_checked(model, episode):
    refs, masks, target, _ = episode
    images = torch.cat([normalised(refs[0], SIZE)] * 2)
    one_mask = published_mask(masks[0], SIZE)
    tgt = normalised(target, SIZE)
    with pytest.raises(InputError, match="one mask per reference image"):
        model.predict_mask(images, one_mask, tgt)
    with pytest.raises(InputError, match="tensor"):
        model.predict_mask(refs[0], one_mask, tgt)
    with pytest.warns(InputWarning, match="the first is segmented"):  # as published
        model.predict_mask(images[:1], one_mask, images)
    with pytest.raises(InputError, match="one image"):
        model.predict_mask(images[:1], one_mask, images[:0])
    with pytest.raises(InputError, match="one batch"):
        model.predict_mask(images[:1], one_mask, normalised(target, 128))
    with pytest.raises(InputError, match="keypoints"):
        model.predict_keypoint(images[:1], [["a", "b"]], tgt)


def test_single_image_encode_reference_and_bad_targets(model, episode):
    refs, masks, target, _ = episode
    ref = model.encode_reference(refs[0], masks[0])
    assert torch.equal(ref.masks, model.encode_reference([refs[0]], [masks[0]]).masks)
    with pytest.raises(InputError, match="wrap it in a list"):
        model.segment_targets(ref, target)
    with pytest.raises(InputError, match="batch_size"):
        model.segment_targets(ref, [target], batch_size=0)
    assert not math.isnan(float(model.segment_targets(ref, [target])[0].float().mean()))


# ---- the command line: strict masks unless --resize-mask; every model size out of the box ----
from pathlib import Path  # noqa: E402

from checkpoints import write_meta_checkpoint  # noqa: E402
from insid3_fast.cli import main  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REF, MASK, TARGET = EXAMPLES / "ref_cat_image.jpg", EXAMPLES / "ref_cat_mask.png", EXAMPLES / "target_cat_image.jpg"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSID3_CACHE", str(tmp_path / "cache"))


def _segment_args(weights, out, *extra, size=128):
    return ["segment", "--ref-image", str(REF), "--ref-mask", str(extra[0] if extra else MASK),
            "--target", str(TARGET), "--output", str(out), "--weights", str(weights),
            "--image-size", str(size), "--device", "cpu", *map(str, extra[1:])]


def test_cli_mask_of_another_size_needs_resize_mask(tmp_path, capsys):
    weights = write_meta_checkpoint(tmp_path / "dinov3_vits16_test.pth")
    half = tmp_path / "half.png"
    mask = Image.open(MASK)
    mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST).save(half)
    code = main(_segment_args(weights, tmp_path / "a.png", half, "--svd-components", 16))
    _, err = capsys.readouterr()
    assert code == 2 and "same size" in err and "--resize-mask" in err
    assert main(_segment_args(weights, tmp_path / "a.png", half, "--svd-components", 16, "--resize-mask")) == 0
    assert Image.open(tmp_path / "a.png").size == Image.open(TARGET).size
    code = main(["segment-many", "--ref-image", str(REF), "--ref-mask", str(half), "--target", str(TARGET),
                 "--output-dir", str(tmp_path / "many"), "--weights", str(weights), "--image-size", "128",
                 "--device", "cpu", "--svd-components", "16"])
    _, err = capsys.readouterr()
    assert code == 2 and "--resize-mask" in err


@pytest.mark.parametrize("size,rank", [("small", 192), ("small_plus", 192), ("base", 500)])
def test_cli_default_rank_for_each_model_size(size, rank, tmp_path, capsys):
    weights = write_meta_checkpoint(tmp_path / f"{size}.pth", size, depth=1)
    # 1024 patches at 512 px: enough for a rank-500 basis.
    code = main(_segment_args(weights, tmp_path / "m.png", MASK, "--model-size", size, size=512))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.count(f"rank-{rank} positional subspace") == 1
    assert "warning" not in err


# ---- published call patterns found by a review of the drop-in (third pass) ----
def test_predict_mask_downsamples_the_mask_values_as_published(model, episode):
    """The published predict_mask downsamples ``mask.float()``: a 0/255 uint8 mask (or a soft
    one) covers more patch cells than its bool version. Ours did ``.bool()`` first."""
    from insid3_fast.testing import published

    refs, _, target, _ = episode
    image = normalised(refs[0], SIZE)
    stripe = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    stripe[0, 100:104, 40:200] = 255  # 4 px high: a quarter of a patch row, 255 times over 0.5
    soft = stripe.float() / 255 * 0.3
    h = w = SIZE // 16
    for mask in (stripe, soft):
        down = model.core.encode_reference(image, mask).masks_down[0]
        assert torch.equal(down, published.downsample_mask(mask[0], h, w))
    assert not torch.equal(model.core.encode_reference(image, stripe).masks_down,
                           model.core.encode_reference(image, stripe.bool()).masks_down)
    got = model.predict_mask(image, stripe, normalised(target, SIZE))
    assert got.dtype == torch.bool and got.shape == (SIZE, SIZE)


def test_a_failed_segment_keeps_the_state_as_published(model, episode):
    """Published segment()/match() raise before reset_state(): the references stay, so setting
    the missing target and calling again works. Ours cleared the state in a finally."""
    refs, masks, target, _ = episode
    model.reset_state()
    model.set_reference(refs[0], masks[0])
    with pytest.raises(RuntimeError, match="requires"):
        model.segment()
    model.set_target(target)
    first = model.segment()
    assert first.shape == np.asarray(target).shape[:2]
    with pytest.raises(RuntimeError, match="requires"):
        model.segment()  # a successful segment() cleared the state
    model.set_reference(refs[0])
    with pytest.raises(RuntimeError, match="requires"):
        model.match(torch.tensor([[10.0, 20.0]]))
    model.set_target(target)
    assert model.match(torch.tensor([[10.0, 20.0]])).shape == (1, 2)


def test_nested_list_masks_and_missing_files_as_published(model, episode):
    """The published loader takes ``np.array(mask) > 0`` of a nested list, and a missing file
    raises FileNotFoundError there: ours raised 'unsupported mask type list' and a ValueError."""
    refs, masks, _, _ = episode
    as_list = masks[0].astype(np.uint8).tolist()
    assert torch.equal(load_mask(as_list, SIZE), load_mask(masks[0], SIZE))
    with pytest.raises(InputError, match="rectangular"):
        load_mask([[1, 0], [1]], SIZE)
    with pytest.raises(FileNotFoundError, match="not found"):
        model.set_reference("/nonexistent/ref.png", masks[0])
    with pytest.raises(InputError, match="not found"):  # and still the package's InputError
        model.set_target("/nonexistent/target.png")
    model.reset_state()


def test_an_encoder_without_a_norm_argument_runs(episode):
    """The published code calls get_intermediate_layers(x, n=1, reshape=True): an encoder whose
    method has no ``norm`` parameter works there (ours passed norm=True and raised TypeError)."""

    class NoNorm(SyntheticEncoder):
        def get_intermediate_layers(self, x, n=1, reshape=True):
            return super().get_intermediate_layers(x, n=n, reshape=reshape)

    refs, masks, target, _ = episode
    kw = dict(image_size=SIZE, svd_components=16, device="cpu")
    plain, no_norm = INSID3(SyntheticEncoder(32, seed=1), **kw), INSID3(NoNorm(32, seed=1), **kw)
    for m in (plain, no_norm):
        m.set_reference(refs[0], masks[0])
        m.set_target(target)
    assert torch.equal(no_norm.segment(), plain.segment())


def test_extra_masks_and_keypoint_columns_are_ignored_as_published(model, episode):
    """Published predict_mask reads the masks of its S shots (more masks: the rest unused), and
    the keypoint transfer reads columns x, y of (K, 3) keypoints: ours raised for both."""
    refs, masks, target, _ = episode
    image, tgt = normalised(refs[0], SIZE), normalised(target, SIZE)
    one = published_mask(masks[0], SIZE)
    with pytest.warns(InputWarning, match="2 reference masks for 1 reference images"):
        two = model.predict_mask(image, torch.cat([one, torch.zeros_like(one)]), tgt)
    assert torch.equal(two, model.predict_mask(image, one, tgt))
    kps = torch.tensor([[30.0, 40.0, 1.0], [100.0, 90.0, 0.0]])
    with pytest.warns(InputWarning, match="3 columns"):
        got = model.predict_keypoint(image, kps, tgt)
    assert torch.equal(got, model.predict_keypoint(image, kps[:, :2], tgt))


def test_published_attributes_can_be_assigned(episode):
    """The published class keeps its options as plain attributes; code that assigns them must
    run (ours raised 'property has no setter', and ``model.encoder = e`` was silently ignored)."""
    refs, masks, target, _ = episode
    model = INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE, svd_components=16, device="cpu")

    def segment():
        model.set_reference(refs[0], masks[0])
        model.set_target(target)
        return model.segment()

    first = segment()
    model.resize_to_orig_size = False
    assert segment().shape == (SIZE, SIZE)
    model.resize_to_orig_size = True
    model.mask_refiner = "bilinear"
    assert torch.equal(segment(), first)
    with pytest.warns(InputWarning, match="only the reference masks set_reference loads are read at 160"):
        model.image_size = 160
    assert model.image_size == 160 and model.core.image_size == SIZE
    model.resize_to_orig_size = False
    # The published effect: images at the construction size, the mask loaded at 160 px (nearest)
    # and downsampled to the patch grid from there.
    expected = model.predict_mask(normalised(refs[0], SIZE), load_mask(masks[0], 160), normalised(target, SIZE))
    assert torch.equal(segment(), expected) and expected.shape == (SIZE, SIZE)
    model.resize_to_orig_size = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.image_size = SIZE  # back at the construction size: nothing to warn about
    assert torch.equal(segment(), first)
    with pytest.warns(InputWarning, match="encoder was replaced"):
        model.encoder = SyntheticEncoder(32, seed=2)
    assert model.core.encoder is model.encoder and "encoder" not in model._modules
    assert not torch.equal(segment(), first)
    with pytest.warns(InputWarning, match="changes nothing"):
        model.svd_components = 4
    assert model.svd_components == 16
    q = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(3))).Q
    model.positional_basis = q
    assert model.svd_components == 8 and torch.allclose(model.core.projector, torch.eye(32) - q @ q.T)
    model.device = "cpu"
    assert model.device.type == "cpu"


def test_any_assigned_positional_basis_debiases_as_published(model, episode):
    """The published code debiases with P = I - B Bᵀ whatever B is; ours refused a basis without
    orthonormal columns, and kept using references encoded with the old basis."""
    from insid3_fast.testing import published

    refs, masks, target, _ = episode
    model = INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE, svd_components=16, device="cpu")
    core = model.core
    image = normalised(refs[0], SIZE)
    mask = published_mask(masks[0], SIZE)
    old_ref = core.encode_reference(image, mask)
    b = torch.randn(32, 6, generator=torch.Generator().manual_seed(4)) * 0.3  # not orthonormal
    with pytest.warns(InputWarning, match="orthonormal"):
        model.positional_basis = b
    feats = core.features(torch.cat([image, normalised(target, SIZE)]))
    ref = core.encode_reference(image, mask, features=feats[:1])
    ours = core.segment_patches(ref, feats[1])
    theirs = published.segment_patches(feats[:1], mask, feats[1], torch.eye(32) - b @ b.T, core.tau,
                                       core.merge_threshold)
    assert ours.any() and torch.equal(ours, theirs.reshape(ours.shape))
    with pytest.raises(InputError, match="before the positional basis was replaced"):
        core.segment_patches(core.check_reference(old_ref), feats[1])


@pytest.mark.parametrize("C", [32, 64, 384])
def test_a_full_orthonormal_basis_runs_as_published_with_a_warning(C):
    """Orthonormal columns spanning all C dimensions leave P = I - B Bᵀ zero but for B's
    rounding; the published code runs on that residue. Ours ran on it silently for most float32
    bases and refused the others (those whose residue fell under 1e-6): now every such basis
    runs, with a warning saying the masks are rounding residue; an exactly zero P is refused."""
    model = INSID3(SyntheticEncoder(C, seed=1), image_size=SIZE, svd_components=C // 2, device="cpu")
    ran = 0
    for seed in range(6):
        q = torch.linalg.qr(torch.randn(C, C, generator=torch.Generator().manual_seed(seed))).Q
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model.positional_basis = q
            except InputError as exc:  # P's residue under 1e-6 everywhere: nothing at all to run on
                assert "removes the whole embedding" in str(exc)
                continue
        ran += 1
        assert any("spans all" in str(w.message) and "rounding residue" in str(w.message) for w in caught)
    assert ran
    before = model.core.basis.clone()
    with pytest.raises(InputError, match="removes the whole embedding"):
        model.positional_basis = torch.eye(C)
    assert torch.equal(model.core.basis, before)  # the model keeps its own
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.positional_basis = q[:, :-1]  # one direction left: no warning, one coordinate
    assert model.core.complement.shape == (C, 1)


def test_image_size_not_a_multiple_of_16_runs_as_published(episode):
    """The published class takes image_size=120 (its backbone reads 7 x 7 patches and the mask
    is upsampled to 120 px); ours raised. Here with a random DINOv3 ViT-S and the synthetic encoder."""
    from checkpoints import random_timm_model
    from insid3_fast.backbone import DinoV3Backbone

    refs, masks, target, _ = episode
    for encoder in (SyntheticEncoder(32, seed=1), DinoV3Backbone(random_timm_model("small"), "small")):
        with pytest.warns(InputWarning, match="not a multiple of 16"):
            model = INSID3(encoder, image_size=120, svd_components=16, device="cpu", resize_to_orig_size=False)
        model.set_reference(refs[0], masks[0])
        model.set_target(target)
        assert model.segment().shape == (120, 120)
        assert model.core.features(torch.zeros(1, 3, 120, 120)).shape[-2:] == (7, 7)


def test_an_empty_reference_mask_is_kept_for_match_and_refused_by_segment(model, episode):
    """The published set_reference stores an empty mask (match() does not read it, segment()
    fails on it); ours refused it in set_reference, so match() could not run."""
    refs, masks, target, _ = episode
    empty = np.zeros_like(masks[0])
    model.reset_state()
    with pytest.warns(InputWarning, match="empty"):
        model.set_reference(refs[0], empty)
    model.set_target(target)
    assert model.match(torch.tensor([[10.0, 20.0]])).shape == (1, 2)
    with pytest.warns(InputWarning, match="empty"):
        model.set_reference(refs[0], empty)
    model.set_target(target)
    with pytest.raises(InputError, match="empty"):
        model.segment()
    model.reset_state()
    with pytest.raises(InputError, match="empty"):  # the stateless encode_reference stays strict
        model.encode_reference(refs[0], empty)


def test_a_published_state_dict_loads(episode):
    """The published class's state dict holds ``encoder.*`` only (its basis is an attribute):
    ``load_state_dict`` of one into ours raised on missing and unexpected keys."""
    source, target = SyntheticEncoder(32, seed=1), SyntheticEncoder(32, seed=5)
    kw = dict(image_size=SIZE, svd_components=16, device="cpu")
    model = INSID3(target, **kw)
    basis = model.positional_basis.clone()
    published = {"encoder." + k: v for k, v in source.state_dict().items()}
    model.load_state_dict(published)  # strict
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(), source.state_dict().values()))
    assert torch.equal(model.positional_basis, basis)  # kept, as the published model keeps its own
    model.load_state_dict(INSID3(source, **kw).state_dict())  # ours still loads as it is
    with pytest.raises(RuntimeError, match="Missing"):
        model.load_state_dict({"encoder.nope": torch.zeros(1)})


def test_a_failed_segment_keeps_the_state_for_any_thread(model, episode):
    """The state stays after a failed segment() (as published), and any thread may go on with
    it (with a warning that it continues another thread's sequence)."""
    import threading

    refs, masks, target, _ = episode
    model.reset_state()

    def fail():
        model.set_reference(refs[0], masks[0])
        with pytest.raises(RuntimeError, match="requires"):
            model.segment()

    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()
    with pytest.warns(InputWarning, match="another thread"):
        model.set_target(target)  # the references are still there
    assert model.segment().shape == np.asarray(target).shape[:2]


def test_a_published_state_dict_with_meta_names_and_a_crf_loads(tmp_path):
    """A published model holds Meta's hub encoder: its state dict has Meta's key names (ours are
    timm's) and, with the CRF, ``_crf.*`` modules. Both loaded into a model built on our loader."""
    from checkpoints import write_meta_checkpoint
    from insid3_fast.backbone import load_dinov3

    source = write_meta_checkpoint(tmp_path / "a.pth", seed=1)
    other = write_meta_checkpoint(tmp_path / "b.pth", seed=2)
    meta = torch.load(source, weights_only=True)
    published = {"encoder." + k: v for k, v in meta.items()}
    published["_crf.spatial_weight.weight"] = torch.zeros(1, 1, 3, 3)
    model = INSID3(load_dinov3(other), image_size=64, svd_components=8, device="cpu")
    with pytest.warns(InputWarning, match="_crf"):
        model.load_state_dict(published)
    expected = load_dinov3(source)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.encoder.get_intermediate_layers(x)[0], expected.get_intermediate_layers(x)[0])


def test_predict_mask_on_tensors_of_another_size_keeps_their_size(model, episode):
    """The published predict_mask upsamples the mask to the target tensor's own size (then to
    the original size with resize_to_orig_size); ours upsampled to the model's image size."""
    refs, masks, target, _ = episode
    big = 2 * SIZE
    image, tgt = normalised(refs[0], big), normalised(target, big)
    model.reset_state()
    keep = model.resize_to_orig_size
    model.resize_to_orig_size = False
    try:
        got = model.predict_mask(image, published_mask(masks[0], big), tgt)
    finally:
        model.resize_to_orig_size = keep
    assert got.shape == (big, big)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_a_nan_target_pixel_on_a_dinov3_gives_the_published_empty_mask(tmp_path, episode, backend):
    """One NaN pixel reaches every DINOv3 feature through the attention: the published code then
    finds no candidate and returns an empty mask before its clustering (its restatement in
    insid3_fast.testing.published does the same on these features), where the ops would raise."""
    from checkpoints import write_meta_checkpoint
    from insid3_fast import load_dinov3
    from insid3_fast.testing import published

    encoder = load_dinov3(str(write_meta_checkpoint(tmp_path / "dinov3_vits16_pretrain_lvd1689m-x.pth")))
    model = INSID3(encoder, image_size=64, svd_components=4, device="cpu", backend=backend)
    refs, masks, target, _ = episode
    image = normalised(target, 64).clone()
    image[0, :, 30, 30] = float("nan")
    model.set_reference(refs[0], masks[0])
    with pytest.warns(InputWarning, match="non-finite"):
        model.set_target(image)
        got = model.segment()
    assert got.shape == (64, 64) and not got.any()
    feats = model.core.features(torch.cat([normalised(refs[0], 64), image]))
    assert not torch.isfinite(feats[1]).any()
    ref_mask = published_mask(masks[0], 64)
    assert not published.segment_patches(feats[:1], ref_mask, feats[1], model.core.projector, tau=0.6,
                                         merge_threshold=0.2).any()


def test_predict_keypoint_reads_keypoints_in_the_last_references_pixels(model, episode):
    """The published predict_keypoint rescales by the size of the image last given to
    set_reference (its ``_orig_ref_size``); ours took the first's."""
    refs, _, target, _ = episode
    small = refs[0].resize((160, 120))
    kps = torch.tensor([[20.0, 30.0], [150.0, 100.0]])
    model.reset_state()
    model.set_reference(refs[0])  # 320 x 240
    model.set_reference(small)  # 160 x 120: the last
    model.set_target(target)
    ref_t, tgt_t = normalised(refs[0], SIZE), normalised(target, SIZE)
    got = model.predict_keypoint(ref_t, kps, tgt_t)
    model.reset_state()
    expected = model.core.match_keypoints(ref_t, kps, tgt_t, False, (120, 160), (240, 320))
    first = model.core.match_keypoints(ref_t, kps, tgt_t, False, (240, 320), (240, 320))
    assert torch.equal(got, expected) and not torch.equal(expected, first)


def test_numbers_as_one_element_arrays_and_tensors_and_a_negative_rank(episode):
    """The published class takes np.array(0.6) or torch.tensor(16) for a number, and a negative
    svd_components as the slice U[:, :r]: C + r components."""
    kw = dict(image_size=SIZE, device="cpu")
    plain = INSID3(SyntheticEncoder(32, seed=1), svd_components=16, tau=0.6, **kw)
    arrays = INSID3(SyntheticEncoder(32, seed=1), svd_components=torch.tensor(16), tau=np.array(0.6),
                    merge_threshold=torch.tensor(0.2), **kw)
    assert (arrays.svd_components, arrays.tau, arrays.merge_threshold) == (16, 0.6, float(torch.tensor(0.2)))
    assert torch.equal(arrays.positional_basis, plain.positional_basis)
    with pytest.warns(InputWarning, match=r"U\[:, :-16\].*16 components"):
        negative = INSID3(SyntheticEncoder(32, seed=1), svd_components=-16, **kw)
    assert torch.equal(negative.positional_basis, plain.positional_basis)
    with pytest.warns(InputWarning, match="0 components"):
        assert INSID3(SyntheticEncoder(32, seed=1), svd_components=-40, **kw).svd_components == 0
    with pytest.raises(InputError, match="must be an integer"):
        INSID3(SyntheticEncoder(32, seed=1), svd_components=torch.tensor(16.0), **kw)


def test_a_negative_rank_slices_the_singular_vectors_the_svd_has(tmp_path):
    """U has K = min(C, patches) columns: U[:, :-8] keeps K - 8, also where the grid has fewer
    patches than C (64 px: 16 patches for C = 64) and for an encoder without ``embed_dim``."""
    from insid3_fast.debias import compute_positional_basis

    encoder = SyntheticEncoder(64, seed=1)
    full = compute_positional_basis(encoder, 64, 64)
    assert full.shape == (64, 16)
    with pytest.warns(InputWarning, match="8 components are removed"):
        few = INSID3(SyntheticEncoder(64, seed=1), image_size=64, svd_components=-8, device="cpu")
    assert torch.equal(few.positional_basis, full[:, :-8])
    with pytest.warns(InputWarning, match="8 components are removed"):
        unsized = INSID3(NoWidthEncoder(16), image_size=128, svd_components=-8, device="cpu")
    assert unsized.positional_basis.shape == (16, 8)
    for _ in range(2):  # written, then read back (no "was not used ... recomputing" warning)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            warnings.simplefilter("ignore", InputWarning)
            cached = INSID3(SyntheticEncoder(64, seed=1), image_size=64, svd_components=-8, device="cpu",
                            cache_key="neg", cache_dir=str(tmp_path))
        assert torch.equal(cached.positional_basis, full[:, :-8])
    assert len(list(tmp_path.iterdir())) == 1


def test_predict_mask_with_a_batch_of_targets_segments_the_first(model, episode):
    refs, masks, target, _ = episode
    ref_t, tgt_t = normalised(refs[0], SIZE), normalised(target, SIZE)
    other = normalised(refs[0].transpose(Image.FLIP_LEFT_RIGHT), SIZE)
    mask = published_mask(masks[0], SIZE)
    model.reset_state()
    one = model.predict_mask(ref_t, mask, tgt_t)
    with pytest.warns(InputWarning, match="holds 2 images: the first is segmented"):
        assert torch.equal(model.predict_mask(ref_t, mask, torch.cat([tgt_t, other])), one)


# ---- PIL modes and image files read as the published code reads them ----
@contextlib.contextmanager
def silent():
    """A block in which an ``InputWarning`` is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        yield


def published_image(image: Image.Image, size: int) -> torch.Tensor:
    """What the published ``load_image`` makes of a PIL image object: its transform on the image as it is."""
    return TF.normalize(TF.to_tensor(TF.resize(image, [size, size])), IMAGENET_MEAN, IMAGENET_STD)[None]


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_three_band_pil_images_are_read_band_for_band_with_a_warning(episode, mode):
    """The published transform's ToTensor takes a YCbCr, LAB or HSV image's raw bands as R, G, B;
    ours converted the image to RGB first, so its masks differed (the YCbCr reference of the
    review: 4186 foreground pixels against the published 2763)."""
    image = episode[0][0].convert(mode)
    with pytest.warns(InputWarning, match=f"{mode}.*raw.*convert\\('RGB'\\)"):
        got = load_image(image, 32)[0]
    assert torch.equal(got, published_image(image, 32))
    rgb = episode[0][0]
    with silent():
        assert torch.equal(load_image(rgb, 32)[0], published_image(rgb, 32))


def _grey(episode) -> np.ndarray:
    return np.asarray(episode[0][0].convert("L").resize((48, 40)))


@pytest.mark.parametrize("name, values, warning, object_scaled", [
    ("deep.png", lambda g: g.astype(np.uint16) * 257, "clips.*0-255", True),       # I;16: saturates to white
    ("deep.tif", lambda g: g.astype(np.uint16) * 257, "clips.*0-255", True),
    ("deep32.tif", lambda g: g.astype(np.int32) * 257 - 30000, "clips.*0-255", True),  # I: below 0, above 255
    ("unit.tif", lambda g: g.astype(np.float32) / 255.0, r"\[0, 1\].*black", True),  # F in [0, 1]: nearly black
    ("wide.tif", lambda g: g.astype(np.float32) * 4.0 - 100.0, "clips.*0-255", False),
])
def test_deep_and_float_files_are_read_as_published_with_a_warning(tmp_path, episode, name, values, warning,
                                                                   object_scaled):
    """The published ``Image.open(path).convert('RGB')`` clips 16-bit, 32-bit and float pixels to
    0-255 (a float image in [0, 1] turns black); ours scaled them, so its masks differed (the
    [0, 1] TIFF reference of the review: 1112 foreground pixels against the published 0)."""
    path = tmp_path / name
    Image.fromarray(values(_grey(episode))).save(path)
    assert Image.open(path).mode in ("I;16", "I", "F")
    with pytest.warns(InputWarning, match=f"{name}.*{warning}"):
        got, orig = load_image(path, 32)
    assert orig == (40, 48)
    assert torch.equal(got, published_image(Image.open(path).convert("RGB"), 32))
    # The opened image (which the published transform cannot take) is scaled to 8 bits, as the
    # warning suggests; floats outside [0, 1] are clipped either way.
    scaled = load_image(Image.open(path), 32)[0]
    assert torch.equal(scaled, got) != object_scaled


@pytest.mark.parametrize("name, values", [
    ("eight.png", lambda g: g.astype(np.uint16)),     # 8-bit values in a 16-bit file
    ("eight.tif", lambda g: g.astype(np.float32)),    # float pixels that are 0-255 values
])
def test_deep_and_float_files_of_8_bit_values_read_silently(tmp_path, episode, name, values):
    path = tmp_path / name
    Image.fromarray(values(_grey(episode))).save(path)
    with silent():
        got = load_image(path, 32)[0]
    assert torch.equal(got, published_image(Image.open(path).convert("RGB"), 32))
    assert torch.equal(got, load_image(Image.fromarray(_grey(episode)), 32)[0])


def test_every_file_mode_is_read_as_published(tmp_path, episode):
    """Files of every mode PNG, TIFF, JPEG, BMP, GIF and WebP hold: the published ``convert('RGB')``."""
    rgb = episode[0][0].resize((48, 40))
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        image = rgb.convert(mode) if mode != "PA" else rgb.convert("P").convert("PA")
        for ext in ("png", "tif", "jpg", "bmp", "gif", "webp"):
            path = tmp_path / f"{mode}.{ext}"
            try:
                image.save(path)
            except (OSError, ValueError, KeyError):
                continue  # a mode this format cannot hold
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InputWarning)
                got = load_image(path, 32)[0]
            assert torch.equal(got, published_image(Image.open(path).convert("RGB"), 32)), (mode, ext)


# ---- numpy masks in the tensor's (1, H, W) layout ----
def test_channels_first_numpy_mask_is_read_like_the_tensor(model, episode):
    """A (1, H, W) numpy mask (``tensor.numpy()`` of a (1, H, W) mask, a batch slice) was taken
    as (H, W, C) with C = W and collapsed to a 1 x H strip, with only an aspect-ratio warning;
    the same (1, H, W) tensor was read right. The published ``load_mask`` refuses every 3-D array."""
    refs, masks, _, _ = episode
    m = masks[0]
    as_tensor = load_mask(torch.from_numpy(m[None]), 64, expected_hw=m.shape, mismatch="warn")
    for source in (m[None], m[None].astype(np.uint8) * 255, m[None].tolist()):
        with silent():
            got = load_mask(source, 64, expected_hw=m.shape, mismatch="warn")
        assert torch.equal(got, as_tensor)
    with silent():
        ref = model.encode_reference(refs, [m[None]])
    assert torch.equal(ref.masks, model.encode_reference(refs, [torch.from_numpy(m[None])]).masks)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_channels_first_numpy_mask_of_several_channels_is_refused(episode, channels):
    """Collapsed over its last axis it became a C x H strip; the published code refuses it too."""
    m = episode[1][0]
    stacked = np.stack([m] * channels)
    with pytest.raises(InputError, match=f"channels-first.*{channels}.*\\(H, W\\)"):
        load_mask(stacked, 64)
    # Channels last, as PIL gives colour masks, any channel > 0 is foreground.
    assert torch.equal(load_mask(np.moveaxis(stacked, 0, -1), 64), load_mask(m, 64))
    row = m[m.any(axis=1)][:1].astype(np.uint8) * 255
    one_row = Image.fromarray(np.stack([row] * 3, axis=-1))  # a 1 x W RGB mask: (1, W, 3) as an array
    assert torch.equal(load_mask(one_row, 16), load_mask(row, 16))


def test_three_d_numpy_mask_without_a_channel_axis_is_refused(episode):
    m = episode[1][0]
    with pytest.raises(InputError, match="\\(H, W\\)"):
        load_mask(np.stack([m] * 5), 64)


@pytest.mark.parametrize("name,value", [("tau", None), ("tau", "0.6"), ("merge_threshold", None)])
def test_a_threshold_that_is_no_number_is_kept_until_a_segmentation(episode, name, value):
    """The published class constructs with tau=None or a string (and takes it by assignment);
    match() runs, and only its clustering or aggregation fails (a TypeError). Ours: the same,
    with a warning, and an InputError from every call that segments until a number is set."""
    refs, masks, target, _ = episode
    kw = dict(image_size=SIZE, svd_components=16, device="cpu")
    with pytest.warns(InputWarning, match=f"{name}={value!r} is not a number"):
        model = INSID3(SyntheticEncoder(32, seed=1), **kw, **{name: value})
    assert getattr(model, name) == value
    plain = INSID3(SyntheticEncoder(32, seed=1), **kw)
    kps = torch.tensor([[40.0, 50.0]])
    for m in (model, plain):
        m.set_reference(refs[0])
        m.set_target(target)
    assert torch.equal(model.match(kps), plain.match(kps))
    ref = model.encode_reference(refs[0], masks[0])
    model.set_reference(refs[0], masks[0])
    model.set_target(target)
    for call in (model.segment, lambda: model.segment_targets(ref, [target]), lambda: model.capture(ref)):
        with pytest.raises(InputError, match=f"{name} is {value!r}, not a number"):
            call()
    setattr(model, name, getattr(plain, name))
    assert torch.equal(model.segment(), plain.segment_targets(plain.encode_reference(refs[0], masks[0]), [target])[0])
    with pytest.warns(InputWarning, match="not a number"):
        setattr(model, name, value)  # by assignment too
    assert getattr(model, name) == value


def test_build_insid3_keeps_a_threshold_that_is_no_number(tmp_path):
    from checkpoints import write_meta_checkpoint

    path = write_meta_checkpoint(tmp_path / "dinov3_vits16_pretrain_lvd1689m-x.pth")
    with pytest.warns(InputWarning, match="tau=None is not a number"):
        model = build_insid3(weights=path, image_size=64, svd_components=4, device="cpu", tau=None,
                             cache_dir=str(tmp_path / "cache"))
    assert model.tau is None
    with pytest.raises(InputError, match="tau is None, not a number"):
        model.predict_mask(torch.zeros(1, 3, 64, 64), torch.ones(1, 64, 64, dtype=torch.bool),
                           torch.zeros(1, 3, 64, 64))
