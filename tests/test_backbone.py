"""insid3_fast.backbone: checkpoint layouts, size inference, RoPE periods, errors (tiny CPU models)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoints import (
    TINY_KWARGS,
    meta_to_hf_state_dict,
    random_timm_model,
    timm_to_meta_state_dict,
    write_hf_checkpoint,
    write_meta_checkpoint,
)

from insid3_fast.backbone import (
    MODEL_SIZES,
    build_dinov3,
    dinov3_rope_periods,
    infer_model_size,
    load_dinov3,
    load_meta_state,
    weights_fingerprint,
)
from insid3_fast import INSID3
from insid3_fast.errors import InputError, WeightsError

# Meta's released checkpoints store these periods (head dim 64, base 100, bf16-rounded).
META_PERIODS_64 = [
    1.0, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5,
    10.0, 13.3125, 17.75, 23.75, 31.625, 42.25, 56.25, 75.0,
]


def _image(height: int = 32, width: int = 48, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(7))


def _features(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]


@pytest.fixture(scope="module", params=["small", "small_plus"])
def tiny(request, tmp_path_factory):
    """A tiny model of a GELU-MLP and a SwiGLU family: (size, Meta state dict, .pth path)."""
    size = request.param
    model = random_timm_model(size, seed=3, **TINY_KWARGS)
    meta = timm_to_meta_state_dict(model, seed=3)
    path = tmp_path_factory.mktemp(size) / "dinov3_tiny.pth"
    torch.save(meta, path)
    return size, meta, path


def _timm_reference(size: str, meta: dict) -> torch.nn.Module:
    """timm's own conversion of a Meta file, with the file's periods copied in."""
    from timm.models.eva import checkpoint_filter_fn

    ref = build_dinov3(size, **TINY_KWARGS).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(meta), ref), strict=True)
    ref.rope.periods.copy_(meta["rope_embed.periods"])
    return ref


# --------------------------------------------------------------------------- loading


def test_meta_layout_matches_timm_converter(tiny):
    size, meta, path = tiny
    backbone = load_dinov3(path)
    x = _image()
    ref = _timm_reference(size, meta)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    out = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (2, TINY_KWARGS["embed_dim"], 2, 3)
    assert torch.equal(out[0], expected)
    assert backbone.model_size == size


def test_hf_folder_matches_meta_layout(tiny, tmp_path):
    _, meta, path = tiny
    folder = write_hf_checkpoint(tmp_path / "hf", meta, num_heads=TINY_KWARGS["num_heads"])
    x = _image()
    assert torch.equal(_features(load_dinov3(folder), x), _features(load_dinov3(path), x))


def test_hf_single_safetensors_file(tiny, tmp_path):
    _, meta, path = tiny
    folder = write_hf_checkpoint(tmp_path / "hf", meta, num_heads=TINY_KWARGS["num_heads"])
    x = _image()
    loaded = load_dinov3(folder / "model.safetensors")  # config.json beside it gives the heads
    assert torch.equal(_features(loaded, x), _features(load_dinov3(path), x))


def test_hf_sharded_folder(tiny, tmp_path):
    from safetensors.torch import save_file

    _, meta, path = tiny
    hf = meta_to_hf_state_dict(meta)
    keys = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: hf[k].contiguous() for k in names}, str(tmp_path / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": TINY_KWARGS["num_heads"]}))
    x = _image()
    assert torch.equal(_features(load_dinov3(tmp_path), x), _features(load_dinov3(path), x))


def test_hf_file_without_config_uses_default_head_dim(tmp_path):
    from safetensors.torch import save_file

    kwargs = {"depth": 1, "embed_dim": 128, "num_heads": 2}  # head dim 64, the default
    meta = timm_to_meta_state_dict(random_timm_model("small", seed=1, **kwargs))
    torch.save(meta, tmp_path / "meta.pth")
    save_file({k: v.contiguous() for k, v in meta_to_hf_state_dict(meta).items()}, str(tmp_path / "w.safetensors"))
    x = _image()
    expected = _features(load_dinov3(tmp_path / "meta.pth"), x)
    assert torch.equal(_features(load_dinov3(tmp_path / "w.safetensors"), x), expected)


def test_key_bias_follows_bias_mask(tiny, tmp_path):
    size, meta, path = tiny
    x = _image()
    masked = _features(load_dinov3(path), x)  # the helper writes a random key bias, masked out
    unmasked = {k: v for k, v in meta.items() if not k.endswith("bias_mask")}
    torch.save(unmasked, tmp_path / "unmasked.pth")
    ref = _timm_reference(size, meta)
    with torch.no_grad():
        for i, block in enumerate(ref.blocks):
            block.attn.k_bias.copy_(meta[f"blocks.{i}.attn.qkv.bias"].chunk(3)[1])
        expected = ref.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    features = _features(load_dinov3(tmp_path / "unmasked.pth"), x)
    assert torch.equal(features, expected)
    assert not torch.allclose(features, masked)  # RoPE makes the key bias matter


@pytest.mark.parametrize("wrap", [
    lambda meta: {"model": {f"module.backbone.{k}": v for k, v in meta.items()} | {"module.head.w": torch.ones(2)}},
    lambda meta: {"state_dict": {f"_orig_mod.{k}": v for k, v in meta.items()}},
    lambda meta: {"teacher": {f"backbone.{k}": v for k, v in meta.items()} | {"dino_head.w": torch.ones(2)}},
], ids=["ddp-training", "torch-compile", "dino-teacher"])
def test_wrapped_checkpoints_unwrap_to_the_backbone(tiny, tmp_path, wrap):
    """Containers, DDP/torch.compile prefixes (timm's clean_state_dict) and training heads."""
    _, meta, path = tiny
    torch.save(wrap(meta), tmp_path / "wrapped.pth")
    x = _image()
    assert torch.equal(_features(load_dinov3(tmp_path / "wrapped.pth"), x), _features(load_dinov3(path), x))


def test_pickled_backbone_keeps_its_pinned_periods(tiny):
    """The lazily built RoPE class pickles by the package's name and comes back the same class."""
    import pickle

    _, meta, path = tiny
    backbone = load_dinov3(path)
    copy = pickle.loads(pickle.dumps(backbone))
    assert type(copy.model.rope) is type(backbone.model.rope)
    x = _image()
    assert torch.equal(_features(copy, x), _features(backbone, x))
    copy.to(torch.bfloat16)  # a cast recomputes the periods: still the file's
    assert torch.equal(copy.model.rope.periods.float(), meta["rope_embed.periods"])


def _grid_builds(monkeypatch) -> list:
    """Records every coordinate grid timm's RoPE builds (on the CPU, then copied to the periods' device)."""
    from timm.layers import pos_embed_sincos

    calls = []
    build = pos_embed_sincos._build_grid

    def spy(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("feat_shape"))
        return build(*args, **kwargs)

    monkeypatch.setattr(pos_embed_sincos, "_build_grid", spy)
    return calls


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "random"])
def test_rope_embedding_is_built_once_per_shape(tiny, monkeypatch, loaded):
    """timm built the RoPE embedding from a CPU grid in every pass: on a GPU a pageable copy and
    a host wait per pass, which also fails inside a CUDA-graph capture. A no-grad pass now
    reuses it per grid shape, bit for bit timm's (the pass with gradients takes timm's path)."""
    from insid3_fast.backbone import DinoV3Backbone

    size, _, path = tiny
    backbone = load_dinov3(path) if loaded else DinoV3Backbone(build_dinov3(size, **TINY_KWARGS).eval(), size)
    calls = _grid_builds(monkeypatch)
    x, y = _image(), _image(48, 64)
    first = _features(backbone, x)
    assert torch.equal(_features(backbone, x), first) and len(calls) == 1
    _features(backbone, y)
    _features(backbone, y)
    assert len(calls) == 2 and len(backbone.model.rope.cached_tensors()) == 2
    with torch.enable_grad():
        timms = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
    assert len(calls) == 3 and torch.equal(timms.detach(), first)


