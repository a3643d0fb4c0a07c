#!/usr/bin/env bash
# The README's second command: set up, check contracts and generated code, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_helm.sh
.venv/bin/buf lint
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/ruff check .
.venv/bin/python scripts/typecheck.py
# Both cores (most tests wait on subprocess meshes); a test file per worker (tests/conftest.py).
.venv/bin/python -m pytest -n 2 --dist loadfile --durations=30 "$@"
