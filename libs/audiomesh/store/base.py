"""The object-store interface, key rules and the streaming helpers both backends share.

The interface is synchronous on purpose: every call does blocking I/O (disk or HTTP), and
async services call it through ``asyncio.to_thread``. Keys are validated here, once, by
:func:`validate_key`; backends receive only valid keys.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, cast

from audiomesh import fsutil
from audiomesh.errors import InvalidInput, NotFound, PreconditionFailed, TooLarge
from audiomesh.fsutil import atomic_path

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_KEY_BYTES",
    "ObjectInfo",
    "ObjectStore",
    "sanitize_filename",
    "validate_key",
    "validate_prefix",
]

#: Bytes per read when copying streams.
DEFAULT_CHUNK_SIZE = 1 << 20
#: S3's limit on an object name, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: Segments starting with this are the file store's temp files: reserved, hidden from list().
TMP_PREFIX, TMP_SUFFIX = fsutil.TMP_PREFIX, fsutil.TMP_SUFFIX  # temp objects the file store hides

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a store knows about one stored object.

    ``etag`` is the S3 ETag without quotes; the file store makes its own (inode, mtime and
    size of the file), new on every write even of the same bytes. It is what
    :meth:`ObjectStore.put_if` compares. ``last_modified`` is timezone-aware (UTC).
    """

    key: str
    size: int
    etag: str | None
    last_modified: datetime


# --------------------------------------------------------------------------- key rules


def _check_common(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise InvalidInput(f"object {what} must be a str, got {type(text).__name__}")
    if _CONTROL_CHARS.search(text):
        raise InvalidInput(f"object {what} {text!r} contains a control character; keys are printable text")
    if "\\" in text:
        raise InvalidInput(f"object {what} {text!r} contains a backslash; use '/' to separate segments")
    if text.startswith("/"):
        raise InvalidInput(f"object {what} {text!r} starts with '/'; keys are relative, like 'jobs/ID/x.wav'")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"object {what} {text!r} is not valid Unicode (lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise InvalidInput(
            f"object {what} {text[:60]!r}... is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes"
        )


def _check_segment(segment: str, text: str, what: str) -> None:
    if segment == "":
        raise InvalidInput(f"object {what} {text!r} has an empty segment ('//' or a trailing '/')")
    if segment in (".", ".."):
        raise InvalidInput(f"object {what} {text!r} has a {segment!r} segment; keys cannot navigate")
    if segment.startswith(TMP_PREFIX):
        raise InvalidInput(
            f"object {what} {text!r} has a segment starting with {TMP_PREFIX!r}, "
            "which is reserved for the store's temporary files"
        )


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise InvalidInput naming the rule.

    Rules: a relative, '/'-separated path; no empty, '.' or '..' segments; no backslash; no
    control characters; at most 1024 bytes in UTF-8; no segment starting with '.amtmp-'
    (reserved for temp files).
    """
    _check_common(key, "key")
    if key == "":
        raise InvalidInput("object key '' is empty; give a relative path like 'jobs/ID/input/song.wav'")
    for segment in key.split("/"):
        _check_segment(segment, key, "key")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start a valid key ('' allowed), else raise InvalidInput.

    A prefix matches keys by plain string prefix (S3 semantics): ``'jobs/ab'`` matches
    ``'jobs/abc/x'``. Every complete segment (one followed by '/') obeys :func:`validate_key`.
    """
    _check_common(prefix, "prefix")
    for segment in prefix.split("/")[:-1]:
        _check_segment(segment, prefix, "prefix")
    return prefix


_UNSAFE_FILENAME_CHARS = re.compile(r"[^\w.\-]+")
_MAX_FILENAME_CHARS = 120
_MAX_FILENAME_BYTES = 240


def sanitize_filename(name: str) -> str:
    """Turn a user-supplied file name into one safe as a key segment and a file name.

    Keeps the base name only (after the last '/' or '\\'), drops control characters,
    replaces runs of anything but letters, digits, '.', '-' and '_' with '_', strips leading
    dots, keeps a short extension, caps the result at 120 characters (240 UTF-8 bytes), and
    never returns '', '.' or '..' (the fallback stem is ``input``).

    Examples
    --------
    >>> sanitize_filename("../../etc/My Song (live).MP3")
    'My_Song_live.MP3'
    >>> sanitize_filename("")
    'input'
    """
    name = unicodedata.normalize("NFC", str(name))
    name = _CONTROL_CHARS.sub("", name)
    name = re.split(r"[/\\]", name)[-1]
    stem, dot, ext = name.rpartition(".")
    if not (dot and stem.strip(".") and 0 < len(ext) <= 10 and ext.isascii() and ext.isalnum()):
        # No real extension ("README", ".bashrc", "a.b c", "archive."): it is all stem.
        stem, ext = name, ""
    stem = _UNSAFE_FILENAME_CHARS.sub("_", stem).lstrip(".").strip("_") or "input"
    suffix = f".{ext}" if ext else ""
    limit_chars = _MAX_FILENAME_CHARS - len(suffix)
    stem = stem[:limit_chars]
    while len((stem + suffix).encode("utf-8")) > _MAX_FILENAME_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip(".") or "input"
    return stem + suffix


