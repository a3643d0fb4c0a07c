#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install audiomesh with its dev tools.
# torch is installed first, pinned: an unpinned torch from PyPI is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.audiomesh-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[dev]'
  # Test-only reference for the RoFormer models: Music-Source-Separation-Training's own demix and
  # networks (PyPI msst). Without its dependencies: its metadata pins torch<2.12, which would
  # replace the pinned torch; what it needs at import is ml-collections and absl-py.
  .venv/bin/python -m pip install -q --no-deps msst==0.1.0
  .venv/bin/python -m pip install -q ml-collections absl-py
  touch "$stamp"
fi
