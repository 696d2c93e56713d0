"""Malformed and hostile checkpoints end as one WeightsError, before anything large is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from checkpoints import TINY_KWARGS, random_timm_model, timm_to_meta_state_dict, write_hf_checkpoint
from insid3_fast.backbone import load_dinov3
from insid3_fast.errors import WeightsError


@pytest.fixture(scope="module")
def meta():
    return timm_to_meta_state_dict(random_timm_model("small", seed=1, **TINY_KWARGS), seed=1)


def _save(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_tiny_checkpoint_still_loads(meta, tmp_path):
    backbone = load_dinov3(_save(tmp_path, meta, "ok.pth"))
    assert backbone.embed_dim == TINY_KWARGS["embed_dim"] and backbone.n_blocks == TINY_KWARGS["depth"]


@pytest.mark.parametrize("case", ["scalar_cls", "vector_periods2d", "int_weight", "storage_1d", "mlp_1d"])
def test_malformed_tensors_raise_weights_error(meta, tmp_path, case):
    state = dict(meta)
    if case == "scalar_cls":
        state["cls_token"] = torch.tensor(1.0)
    elif case == "vector_periods2d":
        state["rope_embed.periods"] = state["rope_embed.periods"][None]
    elif case == "int_weight":
        state["blocks.0.attn.proj.weight"] = state["blocks.0.attn.proj.weight"].long()
    elif case == "storage_1d":
        state["storage_tokens"] = torch.zeros(TINY_KWARGS["embed_dim"])
    elif case == "mlp_1d":
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(5)
    with pytest.raises(WeightsError):
        load_dinov3(_save(tmp_path, state))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(meta, tmp_path, value):
    """A NaN weight ran on into the positional basis's SVD: 'linalg.svd: failed to converge'."""
    state = dict(meta)
    weight = state["blocks.0.attn.proj.weight"].clone()
    weight[0, 0] = value
    state["blocks.0.attn.proj.weight"] = weight
    with pytest.raises(WeightsError, match="'blocks.0.attn.proj.weight' holds NaN or infinite values"):
        load_dinov3(_save(tmp_path, state))


def test_text_file_named_pth(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are my notes, not weights\n" * 20)
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_dinov3(path)


@pytest.mark.parametrize("periods", [0.0, float("nan"), float("inf"), -1.0])
def test_non_positive_or_non_finite_rope_periods(meta, tmp_path, periods):
    state = dict(meta)
    state["rope_embed.periods"] = torch.full_like(meta["rope_embed.periods"], periods)
    with pytest.raises(WeightsError, match="RoPE periods"):
        load_dinov3(_save(tmp_path, state))


def _load_under_memory_limit(path, limit_gib: int = 6) -> str:
    """load_dinov3(path) in a subprocess whose address space is capped; its WeightsError line."""
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({limit_gib} << 30, {limit_gib} << 30))
        from insid3_fast.backbone import load_dinov3
        from insid3_fast.errors import WeightsError
        try:
            load_dinov3({str(path)!r})
        except WeightsError as exc:
            print("WeightsError:", exc)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "WeightsError: " in out.stdout, out.stderr[-2000:]
    return out.stdout


def test_block_index_far_beyond_the_others_is_refused_before_building(meta, tmp_path):
    state = dict(meta)
    state["blocks.10000000.norm1.weight"] = torch.zeros(TINY_KWARGS["embed_dim"])
    assert "blocks.10000000" in _load_under_memory_limit(_save(tmp_path, state))


def test_wide_cls_token_is_refused_before_any_allocation(meta, tmp_path):
    state = dict(meta)
    state["cls_token"] = torch.zeros(1, 1, 65536)  # the model would need 51.5 GB
    assert "65536" in _load_under_memory_limit(_save(tmp_path, state))


def test_stride_zero_view_of_a_tiny_storage_is_refused(meta, tmp_path):
    state = dict(meta)
    C = TINY_KWARGS["embed_dim"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(1).expand(3 * C, C)
    with pytest.raises(WeightsError, match="view of only"):
        load_dinov3(_save(tmp_path, state))


def test_executable_pickle_is_refused_with_a_plain_message(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = _save(tmp_path, {"cls_token": Payload()})
    with pytest.raises(WeightsError) as info:
        load_dinov3(path)
    message = str(info.value)
    assert "executable pickle content" in message and "system" in message
    assert "truncated or corrupt" not in message and "\n" not in message


@pytest.fixture()
def hf_folder(meta, tmp_path):
    return write_hf_checkpoint(tmp_path / "hf", meta, num_heads=TINY_KWARGS["num_heads"])


def test_hf_folder_still_loads(hf_folder):
    assert load_dinov3(hf_folder).embed_dim == TINY_KWARGS["embed_dim"]


@pytest.mark.parametrize("config, needle", [
    ([1, 2, 3], "not an object"),
    ({"num_attention_heads": "abc"}, "num_attention_heads"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": 3}, "num_attention_heads"),  # does not divide 64
    ({"num_attention_heads": 2, "rope_theta": 0}, "rope_theta"),
    ({"num_attention_heads": 2, "rope_theta": "100"}, "rope_theta"),
])
def test_malformed_hf_config(hf_folder, config, needle):
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=needle):
        load_dinov3(hf_folder)


def test_hf_config_not_utf8(hf_folder):
    (hf_folder / "config.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_dinov3(hf_folder)


def test_hf_index_pointing_outside_the_folder_is_refused(hf_folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    (hf_folder / "model.safetensors").rename(outside)
    (hf_folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"embeddings.cls_token": "../outside.safetensors"}}))
    with pytest.raises(WeightsError, match="outside"):
        load_dinov3(hf_folder)


@pytest.mark.parametrize("index", ['{"weight_map": [1]}', '{"weight_map": {"a": 5}}', "[]"])
def test_malformed_hf_index(hf_folder, index):
    (hf_folder / "model.safetensors").rename(hf_folder / "shard.safetensors")
    (hf_folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError):
        load_dinov3(hf_folder)


def test_cli_prints_one_line_for_a_malformed_config(hf_folder, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("INSID3_CACHE", str(tmp_path / "cache"))
    (hf_folder / "config.json").write_text(json.dumps({"num_attention_heads": "abc"}))
    examples = Path(__file__).resolve().parent.parent / "examples"
    out = subprocess.run(
        [sys.executable, "-m", "insid3_fast.cli", "segment", "--ref-image", str(examples / "ref_cat_image.jpg"),
         "--ref-mask", str(examples / "ref_cat_mask.png"), "--target", str(examples / "target_cat_image.jpg"),
         "--output", str(tmp_path / "m.png"), "--weights", str(hf_folder), "--image-size", "64",
         "--device", "cpu", "--svd-components", "8"],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "num_attention_heads" in out.stderr, out.stderr
