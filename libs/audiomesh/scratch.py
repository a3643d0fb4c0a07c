"""Scratch folders for work in progress that a killed process cannot leave behind for long.

A service process works under ``<tmp>/audiomesh-scratch/<pid>/``. ``finally`` blocks clean up
after errors and cancellations, but not after SIGKILL, the OOM killer or a power cut: so every
service sweeps the folders of processes that no longer exist when it starts, and removes its own
when it stops cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT_NAME = "audiomesh-scratch"


def root() -> Path:
    return Path(tempfile.gettempdir()) / ROOT_NAME


def process_dir() -> Path:
    """This process's scratch folder (created on first use)."""
    folder = root() / str(os.getpid())
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A private folder for one request, removed when the block ends however it ends."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=process_dir()) as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep() -> list[Path]:
    """Remove the scratch folders of processes that are gone; return what was removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for child in root().iterdir():
            if child.name.isdigit() and int(child.name) != os.getpid() and not _alive(int(child.name)):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def remove_own() -> None:
    """On a clean stop: this process's folder goes (requests are finished or cancelled by then)."""
    shutil.rmtree(root() / str(os.getpid()), ignore_errors=True)
