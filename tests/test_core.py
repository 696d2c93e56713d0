"""The core is an nn.Module: its positional basis, projector and complement are buffers that move,
cast and save with it; the device is derived from them; one pipeline runs on either kernels."""

from __future__ import annotations

import pytest
import torch

from insid3_fast import INSID3, ops
from insid3_fast.core import Insid3Core
from insid3_fast.errors import InputError
from insid3_fast.synthetic import SyntheticEncoder, make_episode, segment_episode

BUFFERS = ("basis", "projector", "complement")


def _model(**kw) -> INSID3:
    return INSID3(SyntheticEncoder(32, seed=1), image_size=128, svd_components=8, device="cpu", **kw)


def test_state_dict_holds_the_basis_projector_and_complement():
    model = _model()
    state = model.state_dict()
    for name in BUFFERS:
        assert torch.equal(state[f"core.{name}"], getattr(model.core, name))
    assert state["core.basis"].shape == (32, 8) and state["core.complement"].shape == (32, 24)
    # The encoder is registered once (under the core), not also as INSID3.encoder.
    assert [name for name, _ in model.named_children()] == ["core"]
    assert model.encoder is model.core.encoder
    assert not any(k.startswith("encoder.") for k in state)


def test_load_state_dict_restores_the_basis():
    source, target = _model(), INSID3(SyntheticEncoder(32, seed=1), image_size=128, svd_components=8,
                                      device="cpu", noise="gaussian")
    assert not torch.equal(source.positional_basis, target.positional_basis)
    target.load_state_dict(source.state_dict())
    for name in BUFFERS:
        assert torch.equal(getattr(target.core, name), getattr(source.core, name))


def test_to_float64_casts_every_buffer_and_the_model_still_segments():
    model = _model()
    episode = make_episode(3, 2, size_hw=(96, 128))
    fp32 = segment_episode(model, *episode[:3])
    assert model.to(torch.float64) is model
    for name in BUFFERS:
        assert getattr(model.core, name).dtype == torch.float64, name
    assert all(p.dtype == torch.float64 for p in model.encoder.parameters())
    assert model.core.dtype == torch.float64
    fp64 = segment_episode(model, *episode[:3])
    assert fp64.shape == fp32.shape and (fp64 == fp32).mean() > 0.99


def test_to_moves_every_buffer_and_the_device_follows():
    model = _model()
    assert model.device == torch.device("cpu")
    model.to("meta")  # a device every machine has: the buffers and the encoder move together
    for name in BUFFERS:
        assert getattr(model.core, name).device.type == "meta", name
    assert all(p.device.type == "meta" for p in model.encoder.parameters())
    assert model.device.type == "meta" and model.core.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_moves_every_buffer():
    model = _model().to("cuda")
    assert all(getattr(model.core, name).is_cuda for name in BUFFERS)
    assert model.device.type == "cuda"


def test_the_episode_and_keypoints_are_the_cores():
    model = _model()
    refs, masks, target, _ = make_episode(4, 1, size_hw=(128, 128))
    from insid3_fast.inputs import load_image, load_mask

    ref, _ = load_image(refs[0], 128)
    tgt, _ = load_image(target, 128)
    mask = load_mask(masks[0], 128)
    assert torch.equal(model.predict_mask(ref, mask, tgt), model.core.predict_episode(ref, mask, tgt))
    kps = torch.tensor([[10.0, 20.0], [100.0, 90.0]])
    assert torch.equal(model.predict_keypoint(ref, kps, tgt, use_debiased=True),
                       model.core.match_keypoints(ref, kps, tgt, use_debiased=True))


@pytest.mark.skipif(not ops.native_available(), reason="native ops not built")
def test_one_pipeline_two_kernel_sets():
    """The same core stages on the compiled and on the reference kernels: the same patch masks."""
    encoder = SyntheticEncoder(64, seed=2)
    refs, masks, target, _ = make_episode(6, 2)
    cores = {k: Insid3Core(encoder, image_size=256, svd_components=32, device="cpu", backend=k)
             for k in ("native", "reference")}
    assert {k: c.kernels for k, c in cores.items()} == {"native": "native", "reference": "reference"}
    from insid3_fast.inputs import load_image, load_mask

    images = torch.cat([load_image(x, 256)[0] for x in refs])
    ref_masks = torch.cat([load_mask(m, 256) for m in masks])
    feats = cores["native"].features(load_image(target, 256)[0])[0]
    out = {k: c.segment_patches(c.encode_reference(images, ref_masks), feats) for k, c in cores.items()}
    assert out["native"].any() and torch.equal(out["native"], out["reference"])


