"""``file://`` backend: objects are files under a root directory, written crash-safely.

Every write goes to a temp file in the target's directory (``.amtmp-*.tmp``, hidden from
:meth:`FileStore.list`), is fsynced, renamed over the target, and the directory is fsynced:
after a crash a key holds its old or its new content, never a partial one.

Conditional writes (:meth:`FileStore.put_if`) compare and rename while holding an exclusive
``flock`` on one lock file in the root (``.amtmp-cond-lock.tmp``, hidden like temp files):
they are atomic across threads and processes on one host, not across hosts sharing the
directory over NFS (flock there is advisory at best).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import stat as stat_mod
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from audiomesh.errors import FailedPrecondition, InvalidInput, NotFound, StoreFull
from audiomesh.fsutil import fsync_dir
from audiomesh.metrics import STORE_READ_BYTES, STORE_WRITTEN_BYTES

from .base import (
    DEFAULT_CHUNK_SIZE,
    TMP_PREFIX,
    TMP_SUFFIX,
    LimitedReader,
    ObjectInfo,
    ObjectStore,
    validate_key,
    validate_prefix,
)

__all__ = ["FileStore"]

_MKSTEMP_ATTEMPTS = 5
#: mkstemp creates 0600; objects are meant to be readable by every service sharing the volume.
_FILE_MODE = 0o644
#: The one lock file conditional writes hold; its name is a temp file's, so list() hides it.
LOCK_NAME = f"{TMP_PREFIX}cond-lock{TMP_SUFFIX}"
_LOCK_SLOTS = 1 << 16  # bytes of the lock file keys hash onto
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)  # Linux's value where Python does not name it
_FLOCK = "hh4xqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)


_READ = STORE_READ_BYTES.labels(backend="file")
_WRITTEN = STORE_WRITTEN_BYTES.labels(backend="file")


class _CountingFile(io.FileIO):
    """A file opened for reading whose bytes read count in audiomesh_store_read_bytes_total
    (under a BufferedReader, as ``open(path, "rb")`` would be)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "r")

    def readinto(self, buffer: Any) -> int | None:
        n = super().readinto(buffer)
        if n:
            _READ.inc(n)
        return n

    def readall(self) -> bytes:
        data = super().readall()
        _READ.inc(len(data))
        return data


def _is_tmp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)


