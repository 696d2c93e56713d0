"""The whole pipeline on the emulated CUDA kernels (``-k emu``): the GPU path's masks equal the
CPU path's, and the post-backbone steps make no host synchronisation while "captured"
(synchronisations as ``cuda_emu.syncs`` sees them: ATen's syncing calls and Python's copies to
the host).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from backends import emulation
from cuda_emu import build
from cuda_emu.syncs import sync_calls
from insid3_fast import INSID3, ops, pipeline
from insid3_fast.synthetic import SyntheticEncoder, make_episode, segment_episode


def _model(**kw) -> INSID3:
    return INSID3(SyntheticEncoder(embed_dim=64), backend="native", image_size=512, svd_components=32, **kw)


@pytest.mark.parametrize("shots", [1, 3])
def test_emu_pipeline_512px_masks_equal_cpu(shots):
    """512 px (N = 1024 patches) end to end on the emulated kernels = the CPU kernels' masks."""
    library = emulation()
    episode = make_episode(seed=40 + shots, shots=shots)
    expected = segment_episode(_model(), *episode[:3])
    start = time.process_time()
    with ops.use_library(library):
        got = segment_episode(_model(), *episode[:3])
    print(f"emulated 512 px pipeline, {shots} shot(s): {time.process_time() - start:.1f} s CPU")
    assert expected.any()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("connectivity", [None, 4])
def test_emu_post_backbone_path_has_no_host_sync_when_captured(connectivity):
    library = emulation()
    model = _model(connectivity=connectivity)
    refs, masks, target, _ = make_episode(seed=7, shots=2)
    core = model.core
    ref = model.encode_reference(refs, masks)
    image, _ = __import__("insid3_fast.inputs", fromlist=["load_image"]).load_image(target, core.image_size)
    feats = core.features(image[None] if image.dim() == 3 else image)[0]
    with ops.use_library(library):
        launches = build.launch_count()
        with build.capturing():
            captured = sync_calls(lambda: core.segment_patches(ref, feats))
        per_target = build.launch_count() - launches
        eager = sync_calls(lambda: core.segment_patches(ref, feats))
    assert captured == [], f"host synchronisations in the captured post-backbone path: {captured}"
    # Outside a capture the launchers validate their input on the host: one read per op
    # (clustering, voting, aggregation's label range).
    assert len(eager) <= 3, eager
    assert per_target > 0


@pytest.mark.parametrize("op", ["average_linkage", "average_linkage_precomputed"])
def test_emu_dense_clustering_peak_memory(op):
    """At most 8 N^2 + O(N C) bytes: the double matrix (the Gram row blocks are written into its
    own storage), the normalised features, O(N) state."""
    from backends import Backend, peak_bytes

    backend = Backend("emu")
    n, c = 1024, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    arg = x if op == "average_linkage" else (1 - (x @ x.T).clamp(-1, 1)).contiguous()
    peak = peak_bytes(lambda: getattr(backend.raw, op)(arg, 0.5))
    bound = 8 * n * n + 16 * n * c + 64 * n
    print(f"{op}: peak {peak / 2**20:.2f} MiB, 8 N^2 = {8 * n * n / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB")
    assert 8 * n * n <= peak <= bound


@pytest.mark.parametrize("encoder", ["synthetic", "dinov3-small"])
def test_emu_captured_call_replays_without_host_sync_and_gives_the_cpu_masks(encoder):
    """``Insid3Core.capture`` on the emulated kernels, the graph replaced by a runner that
    records under capture and replays the recorded function under capture: no host
    synchronisation from the image to the mask (the backbone included: the synthetic encoder
    and a random-weight DINOv3 ViT-S/16, the real architecture), and the CPU kernels' masks."""
    from insid3_fast.backbone import DinoV3Backbone, build_dinov3
    from insid3_fast.inputs import load_image

    class CapturingRunner:
        def capture(self, fn):
            self.fn = fn
            with build.capturing():
                self.out = fn()
            return self.out

        def replay(self):
            with build.capturing():
                self.out.copy_(self.fn())

    library = emulation()
    if encoder == "synthetic":
        model = _model()
    else:
        torch.manual_seed(0)
        vit = DinoV3Backbone(build_dinov3("small").eval(), "small")
        model = INSID3(vit, backend="native", image_size=128, svd_components=64)
    core = model.core
    refs, masks, target, _ = make_episode(seed=8, shots=2)
    image = load_image(target, core.image_size)[0]
    ref = model.encode_reference(refs, masks)
    expected = core.segment(ref, image)[0]
    with ops.use_library(library):
        captured = core.capture(ref, runner=CapturingRunner())
        launches = build.launch_count()
        syncs = sync_calls(lambda: captured(image))
        per_replay = build.launch_count() - launches
        got = captured(image)
    assert syncs == [], f"host synchronisations in a captured replay: {syncs}"
    assert per_replay > 0
    assert torch.equal(got[0], expected)
    assert expected.any() or encoder != "synthetic"  # random DINOv3 features need not match


@pytest.mark.parametrize("connectivity", [None, 4])
def test_emu_post_backbone_path_compiles_whole(connectivity):
    """``compile=`` covers the post-backbone steps: on the GPU path (here the emulated kernels)
    they trace as one graph, no graph break (the ops' fake kernels give the shapes), and the
    compiled function gives the eager mask."""
    library = emulation()
    model = _model(connectivity=connectivity)
    core = model.core
    refs, masks, target, _ = make_episode(seed=9, shots=2)
    ref = model.encode_reference(refs, masks)
    image = __import__("insid3_fast.inputs", fromlist=["load_image"]).load_image(target, core.image_size)[0]
    feats = core.features(image)[0]
    c = core.config
    args = (ref, feats, core.complement)
    kw = dict(tau=c.tau, merge_threshold=c.merge_threshold, connectivity=connectivity, kernels="native")
    with ops.use_library(library):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(pipeline.segment_patches)(*args, **kw)
        eager = pipeline.segment_patches(*args, **kw)
        torch._dynamo.reset()
        compiled = torch.compile(pipeline.segment_patches, backend="aot_eager", fullgraph=True, dynamic=False)
        got = compiled(*args, **kw)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert eager.any() and torch.equal(got, eager)
