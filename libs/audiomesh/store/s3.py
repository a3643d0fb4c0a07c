"""``s3://bucket[/prefix]`` backend on the ``minio`` client (MinIO or any S3-compatible store).

Uploads stream in 16 MiB multipart parts, one part in memory at a time. Parts are uploaded
sequentially (``num_parallel_uploads=1``): minio's parallel pool leaves its threads blocked
forever when an upload fails, and a part still in flight can race the abort; sequential
parts make a failed upload (e.g. ``max_bytes`` exceeded) end with the upload aborted and
nothing left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

from audiomesh.errors import (
    AudiomeshError,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
)
from audiomesh.metrics import STORE_READ_BYTES, STORE_WRITTEN_BYTES

from .base import LimitedReader, ObjectInfo, ObjectStore, validate_key, validate_prefix

__all__ = ["S3Store", "PART_SIZE"]

#: Multipart part size; S3 needs >= 5 MiB for all parts but the last.
PART_SIZE = 16 << 20
_DELETE_BATCH = 1000

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchVersion"}
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
}
_RETRYABLE_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}
#: A conditional write's refusal: 412, or 409 when a concurrent conditional write is in flight.
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_INVALID_CODES = {"KeyTooLongError", "InvalidArgument", "InvalidRequest", "InvalidObjectName"}


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _header_time(headers: object) -> datetime:
    """Server time of a response (Last-Modified if sent, else Date), or now."""
    get = getattr(headers, "get", None)
    for name in ("Last-Modified", "Date"):
        value = get(name) if get else None
        if value:
            with contextlib.suppress(TypeError, ValueError):
                return parsedate_to_datetime(value).astimezone(UTC)
    return datetime.now(UTC)


_READ = STORE_READ_BYTES.labels(backend="s3")
_WRITTEN = STORE_WRITTEN_BYTES.labels(backend="s3")


class _S3Reader(io.RawIOBase):
    """A streamed object body; transport errors surface as Unavailable."""

    def __init__(self, response: urllib3.BaseHTTPResponse, store: S3Store, key: str) -> None:
        super().__init__()
        self._response = response
        self._store = store
        self._key = key

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with self._store._translate(f"read {self._key!r}", self._key):
            data = self._response.read(None if size is None or size < 0 else size)
        _READ.inc(len(data))
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:  # a writable buffer (bytearray, memoryview, ...)
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class S3Store(ObjectStore):
    """Objects in an S3 bucket, optionally below a key prefix.

    Parameters
    ----------
    bucket : str
        Bucket name (3-63 characters: lowercase letters, digits, '.', '-').
    prefix : str
        Key prefix inside the bucket ('' for none); keys given to this store are relative to it.
    endpoint : str
        ``host:port`` (or ``http(s)://host:port``, which also sets ``secure``).
    access_key, secret_key : str or None
        Credentials; None for anonymous access.
    region : str or None
        Bucket region; None lets the client ask the server.
    secure : bool
        HTTPS when True.
    create_bucket : bool
        Create the bucket now if it does not exist (this contacts the server).
    connect_timeout, read_timeout : float
        Socket timeouts in seconds.
    retries : int
        Retries for connection errors and 5xx responses (exponential backoff from 0.2 s).
    part_size : int
        Multipart part size in bytes (>= 5 MiB).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        secure: bool = False,
        create_bucket: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        retries: int = 3,
        part_size: int = PART_SIZE,
    ) -> None:
        endpoint, secure = self._parse_endpoint(endpoint, secure)
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError:
            raise InvalidInput(
                f"S3 bucket name {bucket!r} is invalid: use 3-63 characters of lowercase letters, "
                "digits, '.' and '-', starting and ending with a letter or digit"
            ) from None
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        if part_size < 5 << 20:
            raise InvalidInput(f"S3 part_size must be >= 5 MiB, got {part_size} bytes")
        self._bucket = bucket
        self._prefix = prefix
        self._endpoint = endpoint
        self._secure = secure
        self._part_size = part_size
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key or None,
                secret_key=secret_key if access_key else None,
                secure=secure,
                region=region or None,
                http_client=self._http,
            )
        except ValueError as exc:
            raise InvalidInput(f"S3 endpoint {endpoint!r} is invalid: {exc}") from None
        if create_bucket:
            self._ensure_bucket(region)

    @staticmethod
    def _parse_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
        if not endpoint:
            raise InvalidInput("an s3:// store needs an S3 endpoint (host:port), e.g. 'minio:9000'")
        if "://" in endpoint:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or parts.path.strip("/") or not parts.netloc:
                raise InvalidInput(
                    f"S3 endpoint {endpoint!r} is invalid: give host:port or http(s)://host:port, no path"
                )
            return parts.netloc, parts.scheme == "https"
        if "/" in endpoint:
            raise InvalidInput(f"S3 endpoint {endpoint!r} is invalid: give host:port, no path")
        return endpoint, secure

    def _ensure_bucket(self, region: str | None) -> None:
        with self._translate(f"create bucket {self._bucket!r}"):
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket, location=region or None)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    # ---- helpers

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def client(self) -> Minio:
        """The underlying minio client (for tests and admin tasks)."""
        return self._client

    def _name(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def _key(self, name: str) -> str:
        return name[len(self._prefix) + 1 :] if self._prefix else name

    @contextlib.contextmanager
    def _translate(self, action: str, key: str | None = None) -> Iterator[None]:
        """Map minio/urllib3 errors to audiomesh errors; ``action`` completes 'failed to ...'."""
        where = f"S3 endpoint {self._endpoint} (bucket {self._bucket!r})"
        try:
            yield
        except AudiomeshError:
            raise
        except S3Error as exc:
            code = exc.code or ""
            status = getattr(exc.response, "status", 0) or 0
            if code in _NOT_FOUND_CODES:
                raise NotFound(f"no object with key {key!r} in the store") from exc
            if code == "NoSuchBucket":
                raise FailedPrecondition(
                    f"the bucket {self._bucket!r} does not exist at S3 endpoint {self._endpoint}; create "
                    "it or open the store with create_bucket=True"
                ) from exc
            if code in _AUTH_CODES:
                raise FailedPrecondition(
                    f"{where} refused to {action} ({code}): check the access key, secret key and bucket policy"
                ) from exc
            if code == "EntityTooLarge":
                raise TooLarge(f"{where} refused to {action}: the object is too large ({exc.message})") from exc
            if code in _INVALID_CODES:
                raise InvalidInput(f"{where} refused to {action} ({code}): {exc.message}") from exc
            if code in _RETRYABLE_CODES or status >= 500:
                raise Unavailable(f"{where} failed to {action} ({code or status}); retry later") from exc
            raise AudiomeshError(f"{where} failed to {action}: {code}: {exc.message}") from exc
        except ServerError as exc:
            raise Unavailable(f"{where} failed to {action}: HTTP {exc.status_code}; retry later") from exc
        except InvalidResponseError as exc:
            raise Unavailable(
                f"{where} sent a non-S3 response while trying to {action}; is the endpoint an S3 server? "
                f"({str(exc)[:200]})"
            ) from exc
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unavailable(
                f"cannot reach S3 endpoint {self._endpoint} to {action}: {type(reason).__name__}: {reason}"
            ) from exc

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
        name = self._name(validate_key(key))
        reader = LimitedReader(stream, key=key, length=length, max_bytes=max_bytes)
        # On any exception inside put_object (TooLarge from the reader included) minio
        # aborts the multipart upload it started before re-raising.
        with self._translate(f"store {key!r}", key):
            result = self._client.put_object(
                self._bucket,
                name,
                cast(BinaryIO, reader),  # minio only calls read(n); LimitedReader is a RawIOBase
                length if length >= 0 else -1,
                content_type=content_type or "application/octet-stream",
                part_size=self._part_size,
                num_parallel_uploads=1,
            )
        _WRITTEN.inc(reader.count)
        return ObjectInfo(
            key=key,
            size=reader.count,
            etag=_strip_etag(result.etag),
            last_modified=_header_time(result.http_headers),
        )

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
        name = self._name(key)
        data = bytes(data)
        # minio's put_object turns unknown headers into x-amz-meta-* user metadata; its
        # lower-level PutObject call sends them as real request headers.
        condition = {"If-None-Match": "*"} if if_none_match else {"If-Match": f'"{(if_match or "").strip(chr(34))}"'}
        headers: dict[str, str | list[str] | tuple[str]] = {"Content-Type": content_type, **condition}
        with self._translate(f"store {key!r}", key):
            try:
                result = self._client._put_object(self._bucket, name, data, headers)
            except S3Error as exc:
                status = getattr(exc.response, "status", 0) or 0
                if exc.code in _PRECONDITION_CODES or status == 412:
                    mine = self._own_write_landed(key, data, exc.response)
                    if mine is not None:
                        _WRITTEN.inc(len(data))
                        return mine
                    raise self._s3_precondition_failed(key, if_match) from exc
                if if_match is not None and exc.code in _NOT_FOUND_CODES:
                    raise self._precondition_failed(key, if_match, None) from exc  # If-Match on a missing key
                raise
        _WRITTEN.inc(len(data))
        return ObjectInfo(
            key=key, size=len(data), etag=_strip_etag(result.etag), last_modified=_header_time(result.http_headers)
        )

    def _own_write_landed(self, key: str, data: bytes, response: Any) -> ObjectInfo | None:
        """The object as this write left it, when a 412 answers urllib3's retry of this very
        request (an earlier attempt reached the store and its answer was lost on the way back,
        e.g. a connection cut while reading it) and the object holds exactly these bytes: the
        condition held for that attempt, so the write stands. None otherwise: a real 412."""
        retries: Any = getattr(response, "retries", None)  # urllib3's Retry: its history is what it retried
        if not (retries is not None and retries.history):
            return None
        try:
            current, info = self.read(key)
        except NotFound:
            return None
        return info if current == data else None

    @staticmethod
    def _s3_precondition_failed(key: str, if_match: str | None) -> PreconditionFailed:
        if if_match is None:
            return PreconditionFailed(f"{key!r} already exists; the write required that it did not (If-None-Match: *)")
        return PreconditionFailed(
            f"{key!r} changed or is gone: the write required etag {if_match.strip(chr(34))} (If-Match); "
            "re-read it and decide again"
        )

    # ---- reading

    def read(self, key: str) -> tuple[bytes, ObjectInfo]:
        name = self._name(validate_key(key))
        with self._translate(f"read {key!r}", key):
            response = self._client.get_object(self._bucket, name)
            try:
                data = response.read()
                headers = response.headers
            finally:
                response.close()
                response.release_conn()
        _READ.inc(len(data))
        # The GET's own headers: the ETag of exactly these bytes, whatever was written since.
        return data, ObjectInfo(
            key=key, size=len(data), etag=_strip_etag(headers.get("ETag")), last_modified=_header_time(headers)
        )

    @contextlib.contextmanager
    def open(self, key: str, *, offset: int = 0) -> Iterator[BinaryIO]:
        name = self._name(validate_key(key))
        with self._translate(f"read {key!r}", key):
            response = self._client.get_object(self._bucket, name, offset=offset)
        try:
            yield _S3Reader(response, self, key)  # type: ignore[misc]
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(validate_key(key))
        with self._translate(f"stat {key!r}", key):
            obj = self._client.stat_object(self._bucket, name)
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            etag=_strip_etag(obj.etag),
            last_modified=obj.last_modified or datetime.now(UTC),
        )

    def _list_raw(self, prefix: str, recursive: bool) -> Iterator:
        validate_prefix(prefix)
        full = self._name(prefix)
        with self._translate(f"list {prefix!r}"):
            yield from self._client.list_objects(self._bucket, prefix=full, recursive=recursive)

    def list(self, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        for obj in self._list_raw(prefix, recursive):
            if obj.is_dir:
                continue
            yield ObjectInfo(
                key=self._key(obj.object_name),
                size=int(obj.size or 0),
                etag=_strip_etag(obj.etag),
                last_modified=obj.last_modified or datetime.now(UTC),
            )

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        for obj in self._list_raw(prefix, recursive=False):
            if obj.is_dir:
                yield self._key(obj.object_name)

    # ---- deleting

    def delete(self, key: str) -> None:
        name = self._name(validate_key(key))
        with self._translate(f"delete {key!r}", key):
            self._client.remove_object(self._bucket, name)

    def delete_prefix(self, prefix: str) -> int:
        self._check_delete_prefix(prefix)
        count = 0
        batch: list[DeleteObject] = []
        for info in self.list(prefix):
            batch.append(DeleteObject(self._name(info.key)))
            if len(batch) == _DELETE_BATCH:
                count += self._remove(batch, prefix)
                batch = []
        if batch:
            count += self._remove(batch, prefix)
        return count

    def _remove(self, batch: Sequence[DeleteObject], prefix: str) -> int:  # `list` here is S3Store.list
        with self._translate(f"delete objects under {prefix!r}"):
            errors = list(self._client.remove_objects(self._bucket, batch))
        failed = [e for e in errors if e.code not in _NOT_FOUND_CODES]
        if failed:
            first = failed[0]
            raise AudiomeshError(
                f"S3 endpoint {self._endpoint} failed to delete {len(failed)} object(s) under {prefix!r}; "
                f"first: {first.name!r}: {first.code}: {first.message}"
            )
        return len(batch) - len(errors)

    # ---- lifecycle

    def close(self) -> None:
        self._http.clear()
