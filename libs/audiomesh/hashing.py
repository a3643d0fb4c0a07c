"""Streaming content hashes (for manifests and integrity checks)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

__all__ = ["file_sha256", "sha256_chunks"]

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk_size`` pieces (constant memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    """Hex SHA-256 of the concatenation of ``chunks`` (e.g. ``store.iter_chunks(key)``)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