class FileStore(ObjectStore):
    """Objects as files below ``root`` (created if missing); key ``a/b.wav`` is ``root/a/b.wav``.

    Parameters
    ----------
    root : path-like
        The directory that holds the objects.

    Notes
    -----
    Unlike S3, a file system cannot hold both ``a`` and ``a/b``: storing one while the
    other exists raises :class:`~audiomesh.errors.FailedPrecondition`.
    ``etag`` is ``"<inode>-<mtime ns>-<size>"`` in hex: every write is a new file renamed over
    the key and stamped with a nanosecond clock, so each write gets a new ETag, even of the
    same bytes. Conditional writes are safe across processes on one host, not across hosts
    sharing the directory over NFS.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.path.abspath(os.fspath(root))
        try:
            os.makedirs(self._root, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidInput(f"file store root {self._root!r} exists and is not a directory") from None

    @property
    def root(self) -> str:
        return self._root

    @property
    def url(self) -> str:
        return Path(self._root).as_uri()

    # ---- paths

    def _path(self, key: str) -> str:
        validate_key(key)
        return os.path.join(self._root, *key.split("/"))

    def _key(self, path: str) -> str:
        return os.path.relpath(path, self._root).replace(os.sep, "/")

    def _makedirs(self, directory: str, key: str) -> None:
        """Create ``directory`` and missing parents below the root, fsyncing each new entry."""
        missing: list[str] = []
        d = directory
        while d != self._root and not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise self._conflict(key, self._key(d)) from None
            except NotADirectoryError:
                raise self._conflict(key, self._key(os.path.dirname(d))) from None
            fsync_dir(os.path.dirname(d))

    @staticmethod
    def _conflict(key: str, other: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"cannot store {key!r}: {other!r} is an object in this file store, and a file store "
            "cannot hold both a key and keys below it"
        )

    def _prune(self, directory: str) -> None:
        """Remove ``directory`` and its parents while they are empty, up to the root."""
        while directory != self._root and directory.startswith(self._root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
        )

    # ---- writing

    def put_stream(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        *,
        length: int = -1,
        content_type: str = "application/octet-stream",
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        path = self._path(key)
        reader = LimitedReader(stream, key=key, length=length, max_bytes=max_bytes)
        directory, name = os.path.split(path)
        if os.path.isdir(path):
            raise FailedPrecondition(
                f"cannot store {key!r}: keys below {key + '/'!r} exist in this file store, which keeps objects as files"
            )
        fd, tmp = -1, ""
        try:
            # A concurrent delete() may prune the directory between mkdir and mkstemp: retry.
            for attempt in range(_MKSTEMP_ATTEMPTS):
                self._makedirs(directory, key)
                try:
                    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name[:40]}.", suffix=TMP_SUFFIX, dir=directory)
                    os.fchmod(fd, _FILE_MODE)
                    break
                except FileNotFoundError:
                    if attempt == _MKSTEMP_ATTEMPTS - 1:
                        raise
            with os.fdopen(fd, "wb") as out:
                fd = -1
                while chunk := reader.read(DEFAULT_CHUNK_SIZE):
                    out.write(chunk)
                out.flush()
                # The ETag includes the mtime: stamp it from a nanosecond clock (the kernel's file
                # times are coarse), so a later file reusing this inode never repeats an ETag.
                now = time.time_ns()
                os.utime(out.fileno(), ns=(now, now))
                os.fsync(out.fileno())
            try:
                os.replace(tmp, path)
            except IsADirectoryError:
                raise FailedPrecondition(
                    f"cannot store {key!r}: keys below {key + '/'!r} exist in this file store"
                ) from None
            tmp = ""
            fsync_dir(directory)
            _WRITTEN.inc(reader.count)
            return self._info(key, os.stat(path))
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            self._prune(directory)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The old object (e.g. the previous manifest) is untouched: only the temp file failed.
                raise StoreFull(
                    f"the file store at {self.root} is full: cannot write {key!r} ({exc.strerror})"
                ) from None
            raise

    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
    ) -> ObjectInfo:
        self._check_condition(key, if_match, if_none_match)
        data = bytes(data)
        with self._cond_lock(key):
            try:
                current: str | None = self.stat(key).etag
            except NotFound:
                current = None
            if (if_none_match and current is not None) or (if_match is not None and current != if_match.strip('"')):
                raise self._precondition_failed(key, if_match, current)
            # Still under the lock: the compare and the rename are one step for every other put_if.
            return self.put_stream(key, io.BytesIO(data), length=len(data), content_type=content_type)

    @contextlib.contextmanager
    def _cond_lock(self, key: str, *, create: bool = True) -> Iterator[None]:
        """An exclusive lock for ``key``'s conditional writes: one byte of the root's lock file,
        chosen by the key's hash, locked with an open-file-description lock (Linux
        ``F_OFD_SETLKW``). Per key, so a process frozen inside a write (SIGSTOP) holds up only
        that key, not every job in the store; per open file description (a new open per call),
        so it excludes other threads of this process too. Two keys may share a byte (harmless:
        they just take turns). ``create=False`` (a delete): no lock at all where no conditional
        write has made the lock file yet, so plain stores stay free of it."""
        try:
            fd = os.open(
                os.path.join(self._root, LOCK_NAME),
                os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC,
                _FILE_MODE,
            )
        except FileNotFoundError:  # not create: no conditional write ever ran in this store
            fd = -1
        if fd < 0:
            yield
            return
        slot = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % _LOCK_SLOTS
        try:
            fcntl.fcntl(fd, _OFD_SETLKW, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0))
            yield
        finally:
            os.close(fd)  # releases the lock

    # ---- reading

    def read(self, key: str) -> tuple[bytes, ObjectInfo]:
        with self.open(key) as f:
            # fstat of the open file: the ETag of exactly these bytes (a write renames a new
            # file over the key; this one never changes).
            st = os.fstat(f.fileno())
            if not stat_mod.S_ISREG(st.st_mode):
                raise NotFound(f"no object with key {key!r} in the store")
            return f.read(), self._info(key, st)

    @contextlib.contextmanager
    def open(self, key: str, *, offset: int = 0) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            f = io.BufferedReader(_CountingFile(path))  # closed by the with below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object with key {key!r} in the store") from None
        with f:
            if offset:
                f.seek(offset)
            yield f

    @contextlib.contextmanager
    def open_seekable(self, key: str, *, read_ahead: int = DEFAULT_CHUNK_SIZE) -> Iterator[BinaryIO]:
        # The file itself seeks; the open descriptor keeps reading this version if a write
        # renames a new file over the key meanwhile.
        with self.open(key) as f:
            yield f

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat_mod.S_ISREG(st.st_mode):
            raise NotFound(f"no object with key {key!r} in the store")
        return self._info(key, st)

    def _walk_keys(self, prefix: str, recursive: bool) -> list[tuple[str, str]]:
        head, _, partial = prefix.rpartition("/")
        base = os.path.join(self._root, *head.split("/")) if head else self._root
        if not os.path.isdir(base):
            return []
        found: list[tuple[str, str]] = []
        key_head = f"{head}/" if head else ""
        if not recursive:
            with os.scandir(base) as it:
                for entry in it:
                    if entry.name.startswith(partial) and not _is_tmp(entry.name) and entry.is_file():
                        found.append((key_head + entry.name, entry.path))
            return found
        for dirpath, dirnames, filenames in os.walk(base):
            if dirpath == base:
                dirnames[:] = [d for d in dirnames if d.startswith(partial)]
                filenames = [f for f in filenames if f.startswith(partial)]
            rel = os.path.relpath(dirpath, base)
            rel_key = key_head if rel == "." else key_head + rel.replace(os.sep, "/") + "/"
            for f in filenames:
                if not _is_tmp(f):
                    found.append((rel_key + f, os.path.join(dirpath, f)))
        return found

    def list(self, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Python's str order is code-point order, which equals S3's UTF-8 byte order.
        for key, path in sorted(self._walk_keys(prefix, recursive)):
            try:
                st = os.stat(path)
            except FileNotFoundError:  # deleted while listing
                continue
            if stat_mod.S_ISREG(st.st_mode):
                yield self._info(key, st)

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        head, _, partial = prefix.rpartition("/")
        base = os.path.join(self._root, *head.split("/")) if head else self._root
        if not os.path.isdir(base):
            return
        key_head = f"{head}/" if head else ""
        with os.scandir(base) as it:
            dirs = sorted(e.name for e in it if e.name.startswith(partial) and e.is_dir(follow_symlinks=False))
        for d in dirs:
            if self._has_objects(os.path.join(base, d)):
                yield f"{key_head}{d}/"

    @staticmethod
    def _has_objects(directory: str) -> bool:
        for _, _, filenames in os.walk(directory):
            if any(not _is_tmp(f) for f in filenames):
                return True
        return False

    # ---- deleting

    def delete(self, key: str) -> None:
        path = self._path(key)
        # Under the key's conditional-write lock: a put_if that compared the ETag of the object
        # deleted now must not then rename its new one into place (a released lease came back
        # into a deleted job's folder); on S3 a delete and a conditional PUT are atomic too.
        with self._cond_lock(key, create=False):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
        self._prune(os.path.dirname(path))
