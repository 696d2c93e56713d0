"""The captured per-target call (``Insid3Core.capture``, ``INSID3.capture``): fixed shapes, one
replay per call, the eager masks. On this machine the CUDA graph is replaced by a stand-in runner
that re-runs the recorded function on the same static buffers (``tests/test_emu_pipeline.py``
runs it on the emulated CUDA kernels, under capture, and counts host synchronisations)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from insid3_fast import INSID3
from insid3_fast.errors import InputError
from insid3_fast.inputs import load_image
from insid3_fast.synthetic import SyntheticEncoder, make_episode

SIZE = 128


class ReplayRunner:
    """Stands in for a CUDA graph: capture runs ``fn`` once and keeps its output as the static
    buffer; replay runs ``fn`` again and writes its result into that buffer."""

    def __init__(self) -> None:
        self.fn: Callable[[], torch.Tensor] | None = None
        self.out: torch.Tensor | None = None
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        assert self.fn is not None and self.out is not None
        self.out.copy_(self.fn())
        self.replays += 1


def _model(**kw) -> INSID3:
    return INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE, svd_components=8, device="cpu", **kw)


def _images(seed: int, count: int, size: int = SIZE) -> tuple[list[torch.Tensor], object]:
    """(1, 3, size, size) target tensors of episodes sharing the first one's reference."""
    episode = make_episode(seed, 1, size_hw=(96, 128))
    targets = [episode[2]] + [make_episode(seed + 1 + k, 1, size_hw=(96, 128))[2] for k in range(count - 1)]
    return [load_image(t, size)[0] for t in targets], episode


def test_captured_call_gives_the_eager_masks_for_every_target():
    model = _model()
    images, (refs, masks, _, _) = _images(11, 3)
    ref = model.encode_reference(refs, masks)
    runner = ReplayRunner()
    captured = model.core.capture(ref, runner=runner)
    outs = [captured(image) for image in images]
    assert runner.replays == 3
    for image, out in zip(images, outs):
        expected = model.core.segment(ref, image)[0]
        assert out.shape == (1, SIZE, SIZE) and out.dtype == torch.bool
        assert torch.equal(out[0], expected)
    assert outs[0].any()
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # the replays read the new images


def test_captured_batch_and_single_image_shapes():
    model = _model()
    images, (refs, masks, _, _) = _images(21, 2)
    ref = model.encode_reference(refs, masks)
    batch = torch.cat(images)
    two = model.core.capture(ref, batch=2, runner=ReplayRunner())
    got = two(batch)
    assert got.shape == (2, SIZE, SIZE)
    for b in range(2):
        assert torch.equal(got[b], model.core.segment(ref, images[b])[0])
    one = model.core.capture(ref, runner=ReplayRunner())
    assert torch.equal(one(images[1][0]), got[1])  # (3, size, size) in, (size, size) out
    resized = two(batch, out_size=(96, 128))
    assert resized.shape == (2, 96, 128)
    for b in range(2):
        assert torch.equal(resized[b], model.core.segment(ref, images[b], [(96, 128)])[0])
    with pytest.raises(InputError, match="out_size"):
        two(batch, out_size=(0, 128))
    with pytest.raises(InputError, match="captured for images of shape"):
        two(images[0])
    with pytest.raises(InputError, match="captured for images of shape"):
        one(torch.zeros(1, 3, SIZE // 2, SIZE // 2))
    with pytest.raises(InputError, match="float image tensor"):
        one(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))


def test_captured_output_is_a_copy_and_non_finite_targets_are_empty():
    model = _model()
    images, (refs, masks, _, _) = _images(31, 1)
    ref = model.encode_reference(refs, masks)
    captured = model.core.capture(ref, runner=ReplayRunner())
    first = captured(images[0])
    kept = first.clone()
    bad = images[0].clone()
    bad[0, :, 5, 7] = float("nan")
    second = captured(bad)
    assert kept.any() and torch.equal(first, kept)  # not overwritten by the next replay
    assert not second.any()
    assert torch.equal(captured(images[0]), kept)  # and the graph recovers for finite input
    model.tau = 0.5
    with pytest.raises(InputError, match="reconfigured after this call was captured"):
        captured(images[0])


def test_non_finite_targets_are_emptied_after_the_steps_and_moved_models_refused(monkeypatch):
    """The device-side guard itself: even where the steps would mark every patch, a target with
    non-finite features gets an empty mask; and a model cast after capture is refused."""
    model = _model()
    images, (refs, masks, _, _) = _images(61, 1)
    ref = model.encode_reference(refs, masks)
    monkeypatch.setattr(model.core, "segment_patches", lambda r, f, config=None: torch.ones(f.shape[1:], dtype=torch.bool))
    captured = model.core.capture(ref, runner=ReplayRunner())
    assert captured(images[0]).all()
    bad = images[0].clone()
    bad[0, 0, 0, 0] = float("inf")
    assert not captured(bad).any()
    model.core.encoder.to(torch.float64)  # the encoder alone: the buffers stay float32
    with pytest.raises(InputError, match="moved, cast or reloaded"):
        captured(images[0])
    model.core.encoder.to(torch.float32)
    again = model.core.capture(ref, runner=ReplayRunner())
    assert again(images[0]).all()
    model.to(torch.float64)
    with pytest.raises(InputError, match="moved, cast or reloaded"):
        again(images[0])
    reference = INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE, svd_components=8, device="cpu",
                       backend="reference")
    with pytest.raises(InputError, match="native kernels"):
        reference.core.capture(reference.encode_reference(refs, masks), runner=ReplayRunner())


