"""Job manifests: the JSON record of everything that happened to a job.

The manifest is the protobuf message ``audiomesh.v1.Manifest`` in proto3 JSON; its JSON
Schema (``manifest.schema.json`` beside this file) is generated from the same message by
``scripts/gen_protos.py``, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import platform
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
from google.protobuf import json_format, timestamp_pb2

from audiomesh.errors import InvalidInput
from audiomesh.v1 import orchestrator_pb2

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
_PACKAGES = ("audiomesh", "demucs", "torch", "numpy", "librosa", "grpcio", "soundfile", "soxr", "pyloudnorm")


@cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@cache
def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_start(job: orchestrator_pb2.Job) -> timestamp_pb2.Timestamp:
    """When the job's latest run was asked for: its latest retry, else its creation (what "took"
    and the job-duration metric count from)."""
    return job.retry_time if job.HasField("retry_time") else job.create_time


def dumps(manifest: orchestrator_pb2.Manifest) -> bytes:
    text = json_format.MessageToJson(manifest, always_print_fields_with_no_presence=True, indent=2, sort_keys=False)
    return text.encode() + b"\n"


def loads(data: bytes) -> orchestrator_pb2.Manifest:
    """Parse and validate a manifest; InvalidInput names what is wrong.

    Fields this version does not know are skipped, not refused: during a rolling upgrade (or
    after a rollback) an older orchestrator reads manifests a newer one wrote, which may carry
    fields added since (protobuf's own rule for unknown fields). Everything else is checked."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"manifest is not JSON: {exc}") from None
    validate(obj, allow_unknown_fields=True)
    return json_format.ParseDict(obj, orchestrator_pb2.Manifest(), ignore_unknown_fields=True)


def validate(obj: Any, *, allow_unknown_fields: bool = False) -> None:
    """Check ``obj`` against the schema (which lists every field: a document this version
    writes has no other); ``allow_unknown_fields`` lets fields of a newer version pass."""
    found = [
        e
        for e in jsonschema.Draft202012Validator(schema()).iter_errors(obj)
        if not (allow_unknown_fields and e.validator == "additionalProperties")
    ]
    exc = jsonschema.exceptions.best_match(found)
    if exc is not None:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidInput(f"manifest does not match schema v{SCHEMA_VERSION} at {where}: {exc.message}")
