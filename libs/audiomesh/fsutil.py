"""Atomic local files: write a temp file beside the target, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never a partial one; a failure leaves no temp file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

TMP_PREFIX = ".amtmp-"
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, make_dirs: bool = False) -> Iterator[str]:
    """Yield a temp path to write; on success it replaces ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=directory)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide outputs from other service users
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename durable (best effort: some filesystems refuse directory fsync)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