def test_capture_refuses_crf_cpu_models_and_foreign_references():
    images, (refs, masks, _, _) = _images(41, 1)
    model = _model()
    ref = model.encode_reference(refs, masks)
    with pytest.raises(InputError, match="needs a CUDA model"):
        model.capture(ref)
    crf = _model(mask_refiner="crf")
    with pytest.raises(InputError, match="cannot run the CRF"):
        crf.core.capture(crf.encode_reference(refs, masks), runner=ReplayRunner())
    other = INSID3(SyntheticEncoder(32, seed=1), image_size=SIZE * 2, svd_components=8, device="cpu")
    with pytest.raises(InputError, match="image size"):
        other.core.capture(ref, runner=ReplayRunner())
    overhead = _model(compile="reduce-overhead")
    with pytest.raises(InputError, match="CUDA graphs of its own"):
        overhead.core.capture(overhead.encode_reference(refs, masks), runner=ReplayRunner())
    with pytest.raises(InputError, match="batch"):
        model.core.capture(ref, batch=0, runner=ReplayRunner())


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and __import__("insid3_fast").ops.native_available("cuda")),
                    reason="needs a CUDA device and insid3_fast._C built with CUDA kernels")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("encoder", ["synthetic", "dinov3"])
def test_real_cuda_graph_replays_give_the_eager_masks(batch, encoder):
    """On a GPU: the default runner records a real torch.cuda.CUDAGraph (a host sync or a
    host-to-device copy inside would fail the capture), and its replays give the eager CUDA
    path's masks; with the synthetic encoder and with a tiny random DINOv3 (timm's model)."""
    if encoder == "dinov3":
        from checkpoints import TINY_KWARGS

        from insid3_fast.backbone import DinoV3Backbone, build_dinov3

        torch.manual_seed(0)
        net = DinoV3Backbone(build_dinov3("small", **TINY_KWARGS).eval(), "small")
    else:
        net = SyntheticEncoder(64, seed=1)
    model = INSID3(net, image_size=256, svd_components=32, device="cuda")
    images, (refs, masks, _, _) = _images(51, batch + 1, size=256)
    ref = model.encode_reference(refs, masks)
    captured = model.capture(ref, batch_size=batch)
    for start in (0, 1):
        chunk = torch.cat(images[start:start + batch]).cuda()
        expected = torch.stack(model.core.segment(ref, chunk))
        assert torch.equal(captured(chunk), expected)


