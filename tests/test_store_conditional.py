"""Conditional writes (put_if) and read(): the same semantics from the file store and from S3
(the real minio client against moto's server, which answers 412 like S3)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from audiomesh.errors import InvalidInput, NotFound, PreconditionFailed
from audiomesh.store import FileStore, ObjectStore, S3Store
from audiomesh.store.file import LOCK_NAME

KEY = "jobs/1/lease"


def test_create_if_absent_succeeds_once(store: ObjectStore) -> None:
    info = store.put_if(KEY, b'{"owner": "a"}', if_none_match=True)
    assert info.etag and info.size == 14
    with pytest.raises(PreconditionFailed, match=r"'jobs/1/lease' already exists"):
        store.put_if(KEY, b'{"owner": "b"}', if_none_match=True)
    assert store.read(KEY) == (b'{"owner": "a"}', store.stat(KEY))
    assert PreconditionFailed.code == "ABORTED"


def test_if_match_current_etag_writes_and_returns_the_new_etag(store: ObjectStore) -> None:
    first = store.put_if(KEY, b'{"epoch": 1}', if_none_match=True)
    second = store.put_if(KEY, b'{"epoch": 2}', if_match=first.etag)
    assert second.etag and second.etag != first.etag
    data, info = store.read(KEY)
    assert data == b'{"epoch": 2}' and info.etag == second.etag == store.stat(KEY).etag
    # S3 hands ETags out quoted; a quoted one matches too.
    third = store.put_if(KEY, b'{"epoch": 3}', if_match=f'"{second.etag}"')
    assert store.stat(KEY).etag == third.etag


def test_stale_etag_is_refused_and_leaves_the_content(store: ObjectStore) -> None:
    first = store.put_if(KEY, b'{"epoch": 1}', if_none_match=True)
    second = store.put_if(KEY, b'{"epoch": 2}', if_match=first.etag)
    with pytest.raises(PreconditionFailed, match=rf"'jobs/1/lease' changed.*{first.etag}"):
        store.put_if(KEY, b'{"epoch": 99}', if_match=first.etag)
    assert store.read(KEY) == (b'{"epoch": 2}', store.stat(KEY))
    assert store.stat(KEY).etag == second.etag
    # A plain write also changes the ETag: a conditional write after it is refused.
    store.put_bytes(KEY, b'{"epoch": 3}')
    with pytest.raises(PreconditionFailed):
        store.put_if(KEY, b'{"epoch": 4}', if_match=second.etag)
    assert store.get_bytes(KEY) == b'{"epoch": 3}'


def test_if_match_on_a_missing_key_is_refused(store: ObjectStore) -> None:
    with pytest.raises(PreconditionFailed, match="'jobs/1/lease'"):
        store.put_if(KEY, b"x", if_match="0123456789abcdef0123456789abcdef")
    assert not store.exists(KEY)
    info = store.put_if(KEY, b"x", if_none_match=True)
    store.delete(KEY)
    with pytest.raises(PreconditionFailed):
        store.put_if(KEY, b"y", if_match=info.etag)  # deleted since: the ETag no longer matches
    assert not store.exists(KEY)


@pytest.mark.parametrize(
    "kwargs", [{}, {"if_match": "abc", "if_none_match": True}, {"if_match": ""}, {"if_match": '""'}]
)
def test_exactly_one_condition(store: ObjectStore, kwargs: dict) -> None:
    with pytest.raises(InvalidInput, match="put_if"):
        store.put_if(KEY, b"x", **kwargs)
    assert not store.exists(KEY)


def test_put_if_checks_the_key(store: ObjectStore) -> None:
    with pytest.raises(InvalidInput, match="'..' segment"):
        store.put_if("jobs/../lease", b"x", if_none_match=True)


def test_read_matches_stat_list_and_put(store: ObjectStore) -> None:
    with pytest.raises(NotFound, match="'jobs/1/manifest.json'"):
        store.read("jobs/1/manifest.json")
    put = store.put_bytes("jobs/1/manifest.json", b'{"state": "QUEUED"}', content_type="application/json")
    data, info = store.read("jobs/1/manifest.json")
    assert data == b'{"state": "QUEUED"}'
    st = store.stat("jobs/1/manifest.json")
    (listed,) = store.list("jobs/1/")
    assert info.etag is not None
    assert info.etag == st.etag == listed.etag == put.etag
    assert (info.key, info.size) == (st.key, st.size) == ("jobs/1/manifest.json", 19)
    assert info.last_modified.tzinfo is not None


def test_read_returns_the_etag_of_the_bytes_it_read(store: ObjectStore) -> None:
    """read()'s ETag belongs to its content even when a write lands right after."""
    store.put_bytes(KEY, b"v0")
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            n += 1
            store.put_bytes(KEY, f"v{n}".encode())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: dict[bytes, set[str | None]] = {}
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            data, info = store.read(KEY)
            assert info.size == len(data)
            seen.setdefault(data, set()).add(info.etag)
    finally:
        stop.set()
        thread.join(10)
    # Each version was written once, so each content has exactly one ETag.
    assert all(len(etags) == 1 for etags in seen.values()), seen


