#!/usr/bin/env bash
# Lint and validate everything under deploy/ plus the Dockerfile and compose file, then run
# tests/unit/test_deploy.py (metric names, probes, security settings) and
# tests/unit/test_inference_gateway.py (CRD schemas, pool/EPP/route wiring) with the tools on PATH.
# Installs the tools first (scripts/install_deploy_tools.sh, cached and idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_BIN="$(scripts/install_deploy_tools.sh)"
export PATH="$TOOLS_BIN:$PATH"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

echo "== hadolint Dockerfile"
hadolint Dockerfile

echo "== yamllint"
yamllint --strict -c deploy/.yamllint.yaml docker-compose.yml deploy/

# kubernetes-validate has no schema for the Prometheus operator's ServiceMonitor nor for the Gateway
# API and Inference Extension resources; it warns and moves on. tests/unit/test_deploy.py checks the
# ServiceMonitor's fields, tests/unit/test_inference_gateway.py validates InferencePool, Gateway and
# HTTPRoute against the published CRD schemas kept in tests/data/crds.
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
  name="$(basename "$dir")"
  echo "== kubectl kustomize $dir"
  kubectl kustomize "$dir" >"$OUT/$name.yaml"
  echo "== kubernetes-validate $name"
  kubernetes-validate --strict --quiet "$OUT/$name.yaml"
done

echo "== pytest tests/unit/test_deploy.py tests/unit/test_inference_gateway.py"
PYTHON="${PYTHON:-python}"
[[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
"$PYTHON" -m pytest -q tests/unit/test_deploy.py tests/unit/test_inference_gateway.py
