"""The cluster under churn (issue #16), as real processes on 127.0.0.1: 3 orchestrators and 2 of
each worker run the same songs quietly, then again while orchestrators and workers are killed
(-9) and restarted, every orchestrator is SIGTERM-restarted once (a rolling upgrade), and one
job owner is frozen (SIGSTOP) past its lease. audiomesh.churn runs it and reads what the
cluster left: the manifests, the leases and the workers' logs (which lease epoch called each
node, and when). The benchmark (`audiomesh churn`) is the same code with more jobs."""

from __future__ import annotations

import json

import pytest

from audiomesh.churn import (
    Call,
    cancelled_tails,
    duplicate_owners,
    epoch_regressions,
    failures,
    format_table,
    lease_losses,
    run_churn,
)

TTL = 6.0


@pytest.mark.timeout(900)  # 220-240 s measured on a shared 2-core machine (11 processes); more when it is busier
def test_jobs_survive_kills_rolling_restarts_and_a_frozen_owner(tmp_path):
    report = run_churn(
        jobs=8,
        song_seconds=8.0,  # long enough that every fault lands while jobs run
        ttl=TTL,
        orchestrator_kills=2,
        worker_kills=2,
        rolling=True,
        fencing=True,
        seed=16,
        restart_delay=0.5,
        gap_s=0.5,
        work=tmp_path,
        limit_s=400,
        log=print,
    )
    print(format_table(report))
    detail = json.dumps(report, indent=1, default=str)
    # Every planned fault happened while jobs ran (else the run proves nothing).
    assert not report["faults_skipped"], detail
    assert (report["kills_orchestrator"], report["kills_worker"], report["rolling_restarts"]) == (2, 2, 3), detail
    assert report["jobs_lost"] == 0, detail
    assert report["tracks_differ"] == 0, detail
    assert report["duplicate_owners"] == 0, detail
    assert report["worker_calls_checked"] >= 8 * 5, detail  # the logs carried node and lease
    assert report["watch_incomplete"] == [], detail
    assert report["not_taken_over"] == [], detail
    assert report["takeovers_measured"] >= 1, detail
    # The take-over time target (TTL + 5 s) is the benchmark's (`audiomesh churn` exits 1 past it);
    # here, on a CI machine running the rest of the suite beside it, only that it happens in a bound
    # (measured 8-14 s at TTL 6 under that load).
    assert report["takeover_worst_s"] <= 3 * TTL + 5, detail
    fence = report["fencing"]
    assert fence.get("ok"), detail
    assert fence["new_owner"] != fence["owner"], detail
    assert failures(report, timing=False) == []


def test_overlapping_calls_under_two_epochs_count_as_duplicate_owners():
    """The checks themselves: they must be able to fail."""
    calls = {
        ("j", "separation"): [Call(0.0, 5.0, "orchestrator-1@1", "OK"), Call(4.0, 9.0, "orchestrator-2@2", "OK")],
        ("j", "hpss:mix"): [
            Call(0.0, 2.0, "orchestrator-1@1", "OK"),
            Call(2.5, 4.0, "orchestrator-2@2", "OK"),
            Call(3.0, 3.5, "o@2", "OK"),
        ],
        # A cancelled call finishing its chunk after the take-over published nothing: not a duplicate.
        ("j", "normalize"): [Call(0.0, 3.0, "o-1@1", "CANCELLED"), Call(2.0, 4.0, "o-2@2", "OK")],
    }
    found = duplicate_owners(calls)
    assert [(d["node"], d["overlap_s"]) for d in found] == [("separation", 1.0)]
    assert [(d["node"], d["overlap_s"]) for d in cancelled_tails(calls)] == [("normalize", 1.0)]
    events = [
        "2026-01-01T00:00:00.000+00:00 job created from a.wav (1 bytes) on o-1 (lease epoch 1)",
        "2026-01-01T00:00:09.000+00:00 job taken over by o-2 (lease epoch 2)",
        "2026-01-01T00:00:10.000+00:00 job taken over by o-1 (lease epoch 2)",
    ]
    assert epoch_regressions(events) == [events[2]]
    assert epoch_regressions(events[:2]) == []


def test_lease_losses_are_counted_per_job_from_the_json_log(tmp_path):
    log = tmp_path / "orchestrator-1.log"
    lines = [
        {"event": "job lease lost; stopping without writing", "job_id": "a", "reason": "renewal too slow"},
        {"event": "job lease lost; stopping without writing", "job_id": "b"},
        {"event": "job taken over", "job_id": "a"},
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json: job lease lost\n")
    assert lease_losses([log], {"a"}) == 1
    assert lease_losses([log], {"a", "b"}) == 2


@pytest.mark.parametrize("missing", ["jobs_lost", "duplicate_owners"])
def test_failures_name_each_missed_target(missing):
    report = {"jobs_lost": 0, "tracks_differ": 0, "duplicate_owners": 0, "takeover_target_s": 10.0, missing: 1}
    assert [line.split(":")[0] for line in failures(report)] == [missing]
