"""Job leases on the object store: claim, renew, release, take-over after a TTL of silence, and the
holder's own deadline — on the file store and on S3 (the real minio client against moto's server).

Time is passed explicitly (``now=``) where the rule is about durations, so nothing sleeps a TTL."""

from __future__ import annotations

import math
import threading
import time

import pytest

from audiomesh.services.orchestrator.lease import Lease, LeaseDoc, LeaseLost, Leases, lease_key
from audiomesh.store import ObjectStore

JOB = "2b1e4c64-2d7f-4d3e-9a57-3f1d2a0b9c11"
TTL = 15.0


def now_whole() -> float:
    """The clock in whole seconds: ``t0 + TTL + TTL`` and ``t0 + 2 * TTL`` are then the same float
    (with a fractional ``t0`` they can differ in the last bit, and a check exactly at the TTL
    boundary failed on CI)."""
    return float(math.floor(time.monotonic()))


def doc(store: ObjectStore) -> LeaseDoc:
    data, _ = store.read(lease_key(JOB))
    parsed = LeaseDoc.loads(data)
    assert parsed is not None
    return parsed


def race_to_take(store: ObjectStore, n: int = 6) -> list[Lease]:
    """``n`` replicas try to take the job at the same moment (threads at a barrier); the winners."""
    replicas = [Leases(store, f"r{i}", TTL) for i in range(n)]
    results: list[Lease | None] = [None] * n
    barrier = threading.Barrier(n)

    def take(i: int) -> None:
        barrier.wait()
        results[i] = replicas[i].try_take(JOB)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return [r for r in results if r is not None]


def test_claim_is_exclusive_and_renewal_keeps_it(store: ObjectStore) -> None:
    a, b = Leases(store, "a", TTL), Leases(store, "b", TTL)
    lease = a.claim_new(JOB)
    assert (lease.epoch, lease.owner) == (1, "a") and doc(store) == LeaseDoc("a", 1, TTL)
    with pytest.raises(LeaseLost):
        b.claim_new(JOB)
    renewed = a.renew(lease)
    assert renewed.etag != lease.etag and renewed.epoch == 1 and doc(store).renewals == 1
    with pytest.raises(LeaseLost):  # the old ETag is stale now: a second renewal from it fails
        a.renew(lease)
    # A held lease is not taken, however often a peer looks within a TTL.
    t0 = now_whole()
    assert b.try_take(JOB, now=t0) is None
    assert b.try_take(JOB, now=t0 + TTL - 0.01) is None


def test_take_over_after_a_ttl_of_silence_fences_the_old_holder(store: ObjectStore) -> None:
    a, b = Leases(store, "a", TTL), Leases(store, "b", TTL)
    lease = a.claim_new(JOB)
    t0 = now_whole()
    assert b.try_take(JOB, now=t0) is None  # first sighting of this ETag starts b's clock
    taken = b.try_take(JOB, now=t0 + TTL)
    assert taken is not None and (taken.owner, taken.epoch) == ("b", 2) and doc(store).owner == "b"
    with pytest.raises(LeaseLost):  # the old holder's renewal (If-Match its ETag) now fails
        a.renew(lease)
    assert not a.release(lease) and doc(store).owner == "b"  # nor can it release b's lease


def test_a_renewal_restarts_the_observers_clock(store: ObjectStore) -> None:
    a, b = Leases(store, "a", TTL), Leases(store, "b", TTL)
    lease = a.claim_new(JOB)
    t0 = now_whole()
    assert b.try_take(JOB, now=t0) is None
    a.renew(lease)
    assert b.try_take(JOB, now=t0 + TTL) is None  # a new ETag: seen for the first time now
    assert b.try_take(JOB, now=t0 + 2 * TTL - 0.01) is None
    assert b.try_take(JOB, now=t0 + 2 * TTL) is not None


def test_released_lease_is_taken_at_once(store: ObjectStore) -> None:
    a, b = Leases(store, "a", TTL), Leases(store, "b", TTL)
    lease = a.claim_new(JOB)
    assert a.release(lease) and doc(store).released
    taken = b.try_take(JOB)
    assert taken is not None and taken.epoch == 2 and not doc(store).released


def test_a_job_without_a_lease_is_claimed_once(store: ObjectStore) -> None:
    """Manifests from before leases: the first replica to look claims them, exactly one wins."""
    winners = race_to_take(store)
    assert len(winners) == 1 and doc(store).owner == winners[0].owner


def test_racing_take_overs_have_one_winner(store: ObjectStore) -> None:
    a = Leases(store, "a", TTL)
    a.release(a.claim_new(JOB))
    winners = race_to_take(store)
    assert len(winners) == 1 and winners[0].epoch == 2 and doc(store).owner == winners[0].owner


def test_the_holder_stops_before_anyone_can_take_over() -> None:
    """The holder's deadline (2/3 TTL after it sent its last write) falls before the earliest
    take-over (a whole TTL after an observer first saw that write's ETag, which is after it was sent)."""
    sent = 100.0
    lease = Lease(JOB, "a", 1, TTL, "etag", sent_at=sent)
    assert lease.valid(sent + TTL * 2 / 3 - 0.001)
    assert not lease.valid(sent + TTL * 2 / 3)
    earliest_take_over = sent + TTL  # observer's first sighting >= sent
    assert lease.remaining(sent) == pytest.approx(TTL * 2 / 3) and sent + TTL * 2 / 3 < earliest_take_over


def test_a_longer_holder_ttl_is_respected(store: ObjectStore) -> None:
    """An observer configured with a shorter TTL waits the holder's own (mixed settings in a rollout)."""
    Leases(store, "a", 60.0).claim_new(JOB)
    b = Leases(store, "b", 5.0)
    t0 = now_whole()
    assert b.try_take(JOB, now=t0) is None
    assert b.try_take(JOB, now=t0 + 30) is None
    assert b.try_take(JOB, now=t0 + 60) is not None


def test_an_unreadable_lease_is_freed_only_by_silence(store: ObjectStore) -> None:
    store.put_bytes(lease_key(JOB), b"not json")
    b = Leases(store, "b", TTL)
    t0 = now_whole()
    assert b.try_take(JOB, now=t0) is None
    taken = b.try_take(JOB, now=t0 + TTL)
    assert taken is not None and taken.epoch == 1
