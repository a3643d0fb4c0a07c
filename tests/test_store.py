"""Object store: the same behaviour from the file backend and the S3 backend (on moto)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import numpy as np
import pytest

from audiomesh.errors import FailedPrecondition, InvalidInput, NotFound, TooLarge, Unavailable
from audiomesh.hashing import sha256_chunks
from audiomesh.store import FileStore, ObjectStore, S3Store, open_store, sanitize_filename, validate_key
from tests.helpers.s3 import boto3_client, closed_port, incomplete_uploads, open_test_store

MiB = 1 << 20


def _chunks(total: int, chunk: int = MiB, seed: int = 0) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes, generated on the fly."""
    rng = np.random.default_rng(seed)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield rng.bytes(n)
        sent += n


def _files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _assert_nothing_left(store: ObjectStore, key: str) -> None:
    assert not store.exists(key)
    assert list(store.list()) == []
    if isinstance(store, FileStore):
        assert _files_under(store.root) == [], "temp files or directories left behind"
        assert os.listdir(store.root) == []
    elif isinstance(store, S3Store):
        assert incomplete_uploads(store.endpoint, store.bucket) == []


# --------------------------------------------------------------------------- basics


def test_put_get_stat_exists(store: ObjectStore) -> None:
    info = store.put_bytes("jobs/1/manifest.json", b'{"a": 1}', content_type="application/json")
    assert (info.key, info.size) == ("jobs/1/manifest.json", 8)
    assert info.last_modified.tzinfo is not None
    assert store.get_bytes("jobs/1/manifest.json") == b'{"a": 1}'
    st = store.stat("jobs/1/manifest.json")
    assert (st.key, st.size) == ("jobs/1/manifest.json", 8)
    assert isinstance(st.last_modified, datetime) and st.last_modified.tzinfo is not None
    assert abs((st.last_modified - info.last_modified).total_seconds()) < 5
    if isinstance(store, S3Store):
        assert st.etag == hashlib.md5(b'{"a": 1}').hexdigest() == info.etag
    assert store.exists("jobs/1/manifest.json")
    assert not store.exists("jobs/1/other.json")
    # Overwrite replaces.
    store.put_bytes("jobs/1/manifest.json", b"second")
    assert store.get_bytes("jobs/1/manifest.json") == b"second"
    assert store.stat("jobs/1/manifest.json").size == 6


def test_empty_object(store: ObjectStore) -> None:
    assert store.put_bytes("empty", b"").size == 0
    assert store.get_bytes("empty") == b""
    assert list(store.iter_chunks("empty")) == []


def test_open_and_iter_chunks_stream(store: ObjectStore) -> None:
    data = bytes(range(256)) * 1000
    store.put_bytes("a/b.bin", data)
    with store.open("a/b.bin") as f:
        assert f.read(10) == data[:10]
        assert f.read() == data[10:]
    chunks = list(store.iter_chunks("a/b.bin", chunk_size=100_000))
    assert [len(c) for c in chunks] == [100_000, 100_000, 56_000]
    assert b"".join(chunks) == data
    with pytest.raises(InvalidInput, match="chunk_size"):
        next(store.iter_chunks("a/b.bin", chunk_size=0))


def test_put_file_get_to_file(store: ObjectStore, tmp_path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB + 17))
    info = store.put_file("jobs/x/input/song.wav", src)
    assert info.size == 3 * MiB + 17
    dest = tmp_path / "out" / "deep" / "copy.bin"  # parents are created
    got = store.get_to_file("jobs/x/input/song.wav", dest)
    assert got.size == info.size
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(os.listdir(dest.parent)) == ["copy.bin"]  # no temp file left
    with pytest.raises(NotFound, match="nope.wav"):
        store.get_to_file("jobs/x/input/nope.wav", tmp_path / "never.wav")
    assert not (tmp_path / "never.wav").exists()


