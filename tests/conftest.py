"""Shared fixtures live in tests/helpers/*; register them here. Also how the suite is split
across pytest-xdist workers (scripts/test.sh runs ``-n 3 --dist loadfile``)."""

import pytest

pytest_plugins = [
    "tests.helpers.s3",
    "tests.helpers.otlp",
    "tests.helpers.mesh",
    "tests.helpers.browser",
    "tests.helpers.workers",
]


#: Tests that run torch.compile: minutes of a busy core each (dynamo's first trace in a process),
#: so under xdist they go to one worker, one after another and first (the longest chain), instead
#: of starving each other and the mesh tests past their timeouts. Node id prefixes.
COMPILE_TESTS = (
    "tests/test_compiled_separation.py::",
    "tests/test_bench.py::test_bench_runs_end_to_end_and_reports_every_key",
)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's factory; a hook only with xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` (scripts/test.sh), with COMPILE_TESTS as one unit that starts first: a
    test file is one unit of work, so its module fixtures (a mesh start) are set up once.
    (xdist_group marks cannot do this: xdist 3.8 renames node ids in a way pytest 9 ignores.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class CompileFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "torch-compile" if nodeid.startswith(COMPILE_TESTS) else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "torch-compile" in self.workqueue:
                self.workqueue.move_to_end("torch-compile", last=False)
            super()._assign_work_unit(node)

    return CompileFirst(config, log)
