"""The drop-in INSID3 API and the stateless core: backends agree, caching, batching, streaming."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from insid3_fast import INSID3, ops
from insid3_fast.errors import BackendError, InputError, InputWarning
from insid3_fast.synthetic import SyntheticEncoder, make_episode, segment_episode
from insid3_fast.testing.oracle import oracle_segment

needs_native = pytest.mark.skipif(not ops.native_available(), reason="native ops not built")


def reference_and_native(encoder, episode, **kw):
    """The published restatement's mask (the oracle) and the native path's, on one episode.

    The pipeline on the reference kernels must give the oracle's mask too (asserted here).
    """
    refs, masks, target, _ = episode
    model = INSID3(encoder, backend="reference", **kw)
    expected = oracle_segment(model, refs, masks, target).cpu().numpy()
    on_reference_kernels = segment_episode(model, refs, masks, target)
    assert np.array_equal(expected, on_reference_kernels), f"{(expected != on_reference_kernels).sum()} pixels differ"
    return expected, segment_episode(INSID3(encoder, backend="native", **kw), refs, masks, target)


def test_native_ops_are_built_in_ci():
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI, where the extension must build")
    assert ops.native_available(), ops.load_error()


@needs_native
@pytest.mark.parametrize("size,dim,shots,seed", [
    (256, 32, 1, 0), (256, 64, 1, 1), (384, 64, 2, 2), (512, 128, 3, 3), (512, 64, 5, 4),
    (512, 256, 1, 5), (768, 64, 2, 6), (1024, 64, 1, 7),
])
def test_native_masks_equal_reference(size, dim, shots, seed):
    expected, got = reference_and_native(SyntheticEncoder(dim, seed=seed), make_episode(seed, shots),
                                         image_size=size, svd_components=dim // 2, device="cpu")
    assert np.array_equal(expected, got), f"{(expected != got).sum()} pixels differ"


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_native_masks_equal_reference_whatever_the_thread_count(threads):
    # The CPU op overlaps the clustering with the voting when it has two threads or more.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # both paths: the positional SVD (LAPACK) depends on it
    try:
        expected, got = reference_and_native(SyntheticEncoder(64, seed=8), make_episode(8, 2),
                                             image_size=512, svd_components=32, device="cpu")
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(expected, got), f"{(expected != got).sum()} pixels differ"


@needs_native
@pytest.mark.parametrize("connectivity", [4, 8])
def test_native_grid_masks_equal_reference(connectivity):
    expected, got = reference_and_native(SyntheticEncoder(32, seed=3), make_episode(3, 2), image_size=256,
                                         svd_components=16, device="cpu", connectivity=connectivity)
    assert np.array_equal(expected, got)


def test_synthetic_episodes_are_segmented_well():
    """The synthetic benchmark does real work: the reference path recovers the concept."""
    encoder = SyntheticEncoder(64)
    model = INSID3(encoder, image_size=512, svd_components=32, device="cpu", backend="reference")
    ious = []
    for seed in range(3):
        refs, masks, target, truth = make_episode(seed, 1)
        pred = segment_episode(model, refs, masks, target)
        ious.append((pred & truth).sum() / (pred | truth).sum())
    assert np.mean(ious) > 0.6, ious


def test_tensor_and_file_inputs_agree(tmp_path):
    encoder = SyntheticEncoder(32)
    refs, masks, target, _ = make_episode(11, 1)
    model = INSID3(encoder, image_size=256, svd_components=16, device="cpu")
    paths = []
    for i, (image, mask) in enumerate(zip(refs, masks)):
        image.save(tmp_path / f"r{i}.png")
        from PIL import Image
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"m{i}.png")
        paths.append((tmp_path / f"r{i}.png", tmp_path / f"m{i}.png"))
    target.save(tmp_path / "t.png")
    from_files = segment_episode(model, [p for p, _ in paths], [m for _, m in paths], tmp_path / "t.png")
    from_objects = segment_episode(model, refs, masks, target)
    assert np.array_equal(from_files, from_objects)
    assert from_files.shape == (target.height, target.width)


def test_resize_to_orig_size_off_gives_model_size():
    encoder = SyntheticEncoder(32)
    refs, masks, target, _ = make_episode(1, 1)
    model = INSID3(encoder, image_size=256, svd_components=16, device="cpu", resize_to_orig_size=False)
    assert segment_episode(model, refs, masks, target).shape == (256, 256)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
def test_batched_and_streamed_targets_equal_one_by_one(backend):
    encoder = SyntheticEncoder(32, seed=2)
    refs, masks, _, _ = make_episode(5, 2)
    targets = [make_episode(100 + i, 1)[2] for i in range(5)]
    model = INSID3(encoder, image_size=256, svd_components=16, device="cpu", backend=backend)
    one_by_one = [segment_episode(model, refs, masks, t) for t in targets]
    ref = model.encode_reference(refs, masks)
    batched = [m.numpy() for m in model.segment_targets(ref, targets, batch_size=3)]
    streamed = [m.numpy() for m in model.stream(ref, iter(targets), batch_size=2)]
    for a, b, c in zip(one_by_one, batched, streamed):
        assert np.array_equal(a, b) and np.array_equal(a, c)


class CountingEncoder(SyntheticEncoder):
    calls = 0

    def get_intermediate_layers(self, *args, **kwargs):
        CountingEncoder.calls += 1
        return super().get_intermediate_layers(*args, **kwargs)


def test_positional_basis_cached_on_disk(tmp_path):
    enc = CountingEncoder(32)
    first = INSID3(enc, image_size=128, svd_components=8, device="cpu", cache_key="w1", cache_dir=str(tmp_path))
    assert CountingEncoder.calls == 1
    second = INSID3(enc, image_size=128, svd_components=8, device="cpu", cache_key="w1", cache_dir=str(tmp_path))
    assert CountingEncoder.calls == 1  # no backbone pass, no SVD
    assert torch.equal(first.positional_basis, second.positional_basis)
    INSID3(enc, image_size=160, svd_components=8, device="cpu", cache_key="w1", cache_dir=str(tmp_path))
    INSID3(enc, image_size=128, svd_components=8, device="cpu", cache_key="w2", cache_dir=str(tmp_path))
    assert CountingEncoder.calls == 3  # keyed by size and weights
    assert not list(tmp_path.glob("*.tmp"))


def test_state_errors_and_reset():
    model = INSID3(SyntheticEncoder(16), image_size=128, svd_components=8, device="cpu")
    with pytest.raises(RuntimeError, match="requires"):
        model.segment()
    refs, masks, target, _ = make_episode(0, 1)
    model.set_reference(refs[0])  # no mask: matching only
    model.set_target(target)
    with pytest.raises(RuntimeError, match="mask"):
        model.segment()
    with pytest.raises(RuntimeError):
        model.segment()  # the state stays after a failed call (as published): the mask is still missing


def test_bad_configuration():
    enc = SyntheticEncoder(16)
    with pytest.raises(InputError, match="at least one 16 px patch"):
        INSID3(enc, image_size=8, device="cpu")
    for refiner in ("nope", None):  # the published code upsamples bilinearly for anything but 'crf'
        with pytest.warns(InputWarning, match="mask_refiner"):
            assert INSID3(enc, image_size=128, svd_components=8, mask_refiner=refiner,
                          device="cpu").mask_refiner == "bilinear"
    with pytest.raises(InputError, match="connectivity"):
        INSID3(enc, image_size=128, connectivity=6, device="cpu")
    with pytest.warns(InputWarning, match="not smaller than the embedding size"):
        assert INSID3(enc, image_size=128, svd_components=16, device="cpu").svd_components == 8
    if not ops.native_available():
        with pytest.raises(BackendError, match="reference"):
            INSID3(enc, image_size=128, backend="native", device="cpu")


def test_match_keypoints_identity():
    """Matching an image with itself returns (about) the same keypoints."""
    encoder = SyntheticEncoder(64, pos_weight=0.0)
    refs, _, _, _ = make_episode(4, 1, size_hw=(256, 256))
    model = INSID3(encoder, image_size=256, svd_components=8, device="cpu")
    kps = torch.tensor([[60.0, 70.0], [200.0, 180.0], [128.0, 30.0]])
    model.set_reference(refs[0])
    model.set_target(refs[0])
    pred = model.match(kps, use_debiased=False)
    assert pred.shape == (3, 2)
    assert (pred - kps).abs().max() < 16  # within one patch


def test_crf_refiner_refines_the_bilinear_mask():
    from insid3_fast.crf import crf_refine
    from insid3_fast.inputs import denormalize, load_image

    encoder = SyntheticEncoder(32)
    refs, masks, target, truth = make_episode(0, 1)
    kw = dict(image_size=256, svd_components=16, device="cpu", resize_to_orig_size=False)
    plain = segment_episode(INSID3(encoder, **kw), refs, masks, target)
    refined = segment_episode(INSID3(encoder, mask_refiner="crf", **kw), refs, masks, target)
    image = load_image(target, 256)[0]
    expected = crf_refine(denormalize(image[0]), torch.from_numpy(plain)).numpy()
    assert np.array_equal(refined, expected)
    assert not np.array_equal(refined, plain)


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_masks():
    encoder = SyntheticEncoder(32)
    refs, masks, target, _ = make_episode(0, 1)
    kw = dict(image_size=128, svd_components=16, device="cpu")
    eager = segment_episode(INSID3(encoder, **kw), refs, masks, target)
    compiled = segment_episode(INSID3(encoder, compile=True, **kw), refs, masks, target)
    assert np.array_equal(eager, compiled)


def test_bf16_backbone_runs_and_keeps_float32_features():
    encoder = SyntheticEncoder(32)
    model = INSID3(encoder, image_size=128, svd_components=16, device="cpu", precision="bf16")
    feats = model.core.features(torch.zeros(1, 3, 128, 128))
    assert feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(1, 8, 8), atol=1e-5)
    with pytest.raises(InputError, match="precision"):
        INSID3(encoder, image_size=128, svd_components=16, device="cpu", precision="fp16")


def test_cache_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    model = INSID3(SyntheticEncoder(16), image_size=64, svd_components=4, device="cpu",
                   cache_key="k", cache_dir=str(tmp_path))
    assert model.positional_basis.shape == (16, 4)
    assert list(tmp_path.iterdir()) == []


def test_loaded_backbone_keys_the_disk_cache(tmp_path):
    from checkpoints import write_meta_checkpoint

    from insid3_fast import load_dinov3

    path = write_meta_checkpoint(tmp_path / "w.pth")
    encoder = load_dinov3(str(path))
    INSID3(encoder, image_size=64, svd_components=8, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("posbasis-*.pt"))) == 1


def test_match_uses_the_first_reference_and_rejects_no_keypoints():
    encoder = SyntheticEncoder(32)
    first, _, _, _ = make_episode(0, 1, size_hw=(200, 260))
    second, _, target, _ = make_episode(1, 1, size_hw=(120, 90))
    kps = torch.tensor([[100.0, 50.0]])
    model = INSID3(encoder, image_size=128, svd_components=8, device="cpu")
    model.set_reference(first[0])
    model.set_target(target)
    alone = model.match(kps)
    model.set_reference(first[0])
    model.set_reference(second[0])
    model.set_target(target)
    assert torch.equal(model.match(kps), alone)
    model.set_reference(first[0])
    model.set_target(target)
    with pytest.raises(InputError, match="non-empty"):
        model.match(torch.zeros(0, 2))


def test_stream_accepts_tensor_targets():
    from torchvision.transforms import functional as TF

    encoder = SyntheticEncoder(32)
    refs, masks, _, _ = make_episode(2, 1)
    targets = [make_episode(50 + i, 1)[2] for i in range(3)]
    tensors = [TF.normalize(TF.to_tensor(t), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for t in targets]
    model = INSID3(encoder, image_size=128, svd_components=8, device="cpu")
    ref = model.encode_reference(refs, masks)
    out = list(model.stream(ref, tensors, batch_size=2))
    assert [m.shape for m in out] == [(t.height, t.width) for t in targets]


class CorruptPacket(OSError):
    pass


@pytest.mark.parametrize("good,batch_size,prefetch", [(10, 4, 2), (23, 8, 2), (23, 8, 0), (3, 4, 1), (0, 2, 2)])
def test_stream_yields_every_frame_read_before_the_source_fails(good, batch_size, prefetch):
    """A source that raises (a video reader at a corrupt packet): the masks of every frame it gave
    come out first, in order, whatever the prefetch, then its own exception with its traceback."""
    encoder = SyntheticEncoder(32)
    refs, masks, _, _ = make_episode(2, 1)
    frames = [np.array(make_episode(60 + i % 5, 1)[2]) for i in range(good)]
    model = INSID3(encoder, image_size=128, svd_components=8, device="cpu")
    ref = model.encode_reference(refs, masks)
    error = CorruptPacket("decoder: corrupt packet")

    def video():
        yield from frames
        raise error

    got = []
    with pytest.raises(CorruptPacket) as raised:
        for mask in model.stream(ref, video(), batch_size=batch_size, prefetch=prefetch):
            got.append(mask)
    assert raised.value is error
    assert raised.traceback[-1].name == "video"  # raised where the source raised it
    expected = model.segment_targets(ref, frames, batch_size=batch_size)
    assert len(got) == good and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_stream_copies_frames_of_a_reused_buffer(kind):
    """A decoder that writes each frame into one preallocated buffer: stream() copies the frame
    when it takes it, so each mask is its own frame's, as when the frames are passed one by one."""
    from torchvision.transforms import functional as TF

    encoder = SyntheticEncoder(32)
    refs, masks, _, _ = make_episode(2, 1)
    frames = [np.array(make_episode(60 + i, 1)[2]) for i in range(7)]
    if kind == "tensor":
        frames = [TF.normalize(TF.to_tensor(f), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for f in frames]
    model = INSID3(encoder, image_size=128, svd_components=8, device="cpu")
    ref = model.encode_reference(refs, masks)
    one_by_one = [model.segment_targets(ref, [f])[0] for f in frames]
    buffer = np.empty_like(frames[0]) if kind == "numpy" else torch.empty_like(frames[0])

    def reader():
        for frame in frames:
            buffer[...] = frame
            yield buffer

    got = list(model.stream(ref, reader(), batch_size=3, prefetch=2))
    assert len(got) == len(frames) and all(torch.equal(a, b) for a, b in zip(got, one_by_one))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not ops.native_available("cuda"),
                    reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("shots", [1, 3])
def test_cuda_native_masks_equal_cpu_reference(shots):
    """The whole GPU path (native ops, sync-free aggregation, stream pinning) against the CPU reference."""
    encoder = SyntheticEncoder(64, seed=shots)
    refs, masks, target, _ = make_episode(20 + shots, shots)
    kw = dict(image_size=512, svd_components=32)
    expected = segment_episode(INSID3(encoder, backend="reference", device="cpu", **kw), refs, masks, target)
    gpu = INSID3(encoder, backend="native", device="cuda", **kw)
    assert np.array_equal(expected, segment_episode(gpu, refs, masks, target))
    ref = gpu.encode_reference(refs, masks)
    streamed = [m.cpu().numpy() for m in gpu.stream(ref, [target, target], batch_size=2)]
    assert all(np.array_equal(expected, m) for m in streamed)