def test_put_stream_file_like_short_reads(store: ObjectStore) -> None:
    class Trickle(io.RawIOBase):
        """Returns at most 1000 bytes per read, like a socket."""

        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self._data.read(min(n, 1000) if n >= 0 else 1000)

    data = os.urandom(123_457)
    info = store.put_stream("t/trickle", Trickle(data))
    assert info.size == len(data)
    assert store.get_bytes("t/trickle") == data


def test_put_stream_length_mismatch(store: ObjectStore) -> None:
    with pytest.raises(InvalidInput, match="ended after 10 bytes; its declared length was 20"):
        store.put_stream("short", io.BytesIO(b"0123456789"), length=20)
    assert not store.exists("short")
    # A longer stream is cut at ``length``, like an HTTP body with Content-Length.
    store.put_stream("long", io.BytesIO(b"0123456789"), length=4)
    assert store.get_bytes("long") == b"0123"


def test_stream_40mib_generator(store: ObjectStore) -> None:
    total = 40 * MiB
    expected = sha256_chunks(_chunks(total))
    info = store.put_stream("big/blob.bin", _chunks(total), content_type="audio/wav")
    assert info.size == total
    assert store.stat("big/blob.bin").size == total
    assert sha256_chunks(store.iter_chunks("big/blob.bin")) == expected
    if isinstance(store, S3Store):
        # Streamed as a 3-part multipart upload (16 + 16 + 8 MiB), not one PUT.
        assert info.etag is not None and info.etag.endswith("-3")
        assert incomplete_uploads(store.endpoint, store.bucket) == []


# --------------------------------------------------------------------------- limits


def test_max_bytes_multipart_leaves_nothing(store: ObjectStore) -> None:
    with pytest.raises(TooLarge, match=r"'up/big\.wav' is larger than the limit of 20971520 bytes \(20\.0 MiB\)"):
        store.put_stream("up/big.wav", _chunks(40 * MiB), max_bytes=20 * MiB)
    _assert_nothing_left(store, "up/big.wav")


def test_max_bytes_small_stream_leaves_nothing(store: ObjectStore) -> None:
    with pytest.raises(TooLarge, match="limit of 10 bytes"):
        store.put_stream("up/small.wav", io.BytesIO(b"x" * 100), max_bytes=10)
    _assert_nothing_left(store, "up/small.wav")


def test_max_bytes_known_length_fails_before_reading(store: ObjectStore) -> None:
    consumed = []

    def gen() -> Iterator[bytes]:
        consumed.append(True)
        yield b"x" * 100

    with pytest.raises(TooLarge):
        store.put_stream("up/k.wav", gen(), length=100, max_bytes=99)
    assert consumed == []
    _assert_nothing_left(store, "up/k.wav")


def test_max_bytes_keeps_existing_object(store: ObjectStore) -> None:
    store.put_bytes("keep/me", b"old")
    with pytest.raises(TooLarge):
        store.put_stream("keep/me", _chunks(2 * MiB), max_bytes=MiB)
    assert store.get_bytes("keep/me") == b"old"


def test_max_bytes_exact_limit_is_allowed(store: ObjectStore) -> None:
    assert store.put_stream("exact", io.BytesIO(b"x" * 10), max_bytes=10).size == 10


# --------------------------------------------------------------------------- atomicity


def test_put_bytes_is_atomic_for_readers(store: ObjectStore) -> None:
    versions = [bytes([65 + i]) * (50_000 + 7919 * i) for i in range(4)]
    store.put_bytes("jobs/j/manifest.json", versions[0])
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.put_bytes("jobs/j/manifest.json", versions[i % len(versions)])

    def reader() -> None:
        while not stop.is_set():
            data = store.get_bytes("jobs/j/manifest.json")
            if data not in versions:
                errors.append(f"partial read: {len(data)} bytes")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert [i.key for i in store.list()] == ["jobs/j/manifest.json"]