def test_captured_call_serves_threads_one_at_a_time():
    """The graph's input and output buffers are shared: calls from several threads must not
    interleave (they did, and returned each other's masks, with a replay slow enough to let the
    threads overlap)."""
    import threading
    import time

    class SlowReplayRunner(ReplayRunner):
        def replay(self):
            time.sleep(0.002)  # give the other thread the time to overwrite the input
            super().replay()

    model = _model()
    images, (refs, masks, _, _) = _images(71, 2)
    ref = model.encode_reference(refs, masks)
    expected = [model.core.segment(ref, images[k])[0] for k in range(2)]
    assert not torch.equal(expected[0], expected[1])
    captured = model.core.capture(ref, runner=SlowReplayRunner())
    wrong = [0, 0]

    def work(k):
        for _ in range(15):
            wrong[k] += not torch.equal(captured(images[k])[0], expected[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]
    with pytest.raises(InputError, match="batch_size must be"):
        model.capture(ref, batch_size=0)


def test_cuda_graph_runner_captures_thread_locally_one_at_a_time(monkeypatch):
    """CudaGraphRunner's use of torch.cuda, with torch.cuda stood in for (no GPU here): a capture
    in "global" mode fails on any other thread's host read or allocation (and fails that thread
    too), so it captures thread-locally; and two threads' captures never overlap."""
    import contextlib
    import threading
    import time

    from insid3_fast.capture import CudaGraphRunner

    seen, active, overlaps = [], [0], [0]
    lock = threading.Lock()

    class FakeStream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def fake_graph(graph, stream=None, capture_error_mode="global", **kwargs):
        seen.append(capture_error_mode)
        with lock:
            active[0] += 1
            overlaps[0] += active[0] > 1
        try:
            yield
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)

    def capture():
        def fn():
            time.sleep(0.02)
            return torch.zeros(1)

        CudaGraphRunner(torch.device("cuda"), warmup=1).capture(fn)

    threads = [threading.Thread(target=capture) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["thread_local"] * 4 and overlaps[0] == 0


class WarmingRunner(ReplayRunner):
    """CudaGraphRunner's order on the host: ``warmup`` eager runs, then the recorded one, inside
    which ``forbid`` (a context manager) stands for what a capture refuses."""

    def __init__(self, forbid: Callable, warmup: int = 2) -> None:
        super().__init__()
        self.forbid, self.warmup = forbid, warmup

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        for _ in range(self.warmup):
            fn()
        with self.forbid():
            return super().capture(fn)


def test_a_dinov3_target_is_captured_without_a_host_grid(monkeypatch):
    """timm's DINOv3 RoPE built its embedding from a CPU grid in every pass, a pageable copy to
    the GPU that a CUDA-graph capture refuses: captured with a real (random, tiny) DINOv3, the
    recorded pass builds none, and the call keeps the cached embedding the graph reads alive."""
    import contextlib

    from checkpoints import TINY_KWARGS
    from timm.layers import pos_embed_sincos

    from insid3_fast.backbone import DinoV3Backbone, build_dinov3

    build = pos_embed_sincos._build_grid
    capturing = []

    def grid(*args, **kwargs):
        assert not capturing, "a CPU coordinate grid was built inside the capture (a host-to-device copy)"
        return build(*args, **kwargs)

    @contextlib.contextmanager
    def forbid():
        capturing.append(True)
        try:
            yield
        finally:
            capturing.pop()

    monkeypatch.setattr(pos_embed_sincos, "_build_grid", grid)
    torch.manual_seed(0)
    encoder = DinoV3Backbone(build_dinov3("small", **TINY_KWARGS).eval(), "small")
    model = INSID3(encoder, image_size=SIZE, svd_components=8, device="cpu")
    images, (refs, masks, _, _) = _images(11, 2)
    ref = model.encode_reference(refs, masks)
    captured = model.core.capture(ref, runner=WarmingRunner(forbid))
    assert any(t is e for t in captured._alive for e in encoder.model.rope.cached_tensors())
    for image in images:
        assert torch.equal(captured(image)[0], model.core.segment(ref, image)[0])


def test_the_per_target_work_crosses_no_device(monkeypatch):
    """The whole per-target work (a tiny DINOv3's pass, the post-backbone steps with the native
    ops' fake kernels, the upsampling) on the meta device, a stand-in for a GPU: after the first
    pass no op mixes host and device tensors. On a GPU each such op is a host-to-device copy (a
    host wait, and an error inside a CUDA-graph capture), which the emulation, whose device is
    the host, cannot see."""
    import dataclasses

    from checkpoints import TINY_KWARGS
    from torch.utils._python_dispatch import TorchDispatchMode

    from insid3_fast import ops, pipeline
    from insid3_fast.backbone import DinoV3Backbone, build_dinov3

    if ops.load_error() is not None:
        pytest.skip("needs the native ops' fake kernels")

    class Crossings(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            if len({t.device.type for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}) > 1:
                self.ops.append(str(func))
            return out

    torch.manual_seed(0)
    encoder = DinoV3Backbone(build_dinov3("small", **TINY_KWARGS).eval(), "small")
    model = INSID3(encoder, image_size=SIZE, svd_components=8, device="cpu")
    _, (refs, masks, _, _) = _images(11, 1)
    ref = model.encode_reference(refs, masks)
    core = model.core.to("meta")
    ref = dataclasses.replace(ref, **{f.name: getattr(ref, f.name).to("meta") for f in dataclasses.fields(ref)
                                      if isinstance(getattr(ref, f.name), torch.Tensor)})
    images = torch.empty(1, 3, SIZE, SIZE, device="meta")
    core.features(images)  # the first pass computes the RoPE embedding
    with torch.no_grad(), Crossings() as seen:
        feats = core.features(images)
        for connectivity in (None, 4):
            for bf16x6 in (False, True):
                patch = pipeline.segment_patches(ref, feats[0], core.complement, tau=0.6, merge_threshold=0.2,
                                                 connectivity=connectivity, kernels="native", bf16x6=bf16x6)
                mask = core.finalize(patch, None, None)
    assert mask.device.type == "meta" and mask.shape == (SIZE, SIZE)
    assert seen.ops == []