def test_compiled_backbone_graphs_hold_no_rope_grid():
    """Under torch.compile timm's host-side grid was traced into the backbone's graph, and
    inductor makes no CUDA graph of a graph with host ops (compile="reduce-overhead"): the
    cached lookup runs eagerly between the compiled graphs, whose features are the eager ones."""
    from insid3_fast.backbone import DinoV3Backbone

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    backbone = DinoV3Backbone(build_dinov3("small", **TINY_KWARGS).eval(), "small")
    compiled = torch.compile(backbone, backend=recording, dynamic=False)
    x = _image(64, 64, batch=1)
    with torch.no_grad():
        out = compiled(x)
        assert torch.equal(compiled(x), out) and torch.equal(backbone(x), out)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("linear" in t for t in targets)  # the blocks were compiled
    assert not any("meshgrid" in t or "arange" in t for t in targets), targets


def test_rope_embedding_cache_follows_casts_and_copies(tiny, monkeypatch):
    import copy
    import pickle

    _, _, path = tiny
    backbone = load_dinov3(path)
    x = _image()
    _features(backbone, x)
    rope = backbone.model.rope
    assert len(rope.cached_tensors()) == 1
    assert pickle.loads(pickle.dumps(backbone)).model.rope.cached_tensors() == ()
    assert copy.deepcopy(backbone).model.rope.cached_tensors() == ()
    backbone.to(torch.bfloat16)  # computed again where the (float32) periods are
    assert rope.cached_tensors() == ()
    assert torch.equal(_features(backbone, x), _features(load_dinov3(path, dtype=torch.bfloat16), x))
    assert rope.cached_tensors()[0].dtype == rope.periods.dtype == torch.float32
    rope._init_buffers()  # new periods: new embeddings
    assert rope.cached_tensors() == ()

    def timms(shape):
        with torch.enable_grad():
            return rope.get_embed(shape)

    with torch.no_grad():
        before = rope.get_embed((2, 3))
        rope.periods.mul_(2)  # new values in place: the embedding of the new ones
        assert torch.equal(rope.get_embed((2, 3)), timms((2, 3))) and not torch.equal(before, timms((2, 3)))
        rope.periods = rope.periods / 2  # another tensor
        assert torch.equal(rope.get_embed((2, 3)), before)
        for h in range(1, 12):  # the least recently used shapes go
            rope.get_embed((h, 3))
    assert len(rope.cached_tensors()) == 8


