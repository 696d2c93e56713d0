"""A cheap, stable cache key for a weights file or folder (the debias disk cache keys on it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .messages import missing_file_error

__all__ = ["weights_fingerprint"]

_MIB = 1 << 20


def _file_digest(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(_MIB))
        if stat.st_size > _MIB:
            fh.seek(max(stat.st_size - _MIB, _MIB))
            digest.update(fh.read(_MIB))
    return digest.hexdigest()


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap, stable cache key for a weights file or Hugging Face folder: sha256 over the
    size, mtime and first and last MiB of each weight file (hex, 32 characters)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise missing_file_error(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".pth"))
    else:
        files = [path]
    combined = hashlib.sha256("".join(_file_digest(p) for p in files).encode())
    return combined.hexdigest()[:32]
