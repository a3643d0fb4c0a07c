"""HTTP uploads that fail half-way end their UploadAudio call and leave nothing behind.

Each case runs against the shared mesh's real gateway. Uploads stream straight into the store
(never through the orchestrator's disk): afterwards the store holds no temp file of an upload
in flight and no new object, the orchestrator's scratch folder
(``<tmp>/audiomesh-scratch/<pid>/``) holds no ``upload-*`` spool file (there are none any more),
and the orchestrator has logged the UploadAudio call as ended (its "rpc" access-log line).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from audiomesh import scratch
from tests.helpers.mesh import new_stored_files, stored_files, write_song

UPLOAD = "/audiomesh.v1.OrchestratorService/UploadAudio"
BOUNDARY = "leakboundary"


@pytest.fixture(scope="module")
def http(gateway_url):
    with httpx.Client(base_url=gateway_url, timeout=60) as client:
        yield client


def spool_files(mesh) -> list[Path]:
    folder = scratch.root() / str(mesh.procs["orchestrator"].pid)
    return sorted(folder.glob("upload-*")) if folder.is_dir() else []


def store_temp_files(mesh) -> list[Path]:
    """The file store's temp files below jobs/: an upload being streamed in."""
    root = Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://")) / "jobs"
    return sorted(root.rglob(".amtmp-*")) if root.is_dir() else []


def upload_calls_ended(mesh) -> list[dict]:
    lines = (mesh.log_dir / "orchestrator.log").read_text().splitlines()
    events = [json.loads(x) for x in lines if UPLOAD in x and x.startswith("{")]
    return [e for e in events if e.get("event") == "rpc"]


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def assert_call_ended_and_nothing_spooled(mesh, calls_before: int) -> None:
    assert wait_until(lambda: len(upload_calls_ended(mesh)) > calls_before), "UploadAudio is still in flight"
    assert wait_until(lambda: not spool_files(mesh)), f"spool files left: {spool_files(mesh)}"
    assert wait_until(lambda: not store_temp_files(mesh)), f"store temp files left: {store_temp_files(mesh)}"


def file_part(filename: str = "song.wav") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()


def field_part(name: str, value: str) -> bytes:
    return f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def test_field_after_the_file_is_400_and_creates_nothing(http, file_mesh, tmp_path):
    before = upload_calls_ended(file_mesh)
    stored_before = stored_files(file_mesh)
    song = write_song(tmp_path / "s.wav", 3.0).read_bytes()
    body = file_part() + song + field_part("model", "demucs_unittest") + f"\r\n--{BOUNDARY}--\r\n".encode()
    resp = http.post("/v1/jobs:upload", content=body, headers=HEADERS)
    assert resp.status_code == 400, resp.text
    assert "must come before the file" in resp.json()["message"]
    assert_call_ended_and_nothing_spooled(file_mesh, len(before))
    # The call was cancelled, not completed: no job was made from a refused request.
    assert not new_stored_files(file_mesh, stored_before)


def test_client_disconnect_mid_upload_ends_the_call(file_mesh):
    before = upload_calls_ended(file_mesh)
    stored_before = stored_files(file_mesh)
    host, port = file_mesh.addresses["gateway"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v1/jobs:upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {4 << 20}\r\n\r\n"
        ).encode()
        sock.sendall(head + file_part() + b"RIFF" + b"\0" * (512 * 1024))
        # The orchestrator is streaming this upload into the store: then the client goes away.
        assert wait_until(lambda: bool(store_temp_files(file_mesh)), 10), "the upload never reached the store"
        assert not spool_files(file_mesh), "the upload was spooled to the orchestrator's disk"
    assert_call_ended_and_nothing_spooled(file_mesh, len(before))
    assert not new_stored_files(file_mesh, stored_before)


def test_chunked_upload_over_the_limit_is_413_and_ends_the_call(http, file_mesh):
    """The mesh runs with an 8 MiB limit; a chunked body (no Content-Length) of 9 MiB."""
    before = upload_calls_ended(file_mesh)

    def multipart():
        yield file_part("big.wav") + b"RIFF"
        for _ in range(9):
            yield b"\0" * (1 << 20)
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    resp = http.post("/v1/jobs:upload", content=multipart(), headers=HEADERS)
    assert resp.status_code == 413, resp.text
    assert_call_ended_and_nothing_spooled(file_mesh, len(before))


def test_early_refusal_of_a_large_upload_answers_at_once(http, file_mesh):
    """The orchestrator refuses at the metadata (unknown model) while megabytes still arrive:
    the gateway stops queueing chunks nobody reads and answers the refusal."""
    before = upload_calls_ended(file_mesh)
    body = field_part("model", "kazoo")[2:] + b"\r\n" + file_part() + b"RIFF" + b"\0" * (6 << 20)
    body += f"\r\n--{BOUNDARY}--\r\n".encode()
    resp = http.post("/v1/jobs:upload", content=body, headers=HEADERS, timeout=30)
    assert resp.status_code == 404, resp.text
    assert "kazoo" in resp.json()["message"]
    assert_call_ended_and_nothing_spooled(file_mesh, len(before))