@pytest.mark.parametrize("box", [(0, 64, 0, 64), (3, 5, 7, 9), (10, 11, 20, 21), (0, 128, 60, 61)])
def test_pipeline_downsampling_equals_the_oracle(box):
    """Bilinear, then nearest, then the centroid cell: the pipeline's step 4 is the published one."""
    from insid3_fast import pipeline
    from insid3_fast.testing import published

    mask = torch.zeros(128, 128, dtype=torch.bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    got = pipeline.downsample_mask(mask, 8, 8)
    assert got.any() and torch.equal(got, published.downsample_mask(mask, 8, 8))


def test_an_encoded_reference_holds_one_representation():
    """The debiased keys and prototype, not also the original features (no step reads them)."""
    model = _model()
    refs, masks, _, _ = make_episode(5, 2)
    ref = model.encode_reference(refs, masks)
    assert not hasattr(ref, "features")
    assert ref.shots == 2 and ref.embed_dim == 32 and ref.keys.shape == (2, 64, 24)
    assert ref.prototype.shape == (24,)


@pytest.mark.parametrize("n,c", [(64, 16), (1024, 256)])
def test_aggregation_of_a_feature_map_view_equals_the_contiguous_rows(n, c):
    """The pipeline passes the (N, C) view of the (C, N) map; the column-wise sums must not change a bit."""
    from insid3_fast import pipeline

    g = torch.Generator().manual_seed(n)
    fmap = torch.nn.functional.normalize(torch.randn(c, n, generator=g), dim=0)
    labels = torch.randint(0, n // 8, (n,), generator=g)
    labels[0] = 0
    queries = torch.nn.functional.normalize(torch.randn(n, c // 2, generator=g), dim=1)
    prototype = torch.nn.functional.normalize(torch.randn(c // 2, generator=g), dim=0)
    sim = queries @ prototype
    candidates = sim > 0
    view = fmap.T
    assert not view.is_contiguous()
    got = pipeline.aggregate_clusters(labels, candidates, queries, view, sim, prototype, 0.01)
    expected = pipeline.aggregate_clusters(labels, candidates, queries, view.contiguous(), sim, prototype, 0.01)
    assert got.any() and torch.equal(got, expected)


def test_the_core_checks_its_mask_count_and_out_sizes():
    """Its own API (not the drop-in): one mask per reference image, one out size per target
    (a mask too many was kept in the reference; a list of sizes too long was ignored)."""
    model = _model()
    core = model.core
    images = torch.randn(2, 3, core.image_size, core.image_size)
    masks = torch.zeros(3, core.image_size, core.image_size, dtype=torch.bool)
    masks[:, 4:40, 4:40] = True
    with pytest.raises(InputError, match="one mask per image"):
        core.encode_reference(images, masks)
    ref = core.encode_reference(images, masks[:2])
    with pytest.raises(InputError, match="one size"):
        core.segment(ref, images, [(50, 60)])
    assert [m.shape for m in core.segment(ref, images, [(50, 60), None])] == [(50, 60), (core.image_size,) * 2]


@pytest.mark.parametrize("call,pattern", [
    (lambda core, ref: core.segment(ref, torch.zeros(1, 3, 64, 64)), r"at the model size, \(B, 3, 128, 128\)"),
    (lambda core, ref: core.segment(ref, torch.zeros(3, 128, 128)), r"\(B, 3, H, W\) tensor"),
    (lambda core, ref: core.segment(ref, None), "needs the images or their features"),
    (lambda core, ref: core.segment(ref, torch.zeros(1, 3, 128, 128), [(0, 5)]), "height must be >= 1"),
    (lambda core, ref: core.segment(ref, torch.zeros(1, 3, 128, 128), [64]), r"\(height, width\) or None"),
    (lambda core, ref: core.reconfigure(taux=0.5), "unknown option.*taux.*Insid3Config"),
])
def test_the_cores_bad_calls_are_input_errors(call, pattern):
    """A user's mistakes with the core's own API are InputErrors saying what to pass (they
    failed deep in torch: a reshape, an unpacking, interpolate, a dataclass TypeError)."""
    core = _model().core
    images = torch.randn(1, 3, core.image_size, core.image_size)
    masks = torch.zeros(1, core.image_size, core.image_size, dtype=torch.bool)
    masks[:, 4:40, 4:40] = True
    with pytest.raises(InputError, match=pattern):
        call(core, core.encode_reference(images, masks))


def test_a_reference_with_masks_at_another_size_is_accepted_on_the_same_patch_grid():
    """encode_reference takes masks of any size (downsampled to the grid as published): the
    reference fits every model with that patch grid (it was refused by its masks' size)."""
    model = _model()
    core = model.core
    images = torch.randn(1, 3, core.image_size, core.image_size)
    masks = torch.zeros(1, 120, 150, dtype=torch.uint8)
    masks[:, 30:90, 40:120] = 255
    ref = core.encode_reference(images, masks)
    assert len(model.segment_targets(ref, [images[0]])) == 1