def test_file_store_temp_file_hidden_while_writing(tmp_path) -> None:
    store = FileStore(tmp_path / "s")
    store.put_bytes("d/k", b"old")
    seen: dict[str, object] = {}

    def gen() -> Iterator[bytes]:
        yield b"new-"
        # Mid-write: a temp file exists on disk, but neither list() nor readers see it.
        seen["files"] = _files_under(store.root)
        seen["keys"] = [i.key for i in store.list()]
        seen["content"] = store.get_bytes("d/k")
        yield b"content"

    store.put_stream("d/k", gen())
    assert len(seen["files"]) == 2 and any(f.startswith("d/.amtmp-") for f in seen["files"])
    assert seen["keys"] == ["d/k"]
    assert seen["content"] == b"old"
    assert store.get_bytes("d/k") == b"new-content"
    assert _files_under(store.root) == ["d/k"]


def test_file_store_put_failure_leaves_no_temp_or_dirs(tmp_path) -> None:
    store = FileStore(tmp_path / "s")

    def gen() -> Iterator[bytes]:
        yield b"abc"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        store.put_stream("a/b/c/d.bin", gen())
    assert os.listdir(store.root) == []


def test_file_store_modes_and_layout(tmp_path) -> None:
    store = FileStore(tmp_path / "root" / "nested")  # created if missing
    store.put_bytes("jobs/1/x.wav", b"1")
    path = tmp_path / "root" / "nested" / "jobs" / "1" / "x.wav"
    assert path.read_bytes() == b"1"
    assert path.stat().st_mode & 0o777 == 0o644
    assert store.url == (tmp_path / "root" / "nested").as_uri()


def test_file_store_key_and_prefix_conflict(tmp_path) -> None:
    store = FileStore(tmp_path / "s")
    store.put_bytes("a", b"file")
    with pytest.raises(FailedPrecondition, match="'a' is an object"):
        store.put_bytes("a/b", b"x")
    store.put_bytes("c/d", b"x")
    with pytest.raises(FailedPrecondition, match="keys below 'c/' exist"):
        store.put_bytes("c", b"x")
    assert not store.exists("c")  # a directory is not an object
    with pytest.raises(NotFound):
        store.get_bytes("c")


# --------------------------------------------------------------------------- list / delete


def _populate(store: ObjectStore) -> list[str]:
    keys = ["a-c", "a/b", "a/a", "A", "z", "é", "jobs/1/in.wav", "jobs/1/m.json", "jobs/2/m.json", "jobs/10/m"]
    for k in keys:
        store.put_bytes(k, k.encode())
    return keys


def test_list_sorted_like_s3(store: ObjectStore) -> None:
    keys = _populate(store)
    listed = list(store.list())
    assert [i.key for i in listed] == sorted(keys)  # UTF-8 byte order: 'a-c' < 'a/a', 'z' < 'é'
    assert [i.key for i in listed][:4] == ["A", "a-c", "a/a", "a/b"]
    assert {i.key: i.size for i in listed}["jobs/10/m"] == len("jobs/10/m")
    assert [i.key for i in store.list("jobs/1")] == ["jobs/1/in.wav", "jobs/1/m.json", "jobs/10/m"]
    assert [i.key for i in store.list("jobs/1/")] == ["jobs/1/in.wav", "jobs/1/m.json"]
    assert [i.key for i in store.list("a", recursive=False)] == ["a-c"]
    assert [i.key for i in store.list("", recursive=False)] == ["A", "a-c", "z", "é"]
    assert list(store.list("missing/")) == []
    assert list(store.list_prefixes("jobs/")) == ["jobs/1/", "jobs/10/", "jobs/2/"]
    assert list(store.list_prefixes()) == ["a/", "jobs/"]


