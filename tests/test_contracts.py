"""The contracts: generated code is fresh, buf lint is clean, the manifest schema holds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audiomesh import manifest
from audiomesh.errors import InvalidInput
from audiomesh.v1 import orchestrator_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_and_schema_are_up_to_date():
    done = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_stale_generated_code_is_detected(tmp_path):
    """Copy the repository's contracts, change a proto, and the check must fail."""
    copy = tmp_path / "repo"
    for part in ("protos", "scripts", "libs/audiomesh/v1", "libs/audiomesh/manifest"):
        shutil.copytree(ROOT / part, copy / part)
    proto = copy / "protos/audiomesh/v1/common.proto"
    proto.write_text(proto.read_text() + "\nmessage Extra {\n  string note = 1;\n}\n")
    done = subprocess.run(
        [sys.executable, str(copy / "scripts/gen_protos.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "stale" in done.stdout and "common_pb2.py" in done.stdout


def test_buf_lint_is_clean():
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.skip("buf-bin is not installed (pip install -e '.[dev]')")
    done = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_orchestrator_routes_are_annotated():
    from google.api import annotations_pb2

    service = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
    routed = {m.name for m in service.methods if m.GetOptions().HasExtension(annotations_pb2.http)}
    # UploadAudio is a client stream: the HTTP facade serves it as a custom multipart handler.
    assert routed == {m.name for m in service.methods} - {"UploadAudio"}


def _minimal_manifest() -> orchestrator_pb2.Manifest:
    job = orchestrator_pb2.Job(job_id="0b6d8b0e-8f3a-4d7c-9a51-2f5b8c1d9e10", state=1)
    job.create_time.GetCurrentTime()
    job.update_time.GetCurrentTime()
    job.input.name = "song.wav"
    job.nodes.add(name="decode", stage="decode", state=1)
    return orchestrator_pb2.Manifest(schema_version=manifest.SCHEMA_VERSION, job=job)


def test_manifest_round_trips_and_validates():
    doc = _minimal_manifest()
    data = manifest.dumps(doc)
    assert manifest.loads(data) == doc


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d.pop("schemaVersion"), "(root)"),
        (lambda d: d.update(schemaVersion=99), "schemaVersion"),
        (lambda d: d["job"].update(state="JOB_STATE_EXPLODED"), "job/state"),
        (lambda d: d["job"]["nodes"][0].update(attempts="three"), "job/nodes/0/attempts"),
    ],
)
def test_manifest_schema_rejects_broken_documents(mutate, where):
    obj = json.loads(manifest.dumps(_minimal_manifest()))
    mutate(obj)
    with pytest.raises(InvalidInput, match=re.escape(f"at {where}:")):
        manifest.loads(json.dumps(obj).encode())


def test_a_field_of_a_newer_version_is_skipped_when_read_and_refused_by_validate():
    """A rolling upgrade: an older orchestrator reads what a newer one wrote (a field added since)."""
    doc = _minimal_manifest()
    obj = json.loads(manifest.dumps(doc))
    obj["job"]["fieldFromTheFuture"] = {"x": 1}
    obj["job"]["nodes"][0]["alsoNew"] = 2
    assert manifest.loads(json.dumps(obj).encode()) == doc
    with pytest.raises(InvalidInput, match=re.escape("at job:")):
        manifest.validate(obj)  # what this version writes has no field the schema does not list
    obj["job"]["state"] = "JOB_STATE_EXPLODED"  # a known field stays checked
    with pytest.raises(InvalidInput, match=re.escape("at job/state:")):
        manifest.loads(json.dumps(obj).encode())


def test_manifest_that_is_not_json():
    with pytest.raises(InvalidInput, match="not JSON"):
        manifest.loads(b"{not json")
