"""Issue 12: one model shared by several Python threads.

The stateless calls give the single-threaded masks; the stateful set_reference/segment
sequence is the model's, as in the published class: any thread may continue it, with a warning.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from insid3_fast import INSID3, ops
from insid3_fast.errors import InputError, InputWarning
from insid3_fast.inputs import load_image
from insid3_fast.synthetic import SyntheticEncoder, make_episode

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(not ops.native_available(),
                                                                          reason="native ops not built"))]


def run_threads(fns):
    """Run each fn in its own thread, started together; re-raise the first failure."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def body(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("emulated", marks=BACKENDS[1].marks)])
def test_stateless_calls_from_threads_give_the_single_threaded_masks(backend):
    """"emulated": the native GPU code path, its kernels (csrc/cuda) run by the CUDA emulation."""
    if backend == "emulated":
        from backends import emulation

        with ops.use_library(emulation()):  # process-wide: the threads below use it too
            _stateless_calls_from_threads("native")
    else:
        _stateless_calls_from_threads(backend)


def _stateless_calls_from_threads(backend: str) -> None:
    model = INSID3(SyntheticEncoder(32, seed=4), image_size=256, svd_components=16, device="cpu", backend=backend)
    # Each thread: its own reference (episodes of different concepts) and its own targets.
    jobs = []
    for j in range(4):
        refs, masks, target, _ = make_episode(200 + j, 1 + j % 2)
        extra = [make_episode(300 + 10 * j + k, 1)[2] for k in range(2)]
        jobs.append((refs, masks, [target] + extra))

    def work(refs, masks, targets):
        ref = model.encode_reference(refs, masks)
        return [m.clone() for m in model.segment_targets(ref, targets, batch_size=2)]

    expected = [work(*job) for job in jobs]
    for _ in range(2):
        got = run_threads([lambda job=job: work(*job) for job in jobs])
        for exp, out in zip(expected, got):
            assert all(torch.equal(a, b) for a, b in zip(exp, out))
    assert any(m.any() for masks in expected for m in masks)


def _model(encoder=None):
    return INSID3(encoder or SyntheticEncoder(32, seed=4), image_size=128, svd_components=16, device="cpu")


def test_a_sequence_may_hop_threads_as_in_the_published_class():
    """set_reference in one thread, set_target in another, segment() in a third (a web
    handler's thread pool): the published class gives the mask, so does ours, with one warning."""
    refs, masks, target, _ = make_episode(1, 1)
    alone = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # one thread: no warning
        alone.set_reference(refs[0], masks[0])
        alone.set_target(target)
        expected = alone.segment()
    model = _model()
    with pytest.warns(InputWarning, match="another thread") as caught:
        run_threads([lambda: model.set_reference(refs[0], masks[0])])
        run_threads([lambda: model.set_target(target)])
        got = model.segment()
    assert torch.equal(got, expected)
    assert sum("another thread" in str(w.message) for w in caught) == 1  # once per sequence
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # the sequence ended: a new one starts clean
        run_threads([lambda: model.set_reference(refs[0], masks[0])])
        model.reset_state()


def test_a_thread_whose_id_is_reused_is_another_thread():
    """Thread ids are reused once a thread ends: a new thread that continues a dead thread's
    pending references (here after its failed set_target) is still told so."""
    refs, masks, _, _ = make_episode(1, 1)
    model = _model()

    def failed_request():
        model.set_reference(refs[0], masks[0])
        with pytest.raises(InputError):
            model.set_target("/no/such/upload.png")

    run_threads([failed_request])
    with pytest.warns(InputWarning, match="another thread"):
        run_threads([lambda: model.set_reference(refs[0], masks[0])])
    assert len(model._ref_images) == 2  # kept, as the published class keeps them