def test_delete_and_delete_prefix(store: ObjectStore) -> None:
    keys = _populate(store)
    store.delete("a/a")
    store.delete("a/a")  # missing is fine
    store.delete("never/was")
    assert not store.exists("a/a")
    assert store.delete_prefix("jobs/1/") == 2
    assert store.delete_prefix("jobs/1/") == 0
    assert [i.key for i in store.list("jobs/")] == ["jobs/10/m", "jobs/2/m.json"]
    assert store.delete_prefix("jobs/") == 2
    remaining = sorted(set(keys) - {"a/a"} - {k for k in keys if k.startswith("jobs/")})
    assert [i.key for i in store.list()] == remaining
    with pytest.raises(InvalidInput, match="non-empty prefix"):
        store.delete_prefix("")


def test_file_store_delete_prunes_empty_dirs(tmp_path) -> None:
    store = FileStore(tmp_path / "s")
    store.put_bytes("jobs/1/stems/vocals.wav", b"v")
    store.put_bytes("jobs/1/manifest.json", b"m")
    store.delete("jobs/1/stems/vocals.wav")
    assert sorted(os.listdir(tmp_path / "s" / "jobs" / "1")) == ["manifest.json"]
    store.delete_prefix("jobs/")
    assert os.listdir(tmp_path / "s") == []  # a delete makes no lock file where no conditional write did
    assert (tmp_path / "s").is_dir()  # the root itself stays


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("", "empty"),
        ("/abs/key", "starts with '/'"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("a/../b", "'..' segment"),
        ("./a", "'.' segment"),
        ("a\\b", "backslash"),
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("x" * 1025, "1025 bytes in UTF-8; the limit is 1024"),
        ("é" * 513, "1026 bytes"),
        ("d/.amtmp-x.tmp", "reserved"),
    ],
)
def test_key_validation(store: ObjectStore, key: str, rule: str) -> None:
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.stat(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidInput, match=f"key .*{rule}") as exc_info:
            call()
        assert repr(key[:60]) in str(exc_info.value)


def test_validate_key_accepts() -> None:
    for key in ["a", "jobs/0b3c/input/My_Song.wav", ".hidden", "a..b/c.", "x" * 1024, "日本/語.wav"]:
        assert validate_key(key) == key


def test_prefix_validation(store: ObjectStore) -> None:
    with pytest.raises(InvalidInput, match="prefix '../'"):
        list(store.list("../"))
    with pytest.raises(InvalidInput, match="prefix '/jobs'"):
        store.delete_prefix("/jobs")


def test_not_found_messages(store: ObjectStore) -> None:
    for call in (
        lambda: store.stat("jobs/x/missing.wav"),
        lambda: store.get_bytes("jobs/x/missing.wav"),
        lambda: store.open("jobs/x/missing.wav").__enter__(),
        lambda: next(store.iter_chunks("jobs/x/missing.wav")),
    ):
        with pytest.raises(NotFound, match="no object with key 'jobs/x/missing.wav'"):
            call()


# --------------------------------------------------------------------------- open_store


def test_open_store_file_urls(tmp_path) -> None:
    by_url = open_store((tmp_path / "a b").as_uri())
    assert isinstance(by_url, FileStore) and by_url.root == str(tmp_path / "a b")
    bare = open_store(str(tmp_path / "bare"))
    assert isinstance(bare, FileStore) and (tmp_path / "bare").is_dir()
    with pytest.raises(InvalidInput, match="three slashes"):
        open_store("file://data/x")


@pytest.mark.parametrize("url", ["ftp://host/x", "gs://bucket", "http://minio:9000/bucket"])
def test_open_store_unknown_scheme(url: str) -> None:
    with pytest.raises(InvalidInput, match=r"unsupported scheme .*supported: file://, s3://"):
        open_store(url)


def test_open_store_s3_argument_errors() -> None:
    with pytest.raises(InvalidInput, match="needs an S3 endpoint"):
        open_store("s3://bucket")
    with pytest.raises(InvalidInput, match="bucket name 'B_ad' is invalid"):
        open_store("s3://B_ad", s3_endpoint="127.0.0.1:9")
    with pytest.raises(InvalidInput, match="no path"):
        open_store("s3://bucket", s3_endpoint="http://host:9000/path")


