"""Generate Python code and the manifest JSON Schema from protos/ — the one generator.

    python scripts/gen_protos.py          # write libs/audiomesh/v1 and the schema
    python scripts/gen_protos.py --check  # exit 1 when the committed files are stale

Writes `_pb2.py`, `.pyi` (mypy-protobuf) and `_pb2_grpc.py` into libs/audiomesh/v1, so the
generated imports (`from audiomesh.v1 import common_pb2`) work as they are. google/api comes
from the googleapis-common-protos wheel at run time; its vendored .proto files are only
read here.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
THIRD_PARTY = PROTO_ROOT / "third_party"
OUT_PACKAGE = ROOT / "libs" / "audiomesh" / "v1"
SCHEMA_PATH = ROOT / "libs" / "audiomesh" / "manifest" / "manifest.schema.json"


def _protoc_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).parent / "_proto"


def generate(out_root: Path) -> None:
    """Run protoc into ``out_root`` (which becomes the import root)."""
    protos = sorted((PROTO_ROOT / "audiomesh" / "v1").glob("*.proto"))
    plugin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{_protoc_include()}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed:\n{done.stderr}")
    (out_root / "audiomesh" / "v1" / "__init__.py").write_text(
        '"""Generated from protos/audiomesh/v1 by scripts/gen_protos.py. Do not edit."""\n'
    )


# --- manifest JSON Schema, derived from the Manifest message (proto3 JSON mapping) ---

# Fields the manifest always carries, beyond the types.
_REQUIRED = {
    "audiomesh.v1.Manifest": ["schemaVersion", "job"],
    "audiomesh.v1.Job": ["jobId", "state", "createTime", "updateTime", "input", "nodes"],
    "audiomesh.v1.Node": ["name", "stage", "state"],
    "audiomesh.v1.Track": ["name", "key"],
}


def manifest_schema(schema_version: int) -> dict:
    sys.path.insert(0, str(ROOT / "libs"))
    from audiomesh.protojson import message_schemas
    from audiomesh.v1 import orchestrator_pb2

    root = orchestrator_pb2.Manifest.DESCRIPTOR
    defs = message_schemas(root, required=_REQUIRED)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://audiomesh.dev/schemas/manifest-v{schema_version}.json",
        "title": "audiomesh job manifest",
        "description": "Generated from audiomesh.v1.Manifest by scripts/gen_protos.py. Do not edit.",
        **defs[root.full_name],
        "$defs": {k: v for k, v in defs.items() if k != root.full_name},
    }
    schema["properties"]["schemaVersion"] = {"const": schema_version}
    return schema


def build(dest_pkg: Path, dest_schema: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if dest_pkg.exists():
            shutil.rmtree(dest_pkg)
        shutil.copytree(Path(tmp) / "audiomesh" / "v1", dest_pkg)
    from_version = _schema_version()
    dest_schema.write_text(json.dumps(manifest_schema(from_version), indent=2) + "\n")


def _schema_version() -> int:
    # Single source: the constant in libs/audiomesh/manifest/__init__.py, read without importing
    # the package (its dependencies may not be installed when only generating).
    text = (ROOT / "libs" / "audiomesh" / "manifest" / "__init__.py").read_text()
    for line in text.splitlines():
        if line.startswith("SCHEMA_VERSION"):
            return int(line.split("=")[1].strip())
    raise SystemExit("SCHEMA_VERSION not found in libs/audiomesh/manifest/__init__.py")


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pkg, schema = Path(tmp) / "v1", Path(tmp) / "manifest.schema.json"
        with tempfile.TemporaryDirectory() as gen:
            generate(Path(gen))
            shutil.copytree(Path(gen) / "audiomesh" / "v1", pkg)
        schema.write_text(json.dumps(manifest_schema(_schema_version()), indent=2) + "\n")
        stale = []
        cmp = filecmp.dircmp(pkg, OUT_PACKAGE, ignore=["__pycache__"])
        stale += cmp.left_only + cmp.right_only + cmp.diff_files
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != schema.read_text():
            stale.append(str(SCHEMA_PATH.relative_to(ROOT)))
    if stale:
        print("generated files are stale; run: python scripts/gen_protos.py\n  " + "\n  ".join(stale))
        return 1
    print("generated files are up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed output is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    build(OUT_PACKAGE, SCHEMA_PATH)
    print(f"wrote {OUT_PACKAGE.relative_to(ROOT)} and {SCHEMA_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