class GatedEncoder(SyntheticEncoder):
    """Blocks inside the backbone pass while ``hold`` is set, so a segment() is in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def get_intermediate_layers(self, *args, **kwargs):
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(60)
        return super().get_intermediate_layers(*args, **kwargs)


def test_a_call_during_another_threads_segment_does_not_change_it():
    """A set_target while another thread's segment() runs: that segment keeps the target and
    size it started with, and, as in the published class, clears the state when it returns."""
    encoder = GatedEncoder(32, seed=4)
    model = _model(encoder)
    refs_a, masks_a, target_a, _ = make_episode(1, 1, size_hw=(200, 260))
    refs_b, masks_b, target_b, _ = make_episode(2, 1, size_hw=(120, 90))
    out = {}

    def sequence():
        model.set_reference(refs_a[0], masks_a[0])
        model.set_target(target_a)
        encoder.hold.set()
        out["mask"] = model.segment()

    worker = threading.Thread(target=sequence)
    worker.start()
    try:
        assert encoder.entered.wait(60)
        with pytest.warns(InputWarning, match="another thread"):
            model.set_target(target_b)
    finally:
        encoder.hold.clear()
        encoder.release.set()
        worker.join(60)
    assert out["mask"].shape == (200, 260)
    alone = _model()
    alone.set_reference(refs_a[0], masks_a[0])
    alone.set_target(target_a)
    assert torch.equal(out["mask"], alone.segment())
    with pytest.raises(RuntimeError, match="requires"):
        model.segment()



def test_reset_state_from_another_thread_discards_the_sequence():
    model = INSID3(SyntheticEncoder(16), image_size=64, svd_components=4, device="cpu")
    refs, masks, target, _ = make_episode(1, 1)
    model.set_reference(refs[0], masks[0])
    run_threads([model.reset_state])
    assert model._ref_images == []

    def fresh_sequence():
        with warnings.catch_warnings():
            warnings.simplefilter("error", InputWarning)  # nothing pending: not another thread's sequence
            model.set_target(target)

    run_threads([fresh_sequence])
    model.reset_state()


def test_a_model_with_a_pending_sequence_pickles_and_copies():
    """torch.save and deepcopy of a model between set_reference and segment (its thread is held
    by a weak reference, which pickles cannot hold): the copy goes on with the sequence."""
    import copy
    import io

    model = _model()
    refs, masks, target, _ = make_episode(1, 1)
    model.set_reference(refs[0], masks[0])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", InputWarning)  # a copy is no thread hop
            twin.set_target(target)
        assert twin.segment().shape == (target.height, target.width)
    model.set_target(target)
    assert model.segment().shape == (target.height, target.width)


def test_emulated_voting_from_threads_keeps_the_bf16_reduction_setting():
    """The bf16 voting GEMM must not reduce in bf16, which cuBLAS decides from a process-wide
    flag: the GEMM writes float32 scores (no bf16 partial sums whatever the flag says) instead of
    disallowing the flag for its duration, whose per-call save/restore lost the caller's setting
    in 6 of 40 rounds of 4 threads. Every call's votes are the CPU op's. Also: the emulation runs
    blocks for several host threads at once (it aborted with "cannot map a fiber stack" before
    its workers unmapped their stacks)."""
    from backends import Backend

    emu = Backend("emu")
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(1, 64, 16, generator=g), dim=1)
    km, act = torch.rand(1, 64, generator=g) > 0.5, torch.ones(64, dtype=torch.bool)
    want = torch.ops.insid3_fast.nn_vote(q, k, km, act)
    try:
        for setting in (True, False, True):
            matmul.allow_bf16_reduced_precision_reduction = setting
            for _ in range(15):
                for got in run_threads([lambda: emu.raw.nn_vote(q, k, km, act)] * 4):
                    assert all(torch.equal(a, b) for a, b in zip(got, want))
                assert matmul.allow_bf16_reduced_precision_reduction is setting
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved


# ---- a positional basis replaced while other calls run (set_basis, load_state_dict) ----------


def _basis_model(seed: int = 4) -> INSID3:
    return INSID3(SyntheticEncoder(32, seed=seed), image_size=128, svd_components=16, device="cpu")


def _other_basis(seed: int = 5) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(seed))).Q


def test_a_reference_encoded_across_a_set_basis_is_refused(monkeypatch):
    """Another thread's set_basis lands while encode_reference computes (simulated by doing it
    inside the pipeline call): the reference holds old-basis keys, so it must carry the old
    version (it was tagged with the new one and accepted for good)."""
    from insid3_fast import pipeline

    model = _basis_model()
    refs, masks, target, _ = make_episode(7, 1)
    encode = pipeline.encode_reference

    def racing(*args, **kwargs):
        out = encode(*args, **kwargs)
        model.positional_basis = _other_basis()
        return out

    monkeypatch.setattr(pipeline, "encode_reference", racing)
    ref = model.encode_reference(refs, masks)
    monkeypatch.setattr(pipeline, "encode_reference", encode)
    with pytest.raises(InputError, match="before the positional basis was replaced"):
        model.segment_targets(ref, [target])
    model.segment_targets(model.encode_reference(refs, masks), [target])  # a fresh one is accepted


def test_a_stream_refuses_the_targets_after_a_set_basis():
    """stream() checked the reference once: targets after a set_basis of another thread were
    segmented with the new basis against the old keys, silently."""
    model = _basis_model()
    refs, masks, target, _ = make_episode(7, 1)
    targets = [make_episode(20 + k, 1)[2] for k in range(3)]
    stream = model.stream(model.encode_reference(refs, masks), targets, batch_size=1, prefetch=0)
    next(stream)
    model.positional_basis = _other_basis()
    with pytest.raises(InputError, match="before the positional basis was replaced"):
        next(stream)


def test_load_state_dict_with_another_basis_refuses_old_references():
    """Loading another model's state (its basis into the same buffers) left references encoded
    before accepted, their keys in the old coordinates; loading the same basis keeps them."""
    from test_capture import ReplayRunner

    model, other = _basis_model(4), _basis_model(9)
    refs, masks, target, _ = make_episode(7, 1)
    ref = model.encode_reference(refs, masks)
    model.load_state_dict(model.state_dict())  # the same basis: nothing to refuse
    expected = model.segment_targets(ref, [target])[0]
    captured = model.core.capture(ref, runner=ReplayRunner())
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.core.basis, other.core.basis)
    with pytest.raises(InputError, match="before the positional basis was replaced"):
        model.segment_targets(ref, [target])
    with pytest.raises(InputError, match="positional basis was replaced after this call was captured"):
        captured(torch.zeros(1, 3, 128, 128))
    model.load_state_dict(_basis_model(4).state_dict())  # back to the first basis: a new version still
    again = model.encode_reference(refs, masks)
    assert torch.equal(model.segment_targets(again, [target])[0], expected)


def test_stream_resizes_device_tensors_on_the_callers_thread(monkeypatch):
    """stream() loads images in a background thread; device tensors must be read on the caller's
    thread (its CUDA stream wrote them; a loader thread reads on its own stream, unordered with
    those writes). A "meta" tensor stands in for a device tensor here."""
    import insid3_fast.model as model_module

    model = _basis_model()
    refs, masks, target, _ = make_episode(7, 1)
    ref = model.encode_reference(refs, masks)
    real, threads = model_module.load_image, []

    def recording(image, *args, **kwargs):
        threads.append((isinstance(image, torch.Tensor) and image.is_meta, threading.current_thread()))
        return real(torch.zeros(3, 64, 64) if isinstance(image, torch.Tensor) and image.is_meta else image,
                    *args, **kwargs)

    monkeypatch.setattr(model_module, "load_image", recording)
    targets = [target, torch.empty(3, 64, 64, device="meta"), target]
    assert len(list(model.stream(ref, targets, batch_size=1, prefetch=2))) == 3
    assert sorted(meta for meta, _ in threads) == [False, False, True]
    assert all(meta == (t is threading.main_thread()) for meta, t in threads)


def test_load_state_dict_counts_a_new_complement_and_takes_meta_and_assign():
    """The version counts a changed complement even with the same basis (the references' keys are
    complement coordinates), and loading meta tensors with assign=True neither raises in the hook
    (torch.equal on meta tensors raised there) nor keeps the version."""
    model = _basis_model()
    state = model.state_dict()
    version = model.core.basis_version
    state["core.complement"] = -state["core.complement"]
    model.load_state_dict(state)
    assert model.core.basis_version == version + 1
    meta = {k: v.to("meta") if k.startswith("core.") else v for k, v in _basis_model(9).state_dict().items()}
    model.load_state_dict(meta, assign=True)
    assert model.core.basis_version == version + 2


def _racing(model, hook: str, **options):
    """Wrap the core's ``hook`` (its backbone pass or its clustering) so that its first call ends
    with ``reconfigure(**options)``, as another thread's would land mid-call."""
    inner = getattr(model.core, hook)
    fired = []

    def racing(*args, **kwargs):
        out = inner(*args, **kwargs)
        if not fired:
            fired.append(True)
            model.core.reconfigure(**options)
        return out

    setattr(model.core, hook, racing)
    return lambda: setattr(model.core, hook, inner)