def test_s3_unreachable_endpoint_is_unavailable() -> None:
    endpoint = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"cannot reach S3 endpoint {endpoint}"):
        open_store("s3://bucket", s3_endpoint=endpoint, s3_access_key="k", s3_secret_key="s")
    lazy = open_store("s3://bucket", s3_endpoint=endpoint, s3_access_key="k", s3_secret_key="s", create_bucket=False)
    with pytest.raises(Unavailable, match=endpoint):
        lazy.stat("a")
    with pytest.raises(Unavailable, match=endpoint):
        lazy.put_stream("a", _chunks(MiB))
    assert time.monotonic() - started < 10


def test_s3_prefix_and_url(s3_server: str) -> None:
    store = open_test_store(s3_server, prefix="tenant/one")
    assert store.url == f"s3://{store.bucket}/tenant/one"
    store.put_bytes("jobs/1/m.json", b"{}")
    names = [o["Key"] for o in boto3_client(s3_server).list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert names == ["tenant/one/jobs/1/m.json"]
    assert [i.key for i in store.list()] == ["jobs/1/m.json"]
    assert list(store.list_prefixes()) == ["jobs/"]
    other = open_test_store(s3_server, bucket=store.bucket)  # same bucket, no prefix
    assert [i.key for i in other.list()] == ["tenant/one/jobs/1/m.json"]
    assert store.delete_prefix("jobs/") == 1


def test_s3_missing_bucket_without_create(s3_server: str) -> None:
    store = open_store(
        "s3://no-such-bucket-here", s3_endpoint=s3_server, s3_access_key="k", s3_secret_key="s",
        s3_region="us-east-1", create_bucket=False,
    )  # fmt: skip
    with pytest.raises(FailedPrecondition, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_bytes("a", b"x")


# --------------------------------------------------------------------------- sanitize_filename


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("song.wav", "song.wav"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\My Song (live).MP3", "My_Song_live.MP3"),
        ("", "input"),
        (".", "input"),
        ("..", "input"),
        ("...", "input"),
        (".wav", "wav"),
        ("a\x00b\x1f.flac", "ab.flac"),
        ("Café 歌.flac", "Café_歌.flac"),
        ("semi;colon|pipe.ogg", "semi_colon_pipe.ogg"),
        ("name.with.dots.wav", "name.with.dots.wav"),
        ("no_ext", "no_ext"),
        ("weird.ext with space", "weird.ext_with_space"),
        ("/", "input"),
        (".amtmp-x.tmp", "amtmp-x.tmp"),
    ],
)
def test_sanitize_filename(name: str, expected: str) -> None:
    out = sanitize_filename(name)
    assert out == expected
    validate_key(f"jobs/id/input/{out}")


def test_sanitize_filename_caps_length() -> None:
    out = sanitize_filename("x" * 500 + ".wav")
    assert len(out) == 120 and out.endswith(".wav")
    wide = sanitize_filename("語" * 200 + ".flac")
    assert len(wide.encode()) <= 240 and wide.endswith(".flac")


def test_s3_endpoint_as_url(s3_server: str) -> None:
    with open_test_store(f"http://{s3_server}") as store:
        assert store.endpoint == s3_server
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"


@pytest.mark.parametrize(("start", "length"), [(0, None), (0, 10), (5, 7), (4090, None), (4095, 1), (4000, 96)])
def test_ranged_reads(store: ObjectStore, start: int, length: int | None) -> None:
    data = bytes(range(256)) * 16  # 4096 bytes
    store.put_bytes("r/obj.bin", data)
    got = b"".join(store.iter_chunks("r/obj.bin", 3, start=start, length=length))
    assert got == data[start : None if length is None else start + length]
