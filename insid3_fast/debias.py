"""Positional-bias removal: the positional subspace (SVD) with its on-disk cache, and the projection.

SPEC.md section 3. The basis depends only on the backbone weights and the image size, so it
is computed once and cached on disk keyed by both; later starts skip the backbone pass and
the SVD. A cache entry is used only if it passes every check (`_read_cache`): its layout,
shape, dtype, finite values, orthonormal columns and a SHA-256 of its key and values written
with it. Anything else is recomputed with one warning. The checksum catches corruption and
edits by other tools, not a forger who recomputes it: the cache folder must be the user's own.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write
from .inputs import IMAGENET_MEAN, IMAGENET_STD

#: Layout version of a cache entry: {"format", "key", "basis", "sha256"}.
CACHE_FORMAT = 2
#: Largest |BᵀB - I| entry of a basis accepted from the cache (float32 SVD output is ~1e-6).
ORTHONORMAL_TOL = 1e-4

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
    fmap = encoder.get_intermediate_layers(x, n=1, reshape=True)[0].float()
    fmap = F.normalize(fmap, p=2, dim=1)
    E = fmap.permute(1, 0, 2, 3).reshape(fmap.shape[1], -1)
    E = E - E.mean(dim=1, keepdim=True)
    U, _, _ = torch.linalg.svd(E, full_matrices=False)
    return U[:, :components].contiguous()


def _cache_id(key: str, image_size: int, components: int, noise: str) -> str:
    return f"{key}|{image_size}|{components}|{noise}"


def _cache_path(cache_dir: Path, key: str, image_size: int, components: int, noise: str) -> Path:
    digest = hashlib.sha256(_cache_id(key, image_size, components, noise).encode()).hexdigest()[:24]
    return cache_dir / f"posbasis-{image_size}-{components}-{noise}-{digest}.pt"


def _checksum(cache_id: str, basis: torch.Tensor) -> str:
    values = np.ascontiguousarray(basis.detach().cpu().numpy())
    digest = hashlib.sha256(cache_id.encode())
    digest.update(f"|{values.dtype.str}|{values.shape}|".encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def _read_cache(path: Path, cache_id: str, components: int, channels: int | None) -> tuple[torch.Tensor | None, str]:
    """The cached basis (on the CPU) if every check passes, else None and what failed."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recomputed, never trusted
        return None, f"unreadable ({type(exc).__name__})"
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
        return None, "not an entry of this version"
    basis = entry.get("basis")
    if entry.get("key") != cache_id or not isinstance(basis, torch.Tensor) or not isinstance(entry.get("sha256"), str):
        return None, "written for other weights or settings"
    # At most ``components`` columns: fewer where the grid has fewer patches than that (the SVD
    # has no more; the entry's key and checksum say it was written for these settings). A
    # negative rank is the slice U[:, :r]: fewer columns than rows.
    columns_ok = basis.ndim == 2 and (basis.shape[1] == components or 0 < basis.shape[1] < components
                                      or (components < 0 and basis.shape[1] < basis.shape[0]))
    if basis.dtype != torch.float32 or not columns_ok \
            or (channels is not None and basis.shape[0] != channels):
        return None, (f"a {basis.dtype} tensor of shape {tuple(basis.shape)}, expected float32 "
                      f"({channels or 'C'}, at most {components})")
    if not bool(torch.isfinite(basis).all()):
        return None, "non-finite values"
    if _checksum(cache_id, basis) != entry["sha256"]:
        return None, "checksum mismatch"
    if not has_orthonormal_columns(basis):
        return None, "columns not orthonormal"
    return basis.contiguous(), ""


def positional_basis(encoder: torch.nn.Module, image_size: int, components: int = 500,
                     noise: str = "constant", device: torch.device | str = "cpu",
                     cache_key: str | None = None, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The positional basis B (C, r), from the disk cache when ``cache_key`` names the weights.

    ``cache_key`` must identify the weights (e.g. ``backbone.weights_fingerprint``); without
    it nothing is cached. The file is written atomically, so an interrupted start leaves
    no half-written cache; an entry that fails a check is recomputed with a RuntimeWarning.
    """
    path = None
    cache_id = None
    if cache_key is not None:
        cache_id = _cache_id(cache_key, image_size, components, noise)
        path = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(),
                           cache_key, image_size, components, noise)
        if path.is_file():
            channels = getattr(encoder, "embed_dim", None)
            basis, problem = _read_cache(path, cache_id, components, channels if isinstance(channels, int) else None)
            if basis is not None:
                return basis.to(device)
            warnings.warn(f"positional-basis cache entry '{path}' was not used ({problem}); recomputing it",
                          RuntimeWarning, stacklevel=2)
    basis = compute_positional_basis(encoder, image_size, components, noise, device)
    if path is not None:
        _write_cache(path, cache_id, basis)
    return basis


def _write_cache(path: Path, cache_id: str, basis: torch.Tensor) -> None:
    """Save atomically; a cache that cannot be written only costs time at the next start."""
    cpu = basis.detach().float().cpu().contiguous()
    entry = {"format": CACHE_FORMAT, "key": cache_id, "basis": cpu, "sha256": _checksum(cache_id, cpu)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fp: torch.save(entry, fp))
    except Exception:  # full disk (RuntimeError from torch.save), read-only folder (OSError), a link there
        pass


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


def has_orthonormal_columns(basis: torch.Tensor) -> bool:
    """Whether every entry of BᵀB - I is within ORTHONORMAL_TOL (float32 SVD output: ~1e-6)."""
    if basis.shape[1] == 0:  # no columns: nothing to check
        return True
    gram = basis.double().T @ basis.double()
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return float((gram - eye).abs().max()) <= ORTHONORMAL_TOL


def complement_basis(basis: torch.Tensor) -> torch.Tensor:
    """Q (C, D) with normalize(Qᵀ x) the debiased feature ``normalize(P x)``, P = I - B Bᵀ, in
    D coordinates: every inner product between debiased features is the same.

    For orthonormal columns (the SVD's) Q is an orthonormal basis of the complement of span(B),
    D = C - r. For any other B (a basis assigned by hand: the published code uses P whatever B
    is), Q holds the eigenvectors of P scaled by |eigenvalue| (Q Qᵀ = P², so |Qᵀx| = |P x| and
    the inner products agree), D the number of non-zero eigenvalues.
    """
    C, r = basis.shape
    if r < C and has_orthonormal_columns(basis):
        U = torch.linalg.svd(basis.double(), full_matrices=True)[0]
        return U[:, r:].to(basis.dtype).contiguous()
    values, vectors = torch.linalg.eigh(orthogonal_projector(basis.double()))
    keep = values.abs() > 1e-6 * max(1.0, float(values.abs().max()))
    return (vectors[:, keep] * values[keep].abs()).to(basis.dtype).contiguous()
