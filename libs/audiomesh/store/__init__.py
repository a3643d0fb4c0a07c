"""Object storage: one synchronous interface, two backends chosen by URL.

>>> store = open_store("file:///var/lib/audiomesh")          # doctest: +SKIP
>>> store = open_store("s3://audiomesh/prod", s3_endpoint="minio:9000",
...                    s3_access_key="...", s3_secret_key="...")  # doctest: +SKIP

Services call the (blocking) methods through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from audiomesh.errors import InvalidInput

from .base import ObjectInfo, ObjectStore, sanitize_filename, validate_key, validate_prefix
from .file import FileStore

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = [
    "FileStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "SUPPORTED_SCHEMES",
    "open_store",
    "sanitize_filename",
    "validate_key",
    "validate_prefix",
]

SUPPORTED_SCHEMES = ("file://", "s3://")


def __getattr__(name: str) -> Any:
    # The S3 client (minio) loads only where an s3:// store is used: every service process
    # imports this package, most run on a file store (half a CPU second each at start-up).
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(
    url: str,
    *,
    s3_endpoint: str | None = None,
    s3_access_key: str | None = None,
    s3_secret_key: str | None = None,
    s3_region: str | None = None,
    s3_secure: bool = False,
    create_bucket: bool = True,
    s3_connect_timeout: float = 5.0,
    s3_retries: int = 3,
) -> ObjectStore:
    """Open the store that ``url`` names.

    Parameters
    ----------
    url : str
        ``file:///abs/path`` (or a bare path, absolute or relative) for a :class:`FileStore`;
        ``s3://bucket`` or ``s3://bucket/prefix`` for an :class:`S3Store`.
    s3_endpoint, s3_access_key, s3_secret_key, s3_region, s3_secure
        Connection settings for ``s3://`` (ignored for files). The endpoint is required.
    create_bucket : bool
        Create the S3 bucket if it is missing (contacts the server now).
    s3_connect_timeout, s3_retries
        Connection timeout (s) and retry count for connection errors and 5xx responses.

    Raises
    ------
    InvalidInput
        Unknown scheme (the message lists the supported ones) or a malformed URL.
    Unavailable
        ``create_bucket=True`` and the S3 endpoint cannot be reached.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"store URL is empty; use one of {', '.join(SUPPORTED_SCHEMES)}")
    url = url.strip()
    if "://" not in url:
        return FileStore(os.path.expanduser(url))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(
                f"store URL {url!r} names host {parts.netloc!r}; a file:// URL needs an absolute path "
                "like file:///var/lib/audiomesh (three slashes)"
            )
        path = unquote(parts.path)
        if not path:
            raise InvalidInput(f"store URL {url!r} has no path; use file:///abs/path")
        return FileStore(path)
    if scheme == "s3":
        if not parts.netloc:
            raise InvalidInput(f"store URL {url!r} has no bucket; use s3://bucket or s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise InvalidInput(f"store URL {url!r} has a query or fragment; use s3://bucket[/prefix]")
        from .s3 import S3Store

        return S3Store(
            parts.netloc,
            unquote(parts.path).strip("/"),
            endpoint=s3_endpoint or "",
            access_key=s3_access_key,
            secret_key=s3_secret_key,
            region=s3_region,
            secure=s3_secure,
            create_bucket=create_bucket,
            connect_timeout=s3_connect_timeout,
            retries=s3_retries,
        )
    raise InvalidInput(
        f"store URL {url!r} has unsupported scheme {parts.scheme + '://'!r}; supported: "
        f"{', '.join(SUPPORTED_SCHEMES)} (or a bare path for a file store)"
    )
