"""Pinned workers (``Mesh(pin=...)``, ``audiomesh bench --separation-workers N --pin``): each
instance gets its own contiguous share of the cores, and bad counts are refused before anything
starts. The pinned processes themselves are checked in tests/test_bench.py (the CPUs and thread
budget each separation worker of the split run really got)."""

from __future__ import annotations

import argparse
import os

import pytest

from audiomesh.bench import add_arguments, check_split, cmd_bench
from audiomesh.errors import ConfigError
from audiomesh.launcher import Mesh, pin_cores


@pytest.mark.parametrize("cores", [[0], [0, 1], [2, 3, 5, 7, 8], list(range(16))])
def test_pin_cores_cuts_the_cores_into_near_equal_contiguous_disjoint_sets(cores: list[int]) -> None:
    for count in range(1, len(cores) + 1):
        sets = pin_cores("separation", count, cores)
        assert len(sets) == count
        assert [c for s in sets for c in s] == cores  # in order, each core once, none left out
        sizes = [len(s) for s in sets]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_pin_cores_refuses_more_instances_than_cores() -> None:
    with pytest.raises(ConfigError, match="separation runs 3 instances but only 2 CPUs are usable"):
        pin_cores("separation", 3, [0, 1])
    with pytest.raises(ConfigError, match="at least 1 instance"):
        pin_cores("separation", 0, [0, 1])


def test_mesh_refuses_bad_pinning_before_starting_anything() -> None:
    usable = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match="'orchestrator' is not a worker"):
        Mesh(pin=("orchestrator",))
    with pytest.raises(ConfigError, match=f"only {usable} CPUs are usable"):
        Mesh(replicas={"separation": usable + 1}, pin=("separation",))
    mesh = Mesh(replicas={"separation": 2}, pin=("separation",)) if usable >= 2 else Mesh(pin=("separation",))
    try:
        cpus = [mesh.affinity[inst] for inst in mesh.instances("separation")]
        assert sorted(c for s in cpus for c in s) == sorted(os.sched_getaffinity(0))
        assert "hpss" not in mesh.affinity  # the rest of the mesh is not pinned
    finally:
        mesh.stop()  # started nothing; removes its run folder


def test_bench_checks_the_worker_count(capsys: pytest.CaptureFixture[str]) -> None:
    usable = len(os.sched_getaffinity(0))
    assert check_split(1, False) is None and check_split(usable, True) is None
    assert check_split(usable + 1, False) is None  # unpinned: workers share the cores
    assert "must be a whole number >= 1, got 0" in (check_split(0, False) or "")
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--separation-workers", str(usable + 1), "--pin"])
    assert cmd_bench(args) == 2  # refused before any work
    assert f"only {usable} are usable" in capsys.readouterr().err