def format_bytes(n: int) -> str:
    """``524288000 -> '524288000 bytes (500.0 MiB)'`` for error messages."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes ({value:.1f} {unit})"


# --------------------------------------------------------------------------- streaming


class LimitedReader(io.RawIOBase):
    """A ``read(n)`` view of a file-like or an iterable of bytes that enforces limits.

    ``read(n)`` returns exactly ``n`` bytes unless the source is exhausted (so a consumer
    that concatenates reads does one join per part). It raises :class:`TooLarge` as soon
    as more than ``max_bytes`` have been read, and :class:`InvalidInput` if the source ends
    before the declared ``length``. With ``length >= 0`` it never reads past ``length``.
    """

    def __init__(
        self,
        source: BinaryIO | Iterable[bytes] | bytes,
        *,
        key: str,
        length: int = -1,
        max_bytes: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        if hasattr(source, "read"):
            self._file: BinaryIO | None = source  # type: ignore[assignment]
            self._iter: Iterator[bytes] | None = None
        else:
            self._file = None
            self._iter = iter(source)
        self._pending = memoryview(b"")
        self.key = key
        self.length = length
        self.max_bytes = max_bytes
        self.count = 0
        if max_bytes is not None and length > max_bytes:
            raise self._too_large()

    def _too_large(self) -> TooLarge:
        return TooLarge(
            f"object {self.key!r} is larger than the limit of {format_bytes(self.max_bytes or 0)}; nothing was stored"
        )

    def readable(self) -> bool:
        return True

    def _raw(self, n: int) -> bytes:
        """Up to n bytes from the source; b'' only at its end."""
        if self._file is not None:
            data = self._file.read(n)
            if data is None:  # non-blocking raw stream with nothing yet
                return b""
            return bytes(data)
        if not self._pending:
            assert self._iter is not None
            for chunk in self._iter:
                if chunk:
                    self._pending = memoryview(chunk).cast("B")
                    break
            else:
                return b""
        out = self._pending[:n].tobytes()
        self._pending = self._pending[n:]
        return out

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        if self.length >= 0:
            size = min(size, self.length - self.count)
        parts: list[bytes] = []
        want = size
        while want > 0:
            data = self._raw(min(want, 1 << 24) if self._file is not None else want)
            if not data:
                break
            parts.append(data)
            want -= len(data)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.count += len(out)
        if self.max_bytes is not None and self.count > self.max_bytes:
            raise self._too_large()
        if self.length >= 0 and not out and size > 0 and self.count < self.length:
            raise InvalidInput(
                f"the stream for {self.key!r} ended after {self.count} bytes; its declared length "
                f"was {self.length} bytes"
            )
        return out

    def readinto(self, buffer: Any) -> int:  # a writable buffer (bytearray, memoryview, ...)
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


#: A seek forward by at most this much reads on through the open stream instead of reopening.
_SKIP_BYTES = 256 << 10


class _RangeReader(io.RawIOBase):
    """A seekable, read-only raw file over one stored object (see :meth:`ObjectStore.open_seekable`).

    It keeps one streamed read (:meth:`ObjectStore.open` at an offset: an HTTP Range GET on
    S3) open and reads on from it; a seek backwards or far ahead closes it and opens the next
    read where the position is, lazily, on the next read.
    """

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        super().__init__()
        self._store, self._key, self._size = store, key, size
        self.name = key  # what soundfile shows when it refuses the content
        self._pos = 0
        self._stream: BinaryIO | None = None
        self._stream_cm: AbstractContextManager[BinaryIO] | None = None
        self._stream_pos = 0
        #: How many streamed reads were opened (tests check the reads stay few).
        self.opens = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos} in {self._key!r}")
        self._pos = pos
        return pos

    def _drop_stream(self) -> None:
        if self._stream_cm is not None:
            cm, self._stream_cm, self._stream = self._stream_cm, None, None
            cm.__exit__(None, None, None)

    def _stream_at(self, pos: int) -> BinaryIO:
        if self._stream is not None and 0 <= pos - self._stream_pos <= _SKIP_BYTES:
            while self._stream_pos < pos:  # a short skip: cheaper than a new request
                skipped = self._stream.read(min(pos - self._stream_pos, DEFAULT_CHUNK_SIZE))
                if not skipped:
                    break
                self._stream_pos += len(skipped)
        if self._stream is None or self._stream_pos != pos:
            self._drop_stream()
            cm = self._store.open(self._key, offset=pos)
            self._stream = cm.__enter__()
            self._stream_cm, self._stream_pos = cm, pos
            self.opens += 1
        assert self._stream is not None
        return self._stream

    def readinto(self, buffer: Any) -> int:  # a writable buffer (bytearray, memoryview, ...)
        if self.closed:
            raise ValueError(f"read from closed object reader {self._key!r}")
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        stream = self._stream_at(self._pos)
        got = 0
        while got < want:
            data = stream.read(want - got)
            if not data:
                raise NotFound(
                    f"object {self._key!r} ended at byte {self._pos + got} of {self._size}: it was replaced "
                    "or deleted while being read"
                )
            view[got : got + len(data)] = data
            got += len(data)
        self._pos += got
        self._stream_pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._drop_stream()
        super().close()


def atomic_download(chunks: Iterable[bytes], path: str | os.PathLike[str]) -> None:
    """Write ``chunks`` to ``path`` via a temp file in the same directory + fsync + rename."""
    with atomic_path(path, make_dirs=True) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            out.write(chunk)


# --------------------------------------------------------------------------- interface


class ObjectStore(ABC):
    """A flat namespace of keys ('/'-separated) mapping to immutable byte objects.

    Every method is blocking; call it through ``asyncio.to_thread`` from async code.
    Errors: :class:`~audiomesh.errors.InvalidInput` for a bad key,
    :class:`~audiomesh.errors.NotFound` for a missing object,
    :class:`~audiomesh.errors.TooLarge` when ``max_bytes`` is passed,
    :class:`~audiomesh.errors.Unavailable` when the backend cannot be reached.
    A store is also a context manager that closes itself.
    """

    # ---- writing

    @abstractmethod
    def put_stream(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        *,
        length: int = -1,
        content_type: str = "application/octet-stream",
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        """Store everything ``stream`` yields under ``key``, streaming, and return its info.

        Parameters
        ----------
        key : str
            Object key, see :func:`validate_key`.
        stream : binary file-like (``read(n)``) or iterable of bytes
            The content. Never read into memory as a whole.
        length : int
            The content length if known (then exactly that many bytes are read, and a
            shorter stream is InvalidInput), or -1.
        content_type : str
            MIME type recorded where the backend supports it (S3).
        max_bytes : int or None
            Upper bound on the size. Exceeding it raises TooLarge and leaves nothing
            behind: no object, no temp file, no incomplete multipart upload. An existing
            object under ``key`` is left unchanged.

        Notes
        -----
        The new object replaces an old one atomically: a concurrent reader sees the old
        or the new content, never a mix.
        """

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str = "application/octet-stream",
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        """Store the file at ``path`` under ``key`` (streamed)."""
        validate_key(key)
        with open(path, "rb") as f:
            length = os.fstat(f.fileno()).st_size
            return self.put_stream(key, f, length=length, content_type=content_type, max_bytes=max_bytes)

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Store ``data`` under ``key`` atomically (readers see old or new, never partial)."""
        data = bytes(data)
        return self.put_stream(key, io.BytesIO(data), length=len(data), content_type=content_type)

    @abstractmethod
    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
    ) -> ObjectInfo:
        """Store the small object ``data`` under ``key`` in one atomic write, only if a
        condition holds; the building block of leases and fenced manifests.

        Parameters
        ----------
        key : str
            Object key, see :func:`validate_key`.
        data : bytes
            The whole content (one PUT; meant for manifests and leases, not audio).
        if_match : str or None
            Write only if ``key`` exists with exactly this ETag (S3 ``If-Match``).
        if_none_match : bool
            Write only if ``key`` does not exist (S3 ``If-None-Match: *``).
        content_type : str
            MIME type recorded where the backend supports it (S3).

        Exactly one of ``if_match`` and ``if_none_match`` must be given (InvalidInput).

        Returns
        -------
        info : ObjectInfo
            The new object, with the ETag of what was written (compare it next time).

        Raises
        ------
        PreconditionFailed
            The condition does not hold (the object exists / changed / is gone); nothing was
            written. After a lost connection the client may have retried a write that had
            already succeeded, and then sees this error for its own write: callers treat it as
            "re-read and decide", which is always safe.
        """

    @staticmethod
    def _check_condition(key: str, if_match: str | None, if_none_match: bool) -> None:
        validate_key(key)
        if (if_match is not None) == bool(if_none_match):
            raise InvalidInput(
                f"put_if({key!r}) needs exactly one condition: if_match=ETAG or if_none_match=True, "
                f"got if_match={if_match!r}, if_none_match={if_none_match!r}"
            )
        if if_match is not None and (not isinstance(if_match, str) or not if_match.strip('"')):
            raise InvalidInput(f"put_if({key!r}): if_match must be a non-empty ETag string, got {if_match!r}")

    @staticmethod
    def _precondition_failed(key: str, if_match: str | None, current: str | None) -> PreconditionFailed:
        """The error naming the key and the condition that did not hold."""
        if if_match is None:
            return PreconditionFailed(f"{key!r} already exists (etag {current}); the write required that it did not")
        if current is None:
            return PreconditionFailed(f"{key!r} does not exist; the write required etag {if_match}")
        return PreconditionFailed(
            f"{key!r} changed: its etag is {current}, the write required {if_match}; re-read it and decide again"
        )

    # ---- reading

    @abstractmethod
    def read(self, key: str) -> tuple[bytes, ObjectInfo]:
        """The whole content of a small object ``key`` and the ObjectInfo (with ETag) of
        exactly that content, from one read: pass ``info.etag`` to :meth:`put_if`'s
        ``if_match`` to write only if nobody changed it since. NotFound if it is missing."""

    @abstractmethod
    def open(self, key: str, *, offset: int = 0) -> AbstractContextManager[BinaryIO]:
        """A context manager yielding a streamed, readable binary file for ``key``, from byte
        ``offset`` on (HTTP Range requests read from the middle).

        Raises NotFound (on entering) if the key does not exist.
        """

    @contextlib.contextmanager
    def open_seekable(self, key: str, *, read_ahead: int = DEFAULT_CHUNK_SIZE) -> Iterator[BinaryIO]:
        """A context manager yielding a read-only, *seekable* binary file over ``key``, without a
        local copy: what decoders that seek (soundfile) need to read a stored object in place.

        Reads go through a ``read_ahead``-byte buffer; underneath, one streamed read (a Range
        GET on S3) stays open while reads are sequential, and a seek elsewhere opens the next
        one where it lands. The file store overrides this with the file itself.

        Raises NotFound (on entering) if the key does not exist.
        """
        info = self.stat(key)
        raw = _RangeReader(self, key, info.size)
        with io.BufferedReader(raw, buffer_size=max(read_ahead, io.DEFAULT_BUFFER_SIZE)) as f:
            yield cast(BinaryIO, f)

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Info about ``key``; NotFound if it does not exist."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def get_bytes(self, key: str) -> bytes:
        """The whole content of ``key`` (for small objects such as manifests)."""
        with self.open(key) as f:
            return f.read()

    def iter_chunks(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE, *, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Yield the content of ``key`` (or ``length`` bytes from ``start``) in chunks of at most
        ``chunk_size`` bytes.

        NotFound is raised on the first ``next()``, not when the generator is created.
        """
        if chunk_size <= 0:
            raise InvalidInput(f"chunk_size must be > 0, got {chunk_size}")
        if start < 0 or (length is not None and length < 0):
            raise InvalidInput(f"start and length must be >= 0, got {start} and {length}")
        remaining = -1 if length is None else length
        with self.open(key, offset=start) as f:
            while remaining:
                chunk = f.read(chunk_size if remaining < 0 else min(chunk_size, remaining))
                if not chunk:
                    break
                remaining -= len(chunk) if remaining > 0 else 0
                yield chunk

    def get_to_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Download ``key`` to ``path`` atomically (temp file + rename); parents are created."""
        info = self.stat(key)
        atomic_download(self.iter_chunks(key), path)
        return info

    @abstractmethod
    def list(self, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key (UTF-8 byte order).

        With ``recursive=False`` only objects directly below ``prefix`` are listed (no
        further '/' after it); use :meth:`list_prefixes` for the "folders".
        """

    @abstractmethod
    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        """The distinct "folders" directly below ``prefix``, sorted, each ending in '/'.

        ``list_prefixes("jobs/")`` yields ``"jobs/<id>/"`` once per job.
        """

    # ---- deleting

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; return how many.

        ``prefix`` must not be empty (to wipe a store, list and delete explicitly).
        """
        self._check_delete_prefix(prefix)
        count = 0
        for info in self.list(prefix):
            self.delete(info.key)
            count += 1
        return count

    @staticmethod
    def _check_delete_prefix(prefix: str) -> None:
        validate_prefix(prefix)
        if prefix == "":
            raise InvalidInput("delete_prefix needs a non-empty prefix, e.g. 'jobs/ID/'; refusing to delete all")

    # ---- lifecycle

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL (``file:///...`` or ``s3://bucket/prefix``), without credentials."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
