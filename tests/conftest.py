"""Shared fixtures live in tests/helpers/*; register them here. Also how the suite is split
across pytest-xdist workers (scripts/test.sh runs ``-n 2 --dist loadfile``)."""

import os

import pytest

# OpenMP threads that wait for work spin by default. Two xdist workers plus the meshes' worker
# processes share two cores, and a spinning torch waits on threads that have no core: measured
# here under load, a tiny HTDemucs separation took 40 s with spinning and 2-5 s with passive
# waits (CI: test_separation_model 102 s in the suite, 2 s alone). Set before torch loads, and
# inherited by every process the tests start. Benchmarks run outside the suite are unaffected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = [
    "tests.helpers.s3",
    "tests.helpers.otlp",
    "tests.helpers.mesh",
    "tests.helpers.browser",
    "tests.helpers.workers",
]


#: Units of work under xdist besides one per test file (node id prefixes). "torch-compile": tests
#: that run torch.compile, minutes of a busy core each (dynamo's first trace in a process), so they
#: run on one worker, one after another and first (the longest chain), instead of starving each
#: other and the mesh tests past their timeouts. "numba-hpss": the first test of each file
#: JIT-compiles the HPSS kernels (and librosa's) into numba's on-disk cache; on one worker the
#: second file finds them there, on two workers at once both compile.
GROUPS = {
    "torch-compile": (
        "tests/test_compiled_separation.py::",
        "tests/test_bench.py::test_bench_runs_end_to_end_and_reports_every_key",
    ),
    "numba-hpss": ("tests/test_dsp_hpss.py::", "tests/test_hpss_chunked.py::"),
}


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's factory; a hook only with xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` (scripts/test.sh) with GROUPS, the compile group first: a test file is
    one unit of work, so its module fixtures (a mesh start) are set up once, not per worker.
    (xdist_group marks cannot do this: xdist 3.8 renames node ids in a way pytest 9 ignores.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Grouped(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = next((name for name, prefixes in GROUPS.items() if nodeid.startswith(prefixes)), None)
            return group or super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "torch-compile" in self.workqueue:
                self.workqueue.move_to_end("torch-compile", last=False)
            super()._assign_work_unit(node)

    return Grouped(config, log)