def test_file_store_identical_bytes_get_a_new_etag(tmp_path) -> None:
    store = FileStore(tmp_path)
    etags = {store.put_bytes(KEY, b"same").etag for _ in range(20)}
    etags |= {store.put_if(KEY, b"same", if_match=store.stat(KEY).etag).etag for _ in range(20)}
    assert len(etags) == 40 and None not in etags
    old = store.stat(KEY).etag
    store.put_bytes(KEY, b"same")
    with pytest.raises(PreconditionFailed):
        store.put_if(KEY, b"same", if_match=old)


def test_s3_etag_is_the_content_md5(s3_store: S3Store) -> None:
    """Unlike the file store, S3 gives identical bytes the same ETag (the MD5): a fenced writer
    must make every version's bytes differ (an epoch or sequence number in the content)."""
    a = s3_store.put_bytes(KEY, b"same")
    b = s3_store.put_bytes(KEY, b"same")
    assert a.etag == b.etag == hashlib.md5(b"same").hexdigest()


def test_lock_file_never_listed(tmp_path) -> None:
    store = FileStore(tmp_path)
    store.put_if("a", b"1", if_none_match=True)
    store.put_if("jobs/x/lease", b"1", if_none_match=True)
    assert os.path.exists(tmp_path / LOCK_NAME)
    assert [i.key for i in store.list()] == ["a", "jobs/x/lease"]
    assert [i.key for i in store.list("", recursive=False)] == ["a"]
    assert list(store.list_prefixes()) == ["jobs/"]
    store.delete("a")
    store.delete("jobs/x/lease")
    assert list(store.list()) == [] and list(store.list_prefixes()) == []


def test_threads_racing_if_match_exactly_one_wins(store: ObjectStore) -> None:
    base = store.put_if(KEY, b"base", if_none_match=True)
    n = 8
    barrier = threading.Barrier(n)
    wins: list[int] = []
    losses: list[int] = []
    errors: list[BaseException] = []

    def contender(i: int) -> None:
        try:
            barrier.wait(10)
            store.put_if(KEY, f"winner {i}".encode(), if_match=base.etag)
            wins.append(i)
        except PreconditionFailed:
            losses.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(wins) == 1 and len(losses) == n - 1, (wins, losses, errors)
    assert store.get_bytes(KEY) == f"winner {wins[0]}".encode()


def test_threads_racing_create_exactly_one_wins(store: ObjectStore) -> None:
    n = 8
    barrier = threading.Barrier(n)
    wins: list[int] = []

    def contender(i: int) -> None:
        barrier.wait(10)
        try:
            store.put_if(KEY, f"owner {i}".encode(), if_none_match=True)
            wins.append(i)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1
    assert store.get_bytes(KEY) == f"owner {wins[0]}".encode()


_CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from audiomesh.errors import PreconditionFailed
    from audiomesh.store import FileStore
    root, etag, go, me = sys.argv[1:5]
    store = FileStore(root)
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        pass  # spin: every contender starts within microseconds of the others
    wins = 0
    for i in range(50):  # each round: one shot on the ETag everybody read
        try:
            store.put_if("jobs/1/lease", f"{me} {i}".encode(), if_match=etag)
            wins += 1
        except PreconditionFailed:
            pass
    print(wins)
    """
)


def test_processes_racing_if_match_on_the_file_store_exactly_one_wins(tmp_path) -> None:
    store = FileStore(tmp_path / "store")
    base = store.put_if(KEY, b"base", if_none_match=True)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(store.root), str(base.etag), str(go), f"p{i}"],
            stdout=subprocess.PIPE,
            env=env,
        )
        for i in range(3)
    ]
    time.sleep(1.0)  # let the interpreters start and reach the spin
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    wins = [int(o) for o in outs]
    assert sum(wins) == 1, wins  # 150 attempts on one ETag: exactly one write
    assert store.get_bytes(KEY).endswith(b" 0")


def test_a_delete_waits_for_a_conditional_write_in_flight(tmp_path) -> None:
    """A put_if compares the ETag and renames its new object in place as one step; a delete of
    that key in between would let the write bring the object back into a deleted job's folder
    (a released lease did: CI's test_delete_job_removes_every_object). The delete takes the
    key's conditional-write lock, so it lands before the compare or after the write."""
    store = FileStore(tmp_path / "s")
    lease = store.put_if("jobs/1/lease.json", b"held", if_none_match=True)
    deleted = threading.Event()

    def delete() -> None:
        store.delete("jobs/1/lease.json")
        deleted.set()

    with store._cond_lock("jobs/1/lease.json"):  # a put_if between its compare and its rename
        thread = threading.Thread(target=delete)
        thread.start()
        assert not deleted.wait(0.5)
        store.put_stream("jobs/1/lease.json", io.BytesIO(b"released"), length=8)
    thread.join(timeout=10)
    assert deleted.is_set() and list(store.list("jobs/")) == []
    with pytest.raises(PreconditionFailed):  # and a conditional write after the delete is refused
        store.put_if("jobs/1/lease.json", b"released", if_match=lease.etag)
    assert not (tmp_path / "s" / "jobs").exists()


def test_a_conditional_write_whose_answer_was_lost_stands_when_it_is_retried(s3_server: str) -> None:
    """S3 only: the request reaches the store and is applied, its answer is cut on the way back
    (a TCP proxy drops it), urllib3 retries the PUT, and the retry meets 412 — its own write.
    put_if reports the write it made (the lease renewal a holder would otherwise give up), and a
    real conflict behind a lost answer is still refused."""
    from tests.helpers.proxy import Proxy
    from tests.helpers.s3 import open_test_store

    proxy = Proxy(s3_server)
    store = open_test_store(proxy.address)
    try:
        first = store.put_if(KEY, b'{"epoch": 1}', if_none_match=True)
        proxy.lose_next_answer()
        second = store.put_if(KEY, b'{"epoch": 2}', if_match=first.etag)
        assert proxy.answers_lost == 1
        data, info = store.read(KEY)
        assert data == b'{"epoch": 2}' and second.etag == info.etag != first.etag
        proxy.lose_next_answer()
        created = store.put_if("jobs/2/lease", b'{"owner": "a"}', if_none_match=True)
        assert proxy.answers_lost == 2 and store.read("jobs/2/lease")[1].etag == created.etag
        # A stale ETag is refused at the first attempt; with that answer lost, the retry's 412 is
        # still a conflict: the object holds other bytes.
        proxy.lose_next_answer()
        with pytest.raises(PreconditionFailed, match="changed or is gone"):
            store.put_if(KEY, b'{"epoch": 9}', if_match=first.etag)
        assert proxy.answers_lost == 3 and store.read(KEY)[0] == b'{"epoch": 2}'
    finally:
        store.close()
        proxy.close()