@pytest.mark.parametrize("hook", ["_backbone", "_segment_patches"])
def test_a_reconfigure_during_a_call_applies_from_the_next_call(hook):
    """Another thread's reconfigure() landing mid-call (simulated inside the backbone pass or the
    first target's clustering) changed the options of what came after it in the same call: the
    later targets' thresholds, a target's refiner and output size, an episode's clustering. A
    call keeps the options it started with; the next call has the new ones."""
    model = INSID3(SyntheticEncoder(32, seed=4), image_size=256, svd_components=16, device="cpu",
                   backend="reference")
    refs, masks, _, _ = make_episode(7, 1)
    targets = [make_episode(20 + k, 1)[2] for k in range(2)]
    ref = model.encode_reference(refs, masks)
    expect = model.segment_targets(ref, targets)
    assert all(m.any() for m in expect) and expect[0].shape == (200, 260)
    ref_images = torch.cat([load_image(r, 256)[0] for r in refs])
    ref_masks = torch.stack([torch.from_numpy(m) for m in masks])
    target = load_image(targets[0], 256)[0]
    episode = model.predict_mask(ref_images, ref_masks, target)
    assert episode.any()
    # +inf merge threshold: empty masks; the CRF and no resizing: other masks, other sizes
    change = dict(merge_threshold=float("inf"), mask_refiner="crf", resize_to_orig_size=False)
    restore = _racing(model, hook, **change)
    got = model.segment_targets(ref, targets)
    restore()
    assert all(torch.equal(a, b) for a, b in zip(got, expect))
    assert model.merge_threshold == float("inf") and model.mask_refiner == "crf"
    assert not any(m.any() for m in model.segment_targets(ref, targets))
    model.core.reconfigure(merge_threshold=0.2, mask_refiner="bilinear", resize_to_orig_size=True)
    restore = _racing(model, hook, **change)
    assert torch.equal(model.predict_mask(ref_images, ref_masks, target), episode)
    restore()
    if hook == "_backbone":  # a reference: its keys come from the options it started with
        model.core.reconfigure(merge_threshold=0.2, mask_refiner="bilinear", resize_to_orig_size=True)
        restore = _racing(model, hook, matmul_precision="bf16x6")
        raced = model.encode_reference(refs, masks)
        restore()
        assert torch.equal(raced.keys, ref.keys)
        assert not torch.equal(model.encode_reference(refs, masks).keys, ref.keys)
