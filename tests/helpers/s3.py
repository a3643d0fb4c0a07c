"""An S3 server for tests: moto's ThreadedMotoServer on 127.0.0.1, one per session.

moto checks no request signatures, so these tests say nothing about S3 authentication.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

from audiomesh.store import FileStore, ObjectStore, S3Store, open_store

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free port; yield its endpoint ``"127.0.0.1:PORT"``."""
    env = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        env.setenv(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _RUNNING["server"], _RUNNING["port"] = server, port
    try:
        yield f"{host}:{port}"
    finally:
        _RUNNING["server"].stop()
        env.undo()


_RUNNING: dict = {}


def restart_server(downtime: float) -> None:
    """Stop the session's S3 server, wait ``downtime`` seconds, start it again on the same port
    (moto keeps buckets and objects in this process, as a real store keeps them on disk)."""
    _RUNNING["server"].stop()
    time.sleep(downtime)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_RUNNING["port"], verbose=False)
    server.start()
    _RUNNING["server"] = server


def open_test_store(endpoint: str, bucket: str | None = None, prefix: str = "") -> S3Store:
    bucket = bucket or f"test-{uuid.uuid4().hex[:20]}"
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    store = open_store(url, s3_endpoint=endpoint, s3_access_key=ACCESS_KEY, s3_secret_key=SECRET_KEY, s3_region=REGION)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def s3_store(s3_server: str) -> Iterator[S3Store]:
    """An S3Store on a fresh, empty bucket of the session's moto server."""
    store = open_test_store(s3_server)
    try:
        yield store
    finally:
        store.close()


def boto3_client(endpoint: str):
    """An independent client (boto3, shipped with moto) to check what the server holds."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def incomplete_uploads(endpoint: str, bucket: str) -> list[dict]:
    """Multipart uploads started and neither completed nor aborted."""
    return boto3_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[ObjectStore]:
    """The same test on both backends: a file store in ``tmp_path``, and S3 (the real minio client
    against the session's moto server)."""
    if request.param == "file":
        with FileStore(tmp_path / "store") as s:
            yield s
    else:
        yield request.getfixturevalue("s3_store")
