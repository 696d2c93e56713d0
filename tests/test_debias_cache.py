"""The positional-basis disk cache is used only when it is intact; anything else is recomputed once."""

from __future__ import annotations

import warnings

import pytest
import torch

from insid3_fast.debias import CACHE_FORMAT, _cache_path, positional_basis
from insid3_fast.synthetic import SyntheticEncoder

SIZE, RANK, KEY = 64, 8, "weights-abc"


@pytest.fixture()
def encoder():
    return SyntheticEncoder(embed_dim=32)


def _basis(encoder, cache_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        basis = positional_basis(encoder, SIZE, RANK, cache_key=KEY, cache_dir=cache_dir)
    return basis, [w for w in caught if "positional-basis cache" in str(w.message)]


def _entry_path(cache_dir):
    return _cache_path(cache_dir, KEY, SIZE, RANK, "constant")


def test_an_intact_entry_is_used_without_warning(encoder, tmp_path, monkeypatch):
    fresh, warned = _basis(encoder, tmp_path)
    assert not warned and _entry_path(tmp_path).is_file()
    import insid3_fast.debias as debias

    monkeypatch.setattr(debias, "compute_positional_basis", lambda *a, **k: pytest.fail("recomputed"))
    cached, warned = _basis(encoder, tmp_path)
    assert not warned and torch.equal(cached, fresh)


def _tamper(path, change):
    entry = torch.load(path, weights_only=True)
    change(entry)
    torch.save(entry, path)


def _other_orthonormal(entry):
    q, _ = torch.linalg.qr(torch.randn(entry["basis"].shape, dtype=torch.float64))
    entry["basis"] = q.float()


@pytest.mark.parametrize("change", [
    lambda e: e["basis"].__setitem__((0, 0), float("nan")),
    _other_orthonormal,
    lambda e: e.__setitem__("basis", e["basis"][:, :-1].contiguous()),
    lambda e: e.__setitem__("basis", e["basis"][:-1].contiguous()),
    lambda e: e.__setitem__("basis", e["basis"].double()),
    lambda e: e.__setitem__("basis", e["basis"] * 2),
    lambda e: e.__setitem__("format", CACHE_FORMAT + 1),
    lambda e: e.__setitem__("key", "other-weights|64|8|constant"),
    lambda e: e.pop("sha256"),
], ids=["nan", "other-orthonormal", "narrow", "short", "float64", "scaled", "format", "key", "no-checksum"])
def test_a_tampered_entry_is_recomputed_with_one_warning(encoder, tmp_path, change):
    fresh, _ = _basis(encoder, tmp_path)
    _tamper(_entry_path(tmp_path), change)
    again, warned = _basis(encoder, tmp_path)
    assert len(warned) == 1
    assert torch.equal(again, fresh)
    # The recomputed entry replaced the bad one: the next start uses it silently.
    _, warned = _basis(encoder, tmp_path)
    assert not warned


@pytest.mark.parametrize("payload", [b"", b"garbage", None])
def test_an_unreadable_or_foreign_entry_is_recomputed(encoder, tmp_path, payload):
    fresh, _ = _basis(encoder, tmp_path)
    path = _entry_path(tmp_path)
    if payload is None:
        torch.save(torch.eye(32)[:, :RANK].contiguous(), path)  # the old layout: a bare (orthonormal) tensor
    else:
        path.write_bytes(payload)
    again, warned = _basis(encoder, tmp_path)
    assert len(warned) == 1 and torch.equal(again, fresh)


def test_an_entry_with_fewer_columns_than_asked_is_used(encoder, tmp_path, monkeypatch):
    """A 64 px image has 16 patches, so the SVD gives at most 16 columns for a requested rank of
    24 (as in the published code): the entry was written with 16 and refused on every later start
    ("expected (32, 24)"), each time with a warning and a recomputation."""
    import insid3_fast.debias as debias

    def basis():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return positional_basis(encoder, SIZE, 24, cache_key=KEY, cache_dir=tmp_path)

    fresh = basis()
    assert fresh.shape == (32, 16)
    monkeypatch.setattr(debias, "compute_positional_basis", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(basis(), fresh)


def test_a_rank_cut_by_the_patch_count_is_said(tmp_path):
    from insid3_fast import INSID3
    from insid3_fast.errors import InputWarning

    with pytest.warns(InputWarning, match="only 16 patches: the positional subspace has rank 16"):
        model = INSID3(SyntheticEncoder(embed_dim=64), image_size=64, svd_components=24, device="cpu")
    assert model.positional_basis.shape == (64, 16)


def test_a_zero_rank_entry_is_used(encoder, tmp_path):
    """svd_components=0 (no subspace removed) writes a (C, 0) entry, which must be read back silently."""
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert positional_basis(encoder, SIZE, 0, cache_key=KEY, cache_dir=tmp_path).shape == (32, 0)