def test_loaded_model_is_frozen_and_in_eval(tiny):
    backbone = load_dinov3(tiny[2])
    assert not backbone.training and not backbone.model.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_intermediate_layers_options(tiny):
    backbone = load_dinov3(tiny[2])
    x = _image()
    with torch.no_grad():
        two = backbone.get_intermediate_layers(x, n=2, reshape=False, norm=False)
        listed = backbone.get_intermediate_layers(x, n=[0, 1], reshape=False, norm=False)
        last = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
    assert len(two) == 2 and two[0].shape == (2, 6, TINY_KWARGS["embed_dim"])
    assert all(torch.equal(a, b) for a, b in zip(two, listed))
    assert torch.equal(backbone(x), last)
    normed = backbone.model.norm(two[1]).reshape(2, 2, 3, -1).permute(0, 3, 1, 2)
    assert torch.equal(normed, last)


def test_write_meta_checkpoint_reduced_depth_loads_without_size(tmp_path):
    path = write_meta_checkpoint(tmp_path / "tiny.pth", model_size="small", depth=1)
    backbone = load_dinov3(path)
    assert backbone.model_size == "small"
    assert backbone.n_blocks == 1 and backbone.embed_dim == 384 and backbone.num_heads == 6
    default = load_dinov3(write_meta_checkpoint(tmp_path / "default.pth"))
    assert default.n_blocks == TINY_KWARGS["depth"] and default.embed_dim == TINY_KWARGS["embed_dim"]


# --------------------------------------------------------------------------- RoPE periods


def test_rope_periods_equal_metas_stored_values():
    assert dinov3_rope_periods(64).tolist() == META_PERIODS_64
    assert dinov3_rope_periods(64).dtype == torch.float32
    assert dinov3_rope_periods(128).shape == (32,)


