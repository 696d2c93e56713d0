"""Positional-bias removal: the positional subspace (SVD) with its on-disk cache, and the projection.

SPEC.md section 3. The basis depends only on the backbone weights and the image size, so it
is computed once and cached on disk keyed by both; later starts skip the backbone pass and
the SVD.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .inputs import IMAGENET_MEAN, IMAGENET_STD

NOISE_KINDS = ("constant", "gaussian")


def default_cache_dir() -> Path:
    """Where positional bases are cached: ``$INSID3_CACHE`` or ``~/.cache/insid3_fast``."""
    return Path(os.environ.get("INSID3_CACHE", Path.home() / ".cache" / "insid3_fast"))


def noise_image(image_size: int, kind: str = "constant") -> torch.Tensor:
    """The content-free input of the SVD, (1, 3, size, size), already normalised.

    ``constant``: an all-zero image before normalisation (the published code);
    ``gaussian``: N(0, 1) noise with a fixed seed (the paper's prose).
    """
    if kind == "constant":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((torch.zeros(1, 3, image_size, image_size) - mean) / std)
    if kind == "gaussian":
        return torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")


@torch.no_grad()
def compute_positional_basis(encoder: torch.nn.Module, image_size: int, components: int,
                             noise: str = "constant", device: torch.device | str = "cpu") -> torch.Tensor:
    """The first ``components`` left singular vectors (C, r) of the centred noise-image features."""
    x = noise_image(image_size, noise).to(device)
    fmap = encoder.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0].float()
    fmap = F.normalize(fmap, p=2, dim=1)
    E = fmap.permute(1, 0, 2, 3).reshape(fmap.shape[1], -1)
    E = E - E.mean(dim=1, keepdim=True)
    U, _, _ = torch.linalg.svd(E, full_matrices=False)
    return U[:, :components].contiguous()


def _cache_path(cache_dir: Path, key: str, image_size: int, components: int, noise: str) -> Path:
    digest = hashlib.sha256(f"{key}|{image_size}|{components}|{noise}".encode()).hexdigest()[:24]
    return cache_dir / f"posbasis-{image_size}-{components}-{noise}-{digest}.pt"


def positional_basis(encoder: torch.nn.Module, image_size: int, components: int = 500,
                     noise: str = "constant", device: torch.device | str = "cpu",
                     cache_key: str | None = None, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The positional basis B (C, r), from the disk cache when ``cache_key`` names the weights.

    ``cache_key`` must identify the weights (e.g. ``backbone.weights_fingerprint``); without
    it nothing is cached. The file is written atomically, so an interrupted start leaves
    no half-written cache.
    """
    path = None
    if cache_key is not None:
        path = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(),
                           cache_key, image_size, components, noise)
        if path.is_file():
            try:
                return torch.load(path, map_location=device, weights_only=True)
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                pass
    basis = compute_positional_basis(encoder, image_size, components, noise, device)
    if path is not None:
        _write_cache(path, basis)
    return basis


def _write_cache(path: Path, basis: torch.Tensor) -> None:
    """Save atomically; a cache that cannot be written only costs time at the next start."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(basis.cpu(), tmp)
        os.replace(tmp, path)
        tmp = None
    except Exception:  # full disk (RuntimeError from torch.save), read-only folder (OSError)
        pass
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def orthogonal_projector(basis: torch.Tensor) -> torch.Tensor:
    """P = I - B Bᵀ (C, C), the projection onto the complement of the positional subspace."""
    C = basis.shape[0]
    return torch.eye(C, device=basis.device, dtype=basis.dtype) - basis @ basis.T


def debias(features: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """Debias L2-normalised features (T, C, h, w): ``normalize(P x)`` over C, same shape.

    Written as the published batched matmul so the values are bit-identical to it.
    """
    T, C, h, w = features.shape
    X = features.reshape(T, C, h * w)
    X = torch.matmul(projector.unsqueeze(0), X).reshape(T, C, h, w)
    return F.normalize(X, p=2, dim=1)


def complement_basis(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis Q (C, C - r) of the complement of span(B).

    For unit-norm x, ``normalize(Qᵀ x)`` are the coordinates of the debiased feature
    ``normalize(P x)`` in that basis: every inner product between debiased features is the
    same, computed in C - r instead of C dimensions.
    """
    C, r = basis.shape
    U = torch.linalg.svd(basis.double(), full_matrices=True)[0]
    return U[:, r:].to(basis.dtype).contiguous()
