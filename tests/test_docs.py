"""Docs and public names that must match the code: the README's HTTP route table lists every
route the gateway serves, and every ``__all__`` of the package names something that exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from audiomesh.gateway.app import ORCHESTRATOR
from audiomesh.gateway.routes import http_routes

ROOT = Path(__file__).resolve().parent.parent
# Where each part of the ``audiomesh`` package lives (pyproject's package-dir).
PACKAGE_DIRS = {"audiomesh": ROOT / "libs" / "audiomesh", "audiomesh.services": ROOT / "services",
                "audiomesh.gateway": ROOT / "gateway"}  # fmt: skip


def _modules_with_all() -> list[str]:
    """Every module whose source assigns ``__all__`` (found without importing anything)."""
    found = set()
    for prefix, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if prefix == "audiomesh" and rel.parts[0] in ("v1",):  # generated protobuf code
                continue
            tree = ast.parse(path.read_text())
            if any(
                isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
                for node in tree.body
            ):
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                found.add(".".join((prefix, *parts)))
    return sorted(found)


def test_readme_route_table_lists_every_http_route():
    readme = (ROOT / "README.md").read_text()
    param = re.compile(r"\{[^}]+\}")  # the table writes {id} for every path parameter
    missing = [
        f"{r.verb} {r.template}"
        for r in http_routes(ORCHESTRATOR)
        if f"`{r.verb} {param.sub('{id}', r.template)}" not in readme
    ]
    assert not missing, f"routes missing from README's route table: {missing}"


@pytest.mark.parametrize("module", _modules_with_all())
def test_every_all_name_resolves(module):
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"
    namespace: dict = {}
    exec(f"from {module} import *", namespace)  # what a user's star import does
    assert set(mod.__all__) <= namespace.keys()


def test_modules_with_all_are_found():
    assert {"audiomesh.rpc", "audiomesh.store", "audiomesh.separation"} <= set(_modules_with_all())


def test_readme_track_table_names_every_delivered_track():
    from audiomesh.services.orchestrator.graph import make_plan

    section = (ROOT / "README.md").read_text().split("### What each track is", 1)[1].split("\n### ", 1)[0]
    sources = ["drums", "bass", "other", "vocals", "guitar", "piano"]
    plan = make_plan("j", sources=sources, two_stems="", main_stems=[], ext=".wav")
    tracks = plan.intermediate_tracks()
    assert tracks and not [t for t in tracks if f"`{t}`" not in section]