def test_loaded_periods_are_the_files(tiny):
    _, meta, path = tiny
    backbone = load_dinov3(path)
    assert torch.equal(backbone.model.rope.periods, meta["rope_embed.periods"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_cast_keeps_periods(tiny, dtype):
    _, meta, path = tiny
    stored = meta["rope_embed.periods"]
    backbone = load_dinov3(path, dtype=dtype)
    assert backbone.model.patch_embed.proj.weight.dtype == dtype
    assert torch.equal(backbone.model.rope.periods.float(), stored)
    backbone.float()
    assert torch.equal(backbone.model.rope.periods, stored)
    backbone.to(torch.bfloat16)
    assert torch.equal(backbone.model.rope.periods.float(), stored)


def test_timm_bound_is_one_requirement_and_admits_the_installed_timm():
    """pyproject.toml requires the timm releases the RoPE pinning was checked against."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    from insid3_fast.backbone.model import TIMM_REQUIREMENT

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = [r for r in meta["project"]["dependencies"] if Requirement(r).name == "timm"]
    assert declared == [TIMM_REQUIREMENT]
    requirement = Requirement(TIMM_REQUIREMENT)
    assert requirement.specifier.contains(version("timm")), (
        f"timm {version('timm')} is outside {TIMM_REQUIREMENT}: run tests/test_backbone.py on it, then "
        "raise the bound in pyproject.toml and insid3_fast/backbone/model.py")


def test_timm_without_the_rope_hooks_says_which_timm_to_install(monkeypatch):
    from timm.layers import pos_embed_sincos

    from insid3_fast.backbone import model
    from insid3_fast.errors import BackendError

    class OldRope(torch.nn.Module):  # a timm release from before _init_buffers
        def _compute_periods(self):
            return torch.ones(1)

    monkeypatch.setattr(pos_embed_sincos, "RotaryEmbeddingDinoV3", OldRope)
    # The uncached function: the cached class stays the one every loaded model has.
    with pytest.raises(BackendError, match=r"lacks RotaryEmbeddingDinoV3\._init_buffers.*pip install 'timm>="):
        model.pinned_rope_class.__wrapped__()


def test_bf16_model_runs_on_float_input(tiny):
    backbone = load_dinov3(tiny[2], dtype=torch.bfloat16)
    out = _features(backbone, _image())
    assert out.dtype == torch.bfloat16 and out.shape == (2, TINY_KWARGS["embed_dim"], 2, 3)


# --------------------------------------------------------------------------- size inference


def _shape_only_meta(embed_dim: int, hidden: int, swiglu: bool, head_dim: int = 64, depth: int = 2) -> dict:
    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    state = {
        "cls_token": empty(1, 1, embed_dim),
        "storage_tokens": empty(1, 4, embed_dim),
        "patch_embed.proj.weight": empty(embed_dim, 3, 16, 16),
        "rope_embed.periods": empty(head_dim // 4),
    }
    for i in range(depth):
        if swiglu:
            state[f"blocks.{i}.mlp.w1.weight"] = empty(hidden, embed_dim)
        else:
            state[f"blocks.{i}.mlp.fc1.weight"] = empty(hidden, embed_dim)
    return state


@pytest.mark.parametrize(
    "embed_dim, hidden, swiglu, head_dim, expected",
    [
        (384, 1536, False, 64, "small"),
        (384, 1536, True, 64, "small_plus"),
        (768, 3072, False, 64, "base"),
        (1024, 4096, False, 64, "large"),
        (1280, 5120, True, 64, "huge_plus"),
        (4096, 8192, True, 128, "7b"),
        (64, 256, False, 32, "small"),
        (64, 256, True, 32, "small_plus"),
    ],
)
def test_infer_model_size(embed_dim, hidden, swiglu, head_dim, expected):
    assert infer_model_size(_shape_only_meta(embed_dim, hidden, swiglu, head_dim)) == expected


def test_infer_model_size_hf_layout(tiny):
    size, meta, _ = tiny
    assert infer_model_size(meta_to_hf_state_dict(meta)) == size


def test_infer_model_size_unsupported_architecture():
    with pytest.raises(WeightsError, match="Supported") as info:
        infer_model_size(_shape_only_meta(1024, 4096, True))  # ViT-L+ (SwiGLU)
    assert all(size in str(info.value) for size in MODEL_SIZES)


def test_model_sizes_name_timm_models():
    import timm

    assert set(MODEL_SIZES) == {"small", "small_plus", "base", "large", "huge_plus", "7b"}
    assert all(name in timm.list_models() for name in MODEL_SIZES.values())


# --------------------------------------------------------------------------- errors


def test_explicit_matching_size_loads(tiny):
    size, _, path = tiny
    assert load_dinov3(path, model_size=size).model_size == size


def test_size_mismatch_raises(tiny):
    size, _, path = tiny
    other = "small" if size == "small_plus" else "small_plus"
    with pytest.raises(WeightsError, match=f"model_size='{other}' does not match"):
        load_dinov3(path, model_size=other)


def test_size_mismatch_standard_width_raises(tmp_path):
    path = write_meta_checkpoint(tmp_path / "s.pth", model_size="small", depth=1)
    with pytest.raises(WeightsError, match="holds a DINOv3 'small'"):
        load_dinov3(path, model_size="base")


def test_unknown_model_size_raises(tiny):
    with pytest.raises(WeightsError, match="Supported"):
        load_dinov3(tiny[2], model_size="giant")
    with pytest.raises(WeightsError, match="Supported"):
        build_dinov3("giant")


def test_missing_file_raises(tmp_path):
    with pytest.raises(WeightsError) as info:
        load_dinov3(tmp_path / "nope.pth")
    message = str(info.value)
    for needle in ("github.com/facebookresearch/dinov3", "request access", "pretrain/", "--weights"):
        assert needle in message


def test_truncated_pth_raises(tiny, tmp_path):
    data = tiny[2].read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt.*Re-download"):
        load_dinov3(bad)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 10])
def test_garbage_pth_raises(tmp_path, content):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match="Re-download"):
        load_dinov3(bad)


def test_truncated_safetensors_raises(tiny, tmp_path):
    folder = write_hf_checkpoint(tmp_path / "hf", tiny[1], num_heads=TINY_KWARGS["num_heads"])
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="Re-download"):
        load_dinov3(folder)


def test_folder_without_weights_raises(tmp_path):
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_dinov3(tmp_path)


def test_unknown_layout_raises(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="Unknown DINOv3 architecture.*Supported"):
        load_dinov3(path)


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    meta = dict(tiny[1])
    del meta["blocks.1.norm1.weight"]
    meta["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pth"
    torch.save(meta, path)
    with pytest.raises(WeightsError) as info:
        load_dinov3(path)
    message = str(info.value)
    assert "missing keys: blocks.1.norm1.weight" in message
    assert "unexpected keys: blocks.0.extra.weight" in message


def test_shape_mismatch_raises(tiny, tmp_path):
    meta = dict(tiny[1])
    meta["blocks.0.norm2.bias"] = torch.zeros(TINY_KWARGS["embed_dim"] + 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(meta, path)
    with pytest.raises(WeightsError, match="shapes do not match.*blocks.0.norm2.bias"):
        load_dinov3(path)


@pytest.mark.parametrize("height, width", [(30, 48), (32, 40)])
def test_input_not_multiple_of_16_is_read_as_meta_s_patch_embedding_reads_it(tiny, height, width):
    """Meta's stride-16 patch convolution never reads the last H % 16 rows and W % 16 columns
    (the published code runs on such sizes); timm's refused them: the wrapper crops them."""
    backbone = load_dinov3(tiny[2])
    image = _image(height, width)
    got = backbone.get_intermediate_layers(image)[0]
    cropped = image[..., : height - height % 16, : width - width % 16]
    assert got.shape[-2:] == (height // 16, width // 16)
    assert torch.equal(got, backbone.get_intermediate_layers(cropped)[0])
    with pytest.raises(InputError, match="smaller than one 16 px patch"):
        backbone.get_intermediate_layers(_image(8, 48))


# --------------------------------------------------------------------------- fingerprint


def test_weights_fingerprint(tiny, tmp_path):
    path = tiny[2]
    key = weights_fingerprint(path)
    assert key == weights_fingerprint(str(path)) and len(key) == 32
    other = write_meta_checkpoint(tmp_path / "other.pth", seed=5)
    assert weights_fingerprint(other) != key
    folder = write_hf_checkpoint(tmp_path / "hf", tiny[1], num_heads=TINY_KWARGS["num_heads"])
    assert weights_fingerprint(folder) == weights_fingerprint(folder)
    with pytest.raises(WeightsError):
        weights_fingerprint(tmp_path / "missing.pth")


def test_weights_fingerprint_sees_tail_changes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(3 << 20))
    before = weights_fingerprint(path)
    data = bytearray(path.read_bytes())
    data[-1] = 1
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only content differs
    assert weights_fingerprint(path) != before


def test_loaded_backbone_fingerprint_follows_its_weights(tiny, tmp_path):
    size, meta, path = tiny
    backbone = load_dinov3(path)
    key = backbone.weights_fingerprint
    assert key == f"{weights_fingerprint(path)}|torch.float32"
    assert load_dinov3(path).weights_fingerprint == key  # stable: the same file, the same key
    other = load_dinov3(write_meta_checkpoint(tmp_path / "other.pth", model_size=size, seed=11, **TINY_KWARGS))
    backbone.load_state_dict(other.state_dict())  # other weights, loaded in place
    assert backbone.weights_fingerprint is None
    backbone.weights_fingerprint = "marked"
    assert backbone.weights_fingerprint == "marked|torch.float32"
    with torch.no_grad():
        next(backbone.parameters()).mul_(2)  # modified in place
    assert backbone.weights_fingerprint is None
    fresh = load_dinov3(path)
    fresh.model.patch_embed.proj.weight = torch.nn.Parameter(fresh.model.patch_embed.proj.weight.clone())
    assert fresh.weights_fingerprint is None  # a parameter replaced
    assert load_dinov3(path, dtype=torch.bfloat16).weights_fingerprint == f"{weights_fingerprint(path)}|torch.bfloat16"


def test_weights_loaded_in_place_never_get_the_cached_basis_of_the_file(tiny, tmp_path):
    """The positional-basis disk cache keys on the backbone's fingerprint: after other weights are
    loaded into it, a model built on it estimates their basis instead of reading the file's."""
    size, meta, path = tiny
    cache = tmp_path / "cache"
    options = dict(image_size=64, svd_components=8, device="cpu", cache_dir=str(cache))
    backbone = load_dinov3(path)
    INSID3(backbone, **options)  # writes the file's basis into the cache
    assert any(cache.rglob("*")), "the first model should have written the cache"
    other_path = write_meta_checkpoint(tmp_path / "other.pth", model_size=size, seed=11, **TINY_KWARGS)
    load_meta_state(backbone, torch.load(other_path, weights_only=True))
    expected = INSID3(load_dinov3(other_path), **{**options, "cache_dir": str(tmp_path / "none")}).core.basis
    assert torch.equal(INSID3(backbone, **options).core.basis, expected)


def test_fingerprint_follows_casts_copies_and_inference_mode(tiny, tmp_path):
    """A cast or move keeps the key (its dtype named); a copy has none and pickles; a replaced
    tensor is not kept alive by the mark; loading inside torch.inference_mode works (its tensors
    keep no version counter: reading one raised)."""
    import copy
    import gc
    import pickle
    import weakref

    size, meta, path = tiny
    key = weights_fingerprint(path)
    backbone = load_dinov3(path)
    backbone.to(torch.float64)
    assert backbone.weights_fingerprint == f"{key}|torch.float64"
    backbone.to(torch.float32)
    assert backbone.weights_fingerprint == f"{key}|torch.float32"
    assert copy.deepcopy(backbone).weights_fingerprint is None
    assert pickle.loads(pickle.dumps(backbone)).weights_fingerprint is None
    assert backbone.weights_fingerprint == f"{key}|torch.float32"  # the original keeps it
    old = weakref.ref(backbone.model.patch_embed.proj.weight)
    backbone.model.patch_embed.proj.weight = torch.nn.Parameter(torch.zeros_like(old()))
    gc.collect()
    assert old() is None and backbone.weights_fingerprint is None
    with torch.inference_mode():
        loaded = load_dinov3(path)
        assert loaded.weights_fingerprint == f"{key}|torch.float32"
        INSID3(loaded, image_size=64, svd_components=8, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert loaded.weights_fingerprint == f"{key}|torch.float32"
